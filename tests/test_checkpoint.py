"""Checkpoints: a node reads only the tensors of its layers, a client only the embeddings, final norm
and LM head; the DHT namespace follows the weights, not the directory; model ids resolve offline."""

import json
import os
import shutil

import pytest
import torch

from farmesh_core.architecture import adapter_for
from farmesh_core.checkpoint import INDEX_FILE, Checkpoint
from farmesh_core.checkpoint_maker import make_checkpoint
from farmesh_core.errors import ModelNotFoundError
from farmesh_core.node.layer_span import LayerSpan
from tests.helpers import NUM_LAYERS, hf_hidden_states, hf_model

HEAD_TENSORS = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}


class RecordingCheckpoint(Checkpoint):
    """A real Checkpoint that remembers the name of every tensor it was asked to read."""

    def __init__(self, model_id: str):
        super().__init__(model_id)
        self.loaded: list[str] = []

    def load_tensors(self, names, dtype=None):
        names = list(names)
        self.loaded.extend(names)
        return super().load_tensors(names, dtype)


def layer_tensors(checkpoint: Checkpoint, *indices: int) -> set[str]:
    return {n for n in checkpoint.weight_map if any(n.startswith(f"model.layers.{i}.") for i in indices)}


@pytest.fixture(params=["single-file", "sharded"])
def model_dir(request, tiny_llama, sharded_llama) -> str:
    return {"single-file": tiny_llama, "sharded": sharded_llama}[request.param]


def test_sharded_fixture_really_is_sharded(sharded_llama, tiny_llama):
    """The sharded checkpoint has an index and many files, each layer spread over its own shards."""
    checkpoint = Checkpoint(sharded_llama)
    assert os.path.exists(os.path.join(sharded_llama, INDEX_FILE))
    assert len(set(checkpoint.weight_map.values())) > NUM_LAYERS
    assert not os.path.exists(os.path.join(tiny_llama, INDEX_FILE))
    assert len(set(Checkpoint(tiny_llama).weight_map.values())) == 1


@pytest.mark.timeout(60)
def test_layer_span_loads_only_its_layers(model_dir):
    """A span of layers 2:4 reads exactly the tensors of layers 2 and 3, each once."""
    checkpoint = RecordingCheckpoint(model_dir)
    span = LayerSpan(checkpoint, adapter_for(checkpoint.config), 2, 4, torch.float32, "cpu")
    assert sorted(checkpoint.loaded) == sorted(layer_tensors(checkpoint, 2, 3))
    assert len(checkpoint.loaded) == len(set(checkpoint.loaded))
    assert sorted(span.layers) == [2, 3]


@pytest.mark.timeout(60)
def test_sharded_span_opens_only_the_shards_it_needs(sharded_llama):
    """In a sharded checkpoint the tensors of layers 2:4 come from a minority of the shard files."""
    checkpoint = RecordingCheckpoint(sharded_llama)
    LayerSpan(checkpoint, adapter_for(checkpoint.config), 2, 4, torch.float32, "cpu")
    files = {checkpoint.weight_map[name] for name in checkpoint.loaded}
    all_files = set(checkpoint.weight_map.values())
    assert len(files) < len(all_files) / 2
    assert files == {checkpoint.weight_map[name] for name in layer_tensors(checkpoint, 2, 3)}


@pytest.mark.timeout(60)
def test_loaded_span_computes_like_transformers(model_dir):
    """The layers loaded this way are the checkpoint's layers: 2:4 turn transformers' input of layer 2
    into its input of layer 4."""
    checkpoint = Checkpoint(model_dir)
    span = LayerSpan(checkpoint, adapter_for(checkpoint.config), 2, 4, torch.float32, "cpu")
    states = hf_hidden_states(model_dir)
    torch.testing.assert_close(span.forward(states[2], 2, 4), states[4], atol=1e-5, rtol=1e-5)


@pytest.mark.timeout(60)
def test_client_head_loads_only_embeddings_final_norm_and_lm_head(model_dir):
    """The client reads three tensors, none of any layer."""
    checkpoint = RecordingCheckpoint(model_dir)
    adapter_for(checkpoint.config).load_client_head(checkpoint, checkpoint.config, torch.float32)
    assert sorted(checkpoint.loaded) == sorted(HEAD_TENSORS)


@pytest.mark.timeout(60)
def test_client_head_computes_like_transformers(model_dir):
    """Embeddings and logits of the client head equal transformers' on the same checkpoint."""
    checkpoint = Checkpoint(model_dir)
    head = adapter_for(checkpoint.config).load_client_head(checkpoint, checkpoint.config, torch.float32)
    model = hf_model(model_dir)
    ids = torch.tensor([[1, 5, 17, 300]])
    hidden = torch.randn(1, 4, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(head.embed(ids), model.model.embed_tokens(ids))
        torch.testing.assert_close(head.logits(hidden), model.lm_head(model.model.norm(hidden)))


@pytest.mark.timeout(60)
def test_tied_embeddings_head_reuses_the_embedding_matrix(tmp_path):
    """With ``tie_word_embeddings`` the checkpoint may lack ``lm_head.weight``: the head uses the
    embeddings and still gives transformers' logits."""
    model_dir = make_checkpoint(str(tmp_path / "tied"), seed=3, num_hidden_layers=2, tie_word_embeddings=True)
    checkpoint = RecordingCheckpoint(model_dir)
    head = adapter_for(checkpoint.config).load_client_head(checkpoint, checkpoint.config, torch.float32)
    assert set(checkpoint.loaded) <= HEAD_TENSORS and "model.embed_tokens.weight" in checkpoint.loaded
    hidden = torch.randn(1, 3, 256, generator=torch.Generator().manual_seed(1))
    model = hf_model(model_dir)
    with torch.no_grad():
        torch.testing.assert_close(head.logits(hidden), model.lm_head(model.model.norm(hidden)))


def test_load_tensors_refuses_unknown_names(tiny_llama):
    with pytest.raises(ModelNotFoundError, match="has no tensor named 'model.layers.99.mlp.up_proj.weight'"):
        Checkpoint(tiny_llama).load_tensors(["model.layers.99.mlp.up_proj.weight"])


def test_load_tensors_casts_to_the_requested_dtype(tiny_llama):
    (tensor,) = Checkpoint(tiny_llama).load_tensors(["model.norm.weight"], torch.bfloat16).values()
    assert tensor.dtype == torch.bfloat16 and tensor.shape == (256,)


# ---- DHT namespace -------------------------------------------------------------------------------
def test_dht_prefix_is_the_same_for_a_copy_elsewhere(tiny_llama, tmp_path):
    """Copies of one checkpoint in different directories join the same mesh."""
    copy = shutil.copytree(tiny_llama, tmp_path / "somewhere" / "else")
    config = json.loads((copy / "config.json").read_text())
    config["_name_or_path"] = "/another/path"  # differs between copies, must not matter
    (copy / "config.json").write_text(json.dumps(config))
    assert Checkpoint(str(copy)).dht_prefix == Checkpoint(tiny_llama).dht_prefix


def test_dht_prefix_names_the_model_type(tiny_llama):
    assert Checkpoint(tiny_llama).dht_prefix.startswith("llama-")


def test_dht_prefix_differs_for_other_weights(tiny_llama, tmp_path):
    """Same architecture, another seed: another mesh."""
    other = make_checkpoint(str(tmp_path / "seed-7"), seed=7)
    assert Checkpoint(other).dht_prefix != Checkpoint(tiny_llama).dht_prefix


def test_dht_prefix_differs_for_another_architecture(tiny_llama, gqa_llama):
    assert Checkpoint(gqa_llama).dht_prefix != Checkpoint(tiny_llama).dht_prefix


def test_dht_prefix_is_the_same_for_single_file_and_sharded_copies(tmp_path):
    """Sharding is a storage detail: the same weights saved both ways share a prefix."""
    single = make_checkpoint(str(tmp_path / "single"), seed=4, num_hidden_layers=2)
    sharded = make_checkpoint(str(tmp_path / "sharded"), seed=4, num_hidden_layers=2, max_shard_size="1MB")
    assert Checkpoint(single).dht_prefix == Checkpoint(sharded).dht_prefix


# ---- model ids -----------------------------------------------------------------------------------
def test_unknown_model_id_raises_model_not_found():
    """An id that is neither a directory nor in the local Hugging Face cache: a clear error, no download."""
    with pytest.raises(ModelNotFoundError, match="'no-such-org/no-such-model' is not a checkpoint directory"):
        Checkpoint("no-such-org/no-such-model")


def test_missing_directory_raises_model_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError):
        Checkpoint(str(tmp_path / "does-not-exist"))


def test_directory_without_weights_raises_model_not_found(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="has neither model.safetensors nor model.safetensors.index.json"):
        Checkpoint(str(tmp_path)).load_tensors(["model.norm.weight"])


def test_hub_id_in_the_local_cache_resolves_offline(tiny_llama, tmp_path, monkeypatch):
    """``org/name`` already in the Hugging Face cache is found there, offline (what ``HF_HUB_CACHE``
    points huggingface_hub at is set directly here: the library reads it at import time)."""
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--farmesh-test--tiny-llama"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_llama, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    checkpoint = Checkpoint("farmesh-test/tiny-llama")
    assert checkpoint.path == str(repo / "snapshots" / revision)
    assert checkpoint.config.num_hidden_layers == NUM_LAYERS
    assert checkpoint.dht_prefix == Checkpoint(tiny_llama).dht_prefix
