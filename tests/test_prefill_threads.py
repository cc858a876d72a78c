"""A Far Node's short prefills (inline on its event loop): on ``num_threads`` torch threads only while
the node serves that session alone and its threads get CPUs of their own (openmp.spreads), or it is
warm (its event loop ran ops on several threads lately: see handlers.WARM_S), or the prefill is heavy
(handlers.LARGE_PREFILL); else on the loop's one thread, unless one thread would give a step of that
many tokens other bits."""

import asyncio
import time

import torch

from farmesh_core import openmp
from farmesh_core.architecture import adapter_for
from farmesh_core.checkpoint import Checkpoint
from farmesh_core.config import NodeConfig
from farmesh_core.node import handlers
from farmesh_core.node.handlers import NodeHandlers
from farmesh_core.node.kv_cache import SessionCache
from farmesh_core.node.layer_span import LayerSpan
from farmesh_core.openmp import torch_threads
from farmesh_plugins.auth import OpenAuth
from farmesh_plugins.ledgers import NullLedger


def test_a_short_prefill_takes_the_nodes_threads_only_when_warm_and_alone(tiny_llama):
    checkpoint = Checkpoint(tiny_llama)
    span = LayerSpan(checkpoint, adapter_for(checkpoint.config), 0, 2, torch.float32, "cpu")
    config = NodeConfig(model_id=tiny_llama, num_threads=2)
    node = NodeHandlers(config, span, OpenAuth(), NullLedger())
    length = next(n for n in range(12, 64) if span.same_bits_on_one_thread(n, 2))  # (see the next test)
    prompt = torch.randn(1, length, span.hidden_size)
    expected = span.forward(prompt, 0, 2, SessionCache(length), 0)

    def prefill(hidden: torch.Tensor) -> tuple[int, torch.Tensor]:  # (the span's forward, with its thread count)
        return torch.get_num_threads(), span.forward(hidden, 0, 2, SessionCache(length), 0)

    # as many layers as would make these tokens a heavy prefill (the step itself runs 2)
    heavy = -(-handlers.LARGE_PREFILL // (prompt.shape[1] * span.layer_bytes))

    async def threads_of_a_prefill(layers: int = 2) -> int:
        torch.set_num_threads(1)  # as on a node's event loop
        threads, out = await node._compute(prompt.shape[1], layers, prefill, prompt)
        torch.testing.assert_close(out, expected)
        assert torch.get_num_threads() == 1  # the loop's own count is back
        return threads

    try:
        node.active_sessions = 1
        assert asyncio.run(threads_of_a_prefill()) == 1  # never stepped yet: cold
        node._threaded_at = time.perf_counter()
        assert asyncio.run(threads_of_a_prefill()) == 2  # a prefill on its threads just now: warm
        node._threaded_at = 0.0
        node.batcher.split_at = time.perf_counter()
        assert asyncio.run(threads_of_a_prefill()) == 2  # a split one-token step just now: warm too
        node.batcher.split_at = 0.0
        node.active_sessions = 2
        node._threaded_at = time.perf_counter()
        assert asyncio.run(threads_of_a_prefill()) == 1  # other sessions give the node its parallelism
        node.active_sessions = 1
        node._threaded_at = time.perf_counter() - 2 * handlers.WARM_S
        assert asyncio.run(threads_of_a_prefill()) == 1  # idle for a while (or steps on one thread): cold
        assert asyncio.run(threads_of_a_prefill(heavy - 1)) == 1  # cold, and just short of heavy
        assert asyncio.run(threads_of_a_prefill(heavy)) == 2  # cold, but heavy enough
        node.active_sessions = 2
        assert asyncio.run(threads_of_a_prefill(heavy)) == 1  # heavy, but not alone
        # Where the team's threads get CPUs of their own (as a Far Node's do), a cold team costs no more.
        openmp.spreading = True
        node.active_sessions = 1
        assert asyncio.run(threads_of_a_prefill()) == (2 if openmp.spreads(2) else 1)
        node.active_sessions = 2
        assert asyncio.run(threads_of_a_prefill()) == 1  # other sessions give the node its parallelism
    finally:
        openmp.spreading = False
        openmp.release_worker_threads()  # (the next test's team starts unpinned)
        node.close()


def test_a_short_step_whose_bits_one_thread_would_change_runs_on_the_nodes_threads(tiny_llama):
    """MKL's matmuls of some row counts (here 5-7 and 9-11) give other bits on one thread than on two:
    a cold node (or one beside other sessions) runs a step of such a count on its threads anyway, so
    that every short step comes out as on the node's threads, whatever the node's state."""
    checkpoint = Checkpoint(tiny_llama)
    span = LayerSpan(checkpoint, adapter_for(checkpoint.config), 0, 2, torch.float32, "cpu")
    node = NodeHandlers(NodeConfig(model_id=tiny_llama, num_threads=2), span, OpenAuth(), NullLedger())

    async def cold_step(prompt: torch.Tensor) -> torch.Tensor:
        torch.set_num_threads(1)  # as on a node's event loop
        return await node._compute(prompt.shape[1], 2, span.forward, prompt, 0, 2, SessionCache(16), 0)

    try:
        node.active_sessions = 1
        differing = []
        for tokens in range(2, 13):
            # (another input than the check's own seeded one: the verdict must hold for the token count)
            prompt = torch.randn(1, tokens, span.hidden_size, generator=torch.Generator().manual_seed(1000 + tokens))
            with torch_threads(2):
                on_threads = span.forward(prompt, 0, 2, SessionCache(16), 0)
            assert torch.equal(asyncio.run(cold_step(prompt)), on_threads), f"{tokens} tokens"
            differing += [] if span.same_bits_on_one_thread(tokens, 2) else [tokens]
        print(f"\ntoken counts whose bits one thread changes here: {differing}")
    finally:
        node.close()
