"""Built-in routing policies."""

from farmesh_core.errors import NoRouteError
from farmesh_core.extensions import RouteHop, RouteRequest
from farmesh_core.hookspecs import hookimpl


def fewest_hops(request: RouteRequest) -> list[RouteHop]:
    """Cover the layers with as few nodes as possible (greedy interval cover, which is optimal).

    At each layer it takes the usable node that reaches furthest; ties go to the higher throughput,
    then to the lower measured latency.
    """
    usable = [r for r in request.records if r.peer_id not in request.avoid]
    hops: list[RouteHop] = []
    position = request.start
    while position < request.end:
        candidates = [r for r in usable if r.start <= position < r.end]
        if not candidates:
            raise NoRouteError.for_layers(position, request.end, request.records)
        best = max(
            candidates,
            key=lambda r: (min(r.end, request.end), r.throughput, -request.latencies.get(r.peer_id, 0.0)),
        )
        hop_end = min(best.end, request.end)
        hops.append(RouteHop(peer_id=best.peer_id, start=position, end=hop_end))
        position = hop_end
    return hops


@hookimpl
def farmesh_register_routing_policies(register):
    register("fewest-hops", fewest_hops)
