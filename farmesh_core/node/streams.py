"""Stream RPC handlers that check a message's size before reading it.

hivemind's own protobuf stream handlers read each message whole, whatever length its header
announces, before anything can look at it. Ours read the 8-byte length header first and refuse a
message over the limit without buffering it; garbage that is not a protobuf message gets an error
and the stream is closed. The framing is hivemind's, so its client stubs work unchanged.
"""

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import closing, suppress

from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto.p2pd_pb2 import RPCError

from farmesh_core.wire import StreamProtocolError, parse_message, read_frame, send_frame

logger = logging.getLogger(__name__)

DISCARD_SECONDS = 1.0  # how long a finished stream waits for the caller to stop sending


async def _read_message(reader: asyncio.StreamReader, message_type: type, max_bytes: int):
    """The next message, or None at the end of the stream."""
    is_error, data = await read_frame(reader, max_bytes)
    if is_error:
        return None  # the caller's end-of-stream (or its error): either way, no more requests
    return parse_message(data, message_type)


async def _discard_rest(reader: asyncio.StreamReader) -> None:
    """Read (and drop) what the caller is still sending, briefly, before the stream is closed.

    Closing a socket with unread data resets the connection, and the reset can destroy the reply
    the caller has not read yet: it would see a broken stream instead of the node's error.
    """
    with suppress(Exception):
        async with asyncio.timeout(DISCARD_SECONDS):
            while await reader.read(64 * 1024):
                pass


def limited_stream_handler(
    name: str,
    handler: Callable[[AsyncIterator, P2PContext], AsyncIterator],
    message_type: type,
    max_message_bytes: int,
    local_id: PeerID,
    max_prefetch: int = 4,
) -> Callable[[PeerID, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """Serve ``handler`` (requests stream -> responses stream) on one open stream from ``remote_id``,
    with a per-message limit. P2P streams and the node's direct lane both run it."""

    async def handle_stream(remote_id: PeerID, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        context = P2PContext(handle_name=name, local_id=local_id, remote_id=remote_id)
        requests: asyncio.Queue = asyncio.Queue(max_prefetch)

        async def iterate_requests():
            while (request := await requests.get()) is not None:
                yield request

        async def process() -> None:
            try:
                async for response in handler(iterate_requests(), context):
                    await send_frame(response, writer)
            except Exception as e:
                logger.warning("Handler %s failed for %s: %r", name, context.remote_id, e, exc_info=True)
                with suppress(Exception):
                    await send_frame(RPCError(message=f"internal error: {e!r}"[:4000]), writer)

        async def receive() -> bool:
            """Queue requests until the caller's end of stream (True) or a broken stream (False)."""
            while True:
                try:
                    request = await _read_message(reader, message_type, max_message_bytes)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return False  # the caller closed the stream or died
                except StreamProtocolError as e:
                    logger.info("Closed a %s stream from %s: %s", name, context.remote_id, e)
                    with suppress(Exception):
                        await send_frame(RPCError(message=str(e)), writer)
                    await _discard_rest(reader)
                    return False
                await requests.put(request)
                if request is None:
                    return True

        with closing(writer):
            processing = asyncio.create_task(process())
            receiving = asyncio.create_task(receive())
            try:
                await asyncio.wait({processing, receiving}, return_when=asyncio.FIRST_COMPLETED)
                if processing.done():
                    receiving.cancel()
                    await asyncio.gather(receiving, return_exceptions=True)  # frees the reader
                    await _discard_rest(reader)
                elif receiving.result():
                    await processing
            finally:
                processing.cancel()
                receiving.cancel()

    return handle_stream


async def add_limited_stream_handler(
    p2p: P2P,
    name: str,
    handler: Callable[[AsyncIterator, P2PContext], AsyncIterator],
    message_type: type,
    max_message_bytes: int,
) -> Callable[[PeerID, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """Serve ``handler`` under ``name`` on ``p2p``; returns the per-stream server for other transports."""
    serve = limited_stream_handler(name, handler, message_type, max_message_bytes, p2p.peer_id)

    async def handle_p2p_stream(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve(stream_info.peer_id, reader, writer)

    await p2p.add_binary_stream_handler(name, handle_p2p_stream)
    return serve
