"""The direct lane's door, in-process: tickets are bound to peer ids, idle connections are capped,
and a valid hello reaches the stream server with the caller's peer id."""

import asyncio

import pytest
from hivemind.p2p import PeerID

from farmesh_core.node import direct_lane
from farmesh_core.node.direct_lane import DirectLane
from farmesh_core.wire import DirectHello, frame

PEER = "12D3KooWBqrWqZnCV4TEYFnNqdZRrNGkkfF3unoNq4iCwLi5phwG"


async def serve_lane(callers: list[PeerID]) -> DirectLane:
    async def server(peer_id: PeerID, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        callers.append(peer_id)
        writer.write(b"served")
        writer.close()

    lane = DirectLane({"rpc_inference": server}, "127.0.0.1")
    await lane.start()
    return lane


async def exchange(port: int, payload: bytes) -> bytes:
    """What the lane answers ``payload`` before closing (b"" when it closes or resets unanswered)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    try:
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


def test_valid_ticket_reaches_the_server_as_its_peer():
    async def run():
        callers: list[PeerID] = []
        lane = await serve_lane(callers)
        hello = DirectHello(method="rpc_inference", peer_id=PEER, ticket=lane.ticket(PEER))
        assert await exchange(lane.port, frame(hello.model_dump_json().encode())) == b"served"
        other = "12D3KooWEkbgLgrpaZfq4MvfD2GKtxzE8N5M467WSefxMzGFVYWa"
        stolen = DirectHello(method="rpc_inference", peer_id=other, ticket=lane.ticket(PEER))
        assert await exchange(lane.port, frame(stolen.model_dump_json().encode())) == b""
        await lane.stop()
        return callers

    assert asyncio.run(run()) == [PeerID.from_base58(PEER)]


def test_connections_beyond_the_cap_are_closed(monkeypatch):
    monkeypatch.setattr(direct_lane, "MAX_CONNECTIONS", 3)

    async def run():
        lane = await serve_lane([])
        idle = [await asyncio.open_connection("127.0.0.1", lane.port) for _ in range(3)]
        await asyncio.sleep(0.2)
        assert lane.connections == 3
        hello = DirectHello(method="rpc_inference", peer_id=PEER, ticket=lane.ticket(PEER))
        assert await exchange(lane.port, frame(hello.model_dump_json().encode())) == b""  # refused: full
        for _, writer in idle:
            writer.close()
        await asyncio.sleep(0.2)
        assert lane.connections == 0
        assert await exchange(lane.port, frame(hello.model_dump_json().encode())) == b"served"
        await lane.stop()

    asyncio.run(run())


@pytest.mark.timeout(30)
def test_silent_connection_is_dropped_after_the_hello_timeout(monkeypatch):
    monkeypatch.setattr(direct_lane, "HELLO_TIMEOUT", 0.3)

    async def run():
        lane = await serve_lane([])
        reader, writer = await asyncio.open_connection("127.0.0.1", lane.port)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the node, not by us
        writer.close()
        assert lane.connections == 0
        await lane.stop()

    asyncio.run(run())
