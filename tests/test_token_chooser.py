"""TokenChooser's processors give transformers' scores; greedy choices from approximate logits only where certain."""

import pytest
import torch
from transformers import GenerationConfig, MinNewTokensLengthLogitsProcessor

from farmesh_core.client.causal_lm import _plain_greedy_eos
from farmesh_core.client.generation import NoEosBefore, TokenChooser, greedy_certain_logits


@pytest.mark.parametrize("eos", [[2], [0, 5, 7], [3, 5000]])  # 5000: outside the vocabulary, ignored by both
def test_no_eos_before_gives_transformers_min_new_tokens_scores(eos):
    prompt_length, min_new_tokens = 6, 3
    ours, theirs = (
        NoEosBefore(prompt_length + min_new_tokens, eos),
        MinNewTokensLengthLogitsProcessor(prompt_length, min_new_tokens, eos),
    )
    scores = torch.randn(2, 100, generator=torch.Generator().manual_seed(0))
    for length in range(prompt_length, prompt_length + min_new_tokens + 2):
        ids = torch.zeros(2, length, dtype=torch.long)
        expected = theirs(ids, scores)
        assert torch.equal(ours(ids, scores), expected)
    assert torch.equal(scores, torch.randn(2, 100, generator=torch.Generator().manual_seed(0)))  # not in place
    small = torch.randn(1, 6)  # another vocabulary: EOS ids beyond it are left out
    ids = torch.zeros(1, prompt_length, dtype=torch.long)
    assert torch.equal(ours(ids, small), theirs(ids, small))


def test_greedy_choice_waits_for_min_new_tokens_before_eos():
    chooser = TokenChooser(min_new_tokens=2, prompt_length=3, eos_token_ids=[1])
    logits = torch.tensor([[0.0, 5.0, 1.0]])  # EOS (1) scores highest
    assert chooser(torch.zeros(1, 3, dtype=torch.long), logits).tolist() == [2]
    assert chooser(torch.zeros(1, 4, dtype=torch.long), logits).tolist() == [2]
    assert chooser(torch.zeros(1, 5, dtype=torch.long), logits).tolist() == [1]


def test_a_greedy_choice_is_certain_only_when_the_bound_cannot_change_it():
    chooser = TokenChooser()
    ids = torch.zeros(1, 3, dtype=torch.long)
    logits = torch.tensor([[0.0, 2.0, 1.9, -1.0]])
    assert chooser.certain(ids, logits, bound=0.04).tolist() == [1]  # leads by 0.1 > 2 * 0.04
    assert chooser.certain(ids, logits, bound=0.06) is None  # the exact logits might rank 2 first
    assert TokenChooser(temperature=0.7).certain(ids, logits, bound=0.0) is None  # sampling: exact logits
    assert TokenChooser(repetition_penalty=1.3).certain(ids, logits, bound=0.0) is None  # rescales scores
    eos_held = TokenChooser(min_new_tokens=2, prompt_length=3, eos_token_ids=[1])
    assert eos_held.takes_bounds
    assert eos_held.certain(ids, logits, bound=0.9).tolist() == [2]  # EOS (1) is out: 2 leads 0 by 1.9
    assert eos_held.certain(ids, logits, bound=1.0) is None
    assert TokenChooser().certain(ids, torch.tensor([[3.0]]), bound=1.0).tolist() == [0]  # one choice only


def test_a_greedy_choice_is_certain_only_if_it_is_with_and_without_eos_masked():
    logits = torch.tensor([[0.0, 2.0, 1.9, 1.0]])  # token 1 leads 2 by 0.1
    assert torch.equal(greedy_certain_logits(logits, bound=0.04, eos_token_ids=[]), logits)
    assert greedy_certain_logits(logits, bound=0.06, eos_token_ids=[]) is None
    eos_first = torch.tensor([[0.0, 3.0, 1.9, 1.8]])  # EOS (1) leads by 1.1; masked, 2 leads 3 by 0.1
    assert greedy_certain_logits(eos_first, bound=0.04, eos_token_ids=[1]) is not None
    assert greedy_certain_logits(eos_first, bound=0.06, eos_token_ids=[1]) is None
    assert greedy_certain_logits(eos_first, bound=0.06, eos_token_ids=[]) is not None  # no EOS mask to fear
    assert greedy_certain_logits(torch.tensor([[0.0, float("nan"), 1.0]]), bound=0.0, eos_token_ids=[]) is None


def refine_from(exact: list[float], within: float, asked: list):
    """A ``refine`` that scores ids from ``exact`` (each within ``within``), noting which ids it was asked for."""

    def refine(ids: torch.Tensor):
        asked.append(ids.tolist())
        values = torch.tensor(exact, dtype=torch.float64)[ids]
        return values, torch.full((len(ids),), within, dtype=torch.float64)

    return refine


def test_near_ties_are_settled_by_scoring_only_their_ids_again():
    ids = torch.zeros(1, 3, dtype=torch.long)
    logits = torch.tensor([[0.0, 2.0, 1.95, 1.0, 1.9]])  # 1, 2 and 4 are within 2 * 0.06 of the best
    exact = [0.0, 1.97, 2.01, 1.0, 1.93]  # the exact scores (each within 0.06): 2 is the best
    asked = []
    assert TokenChooser().certain(ids, logits, 0.06, refine_from(exact, 0.001, asked)).tolist() == [2]
    assert asked == [[1, 2, 4]]  # only the ids near the best were scored again
    # too close to call even scored again: the exact logits decide
    assert TokenChooser().certain(ids, logits, 0.06, refine_from(exact, 0.03, [])) is None
    # transformers' loop gets the logits with those scores put in: its argmax is the exact one
    out = greedy_certain_logits(logits, 0.06, [], refine_from(exact, 0.001, []))
    assert int(out.argmax()) == 2 and out[0, 0] == 0.0 and float(out[0, 2]) == pytest.approx(2.01)
    # with EOS (2) masked, 1 is the best (1.97 against 4's 1.93); the logits give both choices
    masked = greedy_certain_logits(logits, 0.06, [2], refine_from(exact, 0.001, []))
    assert int(masked.argmax()) == 2 and int(masked.index_fill(1, torch.tensor([2]), float("-inf")).argmax()) == 1
    held = TokenChooser(min_new_tokens=2, prompt_length=3, eos_token_ids=[2])
    assert held.certain(ids, logits, 0.06, refine_from(exact, 0.001, [])).tolist() == [1]


def test_only_plain_greedy_generate_calls_take_quick_logits():
    defaults = GenerationConfig(bos_token_id=1, eos_token_id=2)
    bench = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, num_beams=1, pad_token_id=0, streamer=None)
    assert _plain_greedy_eos(defaults, bench) == [2]
    assert _plain_greedy_eos(defaults, {"generation_config": GenerationConfig(eos_token_id=[3, 4])}) == [2, 3, 4]
    assert _plain_greedy_eos(defaults, {"temperature": 0.7}) == [2]  # ignored when greedy
    for changes in (
        {"do_sample": True},
        {"repetition_penalty": 1.2},
        {"suppress_tokens": [5]},
        {"output_scores": True},
        {"num_return_sequences": 2},
        {"logits_processor": [object()]},
        {"generation_config": GenerationConfig(no_repeat_ngram_size=2)},
    ):
        assert _plain_greedy_eos(defaults, changes) is None, changes
    assert _plain_greedy_eos(GenerationConfig(eos_token_id=2, bad_words_ids=[[7]]), {}) is None


def test_a_shared_sessions_rows_each_get_their_greedy_token_from_one_quick_pass(monkeypatch):
    """``next_token`` for several rows: one quick pass through the head, each row's choice certain
    or, for a row whose best logits tie exactly, made from that row's exact logits alone."""
    from torch import nn

    from farmesh_core import split_head
    from farmesh_core.architecture import ClientHead
    from farmesh_core.client.generation import next_token

    monkeypatch.setattr(split_head, "MIN_WEIGHT_BYTES", 0)
    hidden, vocab = 64, 3000
    lm_head = nn.Linear(hidden, vocab, bias=False)
    head = ClientHead(nn.Embedding(10, hidden), nn.LayerNorm(hidden), lm_head).requires_grad_(False)
    last = torch.randn(4, hidden, generator=torch.Generator().manual_seed(1)) * 10
    with torch.inference_mode():
        best = int(head.module_logits(last[2:3]).argmax())
        tie = 0 if best else 1
        lm_head.weight[tie] = lm_head.weight[best]  # row 2's two best logits now tie exactly
        head = ClientHead(head.embeddings, head.final_norm, lm_head)  # a head batcher for the new weight
        exact = [int(head.module_logits(row).argmax()) for row in last.split(1)]
        assert exact[2] == min(best, tie)
        choose = TokenChooser()
        passes = head._batcher().passes
        tokens = next_token(head, choose, torch.zeros(4, 3, dtype=torch.long), last)
        assert tokens.tolist() == exact
        assert head._batcher().passes == passes + 1  # all rows' quick logits in one pass
        assert choose.certain_choices == 3  # the tied row took its exact logits
