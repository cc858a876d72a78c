"""What the Far Mesh Network of one model looks like: nodes, their layers, and uncovered layers.

``mesh_status`` gathers it as plain data (``farmesh status --json``, the coordinator's ``/v1/mesh``);
``render_status`` draws it as a table for people.
"""

import io
import shutil
import sys

from farmesh_core.architecture import adapter_for
from farmesh_core.checkpoint import Checkpoint
from farmesh_core.config import ClientConfig, NodeRecord
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
    return summarize_mesh(model_id, prefix, total, records)


def summarize_mesh(model_id: str, prefix: str, num_layers: int, records: list[NodeRecord]) -> dict:
    """The status dict of a mesh whose node records (all states) are ``records``."""
    online = [r for r in records if r.state == "online"]
    served = [sum(r.start <= i < r.end for r in online) for i in range(num_layers)]
    return {
        "model": model_id,
        "dht_prefix": prefix,
        "num_layers": num_layers,
        "nodes": [r.model_dump() for r in records],
        "nodes_per_layer": served,
        "missing_layers": [i for i, n in enumerate(served) if n == 0],
        "single_node_layers": [i for i, n in enumerate(served) if n == 1],
    }


def layer_ranges(layers: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"``; ``"none"`` when empty."""
    if not layers:
        return "none"
    spans, first = [], layers[0]
    for prev, cur in zip(layers, [*layers[1:], None], strict=True):
        if cur != prev + 1:
            spans.append(f"{first}-{prev}" if first != prev else f"{first}")
            first = cur
    return ", ".join(spans)


STATE_STYLES = {"online": "green", "joining": "yellow", "offline": "red"}


def status_table(status: dict):
    """A ``rich`` table of the mesh's nodes, one row per node, ordered by layers."""
    from rich.markup import escape
    from rich.table import Table

    title = (
        f"Far Mesh Network of {escape(status['model'])} ({status['num_layers']} layers, prefix {status['dht_prefix']})"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("peer")
    table.add_column("layers")
    table.add_column("throughput", justify="right")
    table.add_column("cache room", justify="right")
    table.add_column("sessions", justify="right")
    table.add_column("quantization")
    table.add_column("dtype")
    table.add_column("adapters")
    table.add_column("version")
    table.add_column("state")
    for n in sorted(status["nodes"], key=lambda n: (n["start"], n["end"], n["peer_id"])):
        table.add_row(
            "…" + escape(n["peer_id"][-12:]), f"{n['start']}:{n['end']}", f"{n['throughput']:.0f} tok/s",
            f"{n['cache_tokens_left']} tok", f"{n.get('load', 0):g}", escape(n["quantization"]),
            escape(n.get("dtype") or "-"), escape(", ".join(n["adapters"]) or "-"), escape(n["version"]),
            f"[{STATE_STYLES.get(n['state'], 'white')}]{n['state']}[/]",
        )  # fmt: skip
    return table


def coverage_lines(status: dict) -> list[str]:
    """Rich-markup lines naming the layers no online node serves, and those only one node serves."""
    missing, single = status["missing_layers"], status["single_node_layers"]
    lines = [
        f"Layers without a node: [{'bold red' if missing else 'green'}]{layer_ranges(missing)}[/]",
        f"Layers with one node only: [{'yellow' if single else 'green'}]{layer_ranges(single)}[/]",
    ]
    if missing:
        first = missing[0]
        end = next((i for i in range(first, status["num_layers"]) if i not in missing), status["num_layers"])
        lines.append(f"Start a node for them: farmesh node MODEL --dht-bootstrap ADDR --layers {first}:{end}")
    return lines


def render_status(status: dict, color: bool | None = None, width: int | None = None) -> str:
    """The table and the coverage summary as text. By default, when stdout is a terminal: its width
    and ANSI colors; otherwise 140 columns and no colors."""
    from rich.console import Console

    tty = sys.stdout.isatty()
    color = tty if color is None else color
    width = width or (shutil.get_terminal_size((140, 24)).columns if tty else 140)
    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=color, no_color=not color, highlight=False)
    if status["nodes"]:
        console.print(status_table(status))
    else:
        console.print(f"No Far Node of {status['model']} (prefix {status['dht_prefix']}) is in the DHT.", markup=False)
    for line in coverage_lines(status):
        console.print(line)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines())
