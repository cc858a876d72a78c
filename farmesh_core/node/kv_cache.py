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
