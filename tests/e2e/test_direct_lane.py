"""The direct lane: sessions and forward calls over a node's plain TCP port, beside P2P.

Outputs over the lane equal transformers' (and P2P's); the lane is reached only with a ticket
obtained over P2P; garbage on the port is refused without harm; malformed requests over the lane
get the same refusals as over P2P; a node without a lane, or a lane that cannot be reached, leaves
clients on P2P.
"""

import asyncio
import socket
from functools import partial

import pytest
import torch

from farmesh import DistributedInferenceClient
from farmesh_core.client import mesh as mesh_module
from farmesh_core.client import remote_layers
from farmesh_core.client.direct_lane import DirectConnection, DirectStub
from farmesh_core.client.mesh import MeshConnection
from farmesh_core.wire import DirectHello, chunked_messages, frame
from tests.e2e.test_bad_requests import BAD_INFERENCE, REFUSED, assert_still_serving, forward, inference, span_call
from tests.helpers import PROMPT, hf_greedy_ids, hf_hidden_states, prompt_ids

pytestmark = pytest.mark.timeout(120)

TOKENS = 12


def peer_of(lane_raw: MeshConnection, start: int) -> str:
    (record,) = [r for r in lane_raw.records() if r.start == start]
    return record.peer_id


def test_sessions_use_the_direct_lane_and_match_transformers(lane_client, llama_mesh):
    expected = list(hf_greedy_ids(llama_mesh.model_dir, PROMPT, TOKENS))
    with lane_client.inference_session(64) as session:
        tokens = [
            int(t[0]) for t in lane_client.generate_ids(prompt_ids(llama_mesh.model_dir), TOKENS, session=session)
        ]
        route = session.route
    assert tokens == expected
    assert len(route) == 2
    for hop in route:
        host, port = lane_client.mesh.direct_lane(hop.peer_id)
        assert host == "127.0.0.1" and port > 0
        assert all(r.direct_lane for r in lane_client.mesh.records() if r.peer_id == hop.peer_id)


def test_p2p_only_client_gets_the_same_tokens(llama_mesh):
    with DistributedInferenceClient(llama_mesh.model_dir, llama_mesh.addrs, direct_lane=False) as p2p_client:
        tokens = [int(t[0]) for t in p2p_client.generate_ids(prompt_ids(llama_mesh.model_dir), TOKENS)]
        assert all(p2p_client.mesh.direct_lane(r.peer_id) is None for r in p2p_client.mesh.records())
    assert tokens == list(hf_greedy_ids(llama_mesh.model_dir, PROMPT, TOKENS))


def test_forward_over_the_direct_lane_matches_transformers(lane_client, llama_mesh):
    states = hf_hidden_states(llama_mesh.model_dir, seed=3)
    out = lane_client.layers(states[0])
    torch.testing.assert_close(lane_client.head.final_norm(out), states[-1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("direct_lane", [True, False], ids=["lane", "p2p"])
def test_a_large_forward_and_backward_match_transformers_over_the_lane_and_p2p(llama_mesh, monkeypatch, direct_lane):
    """Remote layers call a node with a lane from the caller's thread (DirectConnection), else over P2P;
    with 100 tokens each message is large (read in place) and both give transformers' outputs."""
    opened = []
    monkeypatch.setattr(remote_layers, "DirectConnection", lambda *a: opened.append(a) or DirectConnection(*a))
    states = hf_hidden_states(llama_mesh.model_dir, seed=5, batch=2, seq=100)
    x = states[0].clone().requires_grad_()
    with DistributedInferenceClient(llama_mesh.model_dir, llama_mesh.addrs, direct_lane=direct_lane) as client:
        out = client.layers(x)
        out.sum().backward()
        torch.testing.assert_close(client.head.final_norm(out), states[-1], rtol=1e-4, atol=1e-4)
    assert x.grad is not None and x.grad.abs().max() > 0
    assert len(opened) == (4 if direct_lane else 0)  # a forward and a backward call on each of 2 nodes


def test_a_forward_whose_lane_is_unreachable_goes_over_p2p(lane_client, llama_mesh, monkeypatch):
    states = hf_hidden_states(llama_mesh.model_dir, seed=3)
    peer = peer_of(lane_client.mesh, 0)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        host, ticket = lane_client.mesh._tickets[peer]
        monkeypatch.setitem(
            lane_client.mesh._tickets, peer, (host, ticket.model_copy(update={"port": closed.getsockname()[1]}))
        )
        out = lane_client.layers(states[0])
    torch.testing.assert_close(lane_client.head.final_norm(out), states[-1], rtol=1e-4, atol=1e-4)
    assert lane_client.mesh.direct_lane(peer) is None  # dropped, retried after LANE_RETRY_AFTER


@pytest.mark.parametrize("case", sorted(BAD_INFERENCE))
def test_malformed_requests_over_the_direct_lane_are_refused(lane_raw, lane_client, llama_mesh, case):
    peer = peer_of(lane_raw, 0)
    assert isinstance(asyncio.run_coroutine_threadsafe(lane_raw.stub(peer), lane_raw.loop.loop).result(10), DirectStub)
    build, error = BAD_INFERENCE[case]
    with pytest.raises(REFUSED, match=error):
        inference(lane_raw, peer, *build())
    assert_still_serving(lane_client, llama_mesh)


def test_honest_forward_call_over_the_direct_lane(lane_raw):
    (response,) = forward(lane_raw, peer_of(lane_raw, 0), *chunked_messages(span_call(), [torch.randn(1, 4, 256)]))
    assert len(response.tensors) == 1 and list(response.tensors[0].size) == [1, 4, 256]


def _lane_exchange(host: str, port: int, payload: bytes) -> bytes:
    """Send ``payload`` on a new connection to the lane; what the node answers before closing."""
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


@pytest.mark.parametrize(
    "payload",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        frame(b"not json"),
        frame(b"\x00" * 5000),  # over the hello's size limit
        b"\x00" + (2**62).to_bytes(8, "big"),  # announces an enormous hello
        frame(
            DirectHello(method="rpc_inference", peer_id="12D3KooWForged", ticket="0" * 64).model_dump_json().encode()
        ),
        b"",
    ],
    ids=["http", "not-json", "oversized", "huge-length", "forged-ticket", "empty"],
)
def test_lane_refuses_connections_without_a_valid_ticket(lane_raw, lane_client, llama_mesh, payload):
    host, port = lane_raw.direct_lane(peer_of(lane_raw, 0))
    assert _lane_exchange(host, port, payload) == b""  # closed without serving anything
    assert_still_serving(lane_client, llama_mesh)


def test_ticket_of_one_peer_does_not_open_the_lane_for_another(lane_raw, lane_client, llama_mesh):
    """A ticket is bound to the peer id it was issued to: claiming another id with it is refused."""
    peer = peer_of(lane_raw, 0)
    host, port = lane_raw.direct_lane(peer)
    ticket = lane_raw.direct_hello(peer, "rpc_inference").ticket
    hello = DirectHello(method="rpc_inference", peer_id=peer, ticket=ticket)  # the node's own id, not ours
    assert _lane_exchange(host, port, frame(hello.model_dump_json().encode())) == b""
    assert_still_serving(lane_client, llama_mesh)


def test_unreachable_lane_falls_back_to_p2p(lane_raw):
    """A lane that refuses connections: the call goes over P2P and the ticket is dropped."""
    peer = peer_of(lane_raw, 0)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: connections are refused
        dropped = []

        async def call():
            p2p_stub = (await lane_raw.stub(peer))._p2p_stub
            stub = DirectStub("127.0.0.1", port, partial(lane_raw.direct_hello, peer), p2p_stub,
                              lambda: dropped.append(True))  # fmt: skip
            responses = await stub.rpc_forward(_requests(chunked_messages(span_call(), [torch.randn(1, 3, 256)])))
            return [r async for r in responses]

        (response,) = lane_raw.loop.run(call())
    assert list(response.tensors[0].size) == [1, 3, 256] and dropped == [True]


@pytest.mark.parametrize("retry_after", [600.0, 0.0])
def test_a_lane_found_unreachable_is_not_tried_again_for_a_while(llama_mesh, monkeypatch, retry_after):
    """After a lane could not be reached, pings do not fetch its ticket again until LANE_RETRY_AFTER."""
    monkeypatch.setattr(mesh_module, "LANE_RETRY_AFTER", retry_after)
    connection = llama_mesh.connection()
    try:
        connection.records(refresh=True)
        peer = peer_of(connection, 0)
        connection.lane_unreachable(peer)
        connection.measure_latencies([peer])  # the first ping, which would fetch the ticket
        assert (connection.direct_lane(peer) is None) == (retry_after > 0)
    finally:
        connection.close()


async def _requests(messages):
    for item in messages:
        yield item


def test_node_without_a_lane_serves_over_p2p(mesh_factory, tiny_llama):
    no_lane = mesh_factory(tiny_llama, "0:8", node_args=("--no-direct-lane",))
    with DistributedInferenceClient(no_lane.model_dir, no_lane.addrs) as client:
        tokens = [int(t[0]) for t in client.generate_ids(prompt_ids(no_lane.model_dir), TOKENS)]
        (record,) = client.mesh.records()
        assert not record.direct_lane and client.mesh.direct_lane(record.peer_id) is None
    assert tokens == list(hf_greedy_ids(no_lane.model_dir, PROMPT, TOKENS))
