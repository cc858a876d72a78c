"""The demo's trained model (farmesh_core.demo_model): the story corpus, a tiny-budget training run,
determinism, the cache rule, and ``farmesh demo`` over a trained checkpoint. The real recipe is
never trained here (minutes); tiny budgets of the same code stand in for it."""

import json
import os
import subprocess
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from farmesh_core.demo_model import (
    MARKER,
    RECIPE_VERSION,
    TrainConfig,
    ensure_demo_model,
    needs_training,
    story_corpus,
    train,
    train_demo_model,
)
from farmesh_core.launch import farmesh_command
from tests.helpers import hf_greedy_text

# The demo recipe's code on a small slice: 300 stories, hidden 64, still a Llama with 8 layers.
TINY = TrainConfig(
    num_stories=300, hidden_size=64, intermediate_size=172, num_attention_heads=4, seq_len=64, batch_size=8, steps=30
)


@pytest.fixture(scope="module")
def tiny_trained(tmp_path_factory) -> str:
    return train_demo_model(str(tmp_path_factory.mktemp("demo-model") / "tiny"), TINY, progress=False)


def test_story_corpus_is_seeded_simple_english():
    stories = story_corpus(50, seed=3)
    assert stories == story_corpus(50, seed=3)
    assert stories != story_corpus(50, seed=4)
    assert all(s.isascii() and s.endswith("The end.") for s in stories)
    assert sum(s.startswith("Once upon a time, there was") for s in stories) > 20
    assert " a old " not in " ".join(stories) and " a owl " not in " ".join(stories)


def test_the_demo_recipe_is_an_8_layer_llama():
    """The demo's two Far Nodes serve layers 0:4 and 4:8."""
    assert TrainConfig().num_hidden_layers == 8


@pytest.mark.timeout(120)
def test_tiny_training_makes_a_loadable_checkpoint_whose_loss_went_down(tiny_trained):
    info = json.load(open(os.path.join(tiny_trained, MARKER)))
    assert info["recipe_version"] == RECIPE_VERSION
    assert info["final_loss"] < info["first_loss"] - 1.0, info
    model = AutoModelForCausalLM.from_pretrained(tiny_trained)
    tokenizer = AutoTokenizer.from_pretrained(tiny_trained)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 8
    assert model.config.eos_token_id == tokenizer.eos_token_id
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tokenizer.bos_token_id
    assert tokenizer.convert_ids_to_tokens(ids[0, 1:].tolist()) == ["Once", "Ġupon", "Ġa", "Ġtime"]
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    assert not [f for f in os.listdir(os.path.dirname(tiny_trained)) if f.startswith(".demo-model-")]


@pytest.mark.timeout(120)
def test_training_is_deterministic_for_a_seed():
    cfg = replace(TINY, steps=4)
    model_a, tok_a, losses_a = train(cfg, progress=False, threads=1)
    model_b, tok_b, losses_b = train(cfg, progress=False, threads=1)
    assert losses_a == losses_b
    assert tok_a.get_vocab() == tok_b.get_vocab()
    state_b = model_b.state_dict()
    assert all(torch.equal(value, state_b[name]) for name, value in model_a.state_dict().items())
    _, _, losses_c = train(replace(cfg, seed=1), progress=False, threads=1)
    assert losses_c != losses_a


def test_only_missing_or_outdated_demo_models_are_trained(tmp_path, tiny_trained):
    assert needs_training(str(tmp_path / "absent"))
    assert not needs_training(tiny_trained)
    assert ensure_demo_model(tiny_trained) == tiny_trained  # cached: returns at once
    foreign = tmp_path / "someone-elses-model"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    assert not needs_training(str(foreign))  # never replaced
    old = tmp_path / "old-demo-model"
    old.mkdir()
    (old / "config.json").write_text("{}")
    (old / MARKER).write_text(json.dumps({"recipe_version": RECIPE_VERSION - 1}))
    assert needs_training(str(old))


@pytest.mark.timeout(60)
def test_demo_train_only_prints_the_cached_model(tiny_trained):
    result = subprocess.run(
        farmesh_command("demo", "--train-only", "--model-dir", tiny_trained), capture_output=True, timeout=50
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-3000:]
    assert result.stdout.decode().strip() == tiny_trained


@pytest.mark.timeout(240)
def test_demo_generates_through_two_far_nodes(tiny_trained):
    """``farmesh demo`` over a trained checkpoint: the default prompt, the greedy text, two nodes."""
    result = subprocess.run(
        farmesh_command("demo", "--model-dir", tiny_trained, "--max-tokens", "12"), capture_output=True, timeout=220
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-3000:]
    expected = hf_greedy_text(tiny_trained, "Once upon a time", 12)
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "Prompt: Once upon a time"
    assert lines[1] == "FarMesh: " + expected
    assert "through 2 Far Nodes" in lines[2]
