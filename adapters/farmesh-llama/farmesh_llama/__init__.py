"""FarMesh adapter for Llama: rotary embeddings computed once per step outside the layers."""

from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from farmesh_core.architecture import ArchitectureAdapter
from farmesh_core.hookspecs import hookimpl


class LlamaAdapter(ArchitectureAdapter):
    model_type = "llama"
    layer_class = LlamaDecoderLayer
    rotary_class = LlamaRotaryEmbedding
    final_norm_class = LlamaRMSNorm


@hookimpl
def farmesh_register_architectures(register):
    register(LlamaAdapter())
