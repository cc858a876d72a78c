"""How the core builds and calls one family's layers; adapters only say how their family differs.

The node calls ``prepare`` once per step (positions, masks, rotary or alibi terms shared by every
layer of the span), then ``run_layer`` for each layer with the session's KV cache. The client builds
the embeddings, final norm and LM head with ``load_client_head``. Subclasses set class attributes
(the layer class, weight names) and override only the calls whose convention differs.
"""

import logging
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig

from farmesh_core.checkpoint import Checkpoint
from farmesh_core.errors import UnsupportedArchitectureError

logger = logging.getLogger(__name__)


def causal_mask(q_len: int, past_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive mask [1, 1, q_len, past_len + q_len]: token i sees the past and tokens up to i."""
    mask = torch.full((q_len, past_len + q_len), torch.finfo(dtype).min, dtype=dtype, device=device)
    return mask.triu_(past_len + 1)[None, None]


class ClientHead(nn.Module):
    """What a client runs locally: token embeddings in, logits out."""

    def __init__(self, embeddings: nn.Module, final_norm: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.embeddings, self.final_norm, self.lm_head = embeddings, final_norm, lm_head

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.final_norm(hidden))


class ArchitectureAdapter:
    """Base adapter for decoder-only families whose layers take rotary position embeddings (Llama)."""

    model_type: ClassVar[str]
    layer_class: ClassVar[type[nn.Module]]
    rotary_class: ClassVar[type[nn.Module] | None] = None
    final_norm_class: ClassVar[type[nn.Module]]
    layer_prefix: ClassVar[str] = "model.layers.{index}."
    embeddings_name: ClassVar[str] = "model.embed_tokens.weight"
    final_norm_prefix: ClassVar[str] = "model.norm."
    lm_head_name: ClassVar[str] = "lm_head.weight"
    attn_implementation: ClassVar[str] = "sdpa"

    # ---- node side -------------------------------------------------------------------------
    def num_layers(self, config: PretrainedConfig) -> int:
        return config.num_hidden_layers

    def hidden_size(self, config: PretrainedConfig) -> int:
        return config.hidden_size

    def kv_bytes_per_token(self, config: PretrainedConfig, dtype: torch.dtype) -> int:
        """KV cache bytes one token costs in one layer."""
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return 2 * heads * head_dim * torch.finfo(dtype).bits // 8

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
        layer.load_state_dict(state, strict=True, assign=True)
        meta = [n for n, t in [*layer.named_parameters(), *layer.named_buffers()] if t.is_meta]
        if meta:
            raise UnsupportedArchitectureError(f"layer {index}: tensors {meta} are not in the checkpoint")
        layer.requires_grad_(False)
        return layer.to(device).eval()

    def build_span_context(self, config: PretrainedConfig, device: str) -> Any:
        """Modules shared by all layers of a span (rotary embeddings here)."""
        return None if self.rotary_class is None else self.rotary_class(config=config).to(device)

    def prepare(self, context: Any, hidden: torch.Tensor, position: int) -> dict[str, Any]:
        """Keyword arguments every layer gets for this step of ``hidden`` starting at ``position``."""
        q_len = hidden.shape[1]
        position_ids = torch.arange(position, position + q_len, device=hidden.device)[None]
        kwargs: dict[str, Any] = {"position_ids": position_ids}
        # q_len == 1 needs no mask; a prefill from position 0 lets SDPA use its causal kernel, as
        # transformers does. Only a chunk after a cached prefix needs an explicit mask.
        kwargs["attention_mask"] = (
            causal_mask(q_len, position, hidden.dtype, hidden.device) if q_len > 1 and position > 0 else None
        )
        if context is not None:
            kwargs["position_embeddings"] = context(hidden, position_ids)
        return kwargs

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor, cache: Any, kwargs: dict[str, Any]) -> torch.Tensor:
        out = layer(hidden, cache=cache, use_cache=cache is not None, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    # ---- client side -----------------------------------------------------------------------
    def build_final_norm(self, config: PretrainedConfig) -> nn.Module:
        return self.final_norm_class(config.hidden_size, eps=config.rms_norm_eps)

    def load_client_head(self, checkpoint: Checkpoint, config: PretrainedConfig, dtype: torch.dtype) -> ClientHead:
        """Load only the embeddings, final norm and LM head."""
        norm_names = checkpoint.names_with_prefix(self.final_norm_prefix)
        tied = getattr(config, "tie_word_embeddings", False) or self.lm_head_name not in checkpoint.weight_map
        wanted = [self.embeddings_name, *norm_names] + ([] if tied else [self.lm_head_name])
        tensors = checkpoint.load_tensors(wanted, dtype)
        embeddings = nn.Embedding.from_pretrained(tensors[self.embeddings_name], freeze=True)
        with torch.device("meta"):
            final_norm = self.build_final_norm(config)
        final_norm.load_state_dict(
            {n[len(self.final_norm_prefix) :]: tensors[n] for n in norm_names}, strict=True, assign=True
        )
        head_weight = tensors[self.embeddings_name] if tied else tensors[self.lm_head_name]
        lm_head = nn.Linear(head_weight.shape[1], head_weight.shape[0], bias=False, device="meta")
        lm_head.weight = nn.Parameter(head_weight, requires_grad=False)
        head = ClientHead(embeddings, final_norm, lm_head)
        head.requires_grad_(False)
        return head.eval()


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
