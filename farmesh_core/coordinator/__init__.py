"""The Far Mesh Coordinator: an OpenAI-compatible HTTP API over the Far Mesh Network."""

from farmesh_core.coordinator.app import create_app
from farmesh_core.coordinator.engine import MeshEngine
from farmesh_core.coordinator.server import serve

__all__ = ["MeshEngine", "create_app", "serve"]
