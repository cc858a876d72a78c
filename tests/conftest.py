"""Shared fixtures: seeded tiny checkpoints and real meshes on loopback (see tests/helpers.py)."""

import os

# Nothing in the suite may reach the network beyond loopback (set before transformers is imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from farmesh_core.checkpoint_maker import make_checkpoint  # noqa: E402
from tests.helpers import Mesh, MeshLauncher  # noqa: E402


# ---- checkpoints ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """TINY_LLAMA: 8 layers, hidden 256, multi-head attention, one safetensors file."""
    return make_checkpoint(str(tmp_path_factory.mktemp("tiny-llama")), seed=0)


@pytest.fixture(scope="session")
def gqa_llama(tmp_path_factory) -> str:
    """The same shape with grouped-query attention (8 query heads share 4 key/value heads)."""
    return make_checkpoint(str(tmp_path_factory.mktemp("gqa-llama")), seed=1, num_key_value_heads=4)


@pytest.fixture(scope="session")
def sharded_llama(tmp_path_factory) -> str:
    """TINY_LLAMA saved in ~1 MB shards with a ``model.safetensors.index.json``."""
    return make_checkpoint(str(tmp_path_factory.mktemp("sharded-llama")), seed=2, max_shard_size="1MB")


# ---- meshes of real processes --------------------------------------------------------------------
@pytest.fixture(scope="session")
def mesh_factory(tmp_path_factory):
    """Start a mesh: ``mesh_factory(model_dir, "0:4", "4:8")`` returns a Mesh (bootstrap addrs, DHT and
    node processes). Every process it started is stopped by PID at the end of the session, even after
    failures; node logs are kept in the session's tmp dir and quoted if a mesh does not come up."""
    launcher = MeshLauncher(tmp_path_factory.mktemp("mesh-logs"))
    try:
        yield launcher.start
    finally:
        launcher.stop_all()


@pytest.fixture(scope="session")
def llama_mesh(mesh_factory, tiny_llama) -> Mesh:
    """Two Far Nodes (layers 0:4 and 4:8) of the tiny Llama, shared by the e2e modules (the bad
    requests of test_bad_requests.py go to these nodes too, and every module after it relies on them)."""
    return mesh_factory(tiny_llama, "0:4", "4:8")


@pytest.fixture(scope="session")
def gqa_mesh(mesh_factory, gqa_llama) -> Mesh:
    """Two Far Nodes (layers 0:4 and 4:8) of the GQA Llama."""
    return mesh_factory(gqa_llama, "0:4", "4:8")
