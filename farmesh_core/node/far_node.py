"""FarNode: load a span of layers, serve them over hivemind P2P, announce them in the DHT."""

import logging
import signal
import threading
from typing import Any

import torch

from farmesh_core import __version__
from farmesh_core.architecture import adapter_for
from farmesh_core.checkpoint import Checkpoint
from farmesh_core.config import NodeConfig, NodeRecord, parse_layers
from farmesh_core.dht import declare_node, fetch_node_records, start_dht
from farmesh_core.errors import ConfigError
from farmesh_core.event_loop import BackgroundLoop
from farmesh_core.node.handlers import NodeHandlers
from farmesh_core.node.layer_span import LayerSpan
from farmesh_core.node.placement import choose_layers
from farmesh_core.plugins import (
    get_auth_providers,
    get_payment_ledgers,
    get_quantizers,
    load_plugins,
    pick,
)

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class FarNode:
    """A Far Node: serves a contiguous range of a model's layers to the Far Mesh Network.

    ``FarNode(model_id, dht_bootstrap, layers="0:4")``; ``run()`` blocks until SIGINT/SIGTERM,
    ``start()``/``shutdown()`` serve in the background of the calling process.
    """

    def __init__(self, model_id: str, dht_bootstrap: str | list[str] | None = None, **options: Any):
        self.config = NodeConfig(model_id=model_id, dht_bootstrap=dht_bootstrap or [], **options)
        self.dht = None
        self.handlers: NodeHandlers | None = None
        self.span: LayerSpan | None = None
        self._loop: BackgroundLoop | None = None
        self._p2p = None
        self._stop = threading.Event()
        self._announcer: threading.Thread | None = None
        self.start_layer = self.end_layer = 0

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "FarNode":
        """Load the layers, join the DHT, register the RPC handlers and announce; returns at once."""
        config = self.config
        self._stop.clear()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        load_plugins()
        checkpoint = Checkpoint(config.model_id)
        adapter = adapter_for(checkpoint.config)
        total = adapter.num_layers(checkpoint.config)
        self.prefix = config.dht_prefix or checkpoint.dht_prefix
        quantizer = pick("quantizer", get_quantizers(), config.quantization)
        auth = pick("auth provider", get_auth_providers(), config.auth)
        ledger = pick("payment ledger", get_payment_ledgers(), config.ledger)

        self.dht = start_dht(config)
        self.start_layer, self.end_layer = self._pick_layers(total)
        logger.info("Loading layers %d:%d of %s", self.start_layer, self.end_layer, checkpoint.path)
        hook = load_plugins().hook

        def prepare(layer, index):
            hook.farmesh_prepare_layer(layer=layer, index=index, config=config)
            return quantizer(layer, config)

        dtype = DTYPES.get(config.dtype) or checkpoint.config.dtype or torch.float32
        if isinstance(dtype, str):
            dtype = DTYPES[dtype]
        self.span = LayerSpan(
            checkpoint, adapter, self.start_layer, self.end_layer, dtype, config.device, prepare,
            progress=lambda done, n: logger.debug("Loaded %d/%d layers", done, n),
        )  # fmt: skip
        self.throughput = self.span.measure_throughput()
        self.handlers = NodeHandlers(config, self.span, auth, ledger)
        self._loop = BackgroundLoop("farmesh-node")
        self._p2p = self._loop.run(self.dht.replicate_p2p())
        self.peer_id = str(self.dht.peer_id)
        self.handlers.peer_id = self.peer_id
        self._loop.run(self.handlers.register(self._p2p))
        self._announce("online")
        self._announcer = threading.Thread(target=self._announce_periodically, name="farmesh-announce", daemon=True)
        self._announcer.start()
        logger.info(
            "Far Node %s serves layers %d:%d of %s (%.0f tok/s) at %s",
            self.peer_id, self.start_layer, self.end_layer, self.prefix, self.throughput,
            " ".join(self.multiaddrs),
        )  # fmt: skip
        return self

    def run(self) -> None:
        """Serve until SIGINT or SIGTERM, then withdraw from the DHT and stop cleanly."""
        previous = {}
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            previous = {sig: signal.signal(sig, lambda *_: self._stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            self._stop.wait()
        finally:
            self.shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def shutdown(self) -> None:
        """Withdraw the record, stop serving, stop the DHT. Safe to call twice."""
        self._stop.set()
        if self._announcer is not None:
            self._announcer.join(timeout=5)
            self._announcer = None
        if self.dht is not None:
            if self.handlers is not None:
                try:
                    self._announce("offline", ttl=self.config.announce_period)
                except Exception:
                    logger.warning("Could not withdraw the node record", exc_info=True)
            if self._loop is not None and self._p2p is not None:
                try:
                    self._loop.run(self.handlers.unregister(self._p2p), timeout=5)
                except Exception:
                    logger.debug("Could not remove handlers", exc_info=True)
            self.dht.shutdown()
            self.dht = None
        if self.handlers is not None:
            self.handlers.close()
        if self._loop is not None:
            self._loop.stop()
            self._loop = None
        logger.info("Far Node stopped")

    def __enter__(self) -> "FarNode":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- DHT ---------------------------------------------------------------------------------
    @property
    def multiaddrs(self) -> list[str]:
        return [str(a) for a in self.dht.get_visible_maddrs()] if self.dht is not None else []

    def _pick_layers(self, total: int) -> tuple[int, int]:
        if self.config.layers is not None:
            start, end = parse_layers(self.config.layers)
            if end > total:
                raise ConfigError(f"layers {self.config.layers}: the model has only {total} layers")
            return start, end
        if self.config.num_layers is None:
            return 0, total
        return choose_layers(fetch_node_records(self.dht, self.prefix), total, self.config.num_layers)

    def record(self, state: str = "online") -> NodeRecord:
        return NodeRecord(
            peer_id=self.peer_id,
            start=self.start_layer,
            end=self.end_layer,
            throughput=self.throughput,
            cache_tokens_left=self.handlers.cache_tokens_left(),
            load=self.handlers.active_sessions,
            state=state,
            version=__version__,
            model_type=self.span.config.model_type,
            dtype=str(self.span.dtype).removeprefix("torch."),
            quantization=self.config.quantization,
            adapters=self.config.adapters,
            addrs=self.multiaddrs,
        )

    def _announce(self, state: str, ttl: float | None = None) -> None:
        record = self.record(state)
        self.handlers.record_json = record.model_dump_json().encode()
        declare_node(self.dht, self.prefix, record, ttl or self.config.record_ttl)

    def _announce_periodically(self) -> None:
        while not self._stop.wait(self.config.announce_period):
            try:
                self._announce("online")
            except Exception:
                logger.warning("Could not refresh the node record", exc_info=True)
