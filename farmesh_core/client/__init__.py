"""The side that drives generation: routing, sessions, remote layers and the public clients."""

from farmesh_core.client.causal_lm import DistributedModelForCausalLM
from farmesh_core.client.inference_client import DistributedInferenceClient
from farmesh_core.client.remote_layers import DistributedModel

__all__ = ["DistributedInferenceClient", "DistributedModel", "DistributedModelForCausalLM"]
