"""Built-in quantizers."""

from torch import nn

from farmesh_core.hookspecs import hookimpl


def no_quantization(layer: nn.Module, config) -> nn.Module:
    """Serve the layer in the dtype it was loaded in."""
    return layer


@hookimpl
def farmesh_register_quantizers(register):
    register("none", no_quantization)
