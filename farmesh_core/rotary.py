"""Rotary position terms of one-token steps, computed once per position."""

from typing import Any

import torch
from torch import nn

MAX_POSITIONS = 1 << 16  # positions whose terms are kept (a few hundred bytes each)
CHUNK = 256  # positions computed at once


class RotaryRows:
    """A span's rotary embedding module that keeps each position's one-token ``(cos, sin)``.

    For RoPE types without state (all but the dynamic and long-rope ones), a one-token step's terms
    depend on its position only, yet computing them takes a dozen small ops per step and node: a
    tenth of a millisecond on a CPU shared with other processes. They are computed for ``CHUNK``
    positions at once and kept. The module's ops are elementwise, so a position's terms computed
    among others should be those of a lone step: each chunk is checked against lone calls at three of
    its positions, and if they ever differ, every position is computed alone from then on. A batch
    of one-token steps takes its rows from the same table, so every row gets its lone step's terms.
    Everything else (``__call__``, attributes) is the module's.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self._rows: dict[tuple[int, torch.dtype], tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.chunked = True  # chunks gave the lone calls' terms so far

    @staticmethod
    def fits(module: nn.Module) -> bool:
        """Whether ``module``'s terms for a position never change (its RoPE type keeps no state)."""
        rope_type = getattr(module, "rope_type", None)
        return isinstance(rope_type, str) and "dynamic" not in rope_type and rope_type != "longrope"

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["module"], name)

    def __call__(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.module(hidden, position_ids)

    def row(self, hidden: torch.Tensor, position: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``(position_ids, (cos, sin))`` of a one-token step at ``position``, for ``hidden``'s dtype.
        The tensors are shared between steps: callers must not change them."""
        key = (position, hidden.dtype)
        row = self._rows.get(key)
        if row is None and self.chunked and len(self._rows) + CHUNK <= MAX_POSITIONS:
            self._compute_chunk(hidden, position - position % CHUNK, position)
            row = self._rows.get(key)
        if row is None:
            row = self._alone(hidden, position)
            if len(self._rows) < MAX_POSITIONS:
                self._rows[key] = row
        return row

    def _alone(self, hidden: torch.Tensor, position: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        position_ids = torch.tensor([[position]], device=hidden.device)
        return position_ids, self.module(hidden, position_ids)

    def _compute_chunk(self, hidden: torch.Tensor, start: int, wanted: int) -> None:
        position_ids = torch.arange(start, start + CHUNK, device=hidden.device)[None]
        cos, sin = self.module(hidden, position_ids)
        rows = {
            (start + i, hidden.dtype): (position_ids[:, i : i + 1], (cos[:, i : i + 1], sin[:, i : i + 1]))
            for i in range(CHUNK)
        }  # fmt: skip
        for position in (start, wanted, start + CHUNK - 1):
            alone = self._alone(hidden, position)[1]
            chunked = rows[(position, hidden.dtype)][1]
            if not all(torch.equal(a, b) for a, b in zip(alone, chunked, strict=True)):
                self.chunked = False
                return
        self._rows.update(rows)

    def rows(self, hidden: torch.Tensor, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of one-token steps at ``positions`` (one per row), each row its lone step's."""
        cos, sin = zip(*(self.row(hidden, position)[1] for position in positions), strict=True)
        return torch.cat(cos), torch.cat(sin)
