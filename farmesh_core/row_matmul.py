"""The matmuls of a node's one-token steps, quicker on a CPU than ``F.linear`` and its GEMV.

A lone one-token step splits each matmul over threads with ``F.linear``'s exact bits
(:func:`row_blocks`); the rows of several sessions' one-token steps run together through a copy of
the weight packed for oneDNN where the node keeps one (:func:`packed_weight`), else ``W @ X^T``
(:func:`few_rows_linear`). Llama's lean layers call these directly; for the layers of other
families, :func:`step_linears` puts a :class:`StepLinear` in place of each plain linear.
"""

import logging
import math
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from farmesh_core.module_hooks import has_forward_hooks
from farmesh_core.openmp import torch_threads

logger = logging.getLogger(__name__)


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` for an x of a few rows, as ``(weight @ x^T)^T``.

    On CPU the GEMM behind ``F.linear`` is slow for a few rows: 2 rows took 2-2.5x the time of one
    (hidden sizes 256 to 1024), more than two one-row steps, so batching decode steps saved nothing.
    ``weight @ x^T`` costs about one row's time for 2 rows, but grows with the rows faster than the
    GEMM does: it wins up to about 2048 / hidden_size rows (measured at 256, 512 and 1024), see
    :func:`few_rows_limit`. The sums run in another order, so rows can differ from a lone step's in
    the last bits, as any batched multiplication's may.
    """
    rows = x.reshape(-1, x.shape[-1])
    return torch.mm(weight, rows.t()).t().contiguous().view(*x.shape[:-1], weight.shape[0])


def exact_rows_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` with each row's bits those of a one-row ``F.linear`` call: a batched
    GEMV (``bmm`` of the rows against the weight, expanded without a copy). A batched GEMM sums in
    another order, and at a float32 near tie of two logits that gives another token than the row
    would get alone (found: two logits 2.9e-6 apart). It reads the weight once per row: 2.3-2.6x the
    GEMM's time where the weight fits the cache, far more where it streams from memory."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.bmm(rows[:, None, :], weight.t().expand(rows.shape[0], -1, -1))
    return out.view(*x.shape[:-1], weight.shape[0])


def last_level_cache_bytes() -> int:
    """The size of the CPU's largest cache (Linux), or 32 MiB where the system does not say."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
            sizes.append(int(text.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1))
        except (OSError, ValueError, IndexError):
            continue
    return max(sizes, default=32 * 2**20)


def few_rows_limit(in_features: int) -> int:
    """Up to how many rows :func:`few_rows_linear` beats ``F.linear`` for weights of ``in_features`` columns."""
    return max(2, 2048 // in_features)


def packed_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """A copy of ``weight`` ([out, in]) in oneDNN's blocked layout, for :func:`packed_linear`, or None
    where oneDNN has no kernel for it (not on a CPU, or not for its dtype on this CPU).

    A decode batch streams each weight from memory once for all its rows, and on a CPU that reading
    is most of a one-token step's time. MKL's GEMM behind ``F.linear`` repacks the weight on every
    call and is slow for a few rows: 8 rows through 4 layers of hidden size 1024 took 26 ms on one
    thread, against 14 ms for one row. On a weight packed once, oneDNN took 14.6 ms for the 8 rows.
    The copy takes the weight's memory again (``LayerSpan``'s ``pack_batch_weights`` decides).
    Its sums run in another order than ``F.linear``'s, as any batched multiplication's may: the
    copy is refused if a check on this weight finds it further off than rounding explains.
    """
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    weight = weight.detach()
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        rows = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
        got, want = packed_linear(rows, packed).float(), F.linear(rows, weight).float()
    except RuntimeError as e:  # e.g. float16 on a CPU without its instructions
        logger.debug("weights %s %s keep F.linear for decode batches: %s", tuple(weight.shape), weight.dtype, e)
        return None
    tolerance = 1e-3 if weight.dtype == torch.float32 else 3e-2
    if not torch.allclose(got, want, rtol=tolerance, atol=tolerance * float(want.abs().max())):
        logger.warning("oneDNN's matmul is off for weights %s %s: not used", tuple(weight.shape), weight.dtype)
        return None
    return packed


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``packed = packed_weight(weight)``."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def packed_copy(
    weight: torch.Tensor,
    reference: Callable[[torch.Tensor], torch.Tensor],
    threads: int,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, bool]:
    """``weight``'s :func:`packed_weight` copy for decode batches (None where oneDNN takes none), and
    whether a lone row through it gives the bits of ``reference`` (``F.linear``, or a family's
    linear) on one torch thread and on ``threads``: then lone rows use it too.

    Where they do (16-bit weights here), a lone one-token step is quicker through the packed copy:
    oneDNN's GEMV repacks an unpacked weight on every call (a tiny Llama layer's 4 bfloat16 matmuls
    62 against 86 us warm, 112 against 160 with the caches emptied, one thread). Float32 ones gave
    other bits (and split over threads anyway, see :func:`row_blocks`)."""
    packed = packed_weight(weight)
    if packed is None or weight.dtype == torch.float32:
        return packed, False
    lone = same_bits(lambda x: packed_linear(x, packed, bias), reference, weight.shape[1], weight.dtype, threads)
    return packed, lone


def rows_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)``; a few rows (one-token steps of several sessions) go the faster
    :func:`few_rows_linear` way, one row keeps ``F.linear``'s bits."""
    rows = x.numel() // x.shape[-1]
    if 2 <= rows <= few_rows_limit(weight.shape[1]):
        return few_rows_linear(x, weight)
    return F.linear(x, weight)


# (shape, strides, dtype, threads, what the blocks stand in for, bias, alignment) -> the blocks give its bits
_SPLIT_VERDICTS: dict[tuple, bool] = {}
_ALIGNMENT = 64  # bytes: a weight's F.linear bits hang on where its memory starts within a cache line


def row_blocks(
    weight: torch.Tensor,
    threads: int,
    bias: torch.Tensor | None = None,
    reference: Callable[[torch.Tensor], torch.Tensor] | None = None,
    kind: str = "F.linear",
) -> torch.Tensor | None:
    """``weight`` ([out, in]) as ``threads`` blocks of its output rows, ``[threads, in, out / threads]``
    for ``torch.bmm``, if a one-row step through them (plus ``bias``) gives the exact bits of
    ``reference`` (``F.linear(x, weight, bias)``, or ``kind``'s own forward), else None.

    A one-token step's matmuls stream every weight from memory once; on CPU a one-row ``F.linear`` is
    a GEMV that uses one core whatever the torch threads, and one core's share of memory bandwidth is
    the limit (measured here: two processes each ran their 8 layers' matmuls as fast as one alone).
    ``bmm`` over row blocks runs one block per thread, each a dot product over the same whole input
    row, so the bits stay F.linear's. Whether they do is a property of the kernels for this shape,
    so it is checked once per shape, dtype and ``kind``, on this weight, before the blocks are used.

    Only float32 weights split (MKL's batched GEMM). A bfloat16 ``bmm`` goes to oneDNN, whose threads
    spun on every call in a node: a tiny Llama's one-token steps through 8 layers took 16 ms split
    against ~5 on one thread, 2-3x slower than transformers' own decode; float16 was as slow.
    """
    out_features, in_features = weight.shape
    if threads < 2 or weight.device.type != "cpu" or out_features % threads or not weight.is_contiguous():
        return None
    if weight.dtype != torch.float32:
        return None
    blocks = weight.view(threads, out_features // threads, in_features).transpose(1, 2)
    key = (tuple(weight.shape), weight.stride(), weight.dtype, threads, kind, bias is not None,
           weight.data_ptr() % _ALIGNMENT)  # fmt: skip
    if key not in _SPLIT_VERDICTS:
        if reference is None:

            def reference(x: torch.Tensor) -> torch.Tensor:
                return F.linear(x, weight, bias)

        _SPLIT_VERDICTS[key] = same_bits(
            lambda x: _plus(split_linear(x, blocks), bias), reference, in_features, weight.dtype, threads
        )
        if not _SPLIT_VERDICTS[key]:
            logger.debug("weights %s keep their own matmul: row blocks change its bits", key)
    return blocks if _SPLIT_VERDICTS[key] else None


def _empty_at(offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty contiguous tensor whose memory starts ``offset`` bytes past a multiple of _ALIGNMENT.

    A weight's ``F.linear`` bits hang on its memory's alignment: a checkpoint's memory-mapped weights
    start 24 bytes past a 64-byte line here, and ``F.linear`` on an aligned copy of one gave other bits."""
    numel, pad = math.prod(shape), _ALIGNMENT // dtype.itemsize
    raw = torch.empty(numel + pad, dtype=dtype)
    start = (offset - raw.data_ptr()) % _ALIGNMENT // dtype.itemsize
    return raw[start : start + numel].view(shape)


def own_copies(weights: Iterable[torch.Tensor]) -> None:
    """Each of ``weights`` (parameters) onto memory of its own, at the alignment it had (see
    :func:`_empty_at`). A layer whose weights :func:`stacked_linear` copied gives the rest of
    them copies too: else they keep the checkpoint's memory map alive, with the pages that the stack's
    copy read in. 8 hidden-1024 layers (405 MB) held 970 MB so, against 815 with their own copies
    and 814 memory-mapped as before, once they had served a few steps."""
    for weight in weights:
        copy = _empty_at(weight.data_ptr() % _ALIGNMENT, tuple(weight.shape), weight.dtype)
        copy.copy_(weight.detach())
        weight.data = copy


class StackedLinear:
    """Several weights of one input stacked into one, for one call where each would take one. A lone
    row goes through it (:meth:`lone_call`) as ``bmm`` over its row blocks (:func:`row_blocks`) where
    its matmuls split, else through its packed copy where :meth:`pack_for_batches` made one that
    keeps the weights' bits, else as one ``F.linear`` where that keeps them (``plain``). A decode
    batch's rows go through the packed copy (:meth:`batch`)."""

    __slots__ = ("weight", "blocks", "plain", "sizes", "threads", "packed", "lone_packed")

    def __init__(self, weight: torch.Tensor, blocks: torch.Tensor | None, plain: bool, sizes: list[int], threads: int):
        self.weight, self.blocks, self.plain, self.sizes, self.threads = weight, blocks, plain, sizes, threads
        self.packed: torch.Tensor | None = None  # the stack packed for oneDNN (pack_for_batches)
        self.lone_packed = False  # whether a lone row goes through it

    def lone_call(self, split: bool) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """How a lone row goes through the stack (the weights' outputs side by side, each weight's
        ``F.linear`` bit for bit), its matmul split over threads where ``split`` allows; None where no
        way keeps the bits (then each weight takes its own call)."""
        if split and self.blocks is not None:
            return self._split
        if self.lone_packed:
            return self.batch
        return self._plain if self.plain else None

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """The weights' outputs for rows ``x`` side by side, through the packed stack."""
        return packed_linear(x, self.packed)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return split_linear(x, self.blocks)

    def _plain(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def pack_for_batches(self) -> int:
        """Keep a packed copy of the stack for decode batches (:func:`packed_weight`), which lone rows
        use too where it keeps each weight's ``F.linear`` bits (:func:`packed_copy`: 16-bit weights,
        which never split). Returns the copy's bytes."""
        parts = self.weight.split(self.sizes)
        self.packed, self.lone_packed = packed_copy(
            self.weight, lambda x: torch.cat([F.linear(x, part) for part in parts], dim=-1), self.threads
        )
        return 0 if self.packed is None else self.weight.nbytes


def stacked_linear(weights: tuple[torch.Tensor, ...], threads: int) -> StackedLinear | None:
    """``weights`` (parameters [out_i, in] of one input) stacked into one weight, where one call through
    the stack gives each weight's one-row ``F.linear`` bits: float32 ones split over ``threads`` as
    :func:`row_blocks` splits one (and on one thread, where they do not split, as one ``F.linear``
    where that keeps the bits); 16-bit ones (whose ``bmm`` goes to oneDNN and spins, see
    :func:`row_blocks`), or any on one thread, as one ``F.linear``. Each parameter is then a view of
    its rows in the stack (no more memory than before). Else None, the weights untouched.

    A lone one-token step pays each matmul's call (and a split one its parallel region: the team's
    barrier, torch's thread count set and reset) whatever its size. A tiny Llama layer's q, k, v and
    gate, up as two calls instead of five, in-process: split float32 45 against 60 us (hidden 256),
    1254 against 1338 (hidden 1024); bfloat16 on one thread 93 against 130 us warm, 190 against 240
    with the caches emptied."""
    first = weights[0]
    offset = first.data_ptr() % _ALIGNMENT
    if any(
        w.dtype != first.dtype or not w.is_floating_point() or w.device.type != "cpu"
        or w.shape[1] != first.shape[1] or not w.is_contiguous() or w.data_ptr() % _ALIGNMENT != offset
        or w.nbytes % _ALIGNMENT
        for w in weights
    ):  # fmt: skip
        return None
    sizes = [w.shape[0] for w in weights]
    stacked = _empty_at(offset, (sum(sizes), first.shape[1]), first.dtype)
    torch.cat([w.detach() for w in weights], out=stacked)

    def reference(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.linear(x, w) for w in weights], dim=-1)

    blocks = None
    if first.dtype == torch.float32 and threads > 1:
        blocks = row_blocks(stacked, threads, reference=reference, kind=f"F.linear of weights of {sizes} rows")
        if blocks is None:
            return None  # (each weight may still split alone)
    plain = same_bits(lambda x: F.linear(x, stacked), reference, first.shape[1], first.dtype, threads)
    if blocks is None and not plain:
        return None
    for weight, rows in zip(weights, stacked.split(sizes), strict=True):
        weight.data = rows
    return StackedLinear(stacked, blocks, plain, sizes, threads)


def same_bits(
    candidate: Callable,
    reference: Callable,
    in_features: int,
    dtype: torch.dtype,
    threads: int,
    one_thread: bool = True,
) -> bool:
    """Whether ``candidate(x)`` equals ``reference(x)`` bit for bit on a few one-row inputs (two
    magnitudes), on ``threads`` torch threads and (``one_thread``) on one."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for count in sorted({1, threads} if one_thread else {threads}):
            with torch_threads(count):
                for scale in (1.0, 100.0):
                    x = (torch.randn(1, 1, in_features, generator=generator) * scale).to(dtype)
                    if not torch.equal(candidate(x), reference(x)):
                        return False
    return True


def _plus(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x if bias is None else x + bias


def blocks_linear(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` for a one-row x and ``blocks = row_blocks(weight, threads)``."""
    out = torch.bmm(x.reshape(1, 1, -1).expand(blocks.shape[0], 1, -1), blocks)
    return out.view(*x.shape[:-1], -1)


def split_linear(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """:func:`blocks_linear` on one torch thread per block, whatever the caller's count (which it keeps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(blocks.shape[0])
    try:
        return blocks_linear(x, blocks)
    finally:
        torch.set_num_threads(threads)


_local = threading.local()  # this thread's flags: one_thread (matmuls_on_one_thread), batch (decode_batch_rows)


@contextmanager
def _flag(name: str) -> Iterator[None]:
    """This thread's flag ``name`` raised within the block, and as it was after it."""
    before = getattr(_local, name, False)
    setattr(_local, name, True)
    try:
        yield
    finally:
        setattr(_local, name, before)


def matmuls_on_one_thread() -> AbstractContextManager[None]:
    """Within it, lone one-token steps on this thread keep their matmuls on the caller's torch threads.

    A node busy with several sessions gets its parallelism from them (batches, and the nodes of a
    chain working at once): splitting its lone steps as well only makes the threads wait for cores.
    """
    return _flag("one_thread")


def splits_lone_rows() -> bool:
    """Whether a lone one-token row on this thread may split its matmuls (see :func:`matmuls_on_one_thread`)."""
    return not getattr(_local, "one_thread", False)


def decode_batch_rows() -> AbstractContextManager[None]:
    """Within it, the rows that reach a :class:`StepLinear` or a lean layer on this thread are a decode
    batch's (one per session, or the rows of one session's one-token step): they go through the packed
    weight, or a few of them through :func:`few_rows_linear`. (A short prefill's rows keep the
    module's own matmul, and its bits.)"""
    return _flag("batch")


def in_decode_batch_rows() -> bool:
    """Whether this thread is within :func:`decode_batch_rows`."""
    return getattr(_local, "batch", False)


class StepLinear(nn.Linear):
    """A layer's linear with the quicker paths of a node's inference steps, for families that have no
    lean layer. It shares the parameters of the module it replaces (``nn.Linear``, or a family's
    subclass computing ``x @ W^T + b``, see ``ArchitectureAdapter.linear_classes``).

    - A lone one-token row, where :func:`splits_lone_rows`, runs split over ``threads`` threads if that
      gives the replaced module's bits (:func:`row_blocks`, checked on this weight).
    - A decode batch's rows (:func:`decode_batch_rows`) go through its packed weight once
      :meth:`pack_for_batches` made one, else a few of them through :func:`few_rows_linear`; so does
      a lone row that does not split, where that keeps its bits (:func:`packed_copy`).
    - Everything else (prefills, forward calls, autograd) is the replaced module's own forward.
    """

    def __init__(self, linear: nn.Linear, threads: int):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_parameter("weight", linear.weight)
        self.register_parameter("bias", linear.bias)
        self.replaced, self.threads = type(linear), threads
        self.few_rows = few_rows_limit(self.in_features)
        self.packed: torch.Tensor | None = None
        self.lone_packed = False  # whether a lone row goes through the packed copy (pack_for_batches)
        self.blocks = row_blocks(
            self.weight.detach(), threads, None if self.bias is None else self.bias.detach(),
            reference=lambda x: self.replaced.forward(self, x), kind=self.replaced.__qualname__,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            rows = x.numel() // x.shape[-1]
            if rows == 1 and self.blocks is not None and splits_lone_rows():
                return _plus(split_linear(x, self.blocks), self.bias)
            if rows == 1 and self.lone_packed:
                return packed_linear(x, self.packed, self.bias)
            if rows >= 2 and in_decode_batch_rows():
                if self.packed is not None:
                    return packed_linear(x, self.packed, self.bias)
                if rows <= self.few_rows:
                    return _plus(few_rows_linear(x, self.weight), self.bias)
        return self.replaced.forward(self, x)

    @property
    def weights(self) -> tuple[torch.Tensor]:
        """The weights :meth:`pack_for_batches` copies (as ``LeanLlamaLayer.weights``)."""
        return (self.weight,)

    def pack_for_batches(self) -> int:
        """Keep a packed copy of the weight for decode batches (:func:`packed_weight`), which lone rows
        use too where it keeps their bits (:func:`packed_copy`); returns its bytes."""
        weight, bias = self.weight.detach(), None if self.bias is None else self.bias.detach()
        self.packed, self.lone_packed = packed_copy(
            weight, lambda x: self.replaced.forward(self, x), self.threads, bias
        )
        return 0 if self.packed is None else self.weight.nbytes


def step_linears(layer: nn.Module, threads: int, classes: tuple[type[nn.Module], ...]) -> int:
    """Put a :class:`StepLinear` in place of each linear of ``layer`` whose type is one of ``classes``
    (exactly: subclasses may compute something else) and that has no hooks; returns how many."""
    replaced = 0
    for name, module in list(layer.named_modules()):
        if type(module) not in classes or has_forward_hooks(module):
            continue
        parent, _, child = name.rpartition(".")
        setattr(layer.get_submodule(parent), child, StepLinear(module, threads))
        replaced += 1
    return replaced
