"""Run the Far Mesh Coordinator: one DistributedInferenceClient, the HTTP API, uvicorn."""

import logging
import signal
import threading

from farmesh_core.coordinator.app import create_app
from farmesh_core.coordinator.engine import MeshEngine

logger = logging.getLogger(__name__)


def serve(
    model_id: str,
    dht_bootstrap: list[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    max_concurrent: int = 16,
    log_level: str = "info",
    **client_options,
) -> None:
    """Join the mesh of ``model_id`` and serve the OpenAI API on ``host:port`` until SIGINT/SIGTERM."""
    import uvicorn

    from farmesh_core.client import DistributedInferenceClient

    client = DistributedInferenceClient(model_id, dht_bootstrap, **client_options)
    engine = MeshEngine(client, model_name)
    try:
        app = create_app(engine, max_concurrent=max_concurrent)
        logger.info(
            "Far Mesh Coordinator serves %s (%d layers) as model %r at http://%s:%d/v1 "
            "(OpenAI API; /health, /v1/mesh, /metrics)",
            model_id, client.num_layers, engine.model_name, host, port,
        )  # fmt: skip
        # uvicorn re-raises the SIGTERM it caught once it has stopped; with the default handler that
        # would kill the process before the client leaves the DHT and stops its helper processes.
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, lambda *_: None) if main_thread else None
        try:
            level = {"warn": "warning", "fatal": "critical"}.get(log_level.lower(), log_level.lower())
            uvicorn.run(app, host=host, port=port, log_level=level, timeout_graceful_shutdown=5)
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)
    finally:
        engine.close()
        logger.info("Far Mesh Coordinator stopped")
