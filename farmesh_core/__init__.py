"""FarMesh core: the node, the client and the plugin machinery they share."""

__version__ = "0.1.0"
