"""Concurrent sessions on the same nodes are batched together and each stays token-exact."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from farmesh_core.client import DistributedInferenceClient
from tests.helpers import hf_greedy_continuations

SESSIONS, NEW_TOKENS = 6, 32


@pytest.fixture(scope="module")
def mesh(llama_mesh):
    """The shared two-node mesh (layers 0:4 and 4:8) of the tiny Llama."""
    return llama_mesh.model_dir, llama_mesh.addrs


@pytest.mark.timeout(300)
def test_concurrent_sessions_each_equal_transformers(mesh):
    model_dir, addrs = mesh
    prompts = [
        torch.randint(3, 1024, (1, 8 + 5 * i), generator=torch.Generator().manual_seed(i)) for i in range(SESSIONS)
    ]
    expected = hf_greedy_continuations(model_dir, prompts, NEW_TOKENS)
    with DistributedInferenceClient(model_dir, addrs) as client:

        def generate(prompt):
            return [int(t[0]) for t in client.generate_ids(prompt, NEW_TOKENS, min_new_tokens=NEW_TOKENS)]

        with ThreadPoolExecutor(SESSIONS) as pool:
            outputs = list(pool.map(generate, prompts))
    assert outputs == expected


def _same_length_prompts(count: int, seed: int) -> list[torch.Tensor]:
    return [torch.randint(3, 1024, (1, 12), generator=torch.Generator().manual_seed(seed + i)) for i in range(count)]


@pytest.mark.timeout(300)
def test_generations_started_together_share_a_session_and_each_equals_transformers(mesh):
    """Calls with prompts of one length made while the client generates run as rows of one session
    (``batched_generation``); each row ends at its own length, or where its caller stops reading,
    with transformers' tokens."""
    model_dir, addrs = mesh
    prompts = _same_length_prompts(SESSIONS, seed=100)
    expected = hf_greedy_continuations(model_dir, prompts, NEW_TOKENS)
    lengths = [NEW_TOKENS - 4 * i for i in range(SESSIONS)]
    read = {SESSIONS - 1: 3}  # this caller stops reading after 3 tokens
    with DistributedInferenceClient(model_dir, addrs, batch_window_ms=100) as client:

        def generate(i: int) -> list[int]:
            steps = client.generate_ids(prompts[i], lengths[i], min_new_tokens=NEW_TOKENS)
            out = []
            for token in steps:
                out.append(int(token[0]))
                if len(out) == read.get(i):
                    steps.close()
            return out

        with ThreadPoolExecutor(SESSIONS) as pool:
            outputs = list(pool.map(generate, range(SESSIONS)))
        assert client.batcher.batches >= 1 and client.batcher.batched_rows >= 2  # the first call may run alone
        assert client.batcher.unstarted == 0
        # the client still serves a lone generation afterwards
        assert [int(t[0]) for t in client.generate_ids(prompts[0], 4, min_new_tokens=4)] == expected[0][:4]
    assert outputs == [expected[i][: read.get(i, lengths[i])] for i in range(SESSIONS)]


@pytest.mark.timeout(300)
def test_rows_of_a_session_a_node_refuses_run_alone(mesh_factory, tiny_llama):
    """A node whose KV budget takes one of these generations per client but not several rows of one
    session refuses the shared session: each row then runs in a session of its own, one after another,
    with transformers' tokens."""
    # 1.5 MB of KV cache, half of it per client: one session of 44 tokens through 8 layers (704 KB)
    small = mesh_factory(tiny_llama, "0:8", node_args=("--kv-cache-gb", "0.0014"))
    prompts = _same_length_prompts(4, seed=200)
    expected = hf_greedy_continuations(tiny_llama, prompts, NEW_TOKENS)
    with DistributedInferenceClient(tiny_llama, small.addrs, batch_window_ms=100) as client:

        def generate(prompt: torch.Tensor) -> list[int]:
            return [int(t[0]) for t in client.generate_ids(prompt, NEW_TOKENS, min_new_tokens=NEW_TOKENS)]

        with ThreadPoolExecutor(len(prompts)) as pool:
            outputs = list(pool.map(generate, prompts))
        assert client.batcher.batches >= 1 and client.batcher.unstarted == client.batcher.batches
    assert outputs == expected
    small.assert_alive()
