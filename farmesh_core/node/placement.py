"""Which layers a node should serve when the operator does not say, and when it should move.

The mesh's capacity is limited by its weakest layer: a client's chain passes every layer, so the
tokens per second the mesh can serve are at most the smallest per-layer throughput, where a layer's
throughput is the sum of the announced throughputs of the nodes serving it (a missing layer has 0).
This is Petals' model (``petals.server.block_selection``), and so is the rule built on it:

* **Placement** (:func:`choose_layers`): a joining node with throughput ``t`` takes the window of
  ``num_layers`` consecutive layers that maximizes the mesh's bottleneck once ``t`` is added to that
  window. Ties (for example while several layers are missing and one window cannot fill them all)
  go to the window whose own throughputs, sorted ascending, are lexicographically smallest: the one
  covering the most missing, then the least-served, layers; then to the lowest start. (Petals ranks
  windows by the sorted throughputs alone, which also puts the weakest layer inside the window; the
  bottleneck rule states the goal directly and uses the node's own throughput.)
* **Rebalancing** (:func:`rebalance_target`): a node takes itself out of the picture, places itself
  again with the same rule and moves only if the new place leaves fewer layers unserved or, with
  every layer served, raises the bottleneck by more than ``min_gain`` (Petals' ``balance_quality``,
  default 0.75, asks for 1 / 0.75 = 1.33). Every move either shrinks the gaps or raises the
  bottleneck by a fixed factor, so moves made one at a time cannot cycle; nodes jitter their check
  periods so that they rarely move at the same moment (:class:`farmesh_core.node.FarNode`).

:class:`SpanSwitch` lets a node move without dropping the sessions it serves.
"""

import weakref
from collections.abc import Iterable

from farmesh_core.config import NodeRecord
from farmesh_core.errors import RequestError

MIN_THROUGHPUT = 1e-3  # what a record announcing 0 tokens/s counts for: it serves, slowly


def coverage(records: Iterable[NodeRecord], total_layers: int) -> list[float]:
    """Sum of announced throughput per layer (0.0 for a layer nobody serves)."""
    served = [0.0] * total_layers
    for record in records:
        for index in range(record.start, min(record.end, total_layers)):
            served[index] += max(record.throughput, MIN_THROUGHPUT)
    return served


def bottleneck(served: list[float]) -> float:
    """The mesh's throughput limit: its least-served layer."""
    return min(served) if served else 0.0


def estimate_throughput(records: Iterable[NodeRecord], num_layers: int) -> float:
    """What a node about to load ``num_layers`` layers will likely announce, before it can measure:
    the median of the others' throughput scaled to ``num_layers`` layers (1.0 in an empty mesh)."""
    per_layer = sorted(max(r.throughput, MIN_THROUGHPUT) * (r.end - r.start) for r in records)
    if not per_layer:
        return 1.0
    return per_layer[len(per_layer) // 2] / max(num_layers, 1)


def _placement_key(served: list[float], start: int, num_layers: int, throughput: float):
    window = served[start : start + num_layers]
    outside = served[:start] + served[start + num_layers :]
    after = min([*outside, min(window) + throughput])
    return -after, sorted(window), start


def choose_layers(
    records: list[NodeRecord], total_layers: int, num_layers: int, throughput: float | None = None
) -> tuple[int, int]:
    """The window ``(start, end)`` of ``num_layers`` layers where a node of ``throughput`` tokens/s
    helps the mesh most (see the module docstring); ``records`` must not include the node itself.
    Without ``throughput``, :func:`estimate_throughput` guesses it from the others."""
    num_layers = max(1, min(num_layers, total_layers))
    if throughput is None:
        throughput = estimate_throughput(records, num_layers)
    throughput = max(throughput, MIN_THROUGHPUT)
    served = coverage(records, total_layers)
    best = min(range(total_layers - num_layers + 1), key=lambda s: _placement_key(served, s, num_layers, throughput))
    return best, best + num_layers


def rebalance_target(
    records: list[NodeRecord], peer_id: str, total_layers: int, throughput: float, min_gain: float = 1.2
) -> tuple[int, int] | None:
    """Where the node ``peer_id`` should move, or None when it should stay.

    It moves when its best place (:func:`choose_layers` over the other nodes) would leave fewer
    layers unserved than its current place, or, with every layer served either way, would raise the
    mesh's bottleneck by a factor above ``min_gain``. ``records`` are the mesh's current records
    (the node's own included: without it, nothing is decided)."""
    mine = next((r for r in records if r.peer_id == peer_id), None)
    if mine is None:
        return None
    num_layers = mine.end - mine.start
    others = [r for r in records if r.peer_id != peer_id]
    served = coverage(others, total_layers)
    throughput = max(throughput, MIN_THROUGHPUT)

    def placed_at(start: int) -> tuple[int, float]:  # (layers left missing, bottleneck)
        window = range(start, start + num_layers)
        missing = sum(1 for i, s in enumerate(served) if s <= 0.0 and i not in window)
        return missing, -_placement_key(served, start, num_layers, throughput)[0]

    start, end = choose_layers(others, total_layers, num_layers, throughput)
    if start == mine.start:
        return None
    (missing_before, before), (missing_after, after) = placed_at(mine.start), placed_at(start)
    if missing_after < missing_before:
        return start, end  # it fills layers nobody else serves
    if missing_after == 0 and after > before * min_gain:
        return start, end
    return None


class SpanSwitch:
    """What a node's :class:`~farmesh_core.node.handlers.NodeHandlers` hold as their span when the
    node may move: it stands for the current :class:`~farmesh_core.node.layer_span.LayerSpan`
    (attributes are delegated to it, so new requests are checked against the current layers) and,
    during a move, keeps the old span for the sessions that started on it.

    A session is recognized by its KV cache (the ``cache`` passed to ``forward``): a cache that
    already holds tokens when first seen after :meth:`switch_to` belongs to a session opened before
    the move and stays on the old span; a fresh one goes to the new span when its layers are there.
    Layers present in both spans are the same weights, so either gives the same output. (This needs
    one ``SessionCache`` object per session, as the handlers create them; an unknown cache type only
    makes :meth:`drained` wait for every session to end.)
    ``switch_to``, ``drained`` and ``release_old`` must run on the node's event loop thread (where
    sessions open and close), ``forward`` and ``backward`` may also run in its compute thread.
    """

    def __init__(self, span):
        self.current = span
        self.old = None
        self._old_caches: weakref.WeakSet = weakref.WeakSet()
        self._new_caches: weakref.WeakSet = weakref.WeakSet()

    def __getattr__(self, name):  # start, end, hidden_size, config, dtype, kv_bytes_per_token, ...
        return getattr(self.current, name)

    def switch_to(self, span) -> None:
        """From now on ``span`` is current; the previous one serves its sessions until ``release_old``."""
        self._old_caches, self._new_caches = weakref.WeakSet(), weakref.WeakSet()
        self.old, self.current = self.current, span

    def drained(self, active_sessions: int) -> bool:
        """Whether no session of the old span is left: every open session (``active_sessions``, as
        the handlers count them) is one seen on the new span with its KV cache still held."""
        if self.old is None:
            return True
        new_sessions = sum(1 for cache in list(self._new_caches) if getattr(cache, "_keys", None))
        return active_sessions <= new_sessions

    def release_old(self) -> None:
        """Drop the old span; a session still on its layers is refused at its next step."""
        self.old = None
        self._old_caches, self._new_caches = weakref.WeakSet(), weakref.WeakSet()

    @staticmethod
    def _has(span, start: int, end: int) -> bool:
        return span is not None and span.start <= start and end <= span.end

    def _span_for(self, start: int, end: int, cache):
        current, old = self.current, self.old
        if old is None:
            span = current
        elif cache is None:
            span = current if self._has(current, start, end) else old
        elif cache in self._old_caches:
            span = old
        elif cache in self._new_caches:
            span = current
        elif cache.length == 0 and self._has(current, start, end):
            self._new_caches.add(cache)
            span = current
        else:
            self._old_caches.add(cache)
            span = old
        if not self._has(span, start, end):
            raise RequestError(
                f"this node moved to layers {current.start}:{current.end}; layers {start}:{end} are no longer served"
            )
        return span

    def forward(self, hidden, start: int, end: int, cache=None, position: int = 0, adapter_name=None):
        lora = () if adapter_name is None else (adapter_name,)  # a LoRA adapter (farmesh-lora), if any
        return self._span_for(start, end, cache).forward(hidden, start, end, cache, position, *lora)

    def forward_decode_batch(self, hiddens, start: int, end: int, caches, positions, adapter_name=None):
        """One-token steps of several sessions (the node's decode batcher) as one batch when they are
        all on the same span; None otherwise, and the batcher runs them one by one through ``forward``."""
        spans = {id(span): span for span in (self._span_for(start, end, cache) for cache in caches)}
        if len(spans) != 1:
            return None
        lora = () if adapter_name is None else (adapter_name,)
        return next(iter(spans.values())).forward_decode_batch(hiddens, start, end, caches, positions, *lora)

    def backward(self, hidden, grad_output, start: int, end: int, adapter_name=None):
        lora = () if adapter_name is None else (adapter_name,)
        return self._span_for(start, end, None).backward(hidden, grad_output, start, end, *lora)
