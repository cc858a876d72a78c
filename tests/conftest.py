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
def session_launcher(tmp_path_factory):
    launcher = MeshLauncher(tmp_path_factory.mktemp("session-mesh-logs"))
    try:
        yield launcher
    finally:
        launcher.stop_all()


@pytest.fixture(scope="session")
def llama_mesh(session_launcher, tiny_llama) -> Mesh:
    """Two Far Nodes (layers 0:4 and 4:8) of the tiny Llama, shared by the e2e modules (the bad
    requests of test_bad_requests.py go to these nodes too, and every module after it relies on them)."""
    return session_launcher.start(tiny_llama, "0:4", "4:8")


@pytest.fixture(scope="session")
def gqa_mesh(session_launcher, gqa_llama) -> Mesh:
    """Two Far Nodes (layers 0:4 and 4:8) of the GQA Llama."""
    return session_launcher.start(gqa_llama, "0:4", "4:8")
