"""One pass through the client's LM head for the concurrent sessions' rows.

Each session's one-token step ends in the client with a one-row ``F.linear`` through the LM head, a
GEMV that streams the whole head weight from memory for one row: with a 32k vocabulary and hidden
size 256 that is 33 MB and several milliseconds per token. Sessions of one client that reach the
head together (threads generating at once, the coordinator's requests) share one GEMM instead: a
caller that finds the head idle computes its row alone, and the callers that arrive meanwhile are
computed together as soon as it is done, by the first of them. Steps of several sessions often
end together (a node answers a batch of them at once), but their threads reach the head one after
another, tens of microseconds apart: so where a pass through the head costs more than that wait
(heads of ``LINGER_MIN_BYTES`` or more), a caller that finds the head idle waits up to ``LINGER_S``
for the other threads that used the head within ``RECENT_S``. A lone session never waits, and its
row alone gets ``F.linear``'s exact bits (unless it asks for quicker approximate logits); rows
computed together can differ from them in the last bits, as the nodes' batched steps can.
"""

import functools
import logging
import math
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F

from farmesh_core.openmp import torch_threads
from farmesh_core.row_matmul import packed_linear, packed_weight, rows_linear, same_bits
from farmesh_core.split_head import SplitHead

logger = logging.getLogger(__name__)

LINGER_S = 0.0005  # how long an idle head's first caller waits for the rows of other recent callers
RECENT_S = 0.05  # callers seen within this long count as active (a session steps every few ms to tens)
LINGER_MIN_BYTES = 8 * 1024**2  # smaller heads take well under LINGER_S a pass: waiting would cost more
FAST_MAX_BYTES = 512 * 1024**2  # larger float32 heads get no float16 copy, larger 16-bit ones no packed copy


# refine(ids) -> (the logits of those ids summed closer, in float64; how far the exact float32
# logits of each may be from them): see HeadBatcher.refine
Refine = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class ApproximateLogits(NamedTuple):
    """Quick logits of one row ``x``, each within ``bound`` of the exact ones (``F.linear``'s), and
    ``refine(ids)``: those ids' logits summed in float64, with how far the exact ones may be from each
    (see ``HeadBatcher.refine``), to settle near ties without the whole exact pass."""

    logits: torch.Tensor
    bound: float
    refine: Refine


class _Waiting:
    __slots__ = ("row", "fast", "out")

    def __init__(self, row: torch.Tensor, fast: bool):
        self.row, self.fast = row, fast
        self.out: torch.Tensor | BaseException | None = None


class HeadBatcher:
    """``F.linear(x, weight)`` for one row ``x`` at a time from many threads, batched; over two
    threads (:class:`~farmesh_core.split_head.SplitHead`) where the head is large.

    A 16-bit head multiplies through a copy packed for oneDNN (two, for the split head's halves) where
    a lone row keeps ``F.linear``'s bits so (:func:`_packed_linear`).

    A large float32 head also keeps a float16 copy for callers that take approximate logits
    (``fast=True``, with :meth:`error_bound`): fbgemm's GEMM with float16 weights (summing in float32)
    streams half the bytes, and far better than ``F.linear``'s GEMV: for 32000x256 on one core here,
    0.41 against 3.9 ms for one row, 1.4 against 7.1 for eight. Its logits differ from the exact ones
    by the weights' rounding, within the bound. The copy is kept as two halves of the vocabulary, one
    for each of the split head's threads.
    """

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        split = SplitHead(weight) if SplitHead.fits(weight) else None
        self.linear: Callable[[torch.Tensor], torch.Tensor] = (
            split if split is not None and split.exact else functools.partial(rows_linear, weight=weight)
        )
        threads = torch.get_num_threads()
        self.linear = _packed_linear(weight, split, threads) or self.linear
        # A lone row through an unsplit head on one torch thread, where that keeps its bits: a 16-bit
        # F.linear goes to oneDNN, whose OpenMP team then spins on the machine's other cores, the nodes'
        # (a client choosing each token of a bfloat16 tiny Llama through one node: 3.64 against 4.93 ms).
        alone = functools.partial(_on_one_thread, self.linear)
        self._lone_on_one_thread = (
            self.linear is not split and threads > 1
            and same_bits(alone, self.linear, weight.shape[1], weight.dtype, threads, one_thread=False)
        )  # fmt: skip
        quick = split is not None and weight.dtype == torch.float32 and weight.nbytes <= FAST_MAX_BYTES
        self._split = split
        # Any float32 dot product of n terms is within g = n*u/(1-n*u) times sum|w_i x_i| of the exact
        # sum, whatever the order of its sums (u = 2^-24), and sum|w_i x_i| <= |w| |x| (Cauchy-Schwarz).
        # The float16 copy's sums (of weights h) add |x.(w - h)| <= |w - h| |x|.
        n, u = weight.shape[1], 2.0**-24
        self._g = g = n * u / (1 - n * u)
        self._bound_per_norm = _float16_bound(weight, g) if quick else math.inf
        # the float16 copy's two halves (the vocabulary's first and second half), packed for fbgemm;
        # none where a weight is beyond float16's range (the bound is infinite then)
        self.quick: tuple[torch.Tensor, ...] | None = None
        if math.isfinite(self._bound_per_norm):
            self.quick = _float16_halves(split, g)
        self.passes = self.rows = 0  # how many passes through the head, for how many rows
        lock = threading.Lock()
        self._turn = threading.Condition(lock)  # callers wait here for their logits
        self._arrival = threading.Condition(lock)  # a lingering caller waits here for other rows
        self._busy = False
        self._queue: list[_Waiting] = []
        self._lingers = weight.nbytes >= LINGER_MIN_BYTES
        self._last_call: dict[int, float] = {}  # thread id -> when it last called (heads that linger)

    def takes(self, x: torch.Tensor, rows: int = 1) -> bool:
        """Whether ``x`` is ``rows`` rows this head can batch with others (else the caller uses the module)."""
        weight = self.weight
        width = x.shape[-1] == weight.shape[1] and x.numel() == rows * x.shape[-1]
        return width and (x.dtype, x.device) == (weight.dtype, weight.device)

    def approximate(self, x: torch.Tensor) -> ApproximateLogits:
        """Quick approximate logits of one row ``x`` (needs :attr:`quick`)."""
        return ApproximateLogits(self(x, fast=True), self.error_bound(x), functools.partial(self.refine, x))

    def approximate_rows(self, x: torch.Tensor) -> list[ApproximateLogits]:
        """:meth:`approximate` for each row of ``x`` [rows, hidden] (a shared session's), in one pass."""
        logits = self(x, fast=True)
        return [
            ApproximateLogits(logits[i : i + 1], self.error_bound(row), functools.partial(self.refine, row))
            for i, row in enumerate(x.split(1))
        ]

    def refine(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits of ``ids`` for one row ``x`` summed in float64, and how far ``F.linear``'s (float32)
        may be from each: within ``g |x| |w|`` of the exact sum (see ``__init__``); float64's own
        error is some 2^29 times smaller, well inside the 1% added."""
        rows, row = self.weight.detach()[ids].double(), x.detach().reshape(-1).double()
        return rows @ row, 1.01 * self._g * float(row.norm()) * rows.norm(dim=1)

    def error_bound(self, x: torch.Tensor) -> float:
        """How far any logit of ``self(x, fast=True)`` (alone or in a batch) may be from
        ``F.linear(x, weight)``'s: both sums' rounding and the float16 weights' (see ``_float16_bound``)."""
        return self._bound_per_norm * float(x.norm())

    def __call__(self, x: torch.Tensor, fast: bool = False) -> torch.Tensor:
        """The logits of one row ``x`` ([..., hidden] with one row; several for ``fast`` ones), shaped
        ``[..., vocab]``; ``fast`` takes approximate ones (within :meth:`error_bound`) where that is quicker."""
        me = _Waiting(x, fast and self.quick is not None)
        with self._turn:
            self._queue.append(me)
            if self._lingers:
                now = time.monotonic()
                self._last_call[threading.get_ident()] = now
                self._arrival.notify()
            while self._busy and me.out is None:
                self._turn.wait()
            if me.out is None:  # the head is idle: compute every row waiting, this one included
                self._busy = True
                if self._lingers:
                    self._linger(now)
                batch, self._queue = self._queue, []
        if me.out is None:
            self._compute(batch)
        if isinstance(me.out, BaseException):
            raise me.out
        return me.out

    def _linger(self, now: float) -> None:
        """Wait (up to ``LINGER_S``) until every caller active within ``RECENT_S`` has queued its row."""
        self._last_call = {k: t for k, t in self._last_call.items() if now - t < RECENT_S}
        deadline = now + LINGER_S
        while len(self._queue) < len(self._last_call) and (left := deadline - time.monotonic()) > 0:
            self._arrival.wait(left)

    def _compute(self, batch: list[_Waiting]) -> None:
        try:
            if len(batch) == 1 and not batch[0].fast:
                with torch_threads(1) if self._lone_on_one_thread else nullcontext():
                    outs = [self.linear(batch[0].row)]
            else:
                rows = [w.row.reshape(-1, w.row.shape[-1]) for w in batch]  # (a fast caller may have several)
                with torch_threads(1):  # the helper computes the other half / no OpenMP team spinning after
                    if all(waiting.fast for waiting in batch):
                        logits = self._split.halves(_float16_linear, torch.cat(rows), *self.quick)
                    else:
                        logits = self.linear(torch.cat(rows))
                parts = logits.split([r.shape[0] for r in rows])
                outs = [part.view(*w.row.shape[:-1], -1) for part, w in zip(parts, batch, strict=True)]
        except BaseException as e:  # every caller of the pass raises it; the head goes on
            outs = [e] * len(batch)
        with self._turn:
            for waiting, out in zip(batch, outs, strict=True):
                waiting.out = out
            self.passes += 1
            self.rows += sum(w.row.numel() // w.row.shape[-1] for w in batch)
            self._busy = False
            self._turn.notify_all()


def _on_one_thread(linear: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    with torch_threads(1):
        return linear(x)


def _packed_linear(
    weight: torch.Tensor, split: SplitHead | None, threads: int
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A 16-bit head's ``F.linear`` through copies packed for oneDNN (``row_matmul.packed_weight``) of
    its halves on the split head's threads, or of the whole head where it does not split, if a lone
    row gets ``F.linear``'s bits so (on one torch thread and on ``threads``); else None.

    oneDNN's GEMV repacks an unpacked 16-bit weight on every call: a bfloat16 head of 32000x256 took
    1.15 ms for a lone row with the caches emptied, one thread, against 0.49 packed (32000x1024: 4.1
    against 1.6 ms). The copies take the head's memory again, so only up to ``FAST_MAX_BYTES``."""
    if weight.dtype not in (torch.bfloat16, torch.float16) or weight.nbytes > FAST_MAX_BYTES:
        return None
    halves = split is not None and split.exact
    packed = [packed_weight(part) for part in (split.parts if halves else (weight.detach(),))]
    if any(part is None for part in packed):
        return None
    if halves:
        linear = functools.partial(split.halves, packed_linear, first=packed[0], second=packed[1])
    else:
        linear = functools.partial(packed_linear, packed=packed[0])
    if not same_bits(linear, functools.partial(F.linear, weight=weight), weight.shape[1], weight.dtype, threads):
        logger.debug("the LM head keeps its unpacked weight: a packed copy changes the bits of the logits")
        return None
    return linear


def _float16_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.quantized.linear_dynamic_fp16(x, packed)


def _float16_bound(weight: torch.Tensor, g: float) -> float:
    """Per unit of ``|x|``, how far a float16 logit may be from the float32 one: ``g (|w| + |h|) +
    |w - h|`` for the row ``w`` whose is largest, ``h`` the row rounded to float16 (inf if one
    overflows); in float64, 4096 rows at a time."""
    return 1.01 * max(
        float((g * (exact.norm(dim=1) + rounded.norm(dim=1)) + (exact - rounded).norm(dim=1)).max())
        for exact, rounded in ((rows.double(), rows.half().double()) for rows in weight.detach().split(4096))
    )


def _float16_halves(split: SplitHead, g: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """fbgemm's packed float16 copies of the head's two halves, if this torch has them, and if they
    give ``x . h`` for the weights ``h`` rounded as ``Tensor.half()`` rounds them, summed in float32
    (within ``g |x| |h|``, checked on some rows): the rounding the error bound counts. Else None."""
    try:
        packed = tuple(torch.ops.quantized.linear_prepack_fp16(part.detach(), None) for part in split.parts)
        with torch.inference_mode(), torch_threads(1):
            for part, half in zip(split.parts, packed, strict=True):
                rounded = part.detach().half().double()
                for scale in (1.0, 100.0):
                    x = torch.randn(2, part.shape[1], dtype=part.dtype) * scale
                    error = (_float16_linear(x, half).double() - x.double() @ rounded.t()).abs()
                    if bool((error > 1.01 * g * x.double().norm(dim=1, keepdim=True) * rounded.norm(dim=1)).any()):
                        raise ValueError(f"float16 logits off by {float(error.max())}")
    except (RuntimeError, ValueError) as e:
        logger.debug("the LM head has no quick approximate logits: %s", e)
        return None
    return packed
