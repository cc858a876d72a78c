"""Whether a module has forward hooks: the quicker paths that call a module's computation directly
(lean layers, ``StepLinear``, the fused RMSNorm, the LM head's batcher, a token loop's embedding
rows) skip its ``__call__``, so they are only for modules without hooks, their own or global ones.
Lean layers and embedding rows check a module's own hooks when they are made (so a
``farmesh_prepare_layer`` hook's are seen); global ones are checked on every call too, since any
code may register them at any time."""

from torch import nn
from torch.nn.modules import module as torch_module


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run forward (pre-)hooks: its own, or ones registered for every module."""
    return bool(module._forward_hooks or module._forward_pre_hooks) or has_global_forward_hooks()


def has_global_forward_hooks() -> bool:
    """Whether forward (pre-)hooks are registered for every module (``register_module_forward_hook``)."""
    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)
