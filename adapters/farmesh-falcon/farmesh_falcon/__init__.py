"""FarMesh adapter for Falcon: the new decoder architecture, multi-query Falcon, and alibi Falcon.

Falcon layers take the cache as ``layer_past``, an ``alibi`` argument (``None`` selects rotary
embeddings) and return a tuple. Weight names follow Bloom's (``transformer.h.N``).
"""

import math

import torch
from torch.nn import LayerNorm
from transformers.models.falcon.modeling_falcon import FalconDecoderLayer, FalconRotaryEmbedding, build_alibi_tensor

from farmesh_core.architecture import ArchitectureAdapter, causal_mask
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
        batch, q_len, width = hidden.shape
        ones = torch.ones(batch, position + q_len, device=hidden.device)
        alibi = build_alibi_tensor(ones, context, hidden.dtype)
        causal = causal_mask(q_len, position, hidden.dtype, hidden.device)
        scaled = alibi.view(batch, context, 1, -1) / math.sqrt(width // context)
        return {"alibi": alibi, "attention_mask": scaled.masked_fill(causal < -1, torch.finfo(hidden.dtype).min)}


@hookimpl
def farmesh_register_architectures(register):
    register(FalconAdapter())
