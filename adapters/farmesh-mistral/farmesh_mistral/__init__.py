"""FarMesh adapters for Mistral and Mixtral: Llama's conventions plus sliding-window attention.

Mixtral's checkpoints keep one ``w1``/``w2``/``w3`` per expert under ``block_sparse_moe``, while its
layer holds the experts fused (``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``).
"""

import torch
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer, MistralRMSNorm, MistralRotaryEmbedding
from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer, MixtralRMSNorm, MixtralRotaryEmbedding

from farmesh_core.architecture import ArchitectureAdapter, causal_mask
from farmesh_core.hookspecs import hookimpl


class MistralAdapter(ArchitectureAdapter):
    model_type = "mistral"
    layer_class = MistralDecoderLayer
    rotary_class = MistralRotaryEmbedding
    final_norm_class = MistralRMSNorm

    def prepare(self, context, hidden, position):
        kwargs = super().prepare(context, hidden, position)
        # SDPA ignores the window: past it, every step needs the banded mask transformers builds.
        window, q_len = context.config.sliding_window, hidden.shape[1]
        if window is not None and position + q_len > window:
            kwargs["attention_mask"] = causal_mask(q_len, position, hidden.dtype, hidden.device, window)
        return kwargs

    def prepare_decode_batch(self, context, hidden, positions):
        return self.rotary_decode_batch(context, hidden, positions, window=context.config.sliding_window)


class MixtralAdapter(MistralAdapter):
    model_type = "mixtral"
    layer_class = MixtralDecoderLayer
    rotary_class = MixtralRotaryEmbedding
    final_norm_class = MixtralRMSNorm

    def prepare_config(self, config):
        config._experts_implementation = "eager"  # the reference loop over experts (it needs no model)
        return super().prepare_config(config)

    def convert_layer_state(self, state, config):
        state = {name.replace("block_sparse_moe.", "mlp."): tensor for name, tensor in state.items()}
        if "mlp.experts.down_proj" in state:  # already fused
            return state
        # As transformers' loader does: stack each weight over experts; w1 (gate) and w3 (up) side by side.
        w1, w2, w3 = (
            torch.stack([state.pop(f"mlp.experts.{e}.{w}.weight") for e in range(config.num_local_experts)])
            for w in ("w1", "w2", "w3")
        )
        state["mlp.experts.gate_up_proj"] = torch.cat([w1, w3], dim=1)
        state["mlp.experts.down_proj"] = w2
        return state


@hookimpl
def farmesh_register_architectures(register):
    register(MistralAdapter())
    register(MixtralAdapter())
