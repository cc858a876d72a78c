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
from collections.abc import Callable
from functools import partial
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
    rotate_half,
)
from transformers.utils import is_torch_npu_available

from farmesh_core.module_hooks import has_forward_hooks
from farmesh_core.row_matmul import (
    StackedLinear,
    exact_rows_linear,
    few_rows_limit,
    few_rows_linear,
    in_decode_batch_rows,
    own_copies,
    packed_copy,
    packed_linear,
    row_blocks,
    split_linear,
    splits_lone_rows,
    stacked_linear,
)

logger = logging.getLogger(__name__)

_SILU = type(ACT2FN["silu"])
# transformers' own rotary function (not one that a kernel hub put in its place): _rotated_stack does its ops
_PLAIN_ROTARY = apply_rotary_pos_emb.__module__ == LlamaAttention.__module__ and not hasattr(
    apply_rotary_pos_emb, "__wrapped__"
)
_LINEARS = (
    *(f"self_attn.{name}_proj" for name in "qkvo"),
    *(f"mlp.{name}_proj" for name in ("gate", "up", "down")),
)


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
    (see ``row_matmul.row_blocks``) and the rest on the caller's: attention stays on one thread where
    that is the caller's count, because SDPA's sums depend on the threads. A decode batch's matmuls
    use packed copies of the weights once :meth:`pack_for_batches` made them, and so do a lone row's
    that do not split where that keeps their bits (16-bit weights).
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
        self.few_rows = few_rows_limit(self.q.shape[1])  # unpacked batches up to this size use few_rows_linear
        self.weights = (self.q, self.k, self.v, self.o, self.gate, self.up, self.down)
        self.threads = one_row_threads
        # a lone one-token step's q, k, v and its gate, up as one matmul each, where that keeps their bits
        self.qkv = stacked_linear((self.q, self.k, self.v), one_row_threads)
        self.gate_up = stacked_linear((self.gate, self.up), one_row_threads)
        self.unstacked = unstacked = [self.o, self.down]
        unstacked += [self.q, self.k, self.v] if self.qkv is None else []
        unstacked += [self.gate, self.up] if self.gate_up is None else []
        if len(unstacked) < len(self.weights):
            own_copies([*unstacked, self.norm1, self.norm2])
        blocks = {id(weight): row_blocks(weight, one_row_threads) for weight in unstacked}
        self.row_blocks = {key: value for key, value in blocks.items() if value is not None}
        self.packed: dict[int, torch.Tensor] = {}  # id(weight) -> its copy for decode batches (o, down, unstacked)
        self.lone_packed: dict[int, torch.Tensor] = {}  # those of them a lone row goes through too
        self.exact_batches = False  # see __call__ (``LayerSpan`` decides)

    def pack_for_batches(self) -> int:
        """Keep a packed copy of every weight for decode batches (``row_matmul.packed_weight``), of q, k, v
        and gate, up as their stacks where they have them; returns their bytes. A weight oneDNN cannot
        take keeps the unpacked path. Lone rows use the copies too where that keeps their bits
        (``row_matmul.packed_copy``)."""
        total = sum(stack.pack_for_batches() for stack in (self.qkv, self.gate_up) if stack is not None)
        for weight in self.unstacked:
            packed, lone = packed_copy(weight, partial(F.linear, weight=weight), self.threads)
            if packed is None:
                continue
            self.packed[id(weight)] = packed
            total += weight.nbytes
            if lone:
                self.lone_packed[id(weight)] = packed
        return total

    def __call__(self, hidden: torch.Tensor, cache: Any, kwargs: dict[str, Any]) -> torch.Tensor:
        batched = hasattr(cache, "caches")  # a BatchedDecodeCache: one-token steps of several sessions
        # Separate sessions' rows (a shared session's too, with ``LayerSpan.exact_rows``) keep their
        # lone bits with ``exact_batches``: each matmul a batched GEMV, the SiLU row by row
        exact = batched and self.exact_batches
        lone = split = packed_rows = False  # a lone one-token row (whose matmuls may split); a batch's rows
        if exact:
            linear = exact_rows_linear
        elif batched or in_decode_batch_rows():  # (or one session's rows: ``LayerSpan.forward`` says so)
            linear, packed_rows = self._batch_linear, True
        else:
            lone = hidden.numel() == hidden.shape[-1]
            split = lone and splits_lone_rows()
            if split and self.row_blocks:
                linear = self._split_linear
            else:
                linear = self._lone_linear if lone and self.lone_packed else F.linear
        # q, k, v and gate, up through their stacks: a lone row's (where the stack takes it), a batch's packed
        qkv, gate_up = (_stack_call(stack, lone, split, packed_rows) for stack in (self.qkv, self.gate_up))
        # LlamaAttention.forward
        x = _rms_norm(hidden, self.norm1, self.eps1)
        input_shape = x.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        if lone and qkv is not None and _PLAIN_ROTARY:
            query, key, value = self._rotated_stack(qkv, x, hidden_shape, kwargs["position_embeddings"])
        else:
            if qkv is not None:
                query, key, value = qkv(x).split(self.qkv.sizes, dim=-1)
            else:
                query, key, value = linear(x, self.q), linear(x, self.k), linear(x, self.v)
            query = query.view(hidden_shape).transpose(1, 2)
            key = key.view(hidden_shape).transpose(1, 2)
            value = value.view(hidden_shape).transpose(1, 2)
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
        if gate_up is not None:
            gate, up = gate_up(x).split(self.gate_up.sizes, dim=-1)
        else:
            gate, up = linear(x, self.gate), linear(x, self.up)
        act = _each_row(F.silu, gate) if exact else F.silu(gate)
        return hidden + linear(act * up, self.down)

    def _rotated_stack(
        self,
        qkv: Callable[[torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        hidden_shape: tuple,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A lone row's rotated query and key and its value, through the stacked q, k, v (``qkv``): the
        query's and key's heads rotated together, by ``apply_rotary_pos_emb``'s elementwise ops run once
        over both (each element gets the same ops, so the same bits), which halves their calls."""
        q_size, k_size, _ = self.qkv.sizes
        out = qkv(x)
        both = out[..., : q_size + k_size].view(hidden_shape).transpose(1, 2)
        value = out[..., q_size + k_size :].view(hidden_shape).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)
        both = (both * cos) + (rotate_half(both) * sin)
        query, key = both.split([q_size // self.head_dim, k_size // self.head_dim], dim=1)
        return query, key, value

    def _batch_linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """A decode batch's matmul (unless exact, see ``__call__``): through the weight's packed copy
        where it has one."""
        packed = self.packed.get(id(weight))
        if packed is not None:
            return packed_linear(x, packed)
        return few_rows_linear(x, weight) if x.shape[0] <= self.few_rows else F.linear(x, weight)

    def _split_linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """A lone row's matmul split over threads, where its weight splits (float32)."""
        blocks = self.row_blocks.get(id(weight))
        return F.linear(x, weight) if blocks is None else split_linear(x, blocks)

    def _lone_linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """A lone row's matmul through its weight's packed copy, where that keeps its bits (16-bit)."""
        packed = self.lone_packed.get(id(weight))
        return F.linear(x, weight) if packed is None else packed_linear(x, packed)

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


def _stack_call(
    stack: StackedLinear | None, lone: bool, split: bool, packed_rows: bool
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The one call that gives a stack's weights' outputs side by side for these rows, where the stack
    takes them: a lone row's (``StackedLinear.lone_call``), or a decode batch's through its packed copy;
    else None (each weight then takes its own call)."""
    if stack is None:
        return None
    if lone:
        return stack.lone_call(split)
    return stack.batch if packed_rows and stack.packed is not None else None


def _each_row(fn, x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` row by row: a vectorized op's last elements of a row take a scalar path where the row
    is alone (688 values: 21 vectors of 32 and a tail), and the vector path inside a batch, which
    rounds exp differently (SiLU of 8 rows of 688: 0-3 values per row differed from the row alone)."""
    return torch.cat([fn(row) for row in x.split(1)])


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
    hooked = [name or "layer" for name, module in modules.items() if has_forward_hooks(module)]
    if hooked:
        return f"forward hooks on {', '.join(hooked)}"
    return None
