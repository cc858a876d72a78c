"""KV cache memory on a node: a shared budget that sessions wait for (bounded), and each session's
cache that layers write into at the step's position."""

import asyncio

import pytest
import torch

from farmesh_core.errors import RequestError
from farmesh_core.node.kv_cache import KVCacheBudget, SessionCache


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


# ---- KVCacheBudget -------------------------------------------------------------------------------
def test_allocate_and_release_track_used_bytes():
    """Allocations add up; releases give the bytes back."""

    async def scenario():
        budget = KVCacheBudget(1000)
        await budget.allocate(300, timeout=1)
        await budget.allocate(500, timeout=1)
        assert (budget.used_bytes, budget.free_bytes) == (800, 200)
        await budget.release(300)
        assert (budget.used_bytes, budget.free_bytes) == (500, 500)
        await budget.release(500)
        assert budget.free_bytes == 1000

    run(scenario())


def test_allocation_bigger_than_the_budget_is_refused_at_once():
    """A session that could never fit is refused without waiting, and the message says why."""

    async def scenario():
        budget = KVCacheBudget(1000)
        began = asyncio.get_running_loop().time()
        with pytest.raises(RequestError, match="the session needs 1001 bytes of KV cache, more than"):
            await budget.allocate(1001, timeout=5)
        assert asyncio.get_running_loop().time() - began < 1
        assert budget.used_bytes == 0

    run(scenario())


def test_allocation_times_out_when_the_budget_stays_full():
    """Without room, a session waits for its timeout, then is refused; nothing stays allocated."""

    async def scenario():
        budget = KVCacheBudget(1000)
        await budget.allocate(800, timeout=1)
        began = asyncio.get_running_loop().time()
        with pytest.raises(RequestError, match=r"no room for 300 bytes of KV cache within 0\.2 s"):
            await budget.allocate(300, timeout=0.2)
        assert 0.15 < asyncio.get_running_loop().time() - began < 2
        assert budget.used_bytes == 800

    run(scenario())


def test_waiting_allocation_succeeds_when_another_session_releases():
    """A waiting session gets its bytes as soon as another session releases enough."""

    async def scenario():
        budget = KVCacheBudget(1000)
        await budget.allocate(800, timeout=1)
        waiter = asyncio.create_task(budget.allocate(500, timeout=5))
        await asyncio.sleep(0.1)
        assert not waiter.done(), "the allocation must wait while there is no room"
        await budget.release(800)
        await asyncio.wait_for(waiter, 2)
        assert budget.used_bytes == 500

    run(scenario())


def test_allocation_with_zero_timeout_succeeds_when_there_is_room():
    """``timeout=0`` means "do not wait", not "always fail": with room, the bytes are granted at once.

    (``OpenSession.alloc_timeout`` defaults to 0, so every raw client relies on this.)"""

    async def scenario():
        budget = KVCacheBudget(1000)
        await budget.allocate(100, timeout=0)
        assert budget.used_bytes == 100

    run(scenario())


def test_allocation_with_zero_timeout_is_refused_when_full():
    """``timeout=0`` without room is refused immediately."""

    async def scenario():
        budget = KVCacheBudget(1000)
        await budget.allocate(1000, timeout=1)
        with pytest.raises(RequestError, match="no room for 1 bytes"):
            await budget.allocate(1, timeout=0)

    run(scenario())


# ---- SessionCache --------------------------------------------------------------------------------
def kv(tokens: int, fill: float, heads: int = 2, head_dim: int = 4) -> torch.Tensor:
    return torch.full((1, heads, tokens, head_dim), fill)


def test_update_appends_and_returns_the_whole_prefix():
    """Each step writes its keys/values at its position; the layer gets everything cached so far."""
    cache = SessionCache(max_length=8)
    cache.begin_step(0)
    keys, values = cache.update(kv(3, 1.0), kv(3, -1.0), layer_idx=5)
    assert keys.shape == (1, 2, 3, 4) and torch.equal(values, kv(3, -1.0))
    cache.end_step(3)
    assert cache.length == 3

    cache.begin_step(3)
    assert cache.get_seq_length() == 3
    keys, values = cache.update(kv(1, 2.0), kv(1, -2.0), layer_idx=5)
    cache.end_step(1)
    assert keys.shape == (1, 2, 4, 4)
    assert torch.equal(keys, torch.cat([kv(3, 1.0), kv(1, 2.0)], dim=2))
    assert torch.equal(values, torch.cat([kv(3, -1.0), kv(1, -2.0)], dim=2))
    assert cache.length == 4


def test_layers_have_separate_caches():
    """Two layers of one span keep their own keys and values."""
    cache = SessionCache(max_length=4)
    cache.begin_step(0)
    cache.update(kv(2, 1.0), kv(2, 1.0), layer_idx=0)
    keys, _ = cache.update(kv(2, 7.0), kv(2, 7.0), layer_idx=1)
    assert torch.equal(keys, kv(2, 7.0))
    cache.end_step(2)
    cache.begin_step(2)
    keys, _ = cache.update(kv(1, 3.0), kv(1, 3.0), layer_idx=0)
    assert torch.equal(keys, torch.cat([kv(2, 1.0), kv(1, 3.0)], dim=2))


def test_writing_below_the_length_rolls_back():
    """A step at an earlier position overwrites from there on and the session continues from it
    (what a replay after failover does)."""
    cache = SessionCache(max_length=8)
    cache.begin_step(0)
    cache.update(kv(5, 1.0), kv(5, 1.0), layer_idx=0)
    cache.end_step(5)

    cache.begin_step(2)
    keys, values = cache.update(kv(2, 9.0), kv(2, -9.0), layer_idx=0)
    cache.end_step(2)
    assert cache.length == 4
    assert torch.equal(keys, torch.cat([kv(2, 1.0), kv(2, 9.0)], dim=2))
    assert torch.equal(values, torch.cat([kv(2, 1.0), kv(2, -9.0)], dim=2))


def test_buffers_are_sized_for_max_length_once():
    """The cache allocates one buffer of ``max_length`` per layer and writes in place (no regrowth)."""
    cache = SessionCache(max_length=6)
    cache.begin_step(0)
    first, _ = cache.update(kv(2, 1.0), kv(2, 1.0), layer_idx=0)
    cache.end_step(2)
    cache.begin_step(2)
    second, _ = cache.update(kv(1, 1.0), kv(1, 1.0), layer_idx=0)
    assert first.data_ptr() == second.data_ptr()
    assert first.untyped_storage().nbytes() == 1 * 2 * 6 * 4 * 4
