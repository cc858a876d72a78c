"""Node-to-node push: a node sends a step's output straight to the next node of the session's chain.

Without it the client relays every step: the output goes back to the client, which wakes up, reads
it and sends it on. With it the next node starts as soon as this node is done, and the client only
reads this node's answer (it still keeps the inputs of every node, for failover) while the next node
computes. The client asks for it per step (``InferenceStep.push``); the next node takes the output
only into the session the client opened there with the matching key.

Both directions go over direct lanes. :class:`PushLinks` holds this node's connections to the next
nodes: found through the DHT records and a lane ticket asked over P2P, as a client does, so a node
only ever dials addresses that a node of its mesh announced. A push that cannot be made at once (no
connection yet, a broken one) is reported as not pushed, and the client relays that step itself.
:func:`push_server` is the receiving end, served on the lane as ``rpc_push``.
"""

import asyncio
import hmac
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from farmesh_core import metrics
from farmesh_core.dht import dial, direct_ticket, fetch_node_records
from farmesh_core.errors import RequestError
from farmesh_core.wire import (
    DirectHello,
    InferenceStep,
    PushedStep,
    PushTarget,
    StreamProtocolError,
    TokenLoop,
    WireTensor,
    decode_meta,
    encode_meta,
    frame,
    framed,
    parse_message,
    read_frame,
    tensor_message,
)

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 2.0
RETRY_AFTER = 30.0  # seconds before a next node that could not be reached is tried again
MAX_BUFFERED_BYTES = 64 * 1024**2  # a link with more unsent bytes than this is too slow to push to
IDLE_TIMEOUT = 600.0  # seconds a push link may stay silent before the receiving node closes it


class PushLinks:
    """This node's connections to the direct lanes of the nodes it pushes outputs to."""

    def __init__(self, dht, prefix: str, p2p: P2P, peer_id: str, inboxes: "PushInboxes | None" = None):
        self.dht, self.prefix, self.p2p, self.peer_id = dht, prefix, p2p, peer_id
        self.inboxes = inboxes  # this node's own: a push to another of its sessions goes straight there
        self._writers: dict[str, asyncio.StreamWriter] = {}
        self._connecting: dict[str, asyncio.Task] = {}
        self._links: set[asyncio.Task] = set()  # every link's task, connecting or connected
        self._failed_at: dict[str, float] = {}
        self._held: dict[asyncio.StreamWriter, list[bytes]] | None = None  # see together()

    @contextmanager
    def together(self) -> Iterator[None]:
        """Pushes made inside go out at its end, one write per link: a decode batch's outputs reach the
        next node at once, as one batch there too. Sent one by one, the next node took the first alone
        before the rest came, and each write woke it (~70 us each on this VM)."""
        if self._held is not None:
            yield
            return
        self._held = {}
        try:
            yield
        finally:
            held, self._held = self._held, None
            for writer, frames in held.items():
                writer.write(b"".join(frames))

    def push(self, targets: list[PushTarget], position: int, hidden: WireTensor, loop: TokenLoop | None = None) -> bool:
        """Send ``hidden`` (the input of the step at ``position``) to the session of ``targets[0]``,
        which pushes its own output to ``targets[1]``, and so on (with ``loop`` to the last of them);
        False if it cannot go at once: the client then relays it. The first push to a node starts
        connecting; a push to this node itself (a token loop through one node) needs no connection."""
        target, onward = targets[0], targets[1:]
        meta = PushedStep(
            session_id=target.session_id, key=target.key, position=position, step=target.step, push=onward, loop=loop
        )
        request = tensor_message(runtime_pb2.ExpertRequest, hidden, encode_meta(meta))
        if target.peer_id == self.peer_id and self.inboxes is not None:
            try:
                delivered = self.inboxes.deliver(meta, request, self.peer_id)
            except RequestError:  # (a wrong key)
                delivered = False
            metrics.node_push(delivered)
            return delivered
        writer = self._writers.get(target.peer_id)
        if writer is None or writer.is_closing() or writer.transport.get_write_buffer_size() > MAX_BUFFERED_BYTES:
            self._connect_soon(target.peer_id)
            metrics.node_push(False)
            return False
        if self._held is None:
            writer.write(framed(request))
        else:
            self._held.setdefault(writer, []).append(framed(request))
        metrics.node_push(True)
        return True

    def _connect_soon(self, peer_id: str) -> None:
        self._writers.pop(peer_id, None)
        if peer_id in self._connecting or time.monotonic() - self._failed_at.get(peer_id, -RETRY_AFTER) < RETRY_AFTER:
            return
        task = self._connecting[peer_id] = asyncio.get_running_loop().create_task(self._connect(peer_id))
        self._links.add(task)
        task.add_done_callback(self._links.discard)

    async def _connect(self, peer_id: str) -> None:
        try:
            records = await asyncio.get_running_loop().run_in_executor(None, fetch_node_records, self.dht, self.prefix)
            record = next((r for r in records if r.peer_id == peer_id), None)
            if record is None:
                raise ConnectionError("it has no record in the DHT")
            with suppress(Exception):  # already connected, or reachable otherwise: the ticket call says
                await dial(self.p2p, record, CONNECT_TIMEOUT)
            lane = await direct_ticket(self.p2p, record, CONNECT_TIMEOUT)
            if lane is None:
                raise ConnectionError("it announces no direct lane")
            host, ticket = lane
            async with asyncio.timeout(CONNECT_TIMEOUT):
                reader, writer = await asyncio.open_connection(host, ticket.port)
            hello = DirectHello(method="rpc_push", peer_id=self.peer_id, ticket=ticket.ticket)
            writer.write(frame(encode_meta(hello)))
            self._writers[peer_id] = writer
            logger.debug("Pushing outputs to %s at %s:%d", peer_id, host, ticket.port)
        except Exception as e:
            logger.info("Cannot push to %s (%r); clients relay instead", peer_id, e)
            self._failed_at[peer_id] = time.monotonic()
            return
        finally:
            self._connecting.pop(peer_id, None)
        try:
            await reader.read()  # the next node never answers: this returns when the connection ends
        finally:
            writer.close()
            if self._writers.get(peer_id) is writer:
                del self._writers[peer_id]

    def close(self) -> None:
        for task in list(self._links):
            task.cancel()


PUSH_INBOX = 4  # messages a push session holds before it is read
EARLY_PUSHES = 64  # pushes held for sessions not open yet
EARLY_PUSH_BYTES = 64 * 1024**2
EARLY_PUSH_SECONDS = 10.0  # how long such a push waits for its session


class PushInboxes:
    """The inboxes of this node's open push sessions, and pushes that came before their session opened.

    A client opens every node of a chain at once (see ``InferenceSession``), so the previous node's
    output can overtake the opening message it sent to this node: that push waits here, a bounded
    number of bytes and seconds, and goes into the session's inbox when it opens with the same key.
    """

    def __init__(self):
        self._open: dict[str, tuple[str, asyncio.Queue]] = {}  # session id -> (push key, its messages)
        self._early: dict[str, list[tuple[float, PushedStep, runtime_pb2.ExpertRequest]]] = {}
        self._early_bytes = 0

    def open(self, session_id: str, key: str) -> asyncio.Queue:
        """The inbox of a session that opens now, holding the pushes that came for it already."""
        if session_id in self._open:
            raise RequestError(f"session id {session_id} is in use on this node")
        inbox: asyncio.Queue = asyncio.Queue(PUSH_INBOX)
        self._open[session_id] = (key, inbox)
        for _, pushed, request in self._take_early(session_id):
            if not hmac.compare_digest(key, pushed.key) or inbox.full():
                logger.info("Dropped a push that came before session %s opened: wrong key, or too many", session_id)
                continue
            self._deliver(pushed, request, inbox)
        return inbox

    def close(self, session_id: str) -> None:
        del self._open[session_id]

    def deliver(self, pushed: PushedStep, request: runtime_pb2.ExpertRequest, peer_id: PeerID | str) -> bool:
        """Put a pushed output into its session's inbox, or hold it until the session opens; False where
        it was dropped (too many held, or the session's inbox full)."""
        if pushed.session_id not in self._open:
            return self._hold(pushed, request)
        key, inbox = self._open[pushed.session_id]
        if not hmac.compare_digest(key, pushed.key):
            raise RequestError(f"wrong push key for session {pushed.session_id}")
        if inbox.full():
            logger.warning("Dropped a push from %s: session %s has unread messages", peer_id, pushed.session_id)
            return False
        self._deliver(pushed, request, inbox)
        return True

    @staticmethod
    def _deliver(pushed: PushedStep, request: runtime_pb2.ExpertRequest, inbox: asyncio.Queue) -> None:
        step = InferenceStep(position=pushed.position, step=pushed.step, push=pushed.push, loop=pushed.loop)
        inbox.put_nowait((step, request))

    def _hold(self, pushed: PushedStep, request: runtime_pb2.ExpertRequest) -> bool:
        now, size = time.monotonic(), request.ByteSize()
        self._expire(now)
        held = sum(len(pushes) for pushes in self._early.values())
        if held >= EARLY_PUSHES or self._early_bytes + size > EARLY_PUSH_BYTES:
            logger.debug("Dropped a push for session %s: it is not open and %d pushes wait", pushed.session_id, held)
            return False
        self._early.setdefault(pushed.session_id, []).append((now, pushed, request))
        self._early_bytes += size
        return True

    def _take_early(self, session_id: str) -> list:
        """The pushes held for ``session_id`` (those within their time), in arrival order."""
        self._expire(time.monotonic())
        pushes = self._early.pop(session_id, [])
        self._early_bytes -= sum(request.ByteSize() for _, _, request in pushes)
        return pushes

    def _expire(self, now: float) -> None:
        for session_id in [s for s, pushes in self._early.items() if now - pushes[0][0] > EARLY_PUSH_SECONDS]:
            self._early_bytes -= sum(request.ByteSize() for _, _, request in self._early.pop(session_id))


def push_server(inboxes: PushInboxes, max_message_bytes: int) -> Callable:
    """The ``rpc_push`` lane server: puts each pushed output into its session's inbox.

    A push for a session that is not open waits a while for it (see :class:`PushInboxes`); one that is
    gone by then is dropped. A message that is not a push, or carries a wrong key, closes the
    connection: the pushing node then reports its pushes as failed and the clients relay. Each inbox
    holds a few messages; a pusher that floods one loses the rest.
    """

    async def serve(peer_id: PeerID, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    async with asyncio.timeout(IDLE_TIMEOUT):
                        _, data = await read_frame(reader, max_message_bytes)
                except (asyncio.IncompleteReadError, TimeoutError):
                    return  # the pushing node closed the link, or left it unused (it reconnects when needed)
                request = parse_message(data, runtime_pb2.ExpertRequest)
                inboxes.deliver(decode_meta(request.metadata, PushedStep), request, peer_id)
        except (RequestError, StreamProtocolError, ConnectionError) as e:
            logger.info("Closed a push link from %s: %s", peer_id, e)
        finally:
            writer.close()

    return serve
