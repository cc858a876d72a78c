"""``farmesh status`` as people read it: a table of nodes and the layers that lack redundancy."""

from farmesh_core.config import NodeRecord
from farmesh_core.status import layer_ranges, render_status, summarize_mesh


def record(peer_id: str, start: int, end: int, state: str = "online", **fields) -> NodeRecord:
    defaults = dict(throughput=1234.0, cache_tokens_left=4096, quantization="none", dtype="float32", version="0.1.0")
    return NodeRecord(peer_id=peer_id, start=start, end=end, state=state, **{**defaults, **fields})


def status_of(*records: NodeRecord, num_layers: int = 8) -> dict:
    return summarize_mesh("/models/tiny", "tiny", num_layers, list(records))


def test_layer_ranges_are_compact():
    assert layer_ranges([]) == "none"
    assert layer_ranges([3]) == "3"
    assert layer_ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"


def test_summary_counts_online_nodes_per_layer():
    """Offline nodes are listed but serve nothing: layers 0:2 count one node, 4:8 none."""
    status = status_of(record("QmFirst", 0, 4), record("QmSecond", 2, 4), record("QmGone", 0, 2, state="offline"))
    assert status["nodes_per_layer"] == [1, 1, 2, 2, 0, 0, 0, 0]
    assert status["missing_layers"] == [4, 5, 6, 7]
    assert status["single_node_layers"] == [0, 1]
    assert len(status["nodes"]) == 3


def test_render_names_missing_and_single_node_layers():
    """The text names the gaps as ranges and says how to fill them."""
    text = render_status(status_of(record("QmFirst", 0, 4), record("QmSecond", 2, 4)), color=False)
    assert "Layers without a node: 4-7" in text
    assert "Layers with one node only: 0-1" in text
    assert "--layers 4:8" in text


def test_render_shows_one_row_per_node_with_its_details():
    """Each node's layers, throughput, cache room, quantization, adapters, version and state are shown."""
    text = render_status(
        status_of(
            record("QmAAAAAAAAAAAAAAAAfirst", 0, 4, quantization="int8", adapters=["my-lora"]),
            record("QmBBBBBBBBBBBBBBsecond", 4, 8, state="offline", version="0.2.0", throughput=99.0),
        ),
        color=False,
    )
    first = next(line for line in text.splitlines() if "first" in line)
    second = next(line for line in text.splitlines() if "second" in line)
    for cell in ("0:4", "1234 tok/s", "4096 tok", "int8", "my-lora", "0.1.0", "online"):
        assert cell in first
    for cell in ("4:8", "99 tok/s", "0.2.0", "offline"):
        assert cell in second
    assert "Layers without a node: 4-7" in text  # the offline node serves nothing


def test_full_coverage_says_none():
    text = render_status(status_of(record("QmA", 0, 8), record("QmB", 0, 8)), color=False)
    assert "Layers without a node: none" in text
    assert "Layers with one node only: none" in text
    assert "\x1b[" not in text  # no ANSI codes when color is off


def test_empty_mesh_is_explained():
    text = render_status(status_of(), color=False)
    assert "No Far Node of /models/tiny" in text
    assert "Layers without a node: 0-7" in text
