"""A large cacheless step (forward, backward) with its batch's rows split into groups that run at once.

A [4x128] forward through 4 layers of the tiny Llama (hidden 256) took 27.3-30.4 ms on a node's
two torch threads here, and 20.3 ms as two groups of 2 rows, each on a thread of its own with one
torch thread, with the same bits: small matmuls on two OpenMP threads meet at a barrier after each
op, and the thread that waits there sleeps and is woken through the kernel (see openmp.py), where
two single-threaded groups never wait for each other. On a hidden-1024 model both took the same
(246 against 250 ms). Rows are independent without a cache (each attends to itself only), so a
group's rows come out as they would in the whole batch.
"""

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

import torch

from farmesh_core.openmp import release_worker_threads, torch_threads


class RowGroups:
    """Splits a step over ``threads`` torch threads into groups of rows, one per thread (or, where the
    batch has fewer rows than that, one per row with an equal share of the threads)."""

    def __init__(self, threads: int):
        self.threads = threads
        self._pool = (
            ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="farmesh-rows") if threads > 1 else None
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def run(self, fn: Callable[..., torch.Tensor], split: int, *args) -> torch.Tensor:
        """``fn(*args)``, whose first ``split`` arguments are tensors [batch, ...] whose rows it treats
        independently, with those rows in groups at once; the calling thread runs the first group."""
        groups = min(args[0].shape[0], self.threads)
        if groups < 2 or self._pool is None:
            return fn(*args)
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
