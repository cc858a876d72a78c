"""Whether a module has forward hooks: the quicker paths that call a module's computation directly
(lean layers, ``StepLinear``, the fused RMSNorm, a token loop's embedding rows) skip its
``__call__``, so they are only for modules without hooks, their own or global ones."""

from torch import nn
from torch.nn.modules import module as torch_module


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run forward (pre-)hooks: its own, or ones registered for every module."""
    return bool(
        module._forward_hooks or module._forward_pre_hooks
        or torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
    )  # fmt: skip
