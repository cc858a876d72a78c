"""LoRA adapters on Far Nodes, with ``peft``.

A node started with ``--adapters DIR [DIR ...]`` (``FarNode(..., adapters=[...])``) loads each
directory, a LoRA checkpoint saved by ``PeftModel.save_pretrained`` (``adapter_config.json`` and
``adapter_model.safetensors``), into the layers it serves, and only those: the checkpoint's keys
for layer ``i`` are re-based to the layer and loaded with ``peft.set_peft_model_state_dict``.

An adapter's name, on the wire and in the node's DHT record, is its directory's basename
(:func:`farmesh_core.config.adapter_name`): ``--adapters /ckpt/math-lora`` serves ``"math-lora"``,
and clients ask for it with ``generate(..., adapter="math-lora")``.

Each prepared layer gets a ``farmesh_set_adapter(name)`` method (``None``: the base model). The
node's :class:`~farmesh_core.node.layer_span.LayerSpan` calls it before running a request, so one
request runs with exactly its adapter active and the others disabled.
"""

import dataclasses
import functools
import json
import os
import threading
import warnings
from functools import cache

import torch
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from torch import nn

from farmesh_core.architecture import adapter_for
from farmesh_core.checkpoint import Checkpoint
from farmesh_core.config import adapter_name
from farmesh_core.errors import ConfigError
from farmesh_core.hookspecs import hookimpl

PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before the model's own names
WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")

_lock = threading.Lock()


@cache
def _layer_prefix(model_id: str) -> str:
    """The checkpoint-name prefix of the model's layers, with ``{index}`` (``model.layers.{index}.``)."""
    return adapter_for(Checkpoint(model_id).config).layer_prefix


@cache
def load_lora(path: str) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The LoRA config and all tensors of a ``PeftModel.save_pretrained`` directory (names without
    ``base_model.model.``); read once per node and directory."""
    config_file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_file):
        raise ConfigError(f"adapter {path!r}: no adapter_config.json (a directory saved by PeftModel.save_pretrained)")
    with open(config_file) as f:
        raw = json.load(f)
    if raw.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"adapter {path!r}: only LoRA adapters are supported, not {raw.get('peft_type')}")
    config = LoraConfig.from_pretrained(path)
    for weights in WEIGHTS_NAMES:
        file = os.path.join(path, weights)
        if os.path.isfile(file):
            state = load_file(file) if file.endswith(".safetensors") else torch.load(file, weights_only=True)
            break
    else:
        raise ConfigError(f"adapter {path!r}: no {' or '.join(WEIGHTS_NAMES)}")
    return config, {name.removeprefix(PEFT_PREFIX): t for name, t in state.items()}


def layer_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of one layer (names starting with ``prefix``), re-based to the layer."""
    return {name[len(prefix) :]: t for name, t in state.items() if name.startswith(prefix)}


def set_adapter(layer: nn.Module, name: str | None) -> None:
    """Make ``name`` the only active adapter of every LoRA module of ``layer`` (``None``: none)."""
    for module in layer.modules():
        if isinstance(module, BaseTunerLayer):
            if name is None:
                module.enable_adapters(False)
            else:
                module.enable_adapters(True)
                module.set_adapter(name)
    layer.requires_grad_(False)  # peft marks active adapters trainable; clients never train node weights


def add_adapter(layer: nn.Module, index: int, path: str, prefix: str) -> bool:
    """Inject the LoRA of ``path`` into ``layer`` (global ``index``) under its name; False if the
    adapter has no weights for this layer."""
    lora_config, state = load_lora(path)
    sd = layer_state(state, prefix.format(index=index))
    if not sd:
        return False
    name = adapter_name(path)
    lora_config = dataclasses.replace(lora_config, inference_mode=True)
    with warnings.catch_warnings():  # several adapters in one layer is what we want
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(lora_config, layer, adapter_name=name)
    result = set_peft_model_state_dict(layer, sd, adapter_name=name)
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if missing:
        raise ConfigError(f"adapter {name!r}, layer {index}: tensors {missing[:4]} match no module of the layer")
    return True


@hookimpl
def farmesh_prepare_layer(layer, index, config):
    """Load every adapter of ``config.adapters`` into ``layer`` and give it ``farmesh_set_adapter``."""
    if not config.adapters:
        return
    names = [adapter_name(p) for p in config.adapters]
    if len(set(names)) != len(names):
        raise ConfigError(f"adapter directories must have distinct basenames (their names): {names}")
    prefix = _layer_prefix(config.model_id)
    with _lock:
        for path in config.adapters:
            add_adapter(layer, index, path, prefix)
        set_adapter(layer, None)
        layer.eval()
    layer.farmesh_set_adapter = functools.partial(set_adapter, layer)
