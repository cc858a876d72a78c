"""The serving side: a Far Node and its parts."""

from farmesh_core.node.far_node import FarNode

__all__ = ["FarNode"]
