"""SplitHead: the LM head over two threads, with a row's logits keeping their bits."""

import threading
import time

import pytest
import torch
import torch.nn.functional as F

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


def test_several_rows_come_out_close_to_one_gemm(weight):
    head = SplitHead(weight)
    rows = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(head(rows), F.linear(rows, weight))


def test_an_error_reaches_the_caller_and_the_head_goes_on(weight):
    head = SplitHead(weight)
    with pytest.raises(RuntimeError):
        head(torch.randn(1, 64))  # wrong hidden size
    x = torch.randn(1, 128)
    assert torch.equal(head(x), F.linear(x, weight))


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


def test_halves_runs_any_product_with_the_second_half_on_the_helper(weight):
    head = SplitHead(weight)
    first, second = (part.t().contiguous() for part in head.parts)
    x = torch.randn(1, 128, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert torch.equal(head.halves(torch.mm, x, first, second), torch.cat([x @ first, x @ second], dim=-1))
        with pytest.raises(RuntimeError):
            head.halves(torch.mm, x, first, second[:64])  # the helper's error reaches the caller
        torch.testing.assert_close(head.halves(torch.mm, x, first, second), F.linear(x, weight))
