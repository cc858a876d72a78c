"""Continuous batching on a real LayerSpan: one-token steps of different sessions that reach the node
within a few turns of its event loop run as one batch; a lone session never waits."""

import asyncio

import pytest
import torch

from farmesh_core.architecture import adapter_for
from farmesh_core.checkpoint import Checkpoint
from farmesh_core.node.batching import JOIN_TURNS, DecodeBatcher
from farmesh_core.node.kv_cache import SessionCache
from farmesh_core.node.layer_span import LayerSpan
from tests.helpers import HIDDEN_SIZE, NUM_LAYERS


@pytest.fixture(scope="module")
def span(tiny_llama) -> LayerSpan:
    checkpoint = Checkpoint(tiny_llama)
    return LayerSpan(checkpoint, adapter_for(checkpoint.config), 0, NUM_LAYERS, torch.float32, "cpu")


def sessions(span: LayerSpan, n: int) -> list[tuple[SessionCache, torch.Tensor, int]]:
    """``n`` sessions with 3, 4, ... cached tokens, and the next one-token step of each."""
    out = []
    for i in range(n):
        cache = SessionCache(32)
        span.forward(torch.randn(1, 3 + i, HIDDEN_SIZE, generator=torch.Generator().manual_seed(i)), 0, NUM_LAYERS,
                     cache, 0)  # fmt: skip
        out.append((cache, torch.randn(1, 1, HIDDEN_SIZE, generator=torch.Generator().manual_seed(10 + i)), 3 + i))
    return out


async def turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_steps_arriving_over_a_few_loop_turns_share_one_batch(span):
    steps = sessions(span, 3)

    async def run():
        batcher = DecodeBatcher(span, sessions=lambda: 3)
        futures = []
        for cache, hidden, position in steps:  # each a turn after the other, as streams deliver them
            futures.append(batcher.submit(hidden, 0, NUM_LAYERS, cache, position))
            await turns(1)
        outputs = await asyncio.gather(*futures)
        return batcher, outputs

    batcher, outputs = asyncio.run(run())
    assert (batcher.batches, batcher.steps) == (1, 3)
    assert [list(o.shape) for o in outputs] == [[1, 1, HIDDEN_SIZE]] * 3


def test_batched_outputs_match_each_session_stepping_alone(span):
    lone = sessions(span, 3)
    expected = [span.forward(hidden, 0, NUM_LAYERS, cache, position) for cache, hidden, position in lone]

    async def run():
        batcher = DecodeBatcher(span, sessions=lambda: 3)
        futures = [batcher.submit(h, 0, NUM_LAYERS, c, p) for c, h, p in sessions(span, 3)]
        return batcher, await asyncio.gather(*futures)

    batcher, outputs = asyncio.run(run())
    assert batcher.batches == 1
    for out, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


def test_a_lone_session_does_not_wait_for_others(span):
    ((cache, hidden, position),) = sessions(span, 1)

    async def run():
        batcher = DecodeBatcher(span, sessions=lambda: 1)
        future = batcher.submit(hidden, 0, NUM_LAYERS, cache, position)
        await turns(1)
        return future.done()

    assert asyncio.run(run())


def test_a_step_does_not_wait_forever_for_idle_sessions(span):
    """Four sessions open, one stepping: it runs after JOIN_TURNS turns of the loop."""
    ((cache, hidden, position),) = sessions(span, 1)

    async def run():
        batcher = DecodeBatcher(span, sessions=lambda: 4)
        future = batcher.submit(hidden, 0, NUM_LAYERS, cache, position)
        await turns(JOIN_TURNS)
        waited = not future.done()
        await turns(2)
        return waited, future.done()

    assert asyncio.run(run()) == (True, True)


def bmm_calls(fn) -> int:
    """How many ``aten::bmm`` ops ``fn()`` ran: split one-token matmuls are bmm (lean_layer._row_blocks)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    return sum(event.count for event in profile.key_averages() if event.key == "aten::bmm")


@pytest.mark.parametrize("open_sessions, split", [(1, True), (3, False)])
def test_a_lone_step_splits_its_matmuls_only_on_an_otherwise_idle_node(tiny_llama, open_sessions, split):
    """On a node with one session a lone one-token step spreads its matmuls over the node's threads;
    with other sessions open, those give the node its parallelism and the step stays on one thread."""
    checkpoint = Checkpoint(tiny_llama)
    span = LayerSpan(checkpoint, adapter_for(checkpoint.config), 0, NUM_LAYERS, torch.float32, "cpu", one_row_threads=2)
    ((cache, hidden, position),) = sessions(span, 1)

    async def run():
        batcher = DecodeBatcher(span, sessions=lambda: open_sessions)
        return await batcher.submit(hidden, 0, NUM_LAYERS, cache, position)

    blocks = sum(len(call.row_blocks) for call in span.step_calls.values())  # 7 per layer here
    assert bmm_calls(lambda: asyncio.run(run())) == (blocks if split else 0)
