"""Which layers a node should serve when the operator does not say (like Petals' block selection)."""

from farmesh_core.config import NodeRecord


def coverage(records: list[NodeRecord], total_layers: int) -> list[float]:
    """Sum of announced throughput per layer."""
    served = [0.0] * total_layers
    for record in records:
        for index in range(record.start, min(record.end, total_layers)):
            served[index] += max(record.throughput, 1e-3)
    return served


def choose_layers(records: list[NodeRecord], total_layers: int, num_layers: int) -> tuple[int, int]:
    """The window of ``num_layers`` layers that helps most: it fills missing layers first, then the
    least-served ones; ties go to the lowest start."""
    num_layers = min(num_layers, total_layers)
    served = coverage(records, total_layers)
    best = min(
        range(total_layers - num_layers + 1),
        key=lambda s: (min(served[s : s + num_layers]), sum(served[s : s + num_layers]), s),
    )
    return best, best + num_layers
