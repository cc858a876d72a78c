"""Routing simulator: compare routing policies on a synthetic Far Mesh Network, with no real node.

A routing policy (``farmesh_register_routing_policies``) is judged at a scale no test mesh reaches:
a thousand nodes, ten thousand requests, nodes failing and coming back. This module builds such a
mesh and workload from one seed, replays the same workload through each policy (same mesh, same
arrivals, same failures), and reports latency per token, throughput, load balance and failed
requests as JSON.

The model is first-order on purpose, so that one replay is a single pass over events:

- requests come from ``clients`` places, each with its own round trips to the nodes (what its
  pings measure, with some error, is what the policy gets);
- one token through ``n`` layers of a node costs ``RTT + n * layer_seconds * (1 + load / capacity)``,
  where ``load`` is the number of other requests on the node when the request arrives, held for
  the whole request;
- a chain's time per token is the sum over its hops (the client calls each hop in turn, as in Petals);
- a node that dies kills every request running through it; with ``retries`` the client routes the
  tokens left again, with the dead node in ``avoid``.

Run it as ``farmesh simulate`` or ``python -m farmesh_core.simulate`` (the same options).
"""

import argparse
import heapq
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from farmesh_core.config import NodeRecord
from farmesh_core.errors import FarMeshError, NoRouteError
from farmesh_core.extensions import RouteHop, RouteRequest

Policy = Callable[[RouteRequest], list[RouteHop]]


class SimulationError(FarMeshError):
    """The simulation cannot run as asked: a bad option, a policy's invalid chain, matplotlib missing."""


class SimulationConfig(BaseModel):
    """The synthetic mesh, the workload and the policies to compare; every random draw follows ``seed``."""

    model_config = ConfigDict(extra="forbid")
    # The mesh.
    nodes: int = Field(default=1000, gt=0)
    layers: int = Field(default=80, gt=0, description="layers of the model; every request runs all of them")
    min_span: int = Field(default=8, gt=0, description="fewest layers a node serves")
    max_span: int = Field(default=32, gt=0, description="most layers a node serves (clipped to the model)")
    layer_seconds: float = Field(default=0.002, gt=0, description="median time of one layer for one token, idle")
    layer_seconds_spread: float = Field(default=0.5, ge=0, description="sigma of the lognormal spread of speeds")
    clients: int = Field(default=100, gt=0, description="client locations, each with its own round trips")
    rtt: float = Field(default=0.05, gt=0, description="median client-node round trip, seconds")
    rtt_spread: float = Field(default=0.6, ge=0, description="sigma of the lognormal spread of round trips")
    far_fraction: float = Field(default=0.05, ge=0, le=1, description="share of nodes behind a slow link")
    far_rtt: float = Field(default=0.5, gt=0, description="median round trip of those nodes, seconds")
    rtt_noise: float = Field(default=0.1, ge=0, description="sigma of a client's ping error (lognormal factor)")
    capacity: float = Field(default=8.0, gt=0, description="concurrent requests that double a node's layer time")
    cache_tokens: int = Field(default=65536, gt=0, description="KV cache tokens of one node, all sessions")
    failure_rate: float = Field(default=0.2, ge=0, description="failures per node per simulated hour")
    downtime: float = Field(default=300.0, gt=0, description="mean seconds a failed node stays down")
    recovery: float = Field(default=0.7, ge=0, le=1, description="probability that a failed node comes back")
    # The workload.
    requests: int = Field(default=10_000, gt=0)
    arrival_rate: float = Field(default=5.0, gt=0, description="requests per second (Poisson arrivals)")
    min_tokens: int = Field(default=16, gt=0, description="fewest tokens a request generates")
    max_tokens: int = Field(default=256, gt=0, description="most tokens a request generates")
    forward_fraction: float = Field(default=0.0, ge=0, le=1, description="share of requests that are one forward batch")
    forward_token_cost: float = Field(default=0.1, gt=0, description="compute of a batched token / a decode step")
    retries: int = Field(default=0, ge=0, description="new chains a request may try after a node of its chain dies")
    # The experiment.
    policies: list[str] | None = Field(default=None, description="policy names; default: every registered one")
    seed: int = 0

    @field_validator("policies", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @model_validator(mode="after")
    def _ranges_are_ordered(self):
        if self.min_span > self.max_span:
            raise ValueError("min_span must not exceed max_span")
        if self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must not exceed max_tokens")
        return self


@dataclass(frozen=True, slots=True)
class SimNode:
    """One synthetic Far Node: what it announces, and what is true about it."""

    record: NodeRecord  # as announced when idle
    layer_seconds: float  # true time of one of its layers for one token, idle
    far: bool  # behind a slow link
    failure_seed: int  # its own random stream of failures, so that every policy meets the same ones


@dataclass(frozen=True, slots=True)
class Mesh:
    """The nodes and the network between them and the clients.

    Clients sit in different places: each one has its own round trips, so a latency-driven policy
    does not send every request of the mesh down the same chain.
    """

    nodes: list[SimNode]
    rtt: list[list[float]]  # true round trip, [client][node index]
    measured: list[dict[str, float]]  # what each client's pings say, by peer id: what policies get


@dataclass(frozen=True, slots=True)
class Request:
    """One client request: ``tokens`` decode steps, or one forward batch of ``tokens`` tokens."""

    arrival: float
    client: int
    tokens: int
    forward: bool


def build_mesh(config: SimulationConfig) -> Mesh:
    """Nodes with random contiguous spans; uncovered layers are filled first, like automatic placement."""
    rng = random.Random(f"farmesh-simulate/{config.seed}/mesh")
    replicas = [0] * config.layers
    nodes = []
    for index in range(config.nodes):
        length = min(rng.randint(config.min_span, config.max_span), config.layers)
        uncovered = next((layer for layer, count in enumerate(replicas) if count == 0), None)
        if uncovered is None:
            start = rng.randrange(config.layers - length + 1)
        else:
            start = min(uncovered, config.layers - length)
        for layer in range(start, start + length):
            replicas[layer] += 1
        layer_seconds = config.layer_seconds * rng.lognormvariate(0.0, config.layer_seconds_spread)
        record = NodeRecord(
            peer_id=f"node-{index:05d}", start=start, end=start + length,
            throughput=1.0 / (layer_seconds * length), cache_tokens_left=config.cache_tokens,
        )  # fmt: skip
        nodes.append(SimNode(record, layer_seconds, rng.random() < config.far_fraction, rng.getrandbits(64)))
    rtt, measured = [], []
    medians = [config.far_rtt if node.far else config.rtt for node in nodes]
    for _ in range(config.clients):
        true = [median * rng.lognormvariate(0.0, config.rtt_spread) for median in medians]
        pings = [value * rng.lognormvariate(0.0, config.rtt_noise) for value in true]
        rtt.append(true)
        measured.append({node.record.peer_id: ping for node, ping in zip(nodes, pings, strict=True)})
    return Mesh(nodes, rtt, measured)


def build_workload(config: SimulationConfig) -> list[Request]:
    """Poisson arrivals from random clients; each generates a uniform number of tokens (or is one forward batch)."""
    rng = random.Random(f"farmesh-simulate/{config.seed}/workload")
    now, requests = 0.0, []
    for _ in range(config.requests):
        now += rng.expovariate(config.arrival_rate)
        tokens = rng.randint(config.min_tokens, config.max_tokens)
        requests.append(Request(now, rng.randrange(config.clients), tokens, rng.random() < config.forward_fraction))
    return requests


@dataclass(slots=True, eq=False)
class _Attempt:
    """One try of a request on one chain; a retry is a new attempt with the tokens left."""

    request: Request
    tokens: int
    retries_left: int
    avoid: set[str]
    nodes: list[int] = field(default_factory=list)  # distinct node indices of the chain
    started: float = 0.0
    seconds_per_token: float = 0.0
    killed: bool = False


# Event kinds, in the order they are handled when they share a time: a node is back, then finished
# requests free their nodes, then a node dies, and only then does a new request look at the mesh.
_NODE_UP, _FINISH, _NODE_DOWN, _ARRIVAL = range(4)


class _Replay:
    """One policy's pass over the workload: the event loop, the mesh's state and the counters."""

    def __init__(self, config: SimulationConfig, mesh: Mesh, policy_name: str, policy: Policy):
        self.config, self.mesh, self.policy_name, self.policy = config, mesh, policy_name, policy
        nodes = mesh.nodes
        # Records are copied so that loads written during this replay never leak into the next one.
        self.records = [node.record.model_copy() for node in nodes]
        self.index_of = {record.peer_id: i for i, record in enumerate(self.records)}
        self.layer_seconds = [node.layer_seconds for node in nodes]
        self.alive = [True] * len(nodes)
        self.alive_records: list[NodeRecord] | None = None  # rebuilt after a node dies or comes back
        self.load = [0] * len(nodes)
        self.cache_used = [0] * len(nodes)
        self.running: list[dict[_Attempt, None]] = [{} for _ in nodes]  # dicts keep arrival order
        self.tokens_served = [0] * len(nodes)
        self.failure_rngs = [random.Random(node.failure_seed) for node in nodes]
        self.events: list[tuple[float, int, int, Any]] = []
        self.sequence = 0
        self.latency_per_token: list[float] = []
        self.completed = self.failed = self.no_route = self.retried = self.node_failures = 0
        self.completed_tokens, self.hops, self.routed, self.peak_load, self.last_finish = 0, 0, 0, 0, 0.0
        self.policy_seconds = 0.0

    def push(self, at: float, kind: int, payload: Any) -> None:
        self.sequence += 1
        heapq.heappush(self.events, (at, kind, self.sequence, payload))

    def run(self, workload: list[Request]) -> None:
        hourly = self.config.failure_rate / 3600.0
        if hourly > 0:
            for index, rng in enumerate(self.failure_rngs):
                self.push(rng.expovariate(hourly), _NODE_DOWN, index)
        for request in workload:
            self.push(request.arrival, _ARRIVAL, _Attempt(request, request.tokens, self.config.retries, set()))
        unresolved = len(workload)
        handlers = {_NODE_UP: self.node_up, _FINISH: self.finish, _NODE_DOWN: self.node_down, _ARRIVAL: self.arrive}
        while unresolved:
            now, kind, _, payload = heapq.heappop(self.events)
            unresolved -= handlers[kind](now, payload)

    # Each handler returns how many requests it resolved (completed or failed for good).

    def arrive(self, now: float, attempt: _Attempt) -> int:
        if self.alive_records is None:
            self.alive_records = [r for r, alive in zip(self.records, self.alive, strict=True) if alive]
        # model_construct: the records were validated when the mesh was built; validating a thousand
        # of them again for every request would cost more than most policies.
        route_request = RouteRequest.model_construct(
            records=self.alive_records, start=0, end=self.config.layers,
            latencies=self.mesh.measured[attempt.request.client], avoid=set(attempt.avoid),
        )  # fmt: skip
        began = time.perf_counter()
        try:
            hops = self.policy(route_request)
        except NoRouteError:
            self.no_route += 1
            self.failed += 1
            return 1
        finally:
            self.policy_seconds += time.perf_counter() - began
        self.occupy(now, attempt, self.chain_nodes(hops))
        return 0

    def chain_nodes(self, hops: list[RouteHop]) -> list[tuple[int, int]]:
        """(node index, layers) per hop, after checking that the chain is one a client could use."""
        chain, position = [], 0
        for hop in hops:
            index = self.index_of.get(hop.peer_id)
            record = self.records[index] if index is not None and self.alive[index] else None
            if record is None or hop.start != position or not record.start <= hop.start < hop.end <= record.end:
                raise SimulationError(
                    f"Routing policy {self.policy_name!r} returned a chain that does not cover layers "
                    f"0-{self.config.layers - 1} in order with online nodes serving them: {hops}"
                )
            chain.append((index, hop.end - hop.start))
            position = hop.end
        if position != self.config.layers:
            raise SimulationError(f"Routing policy {self.policy_name!r} stopped at layer {position}: {hops}")
        return chain

    def occupy(self, now: float, attempt: _Attempt, chain: list[tuple[int, int]]) -> None:
        """Start the attempt on its chain: its speed follows the nodes' loads now; it holds them to its end."""
        capacity, rtt, per_token = self.config.capacity, self.mesh.rtt[attempt.request.client], 0.0
        compute_scale = attempt.tokens * self.config.forward_token_cost if attempt.request.forward else 1.0
        for index, layers in chain:
            slowdown = 1.0 + self.load[index] / capacity
            per_token += rtt[index] + layers * self.layer_seconds[index] * slowdown * compute_scale
        attempt.started, attempt.seconds_per_token = now, per_token
        attempt.nodes = list(dict.fromkeys(index for index, _ in chain))
        for index in attempt.nodes:
            self.load[index] += 1
            self.cache_used[index] += attempt.tokens
            self.running[index][attempt] = None
            self.sync_record(index)
            self.peak_load = max(self.peak_load, self.load[index])
        self.hops += len(chain)
        self.routed += 1
        duration = per_token if attempt.request.forward else per_token * attempt.tokens
        self.push(now + duration, _FINISH, attempt)

    def release(self, attempt: _Attempt, tokens_done: int) -> None:
        for index in attempt.nodes:
            self.load[index] -= 1
            self.cache_used[index] -= attempt.tokens
            self.running[index].pop(attempt, None)
            self.tokens_served[index] += tokens_done
            self.sync_record(index)

    def sync_record(self, index: int) -> None:
        """Write the node's state into the record policies read, as its next DHT announcement would."""
        record = self.records[index]
        record.load = float(self.load[index])
        record.cache_tokens_left = max(0, self.config.cache_tokens - self.cache_used[index])

    def finish(self, now: float, attempt: _Attempt) -> int:
        if attempt.killed:  # its node died first; node_down already accounted for it
            return 0
        self.release(attempt, attempt.tokens)
        request = attempt.request
        self.latency_per_token.append((now - request.arrival) / request.tokens)
        self.completed += 1
        self.completed_tokens += request.tokens
        self.last_finish = max(self.last_finish, now)
        return 1

    def node_down(self, now: float, index: int) -> int:
        self.alive[index], self.alive_records = False, None
        self.node_failures += 1
        rng = self.failure_rngs[index]
        if rng.random() < self.config.recovery:
            self.push(now + rng.expovariate(1.0 / self.config.downtime), _NODE_UP, index)
        resolved = 0
        for attempt in list(self.running[index]):
            attempt.killed = True
            done = 0  # a forward batch that dies has computed nothing the client can keep
            if not attempt.request.forward:
                done = min(attempt.tokens, int((now - attempt.started) / attempt.seconds_per_token))
            self.release(attempt, done)
            if attempt.retries_left > 0:
                self.retried += 1
                avoid = attempt.avoid | {self.records[index].peer_id}
                retry = _Attempt(attempt.request, attempt.tokens - done, attempt.retries_left - 1, avoid)
                self.push(now, _ARRIVAL, retry)
            else:
                self.failed += 1
                resolved += 1
        return resolved

    def node_up(self, now: float, index: int) -> int:
        self.alive[index], self.alive_records = True, None
        self.push(now + self.failure_rngs[index].expovariate(self.config.failure_rate / 3600.0), _NODE_DOWN, index)
        return 0

    def report(self, workload: list[Request]) -> dict[str, Any]:
        latencies = sorted(self.latency_per_token)
        served = self.tokens_served
        mean_served = statistics.fmean(served)
        elapsed = self.last_finish - workload[0].arrival
        return {
            "latency_per_token_mean_s": _rounded(statistics.fmean(latencies)) if latencies else None,
            "latency_per_token_p95_s": _rounded(latencies[math.ceil(0.95 * len(latencies)) - 1]) if latencies else None,
            "throughput_tokens_per_s": _rounded(self.completed_tokens / elapsed) if elapsed > 0 else None,
            "load_balance": {
                "tokens_served_cv": _rounded(statistics.pstdev(served) / mean_served) if mean_served else None,
                "tokens_served_max_over_mean": _rounded(max(served) / mean_served) if mean_served else None,
                "idle_nodes": sum(1 for tokens in served if tokens == 0),
                "peak_node_load": self.peak_load,
            },
            "completed_requests": self.completed,
            "failed_requests": self.failed,
            "no_route_requests": self.no_route,
            "retried_requests": self.retried,
            "mean_hops": _rounded(self.hops / self.routed) if self.routed else None,
            "node_failures": self.node_failures,
            "policy_seconds": _rounded(self.policy_seconds),
        }


def _rounded(value: float) -> float:
    return float(f"{value:.6g}")


@contextmanager
def _seeded_global_random(seed: int) -> Iterator[None]:
    """Policies draw from the module ``random`` (max-throughput, random): seed it, then put it back."""
    saved = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(saved)


def simulate_policy(
    config: SimulationConfig, mesh: Mesh, workload: list[Request], name: str, policy: Policy
) -> dict[str, Any]:
    """Replay ``workload`` through ``policy`` on ``mesh``; return its metrics and the time the replay took."""
    wall, cpu = time.perf_counter(), time.process_time()
    replay = _Replay(config, mesh, name, policy)
    with _seeded_global_random(config.seed):
        replay.run(workload)
    result = replay.report(workload)
    result["wall_seconds"] = _rounded(time.perf_counter() - wall)
    result["cpu_seconds"] = _rounded(time.process_time() - cpu)
    return result


def run_simulation(config: SimulationConfig, policies: dict[str, Policy] | None = None) -> dict[str, Any]:
    """Build the mesh and the workload once, replay them through each policy; return the JSON-ready result.

    ``policies`` defaults to the registered routing policies, narrowed by ``config.policies``.
    """
    if policies is None:
        from farmesh_core.plugins import get_routing_policies, pick

        registry = get_routing_policies()
        policies = {name: pick("routing policy", registry, name) for name in config.policies or sorted(registry)}
    mesh, workload = build_mesh(config), build_workload(config)
    replicas = [sum(1 for n in mesh.nodes if n.record.start <= layer < n.record.end) for layer in range(config.layers)]
    return {
        "config": config.model_dump(),
        "mesh": {
            "replicas_per_layer_min": min(replicas),
            "replicas_per_layer_mean": _rounded(statistics.fmean(replicas)),
            "far_nodes": sum(1 for n in mesh.nodes if n.far),
            "workload_seconds": _rounded(workload[-1].arrival),
        },
        "policies": {name: simulate_policy(config, mesh, workload, name, policy) for name, policy in policies.items()},
    }


def plot_results(result: dict[str, Any], path: str) -> None:
    """Save a PNG: mean and p95 latency per token, and load balance, per policy."""
    pyplot = _import_pyplot()
    names = list(result["policies"])
    stats = [result["policies"][name] for name in names]
    x = range(len(names))
    figure, (latency_axes, balance_axes) = pyplot.subplots(1, 2, figsize=(4 + 2.2 * len(names), 4.5))
    for offset, key, label in ((-0.2, "latency_per_token_mean_s", "mean"), (0.2, "latency_per_token_p95_s", "p95")):
        latency_axes.bar([i + offset for i in x], [s[key] or 0 for s in stats], width=0.4, label=label)
    latency_axes.set(title="Latency per token", ylabel="seconds", xticks=list(x), xticklabels=names)
    for offset, key, label in ((-0.2, "tokens_served_cv", "CV"), (0.2, "tokens_served_max_over_mean", "max / mean")):
        balance_axes.bar([i + offset for i in x], [s["load_balance"][key] or 0 for s in stats], width=0.4, label=label)
    balance_axes.set(title="Tokens served per node (lower is more even)", xticks=list(x), xticklabels=names)
    for axes in (latency_axes, balance_axes):
        axes.legend()
        axes.tick_params(axis="x", labelrotation=20)
    config = result["config"]
    figure.suptitle(f"{config['nodes']} nodes, {config['layers']} layers, {config['requests']} requests")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def _import_pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SimulationError("--plot needs matplotlib, which is not installed: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only: no display is needed, nor wanted on a server
    from matplotlib import pyplot

    return pyplot


def simulate_command(args: argparse.Namespace) -> None:
    """``farmesh simulate``: command-line options override ``--config``'s, which override the defaults."""
    options = {}
    if args.config:
        try:
            with open(args.config) as file:
                options = json.load(file)
        except (OSError, ValueError) as e:
            raise SimulationError(f"Cannot read --config {args.config}: {e}") from None
    options |= {k: v for k, v in vars(args).items() if k in SimulationConfig.model_fields and v is not None}
    try:
        config = SimulationConfig(**options)
    except ValidationError as e:
        problems = "; ".join(
            f"--{'-'.join(map(str, err['loc'])).replace('_', '-')}: {err['msg']}" if err["loc"] else err["msg"]
            for err in e.errors()
        )
        raise SimulationError(f"Invalid simulation options: {problems}") from None
    if args.plot:
        _import_pyplot()  # fail before a long run, not after it
    result = run_simulation(config)
    print(json.dumps(result, indent=2), flush=True)
    if args.plot:
        plot_results(result, args.plot)


def main(argv: list[str] | None = None) -> None:
    """``python -m farmesh_core.simulate``: the same options as ``farmesh simulate``."""
    from farmesh_core.cli import main as cli_main

    cli_main(["simulate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
