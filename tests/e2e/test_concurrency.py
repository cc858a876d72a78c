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
