"""FarNode: load a span of layers, serve them over hivemind P2P, announce them in the DHT."""

import gc
import logging
import os
import random
import signal
import threading
import time
from typing import Any

import torch
from tqdm import tqdm

import farmesh_core
from farmesh_core import __version__, openmp
from farmesh_core.architecture import adapter_for, checkpoint_dtype
from farmesh_core.checkpoint import Checkpoint
from farmesh_core.config import NodeConfig, NodeRecord, parse_layers
from farmesh_core.dht import declare_node, fetch_node_records, start_dht
from farmesh_core.errors import ConfigError
from farmesh_core.event_loop import BackgroundLoop
from farmesh_core.home_cpu import claim_home_cpu
from farmesh_core.malloc import keep_freed_memory
from farmesh_core.node.handlers import NodeHandlers
from farmesh_core.node.layer_span import LayerSpan
from farmesh_core.node.placement import SpanSwitch, choose_layers, estimate_throughput, rebalance_target
from farmesh_core.node.push import PushLinks
from farmesh_core.node.token_loop import NodeHead
from farmesh_core.openmp import release_worker_threads
from farmesh_core.plugins import (
    get_auth_providers,
    get_payment_ledgers,
    get_quantizers,
    load_plugins,
    pick,
)

logger = logging.getLogger(__name__)

# Embeddings and an LM head up to this size are kept by default (serve_head=None) even where they take
# more memory than the node's layers: a token loop through 2 nodes of a 32k-vocabulary tiny Llama
# (64 MB against 10 MB of layers) took 3.80 against 4.27 ms a token for the client choosing (8 of 10).
HEAD_BYTES_KEPT = 256 * 1024**2

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
        self._rebalancer: threading.Thread | None = None  # placement: see rebalance()
        self._record_lock = threading.Lock()
        self.start_layer = self.end_layer = self.total_layers = 0

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "FarNode":
        """Load the layers, join the DHT, register the RPC handlers and announce; returns at once."""
        config = self.config
        self._stop.clear()
        if not farmesh_core.OPENMP_SPIN_SET and config.device == "cpu":
            logger.warning(
                "torch was imported before farmesh, so its OpenMP threads spin ~3 ms after each step and take "
                "cores from other nodes on this machine: import farmesh first or set GOMP_SPINCOUNT=5000"
            )
        if config.keep_freed_memory:
            keep_freed_memory()
        openmp.spreading = config.spread_threads and config.device == "cpu"
        if openmp.spreads(2) and openmp.home_cpu is None:
            openmp.home_cpu = claim_home_cpu(sorted(os.sched_getaffinity(0)))
        load_plugins()
        checkpoint = Checkpoint(config.model_id)
        adapter = adapter_for(checkpoint.config)
        total = adapter.num_layers(checkpoint.config)
        self.prefix = config.dht_prefix or checkpoint.dht_prefix
        quantizer = pick("quantizer", get_quantizers(), config.quantization)
        auth = pick("auth provider", get_auth_providers(), config.auth)(config)
        ledger = pick("payment ledger", get_payment_ledgers(), config.ledger)(config)

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
        # One-token steps split their matmuls over the node's threads (bit-identical): see row_matmul.row_blocks.
        self._threads = config.num_threads or torch.get_num_threads()
        self._span_args = (checkpoint, adapter, dtype, prepare)  # also to load other layers when it moves
        # A progress bar on a terminal (disable=None: none when stderr is a file or a pipe).
        with tqdm(total=self.end_layer - self.start_layer, desc="Loading layers", unit="layer", disable=None) as bar:
            self.span, self.throughput = self._load_span(
                self.start_layer, self.end_layer, progress=lambda done, n: bar.update(done - bar.n)
            )
        if config.adapters and not self.span.switchable:
            raise ConfigError("adapters need a plugin that loads them into the layers: pip install farmesh-lora")
        self.total_layers = total
        self.handlers = NodeHandlers(config, SpanSwitch(self.span) if self.may_move else self.span, auth, ledger)
        self._loop = BackgroundLoop("farmesh-node")
        self._p2p = self._loop.run(self.dht.replicate_p2p())
        self.peer_id = str(self.dht.peer_id)
        self.handlers.peer_id = self.peer_id
        self.handlers.pushes = PushLinks(self.dht, self.prefix, self._p2p, self.peer_id, self.handlers.push_inboxes)
        self.handlers.head = self._load_head(self.span)
        self._loop.run(self.handlers.register(self._p2p))
        self._announce("online")
        self._announcer = threading.Thread(target=self._announce_periodically, name="farmesh-announce", daemon=True)
        self._announcer.start()
        if self.may_move:
            self._rebalancer = threading.Thread(
                target=self._rebalance_periodically, name="farmesh-rebalance", daemon=True
            )
            self._rebalancer.start()
        # What is loaded by now (modules, layers) lives as long as the node: out of the collector's sight,
        # a full collection no longer walks its ~400k objects (0.24 s) in the middle of a step.
        gc.freeze()
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
        if self._rebalancer is not None:
            self._rebalancer.join(timeout=5)
            self._rebalancer = None
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
            if hasattr(self.handlers.ledger, "close"):  # flush what the ledger still holds
                self.handlers.ledger.close()
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
        """Where others can reach this node (loopback addresses only when the mesh is on loopback)."""
        if self.dht is None:
            return []
        return self.config.reachable_maddrs([str(a) for a in self.dht.get_visible_maddrs()])

    def _pick_layers(self, total: int) -> tuple[int, int]:
        if self.config.layers is not None:
            start, end = parse_layers(self.config.layers)
            if end > total:
                raise ConfigError(f"layers {self.config.layers}: the model has only {total} layers")
            return start, end
        if self.config.num_layers is None:
            return 0, total
        # Nodes still loading count too, so that nodes starting together spread out (like Petals).
        records = [r for r in fetch_node_records(self.dht, self.prefix, online_only=False) if r.state != "offline"]
        throughput = estimate_throughput(records, self.config.num_layers)
        start, end = choose_layers(records, total, self.config.num_layers, throughput)
        joining = NodeRecord(
            peer_id=str(self.dht.peer_id), start=start, end=end, throughput=throughput, cache_tokens_left=0,
            state="joining", addrs=self.multiaddrs,
        )  # fmt: skip
        declare_node(self.dht, self.prefix, joining, self.config.record_ttl)
        return start, end

    def record(self, state: str = "online") -> NodeRecord:
        head = self.handlers.head
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
            adapters=self.config.adapter_names,
            addrs=self.multiaddrs,
            direct_lane=self.handlers.direct_lane is not None,
            head_dtype=str(head.dtype).removeprefix("torch.") if head and self.end_layer == head.num_layers else "",
        )

    def _announce(self, state: str, ttl: float | None = None) -> None:
        with self._record_lock:  # a move changes start, end and throughput together
            record = self.record(state)
            self.handlers.record_json = record.model_dump_json().encode()
            declare_node(self.dht, self.prefix, record, ttl or self.config.record_ttl)

    def _announce_periodically(self) -> None:
        while not self._stop.wait(self.config.announce_period):
            try:
                self._announce("online")
            except Exception:
                logger.warning("Could not refresh the node record", exc_info=True)

    # ---- placement -----------------------------------------------------------------------------
    @property
    def may_move(self) -> bool:
        """Whether this node rebalances: it picked its layers itself (``num_layers``) and
        ``rebalance_period`` is not 0. Nodes given ``layers`` stay where they were put."""
        config = self.config
        return (
            config.layers is None
            and config.num_layers is not None
            and config.num_layers < self.total_layers
            and config.rebalance_period > 0
        )

    def _rebalance_periodically(self) -> None:
        # Jittered (like Petals) so that nodes checking the same mesh rarely move at the same moment.
        while not self._stop.wait(self.config.rebalance_period * random.uniform(0.5, 1.5)):
            try:
                self.rebalance()
            except Exception:
                logger.warning("Could not rebalance", exc_info=True)

    def rebalance(self) -> bool:
        """Check the mesh once and move if :func:`~farmesh_core.node.placement.rebalance_target`
        says the mesh gains clearly; returns whether the node moved."""
        records = [r for r in fetch_node_records(self.dht, self.prefix, online_only=False) if r.state != "offline"]
        target = rebalance_target(records, self.peer_id, self.total_layers, self.throughput, self.config.rebalance_gain)
        if target is None or self._stop.is_set():
            return False
        self.move_to(*target)
        return True

    def _load_head(self, span: LayerSpan) -> NodeHead | None:
        """The model's embeddings and LM head, in the checkpoint's dtype as clients load them, where
        ``span`` (the node's layers) ends at the last layer and ``serve_head`` allows (see token_loop.py)."""
        checkpoint, adapter, _, _ = self._span_args
        wanted, total = self.config.serve_head, self.total_layers
        if wanted is False or span.end != total or not self.config.direct_lane:
            return None
        head = adapter.load_client_head(checkpoint, checkpoint.config, checkpoint_dtype(checkpoint.config))
        tensors = {t.data_ptr(): t for t in head.state_dict().values()}  # tied embeddings count once
        size = sum(t.nbytes for t in tensors.values())
        if wanted is None and size > max(span.layer_bytes * (span.end - span.start), HEAD_BYTES_KEPT):
            logger.info("Not keeping the LM head: it is larger than the layers (serve_head=True keeps it)")
            return None
        return NodeHead(head, total)

    def _load_span(self, start: int, end: int, progress=None) -> tuple[LayerSpan, float]:
        """Layers ``start:end`` and their one-token steps per second; the calling thread's OpenMP
        threads end after (see openmp.py)."""
        checkpoint, adapter, dtype, prepare = self._span_args
        try:
            span = LayerSpan(
                checkpoint, adapter, start, end, dtype, self.config.device, prepare, progress,
                lean_layers=self.config.lean_layers, one_row_threads=self._threads,
                pack_batch_weights=self.config.pack_batch_weights, exact_batches=self.config.exact_batches,
            )  # fmt: skip
            return span, span.measure_throughput()
        finally:
            release_worker_threads()

    def move_to(self, start: int, end: int) -> None:
        """Serve layers ``start:end`` instead, without dropping sessions: load them, switch new
        requests to them and announce, keep the old layers for the sessions that started on them
        until those finish (or ``drain_timeout``), then release the old layers."""
        switch = self.handlers.span
        if not isinstance(switch, SpanSwitch):
            raise ConfigError("only a node started with num_layers and a rebalance_period can move")
        old_start, old_end = self.start_layer, self.end_layer
        logger.info("Moving from layers %d:%d to %d:%d", old_start, old_end, start, end)
        span, throughput = self._load_span(start, end)
        head = self.handlers.head or self._load_head(span)  # (kept for the old layers' sessions)
        if self._stop.is_set():
            return
        with self._record_lock:
            self._loop.run(_call(switch.switch_to, span), timeout=30)
            self.span, self.start_layer, self.end_layer, self.throughput = span, start, end, throughput
            self.handlers.head = head
        self._announce("online")
        logger.info("Far Node %s serves layers %d:%d (%.0f tok/s)", self.peer_id, start, end, throughput)

        deadline = time.monotonic() + self.config.drain_timeout
        self._stop.wait(min(1.0, self.config.drain_timeout))  # steps already accepted for the old layers
        while time.monotonic() < deadline and not self._stop.is_set():
            if self._loop.run(_call(lambda: switch.drained(self.handlers.active_sessions)), timeout=30):
                break
            self._stop.wait(0.2)
        if self._stop.is_set():
            return
        self._loop.run(_call(switch.release_old), timeout=30)
        if self.end_layer != self.total_layers:
            self.handlers.head = None  # no session ends at the last layer any more
        logger.info("Released layers %d:%d", old_start, old_end)


async def _call(fn, *args):
    """Run ``fn`` on the node's event loop thread, where sessions open and close."""
    return fn(*args)
