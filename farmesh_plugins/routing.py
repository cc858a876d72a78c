"""Built-in routing policies: each turns a RouteRequest into a chain of hops covering its layers."""

import random

from farmesh_core.config import NodeRecord
from farmesh_core.errors import NoRouteError
from farmesh_core.extensions import RouteHop, RouteRequest
from farmesh_core.hookspecs import hookimpl

UNKNOWN_LATENCY = 0.01  # seconds assumed for a node not measured yet


def _usable(request: RouteRequest) -> list[NodeRecord]:
    return [r for r in request.records if r.peer_id not in request.avoid]


def _candidates(usable: list[NodeRecord], position: int, request: RouteRequest) -> list[NodeRecord]:
    found = [r for r in usable if r.start <= position < r.end]
    if not found:
        raise NoRouteError.for_layers(position, request.end, request.records)
    return found


def _greedy_chain(request: RouteRequest, choose) -> list[RouteHop]:
    """Walk from ``start`` to ``end``, letting ``choose(candidates)`` pick the node at each position."""
    usable, hops, position = _usable(request), [], request.start
    while position < request.end:
        best = choose(_candidates(usable, position, request))
        hop_end = min(best.end, request.end)
        hops.append(RouteHop(peer_id=best.peer_id, start=position, end=hop_end))
        position = hop_end
    return hops


def fewest_hops(request: RouteRequest) -> list[RouteHop]:
    """Cover the layers with as few nodes as possible (greedy interval cover, which is optimal).

    At each layer it takes the usable node that reaches furthest; ties go to the higher throughput,
    then to the lower measured latency.
    """
    return _greedy_chain(
        request,
        lambda found: max(
            found,
            key=lambda r: (min(r.end, request.end), r.throughput, -request.latencies.get(r.peer_id, 0.0)),
        ),
    )


def _layer_seconds(record: NodeRecord) -> float:
    return 1.0 / (max(record.throughput, 1e-6) * (record.end - record.start))


def hop_seconds(record: NodeRecord, start: int, end: int, latencies: dict[str, float]) -> float:
    """Expected time of one decode step through ``record`` for layers ``start:end``: round trip + compute."""
    return latencies.get(record.peer_id, UNKNOWN_LATENCY) + (end - start) * _layer_seconds(record)


def min_latency(request: RouteRequest) -> list[RouteHop]:
    """The chain with the least expected time per token, for interactive generation.

    Shortest path over layer positions (like Petals' Dijkstra over spans): entering a node at layer
    ``s`` leads to its last layer (or the end of the request), costing the measured round trip to
    the node plus its compute time for those layers (:func:`hop_seconds`). Edges only go forward,
    so one pass in position order finds the optimum; ties go to the node met first in the records.
    """
    # Speed matters here (the simulator calls this for 10,000 requests over 1,000 nodes): each node's
    # round trip and per-layer time are looked up once, its entry layers are listed once, and each
    # position keeps only its best predecessor; the chain is built at the end.
    entering: list[list[tuple[NodeRecord, int, float, float]]] = [[] for _ in range(request.end)]
    for record in _usable(request):
        end = min(record.end, request.end)
        edge = (record, end, request.latencies.get(record.peer_id, UNKNOWN_LATENCY), _layer_seconds(record))
        for position in range(max(record.start, request.start), end):
            entering[position].append(edge)
    size = max(request.start, request.end) + 1
    cost_to: list[float | None] = [None] * size
    came_from: list[tuple[int, NodeRecord] | None] = [None] * size
    cost_to[request.start] = 0.0
    for position in range(request.start, request.end):
        cost = cost_to[position]
        if cost is None:
            continue
        for record, end, latency, per_layer in entering[position]:
            total = cost + (latency + (end - position) * per_layer)  # = cost + hop_seconds(...), bit for bit
            known = cost_to[end]
            if known is None or total < known:
                cost_to[end], came_from[end] = total, (position, record)
    if cost_to[request.end] is None:
        raise NoRouteError.for_layers(request.start, request.end, request.records)
    hops, end = [], request.end
    while end != request.start:
        position, record = came_from[end]
        hops.append(RouteHop(peer_id=record.peer_id, start=position, end=end))
        end = position
    return hops[::-1]


def max_throughput(request: RouteRequest) -> list[RouteHop]:
    """Spread batch work (forward/backward) across nodes in proportion to their spare throughput.

    At each layer it draws a node among those serving it, weighted by announced throughput divided
    by (1 + the node's current load), so busy nodes get less new work.
    """
    return _greedy_chain(
        request,
        lambda found: random.choices(found, weights=[max(r.throughput, 1e-6) / (1 + r.load) for r in found])[0],
    )


def random_route(request: RouteRequest) -> list[RouteHop]:
    """A uniformly random node at each step: a baseline for routing experiments."""
    return _greedy_chain(request, random.choice)


@hookimpl
def farmesh_register_routing_policies(register):
    register("fewest-hops", fewest_hops)
    register("min-latency", min_latency)
    register("max-throughput", max_throughput)
    register("random", random_route)
