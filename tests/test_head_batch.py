"""HeadBatcher: the client's LM head computes the rows of sessions that reach it together in one pass."""

import threading
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from farmesh_core import split_head
from farmesh_core.architecture import ClientHead
from farmesh_core.head_batch import HeadBatcher
from farmesh_core.split_head import SplitHead
from tests.helpers import cpu_has_bf16_dot_products, op_counts

HIDDEN, VOCAB = 64, 3000


@pytest.fixture
def weight():
    return torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(0))


def rows(count: int) -> list[torch.Tensor]:
    return [torch.randn(1, 1, HIDDEN, generator=torch.Generator().manual_seed(i)) for i in range(count)]


def call_while_busy(batcher: HeadBatcher, xs: list[torch.Tensor], fast: bool | list[bool] = False) -> list:
    """Call ``batcher`` (with ``fast``, or each call with its own) with each row from its own thread
    while the head is held busy, then let it go: the rows that queued meanwhile are computed together."""
    out: list = [None] * len(xs)
    fasts = fast if isinstance(fast, list) else [fast] * len(xs)

    def run(i):
        try:
            out[i] = batcher(xs[i], fast=fasts[i])
        except Exception as e:
            out[i] = e

    with batcher._turn:
        batcher._busy = True
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(xs))]
    for thread in threads:
        thread.start()
    for _ in range(500):
        with batcher._turn:
            if len(batcher._queue) == len(xs):
                break
        time.sleep(0.01)
    with batcher._turn:
        assert len(batcher._queue) == len(xs)
        batcher._busy = False
        batcher._turn.notify_all()
    for thread in threads:
        thread.join()
    return out


def test_a_lone_row_gets_the_exact_logits_of_its_own_gemv(weight):
    batcher = HeadBatcher(weight)
    with torch.inference_mode():
        for x in rows(5):
            assert torch.equal(batcher(x), F.linear(x, weight))
    assert (batcher.passes, batcher.rows) == (5, 5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_lone_row_runs_on_one_thread_where_that_keeps_its_bits(weight, dtype):
    """A lone row's pass takes one torch thread (no OpenMP team left spinning on the other cores)
    exactly where one thread gives the bits of the caller's threads (checked here independently), and
    its logits are F.linear's on the caller's threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        weight = weight.to(dtype)
        batcher, seen = HeadBatcher(weight), []
        linear = batcher.linear
        batcher.linear = lambda x: (seen.append(torch.get_num_threads()), linear(x))[1]
        x = rows(1)[0].to(dtype)
        with torch.inference_mode():
            out = batcher(x)
            expected = F.linear(x, weight)
            torch.set_num_threads(1)
            identical = torch.equal(F.linear(x, weight), expected)
            torch.set_num_threads(2)
        assert torch.equal(out, expected)
        assert seen == ([1] if identical else [2])
    finally:
        torch.set_num_threads(threads)


def test_rows_that_wait_together_share_one_pass(weight):
    batcher = HeadBatcher(weight)
    xs = rows(6)
    with torch.inference_mode():
        out = call_while_busy(batcher, xs)
    assert (batcher.passes, batcher.rows) == (1, 6)
    for logits, x in zip(out, xs, strict=True):
        assert logits.shape == (1, 1, VOCAB)
        torch.testing.assert_close(logits, F.linear(x, weight))


def test_a_large_head_batches_over_its_two_halves(weight, monkeypatch):
    monkeypatch.setattr(split_head, "MIN_WEIGHT_BYTES", 0)
    batcher = HeadBatcher(weight)
    assert isinstance(batcher.linear, SplitHead)
    xs = rows(4)
    with torch.inference_mode():
        out = call_while_busy(batcher, xs)
        assert torch.equal(batcher(xs[0]), F.linear(xs[0], weight))  # alone again: exact
    assert batcher.passes == 2
    for logits, x in zip(out, xs, strict=True):
        torch.testing.assert_close(logits, F.linear(x, weight))


@pytest.mark.parametrize("split", [False, True])
def test_a_bfloat16_head_multiplies_through_packed_copies_with_f_linears_bits(weight, monkeypatch, split):
    """A 16-bit head's rows go through copies packed for oneDNN (of its halves where it splits): a lone
    row keeps F.linear's bits, rows together are F.linear's to rounding."""
    if split:
        monkeypatch.setattr(split_head, "MIN_WEIGHT_BYTES", 0)
    weight = weight.to(torch.bfloat16)
    batcher = HeadBatcher(weight)
    xs = [x.to(torch.bfloat16) for x in rows(4)]
    with torch.inference_mode():
        for x in xs:
            assert torch.equal(batcher(x), F.linear(x, weight))
        # (the profiler sees the calling thread: the whole head, or the split head's first half)
        packed = op_counts(lambda: batcher(xs[0])).get("mkldnn::_linear_pointwise", 0) == 1
        assert packed != ("aten::linear" in op_counts(lambda: batcher(xs[0])))
        assert packed or not cpu_has_bf16_dot_products()
        together = call_while_busy(batcher, xs)
    for logits, x in zip(together, xs, strict=True):
        torch.testing.assert_close(logits, F.linear(x, weight))


def test_an_error_reaches_every_caller_of_its_pass_and_the_head_goes_on(weight):
    batcher = HeadBatcher(weight)
    batcher.linear = lambda x: F.linear(x, weight[:, :-1])  # a head that fails on every row
    out = call_while_busy(batcher, rows(3))
    assert all(isinstance(o, RuntimeError) for o in out)
    batcher.linear = lambda x: F.linear(x, weight)
    x = rows(1)[0]
    assert torch.equal(batcher(x), F.linear(x, weight))
    assert not batcher._busy and not batcher._queue


def test_many_threads_at_once_each_get_their_own_logits(weight):
    batcher = HeadBatcher(weight)
    xs = rows(8)
    out: list = [None] * len(xs)

    def run(i):
        with torch.inference_mode():
            for _ in range(20):
                out[i] = batcher(xs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(xs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert batcher.rows == 8 * 20
    for logits, x in zip(out, xs, strict=True):
        torch.testing.assert_close(logits, F.linear(x, weight))


def test_client_head_batches_one_row_steps_only_without_autograd(weight, monkeypatch):
    lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
    lm_head.weight.data.copy_(weight)
    head = ClientHead(nn.Embedding(10, HIDDEN), nn.LayerNorm(HIDDEN), lm_head)
    x = torch.randn(1, HIDDEN)
    with torch.inference_mode():
        assert torch.equal(head.logits(x), lm_head(head.final_norm(x)))
        assert head._head_batcher.rows == 1
        head.logits(torch.randn(3, HIDDEN))  # several rows (a prompt's logits): the module's GEMM
        with pytest.raises(RuntimeError):
            head.logits(x.double())  # another dtype than the head's: the module's call, which refuses it
    assert head._head_batcher.rows == 1
    head.double()  # the head's weight is replaced: a new batcher, on the new weight
    with torch.inference_mode():
        assert torch.equal(head.logits(x.double()), F.linear(head.final_norm(x.double()), lm_head.weight))
    assert head._head_batcher.weight.dtype == torch.float64
    head.logits(torch.randn(1, HIDDEN, dtype=torch.float64)).sum().backward()  # autograd: the module's call
    assert head._head_batcher.rows == 1 and lm_head.weight.grad is not None
    biased = ClientHead(nn.Embedding(10, 8), nn.LayerNorm(8), nn.Linear(8, 16))
    with torch.inference_mode():
        biased.logits(torch.randn(1, 8))
    assert biased._head_batcher is None


@pytest.mark.parametrize("global_hook", [False, True])
def test_a_hooked_head_is_called_as_its_module(weight, global_hook):
    """The batcher multiplies the head's weight directly: while the head has forward hooks (its own
    or ones for every module, registered at any time), its logits come from the module's call."""
    lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
    lm_head.weight.data.copy_(weight)
    head = ClientHead(nn.Embedding(10, HIDDEN), nn.LayerNorm(HIDDEN), lm_head)
    x = torch.randn(1, HIDDEN)
    with torch.inference_mode():
        head.logits(x)
    assert head._head_batcher.rows == 1
    seen = []

    def hook(module, args, out):
        if module is lm_head:
            seen.append(out)
        return None

    register = torch.nn.modules.module.register_module_forward_hook if global_hook else lm_head.register_forward_hook
    handle = register(hook)
    try:
        with torch.inference_mode():
            logits = head.logits(x)
    finally:
        handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0], logits) and head._head_batcher.rows == 1
    with torch.inference_mode():
        head.logits(x)
    assert head._head_batcher.rows == 2 and len(seen) == 1


def test_an_idle_head_waits_briefly_for_the_rows_of_other_active_callers(weight, monkeypatch):
    from farmesh_core import head_batch

    monkeypatch.setattr(head_batch, "LINGER_S", 5.0)
    monkeypatch.setattr(head_batch, "LINGER_MIN_BYTES", 0)  # the test's head is small
    monkeypatch.setattr(head_batch, "RECENT_S", 60.0)  # a loaded machine may take long between the calls
    batcher = HeadBatcher(weight)
    x, y = rows(2)
    out, called_once = {}, threading.Event()

    def other():  # a session stepping every 0.3 s
        with torch.inference_mode():
            batcher(y)
            called_once.set()
            time.sleep(0.3)
            out["y"] = batcher(y)

    with torch.inference_mode():
        thread = threading.Thread(target=other)
        began = time.monotonic()
        thread.start()
        called_once.wait()
        assert time.monotonic() - began < 4.0  # the first caller was alone: it did not wait 5 s
        began = time.monotonic()
        first = batcher(x)  # the other caller is active: wait for its row, though not the whole 5 s
        waited = time.monotonic() - began
        thread.join()
    assert waited < 4.0
    assert (batcher.passes, batcher.rows) == (2, 3)  # x waited for y: they went through together
    torch.testing.assert_close(first, F.linear(x, weight))
    torch.testing.assert_close(out["y"], F.linear(y, weight))


def test_a_large_head_gives_quick_approximate_logits_within_their_bound(monkeypatch):
    monkeypatch.setattr(split_head, "MIN_WEIGHT_BYTES", 0)
    weight = torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(3))
    batcher = HeadBatcher(weight)
    assert batcher.quick is not None
    with torch.inference_mode():
        for x in rows(5):
            x = x * 30  # large logits: their rounding errors are too
            exact, quick = F.linear(x, weight), batcher(x, fast=True)
            assert quick.shape == exact.shape
            error = float((quick - exact).abs().max())
            assert 0 < error <= batcher.error_bound(x)  # float16 weights: not the exact logits
            assert torch.equal(batcher(x), exact)  # without fast=True: F.linear's bits
        # rows that reach the head together go through the float16 copy together, each within its bound
        xs = rows(3)
        quick = call_while_busy(batcher, xs, fast=True)
        assert batcher.rows - batcher.passes == 2  # two of the three shared a pass
        for x, logits in zip(xs, quick, strict=True):
            assert float((logits - F.linear(x, weight)).abs().max()) <= batcher.error_bound(x)
    assert HeadBatcher(weight.double()).quick is None  # float32 only
    huge = weight.clone()
    huge[7, 3] = 1e5  # beyond float16's range: that logit's bound would be infinite
    assert HeadBatcher(huge).quick is None
    monkeypatch.setattr(split_head, "MIN_WEIGHT_BYTES", weight.nbytes + 1)
    assert HeadBatcher(weight).quick is None  # small heads: F.linear is quick enough


def test_client_head_approximate_and_module_logits(monkeypatch):
    monkeypatch.setattr(split_head, "MIN_WEIGHT_BYTES", 0)
    lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
    head = ClientHead(nn.Embedding(10, HIDDEN), nn.LayerNorm(HIDDEN), lm_head).requires_grad_(False)
    x = torch.randn(1, HIDDEN)
    with torch.inference_mode():
        exact = head.module_logits(x)
        assert torch.equal(exact, lm_head(head.final_norm(x)))
        logits, bound, refine = head.approximate_logits(x)
        assert float((logits - exact).abs().max()) <= bound
        ids = torch.tensor([3, 0, VOCAB - 1])
        closer, within = refine(ids)  # those ids scored again, in float64
        assert closer.dtype == torch.float64 and bool((within < bound / 10).all())
        assert bool(((closer - exact.reshape(-1)[ids].double()).abs() <= within).all())
        assert head.approximate_logits(torch.randn(2, HIDDEN)) is None  # one row only
    small = ClientHead(nn.Embedding(10, 8), nn.LayerNorm(8), nn.Linear(8, 16, bias=False))
    monkeypatch.setattr(split_head, "MIN_WEIGHT_BYTES", 1 << 40)
    with torch.inference_mode():
        assert small.approximate_logits(torch.randn(1, 8)) is None


def test_a_small_head_does_not_wait_for_other_callers(weight, monkeypatch):
    from farmesh_core import head_batch

    monkeypatch.setattr(head_batch, "LINGER_S", 5.0)
    monkeypatch.setattr(head_batch, "RECENT_S", 60.0)
    batcher = HeadBatcher(weight)  # 0.8 MB: a pass costs less than waiting would
    x, y = rows(2)
    with torch.inference_mode():
        thread = threading.Thread(target=batcher, args=(y,))
        thread.start()
        thread.join()  # another thread used the head just now
        began = time.monotonic()
        torch.testing.assert_close(batcher(x), F.linear(x, weight))
        assert time.monotonic() - began < 4.0
    assert (batcher.passes, batcher.rows) == (2, 2)


def test_client_head_approximate_rows_in_one_pass_each_within_its_bound(monkeypatch):
    """A shared session's rows get quick logits in one pass, each row with its own bound and
    refinement; a pass that also holds an exact caller's row gives each caller its own logits."""
    monkeypatch.setattr(split_head, "MIN_WEIGHT_BYTES", 0)
    lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
    head = ClientHead(nn.Embedding(10, HIDDEN), nn.LayerNorm(HIDDEN), lm_head).requires_grad_(False)
    x = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(7)) * 10
    with torch.inference_mode():
        batcher = head._batcher()
        passes = batcher.passes
        approximate = head.approximate_rows(x)
        assert batcher.passes == passes + 1 and len(approximate) == 3
        for row, (logits, bound, refine) in zip(x.split(1), approximate, strict=True):
            exact = head.module_logits(row)
            assert logits.shape == exact.shape
            assert 0 < float((logits - exact).abs().max()) <= bound
            ids = torch.tensor([1, 2])
            closer, within = refine(ids)
            assert bool(((closer - exact.reshape(-1)[ids].double()).abs() <= within).all())
        assert head.approximate_rows(torch.randn(2, 5, HIDDEN)) is None  # rows of one position only
        normed, y = head.final_norm(x), torch.randn(1, 1, HIDDEN)
        passes = batcher.passes
        several, one = call_while_busy(batcher, [normed, y], fast=[True, False])  # one pass, exact for both
        assert batcher.passes == passes + 1
        torch.testing.assert_close(several, F.linear(normed, lm_head.weight))
        torch.testing.assert_close(one, F.linear(y, lm_head.weight))
