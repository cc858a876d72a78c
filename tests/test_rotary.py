"""RotaryRows: one-token rotary terms kept per position, equal to the module's lone calls."""

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from farmesh_core import rotary
from farmesh_core.rotary import RotaryRows


def llama_rotary(**rope) -> LlamaRotaryEmbedding:
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=4096)
    if rope:
        config.rope_parameters = {"rope_theta": 10000.0, **rope}
    return LlamaRotaryEmbedding(config)


def alone(module: nn.Module, hidden: torch.Tensor, position: int):
    return module(hidden, torch.tensor([[position]]))


def assert_rows_are_lone_calls(rows: RotaryRows, positions, dtype=torch.float32) -> None:
    hidden = torch.zeros(1, 1, 64, dtype=dtype)
    for position in positions:
        position_ids, (cos, sin) = rows.row(hidden, position)
        lone_cos, lone_sin = alone(rows.module, hidden, position)
        assert position_ids.tolist() == [[position]]
        assert torch.equal(cos, lone_cos) and torch.equal(sin, lone_sin), position


def test_rows_are_the_modules_lone_terms_across_chunks_and_dtypes():
    rows = RotaryRows(llama_rotary())
    assert RotaryRows.fits(rows.module)
    assert_rows_are_lone_calls(rows, [0, 1, 255, 256, 257, 1000, 2047, 3])
    assert_rows_are_lone_calls(rows, [5, 700], torch.bfloat16)
    assert rows.chunked


def test_a_batch_takes_each_rows_lone_terms():
    rows = RotaryRows(llama_rotary())
    hidden = torch.zeros(3, 1, 64)
    cos, sin = rows.rows(hidden, [9, 300, 2])
    for i, position in enumerate([9, 300, 2]):
        lone_cos, lone_sin = alone(rows.module, hidden[:1], position)
        assert torch.equal(cos[i : i + 1], lone_cos) and torch.equal(sin[i : i + 1], lone_sin)


def test_rope_types_with_state_are_not_kept():
    assert not RotaryRows.fits(llama_rotary(rope_type="dynamic", factor=2.0))
    assert RotaryRows.fits(llama_rotary(rope_type="linear", factor=2.0))
    assert not RotaryRows.fits(nn.Identity())


class CountingRotary(nn.Module):
    """A rotary module whose terms depend on how many positions are computed at once."""

    rope_type = "default"

    def forward(self, hidden, position_ids):
        terms = position_ids[..., None].float() + position_ids.shape[-1] * 1e-3
        return terms.cos(), terms.sin()


def test_chunks_that_differ_from_lone_calls_are_not_used():
    rows = RotaryRows(CountingRotary())
    assert_rows_are_lone_calls(rows, [0, 300, 7])
    assert not rows.chunked


def test_the_table_is_bounded(monkeypatch):
    monkeypatch.setattr(rotary, "MAX_POSITIONS", rotary.CHUNK + 10)
    rows = RotaryRows(llama_rotary())
    assert_rows_are_lone_calls(rows, [0, 300, 600, 601, 602] + list(range(700, 720)))
    assert len(rows._rows) <= rotary.MAX_POSITIONS
