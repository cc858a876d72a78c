"""Llama decoder layers called without their ``nn.Module`` machinery, for the node's inference steps.

On a CPU, a one-token step of a layer spends much of its time in Python rather than arithmetic: the
module calls of ``LlamaDecoderLayer`` and its twelve submodules (hooks, decorators, keyword plumbing)
and the checks of transformers' attention function. :class:`LeanLlamaLayer` makes the same torch
calls on the same weights in the same order as transformers' layer with SDPA attention, so its
outputs are bit-identical. A layer that differs in any way (quantized or LoRA linears, biases,
another activation or attention implementation, hooks) is not eligible: :func:`lean_llama_layer`
returns None and the node calls the module as usual. Autograd (the backward pass) always uses the module.
"""

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations.sdpa_attention import pack_gqa, repeat_kv, use_gqa_in_sdpa
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaMLP,
    LlamaRMSNorm,
    apply_rotary_pos_emb,
)
from transformers.utils import is_torch_npu_available

logger = logging.getLogger(__name__)

_SILU = type(ACT2FN["silu"])
_LINEARS = (
    *(f"self_attn.{name}_proj" for name in "qkvo"),
    *(f"mlp.{name}_proj" for name in ("gate", "up", "down")),
)


def _few_rows_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` for an x of a few rows, as ``(weight @ x^T)^T``.

    On CPU the GEMM behind ``F.linear`` is slow for a few rows: 2 rows took 2-2.5x the time of one
    (hidden sizes 256 to 1024), more than two one-row steps, so batching decode steps saved nothing.
    ``weight @ x^T`` costs about one row's time for 2 rows, but grows with the rows faster than the
    GEMM does: it wins up to about 2048 / hidden_size rows (measured at 256, 512 and 1024), see
    ``LeanLlamaLayer.few_rows``. The sums run in another order, so rows can differ from a lone
    step's in the last bits, as any batched multiplication's may.
    """
    rows = x.reshape(-1, x.shape[-1])
    return torch.mm(weight, rows.t()).t().contiguous().view(*x.shape[:-1], weight.shape[0])


def few_rows_limit(in_features: int) -> int:
    """Up to how many rows :func:`_few_rows_linear` beats ``F.linear`` for weights of ``in_features`` columns."""
    return max(2, 2048 // in_features)


def rows_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)``; a few rows (one-token steps of several sessions) go the faster
    :func:`_few_rows_linear` way, one row keeps ``F.linear``'s bits."""
    rows = x.numel() // x.shape[-1]
    if 2 <= rows <= few_rows_limit(weight.shape[1]):
        return _few_rows_linear(x, weight)
    return F.linear(x, weight)


_SPLIT_VERDICTS: dict[tuple, bool] = {}  # (shape, strides, dtype, threads) -> bmm over row blocks gives F.linear's bits


def _row_blocks(weight: torch.Tensor, threads: int) -> torch.Tensor | None:
    """``weight`` ([out, in]) as ``threads`` blocks of its output rows, ``[threads, in, out / threads]``
    for ``torch.bmm``, if a one-row step through them gives ``F.linear``'s exact bits, else None.

    A one-token step's matmuls stream every weight from memory once; on CPU a one-row ``F.linear`` is
    a GEMV that uses one core whatever the torch threads, and one core's share of memory bandwidth is
    the limit (measured here: two processes each ran their 8 layers' matmuls as fast as one alone).
    ``bmm`` over row blocks runs one block per thread, each a dot product over the same whole input
    row, so the bits stay F.linear's. Whether they do is a property of the kernels for this shape,
    so it is checked once per shape and dtype, on this weight, before the blocks are used.
    """
    out_features, in_features = weight.shape
    if threads < 2 or weight.device.type != "cpu" or out_features % threads or not weight.is_contiguous():
        return None
    blocks = weight.view(threads, out_features // threads, in_features).transpose(1, 2)
    key = (tuple(weight.shape), weight.stride(), weight.dtype, threads)
    if key not in _SPLIT_VERDICTS:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.no_grad():
                rows = [torch.randn(1, 1, in_features, dtype=weight.dtype) for _ in range(3)]
                _SPLIT_VERDICTS[key] = all(torch.equal(F.linear(x, weight), _blocks_linear(x, blocks)) for x in rows)
        finally:
            torch.set_num_threads(previous)
        if not _SPLIT_VERDICTS[key]:
            logger.debug("weights %s keep F.linear: row blocks change its bits", key)
    return blocks if _SPLIT_VERDICTS[key] else None


_local = threading.local()  # this thread's lone one-token steps split their matmuls unless _local.one_thread


@contextmanager
def matmuls_on_one_thread() -> Iterator[None]:
    """Within it, lone one-token steps on this thread keep their matmuls on the caller's torch threads.

    A node busy with several sessions gets its parallelism from them (batches, and the nodes of a
    chain working at once): splitting its lone steps as well only makes the threads wait for cores.
    """
    before = getattr(_local, "one_thread", False)
    _local.one_thread = True
    try:
        yield
    finally:
        _local.one_thread = before


def _blocks_linear(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` for a one-row x and ``blocks = _row_blocks(weight, threads)``."""
    out = torch.bmm(x.reshape(1, 1, -1).expand(blocks.shape[0], 1, -1), blocks)
    return out.view(*x.shape[:-1], -1)


def _rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm.forward``: computed in float32, scaled in the input's dtype."""
    dtype = hidden.dtype
    hidden = hidden.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(dtype)


class LeanLlamaLayer:
    """``LlamaDecoderLayer.forward`` in eval mode as plain torch calls on the layer's own weights (no copies).

    ``lean(hidden, cache, kwargs)`` is ``adapter.run_layer(layer, hidden, cache, kwargs)`` with the keyword
    arguments of ``ArchitectureAdapter.prepare`` or ``prepare_decode_batch`` (``attention_mask``,
    ``position_embeddings``) and a cache with the transformers ``update`` protocol, or None.

    With ``one_row_threads`` > 1, a lone one-token step runs its matmuls on that many torch threads
    (see :func:`_row_blocks`) and the rest on the caller's: attention stays on one thread where that
    is the caller's count, because SDPA's sums depend on the threads.
    """

    def __init__(self, layer: LlamaDecoderLayer, one_row_threads: int = 1):
        attn, mlp = layer.self_attn, layer.mlp
        self.layer_idx, self.head_dim, self.scaling = attn.layer_idx, attn.head_dim, attn.scaling
        self.groups, self.is_causal = attn.num_key_value_groups, attn.is_causal
        self.q, self.k, self.v = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
        self.o = attn.o_proj.weight
        self.gate, self.up, self.down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
        self.norm1, self.eps1 = layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon
        self.norm2, self.eps2 = layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon
        self.few_rows = few_rows_limit(self.q.shape[1])  # batches up to this size use _few_rows_linear
        self.one_row_threads = one_row_threads
        weights = (self.q, self.k, self.v, self.o, self.gate, self.up, self.down)
        blocks = {id(weight): _row_blocks(weight, one_row_threads) for weight in weights}
        self.row_blocks = {key: value for key, value in blocks.items() if value is not None}

    def __call__(self, hidden: torch.Tensor, cache: Any, kwargs: dict[str, Any]) -> torch.Tensor:
        batched = hasattr(cache, "caches")  # a BatchedDecodeCache: one-token steps of several sessions
        if batched:
            linear = _few_rows_linear if hidden.shape[0] <= self.few_rows else F.linear
        else:
            one_row = (
                self.row_blocks and hidden.numel() == hidden.shape[-1] and not getattr(_local, "one_thread", False)
            )
            linear = self._one_row_linear if one_row else F.linear
        # LlamaAttention.forward
        x = _rms_norm(hidden, self.norm1, self.eps1)
        input_shape = x.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = linear(x, self.q).view(hidden_shape).transpose(1, 2)
        key = linear(x, self.k).view(hidden_shape).transpose(1, 2)
        value = linear(x, self.v).view(hidden_shape).transpose(1, 2)
        cos, sin = kwargs["position_embeddings"]
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if batched:
            out = self._attend_each(query, key, value, cache.caches)
        else:
            if cache is not None:
                key, value = cache.update(key, value, self.layer_idx)
            out = self._sdpa(query, key, value, kwargs["attention_mask"])
        out = out.transpose(1, 2).contiguous().reshape(*input_shape, -1)
        hidden = hidden + linear(out, self.o)
        # LlamaMLP.forward
        x = _rms_norm(hidden, self.norm2, self.eps2)
        return hidden + linear(F.silu(linear(x, self.gate)) * linear(x, self.up), self.down)

    def _one_row_linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        blocks = self.row_blocks.get(id(weight))
        if blocks is None:
            return F.linear(x, weight)
        threads = torch.get_num_threads()
        torch.set_num_threads(self.one_row_threads)
        try:
            return _blocks_linear(x, blocks)
        finally:
            torch.set_num_threads(threads)

    def _attend_each(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, caches: list) -> torch.Tensor:
        """Row ``i`` (a one-token step) attends to its own session's cache ``caches[i]``, as it would
        alone: no padding to copy, no mask, and the row's attention is bit-identical to its lone step."""
        rows = []
        rows_in = zip(query.split(1), key.split(1), value.split(1), caches, strict=True)
        for row_query, row_key, row_value, row_cache in rows_in:
            row_key, row_value = row_cache.update(row_key, row_value, self.layer_idx)
            rows.append(self._sdpa(row_query, row_key, row_value, None))
        return torch.cat(rows)

    def _sdpa(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """transformers' ``sdpa_attention_forward`` in eval mode, without its checks (nor its Ascend NPU
        branch), up to its final transpose: [batch, heads, q_len, head_dim]."""
        q_len = query.shape[2]
        gqa = {}
        if self.groups > 1:
            if use_gqa_in_sdpa(mask, key, value):
                gqa["enable_gqa"] = True
            elif q_len == 1:
                query, mask = pack_gqa(query, self.groups), pack_gqa(mask, self.groups)
            else:
                key, value = repeat_kv(key, self.groups), repeat_kv(value, self.groups)
        is_causal = q_len > 1 and mask is None and self.is_causal
        if is_causal and key.shape[2] > q_len:
            key, value = key[:, :, :q_len, :], value[:, :, :q_len, :]
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=0.0, scale=self.scaling, is_causal=is_causal, **gqa
        )
        return out.reshape(out.shape[0], -1, q_len, value.shape[-1])


def lean_llama_layer(layer: nn.Module, one_row_threads: int = 1) -> LeanLlamaLayer | None:
    """A :class:`LeanLlamaLayer` of ``layer`` if it computes exactly what a stock ``LlamaDecoderLayer`` in
    eval mode with SDPA attention computes, else None.

    The caller must also feed it transformers' own masks: the base adapter's ``prepare`` gives them, a
    family's own ``prepare`` (sliding windows, alibi) may not.
    """
    reason = _ineligible(layer)
    if reason is not None:
        logger.debug("layer %s keeps the module path: %s", type(layer).__name__, reason)
        return None
    return LeanLlamaLayer(layer, one_row_threads)


def _ineligible(layer: nn.Module) -> str | None:
    """Why ``layer`` cannot run lean, or None."""
    if not isinstance(layer, LlamaDecoderLayer) or type(layer).forward is not LlamaDecoderLayer.forward:
        return "not a LlamaDecoderLayer"
    modules = dict(layer.named_modules())
    submodules = {
        "self_attn": LlamaAttention.forward,
        "mlp": LlamaMLP.forward,
        "input_layernorm": LlamaRMSNorm.forward,
        "post_attention_layernorm": LlamaRMSNorm.forward,
    }
    for name, forward in submodules.items():
        module = modules.get(name)
        if getattr(type(module), "forward", None) is not forward:
            return f"{name} is {type(module).__name__}"
    for name in _LINEARS:
        if type(modules.get(name)) is not nn.Linear or modules[name].bias is not None:
            return f"{name} is not an nn.Linear without bias"
    if type(layer.mlp.act_fn) is not _SILU:
        return f"activation {type(layer.mlp.act_fn).__name__}"
    if layer.self_attn.config._attn_implementation != "sdpa":
        return f"attention implementation {layer.self_attn.config._attn_implementation!r}"
    if is_torch_npu_available():
        return "transformers converts attention masks on Ascend NPUs"
    if any(module.training for module in modules.values()):
        return "in training mode"
    hooked = [name or "layer" for name, module in modules.items() if module._forward_hooks or module._forward_pre_hooks]
    if hooked:
        return f"forward hooks on {', '.join(hooked)}"
    return None
