"""FarMesh adapter for Bloom: alibi instead of positions, eager attention, a norm on the embeddings.

Bloom blocks take the cache as ``layer_past`` and an ``alibi`` bias built from the step's key
length, and return a tuple; the client normalises the token embeddings
(``word_embeddings_layernorm``) before the first block.
"""

import torch
from torch.nn import LayerNorm
from transformers.models.bloom.modeling_bloom import BloomBlock, build_alibi_tensor

from farmesh_core.architecture import ArchitectureAdapter, decode_batch_keys, decode_batch_mask
from farmesh_core.hookspecs import hookimpl


class BloomAdapter(ArchitectureAdapter):
    model_type = "bloom"
    layer_class = BloomBlock
    final_norm_class = LayerNorm
    norm_eps_name = "layer_norm_epsilon"
    layer_prefix = "transformer.h.{index}."
    embeddings_name = "transformer.word_embeddings.weight"
    embeddings_norm_prefix = "transformer.word_embeddings_layernorm."
    final_norm_prefix = "transformer.ln_f."
    attn_implementation = "eager"
    cache_argument = "layer_past"

    def build_span_context(self, config, device):
        return config.n_head  # all alibi needs

    def prepare(self, num_heads, hidden, position):
        batch, q_len = hidden.shape[:2]
        ones = torch.ones(batch, position + q_len, device=hidden.device)
        alibi = build_alibi_tensor(ones, num_heads, hidden.dtype)
        return {"alibi": alibi, "attention_mask": super().prepare(None, hidden, position)["attention_mask"]}

    def prepare_decode_batch(self, num_heads, hidden, positions):
        # Alibi counts the keys a row sees (build_alibi_tensor's cumsum): a row's padding changes nothing.
        seen = decode_batch_keys(positions, hidden.device).to(hidden.dtype)
        alibi = build_alibi_tensor(seen, num_heads, hidden.dtype)
        return {"alibi": alibi, "attention_mask": decode_batch_mask(positions, hidden.dtype, hidden.device)}


@hookimpl
def farmesh_register_architectures(register):
    register(BloomAdapter())
