"""Concurrent sessions on the same nodes are batched together and each stays token-exact."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoModelForCausalLM

from farmesh_core.client import DistributedInferenceClient
from farmesh_core.launch import spawn_dht, spawn_node, stop_process, wait_for_layers

SESSIONS, NEW_TOKENS = 6, 32


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    from farmesh_core.checkpoint_maker import make_checkpoint

    model_dir = make_checkpoint(str(tmp_path_factory.mktemp("concurrency") / "tiny-llama"))
    dht, addrs = spawn_dht()
    nodes = [spawn_node(model_dir, addrs, "--layers", span) for span in ("0:4", "4:8")]
    try:
        wait_for_layers(model_dir, addrs, num_nodes=2, procs=nodes)
        yield model_dir, addrs
    finally:
        for proc in [*nodes, dht]:
            stop_process(proc)


@pytest.mark.timeout(300)
def test_concurrent_sessions_each_equal_transformers(mesh):
    model_dir, addrs = mesh
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = [
        torch.randint(3, 1024, (1, 8 + 5 * i), generator=torch.Generator().manual_seed(i)) for i in range(SESSIONS)
    ]
    with torch.no_grad():
        expected = [
            hf.generate(p, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)[
                0, p.shape[1] :
            ].tolist()
            for p in prompts
        ]
    with DistributedInferenceClient(model_dir, addrs) as client:

        def generate(prompt):
            return [int(t[0]) for t in client.generate_ids(prompt, NEW_TOKENS, min_new_tokens=NEW_TOKENS)]

        with ThreadPoolExecutor(SESSIONS) as pool:
            outputs = list(pool.map(generate, prompts))
    assert outputs == expected
