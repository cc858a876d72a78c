"""Generations that start together, with prompts of one length and the same settings, share a session.

Each session costs every node of its chain a message, a session's bookkeeping and a pass over its
layers' weights per step; the nodes batch the one-token steps of sessions that arrive together, but
the client's heads and the nodes' per-session work stay per session. Eight sessions at once through
2 Far Nodes ran 3.0-3.4x as fast as the same 8 one after another; the same 8 prompts as the rows of
one session ran 4.7-4.95x (performance log, eighteenth session). So a ``generate_ids`` call waits a
short window (``batch_window_ms``) for more calls, as inference servers' dynamic batchers do, and
runs those that match as the rows of one session, stepped by a thread of its own; each caller reads
its row's tokens. It waits only where company is likely: while another of the client's generations
runs, or within ``RECENT_S`` of the last time two ran at once (the first call of the next burst
then waits for the others, rather than running alone beside them: 4.76x against 4.35x). A client
that has not run two generations at once lately starts each at once: a lone user never waits.
Calls that do work of their own on the way (transformers' ``generate`` prepares for 1.3-2.9 ms, and
threads that start together do so one after another, under the GIL) announce themselves first, and
a window waits for those still on their way (``announce``).

Rows match when their prompts have the same length and every setting that shapes the choice of
tokens is the same (seeded sampling runs alone: its draws depend on the batch). Each row ends at
its own EOS and its own ``max_new_tokens``, as it would alone; a caller that stops reading leaves
the others going, and the session closes when every row is done.
"""

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import closing, contextmanager
from contextvars import ContextVar

import torch

logger = logging.getLogger(__name__)

# Steps the rows of a batch through one session: (input_ids [rows, prompt], max_new_tokens) -> each
# step's token ids [rows], until every row has hit EOS or the tokens run out.
BatchRun = Callable[[torch.Tensor, int], Iterator[torch.Tensor]]

RECENT_S = 10.0  # a client that had generations running together this recently expects more of them
MAX_ROWS = 32  # rows of one session at most (nodes refuse batches over their max_batch_size, 64 by default)
ARRIVAL_WAIT_S = 0.05  # a window waits at most this much longer for announced calls still on their way

_END = object()  # a row's last item: its tokens are all there
_ALONE = object()  # a row's only item when its batch could not start: the caller runs it alone


class _Failed:
    """A row's last item when its session failed."""

    def __init__(self, error: BaseException):
        self.error = error


class _Row:
    """One call's prompt, and the queue its tokens reach it through."""

    def __init__(self, input_ids: torch.Tensor, max_new_tokens: int):
        self.input_ids, self.max_new_tokens = input_ids, max_new_tokens
        self.items: queue.SimpleQueue = queue.SimpleQueue()
        self.left = False  # the caller stopped reading


class _Announcement:
    """A call on its way to ``GenerationBatcher.generate`` (see ``announce``)."""

    arrived = False


class GenerationBatcher:
    """Groups concurrent generations into sessions of several rows (see the module's docstring).

    ``generate(input_ids, max_new_tokens, key, alone, batch)``: ``key`` says which calls may share a
    session (None: none may), ``alone()`` runs the call by itself, ``batch`` runs several rows.
    """

    def __init__(self, window_s: float, eos_ids: set[int]):
        self.window_s, self.eos_ids = window_s, eos_ids
        self._lock = threading.Lock()
        self._arrival = threading.Condition(self._lock)  # an announced call arrived (or will not come)
        self._arriving = 0  # announced calls that have not reached ``generate`` yet
        self._announced: ContextVar[_Announcement | None] = ContextVar("farmesh_announced", default=None)
        self._running = 0  # generations under way on this client
        self._crowded_at = -math.inf  # when it last had two or more under way
        self._forming: dict[Hashable, list[_Row]] = {}  # key -> the rows of a batch still taking more
        self.batches = self.batched_rows = 0  # sessions run with several rows, and their rows
        self.unstarted = 0  # of those, the ones that failed before their first token (their rows went alone)

    @contextmanager
    def announce(self) -> Iterator[None]:
        """Around a call that does work of its own before it reaches ``generate`` (transformers'
        preparation of a ``generate`` call takes 1.3-2.9 ms, and threads starting together do theirs
        one after another under the GIL): a window opened meanwhile waits for it, up to
        ``ARRIVAL_WAIT_S``, and the first call to arrive expects it. A call that turns out not to
        share says so with ``arrive()``, or arrives as the block ends."""
        if self._announced.get() is not None:  # announced already, further out
            yield
            return
        announcement = _Announcement()
        with self._lock:
            self._arriving += 1
        reset = self._announced.set(announcement)
        try:
            yield
        finally:
            self._announced.reset(reset)
            with self._lock:
                self._arrived(announcement)

    def arrive(self) -> None:
        """The current call's announcement is over: it goes no further towards ``generate``."""
        if (announcement := self._announced.get()) is not None:
            with self._lock:
                self._arrived(announcement)

    def _arrived(self, announcement: _Announcement) -> None:
        """(Under the lock.)"""
        if not announcement.arrived:
            announcement.arrived = True
            self._arriving -= 1
            self._arrival.notify_all()

    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        key: Hashable | None,
        alone: Callable[[], Iterator[torch.Tensor]],
        batch: BatchRun,
    ) -> Iterator[torch.Tensor]:
        row = _Row(input_ids, max_new_tokens)
        with self._lock:
            if (announcement := self._announced.get()) is not None:
                self._arrived(announcement)
            now = time.monotonic()
            if self._running > 0:
                self._crowded_at = now
            rows = None
            expecting = self._running > 0 or self._arriving > 0 or now - self._crowded_at < RECENT_S
            if key is not None and self.window_s > 0 and expecting:
                rows = self._forming.setdefault(key, [])
                rows.append(row)
                if len(rows) == MAX_ROWS:  # full: the next call starts another
                    del self._forming[key]
            self._running += 1
        try:
            if rows is None:
                yield from alone()
                return
            if rows[0] is row:
                self._gather(key, rows, batch)
            if len(rows) == 1 or (item := row.items.get()) is _ALONE:
                yield from alone()
                return
            while item is not _END:
                if isinstance(item, _Failed):
                    raise item.error
                yield item
                item = row.items.get()
        finally:
            row.left = True
            with self._lock:
                if self._running > 1:
                    self._crowded_at = time.monotonic()
                self._running -= 1

    def _gather(self, key: Hashable, rows: list[_Row], batch: BatchRun) -> None:
        """The first row's part: wait the window for more rows (and for announced calls still on their
        way), then step them in a thread of their own."""
        try:
            time.sleep(self.window_s)
            with self._lock:
                deadline = time.monotonic() + ARRIVAL_WAIT_S
                while self._arriving > 0 and self._forming.get(key) is rows:
                    if (left := deadline - time.monotonic()) <= 0:
                        break
                    self._arrival.wait(left)
        finally:  # the rows that joined are stepped even if this caller was interrupted meanwhile
            with self._lock:
                if self._forming.get(key) is rows:
                    del self._forming[key]
                if len(rows) > 1:
                    self.batches += 1
                    self.batched_rows += len(rows)
            if len(rows) > 1:
                thread = threading.Thread(target=self._drive, args=(rows, batch), name="farmesh-batch", daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # no thread to be had: each row goes alone
                    for row in rows:
                        row.items.put(_ALONE)

    def _drive(self, rows: list[_Row], batch: BatchRun) -> None:
        """Step ``rows`` as one session and hand each row its tokens, until every row is done. If the
        session fails before its first token (a node refusing the batch, say), each row runs alone."""
        done = [False] * len(rows)
        started = False
        try:
            input_ids = torch.cat([row.input_ids for row in rows])
            with closing(batch(input_ids, max(row.max_new_tokens for row in rows))) as steps:
                for count, token in enumerate(steps, 1):
                    started = True
                    for i, row in enumerate(rows):
                        if done[i] or row.left:
                            done[i] = True
                            continue
                        row.items.put(token[i : i + 1])
                        if count == row.max_new_tokens or int(token[i]) in self.eos_ids:
                            row.items.put(_END)
                            done[i] = True
                    if all(done):
                        return
        except BaseException as e:
            logger.info("A session of %d rows failed%s: %r", len(rows), "" if started else "; they go alone", e)
            with self._lock:
                self.unstarted += not started
            for row, finished in zip(rows, done, strict=True):
                if not finished:
                    row.items.put(_Failed(e) if started else _ALONE)
            return
        for row, finished in zip(rows, done, strict=True):
            if not finished:  # (the steps ended with every row at EOS: already done)
                row.items.put(_END)
