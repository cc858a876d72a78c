"""Continuous batching: one-token steps of different sessions that arrive together run as one batch.

A step is queued and a run is scheduled on the event loop. While a batch computes (inline, blocking
the loop), other sessions' steps pile up in their streams; a step needs a few turns of the loop to
go from its socket to the queue, so while other sessions are open the run waits up to
``JOIN_TURNS`` turns (tens of microseconds) for them, then takes all that arrived. A busy
node's throughput grows with load while a node with one session adds no delay. Steps are served in
arrival order, at most ``max_batch`` per run.
"""

import asyncio
import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from farmesh_core import metrics
from farmesh_core.node.kv_cache import SessionCache
from farmesh_core.node.layer_span import LayerSpan
from farmesh_core.row_matmul import matmuls_on_one_thread

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


JOIN_TURNS = 4  # turns of the event loop a run waits for other open sessions' steps


class DecodeBatcher:
    """Queues one-token, one-sequence steps and runs those for the same layers and LoRA adapter together.

    ``sessions()`` says how many sessions are open on the node: with one, a step runs at once.
    """

    def __init__(self, span: LayerSpan, max_batch: int = 32, sessions: Callable[[], int] = lambda: 1):
        self.span, self.max_batch, self.sessions = span, max_batch, sessions
        self._queue: list[_DecodeStep] = []
        self._scheduled = False
        self._turns = 0
        self.batches = self.steps = 0  # how much batching happened (for metrics and tests)

    def submit(
        self,
        hidden: torch.Tensor,
        start: int,
        end: int,
        cache: SessionCache,
        position: int,
        adapter_name: str | None = None,
    ) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        step = _DecodeStep(hidden, start, end, cache, position, loop.create_future(), adapter_name)
        self._queue.append(step)
        if not self._scheduled:
            self._scheduled = True
            self._turns = 0
            loop.call_soon(self._run)
        return step.future

    def _run(self) -> None:
        if self._turns < JOIN_TURNS and len(self._queue) < min(self.sessions(), self.max_batch):
            self._turns += 1  # other sessions' steps may be on their way through the loop
            asyncio.get_running_loop().call_soon(self._run)
            return
        self._scheduled = False
        queue, self._queue = self._queue, []
        groups: dict[tuple[int, int, str | None], list[_DecodeStep]] = {}
        for step in queue:
            if not step.future.cancelled():
                groups.setdefault((step.start, step.end, step.adapter_name), []).append(step)
        for (start, end, adapter_name), steps in groups.items():
            for first in range(0, len(steps), self.max_batch):
                self._compute(start, end, steps[first : first + self.max_batch], adapter_name)

    def _compute(self, start: int, end: int, steps: list[_DecodeStep], adapter_name: str | None = None) -> None:
        try:
            outputs = None
            if len(steps) > 1:
                outputs = self.span.forward_decode_batch(
                    [s.hidden for s in steps], start, end, [s.cache for s in steps], [s.position for s in steps],
                    adapter_name,
                )  # fmt: skip
            if outputs is None:
                with matmuls_on_one_thread() if self.sessions() > 1 else nullcontext():
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
        for step, output in zip(steps, outputs, strict=True):
            if not step.future.done():
                step.future.set_result(output)
