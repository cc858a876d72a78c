"""Continuous batching on a real LayerSpan: one-token steps of different sessions that reach the node
within a few turns of its event loop run as one batch; a lone session never waits."""

import asyncio
from contextlib import contextmanager

import pytest
import torch

from farmesh_core.architecture import adapter_for
from farmesh_core.checkpoint import Checkpoint
from farmesh_core.checkpoint_maker import make_checkpoint
from farmesh_core.node import batching
from farmesh_core.node.batching import ACTIVE_S, JOIN_TURNS, DecodeBatcher, last_level_cache_bytes
from farmesh_core.node.kv_cache import SessionCache
from farmesh_core.node.layer_span import LayerSpan
from farmesh_plugins.quantization import module_nbytes
from tests.helpers import HIDDEN_SIZE, NUM_LAYERS, op_counts, randn


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


def test_a_run_holding_few_of_the_active_sessions_steps_waits_for_more(span):
    """Where the layers' weights take more than ``hold_above_bytes`` (0 here: the tiny model's fit the
    cache), a step of one of 4 sessions that all stepped lately waits for more; a second one (half of
    them) ends the wait and both run as one batch. A wait with no more steps coming ends after as long
    as the last run computed; sessions that have not stepped for ACTIVE_S do not count."""
    steps = sessions(span, 4)

    async def step(batcher: DecodeBatcher, index: int) -> asyncio.Future:
        cache, hidden, _ = steps[index]
        return batcher.submit(hidden, 0, NUM_LAYERS, cache, cache.length)

    async def run():
        batcher = DecodeBatcher(span, sessions=lambda: 4, hold_above_bytes=0)
        await asyncio.gather(*[await step(batcher, i) for i in range(4)])  # one batch: all 4 sessions active
        first = await step(batcher, 0)
        await turns(JOIN_TURNS + 2)
        held = not first.done()
        await asyncio.gather(first, await step(batcher, 1))
        together = (batcher.batches, batcher.steps)
        alone = await step(batcher, 2)
        await asyncio.wait_for(alone, timeout=5)  # no other step comes: the wait ends by itself
        await asyncio.sleep(ACTIVE_S * 1.5)
        lone = await step(batcher, 3)
        await turns(JOIN_TURNS + 2)
        return held, together, lone.done(), (batcher.batches, batcher.steps)

    assert asyncio.run(run()) == (True, (2, 6), True, (4, 8))


def test_steps_do_not_wait_where_the_weights_fit_the_cache(span):
    """Weights of no more than ``hold_above_bytes`` (by default the CPU's last-level cache: 32 MiB
    here, which the tiny model's 25 MB fit) never wait beyond JOIN_TURNS."""
    steps = sessions(span, 4)
    assert last_level_cache_bytes() >= 2**20

    async def run():
        batcher = DecodeBatcher(span, sessions=lambda: 4, hold_above_bytes=span.layer_bytes * NUM_LAYERS)
        await asyncio.gather(*(batcher.submit(h, 0, NUM_LAYERS, c, c.length) for c, h, _ in steps))
        cache, hidden, _ = steps[0]
        lone = batcher.submit(hidden, 0, NUM_LAYERS, cache, cache.length)
        await turns(JOIN_TURNS + 2)
        return lone.done()

    assert asyncio.run(run())


def test_a_batchs_outputs_go_on_together_before_any_of_its_steps_is_done(span):
    """Each step's ``onward`` runs with its output inside one ``together()`` for the whole batch, before
    any future is done (so the pushes leave as one write per link, ahead of the answers); a failing
    ``onward`` fails its own step only."""
    events: list = []

    @contextmanager
    def together():
        events.append("open")
        yield
        events.append("close")

    def onward(index: int):
        def send(output: torch.Tensor) -> None:
            if index == 1:
                raise RuntimeError("a push that fails")
            events.append((index, tuple(output.shape), [f.done() for f in futures]))

        return send

    async def run():
        batcher = DecodeBatcher(span, sessions=lambda: 3, together=together)
        for i, (cache, hidden, position) in enumerate(sessions(span, 3)):
            futures.append(batcher.submit(hidden, 0, NUM_LAYERS, cache, position, onward=onward(i)))
        results = await asyncio.gather(*futures, return_exceptions=True)
        return batcher, results

    futures: list[asyncio.Future] = []
    batcher, results = asyncio.run(run())
    assert (batcher.batches, batcher.steps) == (1, 3)
    assert events == ["open", (0, (1, 1, HIDDEN_SIZE), [False] * 3), (2, (1, 1, HIDDEN_SIZE), [False, True, False]),
                      "close"]  # fmt: skip
    assert isinstance(results[1], RuntimeError) and str(results[1]) == "a push that fails"
    assert [list(results[i].shape) for i in (0, 2)] == [[1, 1, HIDDEN_SIZE]] * 2


@pytest.mark.parametrize("chain, batches", [(1, [4]), (2, [2, 2]), (3, [2, 2])])
def test_steps_going_round_a_chain_run_as_convoys(span, chain, batches):
    """Steps that go on round a chain of ``chain`` nodes run a convoy's share of the active sessions at
    a time (4 sessions: 2 each for 2 nodes, 2 each for 3), the rest at once after it: the chain's
    nodes then each have a convoy to compute. Steps of a one-node chain run as one batch."""
    steps = sessions(span, 4)
    sizes: list[int] = []

    async def run():
        batcher = DecodeBatcher(span, sessions=lambda: 4)
        await asyncio.gather(*(batcher.submit(h, 0, NUM_LAYERS, c, c.length) for c, h, _ in steps))  # all active
        before = batcher.steps
        futures = [
            batcher.submit(h, 0, NUM_LAYERS, c, c.length, onward=lambda _: sizes.append(batcher.steps), chain=chain)
            for c, h, _ in steps
        ]  # fmt: skip
        await asyncio.gather(*futures)
        return before

    before = asyncio.run(run())
    runs = sorted(set(sizes))
    assert [b - a for a, b in zip([before, *runs], runs, strict=False)] == batches


@pytest.mark.parametrize(
    "open_sessions, idle, split", [(1, False, True), (1, True, False), (3, False, False)],
    ids=["alone", "alone-after-idling", "beside-other-sessions"],
)  # fmt: skip
def test_a_lone_step_splits_its_matmuls_only_on_a_node_busy_with_that_session(
    tiny_llama, monkeypatch, open_sessions, idle, split
):
    """On a node with one session a lone one-token step right after another spreads its matmuls over the
    node's threads; after the node idled (past ``SPLIT_IDLE_S``) it goes the way its earlier steps after
    as long an idle stretch found quicker (here one thread); with other sessions open it stays on one
    thread (those give the node its parallelism). The node's first step follows idling."""
    monkeypatch.setattr(batching, "SPLIT_IDLE_S", 0.005 if idle else 10.0)  # (a loaded machine may stall)
    checkpoint = Checkpoint(tiny_llama)
    span = LayerSpan(checkpoint, adapter_for(checkpoint.config), 0, NUM_LAYERS, torch.float32, "cpu", one_row_threads=2)
    ((cache, hidden, position),) = sessions(span, 1)
    batcher = DecodeBatcher(span, sessions=lambda: open_sessions)
    for idle_s in (*batching.IDLE_EDGES_S, 1e9):  # split steps after idling were slower on this node
        for _ in range(batching.TRIES):
            batcher.split_choice.record(idle_s, True, 1e-3)
            batcher.split_choice.record(idle_s, False, 1e-4)

    async def steps():
        await batcher.submit(hidden, 0, NUM_LAYERS, cache, position)  # the node's first
        if idle:
            await asyncio.sleep(0.02)
        await batcher.submit(hidden, 0, NUM_LAYERS, cache, position + 1)

    blocks = sum(  # 4 per layer here: q, k, v stacked, o, gate and up stacked, down
        len(call.row_blocks) + (call.qkv is not None) + (call.gate_up is not None) for call in span.step_calls.values()
    )
    assert blocks == 4 * NUM_LAYERS
    assert op_counts(lambda: asyncio.run(steps())).get("aten::bmm", 0) == (blocks if split else 0)


def test_a_failed_lone_step_teaches_the_split_choice_nothing(tiny_llama):
    """A step that fails (or was cancelled) ends quickly: counted, it would make its way look quick."""
    checkpoint = Checkpoint(tiny_llama)
    span = LayerSpan(checkpoint, adapter_for(checkpoint.config), 0, NUM_LAYERS, torch.float32, "cpu", one_row_threads=2)
    ((cache, hidden, position),) = sessions(span, 1)
    batcher = DecodeBatcher(span)

    async def steps():
        with pytest.raises(RuntimeError):  # a hidden state one value short: the first layer refuses it
            await batcher.submit(hidden[..., :-1], 0, NUM_LAYERS, cache, position)
        await asyncio.sleep(2 * batching.SPLIT_IDLE_S)  # (a step right after another is not learned from)
        await batcher.submit(hidden, 0, NUM_LAYERS, cache, position)

    asyncio.run(steps())
    assert [sum(stretch.counts) for stretch in batcher.split_choice._stretches].count(1) == 1  # the good step


def test_split_choice_tries_both_ways_then_takes_the_quicker_and_sometimes_the_other():
    """After idling past ``SPLIT_IDLE_S``: each way ``TRIES`` times, then the quicker one, with the
    slower one again once in ``EXPLORE_EVERY`` steps times how much slower it was; each idle stretch
    learns on its own, and within ``SPLIT_IDLE_S`` a step always splits."""
    choice = batching.SplitChoice()
    short, long, longer = batching.SPLIT_IDLE_S / 2, 0.010, 0.050  # (10 and 50 ms: different stretches)
    assert choice.splits(short) and choice.splits(short)  # always
    first = [choice.splits(long) for _ in range(2 * batching.TRIES)]
    assert first == [True] * 2 * batching.TRIES  # unrecorded steps: split ones are tried first...
    for _ in range(batching.TRIES):
        choice.record(long, True, 3e-3)
    assert choice.splits(long) is False  # ...then one-thread ones
    for _ in range(batching.TRIES):
        choice.record(long, False, 1e-3)  # three times quicker
    ways = [choice.splits(long) for _ in range(10 * batching.EXPLORE_EVERY)]
    assert ways.count(True) == 10 * batching.EXPLORE_EVERY // (3 * batching.EXPLORE_EVERY)  # the slower now and then
    assert choice.splits(longer) is True  # another stretch: nothing learned there yet
    choice.record(long, True, 1e-4)  # split steps got quicker: a mean, not the last step alone...
    assert choice.splits(long) is False
    for _ in range(20):
        choice.record(long, True, 1e-4)  # ...until they stay quicker
    assert all(choice.splits(long) for _ in range(batching.EXPLORE_EVERY - 1))


# ---- the other families: their layers run as modules, with StepLinears (farmesh_core/row_matmul.py) ----
FAMILIES = {
    "mistral-window-12": ("mistral", {"sliding_window": 12}),
    "mixtral": ("mixtral", {}),
    "falcon-new": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),
    "falcon-multi-query": ("falcon", {"multi_query": True, "new_decoder_architecture": False}),
    "falcon-alibi": ("falcon", {"alibi": True}),
    "bloom": ("bloom", {}),
}
FAMILY_LAYERS = 4


def family_spans(model_dir: str, pack: bool = False) -> tuple[LayerSpan, LayerSpan]:
    """Layers 0:4 as a node runs them (StepLinears, lone steps split over 2 threads, weights packed for
    decode batches if ``pack``) and as modules."""
    checkpoint = Checkpoint(model_dir)
    adapter = adapter_for(checkpoint.config)
    quick = LayerSpan(
        checkpoint, adapter, 0, FAMILY_LAYERS, torch.float32, "cpu", one_row_threads=2, pack_batch_weights=pack
    )
    modules = LayerSpan(checkpoint, adapter, 0, FAMILY_LAYERS, torch.float32, "cpu", lean_layers=False)
    return quick, modules


def step_alone(span: LayerSpan, caches: list[SessionCache], lengths: list[int], seed: int) -> list[torch.Tensor]:
    """A step of ``lengths[i]`` tokens for each session ``caches[i]``, one after another."""
    return [
        span.forward(randn(1, length, span.hidden_size, seed=seed + i), 0, FAMILY_LAYERS, cache, cache.length)
        for i, (cache, length) in enumerate(zip(caches, lengths, strict=True))
    ]


async def step_batched(span: LayerSpan, caches: list[SessionCache], hiddens: list[torch.Tensor]):
    """One-token steps of every session through a node's batcher; the batcher and their outputs."""
    batcher = DecodeBatcher(span, sessions=lambda: len(caches))
    steps = [batcher.submit(h, 0, FAMILY_LAYERS, c, c.length) for h, c in zip(hiddens, caches, strict=True)]
    return batcher, await asyncio.gather(*steps)


def step_batched_with_ops(span: LayerSpan, caches: list[SessionCache], hiddens: list[torch.Tensor]):
    """:func:`step_batched` under the profiler: the batcher, the outputs and the torch ops it ran."""
    ran = []
    ops = op_counts(lambda: ran.append(asyncio.run(step_batched(span, caches, hiddens))))
    return (*ran[0], ops)


@pytest.mark.parametrize("pack", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_batches_its_sessions_one_token_steps(tmp_path, family, pack):
    """Sessions of 10, 13 and 16 tokens (past Mistral's window of 12): a lone step of each keeps the
    modules' bits with its matmuls split over 2 threads; then two decode steps of all three run as
    one batch each, every row within 1e-4 of its step through the modules, and a lone step after them
    finds the batches' keys and values in its session's cache. Batches go through packed copies of the
    weights or not."""
    model_type, overrides = FAMILIES[family]
    quick, modules = family_spans(make_checkpoint(str(tmp_path / "model"), model_type, **overrides), pack)
    assert quick.step_linear_count > 0 and modules.step_linear_count == 0
    assert (quick.packed_bytes > 0) == pack
    caches = {span: [SessionCache(32) for _ in range(3)] for span in (quick, modules)}
    for span in (quick, modules):
        step_alone(span, caches[span], [10, 13, 16], seed=0)
    for one, other in zip(
        *(step_alone(span, caches[span], [1, 1, 1], seed=10) for span in (quick, modules)), strict=True
    ):
        assert torch.equal(one, other)

    for seed in (20, 30):
        hiddens = [randn(1, 1, quick.hidden_size, seed=seed + i) for i in range(3)]
        if seed == 20:  # the first batch only: parsing the profile takes a second
            batcher, outputs, ops = step_batched_with_ops(quick, caches[quick], hiddens)
            assert ("mkldnn::_linear_pointwise" in ops) == pack
        else:
            batcher, outputs = asyncio.run(step_batched(quick, caches[quick], hiddens))
        assert (batcher.batches, batcher.steps) == (1, 3)
        expected = step_alone(modules, caches[modules], [1, 1, 1], seed=seed)
        for out, want in zip(outputs, expected, strict=True):
            torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    assert [c.length for c in caches[quick]] == [c.length for c in caches[modules]] == [13, 16, 19]
    for one, other in zip(
        *(step_alone(span, caches[span], [1, 1, 1], seed=40) for span in (quick, modules)), strict=True
    ):
        torch.testing.assert_close(one, other, rtol=1e-4, atol=1e-4)


def test_long_sessions_step_alone_where_padding_would_copy_more_than_the_weights(tmp_path):
    """Module layers take a batch's keys and values padded into one tensor, a copy per layer; past the
    span's weight bytes, batching saves less than it copies and the steps run alone."""
    quick, _ = family_spans(make_checkpoint(str(tmp_path / "model"), "bloom"))
    weights = sum(module_nbytes(layer) for layer in quick.layers.values())
    per_row_token = quick.kv_bytes_per_token(0, FAMILY_LAYERS)  # every layer's keys and values
    long = weights // (3 * per_row_token) + 1
    for length, batched in [(long - 8, True), (long, False)]:
        caches = [SessionCache(length + 1) for _ in range(3)]
        for i, cache in enumerate(caches):
            quick.forward(randn(1, length - i, quick.hidden_size, seed=i), 0, FAMILY_LAYERS, cache, 0)
        hiddens = [randn(1, 1, quick.hidden_size, seed=10 + i) for i in range(3)]
        outputs = quick.forward_decode_batch(hiddens, 0, FAMILY_LAYERS, caches, [c.length for c in caches])
        assert (outputs is not None) == batched
