"""Multi-threaded torch work of a Far Node runs on threads that end when it is done.

GNU OpenMP, torch's CPU threading here, keeps a team of worker threads for every thread that ever
ran a multi-threaded op, for as long as that thread lives. Once a process holds more such workers
than there are cores, OpenMP stops spinning between parallel regions and wakes its workers through
the kernel each time. A one-token step makes a parallel region per matmul (see
``lean_layer._row_blocks``): with the loading thread's and a pooled large-step worker's teams alive,
the event loop's split matmuls ran slower than on one thread (4.7 against 2.6 ms for 56 of them).
A thread that ends takes its team with it, so only the event loop keeps one.
"""

import threading
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def run_on_own_thread(fn: Callable[..., T], *args, threads: int | None = None) -> T:
    """``fn(*args)`` on a new thread (with ``threads`` torch threads, if given); blocks until it returns
    and re-raises what it raised."""
    outcome: dict[str, object] = {}

    def target() -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            outcome["result"] = fn(*args)
        except BaseException as e:  # handed to the caller's thread
            outcome["error"] = e

    thread = threading.Thread(target=target, name=f"farmesh-{getattr(fn, '__name__', 'compute')}", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["result"]  # type: ignore[return-value]
