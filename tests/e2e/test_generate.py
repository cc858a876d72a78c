"""Generation and remote layers through a real mesh: a DHT and two Far Nodes (layers 0:4 and 4:8).

Every check compares against plain transformers on the same checkpoint: greedy tokens identical,
hidden states within 1e-5. Each test runs for multi-head attention and for grouped-query attention.
"""

import json
import os
import subprocess
import sys
import threading

import pytest
import torch

from farmesh import DistributedInferenceClient, DistributedModel
from farmesh_core import split_head
from farmesh_core.client.generation import TokenChooser
from farmesh_core.head_batch import HeadBatcher
from farmesh_core.split_head import SplitHead
from tests.helpers import (
    NUM_LAYERS,
    PROMPT,
    hf_greedy_ids,
    hf_greedy_text,
    hf_hidden_states,
    hf_model,
    hf_sampled_ids,
    hf_tokenizer,
    prompt_ids,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", params=["mha", "gqa"])
def mesh(request):
    return request.getfixturevalue({"mha": "llama_mesh", "gqa": "gqa_mesh"}[request.param])


@pytest.fixture(scope="module")
def client(mesh):
    with DistributedInferenceClient(mesh.model_dir, mesh.addrs) as client:
        yield client


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


# ---- text generation -----------------------------------------------------------------------------
def test_greedy_generate_equals_transformers(client, mesh):
    """64 greedy tokens through two nodes decode to exactly transformers' greedy text."""
    expected = hf_greedy_text(mesh.model_dir, PROMPT, 64)
    assert len(hf_greedy_ids(mesh.model_dir, PROMPT, 64)) == 64, "the reference should not stop early at EOS"
    assert client.generate(PROMPT, max_tokens=64) == expected


def test_a_nodes_torch_workers_keep_cpus_of_their_own_and_its_threads_are_free_between_steps(client, mesh):
    """After a generation, each node's OpenMP worker (its split one-token steps ran on 2 threads) is
    pinned away from one CPU, its lead's (see openmp.spread_team), and the node's own threads are
    free again: the lead of a team is pinned only while its step runs. The two nodes lead from
    different CPUs (home_cpu.py), so their workers are pinned apart too."""
    client.generate(PROMPT, max_tokens=8)
    cpus = os.sched_getaffinity(0)
    workers = []
    for node in mesh.nodes:
        masks = {int(tid): os.sched_getaffinity(int(tid)) for tid in os.listdir(f"/proc/{node.pid}/task")}
        assert masks[node.pid] == cpus
        pinned = [mask for mask in masks.values() if mask != cpus]
        if len(cpus) >= 2:
            assert pinned and all(0 < len(mask) < len(cpus) for mask in pinned), masks  # (see worker_cpus)
        else:
            assert not pinned
        workers.append(set().union(*pinned))
    if len(cpus) >= 2:
        assert workers[0] != workers[1]


def test_temperature_zero_is_greedy(client, mesh):
    """``temperature=0`` is greedy even when top_k and top_p are given."""
    assert client.generate(PROMPT, max_tokens=16, temperature=0, top_k=5, top_p=0.5) == hf_greedy_text(
        mesh.model_dir, PROMPT, 16
    )


def test_greedy_token_ids_equal_transformers(client, mesh):
    """``generate_ids`` yields transformers' greedy token ids, one tensor [batch] per step."""
    steps = list(client.generate_ids(prompt_ids(mesh.model_dir), 64))
    assert all(step.shape == (1,) for step in steps)
    assert torch.cat(steps).tolist() == list(hf_greedy_ids(mesh.model_dir, PROMPT, 64))


def test_stream_pieces_join_to_the_same_text(client, mesh):
    """``stream=True`` yields text pieces as tokens arrive; together they are the greedy text."""
    pieces = list(client.generate(PROMPT, max_tokens=64, stream=True))
    assert all(isinstance(piece, str) for piece in pieces)
    assert len([p for p in pieces if p]) > 10, "the text should arrive in many pieces, not at the end"
    assert "".join(pieces) == hf_greedy_text(mesh.model_dir, PROMPT, 64)


def test_text_ending_inside_a_character_is_not_cut(client, mesh):
    """When the last token stops inside a multi-byte UTF-8 character, the text still equals transformers'
    decoded text: what the stream held back waiting for the rest of the character is not lost."""
    ids, tokenizer = hf_greedy_ids(mesh.model_dir, PROMPT, 64), hf_tokenizer(mesh.model_dir)
    cuts = [n for n in range(1, 65) if tokenizer.decode(list(ids[:n]), skip_special_tokens=True).endswith("\ufffd")]
    assert cuts, "the reference text should stop inside a character somewhere in 64 tokens"
    expected = hf_greedy_text(mesh.model_dir, PROMPT, cuts[0])
    assert client.generate(PROMPT, max_tokens=cuts[0]) == expected
    assert "".join(client.generate(PROMPT, max_tokens=cuts[0], stream=True)) == expected


def test_each_prompt_of_a_batch_generates_like_transformers(client, mesh):
    """A batch of two equally long prompts runs in one session; each row is transformers' greedy output."""
    first, second = prompt_ids(mesh.model_dir, PROMPT), prompt_ids(mesh.model_dir, "The json module")
    assert first.shape == second.shape
    steps = list(client.generate_ids(torch.cat([first, second]), 24))
    got = torch.stack(steps, dim=1)
    assert got[0].tolist() == list(hf_greedy_ids(mesh.model_dir, PROMPT, 24))
    assert got[1].tolist() == list(hf_greedy_ids(mesh.model_dir, "The json module", 24))


def test_generation_goes_through_a_chain_of_two_nodes(client):
    """The session's route has one hop per node, covering layers 0:4 then 4:8."""
    with client.inference_session(max_length=8) as session:
        route = session.route
        assert [(hop.start, hop.end) for hop in route] == [(0, 4), (4, NUM_LAYERS)]
        assert route[0].peer_id != route[1].peer_id


def test_session_steps_equal_local_layers(client, mesh):
    """A session fed a prefill and then single tokens returns what the local layers return."""
    states = hf_hidden_states(mesh.model_dir, seed=3, batch=1, seq=6)
    final_norm = hf_model(mesh.model_dir).model.norm
    with client.inference_session(max_length=6) as session:
        outputs = [session.step(states[0][:, :4]), session.step(states[0][:, 4:5]), session.step(states[0][:, 5:6])]
    assert session.position == 6
    assert_close(final_norm(torch.cat(outputs, dim=1)), states[-1])


# ---- sampling ------------------------------------------------------------------------------------
def test_sampling_with_the_same_seed_repeats(client):
    """Sampling (temperature 0.8, top-k 50) with one seed gives the same, non-empty text twice."""
    first = client.generate(PROMPT, max_tokens=32, temperature=0.8, top_k=50, seed=1234)
    second = client.generate(PROMPT, max_tokens=32, temperature=0.8, top_k=50, seed=1234)
    assert first and first == second


def test_seeded_sampling_draws_what_transformers_draws(client, mesh):
    """With the same seed, the client samples exactly the tokens transformers' ``generate`` samples:
    the same logits processors (temperature, top-k, top-p) and the same draw."""
    sampling = dict(temperature=0.8, top_k=50, top_p=0.9)
    expected = hf_sampled_ids(mesh.model_dir, PROMPT, 32, seed=77, **sampling)
    assert expected != list(hf_greedy_ids(mesh.model_dir, PROMPT, 32))
    got = torch.cat(list(client.generate_ids(prompt_ids(mesh.model_dir), 32, seed=77, **sampling))).tolist()
    assert got == expected


def test_an_announced_call_that_runs_alone_ends_its_announcement(client, mesh):
    """A seeded sampled call never shares (its draws depend on the batch): once it is under way, no
    other call's window waits for it (see ``GenerationBatcher.announce``)."""
    with client.batcher.announce():
        assert client.batcher._arriving == 1
        tokens = client.generate_ids(prompt_ids(mesh.model_dir), 4, temperature=0.8, seed=3)
        next(tokens)
        assert client.batcher._arriving == 0
        tokens.close()


def test_sampling_with_another_seed_differs(client):
    """Another seed samples other tokens."""
    first = client.generate(PROMPT, max_tokens=32, temperature=0.8, top_k=50, seed=1)
    second = client.generate(PROMPT, max_tokens=32, temperature=0.8, top_k=50, seed=2)
    assert first != second


def test_sampling_differs_from_greedy(client, mesh):
    """A high temperature really samples: the text is not the greedy one."""
    sampled = client.generate(PROMPT, max_tokens=32, temperature=1.5, top_p=0.95, seed=5)
    assert sampled != hf_greedy_text(mesh.model_dir, PROMPT, 32)


# ---- remote layers -------------------------------------------------------------------------------
def test_distributed_model_forward_equals_local_layers(mesh):
    """``DistributedModel(model_id, dht_bootstrap)`` runs all 8 layers remotely like transformers does."""
    states = hf_hidden_states(mesh.model_dir)
    layers = DistributedModel(mesh.model_dir, mesh.addrs)
    try:
        assert len(layers) == NUM_LAYERS
        with torch.no_grad():
            out = layers(states[0])
        assert out.shape == (2, 16, 256)
        assert_close(hf_model(mesh.model_dir).model.norm(out), states[-1])
    finally:
        layers.close()


def test_first_node_slice_equals_local_layers(client, mesh):
    """``layers[0:4]`` is the first node's span: its output is transformers' input of layer 4."""
    states = hf_hidden_states(mesh.model_dir)
    with torch.no_grad():
        assert_close(client.layers[0:4](states[0]), states[4])


def test_slice_across_two_nodes(client, mesh):
    """``layers[2:6]`` runs layers 2-3 on one node and 4-5 on the other."""
    states = hf_hidden_states(mesh.model_dir)
    with torch.no_grad():
        assert_close(client.layers[2:6](states[2]), states[6])


def test_single_layer(client, mesh):
    """``layers[3]`` and ``layers[-1]`` are single remote layers."""
    states = hf_hidden_states(mesh.model_dir)
    assert len(client.layers[3]) == 1 and len(client.layers[2:6]) == 4
    with torch.no_grad():
        assert_close(client.layers[3](states[3]), states[4])
        last = client.layers[-1](states[NUM_LAYERS - 1])
    assert_close(hf_model(mesh.model_dir).model.norm(last), states[-1])


def test_slice_of_a_slice(client, mesh):
    """Indexing a slice counts from the slice's own start: ``layers[2:6][1:3]`` is layers 3:5."""
    states = hf_hidden_states(mesh.model_dir)
    with torch.no_grad():
        assert_close(client.layers[2:6][1:3](states[3]), states[5])


def test_bad_layer_indices_raise_index_error(client):
    """Out-of-range indices, empty and strided slices are refused like a Python sequence would."""
    for bad in (NUM_LAYERS, -NUM_LAYERS - 1, slice(4, 4), slice(0, 8, 2)):
        with pytest.raises(IndexError):
            client.layers[bad]


def test_gradient_through_remote_layers_equals_local(client, mesh):
    """Backward through ``layers[0:4]`` gives the input gradient that transformers' layers give."""
    x = hf_hidden_states(mesh.model_dir)[0].clone()
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))

    remote_x = x.clone().requires_grad_(True)
    (client.layers[0:4](remote_x) * weights).sum().backward()

    local_x = x.clone().requires_grad_(True)
    states = hf_model(mesh.model_dir).model(inputs_embeds=local_x, output_hidden_states=True).hidden_states
    (states[4] * weights).sum().backward()

    assert remote_x.grad is not None and remote_x.grad.abs().sum() > 0
    torch.testing.assert_close(remote_x.grad, local_x.grad, atol=1e-4, rtol=1e-4)


def run_client_script(source: str, mesh, tmp_path, timeout: float) -> tuple[str, dict]:
    """Run ``source`` as a script (model dir, DHT address, PROMPT as its arguments), which must exit
    with code 0; its stderr, and the JSON of its last line of output."""
    script = tmp_path / "client.py"
    script.write_text(source)
    args = [sys.executable, str(script), mesh.model_dir, mesh.addrs[0], PROMPT]
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr, json.loads(result.stdout.strip().splitlines()[-1])


UNCLOSED_CLIENTS = """
import json, sys
from farmesh import DistributedInferenceClient
from farmesh_core.client.causal_lm import DistributedModelForCausalLM

model_dir, addr, prompt = sys.argv[1:]
client = DistributedInferenceClient(model_dir, [addr])
model = DistributedModelForCausalLM.from_pretrained(model_dir, dht_bootstrap=[addr])
ids = client.tokenizer(prompt, return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=8, do_sample=False)
print(json.dumps({"client": client.generate(prompt, max_tokens=8), "model": out[0, ids.shape[1]:].tolist()}))
"""


def test_a_script_that_never_closes_its_clients_exits_cleanly(llama_mesh, tmp_path):
    """Clients left open, as Petals' users leave theirs, leave the mesh at exit: the script ends with
    exit code 0 and nothing on stderr about tasks destroyed while pending."""
    stderr, out = run_client_script(UNCLOSED_CLIENTS, llama_mesh, tmp_path, timeout=90)
    assert "Task was destroyed" not in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert out["client"] == hf_greedy_text(llama_mesh.model_dir, PROMPT, 8)
    assert out["model"] == list(hf_greedy_ids(llama_mesh.model_dir, PROMPT, 8))


FORKED_CHILD_EXITS = """
import json, os, sys, time
from farmesh import DistributedInferenceClient

model_dir, addr, prompt = sys.argv[1:]
client = DistributedInferenceClient(model_dir, [addr])
first = client.generate(prompt, max_tokens=4)
pid = os.fork()
if pid == 0:
    sys.exit(0)  # through the interpreter's exit, which runs the exit handlers
began = time.monotonic()
_, status = os.waitpid(pid, 0)
waited = time.monotonic() - began
time.sleep(0.5)  # a SIGTERM sent to the DHT peer by the child's exit takes effect
same = client.generate(prompt, max_tokens=4) == first
print(json.dumps({"same": same, "status": status, "waited": waited, "dht_alive": client.mesh.dht.is_alive()}))
"""


def test_a_forked_child_that_exits_leaves_its_parents_client_alone(llama_mesh, tmp_path):
    """A child forked from a process with a client exits without touching the parent's loop and DHT
    peer (it has copies of them, not their threads): it ends promptly and cleanly, the parent's DHT
    peer lives on (multiprocessing's exit handler in the child would have terminated it), the child
    reports nothing about the parent's pending tasks, and the parent goes on."""
    stderr, out = run_client_script(FORKED_CHILD_EXITS, llama_mesh, tmp_path, timeout=60)
    assert out["same"] and out["status"] == 0 and out["waited"] < 4, out
    assert out["dht_alive"], "the child's exit terminated the parent's DHT peer"
    assert "can only join a child process" not in stderr and "Task was destroyed" not in stderr, stderr[-3000:]


FORKED_CHILD_GENERATES = """
import json, os, sys
from farmesh import DistributedInferenceClient

model_dir, addr, prompt = sys.argv[1:]
client = DistributedInferenceClient(model_dir, [addr])
first = client.generate(prompt, max_tokens=4)
ids = client.tokenizer(prompt, return_tensors="pt").input_ids
session = client.inference_session(max_length=ids.shape[1] + 8)
session.step(client.head.embed(ids))  # a session open at the fork
read_end, write_end = os.pipe()
pid = os.fork()
if pid == 0:
    report = {}
    for name, use in (("generate", lambda: client.generate(prompt, max_tokens=4)),
                      ("open session", lambda: session.step(client.head.embed(ids[:, -1:])))):
        try:
            use()
            report[name] = {"error": None}
        except Exception as e:
            report[name] = {"error": type(e).__name__, "message": str(e)}
    session.close()  # as leaving a with block would: the parent's session stays open
    os.write(write_end, json.dumps(report).encode())
    os._exit(0)
os.close(write_end)
child = json.loads(os.read(read_end, 65536).decode())
os.waitpid(pid, 0)
after = session.step(client.head.embed(ids[:, -1:])).shape[1]  # the parent's session goes on
print(json.dumps({"child": child, "same": client.generate(prompt, max_tokens=4) == first, "after": after}))
"""


def test_a_forked_child_using_its_parents_client_gets_a_clear_error(llama_mesh, tmp_path):
    """A child cannot use a client its parent made (the client's loop thread and DHT peer stayed in
    the parent, and so did an open session's sockets): generating, or stepping a session opened
    before the fork, gets an error saying so at once, rather than hanging or sharing the parent's
    sockets; closing that session in the child leaves it open in the parent, which goes on."""
    _, out = run_client_script(FORKED_CHILD_GENERATES, llama_mesh, tmp_path, timeout=60)
    for use in ("generate", "open session"):
        assert out["child"][use]["error"] == "ForkedClientError", out
        assert "make a new client in this process" in out["child"][use]["message"]
    assert out["same"] and out["after"] == 1, out


def test_a_client_dropped_on_its_own_loop_thread_leaves_the_mesh(llama_mesh):
    """The garbage collector may finalize a dropped client on the client's event loop: leaving the
    mesh there must not wait on that loop (a deadlock), and still stop it and the client's DHT peer."""
    client = DistributedInferenceClient(llama_mesh.model_dir, llama_mesh.addrs)
    mesh = client.mesh
    assert client.generate(PROMPT, max_tokens=4) == hf_greedy_text(llama_mesh.model_dir, PROMPT, 4)

    async def finalize_here() -> None:
        mesh._leave()  # what the collector would call

    mesh.loop.run(finalize_here(), timeout=2)
    for thread in threading.enumerate():
        if thread.name == "farmesh-leave":
            thread.join(timeout=10)
    assert not mesh.loop._thread.is_alive() and not mesh.dht.is_alive()
    client.close()  # a no-op now


def test_greedy_and_sampled_tokens_equal_transformers_with_the_head_split(mesh, monkeypatch):
    """With the LM head over two threads (here forced for a small head), seeded sampled tokens are
    still transformers'; greedy ones too, chosen from the quick approximate logits where their bound
    allows (every token here, near ties scored again) and from exact ones where it does not (every
    token, with huge bounds)."""
    monkeypatch.setattr(split_head, "MIN_WEIGHT_BYTES", 0)
    outcomes = []
    certain = TokenChooser.certain
    monkeypatch.setattr(TokenChooser, "certain", lambda *a: outcomes.append(certain(*a)) or outcomes[-1])
    expected = list(hf_greedy_ids(mesh.model_dir, PROMPT, 32))
    with DistributedInferenceClient(mesh.model_dir, mesh.addrs, token_loop=False) as client:  # the client's head
        steps = list(client.generate_ids(prompt_ids(mesh.model_dir), 32))
        split = client.head._head_batcher.linear
        assert isinstance(split, SplitHead) and split.exact
        assert torch.cat(steps).tolist() == expected
        assert len(outcomes) == 32 and all(o is not None for o in outcomes)
        monkeypatch.setattr(HeadBatcher, "error_bound", lambda self, x: 1e9)
        never = lambda self, x, ids: (torch.zeros(len(ids), dtype=torch.float64), torch.full((len(ids),), 1e9))  # noqa: E731
        monkeypatch.setattr(HeadBatcher, "refine", never)
        outcomes.clear()
        assert torch.cat(list(client.generate_ids(prompt_ids(mesh.model_dir), 32))).tolist() == expected
        assert len(outcomes) == 32 and all(o is None for o in outcomes)
        sampling = dict(temperature=0.8, top_k=50, top_p=0.9)
        sampled = client.generate_ids(prompt_ids(mesh.model_dir), 16, seed=77, **sampling)
        assert torch.cat(list(sampled)).tolist() == hf_sampled_ids(mesh.model_dir, PROMPT, 16, seed=77, **sampling)
