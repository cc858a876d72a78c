"""Error types raised to FarMesh users; each message says what to do next."""


class FarMeshError(Exception):
    """Base class of every error FarMesh raises on purpose."""


class ConfigError(FarMeshError, ValueError):
    """A configuration value is invalid (the message names the field)."""


class ModelNotFoundError(FarMeshError):
    """`model_id` is neither a local checkpoint directory nor a model in the local Hugging Face cache."""


class UnsupportedArchitectureError(FarMeshError):
    """No installed adapter serves this `model_type`."""


class PluginNotFoundError(FarMeshError):
    """A plugin was requested by a name no installed plugin registered."""


class NoRouteError(FarMeshError):
    """No chain of Far Nodes covers the requested layers."""

    @classmethod
    def for_layers(cls, start: int, end: int, records) -> "NoRouteError":
        """Build the error for ``start:end``, naming the layers that no node (in ``records``) serves."""
        missing = [i for i in range(start, end) if not any(r.start <= i < r.end for r in records)]
        if not missing:
            layers = f"Layer {start} is" if end - start == 1 else f"Layers {start}-{end - 1} are"
            return cls(f"{layers} served, but every node that serves them failed or is excluded")
        spans, first = [], missing[0]
        for prev, cur in zip(missing, missing[1:] + [None], strict=True):
            if cur != prev + 1:
                spans.append((first, prev))
                first = cur
        text = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans)
        a, b = spans[0]
        return cls(
            f"Layers {text} have no node in the Far Mesh Network; start one with "
            f"`farmesh node MODEL --dht-bootstrap ADDR --layers {a}:{b + 1}`"
        )


class RequestError(FarMeshError, ValueError):
    """A Far Node refused a request (bad shape, dtype, layer range, length...); the node keeps serving."""


class RemoteError(FarMeshError):
    """A Far Node failed or disappeared while serving a request."""


class ForkedClientError(FarMeshError, RuntimeError):
    """A client was used in a process forked from the one that made it."""
