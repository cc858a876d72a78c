"""What the Far Mesh Network of one model looks like: nodes, their layers, and uncovered layers."""

from farmesh_core.architecture import adapter_for
from farmesh_core.checkpoint import Checkpoint
from farmesh_core.config import ClientConfig
from farmesh_core.dht import fetch_node_records, start_dht


def mesh_status(model_id: str, dht_bootstrap: list[str], **network) -> dict:
    """Nodes (all states) and per-layer coverage of ``model_id``'s mesh, as plain data."""
    config = ClientConfig(model_id=model_id, dht_bootstrap=dht_bootstrap, **network)
    checkpoint = Checkpoint(model_id)
    total = adapter_for(checkpoint.config).num_layers(checkpoint.config)
    prefix = config.dht_prefix or checkpoint.dht_prefix
    dht = start_dht(config, client_mode=True)
    try:
        records = fetch_node_records(dht, prefix, online_only=False)
    finally:
        dht.shutdown()
    online = [r for r in records if r.state == "online"]
    served = [sum(r.start <= i < r.end for r in online) for i in range(total)]
    return {
        "model": model_id,
        "dht_prefix": prefix,
        "num_layers": total,
        "nodes": [r.model_dump() for r in records],
        "nodes_per_layer": served,
        "missing_layers": [i for i, n in enumerate(served) if n == 0],
        "single_node_layers": [i for i, n in enumerate(served) if n == 1],
    }


def render_status(status: dict) -> str:
    rows = [("peer", "layers", "state", "tok/s", "cache tokens", "quant", "adapters", "version")]
    for n in status["nodes"]:
        rows.append((
            n["peer_id"][-12:], f"{n['start']}:{n['end']}", n["state"], f"{n['throughput']:.0f}",
            str(n["cache_tokens_left"]), n["quantization"], ",".join(n["adapters"]) or "-", n["version"],
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"Far Mesh Network of {status['model']} ({status['num_layers']} layers, prefix {status['dht_prefix']})"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    missing, single = status["missing_layers"], status["single_node_layers"]
    lines.append(f"layers without a node: {missing or 'none'}")
    lines.append(f"layers with one node only: {single or 'none'}")
    return "\n".join(lines)
