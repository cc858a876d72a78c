"""Token loops: in a greedy generation the node with the LM head chooses each token and pushes its
embedding back to the first node, so the generation goes round the nodes (``wire.TokenLoop``).

Tokens equal transformers' (stopping at an EOS, with a minimum length, one node looping to itself, a
generation read in part and then continued in its session), and the nodes really loop: the client
counts the tokens the last node chose and the inputs pushed to the first. Where the last node has no
head, or the client does not loop, the client chooses. Loop requests a node cannot serve are refused
and it keeps serving. A node dying or stalling within a loop: ``test_push.py`` and
``test_failover.py``.
"""

import json
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoModelForCausalLM

from farmesh import DistributedInferenceClient
from farmesh_core.checkpoint_maker import make_checkpoint
from farmesh_core.errors import RequestError
from farmesh_core.wire import InferenceStep, OpenSession, PushTarget, TokenLoop
from tests.e2e.test_bad_requests import assert_still_serving, inference, message
from tests.e2e.test_direct_lane import peer_of
from tests.e2e.test_push import KEY, HandSession
from tests.helpers import PROMPT, hf_greedy_ids, hf_model, prompt_ids

pytestmark = pytest.mark.timeout(180)

TOKENS = 12


@pytest.fixture(scope="module")
def loop_client(llama_mesh):
    """A client of the shared 2-node mesh that loops (as by default)."""
    with DistributedInferenceClient(llama_mesh.model_dir, llama_mesh.addrs, token_loop=True) as client:
        yield client


def generate(client, model_dir: str, tokens: int = TOKENS, **options) -> tuple[list[int], int, int]:
    """The tokens of a greedy generation in a session of its own, with how many the last node chose and
    how many inputs a node got pushed."""
    ids = prompt_ids(model_dir)
    with client.inference_session(ids.shape[1] + tokens) as session:
        steps = client.generate_ids(ids, tokens, session=session, **options)
        return [int(t[0]) for t in steps], session.looped_tokens, session.pushed_inputs


def test_greedy_tokens_go_round_the_nodes(loop_client, llama_mesh):
    expected = list(hf_greedy_ids(llama_mesh.model_dir, PROMPT, TOKENS))
    generate(loop_client, llama_mesh.model_dir)  # the first push of a node opens its link to the next one
    # every token chosen by the second node, and every input pushed: each step's to the second node, and
    # each next token's to the first (not the prompt's, which the client sends)
    assert generate(loop_client, llama_mesh.model_dir) == (expected, TOKENS, 2 * TOKENS - 1)
    heads = {r.start: r.head_dtype for r in loop_client.mesh.records(refresh=True)}
    assert heads == {0: "", 4: "float32"}  # only the node with the last layer announces a head


def test_by_default_greedy_tokens_loop_and_without_loops_the_client_relays_on_its_machine(lane_client, llama_mesh):
    """A default client loops, also through two nodes that share its machine; one with token loops off
    relays each step there (pushes were no quicker on one machine: see ``InferenceSession._pushes``)."""
    expected = list(hf_greedy_ids(llama_mesh.model_dir, PROMPT, TOKENS))
    generate(lane_client, llama_mesh.model_dir)
    assert generate(lane_client, llama_mesh.model_dir) == (expected, TOKENS, 2 * TOKENS - 1)
    with DistributedInferenceClient(llama_mesh.model_dir, llama_mesh.addrs, token_loop=False) as choosing:
        assert generate(choosing, llama_mesh.model_dir) == (expected, 0, 0)


def test_a_session_of_several_sequences_relays_where_its_nodes_share_the_clients_machine(lane_client):
    """No loop can run for several sequences, and without one, relaying through nodes of the client's
    own machine was as quick as pushing or quicker: such a session relays by default, a one-sequence
    session (which may loop) pushes."""
    with lane_client.inference_session(16, batch_size=2) as shared, lane_client.inference_session(16) as alone:
        assert (shared.push, alone.push) == (False, True)


def test_sessions_looping_at_once_each_get_their_own_tokens(loop_client, llama_mesh):
    """Three loops at once through the same nodes (their turns may meet in the nodes' decode batches):
    each session's tokens are its own and transformers'."""
    texts = [PROMPT, "A wrapper around the file object", "Numbers and letters"]
    expected = [list(hf_greedy_ids(llama_mesh.model_dir, text, TOKENS)) for text in texts]

    def loop(text: str) -> tuple[list[int], int]:
        ids = prompt_ids(llama_mesh.model_dir, text)
        with loop_client.inference_session(ids.shape[1] + TOKENS) as session:
            tokens = [int(t[0]) for t in loop_client.generate_ids(ids, TOKENS, session=session)]
            return tokens, session.looped_tokens

    generate(loop_client, llama_mesh.model_dir)  # the push links
    with ThreadPoolExecutor(len(texts)) as pool:
        assert list(pool.map(loop, texts)) == [(tokens, TOKENS) for tokens in expected]


def test_one_node_loops_to_itself(mesh_factory, tiny_llama):
    one = mesh_factory(tiny_llama, "0:8")
    with DistributedInferenceClient(one.model_dir, one.addrs) as client:
        assert generate(client, one.model_dir) == (list(hf_greedy_ids(tiny_llama, PROMPT, TOKENS)), TOKENS, TOKENS - 1)


@pytest.fixture(scope="module")
def eos_llama(tiny_llama, tmp_path_factory) -> tuple[str, int]:
    """The tiny Llama with the EOS id set to the 13th token of its greedy continuation (which no earlier
    token is), so that a generation meets it; returns the checkpoint and that id."""
    reference = list(hf_greedy_ids(tiny_llama, PROMPT, 24))
    index = next(i for i in range(12, 24) if reference[i] not in reference[:i])
    path = tmp_path_factory.mktemp("eos") / "tiny-llama"
    shutil.copytree(tiny_llama, path)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((path / name).read_text())
        config["eos_token_id"] = reference[index]
        (path / name).write_text(json.dumps(config))
    return str(path), reference[index]


@pytest.fixture(scope="module")
def eos_client(mesh_factory, eos_llama):
    mesh = mesh_factory(eos_llama[0], "0:4", "4:8")
    with DistributedInferenceClient(mesh.model_dir, mesh.addrs, token_loop=True) as client:
        generate(client, mesh.model_dir)  # opens the push links
        yield client


@pytest.mark.parametrize("min_new_tokens", [0, 16])
def test_an_eos_and_a_minimum_length_are_transformers(eos_client, eos_llama, min_new_tokens):
    model_dir, eos = eos_llama
    ids = prompt_ids(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, min_new_tokens=min_new_tokens, do_sample=False)
    expected = out[0, ids.shape[1] :].tolist()
    if min_new_tokens:
        assert eos not in expected[:min_new_tokens]  # the minimum length went past it
    else:
        assert expected[-1] == eos and len(expected) < 24  # stopped at it
    tokens, looped, _ = generate(eos_client, model_dir, 24, min_new_tokens=min_new_tokens)
    assert tokens == expected
    assert looped == len(expected)


def test_a_minimum_length_counts_from_the_calls_own_ids_in_a_continued_session(eos_client, eos_llama):
    """The node compares the session's whole length with the mask's end: a second call in a session
    must place it after what the session already holds, as transformers' processor counts its ids."""
    model_dir, eos = eos_llama
    ids = prompt_ids(model_dir)
    with eos_client.inference_session(ids.shape[1] + 40) as session:
        first = [int(t[0]) for t in eos_client.generate_ids(ids, 8, session=session)]
        pending = torch.tensor([first[-1:]])  # the last token chosen was not sent
        second = [int(t[0]) for t in eos_client.generate_ids(pending, 24, session=session, min_new_tokens=10)]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    seen = torch.cat([ids, torch.tensor([first])], dim=1)
    with torch.no_grad():
        out = model.generate(seen, max_new_tokens=24, min_new_tokens=10, do_sample=False)
    assert second == out[0, seen.shape[1] :].tolist()
    reference = list(hf_greedy_ids(model_dir, PROMPT, 24))
    assert eos in reference[8:18]  # unmasked, the second call would have met the EOS within its first 10


def test_a_generation_read_in_part_then_continued_in_its_session_is_transformers(loop_client, llama_mesh):
    """The loop runs on round the nodes after the client stops reading. The session then goes on from
    another token than the one the loop went on with: its steps must replace the loop's, whose answers
    (to the same step numbers, had the client not skipped past them) are stale."""
    ids = prompt_ids(llama_mesh.model_dir)
    with loop_client.inference_session(64) as session:
        steps = loop_client.generate_ids(ids, TOKENS, session=session)
        first = [int(next(steps)[0]) for _ in range(4)]
        steps.close()
        time.sleep(0.2)  # the loop has gone round to its end meanwhile
        other = (first[-1] + 1) % 1024
        rest = [int(t[0]) for t in loop_client.generate_ids(torch.tensor([[other]]), 8, session=session)]
    with torch.no_grad():
        known = torch.cat([ids, torch.tensor([first[:3] + [other]])], dim=1)
        out = hf_model(llama_mesh.model_dir).generate(known, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert rest == out[0, known.shape[1] :].tolist()


def test_a_small_head_larger_than_the_layers_is_kept_and_loops(mesh_factory, tmp_path_factory):
    """By default the last node keeps embeddings and an LM head up to ``HEAD_BYTES_KEPT`` even where
    they outweigh its layers (a 32k vocabulary: 64 MB against 13 MB), and the loop chooses from that
    head's quick logits: the tokens stay transformers', of one loop and of several at once."""
    model_dir = make_checkpoint(str(tmp_path_factory.mktemp("llama-vocab32k")), seed=5, vocab_size=32000)
    mesh = mesh_factory(model_dir, "0:4", "4:8")
    expected = list(hf_greedy_ids(model_dir, PROMPT, TOKENS))
    with DistributedInferenceClient(mesh.model_dir, mesh.addrs) as client:
        generate(client, model_dir)
        assert generate(client, model_dir) == (expected, TOKENS, 2 * TOKENS - 1)
        assert {r.start: r.head_dtype for r in client.mesh.records(refresh=True)} == {0: "", 4: "float32"}
        # loops at once: turns that meet in a decode batch take one pass through the quick logits
        texts = [PROMPT, "A wrapper around the file object", "Numbers and letters", "Return the value"]
        wanted = [(list(hf_greedy_ids(model_dir, text, TOKENS)), TOKENS) for text in texts]

        def loop(text: str) -> tuple[list[int], int]:
            ids = prompt_ids(model_dir, text)
            with client.inference_session(ids.shape[1] + TOKENS) as session:
                return [int(t[0]) for t in client.generate_ids(ids, TOKENS, session=session)], session.looped_tokens

        with ThreadPoolExecutor(len(texts)) as pool:
            assert list(pool.map(loop, texts)) == wanted


def test_without_a_head_on_the_last_node_or_a_loop_the_client_chooses(mesh_factory, tiny_llama, llama_mesh):
    expected = list(hf_greedy_ids(tiny_llama, PROMPT, TOKENS))
    headless = mesh_factory(tiny_llama, "0:4", "4:8", node_args=("--no-serve-head",))
    with DistributedInferenceClient(headless.model_dir, headless.addrs, token_loop=True) as client:
        generate(client, tiny_llama)
        assert generate(client, tiny_llama) == (expected, 0, TOKENS)
        assert {r.head_dtype for r in client.mesh.records()} == {""}
    with DistributedInferenceClient(llama_mesh.model_dir, llama_mesh.addrs, push=True, token_loop=False) as client:
        generate(client, tiny_llama)
        assert generate(client, tiny_llama) == (expected, 0, TOKENS)


def test_a_loop_asked_by_hand_goes_round_as_often_as_asked(lane_raw):
    """A loop through the one node of a ring: it pushes each token's embedding to itself, answers each
    step with its token, and stops after the tokens asked for."""
    hand = HandSession(lane_raw)
    try:
        assert hand.answer()[0].step == 1
        ring = [PushTarget(peer_id=hand.peer, session_id=hand.session_id, key=KEY, step=3)]
        hand.send(InferenceStep(position=4, step=2, loop=TokenLoop(ring=ring, tokens=3)), torch.randn(1, 1, 256))
        replies = [hand.answer()[0] for _ in range(3)]
        assert [r.step for r in replies] == [2, 3, 4]
        assert [r.pushed for r in replies] == [True, True, False]
        assert all(isinstance(r.token, int) and 0 <= r.token < 1024 for r in replies)
        assert not hand.stream.answered_within(0.3)  # nothing after the last token asked for
    finally:
        hand.close()


def opening(start: int, end: int, batch_size: int = 1, push_key: str | None = KEY) -> InferenceStep:
    """A session opened ahead of its first step (no hidden states, no answer)."""
    opened = OpenSession(
        session_id=uuid.uuid4().hex, start=start, end=end, max_length=64, batch_size=batch_size, alloc_timeout=10.0,
        push_key=push_key,
    )  # fmt: skip
    return InferenceStep(position=0, open=opened)


def loop_step(peer: str) -> InferenceStep:
    ring = [PushTarget(peer_id=peer, session_id="s", key=KEY, step=2)]
    return InferenceStep(position=0, step=1, loop=TokenLoop(ring=ring, tokens=4))


@pytest.mark.parametrize(
    "start, end, batch, push_key, refusal",
    [
        (0, 4, 1, KEY, "chooses no tokens"),  # the first node has no head
        (4, 6, 1, KEY, "chooses no tokens"),  # the session ends before the model's last layer
        (4, 8, 2, KEY, "chooses no tokens"),  # two sequences
        (4, 8, 1, None, "only a push session"),
    ],
    ids=["no-head", "not-the-last-layer", "two-rows", "not-a-push-session"],
)
def test_a_loop_the_node_cannot_run_is_refused_and_it_keeps_serving(
    lane_raw, lane_client, llama_mesh, start, end, batch, push_key, refusal
):  # fmt: skip
    peer = peer_of(lane_raw, start)
    with pytest.raises(RequestError, match=refusal):
        inference(
            lane_raw,
            peer,
            message(opening(start, end, batch, push_key)),
            message(loop_step(peer), torch.randn(batch, 2, 256)),
        )
    assert_still_serving(lane_client, llama_mesh)


@pytest.mark.parametrize(
    "loop",
    [{"ring": [], "tokens": 2}, {"ring": None, "tokens": 0}, {"tokens": 2, "eos_token_ids": [-1]}],
    ids=["empty-ring", "no-tokens", "negative-eos"],
)
def test_a_malformed_loop_is_refused(lane_raw, lane_client, llama_mesh, loop):
    peer = peer_of(lane_raw, 4)
    target = {"peer_id": peer, "session_id": "s", "key": KEY, "step": 3}
    loop = {**loop, "ring": [target] if loop.get("ring") is None else loop["ring"]}
    raw = json.dumps({"position": 0, "step": 1, "loop": loop}).encode()
    with pytest.raises(RequestError, match="loop"):
        inference(lane_raw, peer, message(opening(4, 8)), message(raw, torch.randn(1, 2, 256)))
    assert_still_serving(lane_client, llama_mesh)
