"""Choosing the next token with transformers' logits processors, and decoding text as it grows."""

import math
from collections.abc import Iterable

import torch
from transformers import (
    LogitsProcessor,
    PreTrainedTokenizerBase,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


class NoEosBefore(LogitsProcessor):
    """transformers' ``MinNewTokensLengthLogitsProcessor``: EOS scores at -inf until the ids reach
    ``length``, without its mask over the whole vocabulary on every step (0.3 ms with 32k tokens):
    one ``index_fill`` with the EOS ids within the vocabulary, found once."""

    def __init__(self, length: int, eos_token_ids: list[int]):
        self.length = length
        self.eos_token_ids = eos_token_ids
        self._within: dict[int, torch.Tensor] = {}  # vocabulary size -> the EOS ids below it

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[-1] >= self.length:
            return scores
        vocab = scores.shape[-1]
        if vocab not in self._within:
            self._within[vocab] = torch.tensor([i for i in self.eos_token_ids if 0 <= i < vocab], dtype=torch.long)
        return scores.index_fill(-1, self._within[vocab], -math.inf)


def _leads(best: list[float], bound: float) -> bool:
    """Whether the best of scores each within ``bound`` of exact ones (``best``: the top ones, in
    order) must be the best of the exact ones too: it leads the next by more than ``2 * bound``."""
    return len(best) < 2 or best[0] - best[1] > 2 * bound


def greedy_is_certain(logits: torch.Tensor, bound: float, eos_token_ids: Iterable[int]) -> bool:
    """Whether the greedy choice from one row of ``logits``, each within ``bound`` of the exact one,
    is the exact logits' choice both as they are and with the EOS ids masked (a minimum length's
    processor may or may not mask them at this step): the best score must lead the next by more
    than ``2 * bound``, among all tokens and among those that are not EOS."""
    eos = set(eos_token_ids)
    scores = logits.reshape(-1)
    top = scores.topk(min(scores.numel(), len(eos) + 2))  # holds the best two that are not EOS
    values, ids = top.values.tolist(), top.indices.tolist()
    if not all(map(math.isfinite, values)):
        return False
    others = [value for value, i in zip(values, ids, strict=True) if i not in eos]
    return _leads(values, bound) and _leads(others, bound)


class TokenChooser:
    """Greedy when ``temperature == 0``, else sampling after transformers' warpers (HF's order)."""

    def __init__(
        self,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        min_new_tokens: int = 0,
        prompt_length: int = 0,
        eos_token_ids: list[int] | None = None,
    ):
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or repetition_penalty <= 0:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1, top_k >= 0, repetition_penalty > 0")
        self.greedy = temperature == 0
        # Called one by one: LogitsProcessorList inspects each processor's signature on every call.
        self.processors: list[LogitsProcessor] = []
        if min_new_tokens > 0 and eos_token_ids:
            self.processors.append(NoEosBefore(prompt_length + min_new_tokens, eos_token_ids))
        if repetition_penalty != 1.0:
            self.processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
        if not self.greedy:
            if temperature != 1.0:
                self.processors.append(TemperatureLogitsWarper(temperature))
            if top_k > 0:
                self.processors.append(TopKLogitsWarper(top_k))
            if top_p < 1.0:
                self.processors.append(TopPLogitsWarper(top_p))
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator().manual_seed(seed)

    @property
    def takes_bounds(self) -> bool:
        """Whether :meth:`certain` can choose from approximate logits (greedy, no processor that
        rescales scores)."""
        return self.greedy and all(isinstance(p, NoEosBefore) for p in self.processors)

    def certain(self, input_ids: torch.Tensor, logits: torch.Tensor, bound: float) -> torch.Tensor | None:
        """The greedy choice from ``logits`` that are within ``bound`` of the exact ones, if those must
        make the same choice (every row's best score leads the next by more than ``2 * bound``); else
        None (then choose from the exact logits)."""
        if not self.takes_bounds:
            return None
        scores = logits.float()
        for processor in self.processors:
            scores = processor(input_ids, scores)
        if not all(_leads(row, bound) for row in scores.topk(min(2, scores.shape[-1]), dim=-1).values.tolist()):
            return None
        return scores.argmax(dim=-1)

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` [batch, vocab] of the last position -> next token ids [batch]."""
        scores = logits.float()
        for processor in self.processors:
            scores = processor(input_ids, scores)
        if self.greedy:
            return scores.argmax(dim=-1)
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=self.generator).squeeze(1)


class TextStream:
    """The text of a growing list of token ids (decoded whole, so multi-token characters come out right)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.ids: list[int] = []

    def push(self, token_id: int) -> str:
        """Add a token; return the whole text so far."""
        self.ids.append(token_id)
        return self.text()

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)
