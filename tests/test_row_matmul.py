"""StepLinear (farmesh_core/row_matmul.py): the linears of layers without a lean call, in a node's
inference steps. A lone one-token row splits over threads with the replaced module's exact bits, a
decode batch's rows go through the weight's packed copy or ``W @ X^T``, and everything else is the
module's own forward."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.falcon.modeling_falcon import FalconLinear

from farmesh_core.row_matmul import (
    StepLinear,
    decode_batch_rows,
    matmuls_on_one_thread,
    packed_linear,
    packed_weight,
    row_blocks,
    step_linears,
)
from tests.helpers import cpu_has_bf16_dot_products, op_counts, randn


def linear(kind: type[nn.Linear], in_features: int, out_features: int, bias: bool) -> nn.Linear:
    module = kind(in_features, out_features, bias=bias)
    with torch.no_grad():
        module.weight.copy_(randn(out_features, in_features, seed=1) * 0.1)
        if bias:
            module.bias.copy_(randn(out_features, seed=2))
    return module.requires_grad_(False)


CASES = [(nn.Linear, 256, 768, True), (nn.Linear, 1024, 256, True), (FalconLinear, 256, 1024, False),
         (FalconLinear, 256, 768, True)]  # fmt: skip


@pytest.mark.parametrize("kind, in_features, out_features, bias", CASES)
def test_a_lone_row_splits_over_threads_with_the_modules_bits(kind, in_features, out_features, bias):
    module = linear(kind, in_features, out_features, bias)
    step = StepLinear(module, threads=2)
    assert step.blocks is not None
    for seed in range(5):
        x = randn(1, 1, in_features, seed=10 + seed)
        with torch.inference_mode():
            assert torch.equal(step(x), module(x))
    with torch.inference_mode():
        assert op_counts(lambda: step(x)).get("aten::bmm") == 1
        with matmuls_on_one_thread():  # a busy node's lone steps stay on the caller's thread
            assert "aten::bmm" not in op_counts(lambda: step(x))
            assert torch.equal(step(x), module(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_lone_rows_keep_the_modules_own_matmul(dtype):
    """bmm in 16 bits goes to oneDNN, whose threads made a node's split steps 3x slower: no split."""
    module = linear(nn.Linear, 256, 768, False).to(dtype)  # no bias: the blocks would give its bits
    step = StepLinear(module, threads=2)
    assert step.blocks is None and row_blocks(module.weight, 2) is None  # the lean layers' call too
    x = randn(1, 1, 256, seed=4).to(dtype)
    with torch.inference_mode():
        assert "aten::bmm" not in op_counts(lambda: step(x))
        assert torch.equal(step(x), module(x))


@pytest.mark.parametrize("kind, in_features, out_features, bias", CASES)
def test_a_bfloat16_lone_row_goes_through_the_packed_weight_where_that_keeps_its_bits(
    kind, in_features, out_features, bias
):
    """oneDNN's GEMV on the packed copy is quicker than on the weight as it is (repacked every call). It
    gave ``nn.Linear``'s bits, with and without bias, but not ``FalconLinear``'s with one (which adds
    the bias after the matmul): that keeps the module's own matmul."""
    module = linear(kind, in_features, out_features, bias).to(torch.bfloat16)
    step = StepLinear(module, threads=2)
    assert step.pack_for_batches() == module.weight.nbytes
    if cpu_has_bf16_dot_products():
        assert step.lone_packed == (kind is nn.Linear or not bias)
    for seed in range(5):
        x = randn(1, 1, in_features, seed=20 + seed).to(torch.bfloat16)
        with torch.inference_mode():
            assert torch.equal(step(x), module(x))
    with torch.inference_mode():
        assert op_counts(lambda: step(x)).get("mkldnn::_linear_pointwise", 0) == step.lone_packed


@pytest.mark.parametrize("kind, in_features, out_features, bias", CASES)
def test_a_prefill_keeps_the_modules_own_matmul_and_bits(kind, in_features, out_features, bias):
    module = linear(kind, in_features, out_features, bias)
    step = StepLinear(module, threads=2)
    x = randn(1, 5, in_features, seed=3)  # a short prompt: as many rows as a small decode batch
    with torch.inference_mode():
        assert torch.equal(step(x), module(x))


@pytest.mark.parametrize("kind, in_features, out_features, bias", CASES)
def test_a_decode_batchs_rows_go_through_w_times_x_transposed(kind, in_features, out_features, bias):
    module = linear(kind, in_features, out_features, bias)
    step = StepLinear(module, threads=2)
    x = randn(2, 1, in_features, seed=4)  # two sessions' one-token steps
    with torch.inference_mode(), decode_batch_rows():
        out = step(x)
        ops = op_counts(lambda: step(x))
    torch.testing.assert_close(out, module(x), rtol=1e-5, atol=1e-5)
    assert ops.get("aten::mm") == 1 and "aten::addmm" not in ops and "aten::bmm" not in ops
    assert out.is_contiguous()


@pytest.mark.parametrize("kind, in_features, out_features, bias", CASES)
@pytest.mark.parametrize("rows", [2, 9])
def test_a_decode_batchs_rows_go_through_the_packed_weight_once_there_is_one(
    kind, in_features, out_features, bias, rows
):
    module = linear(kind, in_features, out_features, bias)
    step = StepLinear(module, threads=2)
    assert step.pack_for_batches() == module.weight.nbytes
    x, lone = randn(rows, 1, in_features, seed=4), randn(1, 1, in_features, seed=5)
    with torch.inference_mode(), decode_batch_rows():
        out = step(x)
        ops = op_counts(lambda: step(x))
        assert torch.equal(step(lone), module(lone))
    torch.testing.assert_close(out, module(x), rtol=1e-4, atol=1e-4)
    assert ops.get("mkldnn::_linear_pointwise") == 1 and not {"aten::mm", "aten::addmm", "aten::bmm"} & ops.keys()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weights_multiply_as_f_linear_does(dtype):
    weight, x, bias = randn(768, 256, seed=1).to(dtype), randn(5, 1, 256, seed=2).to(dtype), randn(768, seed=3)
    packed = packed_weight(weight)
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
    for b in None, bias.to(dtype):
        torch.testing.assert_close(packed_linear(x, packed, b), F.linear(x, weight, b), rtol=tolerance, atol=tolerance)
    assert packed_weight(torch.empty(768, 256, device="meta")) is None  # oneDNN only packs for the CPU


def test_gradients_go_through_the_modules_forward():
    module = linear(nn.Linear, 256, 768, True)
    step = StepLinear(module, threads=2)
    x = randn(1, 1, 256, seed=5).requires_grad_(True)
    (grad_step,) = torch.autograd.grad(step(x).sum(), x)
    (grad_module,) = torch.autograd.grad(module(x).sum(), x)
    assert torch.equal(grad_step, grad_module)


def test_step_linears_replace_only_plain_linears_and_share_their_parameters():
    layer = nn.Module()
    layer.attn = nn.Module()
    layer.attn.qkv = linear(nn.Linear, 256, 768, True)
    layer.hooked = linear(nn.Linear, 256, 256, False)
    layer.hooked.register_forward_hook(lambda module, args, out: out)
    layer.other = linear(FalconLinear, 256, 256, False)
    weight = layer.attn.qkv.weight
    assert step_linears(layer, 2, (nn.Linear,)) == 1
    assert type(layer.attn.qkv) is StepLinear and layer.attn.qkv.weight is weight
    assert type(layer.hooked) is nn.Linear  # hooks see the module they were put on
    assert type(layer.other) is FalconLinear  # a subclass counts only where the adapter names it
    assert step_linears(layer, 2, (FalconLinear,)) == 1 and type(layer.other) is StepLinear
    assert layer.other.replaced is FalconLinear
