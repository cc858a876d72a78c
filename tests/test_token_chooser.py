"""TokenChooser's processors give transformers' scores."""

import pytest
import torch
from transformers import MinNewTokensLengthLogitsProcessor

from farmesh_core.client.generation import NoEosBefore, TokenChooser


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


def test_greedy_choice_waits_for_min_new_tokens_before_eos():
    chooser = TokenChooser(min_new_tokens=2, prompt_length=3, eos_token_ids=[1])
    logits = torch.tensor([[0.0, 5.0, 1.0]])  # EOS (1) scores highest
    assert chooser(torch.zeros(1, 3, dtype=torch.long), logits).tolist() == [2]
    assert chooser(torch.zeros(1, 4, dtype=torch.long), logits).tolist() == [2]
    assert chooser(torch.zeros(1, 5, dtype=torch.long), logits).tolist() == [1]
