"""Make small seeded checkpoints (random weights + an offline byte-level BPE tokenizer).

Tests, the demo and the benchmarks use them: nothing is downloaded. ``initializer_range=0.1`` keeps
a random model's greedy output varied, so a token-equality check means something.
"""

import inspect
import json
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

TINY_LLAMA = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)

# Small defaults per model_type; make_checkpoint's overrides change any of them. Falcon's default is
# the multi-query architecture (transformers' own default); `new_decoder_architecture=True,
# num_kv_heads=2` gives the new one, `alibi=True` alibi Falcon.
TINY_CONFIGS = {
    "llama": TINY_LLAMA,
    "mistral": {**TINY_LLAMA, "num_key_value_heads": 4},
    "mixtral": {**TINY_LLAMA, "intermediate_size": 344, "num_key_value_heads": 4, "num_local_experts": 4},
    "falcon": dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=8),
    # Untied: a tiny tied Bloom at initializer_range 0.1 greedily repeats its last token forever.
    "bloom": dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=8, tie_word_embeddings=False),
}


def stdlib_text() -> list[str]:
    """Some tens of KB of English from the Python standard library's docstrings (no downloads)."""
    import argparse
    import collections
    import json as json_module
    import logging
    import textwrap

    docs = []
    for module in (argparse, collections, json_module, logging, textwrap):
        docs.append(inspect.getdoc(module) or "")
        for _, obj in sorted(vars(module).items()):
            doc = inspect.getdoc(obj) if callable(obj) else None
            if doc:
                docs.append(doc)
    return docs


def build_tokenizer(vocab_size: int, texts: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with Llama's special tokens (<unk>=0, <s>=1, </s>=2)."""
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts or stdlib_text(), trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=2048
    )


def make_checkpoint(
    out_dir: str,
    model_type: str = "llama",
    *,
    seed: int = 0,
    vocab_size: int = 1024,
    initializer_range: float = 0.1,
    max_shard_size: str | None = None,
    **config_overrides,
) -> str:
    """Write a seeded random ``model_type`` checkpoint and tokenizer to ``out_dir``; return ``out_dir``.

    ``model_type`` is any type ``transformers`` knows; the ones in ``TINY_CONFIGS`` (llama, mistral,
    mixtral, falcon, bloom) start from small defaults (hidden size 256, 8 layers).

    ``config_overrides`` change the architecture (``num_hidden_layers=4``, ``num_key_value_heads=4``...);
    ``max_shard_size`` (e.g. ``"2MB"``) writes a sharded checkpoint with an index file.
    """
    tokenizer = build_tokenizer(vocab_size)
    fields = dict(TINY_CONFIGS.get(model_type, {}))
    fields.update(config_overrides)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        **fields,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    os.makedirs(out_dir, exist_ok=True)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_dir, **kwargs)
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "farmesh-maker.json"), "w") as f:
        json.dump({"model_type": model_type, "seed": seed, "overrides": config_overrides}, f)
    return out_dir


def ensure_checkpoint(out_dir: str, model_type: str = "llama", **kwargs) -> str:
    """``make_checkpoint`` unless ``out_dir`` already holds a checkpoint."""
    if not os.path.exists(os.path.join(out_dir, "config.json")):
        make_checkpoint(out_dir, model_type, **kwargs)
    return out_dir
