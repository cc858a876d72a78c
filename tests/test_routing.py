"""The built-in "fewest-hops" routing policy on hand-made node records, and where a new node places
itself (``choose_layers``)."""

import itertools
import random

import pytest

from farmesh_core.config import NodeRecord
from farmesh_core.errors import NoRouteError
from farmesh_core.extensions import RouteRequest
from farmesh_core.node.placement import choose_layers
from farmesh_plugins.routing import fewest_hops


def node(peer_id: str, start: int, end: int, throughput: float = 100.0) -> NodeRecord:
    return NodeRecord(peer_id=peer_id, start=start, end=end, throughput=throughput, cache_tokens_left=1000)


def route(records, start=0, end=8, avoid=(), latencies=None) -> list[tuple[str, int, int]]:
    request = RouteRequest(records=records, start=start, end=end, avoid=set(avoid), latencies=latencies or {})
    return [(hop.peer_id, hop.start, hop.end) for hop in fewest_hops(request)]


# ---- fewest-hops ---------------------------------------------------------------------------------
def test_one_node_serving_everything_is_one_hop():
    assert route([node("A", 0, 8)]) == [("A", 0, 8)]


def test_two_halves_make_a_chain():
    assert route([node("B", 4, 8), node("A", 0, 4)]) == [("A", 0, 4), ("B", 4, 8)]


def test_picks_the_node_that_reaches_furthest():
    """From layer 0 the node reaching layer 6 wins over the one reaching 4, even if that one is faster."""
    records = [node("short", 0, 4, throughput=1000), node("long", 0, 6), node("tail", 4, 8)]
    assert route(records) == [("long", 0, 6), ("tail", 6, 8)]


def test_overlapping_spans_enter_the_next_node_mid_span():
    """With overlapping spans the second hop starts where the first ends, inside the second node's span."""
    assert route([node("A", 0, 5), node("B", 3, 8)]) == [("A", 0, 5), ("B", 5, 8)]


def test_sub_range_uses_parts_of_spans():
    """A request for layers 2:6 uses only the needed part of each node."""
    assert route([node("A", 0, 4), node("B", 4, 8)], start=2, end=6) == [("A", 2, 4), ("B", 4, 6)]
    assert route([node("A", 0, 8)], start=3, end=4) == [("A", 3, 4)]


def test_ties_go_to_the_higher_throughput_then_the_lower_latency():
    records = [node("slow", 0, 8, throughput=10), node("fast", 0, 8, throughput=50)]
    assert route(records) == [("fast", 0, 8)]
    records = [node("far", 0, 8), node("near", 0, 8)]
    assert route(records, latencies={"far": 0.2, "near": 0.01}) == [("near", 0, 8)]


def test_avoided_nodes_are_routed_around():
    """A failed node (in ``avoid``) is not used even when it would be the shortest chain."""
    records = [node("whole", 0, 8), node("A", 0, 4), node("B", 4, 8)]
    assert route(records, avoid={"whole"}) == [("A", 0, 4), ("B", 4, 8)]


def test_missing_layers_are_named_with_a_hint():
    """No node for layers 4-5: the error names them and says how to start a node for them."""
    with pytest.raises(NoRouteError) as error:
        route([node("A", 0, 4), node("C", 6, 8)])
    message = str(error.value)
    assert "Layers 4-5 have no node" in message
    assert "farmesh node MODEL --dht-bootstrap ADDR --layers 4:6" in message


def test_several_gaps_are_all_listed():
    """Every missing range is named; the hint covers the first one."""
    with pytest.raises(NoRouteError, match=r"Layers 0, 3-4, 7 have no node .*--layers 0:1"):
        route([node("A", 1, 3), node("B", 5, 7)])


def test_empty_mesh_names_every_layer():
    with pytest.raises(NoRouteError, match=r"Layers 0-7 have no node .*--layers 0:8"):
        route([])


def test_only_avoided_nodes_left_says_so():
    """When the layers are served but only by failed nodes, the error says that instead of a gap."""
    with pytest.raises(NoRouteError, match="Layers 4-7 are served, but every node that serves them failed"):
        route([node("A", 0, 4), node("B", 4, 8)], avoid={"B"})


def minimal_hops(records, start, end, avoid) -> int | None:
    """Brute force: the fewest usable nodes whose spans chain from ``start`` to ``end``."""
    usable = [r for r in records if r.peer_id not in avoid]
    for count in range(1, len(usable) + 1):
        for chosen in itertools.permutations(usable, count):
            position = start
            for record in chosen:
                if not record.start <= position < record.end:
                    break
                position = min(record.end, end)
            else:
                if position == end:
                    return count
    return None


@pytest.mark.parametrize("seed", range(40))
def test_random_meshes_get_a_minimal_exact_chain(seed):
    """On random meshes the chain is contiguous, covers exactly start:end, uses only usable nodes,
    and has as few hops as a brute-force search finds; NoRouteError exactly when none exists."""
    rng = random.Random(seed)
    records = []
    for i in range(rng.randint(1, 5)):
        a = rng.randrange(0, 8)
        records.append(node(f"N{i}", a, rng.randint(a + 1, 8), throughput=rng.choice([10.0, 20.0])))
    start = rng.randrange(0, 7)
    end = rng.randint(start + 1, 8)
    avoid = {r.peer_id for r in records if rng.random() < 0.2}
    best = minimal_hops(records, start, end, avoid)
    if best is None:
        with pytest.raises(NoRouteError):
            route(records, start, end, avoid)
        return
    hops = route(records, start, end, avoid)
    spans = {r.peer_id: (r.start, r.end) for r in records}
    assert hops[0][1] == start and hops[-1][2] == end
    assert all(a[2] == b[1] for a, b in itertools.pairwise(hops))
    assert all(peer not in avoid and spans[peer][0] <= s < e <= spans[peer][1] for peer, s, e in hops)
    assert len(hops) == best


# ---- placement of a new node ---------------------------------------------------------------------
def test_first_node_takes_the_first_layers():
    assert choose_layers([], total_layers=8, num_layers=4) == (0, 4)


def test_new_node_fills_the_missing_layers():
    """With 0:4 served, a 4-layer node takes 4:8."""
    assert choose_layers([node("A", 0, 4)], total_layers=8, num_layers=4) == (4, 8)


def test_new_node_fills_a_gap_in_the_middle():
    """With 0:3 and 5:8 served, a 2-layer node takes exactly the gap 3:5."""
    assert choose_layers([node("A", 0, 3), node("B", 5, 8)], total_layers=8, num_layers=2) == (3, 5)


def test_missing_layers_come_before_thinly_served_ones():
    """A gap wins over layers served by a slow node."""
    records = [node("slow", 0, 6, throughput=1), node("fast", 6, 7, throughput=1000)]
    assert choose_layers(records, total_layers=8, num_layers=2) == (6, 8)


def test_with_full_coverage_the_least_served_layers_are_chosen():
    """Every layer served: the node strengthens the weakest part of the mesh."""
    records = [node("A", 0, 8, throughput=10), node("B", 0, 4, throughput=10)]
    assert choose_layers(records, total_layers=8, num_layers=4) == (4, 8)


def test_more_layers_than_the_model_is_the_whole_model():
    assert choose_layers([node("A", 0, 4)], total_layers=8, num_layers=20) == (0, 8)
