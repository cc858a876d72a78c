"""The client's LM head over two threads when it is large.

A one-token step ends in the client with a one-row ``F.linear`` through the LM head, which MKL runs
as a GEMV on one core whatever the torch threads: with a 32k vocabulary and hidden size 256 that
took 4.4 ms per token here with cold caches, as much as the step through 8 layers. Two halves of
the head's rows on two threads took 2.5 ms. The second half runs on a helper thread with one torch
thread (no OpenMP team: its spinning after each step would take a core from nodes on the same
machine), and each output is still a dot product over the whole row, so the logits keep their bits;
that is checked once on the weight before the halves are used. The rows of concurrent sessions
(batched by :mod:`farmesh_core.head_batch`), and its quick approximate logits, are split the same way.
"""

import logging
import queue
import threading
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

from farmesh_core.openmp import set_thread_count
from farmesh_core.row_matmul import rows_linear

logger = logging.getLogger(__name__)

MIN_WEIGHT_BYTES = 8 * 1024**2  # smaller heads take well under a millisecond on one core


class SplitHead:
    """``F.linear(x, weight)`` with half of ``weight``'s rows on a helper thread.

    One caller at a time: the client's :class:`~farmesh_core.head_batch.HeadBatcher` makes sure."""

    def __init__(self, weight: torch.Tensor):
        half = weight.shape[0] // 2
        self.parts = (weight[:half], weight[half:])
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=_serve, args=(self._jobs,), name="farmesh-head", daemon=True).start()
        # The helper ends with the head (it holds no reference to it), but not at interpreter exit: a
        # thread ending then raced the process's own teardown ("terminate called", exit code 134).
        weakref.finalize(self, self._jobs.put, None).atexit = False
        with torch.inference_mode():
            rows = [torch.randn(1, weight.shape[1], dtype=weight.dtype, device=weight.device) for _ in range(3)]
            self.exact = all(torch.equal(self(x), F.linear(x, weight)) for x in rows)
        if not self.exact:
            logger.debug("the LM head stays on one thread: its halves change the bits of the logits")

    @staticmethod
    def fits(weight: torch.Tensor) -> bool:
        return weight.device.type == "cpu" and weight.is_contiguous() and weight.nbytes >= MIN_WEIGHT_BYTES

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of ``x`` [..., hidden]: one row keeps ``F.linear``'s bits where ``exact``."""
        return self.halves(rows_linear, x, *self.parts)

    def halves(self, fn: Callable, x: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """``cat(fn(x, first), fn(x, second))`` along the last dimension, the second on the helper thread."""
        done, out = threading.Event(), []
        self._jobs.put((fn, x, second, out, done))
        mine = fn(x, first)
        done.wait()
        if isinstance(out[0], BaseException):
            raise out[0]
        return torch.cat([mine, out[0]], dim=-1)


def _serve(jobs: queue.SimpleQueue) -> None:
    """The helper thread: ``fn(x, weight)`` for each job, until None comes."""
    set_thread_count(1)
    while (job := jobs.get()) is not None:
        fn, x, weight, out, done = job
        try:
            with torch.inference_mode():
                out.append(fn(x, weight))
        except BaseException as e:  # handed to the caller, which raises it
            out.append(e)
        done.set()
