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

A node also keeps the threads of a team apart, on CPUs of their own, while the team works (:func:`spread_team`).
"""

import ctypes
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
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
    _spread.threads = 0  # a new team's workers start where their leader may run


_PIN_BODY = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
# this thread's team: threads (how many of it were placed), lead (the CPU its leader takes, or None),
# workers (the CPUs its workers have)
_spread = threading.local()
_pin_lock = threading.Lock()  # one pinning pass at a time: they share _placement
_placement: dict[int, set[int]] = {}  # thread number in the team -> its CPUs, for the pass under way
spreading = False  # whether spread_team pins (FarNode turns it on: see NodeConfig.spread_threads)
home_cpu: int | None = None  # the CPU every team of this process leads from (FarNode claims it: see home_cpu.py)


def _pin_this_thread(_data) -> None:
    """The body of a pinning pass, run by every thread of the team (a ctypes callback)."""
    try:
        cpus = _placement.get(_runtime().omp_get_thread_num())
        if cpus:
            os.sched_setaffinity(0, cpus)
    except Exception:  # (an exception cannot leave a C callback)
        logger.debug("could not pin an OpenMP worker", exc_info=True)


_pin_body = _PIN_BODY(_pin_this_thread)


def worker_cpus(cpus: list[int], lead: int, threads: int) -> dict[int, set[int]]:
    """Where the workers (1 to ``threads - 1``) of a team led from CPU ``lead`` go: each to a share
    of its own of the other ``cpus`` (on 2 CPUs, the other one), or where the team has as many
    threads as there are CPUs or more, each to one CPU in turn after the lead's, so that every CPU
    carries as many of the team as any other."""
    first = cpus.index(lead)
    if threads >= len(cpus):
        return {i: {cpus[(first + i) % len(cpus)]} for i in range(1, threads)}
    others = [cpus[(first + k) % len(cpus)] for k in range(1, len(cpus))]
    return {i: set(others[i - 1 :: threads - 1]) for i in range(1, threads)}


def _lead_cpu(threads: int) -> int | None:
    """The CPU the calling thread takes while it leads its team of ``threads`` (the process's
    ``home_cpu``, else the one it runs on when the team is placed), its workers pinned as
    :func:`worker_cpus` says. Once per team: a released team's new workers are placed again. None
    where nothing is pinned."""
    if not spreading or threads < 2:
        return None
    if getattr(_spread, "threads", 0) >= threads:
        return _spread.lead
    _spread.threads, _spread.lead = threads, None  # (tried once per team, even where it cannot pin)
    if not spreads(threads):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    runtime = _runtime()
    here = _current_cpu()
    lead = home_cpu if home_cpu in cpus else here if here in cpus else cpus[0]
    workers = worker_cpus(cpus, lead, threads)
    with _pin_lock:
        _placement.clear()
        _placement.update(workers)
        runtime.GOMP_parallel(_pin_body, None, ctypes.c_uint(threads), ctypes.c_uint(0))
    _spread.lead, _spread.workers = lead, set().union(*workers.values())
    return _spread.lead


def spreads(threads: int) -> bool:
    """Whether :func:`spread_team` gives a team of ``threads`` CPUs of their own in this process."""
    runtime = _runtime()
    return (
        spreading
        and threads >= 2
        and runtime is not None
        and hasattr(runtime, "GOMP_parallel")
        and hasattr(os, "sched_getaffinity")
        and len(os.sched_getaffinity(0)) >= 2
    )


@contextmanager
def spread_team(threads: int, short: bool = False) -> Iterator[None]:
    """Within the block, the calling thread's OpenMP team of ``threads`` runs apart: each worker pinned
    to CPUs of its own, the calling thread (its leader) to another one until the block ends (see
    _lead_cpu). For a ``short`` block the leader is pinned only if it runs on a worker's CPU: a node
    looping tokens through itself steps back to back, and there a leader held to its CPU waited for
    the client reading on it (2.84 against 2.44 ms a token, 15 of 16 generations), where a chain's
    steps after idling needed it pinned (3.52 against 4.16). Does nothing unless ``spreading`` is on,
    or where there is no GNU-compatible OpenMP runtime or CPU affinity.

    Left to themselves, the team's threads met on one CPU on this machine (a VM whose kernel packs
    threads onto few vCPUs): a worker that had slept ~10 ms or more was woken on its leader's CPU, or
    the leader moved onto its worker's, and the two then took turns there, each sleeping at every
    barrier. A 2-thread prefill of 34 tokens through 4 tiny-Llama layers took 12-20 ms after 12-50 ms
    of idling (one thread: 3.2-4.1), and a split one-token step 8.9 ms after 6 ms (0.6 back to back)."""
    lead = _lead_cpu(threads)
    if lead is None or short and _current_cpu() not in _spread.workers:
        yield
        return
    own = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {lead})
    except OSError:  # (the CPU left this process's set since: the step runs where it is)
        own = None
    try:
        yield
    finally:
        if own is not None:
            with suppress(OSError):
                os.sched_setaffinity(0, own)


def on_spread_team(threads: int, fn, *args):
    """``fn(*args)`` within :func:`spread_team` of ``threads``."""
    with spread_team(threads):
        return fn(*args)


@cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def _current_cpu() -> int:
    """The CPU the calling thread runs on (-1 where the C library cannot say)."""
    libc = _libc()
    return libc.sched_getcpu() if libc is not None and hasattr(libc, "sched_getcpu") else -1


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
    """The calling thread's torch ops on ``threads`` threads within the block (torch's count is per
    thread), their team kept apart (:func:`spread_team`)."""
    previous = torch.get_num_threads()
    if previous != threads:
        torch.set_num_threads(threads)
    try:
        with spread_team(threads):
            yield
    finally:
        if previous != threads:
            torch.set_num_threads(previous)
