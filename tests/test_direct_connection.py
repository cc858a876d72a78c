"""DirectConnection (farmesh_core/client/direct_lane.py), the client end of a direct lane, against a
plain TCP listener on loopback: framed answers are read whole however they arrive, and
``answered_within`` says whether an answer is waiting without reading it (the session waits on the
last node of a pushed chain with it)."""

import socket
import time

import pytest
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from farmesh_core.client.direct_lane import DirectConnection
from farmesh_core.wire import DirectHello, frame


@pytest.fixture
def lane():
    """A connected (DirectConnection, server-side socket) pair."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = DirectConnection(
            "127.0.0.1", listener.getsockname()[1], DirectHello(method="rpc_inference", peer_id="p", ticket="t")
        )
        server, _ = listener.accept()
    assert b"rpc_inference" in server.recv(4096)  # the hello
    yield client, server
    client.close()
    server.close()


def answer(text: str) -> bytes:
    return frame(runtime_pb2.ExpertResponse(metadata=text.encode()).SerializeToString())


def test_answered_within_waits_without_reading(lane):
    client, server = lane
    began = time.perf_counter()
    assert not client.answered_within(0.05)
    assert time.perf_counter() - began >= 0.04
    server.sendall(answer("one"))
    assert client.answered_within(2.0)
    assert client.answered_within(0)  # still there: nothing was read
    assert client.receive(2.0).metadata == b"one"
    assert not client.answered_within(0.01)


def test_two_answers_in_one_packet_and_one_in_pieces(lane):
    client, server = lane
    server.sendall(answer("first") + answer("second"))
    assert client.receive(2.0).metadata == b"first"
    assert client.answered_within(0)  # the second is buffered, not on the socket
    assert client.receive(2.0).metadata == b"second"
    whole = answer("x" * 200_000)
    for i in range(0, len(whole), 70_000):
        server.sendall(whole[i : i + 70_000])
        time.sleep(0.01)
    assert client.receive(2.0).metadata == b"x" * 200_000


def test_a_closed_lane_is_an_error(lane):
    client, server = lane
    server.sendall(answer("partial")[:7])
    server.close()
    with pytest.raises(ConnectionError, match="closed the direct lane"):
        client.receive(2.0)


def test_responses_run_until_the_node_ends_the_stream(lane):
    """A forward call's client sends its end of requests once, then reads answers until a clean end."""
    client, server = lane
    client.end_requests()
    client.end_requests()
    assert server.recv(4096) == frame(P2P.END_OF_STREAM.SerializeToString(), is_error=True)
    server.sendall(answer("a") + answer("b" * 100_000))
    server.close()
    assert [r.metadata[:1] for r in client.responses(2.0)] == [b"a", b"b"]


def test_a_lane_closed_inside_a_large_answer_is_an_error(lane):
    client, server = lane
    server.sendall(answer("x" * 200_000)[:100_000])
    server.close()
    with pytest.raises(ConnectionError, match="closed the direct lane"):
        list(client.responses(2.0))
