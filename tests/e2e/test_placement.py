"""Automatic layer placement and rebalancing with real processes: ``farmesh node --num-layers N``
picks where the mesh needs it, and moves later without dropping the session it serves."""

import re
import time

import pytest
import torch

from farmesh_core.checkpoint_maker import make_checkpoint
from farmesh_core.client import DistributedInferenceClient
from farmesh_core.client.session import InferenceSession
from farmesh_core.launch import stop_process, wait_for_layers
from tests.helpers import PROMPT, hf_greedy_text, hf_hidden_states
from tests.preloaded import spawn_dht, spawn_node

PREFILL, LENGTH = 8, 16

SERVES = re.compile(r"Far Node (\S+) serves layers (\d+):(\d+)")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("placement") / "tiny-llama"))


@pytest.fixture
def processes():
    """Processes a test starts (appended to the list); stopped by PID at the end, nodes first."""
    procs = []
    yield procs
    for proc in reversed(procs):
        stop_process(proc)


def wait_for_log(path, pattern: re.Pattern, proc, count: int = 1, timeout: float = 120.0) -> list[re.Match]:
    """The first ``count`` matches of ``pattern`` in the log at ``path``, waiting for them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        found = list(pattern.finditer(text))
        if len(found) >= count:
            return found[:count]
        assert proc.poll() is None, f"the node exited with code {proc.returncode}:\n{text[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"{pattern.pattern!r} x{count} not in {path} within {timeout} s:\n{text[-3000:]}")


def local_steps(model_dir: str, inputs: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Layers ``start:end`` run here the way a session runs them: a prefill, then one token at a time,
    on one torch thread as a node runs short steps. (The prefill/decode split rounds differently from
    transformers' one full forward: ~1e-4 on hidden states of magnitude ~40; so do 2 threads: ~2e-5.)"""
    from farmesh_core.architecture import adapter_for
    from farmesh_core.checkpoint import Checkpoint
    from farmesh_core.node.kv_cache import SessionCache
    from farmesh_core.node.layer_span import LayerSpan

    checkpoint = Checkpoint(model_dir)
    span = LayerSpan(checkpoint, adapter_for(checkpoint.config), start, end, torch.float32, "cpu")
    cache = SessionCache(inputs.shape[1])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        outputs = [span.forward(inputs[:, :PREFILL], start, end, cache, 0)]
        for position in range(PREFILL, inputs.shape[1]):
            outputs.append(span.forward(inputs[:, position : position + 1], start, end, cache, position))
    finally:
        torch.set_num_threads(threads)
    return torch.cat(outputs, dim=1)


def start_node(procs, model_dir, addrs, log, *args) -> tuple[str, tuple[int, int]]:
    """Start ``farmesh node`` and wait until it serves; returns its peer id and its layers."""
    procs.append(spawn_node(model_dir, addrs, *args, log_path=str(log)))
    (match,) = wait_for_log(log, SERVES, procs[-1])
    return match[1], (int(match[2]), int(match[3]))


@pytest.mark.timeout(300)
def test_num_layers_fills_the_gap_then_the_least_served_layers(model_dir, tmp_path, processes):
    """A serves 0:4; B (``--num-layers 4``) takes the missing 4:8; C takes the half whose nodes
    announce the lower throughput (ties: the first half)."""
    dht, addrs = spawn_dht()
    processes.append(dht)
    start_node(processes, model_dir, addrs, tmp_path / "a.log", "--layers", "0:4")
    _, b_layers = start_node(processes, model_dir, addrs, tmp_path / "b.log", "--num-layers", "4")
    assert b_layers == (4, 8)

    wait_for_layers(model_dir, addrs, num_nodes=2, procs=processes[1:])
    with DistributedInferenceClient(model_dir, addrs) as client:
        throughput = {(r.start, r.end): r.throughput for r in client.mesh.records(refresh=True)}
    least_served = (0, 4) if throughput[0, 4] <= throughput[4, 8] else (4, 8)
    _, c_layers = start_node(
        processes, model_dir, addrs, tmp_path / "c.log", "--num-layers", "4", "--rebalance-period", "0"
    )
    assert c_layers == least_served, f"announced throughputs: {throughput}"


@pytest.mark.timeout(300)
def test_a_node_moves_to_missing_layers_and_finishes_its_session_first(model_dir, tmp_path, processes):
    """B (``--num-layers 4``, rebalancing every ~2 s) starts alone on 0:4 and a session opens on it;
    A joins on 0:4 too, so B moves to the missing 4:8. The open session finishes on B's old layers
    with the right hidden states, B releases them only after it ends, and then the mesh generates
    transformers' greedy text."""
    dht, addrs = spawn_dht()
    processes.append(dht)
    b_log = tmp_path / "b.log"
    b_args = ("--num-layers", "4", "--rebalance-period", "2", "--step-timeout", "120")
    b_id, b_layers = start_node(processes, model_dir, addrs, b_log, *b_args)
    assert b_layers == (0, 4)
    b = processes[-1]

    inputs = hf_hidden_states(model_dir, seq=LENGTH)[0]  # a random input [2, 16, hidden]
    with DistributedInferenceClient(model_dir, addrs) as client:
        with InferenceSession(client.mesh, 0, 4, max_length=LENGTH, batch_size=2) as session:
            assert [hop.peer_id for hop in session.route] == [b_id]
            outputs = [session.step(inputs[:, :PREFILL])]  # on B's layers 0:4

            a_log = tmp_path / "a.log"
            processes.append(spawn_node(model_dir, addrs, "--layers", "0:4", log_path=str(a_log)))
            wait_for_log(a_log, SERVES, processes[-1])
            wait_for_log(b_log, re.compile(r"Moving from layers 0:4 to 4:8"), b, timeout=60)
            moved = wait_for_log(b_log, SERVES, b, count=2)[1]
            assert (moved[1], moved[2], moved[3]) == (b_id, "4", "8")
            time.sleep(3)  # an idle session keeps the old layers (B holds them at least 1 s after any move)
            assert "Released layers 0:4" not in b_log.read_text(), "B dropped layers a session was using"

            for position in range(PREFILL, LENGTH):  # decoding continues on the layers B no longer announces
                outputs.append(session.step(inputs[:, position : position + 1]))
            assert "Released layers 0:4" not in b_log.read_text(), "B dropped layers a session was using"
        expected = local_steps(model_dir, inputs, 0, 4)
        # (the session's one-token steps of 2 rows multiply through the node's packed weights, as decode
        # batches do: sums in another order than transformers' batch, 6e-5 apart here; wrong layers: ~1)
        torch.testing.assert_close(torch.cat(outputs, dim=1), expected, atol=2e-4, rtol=1e-4)
        wait_for_log(b_log, re.compile(r"Released layers 0:4"), b, timeout=30)

        wait_for_layers(model_dir, addrs, num_nodes=2, procs=processes[1:])
        records = client.mesh.records(refresh=True)
        assert sorted((r.start, r.end, r.peer_id == b_id) for r in records) == [(0, 4, False), (4, 8, True)]
        assert {r.start: r.head_dtype for r in records} == {0: "", 4: "float32"}  # B loaded a head as it moved
        assert client.generate(PROMPT, max_tokens=32) == hf_greedy_text(model_dir, PROMPT, 32)
    with DistributedInferenceClient(model_dir, addrs, token_loop=True) as looping:
        assert looping.generate(PROMPT, max_tokens=32) == hf_greedy_text(model_dir, PROMPT, 32)
