"""LoRA adapters (farmesh-lora) through a real mesh: a DHT and two Far Nodes (layers 0:4 and 4:8),
both started with ``--adapters DIR_A DIR_B``, two LoRA checkpoints made with plain ``peft``.

Greedy generation with ``adapter="A"`` equals ``PeftModel`` with adapter A applied locally, token for
token (same for B); without an adapter the mesh is the base model. Adapters are named by their
directory's basename, and the nodes' DHT records list those names.
"""

import os

import pytest
import torch

from farmesh import DistributedInferenceClient, DistributedModelForCausalLM
from farmesh_core.checkpoint_maker import make_checkpoint
from farmesh_core.errors import NoRouteError, RequestError
from farmesh_core.launch import stop_process, wait_for_layers
from tests.helpers import PROMPT, hf_greedy_ids, prompt_ids
from tests.preloaded import spawn_dht, spawn_node

pytestmark = pytest.mark.timeout(300)

TOKENS = 32
ADAPTERS = {"A": 11, "B": 22}  # name (the directory's basename) -> seed of its random LoRA weights


def make_lora(model_dir: str, out_dir: str, seed: int) -> str:
    """A LoRA adapter with random (non-zero) weights on q_proj and v_proj, saved by plain peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(out_dir)
    return out_dir


def peft_greedy_ids(model_dir: str, adapter_dir: str, max_new_tokens: int = TOKENS) -> list[int]:
    """Greedy new token ids of the base model with the adapter applied locally by ``PeftModel``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    ids = prompt_ids(model_dir)
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


@pytest.fixture(scope="module")
def lora_mesh(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    model_dir = make_checkpoint(str(root / "model"), seed=0)
    adapter_dirs = {name: make_lora(model_dir, str(root / name), seed) for name, seed in ADAPTERS.items()}
    procs = []
    try:
        dht, addrs = spawn_dht()
        procs.append(dht)
        nodes = []
        for span in ("0:4", "4:8"):
            log = str(root / f"node-{span.replace(':', '_')}.log")
            nodes.append(
                spawn_node(model_dir, addrs, "--layers", span, "--adapters", *adapter_dirs.values(), log_path=log)
            )
            procs.append(nodes[-1])
        try:
            wait_for_layers(model_dir, addrs, num_nodes=2, timeout=120, procs=nodes)
        except Exception as e:
            logs = "\n".join(p.read_text()[-3000:] for p in root.glob("node-*.log"))
            raise RuntimeError(f"the mesh did not come up: {e}\n{logs}") from e
        yield model_dir, addrs, adapter_dirs
    finally:
        for proc in reversed(procs):  # nodes first, then the DHT; each by its PID
            stop_process(proc)


@pytest.fixture(scope="module")
def client(lora_mesh):
    model_dir, addrs, _ = lora_mesh
    with DistributedInferenceClient(model_dir, addrs) as client:
        yield client


@pytest.fixture(scope="module")
def expected(lora_mesh):
    """Local reference tokens: the base model (None) and each adapter applied with PeftModel."""
    model_dir, _, adapter_dirs = lora_mesh
    reference = {None: list(hf_greedy_ids(model_dir, PROMPT, TOKENS))}
    reference.update({name: peft_greedy_ids(model_dir, path) for name, path in adapter_dirs.items()})
    assert all(len(ids) == TOKENS for ids in reference.values()), "the references should not stop at EOS"
    assert len({tuple(ids) for ids in reference.values()}) == 3, "each adapter should change the greedy output"
    return reference


@pytest.mark.parametrize("adapter", ["A", "B", None])
def test_generate_with_adapter_equals_local_peft(client, lora_mesh, expected, adapter):
    """``generate_ids(..., adapter=name)`` equals local PeftModel with that adapter; None is the base model."""
    model_dir = lora_mesh[0]
    steps = client.generate_ids(prompt_ids(model_dir), TOKENS, adapter=adapter)
    assert torch.cat(list(steps)).tolist() == expected[adapter]


def test_text_generate_and_client_default_adapter(lora_mesh, expected, client):
    """``generate(text, adapter=...)`` and ``DistributedInferenceClient(..., adapter=...)`` pick it too."""
    model_dir, addrs, _ = lora_mesh
    text = client.tokenizer.decode(expected["B"], skip_special_tokens=True)
    assert client.generate(PROMPT, max_tokens=TOKENS, adapter="B") == text
    with DistributedInferenceClient(model_dir, addrs, adapter="A") as default_a:
        ids = torch.cat(list(default_a.generate_ids(prompt_ids(model_dir), TOKENS))).tolist()
    assert ids == expected["A"]


def test_causal_lm_with_adapter(lora_mesh, expected):
    """``DistributedModelForCausalLM(..., adapter="A").generate`` equals local PeftModel with A."""
    model_dir, addrs, _ = lora_mesh
    ids = prompt_ids(model_dir)
    with DistributedModelForCausalLM.from_pretrained(model_dir, dht_bootstrap=addrs, adapter="A") as model:
        out = model.generate(ids, max_new_tokens=TOKENS, do_sample=False)
    assert out[0, ids.shape[1] :].tolist() == expected["A"]


def test_interleaved_sessions_keep_their_adapters(client, lora_mesh, expected):
    """Steps of sessions with different adapters, alternating on the same nodes, stay separate."""
    model_dir = lora_mesh[0]
    runs = {name: client.generate_ids(prompt_ids(model_dir), TOKENS, adapter=name) for name in ("A", "B", None)}
    got = {name: [] for name in runs}
    for _ in range(TOKENS):
        for name, steps in runs.items():
            got[name].append(int(next(steps)))
    assert got == expected


def test_records_list_adapter_names(client):
    """Each node's DHT record lists its adapters by name (the directory's basename)."""
    records = client.mesh.records(refresh=True)
    assert len(records) == 2
    assert all(sorted(r.adapters) == ["A", "B"] for r in records)
    assert all(os.sep not in name for r in records for name in r.adapters)


def test_unknown_adapter_is_a_clear_error(client):
    """Asking for an adapter no node has fails with a NoRouteError that names it."""
    with pytest.raises(NoRouteError, match="'C'"):
        client.generate(PROMPT, max_tokens=4, adapter="C")


def test_node_refuses_an_adapter_it_does_not_have(client, lora_mesh, monkeypatch):
    """A client that skips the routing check still gets a refusal from the node naming the adapter."""
    route = client.mesh.route
    monkeypatch.setattr(client.mesh, "route", lambda start, end, avoid=frozenset(), adapter=None: route(start, end))
    with pytest.raises(RequestError, match=r"adapter 'C' is not loaded on this node \(has: \['A', 'B'\]\)"):
        client.generate(PROMPT, max_tokens=4, adapter="C")
