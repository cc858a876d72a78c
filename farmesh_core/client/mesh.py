"""A client's connection to the Far Mesh Network: its DHT peer, P2P stubs and route finding."""

import asyncio
import logging
import os
import threading
import time
import weakref
from collections.abc import Coroutine
from concurrent.futures import Future
from functools import partial

import torch
from hivemind.p2p import P2PDaemonError, P2PHandlerError, PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import ControlFailure
from hivemind.proto import runtime_pb2

from farmesh_core.architecture import ArchitectureAdapter, adapter_for
from farmesh_core.checkpoint import Checkpoint
from farmesh_core.client.direct_lane import DirectConnection, DirectStub
from farmesh_core.config import ClientConfig, NodeRecord
from farmesh_core.dht import dial, direct_ticket, fetch_node_records, start_dht
from farmesh_core.errors import ForkedClientError, NoRouteError
from farmesh_core.event_loop import BackgroundLoop
from farmesh_core.extensions import RouteHop, RouteRequest
from farmesh_core.malloc import keep_freed_memory
from farmesh_core.plugins import get_auth_providers, get_routing_policies, load_plugins, pick
from farmesh_core.wire import DirectHello, DirectTicket, FarNodeRPC

logger = logging.getLogger(__name__)

# What a node that died, stalled or became unreachable looks like from the client.
NETWORK_ERRORS = (
    P2PHandlerError, P2PDaemonError, ControlFailure, TimeoutError, ConnectionError, OSError, StopAsyncIteration,
    asyncio.IncompleteReadError,
)  # fmt: skip

RECORDS_MAX_AGE = 5.0  # seconds a fetched view of the mesh is reused
LATENCY_MAX_AGE = 60.0  # seconds a measured round trip is trusted
# A route made with a view (or round trips) older than this share of their max age refreshes them in
# the background, so that a client making sessions often never waits for the DHT (a fetch took ~12 ms
# of a session's first token here) or for pings.
REFRESH_AHEAD = 0.5
# ...starting this long after the route that asked for it, off the way of its session's first token: a
# refresh running beside it (a DHT fetch, the client's and the DHT process's CPU) made every 2.5 s a
# first token of the benchmark's order 12.5-15.8 ms instead of 7.5-9 (2 nodes on 2 cores).
REFRESH_DELAY = 0.1
LANE_RETRY_AFTER = 600.0  # seconds before a direct lane this client could not reach is tried again
PING_TIMEOUT = 2.0
UNREACHABLE = 10.0  # seconds recorded for a node that did not answer a ping
MAX_PINGS = 64
# A spare connection to a node's direct lane (see ``MeshConnection.inference_lane``) is used only this
# young: a node ends a stream that stays silent for its step_timeout (30 s by default).
SPARE_MAX_AGE = 5.0
FAILURE_MEMORY = 60.0  # seconds a node that failed is left out of new routes
SECONDS_PER_TOKEN = 0.01  # extra patience per token of a long step (prefill, replay, batch forward)


class MeshConnection:
    """Shared by every session of a client: one DHT peer, one event loop, one P2P replica."""

    def __init__(self, config: ClientConfig, prefix: str):
        self.config, self.prefix = config, prefix
        self.policy = pick("routing policy", get_routing_policies(), config.routing)
        self.credentials = pick("auth provider", get_auth_providers(), config.auth)(config).credentials()
        # Credentials would cross the direct lane in clear: such clients stay on P2P unless told otherwise.
        self.use_direct_lanes = config.direct_lane if config.direct_lane is not None else not self.credentials
        self.dht = start_dht(config, client_mode=True)
        self.loop = BackgroundLoop("farmesh-client")
        self.p2p = self.loop.run(self.dht.replicate_p2p())
        self._records: list[NodeRecord] = []
        self._records_at = -RECORDS_MAX_AGE
        self._refreshing: Future | None = None  # a background refresh of the records or round trips
        self._connected: set[str] = set()
        self.latencies: dict[str, float] = {}
        self._latency_at: dict[str, float] = {}
        self._failed_at: dict[str, float] = {}
        self._tickets: dict[str, tuple[str, DirectTicket]] = {}  # peer -> (host, ticket) of its direct lane
        self._lane_unreachable_at: dict[str, float] = {}
        self._spares: dict[str, tuple[float, DirectConnection]] = {}  # peer -> (opened at, an unused stream)
        self._spares_lock = threading.Lock()
        self._closed = False
        # Clients are often left open (Petals' users never close theirs): at exit, or when dropped,
        # leave the mesh as close() does, rather than let the loop's P2P tasks die pending, each with
        # a "Task was destroyed but it is pending!" on stderr.
        self._pid = os.getpid()
        self._leave = weakref.finalize(self, _leave_mesh, self.loop, self.dht, self._pid)

    def close(self) -> None:
        with self._spares_lock:
            self._closed = True
            spares, self._spares = self._spares, {}
        for _, connection in spares.values():
            if self.forked():  # the parent's streams: let go of this process's copy only
                connection.sock.close()
            else:
                connection.close()
        self._leave()

    def forked(self) -> bool:
        """Whether this runs in a child forked after this connection was made."""
        return os.getpid() != self._pid

    def check_process(self) -> None:
        """Raise ``ForkedClientError`` in a child forked after this connection was made: the loop's
        thread and the DHT peer stayed in the parent (waiting on the loop would hang, and the DHT
        peer's pipe is the parent's), and so did every open session's sockets."""
        if self.forked():
            raise ForkedClientError(
                f"this client was made in process {self._pid}, before a fork: make a new client in this process"
            )

    def records(self, refresh: bool = False) -> list[NodeRecord]:
        age = time.monotonic() - self._records_at
        if refresh or age > RECORDS_MAX_AGE:
            self._records, self._records_at = fetch_node_records(self.dht, self.prefix), time.monotonic()
        elif age > REFRESH_AHEAD * RECORDS_MAX_AGE:
            self._in_background(self._refresh_records())
        return self._records

    async def _refresh_records(self) -> None:
        records = await asyncio.get_running_loop().run_in_executor(None, fetch_node_records, self.dht, self.prefix)
        self._records, self._records_at = records, time.monotonic()

    def _in_background(self, refresh: Coroutine) -> None:
        """Run ``refresh`` on the loop in REFRESH_DELAY, unless another refresh still waits or runs (then
        drop it)."""
        if self._refreshing is not None and not self._refreshing.done():
            refresh.close()
            return
        self._refreshing = self.loop.submit(_after(REFRESH_DELAY, refresh))
        self._refreshing.add_done_callback(_log_failure)

    def route(self, start: int, end: int, avoid: set[str] = frozenset(), adapter: str | None = None) -> list[RouteHop]:
        """A chain of nodes covering ``start:end`` chosen by the configured routing policy.

        Nodes in ``avoid`` are never used. Nodes that failed recently (``report_failure``) are left
        out too, unless no chain exists without them: then they get another chance.
        """
        self.check_process()
        now = time.monotonic()
        remembered = {p for p, t in self._failed_at.items() if now - t < FAILURE_MEMORY} - set(avoid)
        attempts = [(False, set(avoid) | remembered), (True, set(avoid) | remembered)]
        if remembered:
            attempts.append((True, set(avoid)))
        for attempt, (refresh, excluded) in enumerate(attempts, start=1):
            records = [r for r in self.records(refresh) if adapter is None or adapter in r.adapters]
            if self.config.quantization is not None:  # the client requires one quantization
                records = [r for r in records if r.quantization == self.config.quantization]
            self.measure_latencies([r.peer_id for r in records if r.start < end and r.end > start])
            request = RouteRequest(records=records, start=start, end=end, latencies=self.latencies, avoid=excluded)
            try:
                return self.policy(request)
            except NoRouteError as e:
                if attempt < len(attempts):
                    continue
                if self.config.quantization is not None:
                    wanted = self.config.quantization
                    raise NoRouteError(f"{e} (only nodes with quantization={wanted!r} count)") from None
                if adapter is not None:
                    raise NoRouteError(f"{e} (only nodes with LoRA adapter {adapter!r} count)") from None
                raise
        raise AssertionError("unreachable")

    def report_failure(self, peer_id: str) -> None:
        """Leave ``peer_id`` out of new routes for a while (its DHT record may outlive it)."""
        self._failed_at[peer_id] = time.monotonic()
        self._connected.discard(peer_id)
        self.forget_direct_lane(peer_id)

    def timeout_for(self, tokens: int) -> float:
        """How long to wait for a step carrying ``tokens`` tokens before calling the node failed."""
        return self.config.step_timeout + SECONDS_PER_TOKEN * tokens

    def measure_latencies(self, peer_ids: list[str]) -> None:
        """Ping the nodes whose round trip is unknown or stale (at most MAX_PINGS at once, concurrently)."""
        now = time.monotonic()
        ages = {p: now - self._latency_at.get(p, -LATENCY_MAX_AGE) for p in peer_ids}
        if stale := [p for p, age in ages.items() if age >= LATENCY_MAX_AGE]:
            self.loop.run(self._ping_all(stale[:MAX_PINGS]))
        elif due := [p for p, age in ages.items() if age >= REFRESH_AHEAD * LATENCY_MAX_AGE]:
            self._in_background(self._ping_all(due[:MAX_PINGS]))

    async def _ping_all(self, peer_ids: list[str]) -> None:
        await asyncio.gather(*(self._ping(p) for p in peer_ids))

    async def _ping(self, peer_id: str) -> None:
        try:
            stub = await self.stub(peer_id)
            began = time.perf_counter()
            await stub.rpc_info(runtime_pb2.ExpertUID(), timeout=PING_TIMEOUT)
            self.latencies[peer_id] = time.perf_counter() - began
        except Exception as e:
            logger.debug("Ping of %s failed: %r", peer_id, e)
            self.latencies[peer_id] = UNREACHABLE
        self._latency_at[peer_id] = time.monotonic()
        if self.latencies[peer_id] < UNREACHABLE:
            try:
                await self._get_ticket(peer_id)
            except Exception as e:
                logger.info("No direct lane to %s (%r); using P2P", peer_id, e)

    async def _get_ticket(self, peer_id: str) -> None:
        """Ask a node that offers a direct lane for this client's ticket to it (over P2P)."""
        record = self._record(peer_id)
        if not self.use_direct_lanes or peer_id in self._tickets or record is None:
            return
        if time.monotonic() - self._lane_unreachable_at.get(peer_id, -LANE_RETRY_AFTER) < LANE_RETRY_AFTER:
            return  # a firewalled lane would cost a connect timeout each time
        lane = await direct_ticket(self.p2p, record, PING_TIMEOUT)
        if lane is not None:
            self._tickets[peer_id] = lane

    def direct_lane(self, peer_id: str) -> tuple[str, int] | None:
        """The (host, port) of ``peer_id``'s direct lane if this client holds a ticket for it."""
        if peer_id not in self._tickets:
            return None
        host, ticket = self._tickets[peer_id]
        return host, ticket.port

    def inference_lane(self, peer_id: str) -> DirectConnection | None:
        """A connection to ``peer_id``'s direct lane for a new inference stream, None without a ticket:
        the spare opened during the last session through that node (``open_spares``) if it is young and
        the node has said nothing on it (it has accepted it and waits for the stream's first message),
        else a new one. A new connection's accept and stream start delayed a node's first compute by
        ~0.7 ms (traced, 2 nodes, 32 sessions each way: from the session's start to the first node's
        prefill 1.35 ms with spares, 2.07 without; a first token takes ~15)."""
        lane = self.direct_lane(peer_id)
        if lane is None:
            return None
        with self._spares_lock:
            opened_at, spare = self._spares.pop(peer_id, (0.0, None))
        if spare is not None:
            if time.monotonic() - opened_at < SPARE_MAX_AGE and spare.silent():
                return spare
            spare.close()  # (the node ended it, or may end it any moment)
        return DirectConnection(*lane, self.direct_hello(peer_id, "rpc_inference"))

    def open_spares(self, peer_ids: list[str]) -> None:
        """Open a spare inference connection to each of ``peer_ids`` (with a direct lane) that has none,
        for the next session through it: its node accepts it now, off that session's path. One spare
        per node and client; an unused one is closed with the client. The connecting runs on the
        loop's executor: it costs a round trip to each node (up to CONNECT_TIMEOUT for one that does
        not answer), which the session stepping now does not wait for."""
        wanted = [p for p in peer_ids if p not in self._spares and self.direct_lane(p) is not None]
        if wanted:
            self.loop.loop.call_soon_threadsafe(self.loop.loop.run_in_executor, None, self._open_spares, wanted)

    def _open_spares(self, peer_ids: list[str]) -> None:
        for peer_id in peer_ids:
            if (lane := self.direct_lane(peer_id)) is None:
                continue
            try:
                connection = DirectConnection(*lane, self.direct_hello(peer_id, "rpc_inference"))
            except OSError:
                continue  # the next session connects (and fails over) as it would without a spare
            with self._spares_lock:
                extra = self._spares.get(peer_id, (0.0, None))[1]
                self._spares[peer_id] = (time.monotonic(), connection)
                if self._closed:
                    extra, self._spares = connection, {}
            if extra is not None:  # (another thread's, opened meanwhile; or the client closed meanwhile)
                extra.close()

    def offers_direct_lane(self, peer_id: str) -> bool:
        """Whether ``peer_id`` announced a direct lane (so other nodes can push to it)."""
        record = self._record(peer_id)
        return record is not None and record.direct_lane

    def on_this_machine(self, peer_id: str) -> bool:
        """Whether ``peer_id`` announced only loopback addresses (so it runs on the client's machine)."""
        record = self._record(peer_id)
        if record is None or not record.addrs:
            return False
        return all(addr.startswith(("/ip4/127.", "/ip6/::1/")) for addr in record.addrs)

    def chooses_tokens(self, peer_id: str, end: int, dtype: torch.dtype) -> bool:
        """Whether ``peer_id`` announced an LM head of ``dtype`` after its layers ending at ``end`` (the
        model's last: it can choose tokens in a token loop, see ``wire.TokenLoop``)."""
        record = self._record(peer_id)
        return record is not None and record.end == end and record.head_dtype == str(dtype).removeprefix("torch.")

    def _record(self, peer_id: str) -> NodeRecord | None:
        return next((r for r in self._records if r.peer_id == peer_id), None)

    async def stub(self, peer_id: str, direct: bool = True):
        """An RPC stub for ``peer_id``: over its direct lane where this client holds a ticket (and
        ``direct``), else P2P, dialing the addresses it announced the first time."""
        if peer_id not in self._connected:
            record = self._record(peer_id)
            if record is not None and record.addrs:
                try:
                    await dial(self.p2p, record)
                except Exception as e:
                    logger.debug("Could not dial %s at %s: %s", peer_id, record.addrs, e)
            self._connected.add(peer_id)
        p2p_stub = FarNodeRPC.get_stub(self.p2p, PeerID.from_base58(peer_id))
        if not direct or peer_id not in self._tickets:
            return p2p_stub
        host, port = self.direct_lane(peer_id)
        return DirectStub(
            host, port, partial(self.direct_hello, peer_id), p2p_stub, partial(self.lane_unreachable, peer_id)
        )

    def direct_hello(self, peer_id: str, method: str) -> DirectHello:
        """What to say first on ``peer_id``'s direct lane to call ``method`` (this client holds a ticket)."""
        return DirectHello(method=method, peer_id=str(self.p2p.peer_id), ticket=self._tickets[peer_id][1].ticket)

    def forget_direct_lane(self, peer_id: str) -> None:
        self._tickets.pop(peer_id, None)

    def lane_unreachable(self, peer_id: str) -> None:
        """``peer_id``'s direct lane could not be reached: use P2P, and do not ask for its ticket again
        for LANE_RETRY_AFTER seconds."""
        self.forget_direct_lane(peer_id)
        self._lane_unreachable_at[peer_id] = time.monotonic()


async def _after(delay: float, work: Coroutine):
    """``work`` after ``delay`` seconds; cancelled before it starts (the client closing), ``work`` is
    closed unstarted, which Python would otherwise report as never awaited."""
    try:
        await asyncio.sleep(delay)
    except BaseException:
        work.close()
        raise
    return await work


def _log_failure(refresh: Future) -> None:
    if not refresh.cancelled() and refresh.exception() is not None:
        logger.debug("A background refresh failed: %r", refresh.exception())


def connect(config: ClientConfig) -> tuple[Checkpoint, ArchitectureAdapter, MeshConnection]:
    """Open the checkpoint (config and tokenizer only), find its adapter and join its mesh."""
    if config.keep_freed_memory:
        keep_freed_memory()
    load_plugins()
    checkpoint = Checkpoint(config.model_id)
    adapter = adapter_for(checkpoint.config)
    return checkpoint, adapter, MeshConnection(config, config.dht_prefix or checkpoint.dht_prefix)


def _leave_mesh(loop: BackgroundLoop, dht, pid: int) -> None:
    if os.getpid() != pid:  # a forked child at its exit: the loop's thread and the DHT peer are the parent's
        return
    if loop.is_current():  # the garbage collector ran the finalizer on the loop, which cannot stop itself
        threading.Thread(target=_leave_mesh, args=(loop, dht, pid), name="farmesh-leave", daemon=True).start()
        return
    loop.stop()
    dht.shutdown()
