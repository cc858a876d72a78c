"""Failover: a node dying or stalling mid-generation costs a short pause, never the answer."""

import os
import signal
import time
from contextlib import contextmanager

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from farmesh_core.client import DistributedInferenceClient
from farmesh_core.client.causal_lm import DistributedModelForCausalLM
from farmesh_core.errors import NoRouteError
from farmesh_core.launch import kill_process_group
from tests.helpers import nodes_by_peer

NEW_TOKENS, KILL_AFTER = 64, 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from farmesh_core.checkpoint_maker import make_checkpoint

    return make_checkpoint(str(tmp_path_factory.mktemp("failover") / "tiny-llama"))


@pytest.fixture
def mesh(model_dir, tmp_path):
    """A DHT and three Far Nodes: 0:4, 4:8 and a spare 4:8; yields (addrs, {peer_id: process})."""
    with nodes_by_peer(model_dir, ["0:4", "4:8", "4:8"], tmp_path) as mesh:
        yield mesh


@pytest.fixture(scope="module")
def reference(model_dir):
    """Prompt ids and the greedy continuation of plain transformers."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    input_ids = torch.randint(3, 1024, (1, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model.generate(input_ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return input_ids, out[0, input_ids.shape[1] :].tolist()


def generate_with_fault(client, input_ids, procs, fault, after_recovery=None) -> tuple[list[int], float, list[float]]:
    """Generate, applying ``fault`` to the process of the 4:8 node in use after KILL_AFTER tokens, and
    ``after_recovery`` (if given) to it at the first token after the session replaced it.

    Returns the tokens, the longest gap between two tokens after the fault, and the session's recoveries.
    """
    tokens, times = [], []
    with client.inference_session(input_ids.shape[1] + NEW_TOKENS) as session:
        victim = next(hop.peer_id for hop in session.route if hop.start == 4)
        for token in client.generate_ids(input_ids, NEW_TOKENS, session=session, min_new_tokens=NEW_TOKENS):
            tokens.append(int(token[0]))
            times.append(time.perf_counter())
            if len(tokens) == KILL_AFTER:
                fault(procs[victim])
            if after_recovery is not None and session.recoveries:
                after_recovery(procs[victim])
                after_recovery = None
        assert victim not in [hop.peer_id for hop in session.route], "the failed node is still in the chain"
        recoveries = session.recoveries
    pause = max(b - a for a, b in zip(times[KILL_AFTER - 1 :], times[KILL_AFTER:], strict=False))
    return tokens, pause, recoveries


@contextmanager
def stalls():
    """``stall(proc)`` (SIGSTOP) and ``wake(proc)`` (SIGCONT); whatever is still stopped wakes at the end."""
    stopped = []

    def stall(proc):
        os.kill(proc.pid, signal.SIGSTOP)
        stopped.append(proc)

    def wake(proc):
        os.kill(proc.pid, signal.SIGCONT)
        stopped.remove(proc)

    try:
        yield stall, wake
    finally:
        for proc in stopped:
            os.kill(proc.pid, signal.SIGCONT)


@pytest.mark.timeout(300)
def test_sigkill_of_a_node_in_use_keeps_the_answer(mesh, model_dir, reference):
    addrs, procs = mesh
    input_ids, expected = reference
    with DistributedInferenceClient(model_dir, addrs) as client:
        tokens, pause, recoveries = generate_with_fault(client, input_ids, procs, kill_process_group)
    print(f"\nSIGKILL: pause after the kill {pause * 1000:.0f} ms, recovery {recoveries}")
    assert tokens == expected
    assert len(recoveries) == 1
    assert pause < 5.0


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "options",
    [{}, {"push": True, "token_loop": False}, {"token_loop": True}],
    ids=["relayed", "pushed", "token-loop"],
)
def test_a_stalled_node_is_replaced_after_the_step_timeout(mesh, model_dir, reference, options):
    """By default the client relays each step here (its nodes all run on its machine); with pushes it waits
    for an answer to a step the first node pushed; in a token loop, to a turn it did not send."""
    addrs, procs = mesh
    input_ids, expected = reference
    with stalls() as (stall, _), DistributedInferenceClient(model_dir, addrs, step_timeout=2.0, **options) as client:
        tokens, pause, recoveries = generate_with_fault(client, input_ids, procs, stall)
    print(f"\nSIGSTOP: pause after the stall {pause * 1000:.0f} ms")
    assert tokens == expected
    assert 2.0 <= pause < 10.0


@pytest.mark.timeout(300)
def test_a_stalled_node_waking_after_its_replacement_changes_nothing(mesh, model_dir, reference):
    """The stalled node of a token loop wakes while the generation goes on without it, with the turn it
    was given still to run: the token it then chooses and pushes round must be stale to every node."""
    addrs, procs = mesh
    input_ids, expected = reference

    def wake_then_wait(proc):
        wake(proc)
        time.sleep(0.2)  # its turn runs and goes round before the client's next step

    with (
        stalls() as (stall, wake),
        DistributedInferenceClient(model_dir, addrs, step_timeout=2.0, token_loop=True) as client,
    ):
        tokens, _, recoveries = generate_with_fault(client, input_ids, procs, stall, after_recovery=wake_then_wait)
    assert tokens == expected
    assert len(recoveries) == 1


@pytest.mark.timeout(300)
def test_forward_and_backward_survive_a_dead_node(mesh, model_dir):
    addrs, procs = mesh
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with DistributedInferenceClient(model_dir, addrs, routing="fewest-hops") as client:
        x = torch.randn(2, 8, 256, requires_grad=True)
        client.layers(x).sum().backward()
        for peer_id, proc in procs.items():
            if any(r.peer_id == peer_id and r.start == 4 for r in client.mesh.records()):
                kill_process_group(proc)
                break
        x2 = x.detach().clone().requires_grad_(True)
        out = client.layers(x2)
        out.sum().backward()
    x3 = x.detach().clone().requires_grad_(True)
    hidden, positions = x3, torch.arange(8)[None]
    embeddings = model.model.rotary_emb(hidden, positions)
    for layer in model.model.layers:
        hidden = layer(hidden, position_ids=positions, position_embeddings=embeddings)
    hidden.sum().backward()
    assert torch.allclose(out, hidden, atol=1e-5)
    assert torch.allclose(x2.grad, x3.grad, atol=1e-4)
    assert torch.allclose(x.grad, x3.grad, atol=1e-4)


@pytest.mark.timeout(300)
def test_no_replacement_gives_an_error_naming_the_layers(mesh, model_dir, reference):
    addrs, procs = mesh
    input_ids, _ = reference
    with DistributedInferenceClient(model_dir, addrs, max_retries=1) as client:
        first = next(peer for peer, _ in procs.items() if any(
            r.peer_id == peer and r.start == 0 for r in client.mesh.records()))  # fmt: skip
        kill_process_group(procs[first])
        with pytest.raises(NoRouteError, match=r"0-3"):
            list(client.generate_ids(input_ids, 4))


class _AfterTokens(BaseStreamer):
    """Calls ``fault()`` once ``tokens`` new tokens have come (transformers streams the prompt first)."""

    def __init__(self, tokens: int, fault):
        self.left, self.fault, self.prompt_seen = tokens, fault, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.left -= value.numel()
        if self.left <= 0 and self.fault is not None:
            self.fault, fault = None, self.fault
            fault()

    def end(self) -> None:
        pass


@pytest.mark.timeout(300)
def test_a_node_replaced_after_rejected_drafts_is_replayed_only_the_kept_tokens(mesh, model_dir):
    """Prompt lookup (transformers' assisted decoding) with the 4:8 node killed mid-generation: its
    replacement is replayed the session's tokens up to where it rewound, not the drafts it rejected,
    so the answer stays transformers'."""
    addrs, procs = mesh
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12] * 3])  # prompt lookup drafts from it
    options = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, prompt_lookup_num_tokens=4)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = reference.generate(input_ids, **options)
    with DistributedModelForCausalLM.from_pretrained(model_dir, dht_bootstrap=addrs) as model:
        # (room for the last check's drafts too: prompt lookup may draft past the last token)
        with model.inference_session(input_ids.shape[1] + NEW_TOKENS + 4) as session:
            victim = next(hop.peer_id for hop in session.route if hop.start == 4)
            kill = _AfterTokens(KILL_AFTER, lambda: kill_process_group(procs[victim]))
            out = model.generate(input_ids, streamer=kill, **options)
            assert len(session.recoveries) == 1
    assert torch.equal(out, expected)
