"""A token loop's turn on the node with the LM head: its choice is the client's, and the next turn's
step numbers and token count follow (``farmesh_core.node.token_loop``)."""

import asyncio

import pytest
import torch

from farmesh_core.architecture import ClientHead, adapter_for, checkpoint_dtype
from farmesh_core.checkpoint import Checkpoint
from farmesh_core.checkpoint_maker import make_checkpoint
from farmesh_core.client.generation import NoEosBefore, TokenChooser, next_token
from farmesh_core.node.batching import DecodeBatcher
from farmesh_core.node.kv_cache import SessionCache
from farmesh_core.node.layer_span import LayerSpan
from farmesh_core.node.token_loop import NodeHead, TurnAsk, next_turn
from farmesh_core.wire import PushTarget, TokenLoop, deserialize_tensor
from tests.helpers import randn

RING = [
    PushTarget(peer_id="first", session_id="s0", key="k" * 32, step=3),
    PushTarget(peer_id="last", session_id="s1", key="q" * 32, step=7),
]


@pytest.fixture(scope="module")
def large_vocab_llama(tmp_path_factory) -> str:
    """The tiny Llama with a 32k vocabulary: its 32 MB LM head has quick approximate logits."""
    return make_checkpoint(str(tmp_path_factory.mktemp("llama-vocab32k")), seed=5, vocab_size=32000)


def node_head(model_dir: str) -> NodeHead:
    checkpoint = Checkpoint(model_dir)
    adapter = adapter_for(checkpoint.config)
    return NodeHead(adapter.load_client_head(checkpoint, checkpoint.config, checkpoint_dtype(checkpoint.config)), 8)


def test_the_node_chooses_the_token_the_client_would(tiny_llama):
    head = node_head(tiny_llama)
    loop = TokenLoop(ring=RING, tokens=4)
    for seed in range(16):
        hidden = randn(1, 3, 256, seed=seed)
        client_choice = next_token(head.head, TokenChooser(), torch.zeros(1, 10, dtype=torch.long), hidden[:, -1])
        assert head.choose(hidden, 10, loop) == int(client_choice[0])


def test_a_large_head_chooses_from_its_quick_logits_and_still_the_exact_best(large_vocab_llama, monkeypatch):
    head = node_head(large_vocab_llama)
    quick, approximate = [], ClientHead.approximate_logits

    def counted(self, x):
        quick.append(approximate(self, x))
        return quick[-1]

    monkeypatch.setattr(ClientHead, "approximate_logits", counted)  # the real one, its results kept
    loop = TokenLoop(ring=RING, tokens=4)
    for seed in range(16):
        hidden = randn(1, 2, 256, seed=seed)
        with torch.inference_mode():
            exact = int(head.head.module_logits(hidden[:, -1]).argmax())
        assert head.choose(hidden, 10, loop) == exact
    assert len(quick) == 16 and all(q is not None for q in quick)


def test_several_turns_take_one_pass_through_a_large_heads_quick_logits(large_vocab_llama, tiny_llama):
    """A decode batch's turns: one quick pass for all rows, each token the one ``choose`` gives alone
    (a masked loop's too); one turn alone, or a head without quick logits, leave the choice to it."""
    head = node_head(large_vocab_llama)
    hiddens = [randn(1, 1, 256, seed=40 + i) for i in range(4)]
    hiddens[2] = hiddens[1]  # the same output, before and at the minimum length
    lone = TokenLoop(ring=RING, tokens=4)
    best = head.choose(hiddens[1], 10, lone)
    masked = TokenLoop(ring=RING, tokens=4, eos_token_ids=[best], masked_ids=[best], masked_until=12)
    asks = [TurnAsk(10, lone), TurnAsk(10, masked), TurnAsk(12, masked), TurnAsk(20, lone)]
    quick = head.head._batcher().quick
    passes = head.head._batcher().passes
    head.choose_rows(hiddens, asks)
    assert quick is not None and head.head._batcher().passes == passes + 1
    assert [ask.token for ask in asks] == [head.choose(h, a.length, a.loop) for h, a in zip(hiddens, asks, strict=True)]
    assert asks[1].token != best and asks[2].token == best
    alone = [TurnAsk(10, lone)]
    head.choose_rows(hiddens[:1], alone)
    assert alone[0].token is None
    small, asks = node_head(tiny_llama), [TurnAsk(10, lone), TurnAsk(10, lone)]
    small.choose_rows(hiddens[:2], asks)
    assert [ask.token for ask in asks] == [None, None]


def test_masked_ids_are_not_chosen_before_the_minimum_length(tiny_llama):
    head = node_head(tiny_llama)
    hidden = randn(1, 1, 256, seed=3)
    best = head.choose(hidden, 10, TokenLoop(ring=RING, tokens=4))
    masked = TokenLoop(ring=RING, tokens=4, eos_token_ids=[best], masked_ids=[best], masked_until=12)
    client = TokenChooser.greedy_after([NoEosBefore(12, [best])])
    for length in (10, 11, 12, 13):
        expected = int(next_token(head.head, client, torch.zeros(1, length, dtype=torch.long), hidden[:, -1])[0])
        assert head.choose(hidden, length, masked) == expected
        assert (expected == best) == (length >= 12)


def test_the_next_turn_numbers_each_node_one_further_and_counts_down():
    loop = TokenLoop(ring=RING, tokens=3, eos_token_ids=[2])
    after = next_turn(loop, token=5, length=20, max_length=64)
    assert [t.step for t in after.ring] == [4, 8] and after.tokens == 2 and after.eos_token_ids == [2]
    assert [t.session_id for t in after.ring] == ["s0", "s1"]
    assert next_turn(after, token=5, length=21, max_length=64).tokens == 1
    assert next_turn(loop.model_copy(update={"tokens": 1}), token=5, length=20, max_length=64) is None  # the last
    assert next_turn(loop, token=2, length=20, max_length=64) is None  # an EOS
    assert next_turn(loop, token=5, length=64, max_length=64) is None  # the session is full


def test_the_embedding_pushed_is_the_one_the_client_sends(tiny_llama):
    head = node_head(tiny_llama)
    assert head._rows is not None  # read as the embedding weight's row
    for token in (0, 17, 1023):
        assert torch.equal(deserialize_tensor(head.embedding(token)), head.head.embed(torch.tensor([[token]])))


def test_a_global_hook_registered_later_sees_the_embedding(tiny_llama):
    """The embedding's row is read directly; a hook for every module registered after the head loaded
    still sees the embedding module's call."""
    head = node_head(tiny_llama)
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: seen.append(module) if module is head.head.embeddings else None
    )
    try:
        embedding = deserialize_tensor(head.embedding(17))
    finally:
        handle.remove()
    assert seen == [head.head.embeddings]
    assert torch.equal(embedding, deserialize_tensor(head.embedding(17)))


def test_a_decode_batch_chooses_its_turns_together_before_its_steps_are_done(large_vocab_llama):
    """The batcher hands a batch's turns to ``turns`` (``NodeHead.choose_rows``) with their outputs;
    where that fails, the steps still get their outputs and the turns are left to be chosen alone."""
    checkpoint = Checkpoint(large_vocab_llama)
    span = LayerSpan(checkpoint, adapter_for(checkpoint.config), 0, 8, torch.float32, "cpu")
    head = node_head(large_vocab_llama)
    loop = TokenLoop(ring=RING, tokens=4)

    def failing(outputs, asks):
        raise RuntimeError("a head that fails")

    async def batch(turns) -> tuple[list[torch.Tensor], list[TurnAsk]]:
        batcher = DecodeBatcher(span, sessions=lambda: 3, turns=turns)
        caches, asks = [SessionCache(8) for _ in range(3)], [TurnAsk(1, loop) for _ in range(3)]
        steps = [
            batcher.submit(randn(1, 1, 256, seed=50 + i), 0, 8, cache, 0, turn=ask)
            for i, (cache, ask) in enumerate(zip(caches, asks, strict=True))
        ]
        outputs = await asyncio.gather(*steps)
        assert (batcher.batches, batcher.steps) == (1, 3)
        return outputs, asks

    outputs, asks = asyncio.run(batch(head.choose_rows))
    assert [ask.token for ask in asks] == [head.choose(output, 1, loop) for output in outputs]
    again, asks = asyncio.run(batch(failing))
    assert all(torch.equal(a, b) for a, b in zip(again, outputs, strict=True))
    assert [ask.token for ask in asks] == [None] * 3
