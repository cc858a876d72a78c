"""Placement math (which layers a node picks, when it moves) and the span switch of a moving node."""

import pytest

from farmesh_core.config import NodeConfig, NodeRecord
from farmesh_core.errors import RequestError
from farmesh_core.node.kv_cache import SessionCache
from farmesh_core.node.placement import (
    SpanSwitch,
    bottleneck,
    choose_layers,
    coverage,
    estimate_throughput,
    rebalance_target,
)


def node(peer: str, layers: str, throughput: float = 1.0) -> NodeRecord:
    start, end = map(int, layers.split(":"))
    return NodeRecord(peer_id=peer, start=start, end=end, throughput=throughput, cache_tokens_left=1000)


# ---- coverage ------------------------------------------------------------------------------------
def test_coverage_sums_throughput_per_layer_and_missing_layers_are_zero():
    served = coverage([node("a", "0:4", 2.0), node("b", "2:6", 3.0)], 8)
    assert served == [2.0, 2.0, 5.0, 5.0, 3.0, 3.0, 0.0, 0.0]
    assert bottleneck(served) == 0.0


def test_a_node_announcing_zero_throughput_still_covers_its_layers():
    assert bottleneck(coverage([node("a", "0:2", 0.0)], 2)) > 0


# ---- placement of a joining node -----------------------------------------------------------------
def test_empty_mesh_starts_at_the_first_layer():
    assert choose_layers([], 8, 4) == (0, 4)


def test_fills_the_missing_layers():
    assert choose_layers([node("a", "0:4")], 8, 4) == (4, 8)
    assert choose_layers([node("a", "0:2"), node("b", "6:8")], 8, 4) == (2, 6)


def test_covers_as_many_missing_layers_as_it_can():
    # 2:4 and 6:8 are missing; a 3-layer window can cover two missing layers at most: 1:4 or 5:8.
    assert choose_layers([node("a", "0:2"), node("b", "4:6")], 8, 3) in {(1, 4), (5, 8)}
    # Two gaps of two, windows of two: the lowest one first.
    assert choose_layers([node("a", "0:2"), node("b", "4:6")], 8, 2) == (2, 4)


def test_with_every_layer_served_it_joins_the_least_served():
    records = [node("a", "0:4", 10.0), node("b", "4:8", 2.0)]
    assert choose_layers(records, 8, 4) == (4, 8)
    assert choose_layers(records, 8, 2) == (4, 6)  # ties: the lowest start


def test_the_window_must_contain_the_bottleneck():
    # Layer 6 is the weakest (1.0); the others are 3.0 or more: any window without 6 leaves the
    # bottleneck at 1.0, every window with it raises it.
    records = [node("a", "0:8", 3.0), node("b", "0:6", 5.0), node("c", "7:8", 5.0)]
    start, end = choose_layers(records, 8, 3, throughput=4.0)
    assert start <= 6 < end
    served = coverage(records, 8)
    after = [s + (4.0 if start <= i < end else 0.0) for i, s in enumerate(served)]
    assert bottleneck(after) == 7.0


def test_equal_bottlenecks_go_to_the_least_served_window():
    # Layers [1, 3, 2, 1]: no window of two lifts both layers at 1.0, so the bottleneck stays 1.0
    # wherever the node goes; 2:4 lifts a 1.0 and the 2.0, better than 0:2 (1.0 and 3.0).
    records = [node("a", "0:1", 1.0), node("b", "1:2", 3.0), node("c", "2:3", 2.0), node("d", "3:4", 1.0)]
    assert choose_layers(records, 4, 2, throughput=5.0) == (2, 4)


def test_num_layers_is_capped_at_the_model():
    assert choose_layers([node("a", "0:4")], 4, 10) == (0, 4)


def test_throughput_estimate_is_the_median_per_layer():
    assert estimate_throughput([], 4) == 1.0
    records = [node("a", "0:4", 10.0), node("b", "0:2", 40.0), node("c", "0:1", 500.0)]
    assert estimate_throughput(records, 4) == 80.0 / 4


# ---- rebalancing ---------------------------------------------------------------------------------
def test_two_nodes_on_the_same_layers_one_moves_to_the_missing_ones():
    records = [node("a", "0:4"), node("b", "0:4")]
    assert rebalance_target(records, "b", 8, 1.0) == (4, 8)


def test_a_node_alone_stays():
    assert rebalance_target([node("a", "0:4")], "a", 8, 1.0) is None


def test_a_balanced_mesh_does_not_move():
    records = [node("a", "0:4"), node("b", "4:8"), node("c", "0:4"), node("d", "4:8")]
    assert all(rebalance_target(records, p, 8, 1.0) is None for p in "abcd")


def test_moves_only_for_a_clear_gain():
    # Without d the mesh is [10]*4 + [2]*4. d at 0:4 leaves the bottleneck at 2; at 4:8 it is 3 (x1.5).
    records = [node("a", "0:4", 10.0), node("b", "4:8", 1.0), node("c", "4:8", 1.0), node("d", "0:4", 1.0)]
    assert rebalance_target(records, "d", 8, 1.0) == (4, 8)
    assert rebalance_target(records, "d", 8, 1.0, min_gain=2.0) is None
    # Without d the mesh is [10]*4 + [5]*4; d (0.5 tok/s) at 4:8 would give 5.5: x1.1, not worth a move.
    records = [node("a", "0:4", 10.0), node("b", "4:8", 5.0), node("d", "0:4", 0.5)]
    assert rebalance_target(records, "d", 8, 0.5) is None


def test_moves_when_it_leaves_fewer_layers_missing():
    # 2:8 is missing either way, but moving b to 2:4 shrinks the gap.
    records = [node("a", "0:2"), node("b", "0:2")]
    assert rebalance_target(records, "b", 8, 1.0) == (2, 4)


def test_no_decision_without_its_own_record():
    assert rebalance_target([node("a", "0:4")], "b", 8, 1.0) is None


def test_moves_one_at_a_time_converge():
    """Nodes rebalancing in turns reach a placement where nobody wants to move (no cycles)."""
    records = [node(p, "0:2", t) for p, t in zip("abcdef", [1.0, 2.0, 3.0, 1.0, 2.0, 3.0], strict=True)]
    for _ in range(20):
        moved = False
        for i, record in enumerate(records):
            target = rebalance_target(records, record.peer_id, 6, record.throughput)
            if target is not None:
                records[i] = node(record.peer_id, f"{target[0]}:{target[1]}", record.throughput)
                moved = True
        if not moved:
            break
    assert not moved
    assert bottleneck(coverage(records, 6)) > 0


def test_rebalancing_config_defaults():
    config = NodeConfig(model_id="m", num_layers=4)
    assert config.rebalance_period == 60.0 and config.rebalance_gain == 1.2 and config.drain_timeout > 0
    assert NodeConfig(model_id="m", num_layers=4, rebalance_period=0).rebalance_period == 0


# ---- loopback addresses --------------------------------------------------------------------------
def test_loopback_addresses_are_not_announced_beyond_loopback():
    addrs = ["/ip4/127.0.0.1/tcp/5/p2p/Qm", "/ip4/10.200.0.2/tcp/5/p2p/Qm", "/ip6/::1/tcp/5/p2p/Qm"]
    on_loopback = NodeConfig(model_id="m", dht_bootstrap=["/ip4/127.0.0.1/tcp/1/p2p/Qm"])
    assert on_loopback.reachable_maddrs(addrs) == addrs
    remote = NodeConfig(model_id="m", dht_bootstrap=["/ip4/10.200.0.1/tcp/1/p2p/Qm"])
    assert remote.reachable_maddrs(addrs) == ["/ip4/10.200.0.2/tcp/5/p2p/Qm"]
    assert remote.reachable_maddrs(addrs[:1]) == addrs[:1]  # better than nothing
    given = NodeConfig(model_id="m", dht_bootstrap=["/ip4/10.200.0.1/tcp/1"], announce_maddrs=["/ip4/127.0.0.1/tcp/5"])
    assert given.reachable_maddrs(addrs) == addrs


# ---- the span switch of a moving node ------------------------------------------------------------
class FakeSpan:
    def __init__(self, name: str, start: int, end: int):
        self.name, self.start, self.end, self.hidden_size = name, start, end, 256
        self.calls = []

    def forward(self, hidden, start, end, cache=None, position=0):
        self.calls.append((start, end))
        if cache is not None:  # what the layers do: cache keys and values
            cache._keys[start] = cache._values[start] = hidden
            cache.end_step(1)
        return self.name

    def forward_decode_batch(self, hiddens, start, end, caches, positions):
        return [self.forward(h, start, end, c, p) for h, c, p in zip(hiddens, caches, positions, strict=True)]

    def backward(self, hidden, grad_output, start, end):
        return self.name


def test_span_switch_keeps_old_sessions_on_the_old_span():
    old, new = FakeSpan("old", 0, 4), FakeSpan("new", 2, 6)
    switch = SpanSwitch(old)
    assert (switch.start, switch.end, switch.hidden_size) == (0, 4, 256)
    running = SessionCache(16)
    assert switch.forward(None, 2, 4, running, 0) == "old"

    switch.switch_to(new)
    assert (switch.start, switch.end) == (2, 6)  # new requests are checked against the new layers
    assert switch.forward(None, 2, 4, running, 1) == "old"  # it started there: same span to the end
    fresh_overlap, fresh_old = SessionCache(16), SessionCache(16)
    assert switch.forward(None, 2, 4, fresh_overlap, 0) == "new"
    assert switch.forward(None, 0, 2, fresh_old, 0) == "old"  # opened just before the move
    assert switch.forward(None, 2, 4, fresh_overlap, 1) == "new"
    assert switch.forward(None, 4, 6) == "new" and switch.backward(None, None, 0, 2) == "old"

    # Three sessions open, one of them on the new span: not drained until the old ones end.
    assert not switch.drained(active_sessions=3)
    running.release()
    fresh_old.release()
    assert switch.drained(active_sessions=1)
    switch.release_old()
    with pytest.raises(RequestError, match="moved to layers 2:6"):
        switch.forward(None, 0, 2, SessionCache(16), 0)
    assert switch.forward(None, 2, 6, fresh_overlap, 2) == "new"


def test_span_switch_counts_unseen_sessions_as_old():
    switch = SpanSwitch(FakeSpan("old", 0, 4))
    switch.switch_to(FakeSpan("new", 4, 8))
    assert not switch.drained(active_sessions=1)  # a session of the old span that has not stepped since
    assert switch.drained(active_sessions=0)


def test_span_switch_batches_decode_steps_only_within_one_span():
    old, new = FakeSpan("old", 0, 4), FakeSpan("new", 0, 4)
    switch = SpanSwitch(old)
    running = SessionCache(16)
    switch.forward(None, 0, 4, running, 0)
    switch.switch_to(new)
    fresh = SessionCache(16)
    switch.forward(None, 0, 4, fresh, 0)
    # Sessions on different spans: no batch (the node's batcher then steps them one by one).
    assert switch.forward_decode_batch([None, None], 0, 4, [running, fresh], [1, 1]) is None
    assert switch.forward_decode_batch([None, None], 0, 4, [fresh, SessionCache(16)], [1, 0]) == ["new", "new"]
    switch.release_old()
    assert switch.forward_decode_batch([None, None], 0, 4, [running, fresh], [2, 2]) == ["new", "new"]
