"""Prometheus metrics of Far Nodes and of the Far Mesh Coordinator.

The metric objects live here, with small recording functions the node's handlers and the
coordinator call where a request, a step or a token finishes. Recording costs a lock and an add;
label children are resolved once, at import, so the hot path allocates nothing.

``farmesh node ... --metrics-port N`` serves them with :func:`serve_metrics`; the coordinator
serves them at ``/metrics`` on its own HTTP port.
"""

import logging

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

logger = logging.getLogger(__name__)

# Seconds: a one-token step on a fast node is ~1 ms, a long prefill or a slow chain seconds.
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _registry() -> CollectorRegistry:
    """A registry with the usual process, platform and GC metrics."""
    registry = CollectorRegistry()
    for collector in (ProcessCollector, PlatformCollector, GCCollector):
        collector(registry=registry)
    return registry


# Separate registries: a node's endpoint shows node metrics, the coordinator's its own.
NODE_REGISTRY = _registry()
COORDINATOR_REGISTRY = _registry()

# ---- Far Node ------------------------------------------------------------------------------------
NODE_REQUESTS = Counter(
    "farmesh_node_requests",
    "Requests a Far Node accepted: inference sessions, forward and backward calls",
    ["rpc"],
    registry=NODE_REGISTRY,
)
NODE_TOKENS = Counter(
    "farmesh_node_tokens", "Tokens that went through this node's layers", ["kind"], registry=NODE_REGISTRY
)
NODE_STEP_SECONDS = Histogram(
    "farmesh_node_step_seconds",
    "Compute time of one step through this node's layers",
    ["kind"],
    buckets=STEP_BUCKETS,
    registry=NODE_REGISTRY,
)
NODE_DECODE_BATCH = Histogram(
    "farmesh_node_decode_batch_size",
    "One-token steps of different sessions computed together (continuous batching)",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
    registry=NODE_REGISTRY,
)
NODE_PUSHES = Counter(
    "farmesh_node_pushes",
    "Step outputs sent straight to the next node of a chain (sent) or left to the client to relay (relayed)",
    ["result"],
    registry=NODE_REGISTRY,
)
NODE_ACTIVE_SESSIONS = Gauge(
    "farmesh_node_active_sessions", "Inference sessions open on this node", registry=NODE_REGISTRY
)
NODE_CACHE_USED = Gauge(
    "farmesh_node_kv_cache_used_bytes", "KV cache bytes held by open sessions", registry=NODE_REGISTRY
)
NODE_CACHE_TOTAL = Gauge(
    "farmesh_node_kv_cache_total_bytes", "KV cache budget of all sessions, in bytes", registry=NODE_REGISTRY
)
NODE_CACHE_TOKENS_LEFT = Gauge(
    "farmesh_node_kv_cache_tokens_left", "Tokens of KV cache still free on this node", registry=NODE_REGISTRY
)

_NODE_RPC = {rpc: NODE_REQUESTS.labels(rpc) for rpc in ("inference", "forward", "backward")}
_PREFILL = (NODE_TOKENS.labels("prefill"), NODE_STEP_SECONDS.labels("prefill"))
_DECODE = (NODE_TOKENS.labels("decode"), NODE_STEP_SECONDS.labels("decode"))


def node_request(rpc: str) -> None:
    """A Far Node accepted an ``rpc`` request (``inference``, ``forward`` or ``backward``)."""
    _NODE_RPC[rpc].inc()


def node_step(tokens: int, prefill: bool, seconds: float) -> None:
    """A step of ``tokens`` tokens went through the node's layers in ``seconds``."""
    counter, histogram = _PREFILL if prefill else _DECODE
    counter.inc(tokens)
    histogram.observe(seconds)


def node_decode_batch(steps: int) -> None:
    """``steps`` one-token steps of different sessions went through the layers as one batch."""
    NODE_DECODE_BATCH.observe(steps)


_PUSHES = {True: NODE_PUSHES.labels("sent"), False: NODE_PUSHES.labels("relayed")}


def node_push(sent: bool) -> None:
    """A session asked the node to push a step's output to the next node; ``sent``: it could."""
    _PUSHES[sent].inc()


def watch_node(handlers) -> None:
    """Read active sessions and KV cache use from ``handlers`` (a NodeHandlers) whenever scraped."""
    NODE_ACTIVE_SESSIONS.set_function(lambda: handlers.active_sessions)
    NODE_CACHE_USED.set_function(lambda: handlers.budget.used_bytes)
    NODE_CACHE_TOTAL.set_function(lambda: handlers.budget.total_bytes)
    NODE_CACHE_TOKENS_LEFT.set_function(handlers.cache_tokens_left)


# ---- Far Mesh Coordinator ------------------------------------------------------------------------
COORDINATOR_REQUESTS = Counter(
    "farmesh_coordinator_requests",
    "HTTP API requests answered, by endpoint and status code",
    ["endpoint", "status"],
    registry=COORDINATOR_REGISTRY,
)
COORDINATOR_TOKENS = Counter(
    "farmesh_coordinator_tokens",
    "Prompt and completion tokens of finished requests",
    ["kind"],
    registry=COORDINATOR_REGISTRY,
)
COORDINATOR_REQUEST_SECONDS = Histogram(
    "farmesh_coordinator_request_seconds",
    "Time from request to last token",
    ["endpoint"],
    buckets=REQUEST_BUCKETS,
    registry=COORDINATOR_REGISTRY,
)
COORDINATOR_FIRST_TOKEN_SECONDS = Histogram(
    "farmesh_coordinator_time_to_first_token_seconds",
    "Time from request to first token",
    buckets=REQUEST_BUCKETS,
    registry=COORDINATOR_REGISTRY,
)
COORDINATOR_TOKEN_SECONDS = Histogram(
    "farmesh_coordinator_token_seconds",
    "Time between two tokens of a generation (one step)",
    buckets=STEP_BUCKETS,
    registry=COORDINATOR_REGISTRY,
)
COORDINATOR_ACTIVE = Gauge(
    "farmesh_coordinator_active_generations", "Generations running now", registry=COORDINATOR_REGISTRY
)
COORDINATOR_SHARED_ROWS = Gauge(
    "farmesh_coordinator_shared_session_rows",
    "Generations so far that ran as rows of a session shared with others that started with them",
    registry=COORDINATOR_REGISTRY,
)

_PROMPT_TOKENS, _COMPLETION_TOKENS = COORDINATOR_TOKENS.labels("prompt"), COORDINATOR_TOKENS.labels("completion")


def coordinator_request(endpoint: str, status: int, seconds: float | None = None) -> None:
    """The coordinator answered ``endpoint`` with ``status``; ``seconds`` from request to last token."""
    COORDINATOR_REQUESTS.labels(endpoint, str(status)).inc()
    if seconds is not None:
        COORDINATOR_REQUEST_SECONDS.labels(endpoint).observe(seconds)


def coordinator_tokens(prompt: int, completion: int) -> None:
    _PROMPT_TOKENS.inc(prompt)
    _COMPLETION_TOKENS.inc(completion)


# ---- exposition ----------------------------------------------------------------------------------
def metrics_text(registry: CollectorRegistry = COORDINATOR_REGISTRY) -> tuple[bytes, str]:
    """The current metrics in Prometheus' text format, and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


def serve_metrics(port: int, host: str = "0.0.0.0", registry: CollectorRegistry = NODE_REGISTRY) -> None:
    """Serve ``/metrics`` on ``host:port`` from a daemon thread (Prometheus' own small HTTP server)."""
    from prometheus_client import start_http_server

    start_http_server(port, addr=host, registry=registry)
    logger.info("Prometheus metrics at http://%s:%d/metrics", host, port)
