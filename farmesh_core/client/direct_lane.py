"""The client end of a node's direct lane (see ``farmesh_core.node.direct_lane``).

Inference sessions and ``DistributedModel``'s forward and backward calls use ``DirectConnection``:
blocking sockets in the calling thread, the shortest path for one-token steps, and for large
messages, which it receives straight into their own memory. ``DirectStub`` gives async callers (the
mesh's ``stub``) the lane behind a hivemind stub's stream methods; when the lane cannot be reached a
call goes over P2P instead.
"""

import asyncio
import logging
import select
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import closing, suppress

from hivemind.p2p import P2P, P2PHandlerError
from hivemind.proto import runtime_pb2
from hivemind.proto.p2pd_pb2 import RPCError

from farmesh_core.tensor_message import LARGE_BYTES
from farmesh_core.wire import (
    DirectHello,
    StreamProtocolError,
    frame,
    frame_length,
    framed,
    parse_message,
    read_frame,
    send_frame,
)

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 2.0
MAX_RESPONSE_BYTES = 64 * 1024**2
RECV_BYTES = 64 * 1024


class DirectStub:
    """``rpc_inference``/``rpc_forward``/``rpc_backward`` of one node over its direct lane; other
    methods (and calls whose connection fails) go to ``p2p_stub``."""

    def __init__(
        self, host: str, port: int, hello: Callable[[str], DirectHello], p2p_stub, on_unreachable: Callable[[], None]
    ):
        self.host, self.port, self._hello, self._p2p_stub = host, port, hello, p2p_stub
        self._on_unreachable = on_unreachable

    def __getattr__(self, name: str):
        return getattr(self._p2p_stub, name)

    async def rpc_inference(self, requests: AsyncIterator) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        return await self._call("rpc_inference", requests)

    async def rpc_forward(self, requests: AsyncIterator) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        return await self._call("rpc_forward", requests)

    async def rpc_backward(self, requests: AsyncIterator) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        return await self._call("rpc_backward", requests)

    async def _call(self, method: str, requests: AsyncIterator) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as e:
            logger.info("Direct lane %s:%d unreachable (%r); using P2P", self.host, self.port, e)
            self._on_unreachable()
            return await getattr(self._p2p_stub, method)(requests)
        writer.write(frame(self._hello(method).model_dump_json().encode()))

        async def write_requests() -> None:
            async for request in requests:
                await send_frame(request, writer)
            await send_frame(P2P.END_OF_STREAM, writer)

        writing = asyncio.create_task(write_requests())
        return self._responses(reader, writer, writing)

    async def _responses(self, reader, writer, writing: asyncio.Task) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        with closing(writer):
            try:
                while True:
                    try:
                        is_error, data = await read_frame(reader, MAX_RESPONSE_BYTES)
                        response = None if is_error else parse_message(data, runtime_pb2.ExpertResponse)
                    except asyncio.IncompleteReadError as e:
                        if e.partial:
                            raise ConnectionError("the node closed the direct lane mid-message") from None
                        break  # the node ended the stream
                    except StreamProtocolError as e:
                        raise ConnectionError(f"the node broke the stream framing: {e}") from None
                    if response is None:
                        message = RPCError.FromString(data).message
                        raise P2PHandlerError(f"Failed to call handler at {self.host}:{self.port}: {message}")
                    yield response
                await writing
            finally:
                writing.cancel()


class DirectConnection:
    """One inference stream over a node's direct lane, driven with blocking calls from the caller's
    thread: a one-token step then costs one send and one receive (or only the receive, when the
    previous node pushed the input), with no event loop in between."""

    def __init__(self, host: str, port: int, hello: DirectHello):
        self.sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = bytearray()  # received, not yet read (a file object's buffer could not be polled)
        self._ended = False  # the end of the requests was sent
        self.sock.sendall(frame(hello.model_dump_json().encode()))

    def _read(self, n: int) -> bytes | bytearray:
        if n > LARGE_BYTES:
            return self._read_into(n)
        while len(self._buffer) < n:
            chunk = self.sock.recv(max(RECV_BYTES, n - len(self._buffer)))
            if not chunk:
                raise ConnectionError("the node closed the direct lane")
            self._buffer += chunk
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    def _read_into(self, n: int) -> bytearray:
        """``n`` bytes received straight into memory of their own (asyncio's streams, and the small
        reads above, copy a large message twice more: 0.86 against 0.23 ms for 512 KB here)."""
        data = bytearray(n)
        view = memoryview(data)
        have = min(n, len(self._buffer))
        view[:have] = self._buffer[:have]
        del self._buffer[:have]
        while have < n:
            got = self.sock.recv_into(view[have:])
            if not got:
                raise ConnectionError("the node closed the direct lane")
            have += got
        return data

    def silent(self) -> bool:
        """Whether the node has sent nothing on this connection yet (no answer, error or end of stream)."""
        return not self.answered_within(0)

    def answered_within(self, timeout: float) -> bool:
        """Whether something from the node is here or arrives within ``timeout`` seconds (not read)."""
        return bool(self._buffer) or bool(select.select([self.sock], [], [], timeout)[0])

    def send(self, request: runtime_pb2.ExpertRequest, timeout: float) -> None:
        self.sock.settimeout(timeout)
        self.sock.sendall(framed(request))

    def receive(self, timeout: float) -> runtime_pb2.ExpertResponse:
        """The next response, waiting at most ``timeout`` seconds for it."""
        self.sock.settimeout(timeout)
        marker = self._read(1)
        try:
            length = frame_length(marker, self._read(P2P.HEADER_LEN), MAX_RESPONSE_BYTES)
        except StreamProtocolError as e:
            raise ConnectionError(f"the node broke the stream framing: {e}") from None
        data = self._read(length)
        if marker == P2P.ERROR_MARKER:
            raise P2PHandlerError(
                f"Failed to call handler at {self.sock.getpeername()}: {RPCError.FromString(data).message}"
            )
        try:
            return parse_message(data, runtime_pb2.ExpertResponse)
        except StreamProtocolError as e:
            raise ConnectionError(f"the node broke the stream framing: {e}") from None

    def end_requests(self) -> None:
        """Tell the node that no more requests come (it answers the ones it has, then ends the stream)."""
        if not self._ended:
            self._ended = True
            self.sock.settimeout(CONNECT_TIMEOUT)
            self.sock.sendall(frame(P2P.END_OF_STREAM.SerializeToString(), is_error=True))

    def responses(self, timeout: float) -> Iterator[runtime_pb2.ExpertResponse]:
        """The node's responses until it ends the stream, each within ``timeout`` seconds."""
        while True:
            if not self._buffer:
                self.sock.settimeout(timeout)
                chunk = self.sock.recv(RECV_BYTES)
                if not chunk:
                    return  # the node ended the stream, between two messages
                self._buffer += chunk
            yield self.receive(timeout)

    def close(self) -> None:
        """End the stream (the node closes the session) and the connection."""
        with suppress(OSError):
            self.end_requests()
        self.sock.close()
