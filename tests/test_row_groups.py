"""RowGroups (farmesh_core/node/row_groups.py): a large cacheless step's rows run in groups at once, each
group on a thread of its own with its share of the node's torch threads, and come back in order."""

import asyncio
import threading

import pytest
import torch

from farmesh_core.architecture import adapter_for
from farmesh_core.checkpoint import Checkpoint
from farmesh_core.config import NodeConfig
from farmesh_core.node.handlers import NodeHandlers
from farmesh_core.node.layer_span import LayerSpan
from farmesh_core.node.row_groups import RowGroups
from farmesh_plugins.auth import OpenAuth
from farmesh_plugins.ledgers import NullLedger


class Recorder:
    """A step that doubles its tensor and notes, per call, its rows, its thread and its torch threads."""

    def __init__(self):
        self.calls: list[tuple[int, int, int]] = []
        self.lock = threading.Lock()

    def __call__(self, hidden: torch.Tensor, grad: torch.Tensor | None = None, scale: float = 2.0) -> torch.Tensor:
        with self.lock:
            self.calls.append((hidden.shape[0], threading.get_ident(), torch.get_num_threads()))
        return hidden * scale if grad is None else hidden * grad


@pytest.mark.parametrize(
    ("threads", "rows", "groups", "threads_each"),
    [(2, 4, [2, 2], 1), (2, 3, [2, 1], 1), (4, 2, [1, 1], 2), (2, 1, [1], 2), (1, 4, [4], 1)],
)
def test_rows_run_in_groups_on_their_own_threads(threads, rows, groups, threads_each):
    row_groups, step = RowGroups(threads), Recorder()
    x = torch.arange(rows * 6, dtype=torch.float32).reshape(rows, 3, 2)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert torch.equal(row_groups.run(step, 1, x, None, 3.0), x * 3.0)  # checked: whole and in groups
        step.calls.clear()
        out = row_groups.run(step, 1, x, None, 3.0)
    finally:
        torch.set_num_threads(previous)
        row_groups.close()
    assert torch.equal(out, x * 3.0)  # the rows back in their order; the other arguments as given
    assert sorted(r for r, _, _ in step.calls) == sorted(groups)
    assert len({thread for _, thread, _ in step.calls}) == len(groups)  # each group on a thread of its own
    assert {n for _, _, n in step.calls} == {threads_each}


def test_a_shape_whose_bits_change_in_groups_runs_whole():
    """As MKL's kernels may for some shapes; here a step whose output depends on its number of rows."""
    row_groups, calls = RowGroups(2), []

    def step(hidden: torch.Tensor) -> torch.Tensor:
        calls.append(hidden.shape[0])
        return hidden * hidden.shape[0]

    x = torch.randn(4, 3)
    try:
        for _ in range(3):
            assert torch.equal(row_groups.run(step, 1, x), x * 4)
        assert calls == [2, 2, 4, 4, 4]  # checked once (in groups, then whole), whole since
        calls.clear()
        y = torch.randn(6, 3)
        assert torch.equal(row_groups.run(step, 1, y), y * 6)  # another shape: checked on its own
        assert calls == [3, 3, 6]
    finally:
        row_groups.close()


def test_several_tensors_split_alike_and_a_failing_group_fails_the_step_after_the_others():
    row_groups = RowGroups(2)
    x, grad = torch.randn(4, 3), torch.randn(4, 3)
    finished = []

    def step(hidden, g):
        if torch.equal(hidden, x[:2]):
            raise ValueError("the first group failed")
        finished.append(hidden.shape[0])
        return hidden * g

    def multiply(hidden, g):
        return hidden * g

    try:
        for _ in range(2):  # (the first time, the shape's check)
            assert torch.equal(row_groups.run(multiply, 2, x, grad), x * grad)
        with pytest.raises(ValueError, match="first group"):
            row_groups.run(step, 2, x, grad)
        assert finished == [2]  # the second group had finished when the error came out
    finally:
        row_groups.close()


def test_a_nodes_forward_and_backward_split_their_rows_and_give_the_spans_results(tiny_llama):
    checkpoint = Checkpoint(tiny_llama)
    span = LayerSpan(checkpoint, adapter_for(checkpoint.config), 0, 2, torch.float32, "cpu")
    node = NodeHandlers(NodeConfig(model_id=tiny_llama, num_threads=2), span, OpenAuth(), NullLedger())
    x, grad = torch.randn(4, 40, span.hidden_size), torch.randn(4, 40, span.hidden_size)
    seen = Recorder()

    def forward(hidden, *args):
        seen(hidden)
        return span.forward(hidden, *args)

    def backward(hidden, g, *args):
        seen(hidden)
        return span.backward(hidden, g, *args)

    try:
        for _ in range(2):  # (the first time, the shape's check)
            seen.calls.clear()
            out = asyncio.run(node._compute(4 * 40, 2, forward, x, 0, 2, None, 0, None, split=1))
            grad_in = asyncio.run(node._on_worker(backward, x, grad, 0, 2, None, split=2))
    finally:
        node.close()
    assert torch.equal(out, span.forward(x, 0, 2))
    assert torch.equal(grad_in, span.backward(x, grad, 0, 2))
    assert [rows for rows, _, _ in seen.calls] == [2, 2, 2, 2]
    assert len({thread for _, thread, _ in seen.calls}) == 2
