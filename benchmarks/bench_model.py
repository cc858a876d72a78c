"""The model a benchmark runs on: its layer split over one and two nodes, and its prompt.

Any checkpoint can be benchmarked (``--model DIR``), so the spans follow its layer count and the
prompt its vocabulary; with a tokenizer in the checkpoint the prompt is the Petals benchmark's text.
"""

import torch
from transformers import AutoConfig

from farmesh_core.architecture import checkpoint_dtype

# ../shared/baselines/petals-bench/bench_client.py's default prompt (34 tokens with its 1024-token BPE)
PETALS_PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
RANDOM_PROMPT_TOKENS = 34


class BenchModel:
    def __init__(self, model_dir: str):
        self.dir = model_dir
        config = AutoConfig.from_pretrained(model_dir)
        self.num_layers: int = config.num_hidden_layers
        self.hidden_size: int = config.hidden_size
        self.vocab_size: int = config.vocab_size
        self.dtype: torch.dtype = checkpoint_dtype(config)  # the nodes' by default, and local transformers' beside them
        self.half = self.num_layers // 2  # where the second node's layers start
        self.one_node = [f"0:{self.num_layers}"]
        self.two_nodes = [f"0:{self.half}", f"{self.half}:{self.num_layers}"]

    def describe(self) -> str:
        return f"hidden {self.hidden_size}, {self.num_layers} layers, vocab {self.vocab_size}, {str(self.dtype).removeprefix('torch.')}"

    def prompt(self) -> torch.Tensor:
        """The Petals benchmark's prompt through the checkpoint's tokenizer, else 34 seeded random ids."""
        try:
            from transformers import AutoTokenizer

            ids = AutoTokenizer.from_pretrained(self.dir)(PETALS_PROMPT, return_tensors="pt")["input_ids"]
        except (OSError, ValueError):  # no tokenizer saved with the checkpoint
            return self.random_prompt(0)
        return ids.long()

    def random_prompt(self, seed: int, length: int = RANDOM_PROMPT_TOKENS) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(3, min(self.vocab_size, 1024), (1, length), generator=generator)
