"""A large cacheless step (forward, backward) with its batch's rows split into groups that run at once.

A [4x128] forward through 4 layers of the tiny Llama (hidden 256) took 27.3-30.4 ms on a node's
two torch threads here, and 20.3 ms as two groups of 2 rows, each on a thread of its own with one
torch thread: small matmuls on two OpenMP threads meet at a barrier after each op, and the thread
that waits there sleeps and is woken through the kernel (see openmp.py), where two single-threaded
groups never wait for each other. On a hidden-1024 model both took the same (246 against 250 ms).

Rows are independent without a cache, but a group's matmuls have fewer rows than the whole batch's,
and MKL picks its kernels by shape: 2 rows of 13 tokens split into single rows came out 3.8e-6 off
in the forward and 1.3e-3 in the backward (other shapes tried, all bit-identical). So, as with
``row_matmul.row_blocks``, each step's shape is checked once, whole and in groups, and runs in groups
only where the bits are the same.
"""

from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor, wait
from functools import partial

import torch

from farmesh_core.openmp import on_spread_team, release_worker_threads, set_thread_count, torch_threads

MAX_VERDICTS = 1024  # shapes remembered (the oldest forgotten first)


class RowGroups:
    """Splits a step over ``threads`` torch threads into groups of rows, one per thread (or, where the
    batch has fewer rows than that, one per row with an equal share of the threads)."""

    def __init__(self, threads: int):
        self.threads = threads
        self._pool = (
            ThreadPoolExecutor(threads - 1, "farmesh-rows", initializer=set_thread_count, initargs=(1,))
            if threads > 1
            else None
        )
        self._verdicts: OrderedDict[Hashable, bool] = OrderedDict()  # step shape -> grouped bits are the same

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def run(self, fn: Callable[..., torch.Tensor], split: int, *args) -> torch.Tensor:
        """``fn(*args)``, whose first ``split`` arguments are tensors [batch, ...] whose rows it treats
        independently, with those rows in groups at once where that keeps the bits (checked the first
        time a shape comes: then it runs both ways); the calling thread runs the first group. The other
        arguments must be hashable: they are part of the shape. Run whole, it takes the calling thread's
        team of ``threads`` spread over the CPUs (see openmp.spread_team); in groups, each group's."""
        whole = partial(on_spread_team, self.threads, fn, *args)
        groups = min(args[0].shape[0], self.threads)
        if groups < 2 or self._pool is None:
            return whole()
        key = (getattr(fn, "__qualname__", repr(fn)), *(tuple(t.shape) for t in args[:split]), *args[split:])
        verdict = self._verdicts.get(key)
        if verdict is False:
            return whole()
        grouped = self._in_groups(fn, split, args, groups)
        if verdict is None:
            out = whole()
            self._verdicts[key] = torch.equal(out, grouped)
            if len(self._verdicts) > MAX_VERDICTS:
                self._verdicts.popitem(last=False)
            return out
        return grouped

    def _in_groups(self, fn: Callable[..., torch.Tensor], split: int, args: tuple, groups: int) -> torch.Tensor:
        parts = [tensor.tensor_split(groups) for tensor in args[:split]]
        rest, threads = args[split:], self.threads // groups

        def group(index: int) -> torch.Tensor:
            with torch_threads(threads):
                try:
                    return fn(*(part[index] for part in parts), *rest)
                finally:
                    if threads > 1:
                        release_worker_threads()

        others = [self._pool.submit(group, index) for index in range(1, groups)]
        try:
            first = group(0)
        finally:
            wait(others)  # no group outlives the step, even a failed one
        return torch.cat([first, *(future.result() for future in others)])
