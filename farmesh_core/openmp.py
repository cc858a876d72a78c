"""Torch's thread count for a block, and ending the OpenMP worker threads that a Far Node's large
steps and loading started.

GNU OpenMP, torch's CPU threading here, keeps a team of worker threads for every thread that ran a
multi-threaded op, for as long as that thread lives. Once a process holds more such workers than
there are cores, OpenMP stops spinning between parallel regions and wakes its workers through the
kernel each time. A one-token step on the event loop makes a parallel region per matmul (see
``row_matmul.row_blocks``): with the loading thread's and the large-step worker's teams alive, its
split matmuls ran slower than on one thread (5.4 against 2.5 ms for 56 of them). So the threads that
run large steps, and the one that loaded the layers, end their workers when done (OpenMP 5.0's
``omp_pause_resource_all``); the next large step starts them again, which costs far less than a
fresh thread per step did (33 against 41 ms for a [4x128] forward through 4 layers).
"""

import ctypes
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_OMP_PAUSE_SOFT = 1
_RUNTIMES = ("libgomp", "libiomp5", "libomp")  # GNU, Intel and LLVM OpenMP all have omp_pause_resource_all


@cache
def _runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime torch loaded (bundled with its wheel), or None if none is found."""
    package = Path(torch.__file__).parent
    for folder in (package / "lib", package.parent / "torch.libs"):
        for path in sorted(folder.glob("lib*omp*.so*")) + sorted(folder.glob("lib*omp*.dylib")):
            if path.name.startswith(_RUNTIMES):
                try:
                    library = ctypes.CDLL(str(path))
                except OSError:
                    continue
                if hasattr(library, "omp_pause_resource_all"):
                    return library
    logger.debug("no OpenMP runtime with omp_pause_resource_all next to torch: worker threads are kept")
    return None


def release_worker_threads() -> None:
    """End the OpenMP worker threads of the calling thread's team, if any; its next multi-threaded
    op starts them again. Call it outside parallel regions, when the thread's multi-threaded work is done."""
    runtime = _runtime()
    if runtime is not None:
        runtime.omp_pause_resource_all(_OMP_PAUSE_SOFT)


def set_thread_count(threads: int) -> None:
    """``torch.set_num_threads(threads)`` for the calling thread, for good. ATen gives each thread its
    count lazily, at its first parallel op (or ``get_num_threads``), from the count that any thread of
    the process set last, and that overwrites a count the thread set before: a node's compute worker,
    started with 2, ran its large steps on 1 because the event loop had set 1 since. So the thread
    takes its lazy count first."""
    torch.get_num_threads()
    torch.set_num_threads(threads)


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """The calling thread's torch ops on ``threads`` threads within the block (torch's count is per thread)."""
    previous = torch.get_num_threads()
    if previous == threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
