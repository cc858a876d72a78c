"""SplitHead: a one-row LM head over two threads, with the logits' bits unchanged."""

import threading
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from farmesh_core import split_head
from farmesh_core.architecture import ClientHead
from farmesh_core.split_head import SplitHead


@pytest.fixture
def weight():
    return torch.randn(20000, 128, generator=torch.Generator().manual_seed(0))  # 10 MB: large enough


def test_one_row_logits_keep_their_bits(weight):
    head = SplitHead(weight)
    assert head.exact
    with torch.inference_mode():
        for seed in range(10):
            x = torch.randn(1, 1, 128, generator=torch.Generator().manual_seed(seed))
            assert torch.equal(head(x), F.linear(x, weight))


def test_several_rows_or_a_busy_head_fall_back(weight):
    head = SplitHead(weight)
    assert head(torch.randn(2, 128)) is None  # more than one row: the caller's GEMM does better
    with head._lock:  # another thread in the middle of a split
        assert head(torch.randn(1, 128)) is None


def test_an_error_reaches_the_caller_and_the_head_goes_on(weight):
    head = SplitHead(weight)
    with pytest.raises(RuntimeError):
        head(torch.randn(1, 64))  # wrong hidden size
    x = torch.randn(1, 128)
    assert torch.equal(head(x), F.linear(x, weight))


def test_threads_calling_at_once_all_get_their_logits(weight):
    head = SplitHead(weight)
    rows = [torch.randn(1, 128, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    out = [None] * len(rows)

    def run(i):
        for _ in range(5):
            out[i] = head(rows[i])
            if out[i] is None:
                out[i] = F.linear(rows[i], weight)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(rows))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(torch.equal(o, F.linear(x, weight)) for o, x in zip(out, rows, strict=True))


def test_client_head_splits_large_heads_only_without_autograd(weight, monkeypatch):
    lm_head = nn.Linear(128, 20000, bias=False)
    lm_head.weight.data.copy_(weight)
    head = ClientHead(nn.Embedding(10, 128), nn.LayerNorm(128), lm_head)
    x = torch.randn(1, 128)
    expected = lm_head(head.final_norm(x))
    with torch.inference_mode():
        assert torch.equal(head.logits(x), expected)
    assert head._split_head is not None
    head.double()  # the head's weight is replaced: the split is decided again, on the new weight
    with torch.inference_mode():
        assert torch.equal(head.logits(x.double()), F.linear(head.final_norm(x.double()), lm_head.weight))
    assert head._split_head.parts[0].dtype == torch.float64
    small = ClientHead(nn.Embedding(10, 8), nn.LayerNorm(8), nn.Linear(8, 16, bias=False))
    with torch.inference_mode():
        small.logits(torch.randn(1, 8))
    assert small._split_head is None  # too small to gain
    monkeypatch.setattr(split_head, "MIN_WEIGHT_BYTES", 0)
    trained = ClientHead(nn.Embedding(10, 8), nn.LayerNorm(8), nn.Linear(8, 16, bias=False))
    trained.logits(torch.randn(1, 8)).sum().backward()  # autograd: the module's own call
    assert trained._split_head is None and trained.lm_head.weight.grad is not None


def test_the_helper_thread_ends_with_the_head(weight):
    before = sum(t.name == "farmesh-head" for t in threading.enumerate())
    head = SplitHead(weight)
    assert sum(t.name == "farmesh-head" for t in threading.enumerate()) == before + 1
    del head
    for _ in range(100):
        if sum(t.name == "farmesh-head" for t in threading.enumerate()) == before:
            break
        time.sleep(0.01)
    assert sum(t.name == "farmesh-head" for t in threading.enumerate()) == before
