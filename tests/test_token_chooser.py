"""TokenChooser's processors give transformers' scores; greedy choices from approximate logits only where certain."""

import pytest
import torch
from transformers import GenerationConfig, MinNewTokensLengthLogitsProcessor

from farmesh_core.client.causal_lm import _plain_greedy_eos
from farmesh_core.client.generation import NoEosBefore, TokenChooser, greedy_is_certain


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
    assert greedy_is_certain(logits, bound=0.04, eos_token_ids=[])
    assert not greedy_is_certain(logits, bound=0.06, eos_token_ids=[])
    eos_first = torch.tensor([[0.0, 3.0, 1.9, 1.8]])  # EOS (1) leads by 1.1; masked, 2 leads 3 by 0.1
    assert greedy_is_certain(eos_first, bound=0.04, eos_token_ids=[1])
    assert not greedy_is_certain(eos_first, bound=0.06, eos_token_ids=[1])
    assert greedy_is_certain(eos_first, bound=0.06, eos_token_ids=[])  # no EOS mask to fear
    assert not greedy_is_certain(torch.tensor([[0.0, float("nan"), 1.0]]), bound=0.0, eos_token_ids=[])


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
