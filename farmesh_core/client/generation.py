"""Choosing the next token with transformers' logits processors, and decoding text as it grows."""

import math
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from transformers import (
    LogitsProcessor,
    PreTrainedTokenizerBase,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from farmesh_core.client.session import LoopAsk
from farmesh_core.head_batch import ApproximateLogits, Refine

if TYPE_CHECKING:
    from farmesh_core.architecture import ClientHead
    from farmesh_core.client.session import InferenceSession


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


MAX_REFINED = 64  # more ids than this near the best: the exact logits are the quicker way
_NONE_REFINED = (torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.float64))  # read only


def certain_best(
    scores: torch.Tensor, bound: float, refine: Refine | None = None
) -> tuple[int, torch.Tensor, torch.Tensor] | None:
    """The id that the exact scores rank first, from one row of approximate ``scores`` (each within
    ``bound`` of the exact one; masked ones -inf), if that is certain, with the ids that ``refine``
    scored again on the way and their new scores (both empty if none were needed); else None.

    Certain when the best leads the next by more than ``2 * bound``. Otherwise the best exact score is
    one of those within ``2 * bound`` of the best approximate one: ``refine`` scores these again,
    within a far smaller bound each, and the one whose lowest possible score beats every other's
    highest (theirs, or the other ids' approximate ones plus ``bound``) is certain."""
    top = scores.topk(min(2, scores.numel()))
    values = top.values.tolist()
    if not math.isfinite(values[0]):  # NaN (topk ranks it first), or nothing left unmasked
        return None
    if len(values) < 2 or values[0] - values[1] > 2 * bound:
        return int(top.indices[0]), *_NONE_REFINED
    near = (scores >= values[0] - 2 * bound).nonzero().flatten()
    if refine is None or near.numel() > MAX_REFINED:
        return None
    exact, within = refine(near)
    low, high = exact - within, exact + within
    best = int(low.argmax())
    high[best] = -math.inf
    others = scores.clone()
    others[near] = -math.inf
    if float(low[best]) > max(float(high.max()), float(others.max()) + bound):
        return int(near[best]), near, exact
    return None


def greedy_certain_logits(
    logits: torch.Tensor, bound: float, eos_token_ids: Iterable[int], refine: Refine | None = None
) -> torch.Tensor | None:
    """One row of ``logits``, each within ``bound`` of the exact ones, with the scores ``refine`` gave
    near ties put in (see :func:`certain_best`), if the greedy choice from them is the exact logits'
    both as they are and with the EOS ids masked (a minimum length's processor may or may not mask
    them at this step); else None."""
    row = logits.reshape(-1)
    eos = torch.tensor(sorted(i for i in set(eos_token_ids) if 0 <= i < row.numel()), dtype=torch.long)

    def variants(scores: torch.Tensor) -> list[torch.Tensor]:
        """``scores`` as they are, and with the EOS ids masked if there are any."""
        return [scores, scores.index_fill(0, eos.to(scores.device), -math.inf)] if eos.numel() else [scores]

    out, choices = logits.clone(), []
    for scores in variants(row):
        found = certain_best(scores, bound, refine)
        if found is None:
            return None
        best, ids, exact = found
        choices.append(best)
        out.view(-1)[ids] = exact.to(out.dtype)
    # the scores put in keep each variant's choice first (they are far closer than ``bound``): checked
    chosen = [int(scores.argmax()) for scores in variants(out.view(-1))]
    return out if chosen == choices else None


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
        self.certain_choices = 0  # steps whose tokens :meth:`certain` chose (from approximate logits)

    @classmethod
    def greedy_after(cls, processors: Iterable[LogitsProcessor]) -> "TokenChooser":
        """Greedy after ``processors`` (as transformers' ``generate`` built them for a call)."""
        chooser = cls()
        chooser.processors = list(processors)
        return chooser

    @property
    def takes_bounds(self) -> bool:
        """Whether :meth:`certain` can choose from approximate logits (greedy, no processor that
        rescales scores)."""
        return self.greedy and all(isinstance(p, NoEosBefore) for p in self.processors)

    def certain(
        self, input_ids: torch.Tensor, logits: torch.Tensor, bound: float, refine: Refine | None = None
    ) -> torch.Tensor | None:
        """The greedy choice from ``logits`` that are within ``bound`` of the exact ones, if those must
        make the same choice (see :func:`certain_best`; ``refine`` scores near ties of a one-row
        ``logits`` again); else None (then choose from the exact logits)."""
        if not self.takes_bounds:
            return None
        scores = self._scores(input_ids, logits)
        choices = []
        for row in scores:
            found = certain_best(row, bound, refine if scores.shape[0] == 1 else None)
            if found is None:
                return None
            choices.append(found[0])
        self.certain_choices += 1
        return torch.tensor(choices, device=logits.device)

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` [batch, vocab] of the last position -> next token ids [batch]."""
        scores = self._scores(input_ids, logits)
        if self.greedy:
            return scores.argmax(dim=-1)
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=self.generator).squeeze(1)

    def _scores(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` in float32 (without a call where they are already: each torch call hands over
        the GIL), through the processors."""
        scores = logits if logits.dtype == torch.float32 else logits.float()
        for processor in self.processors:
            scores = processor(input_ids, scores)
        return scores


def next_token(head: "ClientHead", choose: TokenChooser, input_ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The next token from the last position's hidden states [batch, hidden] (in the head's dtype): a
    greedy choice from the head's quick approximate logits where their error bound cannot change it,
    else from exact logits."""
    if last.shape[0] > 1 and choose.takes_bounds:
        return _next_tokens(head, choose, input_ids, last)
    approximate = head.approximate_logits(last) if choose.takes_bounds else None
    if approximate is None:
        return choose(input_ids, head.logits(last))
    return settled(head, choose, input_ids, approximate, last)


def settled(
    head: "ClientHead",
    choose: TokenChooser,
    input_ids: torch.Tensor,
    approximate: ApproximateLogits,
    last: torch.Tensor,
) -> torch.Tensor:
    """One row's choice (``last`` [1, hidden]) from its quick ``approximate`` logits where their bound
    settles it (near ties scored again), else from the row's exact logits, alone."""
    token = choose.certain(input_ids, approximate.logits, approximate.bound, approximate.refine)
    return choose(input_ids, head.module_logits(last)) if token is None else token


@torch.inference_mode()
def decode(
    head: "ClientHead",
    session: "InferenceSession",
    input_ids: torch.Tensor,
    max_new_tokens: int,
    choose: TokenChooser,
    eos: torch.Tensor,
) -> Iterator[torch.Tensor]:
    """Each new token id tensor [rows] of ``input_ids``' rows, stepped through ``session`` (which has
    not seen them); stops after ``max_new_tokens``, or once every row has chosen one of ``eos``."""
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    eos_ids = set(eos.tolist())  # checked in Python first: most tokens are not EOS
    loop = loop_ask(choose, eos_ids, max_new_tokens, session.position)
    if loop is not None and input_ids.shape[0] == 1 and session.loops(head.lm_head.weight.dtype):
        chosen: list[int] = []  # (a list: a tensor of the ids so far only where the client chooses)

        def ids_so_far() -> torch.Tensor:
            return torch.cat([input_ids, torch.tensor([chosen], dtype=input_ids.dtype)], dim=1)

        for token in looped_tokens(head, session, input_ids, loop, choose, ids_so_far):
            chosen.append(token)
            yield torch.tensor([token])
        return
    new_input = input_ids
    for _ in range(max_new_tokens):
        # Each torch call lets go of the GIL: with sessions stepping from several threads, the calls
        # saved here (a same-dtype cast, a second unsqueeze) are hand-overs saved.
        last = head.in_head_dtype(session.step(head.embed(new_input))[:, -1])
        token = next_token(head, choose, input_ids, last)
        new_input = token[:, None]
        input_ids = torch.cat([input_ids, new_input], dim=1)
        yield token
        if not eos_ids.isdisjoint(token.tolist()):
            finished |= torch.isin(token, eos)
            if finished.all():
                return


def looped_tokens(
    head: "ClientHead", session: "InferenceSession", input_ids: torch.Tensor, loop: LoopAsk, choose: TokenChooser,
    ids_so_far: Callable[[], torch.Tensor],
) -> Iterator[int]:  # fmt: skip
    """``session.loop_tokens`` after ``input_ids`` (not sent yet), with the head's embeddings, and
    ``choose``'s choice where the last node made none (``ids_so_far()``: the ids it sees then)."""

    def choose_here(hidden: torch.Tensor) -> int:
        return int(next_token(head, choose, ids_so_far(), head.in_head_dtype(hidden[:, -1]))[0])

    return session.loop_tokens(head.embed(input_ids), loop, lambda t: head.embed(torch.tensor([[t]])), choose_here)


def loop_ask(choose: TokenChooser, eos_ids: set[int], max_new_tokens: int, offset: int) -> LoopAsk | None:
    """What a token loop must do to choose up to ``max_new_tokens`` as ``choose`` does (greedy, at most
    a minimum length's EOS mask), or None where it cannot. ``offset``: the session's length less the
    ids ``choose`` sees at the same moment (the node counts the session's whole length)."""
    masks = [p for p in choose.processors if isinstance(p, NoEosBefore)]  # (takes_bounds: no others)
    if not choose.takes_bounds or len({tuple(m.eos_token_ids) for m in masks}) > 1 or max_new_tokens < 1:
        return None
    if not masks:
        return LoopAsk(max_new_tokens, sorted(eos_ids))
    until = max(m.length for m in masks)  # (transformers' minimum length and minimum new tokens may both be set)
    return LoopAsk(max_new_tokens, sorted(eos_ids), list(masks[0].eos_token_ids), until + offset)


def _next_tokens(head: "ClientHead", choose: TokenChooser, input_ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """:func:`next_token` of each row (a shared session's): one pass through the head's quick logits
    for all rows, each row's choice made (near ties scored again) as it would be alone, and exact
    logits, the row alone, for a row they cannot settle. The exact logits of all rows at once cost a
    32k-token head 7.1 ms for 8 rows on one core, the quick ones 1.4 (``head_batch``)."""
    rows = head.approximate_rows(last)
    if rows is None:
        return choose(input_ids, head.logits(last))
    return torch.cat([settled(head, choose, input_ids[i : i + 1], row, last[i : i + 1]) for i, row in enumerate(rows)])


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
