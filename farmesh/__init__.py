"""FarMesh: run large language models across many machines.

Far Nodes serve ranges of a model's layers; clients generate through a chain of them.
"""

from farmesh_core import __version__
from farmesh_core.client import DistributedInferenceClient, DistributedModel, DistributedModelForCausalLM
from farmesh_core.config import ClientConfig, NodeConfig, NodeRecord
from farmesh_core.node import FarNode

__all__ = [
    "ClientConfig",
    "DistributedInferenceClient",
    "DistributedModel",
    "DistributedModelForCausalLM",
    "FarNode",
    "NodeConfig",
    "NodeRecord",
    "__version__",
]
