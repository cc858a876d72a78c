"""Built-in quantizers: ``none``, ``int8`` (torch, CPU) and ``bnb-int8`` / ``nf4`` (bitsandbytes, optional).

Each quantizer swaps the ``nn.Linear`` modules of a decoder layer (the attention projections and the
MLP, where nearly all of its weights are) for a quantized equivalent, and leaves norms, rotary
embeddings and LoRA weights (modules named ``lora_*``) as they are. Every quantized layer supports
the node's three paths: inference steps under ``torch.inference_mode`` with a ``SessionCache``,
batch forward, and backward (the gradient with respect to the layer's input; weights stay frozen).
"""

import warnings

import torch
from torch import nn

from farmesh_core.errors import ConfigError
from farmesh_core.hookspecs import hookimpl

BNB_INSTALL_HINT = "pip install farmesh[bnb]"


def no_quantization(layer: nn.Module, config) -> nn.Module:
    """Serve the layer in the dtype it was loaded in."""
    return layer


def quantizable_linears(layer: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """``(parent, attribute, linear)`` for every ``nn.Linear`` in ``layer`` outside LoRA adapters."""
    found = []
    for path, parent in layer.named_modules():
        if any(part.startswith("lora_") for part in path.split(".")):
            continue
        for name, child in parent.named_children():
            if type(child) is nn.Linear and not name.startswith("lora_"):
                found.append((parent, name, child))
    return found


def _replace_linears(layer: nn.Module, make) -> nn.Module:
    """Swap each quantizable linear for ``make(linear)``, then give the tensors left in the layer (norms)
    memory of their own.

    Weights loaded from safetensors are views of the file mapped in memory, and every page read to
    quantize them stays resident as long as any tensor of that mapping lives: without the copies, the
    layer norms would keep all the float32 weights in the node's memory next to their quantized form.
    """
    quantized = []
    for parent, name, linear in quantizable_linears(layer):
        quantized.append(make(linear))
        setattr(parent, name, quantized[-1])
    new = {id(t) for module in quantized for t in [*module.parameters(), *module.buffers()]}
    for tensor in [*layer.parameters(), *layer.buffers()]:
        if id(tensor) not in new:
            tensor.data = tensor.data.clone()
    return layer


# ---- int8: torch's dynamic quantization (int8 weights, activations quantized per call) ---------------
class _Int8LinearFunction(torch.autograd.Function):
    """Forward through the int8 kernel; backward through the dequantized weight (straight-through).

    torch's quantized dynamic linear has no autograd kernel: a backward through it silently yields no
    gradient. This is the gradient of the layer with its weights rounded to int8, which is what a
    client fine-tuning through a quantized node needs.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, module: "Int8Linear") -> torch.Tensor:
        ctx.module = module
        return module.quantized_forward(hidden)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        weight = ctx.module.quantized.weight().dequantize()
        return grad_output.to(weight.dtype) @ weight, None


class Int8Linear(nn.Module):
    """A float32 ``nn.Linear`` with int8 weights (symmetric, one scale per output channel).

    Activations are quantized on the fly at each call (torch's dynamic quantization, fbgemm/oneDNN
    kernels): a one-token step reads a quarter of the bytes, which is what limits decoding on a CPU.
    The kernel takes one activation scale for its whole input, so each sequence of a batch is quantized
    on its own: with one scale for a batch of sessions (continuous batching), one client's large
    activations would wipe out the precision of everyone batched with it, and a session's output would
    depend on its neighbours. The kernel runs with torch's default 7-bit activation range
    (``reduce_range``), which cannot overflow on CPUs without VNNI.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if linear.bias is not None:  # the packed parameters keep the bias tensor: an own copy, not the file's
            linear.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
            warnings.simplefilter("ignore")
            from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
            from torch.ao.quantization import per_channel_dynamic_qconfig

            linear.qconfig = per_channel_dynamic_qconfig
            self.quantized = DynamicQuantizedLinear.from_float(linear)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and hidden.requires_grad:
            return _Int8LinearFunction.apply(hidden, self)
        return self.quantized_forward(hidden)

    def quantized_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dim() > 2 and hidden.shape[0] > 1:  # one activation scale per sequence
            return torch.cat([self.quantized(sequence) for sequence in hidden.split(1)])
        return self.quantized(hidden)

    def nbytes(self) -> int:
        """Bytes of the int8 weight, its per-channel scales and zero points, and the bias."""
        weight = self.quantized.weight()
        total = weight.numel()  # one byte per int8 weight
        if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            total += weight.q_per_channel_scales().nbytes + weight.q_per_channel_zero_points().nbytes
        bias = self.quantized.bias()
        return total + (0 if bias is None else bias.nbytes)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def int8_quantization(layer: nn.Module, config) -> nn.Module:
    """Int8 weights with torch's dynamic quantization: the fastest option on CPU (float32 layers only)."""
    device = getattr(config, "device", "cpu")
    if not str(device).startswith("cpu"):
        raise ConfigError(f"quantization 'int8' runs on CPU only (device is {device!r}); on a GPU use bnb-int8 or nf4")
    linears = quantizable_linears(layer)
    dtypes = {linear.weight.dtype for _, _, linear in linears}
    if dtypes - {torch.float32}:
        found = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        raise ConfigError(
            f"quantization 'int8' needs float32 layers but they load as {found}; start the node with --dtype float32"
        )
    return _replace_linears(layer, Int8Linear)


# ---- bitsandbytes: LLM.int8() and 4-bit NormalFloat ---------------------------------------------------
def _bitsandbytes(name: str):
    try:
        import bitsandbytes
    except ImportError as e:
        raise ConfigError(
            f"quantization {name!r} needs bitsandbytes, which is not installed ({e}); install it with "
            f"`{BNB_INSTALL_HINT}`, or use --quantization int8 on a CPU"
        ) from None
    return bitsandbytes


def bnb_int8_quantization(layer: nn.Module, config) -> nn.Module:
    """LLM.int8() (bitsandbytes ``Linear8bitLt``): int8 weights, outlier features kept in 16 bits."""
    bnb = _bitsandbytes("bnb-int8")
    device = getattr(config, "device", "cpu")

    def make(linear: nn.Linear) -> nn.Module:
        quantized = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            has_fp16_weights=False, threshold=6.0, device="meta",
        )  # fmt: skip
        # Int8Params quantizes when it moves from the CPU to a device: a layer already on a GPU goes via the CPU
        weight = linear.weight.data.cpu()
        quantized.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        if linear.bias is not None:
            quantized.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return quantized.to(device)  # bitsandbytes quantizes the weight when it moves to the device

    return _replace_linears(layer, make)


def nf4_quantization(layer: nn.Module, config) -> nn.Module:
    """4-bit NormalFloat weights (bitsandbytes ``Linear4bit``, QLoRA's format), computing in the layer's dtype."""
    bnb = _bitsandbytes("nf4")
    device = getattr(config, "device", "cpu")

    def make(linear: nn.Linear) -> nn.Module:
        quantized = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            compute_dtype=linear.weight.dtype, quant_type="nf4", device="meta",
        )  # fmt: skip
        quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")
        if linear.bias is not None:
            quantized.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return quantized.to(device)

    return _replace_linears(layer, make)


def module_nbytes(module: nn.Module) -> int:
    """Bytes of a (possibly quantized) module's weights, including quantization scales."""
    if isinstance(module, Int8Linear):
        return module.nbytes()
    total = 0
    for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
        total += tensor.numel() * tensor.element_size()
        quant_state = getattr(tensor, "quant_state", None)  # bitsandbytes 4-bit: absmax per block
        absmax = getattr(quant_state, "absmax", None)
        if isinstance(absmax, torch.Tensor):
            total += absmax.numel() * absmax.element_size()
        scales = getattr(tensor, "SCB", None)  # bitsandbytes int8: one scale per row
        if isinstance(scales, torch.Tensor):
            total += scales.numel() * scales.element_size()
    return total + sum(module_nbytes(child) for child in module.children())


@hookimpl
def farmesh_register_quantizers(register):
    register("none", no_quantization)
    register("int8", int8_quantization)
    register("bnb-int8", bnb_int8_quantization)
    register("nf4", nf4_quantization)
