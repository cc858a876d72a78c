"""How the core builds and calls one family's layers; adapters only say how their family differs.

The node calls ``prepare`` once per step (positions, masks, rotary or alibi terms shared by every
layer of the span), then ``run_layer`` for each layer with the session's KV cache (or, in inference
steps, the bit-identical and faster call ``lean_layer`` made of the layer, if any). The client builds
the embeddings (and their norm, where the family has one), final norm and LM head with
``load_client_head``. Subclasses set class attributes (the layer class, weight names, the keyword
that takes the cache) and override only the calls whose convention differs: ``convert_layer_state``
for checkpoints whose tensors are laid out unlike the layer's parameters, ``build_span_context`` and
``prepare`` for position terms other than rotary embeddings.
"""

import logging
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig

from farmesh_core.checkpoint import Checkpoint
from farmesh_core.errors import UnsupportedArchitectureError
from farmesh_core.fused_norm import FusedNorm
from farmesh_core.head_batch import ApproximateLogits, HeadBatcher
from farmesh_core.lean_layer import lean_llama_layer
from farmesh_core.module_hooks import has_forward_hooks
from farmesh_core.rotary import RotaryRows

logger = logging.getLogger(__name__)

# One layer's inference step: (hidden, cache or None, the keyword arguments of ``prepare``) -> hidden.
LayerCall = Callable[[torch.Tensor, Any, dict[str, Any]], torch.Tensor]


def causal_mask(
    q_len: int, past_len: int, dtype: torch.dtype, device: torch.device, window: int | None = None
) -> torch.Tensor:
    """Additive mask [1, 1, q_len, past_len + q_len]: token i sees the past and tokens up to i.

    With ``window`` (sliding-window attention), a token sees only the ``window`` last positions,
    itself included, as ``transformers``' sliding-window masks do.
    """
    mask = torch.full((q_len, past_len + q_len), torch.finfo(dtype).min, dtype=dtype, device=device)
    mask.triu_(past_len + 1)
    if window is not None and past_len + q_len > window:
        too_far = torch.ones(mask.shape, dtype=torch.bool, device=device).tril_(past_len - window)
        mask.masked_fill_(too_far, torch.finfo(dtype).min)
    return mask[None, None]


def decode_batch_keys(positions: list[int], device: torch.device) -> torch.Tensor:
    """[rows, keys] booleans of a decode batch whose keys are padded to the longest session: row i's
    own keys, positions 0 to ``positions[i]``."""
    keys = torch.arange(max(positions) + 1, device=device)
    return keys[None, :] <= torch.tensor(positions, device=device)[:, None]


def decode_batch_mask(
    positions: list[int], dtype: torch.dtype, device: torch.device, window: int | None = None
) -> torch.Tensor:
    """Additive mask [rows, 1, 1, keys] of a decode batch: row i sees its own keys, not the padding,
    and with ``window`` only the ``window`` last of them, as :func:`causal_mask` does."""
    seen = decode_batch_keys(positions, device)
    if window is not None:
        keys = torch.arange(seen.shape[1], device=device)
        seen &= keys[None, :] > torch.tensor(positions, device=device)[:, None] - window
    mask = torch.zeros(seen.shape, dtype=dtype, device=device).masked_fill_(~seen, torch.finfo(dtype).min)
    return mask[:, None, None, :]


class ClientHead(nn.Module):
    """What a client runs locally: token embeddings in, logits out."""

    def __init__(
        self, embeddings: nn.Module, final_norm: nn.Module, lm_head: nn.Module, embeddings_norm: nn.Module | None = None
    ):
        super().__init__()
        self.embeddings, self.final_norm, self.lm_head = embeddings, final_norm, lm_head
        self.embeddings_norm = embeddings_norm
        self._fused_norm = FusedNorm()  # the final norm as one torch call, where that keeps its bits
        self._head_batcher: HeadBatcher | None = None
        self._batcher_for: tuple | None = None  # the head weight (its storage) that ``_head_batcher`` was made for

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states the first layer takes: token embeddings, normalised where the family does so."""
        return self.normalised(self.embeddings(input_ids))

    def normalised(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Token embeddings (computed here or given by the caller) as the first layer takes them."""
        return embeddings if self.embeddings_norm is None else self.embeddings_norm(embeddings)

    def in_head_dtype(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` in the LM head's dtype, without a call where it already is: each torch call hands
        over the GIL, which sessions stepping from several threads pay for."""
        dtype = self.lm_head.weight.dtype
        return hidden if hidden.dtype == dtype else hidden.to(dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self._fused_norm(self.final_norm, hidden)
        batcher = None if torch.is_grad_enabled() else self._batcher()
        if batcher is not None and batcher.takes(hidden):
            return batcher(hidden)
        return self.lm_head(hidden)

    def approximate_logits(self, hidden: torch.Tensor) -> ApproximateLogits | None:
        """Logits of one row ``hidden`` by the quickest path, which may differ from :meth:`logits`, with
        a bound on how far each may be from them and a way to score near ties again; None where there is
        no quicker path (then use :meth:`logits`). For callers that need only what the bound cannot
        change (a greedy choice, see ``TokenChooser.certain``)."""
        batcher, hidden = self._quick(hidden, rows=1)
        return None if batcher is None else batcher.approximate(hidden)

    def approximate_rows(self, hidden: torch.Tensor) -> list[ApproximateLogits] | None:
        """:meth:`approximate_logits` of each row of ``hidden`` [rows, hidden] (a shared session's), in
        one pass through the head; None where there is no quicker path."""
        if hidden.dim() != 2:
            return None
        batcher, hidden = self._quick(hidden, rows=hidden.shape[0])
        return None if batcher is None else batcher.approximate_rows(hidden)

    def _quick(self, hidden: torch.Tensor, rows: int) -> tuple[HeadBatcher | None, torch.Tensor]:
        """The head batcher that gives quick logits of ``hidden`` (``rows`` rows), if any, with
        ``hidden`` through the final norm."""
        batcher = None if torch.is_grad_enabled() else self._batcher()
        if batcher is None or batcher.quick is None:
            return None, hidden
        hidden = self._fused_norm(self.final_norm, hidden)
        return (batcher if batcher.takes(hidden, rows=rows) else None), hidden

    def module_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """:meth:`logits` by the modules' own calls, alone: the bits of a single-process model."""
        return self.lm_head(self.final_norm(hidden))

    def _batcher(self) -> HeadBatcher | None:
        """The one-token rows' path through a plain linear LM head (``farmesh_core.head_batch``);
        made again when the head's weight is replaced (another dtype, new weights). None while the head
        has forward hooks (its own or global ones): the batcher multiplies its weight directly."""
        head = self.lm_head
        if has_forward_hooks(head):
            return None
        weight = getattr(head, "weight", None)
        key = None if weight is None else (id(weight), weight.data_ptr(), weight.dtype, weight.shape)
        if key != self._batcher_for:
            plain = type(head) is nn.Linear and head.bias is None
            self._head_batcher = HeadBatcher(weight) if plain else None
            self._batcher_for = key
        return self._head_batcher


class ArchitectureAdapter:
    """Base adapter for decoder-only families whose layers take rotary position embeddings (Llama)."""

    model_type: ClassVar[str]
    layer_class: ClassVar[type[nn.Module]]
    rotary_class: ClassVar[type[nn.Module] | None] = None
    final_norm_class: ClassVar[type[nn.Module]]
    # Config field holding the epsilon of the final norm (and of the embeddings norm, if any).
    norm_eps_name: ClassVar[str] = "rms_norm_eps"
    layer_prefix: ClassVar[str] = "model.layers.{index}."
    embeddings_name: ClassVar[str] = "model.embed_tokens.weight"
    # A norm the client applies to the token embeddings before the first layer (Bloom has one).
    embeddings_norm_prefix: ClassVar[str | None] = None
    final_norm_prefix: ClassVar[str] = "model.norm."
    lm_head_name: ClassVar[str] = "lm_head.weight"
    # "sdpa" lets a prefill from position 0 go without a mask (SDPA's causal kernel); other
    # implementations get an explicit causal mask for every step of more than one token.
    attn_implementation: ClassVar[str] = "sdpa"
    # The keyword a layer takes its KV cache by (older layers call it ``layer_past``).
    cache_argument: ClassVar[str] = "cache"
    # The family's linear modules that compute ``x @ W^T + b`` (a subclass of ``nn.Linear`` may not):
    # in inference steps a ``row_matmul.StepLinear`` stands in for them, where the layer runs no lean call.
    linear_classes: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear,)

    # ---- node side -------------------------------------------------------------------------
    def num_layers(self, config: PretrainedConfig) -> int:
        return config.num_hidden_layers

    def hidden_size(self, config: PretrainedConfig) -> int:
        return config.hidden_size

    def kv_heads(self, config: PretrainedConfig) -> int:
        """How many key (and value) heads a layer writes to its cache per token."""
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads

    def kv_bytes_per_token(self, config: PretrainedConfig, dtype: torch.dtype) -> int:
        """KV cache bytes one token costs in one layer."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return 2 * self.kv_heads(config) * head_dim * torch.finfo(dtype).bits // 8

    def prepare_config(self, config: PretrainedConfig) -> PretrainedConfig:
        config._attn_implementation = self.attn_implementation
        return config

    def build_layer(self, config: PretrainedConfig, index: int) -> nn.Module:
        return self.layer_class(config, layer_idx=index)

    def load_layer(
        self, checkpoint: Checkpoint, config: PretrainedConfig, index: int, dtype: torch.dtype, device: str
    ) -> nn.Module:
        """Build layer ``index`` without initialising it, then fill it from the checkpoint."""
        with torch.device("meta"):
            layer = self.build_layer(config, index)
        prefix = self.layer_prefix.format(index=index)
        names = checkpoint.names_with_prefix(prefix)
        state = {name[len(prefix) :]: t for name, t in checkpoint.load_tensors(names, dtype).items()}
        layer.load_state_dict(self.convert_layer_state(state, config), strict=True, assign=True)
        meta = [n for n, t in [*layer.named_parameters(), *layer.named_buffers()] if t.is_meta]
        if meta:
            raise UnsupportedArchitectureError(f"layer {index}: tensors {meta} are not in the checkpoint")
        layer.requires_grad_(False)
        return layer.to(device).eval()

    def convert_layer_state(self, state: dict[str, torch.Tensor], config: PretrainedConfig) -> dict[str, torch.Tensor]:
        """The layer's state dict from its checkpoint tensors (names relative to the layer); as is here."""
        return state

    def build_span_context(self, config: PretrainedConfig, device: str) -> Any:
        """What every step of a span needs from the config (rotary embeddings here), built once."""
        if self.rotary_class is None:
            return None
        rotary = self.rotary_class(config=config).to(device)
        return RotaryRows(rotary) if RotaryRows.fits(rotary) else rotary

    def prepare(self, context: Any, hidden: torch.Tensor, position: int) -> dict[str, Any]:
        """Keyword arguments every layer gets for this step of ``hidden`` starting at ``position``."""
        q_len = hidden.shape[1]
        if q_len == 1 and isinstance(context, RotaryRows):
            position_ids, embeddings = context.row(hidden, position)
            return {"position_ids": position_ids, "attention_mask": None, "position_embeddings": embeddings}
        position_ids = torch.arange(position, position + q_len, device=hidden.device)[None]
        kwargs: dict[str, Any] = {"position_ids": position_ids}
        # q_len == 1 needs no mask; a prefill from position 0 lets SDPA use its causal kernel, as
        # transformers does. Only a chunk after a cached prefix (or any chunk, without SDPA) needs one.
        needs_mask = q_len > 1 and (position > 0 or self.attn_implementation != "sdpa")
        kwargs["attention_mask"] = causal_mask(q_len, position, hidden.dtype, hidden.device) if needs_mask else None
        if context is not None:
            kwargs["position_embeddings"] = context(hidden, position_ids)
        return kwargs

    def prepare_decode_batch(self, context: Any, hidden: torch.Tensor, positions: list[int]) -> dict[str, Any] | None:
        """Keyword arguments for one-token steps of several sessions at once (row i at ``positions[i]``).

        Keys and values come padded to the longest session, so each row gets a mask hiding the padding
        (:func:`decode_batch_mask`). Returns None where the family cannot batch this way; then each
        session steps alone. Families that customise ``prepare`` (alibi, sliding windows) opt out
        unless they override this too.
        """
        if type(self).prepare is not ArchitectureAdapter.prepare:
            return None
        return self.rotary_decode_batch(context, hidden, positions)

    def rotary_decode_batch(
        self, context: Any, hidden: torch.Tensor, positions: list[int], window: int | None = None
    ) -> dict[str, Any]:
        """``prepare_decode_batch`` for rotary families: each row's position ids, rotary terms and mask
        (``window``: the sliding window, see :func:`decode_batch_mask`)."""
        position_ids = torch.tensor(positions, device=hidden.device)[:, None]
        mask = decode_batch_mask(positions, hidden.dtype, hidden.device, window)
        kwargs: dict[str, Any] = {"position_ids": position_ids, "attention_mask": mask}
        if isinstance(context, RotaryRows):
            kwargs["position_embeddings"] = context.rows(hidden, positions)
        elif context is not None:
            kwargs["position_embeddings"] = context(hidden, position_ids)
        return kwargs

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor, cache: Any, kwargs: dict[str, Any]) -> torch.Tensor:
        out = layer(hidden, **{self.cache_argument: cache}, use_cache=cache is not None, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def lean_layer(self, layer: nn.Module, one_row_threads: int = 1) -> LayerCall | None:
        """A faster stand-in for ``run_layer(layer, ...)`` in inference steps, bit-identical to it, or None.
        ``one_row_threads``: how many torch threads a lone one-token step may use.

        Here a :class:`~farmesh_core.lean_layer.LeanLlamaLayer` for unmodified Llama layers, which takes
        the masks of this class's ``prepare``; a family with its own ``prepare`` or ``run_layer`` opts out
        unless it overrides this too.
        """
        base = ArchitectureAdapter
        if type(self).prepare is not base.prepare or type(self).run_layer is not base.run_layer:
            return None
        return lean_llama_layer(layer, one_row_threads)

    # ---- client side -----------------------------------------------------------------------
    def build_final_norm(self, config: PretrainedConfig) -> nn.Module:
        """The final norm, without weights (also the embeddings norm where ``embeddings_norm_prefix`` is set)."""
        return self.final_norm_class(config.hidden_size, eps=getattr(config, self.norm_eps_name))

    def _load_norm(
        self, checkpoint: Checkpoint, config: PretrainedConfig, prefix: str, dtype: torch.dtype
    ) -> nn.Module:
        tensors = checkpoint.load_tensors(checkpoint.names_with_prefix(prefix), dtype)
        with torch.device("meta"):
            norm = self.build_final_norm(config)
        norm.load_state_dict({n[len(prefix) :]: t for n, t in tensors.items()}, strict=True, assign=True)
        return norm

    def load_client_head(self, checkpoint: Checkpoint, config: PretrainedConfig, dtype: torch.dtype) -> ClientHead:
        """Load only the embeddings (and their norm, if any), final norm and LM head."""
        tied = getattr(config, "tie_word_embeddings", False) or self.lm_head_name not in checkpoint.weight_map
        wanted = [self.embeddings_name] + ([] if tied else [self.lm_head_name])
        tensors = checkpoint.load_tensors(wanted, dtype)
        embeddings = nn.Embedding.from_pretrained(tensors[self.embeddings_name], freeze=True)
        final_norm = self._load_norm(checkpoint, config, self.final_norm_prefix, dtype)
        embeddings_norm = (
            None
            if self.embeddings_norm_prefix is None
            else self._load_norm(checkpoint, config, self.embeddings_norm_prefix, dtype)
        )
        head_weight = tensors[self.embeddings_name] if tied else tensors[self.lm_head_name]
        lm_head = nn.Linear(head_weight.shape[1], head_weight.shape[0], bias=False, device="meta")
        lm_head.weight = nn.Parameter(head_weight, requires_grad=False)
        head = ClientHead(embeddings, final_norm, lm_head, embeddings_norm)
        head.requires_grad_(False)
        return head.eval()


def checkpoint_dtype(config: PretrainedConfig) -> torch.dtype:
    """The dtype a checkpoint's config names (float32 where it names none): the client's head's, and a
    Far Node's head's, so that both choose the same tokens."""
    dtype = getattr(config, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype or "float32")


def adapter_for(config: PretrainedConfig) -> ArchitectureAdapter:
    """The registered adapter for ``config.model_type``, or an error naming the package to install."""
    from farmesh_core.plugins import get_architectures

    adapters = get_architectures()
    model_type = getattr(config, "model_type", None)
    if model_type not in adapters:
        package = {"mixtral": "mistral"}.get(model_type, model_type)
        raise UnsupportedArchitectureError(
            f"No FarMesh adapter serves model_type={model_type!r}; install one, for example "
            f"`pip install farmesh-{package}` (installed: {', '.join(sorted(adapters)) or 'none'})"
        )
    return adapters[model_type]
