"""Fixtures of the modules that call the shared two-node mesh (``llama_mesh``) over its direct lanes."""

import pytest

from farmesh import DistributedInferenceClient


@pytest.fixture(scope="module")
def lane_client(llama_mesh):
    """A client of the shared mesh with the defaults: on direct lanes, each node pushing its output to the
    next, and greedy generations looping through the nodes (see InferenceSession._pushes and loops)."""
    with DistributedInferenceClient(llama_mesh.model_dir, llama_mesh.addrs) as client:
        yield client


@pytest.fixture(scope="module")
def lane_raw(llama_mesh):
    """A bare connection to the shared mesh holding tickets for both nodes' direct lanes."""
    connection = llama_mesh.connection()
    try:
        connection.measure_latencies([r.peer_id for r in connection.records(refresh=True)])
        yield connection
    finally:
        connection.close()
