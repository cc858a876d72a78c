"""Continuous batching: one-token steps of different sessions that arrive together run as one batch.

A step is queued and a run is scheduled on the event loop. While a batch computes (inline, blocking
the loop), other sessions' steps pile up in their streams; a step needs a few turns of the loop to
go from its socket to the queue, so while other sessions are open the run waits up to
``JOIN_TURNS`` turns (tens of microseconds) for them, then takes all that arrived. A busy
node's throughput grows with load while a node with one session adds no delay. Steps are served in
arrival order, at most ``max_batch`` per run, and where they go on round a chain of several nodes,
at most one convoy's share of the active sessions (see ``DecodeBatcher._run_size``).

Sessions stepping at once fall into convoys that take turns through a chain's nodes. Where a
batch's weights do not fit the CPU's last-level cache, reading them sets its pace and it costs
about the same for one row as for eight: there, small convoys waste the node's time. So such a run,
holding fewer than half (``HOLD_SHARE``) of the steps of the sessions that stepped lately
(``ACTIVE_S``), waits for more, up to as long as the last run computed: 8 sessions through 2 nodes
of a hidden-1024 model (168 MB a node) went from 94-109 to 117-145 tokens/s. Half, not all, so that
two convoys keep both nodes of a chain busy (waiting for all of them: 53-87 tokens/s). Weights
that fit the cache leave a batch's rows the larger part of its cost, and waiting there did not pay
(the baseline's tiny model, 13 MB a node: a median of 387 against 360 tokens/s, within the noise).
"""

import asyncio
import bisect
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch

from farmesh_core import metrics
from farmesh_core.node.kv_cache import SessionCache
from farmesh_core.node.layer_span import LayerSpan
from farmesh_core.node.token_loop import TurnAsk
from farmesh_core.openmp import spread_team
from farmesh_core.row_matmul import last_level_cache_bytes, matmuls_on_one_thread

logger = logging.getLogger(__name__)


@dataclass
class _DecodeStep:
    hidden: torch.Tensor
    start: int
    end: int
    cache: SessionCache
    position: int
    future: asyncio.Future
    adapter_name: str | None = None
    turn: TurnAsk | None = None
    onward: Callable[[torch.Tensor], None] | None = None
    chain: int = 1


JOIN_TURNS = 4  # turns of the event loop a run waits for other open sessions' steps
HOLD_SHARE = 0.5  # a run waits while it holds fewer than this share of the recently active sessions' steps
ACTIVE_S = 0.1  # a session that stepped within this many seconds is active
# A lone step splits its matmuls over the node's threads (row_matmul.row_blocks) if the node ran a step
# this recently. In-process, 4 layers of the tiny Llama on 2 threads took 0.56 ms back to back, 1.0-1.4
# ms after 2-4 ms of sleep and 8.2-9.1 ms after 4.5 ms or more (the other core had gone idle and woke
# slowly), where one thread took 0.62, 0.9-1.2 and 1.7-2.0 ms. Just under that edge, so that the nodes
# of a chain on one machine (each idle ~2.5 ms between its steps) still split, which keeps the loop's
# OpenMP team warm for the next prompt (handlers.WARM_S). After a longer idle stretch, SplitChoice
# learns from the node's own steps which way is quicker: larger models gain more from the threads and
# fall off no such edge there (a hidden-1024 model's 2-node chain on one machine, each node idle ~10 ms
# between its steps, ran at 18.0 ms a token against 25.8 on one thread).
SPLIT_IDLE_S = 0.004
IDLE_EDGES_S = (0.008, 0.016, 0.032, 0.064)  # the stretches of idling past SPLIT_IDLE_S, each learned apart
TRIES = 2  # steps of each way in a stretch before the quicker is chosen
EXPLORE_EVERY = 32  # the slower way runs again once in this many steps, times how much slower it was...
EXPLORE_RATIO_MAX = 32  # ...up to this many times: a machine's speed drifts
MEAN_WEIGHT = 0.2  # of a new step in a way's mean time


@dataclass
class _Stretch:
    """Lone steps that came after a stretch of idling: the mean seconds per layer of those on one
    thread (index 0) and of those split (1), how many of each ran, and the steps since the way not
    chosen last ran."""

    means: list[float] = field(default_factory=lambda: [0.0, 0.0])
    counts: list[int] = field(default_factory=lambda: [0, 0])
    since_other: int = 0


class SplitChoice:
    """Whether a lone one-token step splits its matmuls over the node's threads: always within
    ``SPLIT_IDLE_S`` of the node's last step, and after longer idling, from how long the node's earlier
    lone steps took each way after as long an idle stretch (``IDLE_EDGES_S``): each way ``TRIES``
    times first, then the quicker, and now and then the other again (``EXPLORE_EVERY``), as the
    machine's speed drifts."""

    def __init__(self):
        self._stretches = [_Stretch() for _ in range(len(IDLE_EDGES_S) + 1)]

    def splits(self, idle: float) -> bool:
        """Whether the step after ``idle`` seconds of idling splits."""
        if idle <= SPLIT_IDLE_S:
            return True
        stretch = self._stretches[bisect.bisect(IDLE_EDGES_S, idle)]
        for way in (1, 0):
            if stretch.counts[way] < TRIES:
                return bool(way)
        best = int(stretch.means[1] <= stretch.means[0])
        slower = stretch.means[1 - best] / max(stretch.means[best], 1e-9)
        stretch.since_other += 1
        if stretch.since_other >= EXPLORE_EVERY * min(slower, EXPLORE_RATIO_MAX):
            stretch.since_other = 0
            return not best
        return bool(best)

    def record(self, idle: float, split: bool, seconds_per_layer: float) -> None:
        """A lone step after ``idle`` seconds of idling took ``seconds_per_layer``, split or not."""
        if idle <= SPLIT_IDLE_S:
            return
        stretch = self._stretches[bisect.bisect(IDLE_EDGES_S, idle)]
        way = int(split)
        mean = stretch.means[way]
        stretch.means[way] = (
            seconds_per_layer if not stretch.counts[way] else mean + MEAN_WEIGHT * (seconds_per_layer - mean)
        )
        stretch.counts[way] += 1


class DecodeBatcher:
    """Queues one-token, one-sequence steps and runs those for the same layers and LoRA adapter together.

    ``sessions()`` says how many sessions are open on the node: with one, a step runs at once. A run
    whose layers' weights take more than ``hold_above_bytes`` (by default the CPU's last-level cache)
    may wait for more sessions' steps. ``turns(outputs, asks)`` may choose the tokens of a batch's
    token-loop turns together (``NodeHead.choose_rows``), before their steps' futures are done.

    A step's ``onward(output)`` (its push to the next node) runs right after its batch, before any
    future is done, the batch's all inside one ``together()`` (``PushLinks.together``): the batch goes
    on to the next node whole, ahead of the answers to its clients.
    """

    def __init__(
        self,
        span: LayerSpan,
        max_batch: int = 32,
        sessions: Callable[[], int] = lambda: 1,
        hold_above_bytes: int | None = None,
        turns: Callable[[list[torch.Tensor], list[TurnAsk]], None] | None = None,
        together: Callable[[], AbstractContextManager] = nullcontext,
    ):
        self.span, self.max_batch, self.sessions, self.turns = span, max_batch, sessions, turns
        self.together = together
        self.hold_above_bytes = last_level_cache_bytes() if hold_above_bytes is None else hold_above_bytes
        self._queue: list[_DecodeStep] = []
        self._scheduled = False
        self._turns = 0
        self._stepped: dict[int, float] = {}  # id of a session's cache -> when it last submitted a step
        self._hold: asyncio.TimerHandle | None = None  # a held run, waiting for more sessions' steps
        self._hold_until = 0.0
        self._last_run_s = 0.0  # how long the last run computed
        self._ran_at = 0.0  # when the last run ended
        self.split_at = 0.0  # when the last run that split its matmuls over threads ended
        self.split_choice = SplitChoice()
        self.batches = self.steps = 0  # how much batching happened (for metrics and tests)

    def submit(
        self,
        hidden: torch.Tensor,
        start: int,
        end: int,
        cache: SessionCache,
        position: int,
        adapter_name: str | None = None,
        turn: TurnAsk | None = None,
        onward: Callable[[torch.Tensor], None] | None = None,
        chain: int = 1,
    ) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        step = _DecodeStep(hidden, start, end, cache, position, loop.create_future(), adapter_name, turn, onward, chain)
        self._queue.append(step)
        self._stepped[id(cache)] = time.perf_counter()
        if not self._scheduled:
            self._scheduled = True
            self._turns = 0
            self._hold_until = 0.0
            loop.call_soon(self._run)
        elif self._hold is not None and not self._wants_more():
            self._hold.cancel()
            self._hold = None
            loop.call_soon(self._run)
        return step.future

    def _active(self) -> int:
        """How many open sessions stepped within ``ACTIVE_S``."""
        now = time.perf_counter()
        self._stepped = {key: at for key, at in self._stepped.items() if now - at <= ACTIVE_S}
        return min(len(self._stepped), self.sessions())

    def _wants_more(self) -> bool:
        """Whether the queue holds fewer than ``HOLD_SHARE`` of the active sessions' steps."""
        return len(self._queue) < HOLD_SHARE * min(self._active(), self.max_batch)

    def _run_size(self) -> int:
        """How many queued steps a run takes: up to ``max_batch``, and where the steps go on round a
        chain of several nodes (``chain``), one convoy's share of the active sessions: the chain's nodes
        then each compute a convoy at once. 8 own sessions through 2 nodes on one machine, whose steps
        went on as one convoy once a batch's pushes left together (``together``): 973 against 871
        tokens/s for the code before both. Through one node (a convoy per node), two convoys were slower:
        608 against 677."""
        chain = max(step.chain for step in self._queue)
        return self.max_batch if chain <= 1 else min(self.max_batch, max(1, -(-self._active() // chain)))

    def _run(self) -> None:
        self._hold = None
        loop = asyncio.get_running_loop()
        if self._turns < JOIN_TURNS and len(self._queue) < min(self.sessions(), self._run_size()):
            self._turns += 1  # other sessions' steps may be on their way through the loop
            loop.call_soon(self._run)
            return
        if not self._hold_until:
            first = self._queue[0]
            streamed = (first.end - first.start) * self.span.layer_bytes > self.hold_above_bytes
            self._hold_until = time.perf_counter() + (self._last_run_s if streamed else 0.0)
        if time.perf_counter() < self._hold_until and self._wants_more():
            self._hold = loop.call_at(loop.time() + self._hold_until - time.perf_counter(), self._run)
            return
        self._scheduled = False
        began = time.perf_counter()
        size = self._run_size()
        queue, self._queue = self._queue[:size], self._queue[size:]
        if self._queue:  # the next convoy, at once
            self._scheduled, self._turns, self._hold_until = True, JOIN_TURNS, 0.0
            loop.call_soon(self._run)
        groups: dict[tuple[int, int, str | None], list[_DecodeStep]] = {}
        for step in queue:
            if not step.future.cancelled():
                groups.setdefault((step.start, step.end, step.adapter_name), []).append(step)
        idle = began - self._ran_at
        lone = self.sessions() <= 1 and len(queue) == 1 and not queue[0].future.cancelled()
        one_thread = not (lone and self.split_choice.splits(idle))
        for (start, end, adapter_name), steps in groups.items():
            self._compute(start, end, steps, adapter_name, one_thread)
        self._ran_at = time.perf_counter()
        self._last_run_s = self._ran_at - began
        step = queue[0]
        if lone and step.future.done() and not step.future.cancelled() and step.future.exception() is None:
            self.split_choice.record(idle, not one_thread, self._last_run_s / max(1, step.end - step.start))
        if not one_thread:
            self.split_at = self._ran_at

    def _compute(
        self, start: int, end: int, steps: list[_DecodeStep], adapter_name: str | None, one_thread: bool
    ) -> None:
        try:
            outputs = None
            if len(steps) > 1:
                outputs = self.span.forward_decode_batch(
                    [s.hidden for s in steps], start, end, [s.cache for s in steps], [s.position for s in steps],
                    adapter_name,
                )  # fmt: skip
            if outputs is None:
                with matmuls_on_one_thread() if one_thread else spread_team(self.span.one_row_threads, short=True):
                    outputs = [
                        self.span.forward(s.hidden, start, end, s.cache, s.position, adapter_name) for s in steps
                    ]
        except Exception as e:
            logger.exception("A decode batch of %d steps failed", len(steps))
            for step in steps:
                if not step.future.done():
                    step.future.set_exception(e)
            return
        self.batches += 1
        self.steps += len(steps)
        metrics.node_decode_batch(len(steps))
        self._choose_turns(steps, outputs)
        with self.together():
            for step, output in zip(steps, outputs, strict=True):
                self._send_on(step, output)
        for step, output in zip(steps, outputs, strict=True):
            if not step.future.done():
                step.future.set_result(output)

    @staticmethod
    def _send_on(step: _DecodeStep, output: torch.Tensor) -> None:
        """The step's ``onward``; where it fails, the step fails with its error."""
        if step.onward is None or step.future.done():
            return
        try:
            step.onward(output)
        except Exception as e:
            logger.exception("Sending a decode step's output on failed")
            step.future.set_exception(e)

    def _choose_turns(self, steps: list[_DecodeStep], outputs: list[torch.Tensor]) -> None:
        """The tokens of the steps' token-loop turns, together where ``turns`` takes them; a turn it
        leaves (or fails on) is chosen by its session's handler, alone."""
        asked = [(output, step.turn) for step, output in zip(steps, outputs, strict=True) if step.turn is not None]
        if len(asked) < 2 or self.turns is None:
            return
        try:
            self.turns([output for output, _ in asked], [turn for _, turn in asked])
        except Exception:
            logger.exception("Choosing %d turns' tokens together failed; each is chosen alone", len(asked))
            for _, turn in asked:
                turn.token = None
