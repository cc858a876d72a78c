"""Node-to-node push: in a session each node sends its output straight to the next node of the chain.

Tokens equal transformers' with push on and off, and pushes really happen (the client counts the
inputs a node got from the previous one). A node dying mid-generation, first or second in the chain,
costs a replay, never the answer. Bad pushes (wrong key, unknown session, stale steps, garbage) are
dropped or refused without harm to the session or the node.
"""

import socket
import time
import uuid

import pytest
import torch
from hivemind.proto import runtime_pb2

from farmesh import DistributedInferenceClient
from farmesh_core.client.direct_lane import DirectConnection
from farmesh_core.errors import RequestError
from farmesh_core.launch import kill_process_group
from farmesh_core.tensor_message import LARGE_BYTES
from farmesh_core.wire import (
    InferenceStep,
    OpenSession,
    PushedStep,
    PushTarget,
    encode_meta,
    frame,
    serialize_tensor,
    step_reply,
)
from tests.e2e.test_bad_requests import assert_still_serving
from tests.e2e.test_direct_lane import peer_of
from tests.helpers import HIDDEN_SIZE, PROMPT, hf_greedy_ids, hf_model, nodes_by_peer, prompt_ids

pytestmark = pytest.mark.timeout(180)

TOKENS = 12
KEY = "k" * 32


def generate(lane_client, llama_mesh, tokens: int = TOKENS) -> tuple[list[int], int]:
    with lane_client.inference_session(64) as session:
        ids = [int(t[0]) for t in lane_client.generate_ids(prompt_ids(llama_mesh.model_dir), tokens, session=session)]
        return ids, session.pushed_inputs


def test_pushed_and_relayed_sessions_match_transformers(llama_mesh):
    """Without token loops (``test_token_loop.py``), so that the client sends every step to the first node;
    pushes asked for (without loops, a client relays through several nodes of its own machine)."""
    expected = list(hf_greedy_ids(llama_mesh.model_dir, PROMPT, TOKENS))
    with DistributedInferenceClient(llama_mesh.model_dir, llama_mesh.addrs, push=True, token_loop=False) as pushing:
        generate(pushing, llama_mesh)  # the first push request of a node opens its link to the next one
        tokens, pushed = generate(pushing, llama_mesh)
    assert tokens == expected
    assert pushed == TOKENS  # every step, the prompt's too: the client opened the second node's session ahead
    with DistributedInferenceClient(llama_mesh.model_dir, llama_mesh.addrs, push=False) as relaying:
        assert generate(relaying, llama_mesh) == (expected, 0)


LONG_PROMPT = " ".join([PROMPT] * 24)


@pytest.mark.parametrize("push", [True, False], ids=["pushed", "relayed"])
def test_a_prompt_of_large_messages_gives_transformers_tokens(lane_client, llama_mesh, push):
    """A prompt whose hidden states fill LARGE_BYTES or more: the client's step, each node's answer and
    the push all travel as TensorMessages, read in place by the node, the next node and the client."""
    ids = prompt_ids(llama_mesh.model_dir, LONG_PROMPT)
    assert ids.shape[1] * HIDDEN_SIZE * 4 >= LARGE_BYTES
    expected = list(hf_greedy_ids(llama_mesh.model_dir, LONG_PROMPT, TOKENS))
    options = dict(push=push, token_loop=False)  # (every step from the client: its first carries the prompt)
    with DistributedInferenceClient(llama_mesh.model_dir, llama_mesh.addrs, **options) as client:
        for _ in range(2):  # the first push request of a node opens its link to the next one
            with client.inference_session(ids.shape[1] + TOKENS) as session:
                tokens = [int(t[0]) for t in client.generate_ids(ids, TOKENS, session=session)]
        assert tokens == expected
        assert session.pushed_inputs == (TOKENS if push else 0)


def test_each_node_of_a_longer_chain_pushes_to_the_next(mesh_factory, tiny_llama):
    three = mesh_factory(tiny_llama, "0:3", "3:6", "6:8")
    with DistributedInferenceClient(three.model_dir, three.addrs, push=True, token_loop=False) as client:
        generate(client, three)  # opens the links
        tokens, pushed = generate(client, three)
    assert tokens == list(hf_greedy_ids(tiny_llama, PROMPT, TOKENS))
    assert pushed == 2 * TOKENS  # both hops of every step, each from the client (no token loop)


# ---- a session opened by hand on the second node, with pushes made by hand -----------------------
class HandSession:
    """A push session on the node serving 4:8, over its direct lane, and a push link to that node."""

    def __init__(self, lane_raw, push_key: str | None = KEY, ahead: bool = False, session_id: str | None = None):
        """Opens the session with a 4-token first step (number 1), or with no step at all (``ahead``)."""
        self.peer = peer_of(lane_raw, 4)
        self.host, self.port = lane_raw.direct_lane(self.peer)
        self.stream = DirectConnection(self.host, self.port, lane_raw.direct_hello(self.peer, "rpc_inference"))
        self.session_id = session_id or uuid.uuid4().hex
        opened = OpenSession(
            session_id=self.session_id, start=4, end=8, max_length=64, batch_size=1, alloc_timeout=10.0,
            push_key=push_key,
        )  # fmt: skip
        self.hello = lane_raw.direct_hello(self.peer, "rpc_push")
        if ahead:
            self.stream.send(
                runtime_pb2.ExpertRequest(metadata=encode_meta(InferenceStep(position=0, open=opened))), 10
            )
        else:
            self.send(InferenceStep(position=0, step=1, open=opened), torch.randn(1, 4, 256))

    def send(self, meta: InferenceStep, hidden: torch.Tensor) -> None:
        request = runtime_pb2.ExpertRequest(tensors=[serialize_tensor(hidden)], metadata=encode_meta(meta))
        self.stream.send(request, 10)

    def answer(self, timeout: float = 10):
        response = self.stream.receive(timeout)
        return step_reply(response, self.peer), response

    def link(self) -> socket.socket:
        return push_link(self.host, self.port, self.hello)

    def close(self) -> None:
        self.stream.close()


def push_link(host: str, port: int, hello) -> socket.socket:
    """A push link to a node's direct lane, as another node would open it."""
    sock = socket.create_connection((host, port), timeout=10)
    sock.sendall(frame(encode_meta(hello)))
    return sock


def early_link(lane_raw) -> socket.socket:
    """A push link to the node serving 4:8, opened before any session it pushes to."""
    peer = peer_of(lane_raw, 4)
    return push_link(*lane_raw.direct_lane(peer), lane_raw.direct_hello(peer, "rpc_push"))


def pushed(session_id: str, key: str, position: int, step: int, hidden: torch.Tensor | None = None) -> bytes:
    hidden = torch.randn(1, 1, 256) if hidden is None else hidden
    meta = PushedStep(session_id=session_id, key=key, position=position, step=step)
    return frame(
        runtime_pb2.ExpertRequest(tensors=[serialize_tensor(hidden)], metadata=encode_meta(meta)).SerializeToString()
    )


def closed_by_node(sock: socket.socket, timeout: float = 10) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def hand(lane_raw):
    session = HandSession(lane_raw)
    reply, _ = session.answer()
    assert reply is not None and reply.step == 1 and not reply.pushed
    yield session
    session.close()


def test_a_pushed_input_is_answered_on_the_clients_stream(hand):
    with hand.link() as link:
        link.sendall(pushed(hand.session_id, KEY, position=4, step=2))
        reply, response = hand.answer()
        assert reply.step == 2 and len(response.tensors) == 1 and list(response.tensors[0].size) == [1, 1, 256]
        hand.send(InferenceStep(position=5, step=3), torch.randn(1, 1, 256))  # the client goes on directly
        assert hand.answer()[0].step == 3


def test_stale_and_misaddressed_pushes_are_dropped_and_the_link_stays(hand):
    with hand.link() as link:
        link.sendall(pushed(hand.session_id, KEY, position=4, step=2))
        assert hand.answer()[0].step == 2
        link.sendall(pushed(hand.session_id, KEY, position=4, step=2))  # stale: already answered
        link.sendall(pushed(uuid.uuid4().hex, KEY, position=0, step=7))  # no such session (held, never opens)
        link.sendall(pushed(hand.session_id, KEY, position=5, step=3))
        assert hand.answer()[0].step == 3  # the next answer is the new push's; nothing came of the others


@pytest.mark.parametrize(
    "payload",
    [
        pushed("whatever", "w" * 32, 0, 1)[:5] + b"\xff" * 64,  # broken framing
        frame(b"not a protobuf \xff\xff"),
        frame(runtime_pb2.ExpertRequest(metadata=b'{"position": 1}').SerializeToString()),  # not a PushedStep
    ],
    ids=["framing", "garbage", "not-a-push"],
)
def test_garbage_on_a_push_link_closes_it_and_the_session_goes_on(hand, payload, lane_client, llama_mesh):
    with hand.link() as link:
        link.sendall(payload)
        assert closed_by_node(link)
    hand.send(InferenceStep(position=4, step=2), torch.randn(1, 1, 256))
    assert hand.answer()[0].step == 2
    assert_still_serving(lane_client, llama_mesh)


def test_a_push_with_the_wrong_key_closes_the_link_and_changes_nothing(hand):
    with hand.link() as link:
        link.sendall(pushed(hand.session_id, "x" * 32, position=4, step=2))
        assert closed_by_node(link)
    hand.send(InferenceStep(position=4, step=2), torch.randn(1, 1, 256))
    assert hand.answer()[0].step == 2  # the wrong-key push was never computed


def test_a_client_step_number_that_does_not_grow_is_refused(hand):
    hand.send(InferenceStep(position=4, step=1), torch.randn(1, 1, 256))
    with pytest.raises(RequestError, match="numbers must grow"):
        hand.answer()


def test_only_push_sessions_may_ask_for_a_push(lane_raw):
    session = HandSession(lane_raw, push_key=None)
    try:
        response = session.stream.receive(10)
        assert step_reply(response, session.peer) is None  # not a push session: plain answers
        target = PushTarget(peer_id=session.peer, session_id="s", key=KEY, step=1)
        session.send(InferenceStep(position=4, push=[target]), torch.randn(1, 1, 256))
        with pytest.raises(RequestError, match="only a push session"):
            session.answer()
    finally:
        session.close()


def test_a_session_id_in_use_is_refused(lane_raw, hand):
    twin = DirectConnection(hand.host, hand.port, lane_raw.direct_hello(hand.peer, "rpc_inference"))
    try:
        opened = OpenSession(session_id=hand.session_id, start=4, end=8, max_length=64, batch_size=1, push_key=KEY)
        meta = InferenceStep(position=0, step=1, open=opened)
        twin.send(runtime_pb2.ExpertRequest(tensors=[serialize_tensor(torch.randn(1, 2, 256))],
                                            metadata=encode_meta(meta)), 10)  # fmt: skip
        with pytest.raises(RequestError, match="in use"):
            step_reply(twin.receive(10), hand.peer)
    finally:
        twin.close()
    hand.send(InferenceStep(position=4, step=2), torch.randn(1, 1, 256))
    assert hand.answer()[0].step == 2  # the first session is untouched


# ---- failover with push --------------------------------------------------------------------------
NEW_TOKENS, KILL_AFTER = 64, 16


@pytest.fixture(scope="module")
def spare_mesh(tiny_llama, tmp_path_factory):
    """Nodes 0:4, 0:4, 4:8 and 4:8: either node of a chain has a spare; yields (addrs, {peer_id: process})."""
    with nodes_by_peer(tiny_llama, ["0:4", "0:4", "4:8", "4:8"], tmp_path_factory.mktemp("push-failover")) as mesh:
        yield mesh


@pytest.fixture(scope="module")
def reference(tiny_llama) -> list[int]:
    """transformers' greedy continuation of the prompt, NEW_TOKENS long (no stop at EOS)."""
    ids = prompt_ids(tiny_llama)
    with torch.no_grad():
        out = hf_model(tiny_llama).generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("victim_start", [0, 4], ids=["first-node", "second-node"])
def test_a_node_killed_mid_generation_costs_a_replay_not_the_answer(spare_mesh, tiny_llama, reference, victim_start):
    addrs, procs = spare_mesh
    input_ids = prompt_ids(tiny_llama)
    with DistributedInferenceClient(tiny_llama, addrs, token_loop=True) as client:
        tokens = []
        with client.inference_session(input_ids.shape[1] + NEW_TOKENS) as session:
            victim = next(hop.peer_id for hop in session.route if hop.start == victim_start)
            for token in client.generate_ids(input_ids, NEW_TOKENS, session=session, min_new_tokens=NEW_TOKENS):
                tokens.append(int(token[0]))
                if len(tokens) == KILL_AFTER:
                    pushes_before = session.pushed_inputs
                    kill_process_group(procs[victim])
                    time.sleep(0.05)  # the node is gone before the next step
            assert victim not in [hop.peer_id for hop in session.route]
            assert len(session.recoveries) == 1
            assert session.pushed_inputs > pushes_before  # the new chain pushes too
            assert session.looped_tokens == NEW_TOKENS  # and loops: the second node chose every token
    assert pushes_before > 0
    assert tokens == reference


# ---- sessions opened ahead of their first step ------------------------------------------------------
def test_a_push_that_comes_before_its_session_opens_is_answered_once_it_opens(lane_raw):
    session_id = uuid.uuid4().hex
    with early_link(lane_raw) as link:
        link.sendall(pushed(session_id, KEY, position=0, step=1, hidden=torch.randn(1, 4, 256)))
        time.sleep(0.2)  # the push is in before the session opens
        session = HandSession(lane_raw, ahead=True, session_id=session_id)
        try:
            reply, response = session.answer()
            assert reply.step == 1 and list(response.tensors[0].size) == [1, 4, 256]
            session.send(InferenceStep(position=4, step=2), torch.randn(1, 1, 256))  # the client goes on
            assert session.answer()[0].step == 2
        finally:
            session.close()


def test_an_early_push_with_another_key_is_dropped_when_the_session_opens(lane_raw):
    session_id = uuid.uuid4().hex
    with early_link(lane_raw) as link:
        link.sendall(pushed(session_id, "x" * 32, position=0, step=1, hidden=torch.randn(1, 4, 256)))
        time.sleep(0.2)
        session = HandSession(lane_raw, ahead=True, session_id=session_id)
        try:
            session.send(InferenceStep(position=0, step=1), torch.randn(1, 2, 256))  # the client sends it
            reply, response = session.answer()
            assert reply.step == 1 and list(response.tensors[0].size) == [1, 2, 256]  # not the pushed [1, 4]
        finally:
            session.close()


@pytest.mark.parametrize("push_key", [KEY, None], ids=["push", "plain"])
def test_a_session_opened_ahead_takes_its_first_step_from_the_client(lane_raw, push_key):
    session = HandSession(lane_raw, push_key=push_key, ahead=True)
    try:
        assert not session.stream.answered_within(0.3)  # opening ahead is not answered
        session.send(InferenceStep(position=0, step=1 if push_key else 0), torch.randn(1, 3, 256))
        response = session.stream.receive(10)
        assert list(response.tensors[0].size) == [1, 3, 256]
        empty = runtime_pb2.ExpertRequest(metadata=encode_meta(InferenceStep(position=3, step=2 if push_key else 0)))
        session.stream.send(empty, 10)  # only the opening message may come without hidden states
        with pytest.raises(RequestError, match="exactly one tensor"):
            step_reply(session.stream.receive(10), session.peer)
    finally:
        session.close()
