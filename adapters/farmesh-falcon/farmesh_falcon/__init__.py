"""FarMesh adapter for Falcon: the new decoder architecture, multi-query Falcon, and alibi Falcon.

Falcon layers take the cache as ``layer_past``, an ``alibi`` argument (``None`` selects rotary
embeddings) and return a tuple. Weight names follow Bloom's (``transformer.h.N``).
"""

import math

import torch
from torch import nn
from torch.nn import LayerNorm
from transformers.models.falcon.modeling_falcon import (
    FalconDecoderLayer,
    FalconLinear,
    FalconRotaryEmbedding,
    build_alibi_tensor,
)

from farmesh_core.architecture import ArchitectureAdapter, causal_mask, decode_batch_keys
from farmesh_core.hookspecs import hookimpl


class FalconAdapter(ArchitectureAdapter):
    model_type = "falcon"
    layer_class = FalconDecoderLayer
    rotary_class = FalconRotaryEmbedding
    final_norm_class = LayerNorm
    norm_eps_name = "layer_norm_epsilon"
    layer_prefix = "transformer.h.{index}."
    embeddings_name = "transformer.word_embeddings.weight"
    final_norm_prefix = "transformer.ln_f."
    cache_argument = "layer_past"
    linear_classes = (nn.Linear, FalconLinear)

    def kv_heads(self, config):
        # The new architecture caches its keys already broadcast to every query head.
        return 1 if config.multi_query and not config.new_decoder_architecture else config.num_attention_heads

    def build_span_context(self, config, device):
        # Alibi Falcon needs only the head count per step; rotary Falcon its cos/sin module.
        return config.num_attention_heads if config.alibi else super().build_span_context(config, device)

    def prepare(self, context, hidden, position):
        if not isinstance(context, int):
            return {"alibi": None, **super().prepare(context, hidden, position)}
        # As FalconModel does for SDPA: alibi, scaled like the scores, goes into an always-present mask.
        batch, q_len, _ = hidden.shape
        ones = torch.ones(batch, position + q_len, device=hidden.device)
        hidden_keys = causal_mask(q_len, position, hidden.dtype, hidden.device) < -1
        return self._alibi_kwargs(build_alibi_tensor(ones, context, hidden.dtype), context, hidden, hidden_keys)

    def prepare_decode_batch(self, context, hidden, positions):
        if not isinstance(context, int):
            return {"alibi": None, **self.rotary_decode_batch(context, hidden, positions)}
        seen = decode_batch_keys(positions, hidden.device)
        alibi = build_alibi_tensor(seen.to(hidden.dtype), context, hidden.dtype)  # padding shifts no row's alibi
        return self._alibi_kwargs(alibi, context, hidden, ~seen[:, None, None, :])

    @staticmethod
    def _alibi_kwargs(alibi, num_heads, hidden, hidden_keys):
        """The alibi and the mask that carries it, scaled like the scores, with ``hidden_keys`` masked out."""
        scaled = alibi.view(hidden.shape[0], num_heads, 1, -1) / math.sqrt(hidden.shape[2] // num_heads)
        return {"alibi": alibi, "attention_mask": scaled.masked_fill(hidden_keys, torch.finfo(hidden.dtype).min)}


@hookimpl
def farmesh_register_architectures(register):
    register(FalconAdapter())
