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
        end = self.position + key_states.shape[-2]
        keys = self._keys.get(layer_idx)
        if keys is None:
            shape = (*key_states.shape[:-2], self.max_length, key_states.shape[-1])
            keys = self._keys[layer_idx] = key_states.new_empty(shape)
            self._values[layer_idx] = value_states.new_empty((*shape[:-1], value_states.shape[-1]))
        values = self._values[layer_idx]
        keys[..., self.position : end, :] = key_states
        values[..., self.position : end, :] = value_states
        return keys[..., :end, :], values[..., :end, :]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.position

    def release(self) -> None:
        self._keys.clear()
        self._values.clear()


class KVCacheBudget:
    """Bytes of KV cache all sessions may hold together; a session waits (bounded) for room."""

    def __init__(self, total_bytes: int):
        self.total_bytes = total_bytes
        self.used_bytes = 0
        self._freed = asyncio.Condition()

    @property
    def free_bytes(self) -> int:
        return self.total_bytes - self.used_bytes

    async def allocate(self, nbytes: int, timeout: float) -> None:
        if nbytes > self.total_bytes:
            raise RequestError(
                f"the session needs {nbytes} bytes of KV cache, more than this node's whole budget "
                f"({self.total_bytes}); ask for a shorter max_length or a smaller batch"
            )
        async with self._freed:
            try:
                await asyncio.wait_for(self._freed.wait_for(lambda: nbytes <= self.free_bytes), timeout)
            except TimeoutError:
                raise RequestError(
                    f"no room for {nbytes} bytes of KV cache within {timeout:.1f} s "
                    f"({self.free_bytes} of {self.total_bytes} free); retry later or use another node"
                ) from None
            self.used_bytes += nbytes

    async def release(self, nbytes: int) -> None:
        async with self._freed:
            self.used_bytes -= nbytes
            self._freed.notify_all()
