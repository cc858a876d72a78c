"""An asyncio loop in a daemon thread, so synchronous code (the client, FarNode.start) can drive P2P."""

import asyncio
import os
import threading
import weakref
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

from farmesh_core.openmp import set_thread_count

T = TypeVar("T")


class BackgroundLoop:
    """Runs one event loop forever in a thread; ``run(coro)`` blocks until the coroutine is done.

    The loop is uvloop's (libuv, hivemind's own choice for its DHT): a node's one-token steps go
    through it several times each (a push read, the step, the push on, the answer), and with it 2
    nodes on one machine decoded at 3.00 against 3.34 and 3.10 against 3.51 ms a token (19 of 20 and
    16 of 16 alternating generations, baseline model; 1 node: the same).

    Torch ops on the loop's thread (decoding tensors, a node's small steps) use one torch thread:
    they are small, and a multi-threaded one would start an OpenMP team for this thread besides the
    caller's, which made copying a 2 MB answer take 6-8 ms instead of 0.2 (see openmp.py).
    """

    def __init__(self, name: str = "farmesh-loop"):
        self.loop = uvloop.new_event_loop()
        _LOOPS.add(self)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        set_thread_count(1)
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Coroutine[Any, Any, T]) -> "asyncio.Future[T]":
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def is_current(self) -> bool:
        """Whether the caller runs on this loop's thread."""
        return threading.current_thread() is self._thread

    def stop(self) -> None:
        """Cancel what still runs on the loop (open streams, P2P readers), then stop the thread."""
        if not self.loop.is_running():
            return
        try:
            self.run(_cancel_other_tasks(), timeout=5)
        except Exception:
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


_LOOPS: "weakref.WeakSet[BackgroundLoop]" = weakref.WeakSet()


def _silence_copied_loops() -> None:
    """In a forked child: the loops are copies whose threads stayed in the parent, and never run here.
    Their pending tasks (P2P readers and writers) would each log "Task was destroyed but it is
    pending!" as the child's interpreter ends; they are the parent's, not the child's to report."""
    for background in list(_LOOPS):
        background.loop.set_exception_handler(lambda loop, context: None)


os.register_at_fork(after_in_child=_silence_copied_loops)


async def _cancel_other_tasks() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
