"""KV caches of inference sessions, and the memory budget they share."""

import asyncio

import torch

from farmesh_core.errors import RequestError


class SessionCache:
    """One session's keys and values for the layers of a span, in buffers of the session's max length.

    Layers call ``update`` (the transformers ``Cache`` protocol) with the new keys and values of a
    step; they are written at the step's position and the layer gets the whole prefix back. Writing at
    a position below the current length rolls the session back to that point (used for replays).
    """

    def __init__(self, max_length: int):
        self.max_length = max_length
        self.position = 0  # where the current step starts
        self.length = 0  # tokens cached after the last finished step
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}

    def begin_step(self, position: int) -> None:
        self.position = position

    def end_step(self, q_len: int) -> None:
        self.length = self.position + q_len

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self._buffers(layer_idx, key_states, value_states, key_states.shape[0])
        return self._write(keys, values, key_states, value_states)

    def _buffers(
        self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor, rows: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer_idx``'s key and value buffers [rows, ..., max_length, head_dim], made at its first step."""
        keys = self._keys.get(layer_idx)
        if keys is None:
            shape = (rows, *key_states.shape[1:-2], self.max_length, key_states.shape[-1])
            keys = self._keys[layer_idx] = key_states.new_empty(shape)
            self._values[layer_idx] = value_states.new_empty((*shape[:-1], value_states.shape[-1]))
        return keys, self._values[layer_idx]

    def _write(self, keys: torch.Tensor, values: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor):
        """Write the step's keys and values at its position; the buffers' prefix up to the step's end."""
        q_len = key_states.shape[-2]
        end = self.position + q_len
        keys.narrow(-2, self.position, q_len).copy_(key_states)  # narrow and copy_: the same writes as slice
        values.narrow(-2, self.position, q_len).copy_(value_states)  # assignment, fewer Python steps
        return keys.narrow(-2, 0, end), values.narrow(-2, 0, end)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.position

    def row(self, index: int, rows: int) -> "SessionCacheRow":
        """Row ``index`` of this ``rows``-row session's cache, for a step of that row alone."""
        return SessionCacheRow(self, index, rows)

    def release(self) -> None:
        self._keys.clear()
        self._values.clear()


class SessionCacheRow:
    """One row of a several-row session's cache (``SessionCache.row``), with the same protocol."""

    def __init__(self, cache: SessionCache, index: int, rows: int):
        self.cache, self.index, self.rows = cache, index, rows

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.cache._buffers(layer_idx, key_states, value_states, self.rows)
        row = slice(self.index, self.index + 1)
        return self.cache._write(keys[row], values[row], key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.cache.position

    def begin_step(self, position: int) -> None:
        self.cache.begin_step(position)

    def end_step(self, q_len: int) -> None:
        self.cache.end_step(q_len)


class BatchedDecodeCache:
    """Several sessions' caches seen as one batch for a one-token step of each.

    Each row's new key and value go into its own session's cache; the layer gets every session's
    prefix, zero-padded to the longest (the step's attention mask hides the padding).
    """

    def __init__(self, caches: list[SessionCache], positions: list[int]):
        self.caches, self.positions = caches, positions
        self.length = max(positions) + 1
        for cache, position in zip(caches, positions, strict=True):
            cache.begin_step(position)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        rows = [
            cache.update(key_states[i : i + 1], value_states[i : i + 1], layer_idx)
            for i, cache in enumerate(self.caches)
        ]
        keys = key_states.new_zeros((*key_states.shape[:-2], self.length, key_states.shape[-1]))
        values = value_states.new_zeros((*value_states.shape[:-2], self.length, value_states.shape[-1]))
        for i, (row_keys, row_values) in enumerate(rows):
            keys[i, ..., : row_keys.shape[-2], :] = row_keys[0]
            values[i, ..., : row_values.shape[-2], :] = row_values[0]
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length - 1

    def end_step(self) -> None:
        for cache in self.caches:
            cache.end_step(1)


class KVCacheBudget:
    """Bytes of KV cache all sessions may hold together, and the share one peer may hold.

    A session that does not fit waits (up to the timeout its client sent) for others to finish; one
    that could never fit is refused at once. The per-peer share keeps one peer from starving others.
    """

    def __init__(self, total_bytes: int, peer_share: float = 1.0):
        self.total_bytes = total_bytes
        self.peer_bytes = int(total_bytes * peer_share)
        self.used_bytes = 0
        self._used_by: dict[str, int] = {}
        self._freed = asyncio.Condition()

    @property
    def free_bytes(self) -> int:
        return self.total_bytes - self.used_bytes

    def used_by(self, peer: str) -> int:
        return self._used_by.get(peer, 0)

    async def allocate(self, nbytes: int, timeout: float, peer: str = "") -> None:
        if nbytes > self.peer_bytes:
            raise RequestError(
                f"the session needs {nbytes} bytes of KV cache, more than one peer may hold on this node "
                f"({self.peer_bytes} of {self.total_bytes}); ask for a shorter max_length or a smaller batch"
            )

        def fits() -> bool:
            return nbytes <= self.free_bytes and self.used_by(peer) + nbytes <= self.peer_bytes

        async with self._freed:
            try:
                if not fits():  # (wait_for with a zero timeout would not even look)
                    await asyncio.wait_for(self._freed.wait_for(fits), timeout)
            except TimeoutError:
                raise RequestError(
                    f"no room for {nbytes} bytes of KV cache within {timeout:.1f} s ({self.free_bytes} of "
                    f"{self.total_bytes} free, this peer holds {self.used_by(peer)} of its {self.peer_bytes}); "
                    "retry later or use another node"
                ) from None
            self.used_bytes += nbytes
            self._used_by[peer] = self.used_by(peer) + nbytes

    async def release(self, nbytes: int, peer: str = "") -> None:
        async with self._freed:
            self.used_bytes -= nbytes
            left = self.used_by(peer) - nbytes
            if left > 0:
                self._used_by[peer] = left
            else:
                self._used_by.pop(peer, None)
            self._freed.notify_all()
