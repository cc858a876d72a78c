"""The client's final norm as one call: the module's bits, or the module itself."""

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from farmesh_core.fused_norm import FusedNorm


class CountingRMSNorm(LlamaRMSNorm):
    """Llama's RMSNorm, counting its forward calls."""

    calls = 0

    def forward(self, hidden_states):
        self.calls += 1
        return super().forward(hidden_states)


class ShiftedRMSNorm(CountingRMSNorm):
    """An RMSNorm-shaped module that computes something else: the fused op must not stand in for it."""

    def forward(self, hidden_states):
        return super().forward(hidden_states) + 1e-3


def _norm(cls, hidden: int = 256) -> torch.nn.Module:
    norm = cls(hidden, eps=1e-6)
    norm.weight.data = torch.randn(hidden, generator=torch.Generator().manual_seed(1))
    return norm


@torch.inference_mode()
def test_fused_norm_gives_the_module_bits_in_one_call():
    norm, fused = _norm(CountingRMSNorm), FusedNorm()
    generator = torch.Generator().manual_seed(2)
    fused(norm, torch.randn(1, 256))  # the check calls the module
    checked = norm.calls
    for scale in (1e-4, 1.0, 1e4):
        for rows in (1, 3):
            x = torch.randn(rows, 1, 256, generator=generator) * scale
            expected = LlamaRMSNorm.forward(norm, x)
            assert torch.equal(fused(norm, x), expected)
    assert norm.calls == checked  # every call after the check went to F.rms_norm


@torch.inference_mode()
def test_a_module_the_fused_op_does_not_match_keeps_its_own_call():
    norm, fused = _norm(ShiftedRMSNorm), FusedNorm()
    x = torch.randn(2, 1, 256)
    assert torch.equal(fused(norm, x), norm(x))
    calls = norm.calls
    fused(norm, x)
    assert norm.calls == calls + 1


def test_with_autograd_or_hooks_the_module_runs():
    norm, fused = _norm(CountingRMSNorm), FusedNorm()
    x = torch.randn(1, 1, 256, requires_grad=True)
    out = fused(norm, x)
    assert norm.calls == 1 and out.requires_grad
    seen = []
    norm.register_forward_hook(lambda module, args, output: seen.append(output))
    with torch.inference_mode():
        fused(norm, torch.randn(1, 1, 256))
    assert len(seen) == 1


@torch.inference_mode()
def test_replaced_weights_are_checked_again():
    norm, fused = _norm(CountingRMSNorm), FusedNorm()
    x = torch.randn(1, 1, 256)
    fused(norm, x)
    norm.weight = torch.nn.Parameter(torch.randn(256))
    assert torch.equal(fused(norm, x), LlamaRMSNorm.forward(norm, x))
