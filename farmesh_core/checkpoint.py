"""Read a checkpoint's config and tokenizer, and load only the tensors a caller needs.

A node loads the weights of the layers it serves, a client the embeddings, final norm and LM head;
nobody reads the whole model. Single-file and sharded (``model.safetensors.index.json``)
safetensors checkpoints are supported.
"""

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable
from functools import cached_property

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from farmesh_core.errors import ModelNotFoundError

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Config fields that differ between copies of the same weights and must not change the DHT prefix.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures"}


def resolve_model_dir(model_id: str) -> str:
    """Return the local directory of ``model_id``: a directory, or a hub id already in the HF cache."""
    if os.path.isdir(model_id):
        return os.path.abspath(model_id)
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model_id, local_files_only=True)
    except Exception as e:
        raise ModelNotFoundError(
            f"{model_id!r} is not a checkpoint directory and is not in the local Hugging Face cache "
            f"(FarMesh never downloads weights): {e}"
        ) from None


class Checkpoint:
    """A checkpoint on local disk: its config, tokenizer and an index of its tensors."""

    def __init__(self, model_id: str):
        self.model_id = model_id
        self.path = resolve_model_dir(model_id)

    @cached_property
    def config(self) -> PretrainedConfig:
        return AutoConfig.from_pretrained(self.path, local_files_only=True)

    def tokenizer(self) -> PreTrainedTokenizerBase:
        return AutoTokenizer.from_pretrained(self.path, local_files_only=True)

    @cached_property
    def weight_map(self) -> dict[str, str]:
        """Tensor name -> safetensors file that holds it."""
        index_path = os.path.join(self.path, INDEX_FILE)
        if os.path.exists(index_path):
            with open(index_path) as f:
                return {name: os.path.join(self.path, file) for name, file in json.load(f)["weight_map"].items()}
        single = os.path.join(self.path, SINGLE_FILE)
        if not os.path.exists(single):
            raise ModelNotFoundError(f"{self.path} has neither {SINGLE_FILE} nor {INDEX_FILE}")
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}

    def load_tensors(self, names: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Read exactly ``names`` (each from its own file), optionally cast to ``dtype``."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self.weight_map:
                raise ModelNotFoundError(f"{self.path} has no tensor named {name!r}")
            by_file.setdefault(self.weight_map[name], []).append(name)
        tensors = {}
        for file, file_names in by_file.items():
            with safe_open(file, framework="pt") as f:
                for name in file_names:
                    tensor = f.get_tensor(name)
                    tensors[name] = tensor if dtype is None else tensor.to(dtype)
        logger.debug("Loaded %d tensors from %s", len(tensors), self.path)
        return tensors

    def names_with_prefix(self, prefix: str) -> list[str]:
        return [name for name in self.weight_map if name.startswith(prefix)]

    @cached_property
    def dht_prefix(self) -> str:
        """A DHT namespace that only copies of these weights share, wherever they lie on disk.

        It hashes the config (minus fields that differ between copies) and the first row of the
        first tensor, so two fine-tunes of one architecture do not mix in one Far Mesh Network.
        """
        with open(os.path.join(self.path, "config.json")) as f:
            raw = json.load(f)
        stable = {k: v for k, v in raw.items() if k not in _VOLATILE_CONFIG_KEYS}
        digest = hashlib.sha256(json.dumps(stable, sort_keys=True).encode())
        first_name = min(self.weight_map)
        with safe_open(self.weight_map[first_name], framework="pt") as f:
            row = f.get_slice(first_name)[0:1]
        digest.update(row.float().numpy().tobytes())
        model_type = re.sub(r"[^A-Za-z0-9_-]+", "-", str(raw.get("model_type", "model")))
        return f"{model_type}-{digest.hexdigest()[:16]}"
