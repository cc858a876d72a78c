"""A node's direct lane: its stream RPCs over a plain TCP port, beside the P2P daemon.

Every P2P message crosses two hivemind daemons (client side and node side), four process hops per
round trip; on one machine that is most of a one-token step's network time. The direct lane carries
the same framed messages straight between the client's and the node's Python processes, so a hop
costs one TCP round trip. It is reached only with a ticket the node hands a peer over P2P (which
authenticates that peer), so requests keep the caller's peer id for auth, budgets and usage.
Unlike P2P it is not encrypted: clients that send an auth token stay on P2P unless told otherwise,
and ``direct_lane=False`` turns the lane off where hidden states must not cross a network in clear.
"""

import asyncio
import hashlib
import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable

from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import runtime_pb2

from farmesh_core.errors import RequestError
from farmesh_core.wire import DirectHello, DirectTicket, StreamProtocolError, decode_meta, read_frame

logger = logging.getLogger(__name__)

HELLO_TIMEOUT = 5.0  # seconds a new connection has to say who it is
MAX_HELLO_BYTES = 1024
MAX_CONNECTIONS = 1024  # open connections at once; more are closed at once (file descriptors are finite)

StreamServer = Callable[[PeerID, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class DirectLane:
    """Serves ``servers`` (stream RPC name -> per-stream server) to ticket holders on ``host``."""

    def __init__(self, servers: dict[str, StreamServer], host: str):
        self.servers, self.host = servers, host
        self.port = 0
        self.connections = 0
        self._secret = secrets.token_bytes(32)  # tickets die with the node process
        self._server: asyncio.Server | None = None

    def ticket(self, peer_id: str) -> str:
        return hmac.new(self._secret, peer_id.encode(), hashlib.sha256).hexdigest()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def rpc_direct_ticket(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        ticket = DirectTicket(port=self.port, ticket=self.ticket(str(context.remote_id)))
        return runtime_pb2.ExpertInfo(serialized_info=ticket.model_dump_json().encode())

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= MAX_CONNECTIONS:
            logger.warning("Refused a direct lane connection: %d are open", self.connections)
            writer.close()
            return
        self.connections += 1
        try:
            await self._serve_one(reader, writer)
        finally:
            self.connections -= 1

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(HELLO_TIMEOUT):
                _, raw = await read_frame(reader, MAX_HELLO_BYTES)
            hello = decode_meta(raw, DirectHello)
            if not hmac.compare_digest(hello.ticket, self.ticket(hello.peer_id)):
                raise RequestError("invalid ticket")
            peer_id = PeerID.from_base58(hello.peer_id)
        except (RequestError, StreamProtocolError, ValueError, TimeoutError, asyncio.IncompleteReadError,
                ConnectionError) as e:  # fmt: skip
            logger.info("Refused a direct lane connection from %s: %s", writer.get_extra_info("peername"), e)
            writer.close()
            return
        await self.servers[hello.method](peer_id, reader, writer)
