"""DistributedModelForCausalLM against plain transformers, over a real DHT and two real Far Nodes."""

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationMixin, StoppingCriteria, StoppingCriteriaList

from farmesh_core import split_head
from farmesh_core.checkpoint_maker import make_checkpoint
from farmesh_core.client.causal_lm import DistributedModelForCausalLM
from farmesh_core.client.generation import NoEosBefore
from farmesh_core.client.session import InferenceSession
from farmesh_core.launch import spawn_dht, spawn_node, stop_process, wait_for_layers

PROMPT = [1, 57, 300, 12, 801, 44, 9]
masked = NoEosBefore.__call__


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    """A tiny 8-layer Llama served as 0:4 and 4:8 by two node processes; stopped by PID afterwards."""
    root = tmp_path_factory.mktemp("causal_lm")
    model_dir = make_checkpoint(str(root / "tiny-llama"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    try:
        dht, bootstrap = spawn_dht(env=env)
        procs.append(dht)
        for layers in ("0:4", "4:8"):
            log = str(root / f"node-{layers.replace(':', '-')}.log")
            procs.append(spawn_node(model_dir, bootstrap, "--layers", layers, log_path=log, env=env))
        wait_for_layers(model_dir, bootstrap, num_nodes=2, procs=procs[1:])
        yield model_dir, bootstrap
    finally:
        for proc in reversed(procs):
            stop_process(proc)


@pytest.fixture(scope="module")
def reference(mesh):
    return AutoModelForCausalLM.from_pretrained(mesh[0], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model(mesh):
    model_dir, bootstrap = mesh
    with DistributedModelForCausalLM.from_pretrained(model_dir, dht_bootstrap=bootstrap) as model:
        yield model


@pytest.fixture(scope="module")
def chooser(mesh):
    """A model whose client chooses every token itself (no token loop through the nodes)."""
    model_dir, bootstrap = mesh
    with DistributedModelForCausalLM.from_pretrained(model_dir, dht_bootstrap=bootstrap, token_loop=False) as model:
        yield model


@pytest.fixture(scope="module")
def looping(mesh):
    """A model whose greedy generations loop through the nodes (as by default)."""
    model_dir, bootstrap = mesh
    with DistributedModelForCausalLM.from_pretrained(model_dir, dht_bootstrap=bootstrap, token_loop=True) as model:
        yield model


def hf_greedy(reference, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return reference.generate(input_ids, max_new_tokens=new_tokens, do_sample=False)


@pytest.mark.timeout(300)
def test_greedy_generate_matches_transformers(model, reference):
    input_ids = torch.tensor([PROMPT])
    expected = hf_greedy(reference, input_ids, 32)
    assert expected.shape[1] == len(PROMPT) + 32
    assert torch.equal(model.generate(input_ids, max_new_tokens=32, do_sample=False), expected)
    assert model.config.model_type == "llama" and len(model.layers) == 8


@pytest.mark.timeout(300)
def test_session_continues_across_generate_calls(model, reference):
    input_ids = torch.tensor([PROMPT])
    expected = hf_greedy(reference, input_ids, 32)
    with model.inference_session(max_length=len(PROMPT) + 32) as session:
        first = model.generate(input_ids, max_new_tokens=16, do_sample=False)
        assert torch.equal(first, expected[:, : len(PROMPT) + 16])
        full = model.generate(first, max_new_tokens=16, do_sample=False)  # the full ids: only the suffix is sent
        assert session.position == len(PROMPT) + 31
    assert torch.equal(full, expected)

    with model.inference_session(max_length=len(PROMPT) + 32):  # Petals style: only the new ids (none here)
        first = model.generate(input_ids, max_new_tokens=16, do_sample=False)
        rest = model.generate(input_ids[:, :0], max_new_tokens=16, do_sample=False)
    assert torch.equal(torch.cat([first, rest], dim=1), expected)


@pytest.mark.timeout(300)
def test_threads_share_one_model_each_in_its_own_session(model, reference):
    """As Petals' concurrency benchmark runs it: threads of one process share the model, each generating
    in its own ``inference_session``, all open at once; each thread's tokens are transformers'."""
    prompts = [torch.tensor([PROMPT[: 3 + i] + PROMPT[: 5 - i]]) for i in range(4)]
    all_open = threading.Barrier(len(prompts), timeout=60)

    def generate(input_ids: torch.Tensor) -> torch.Tensor:
        with model.inference_session(max_length=input_ids.shape[1] + 16) as session:
            all_open.wait()
            with pytest.raises(RuntimeError, match="already open"):  # one session per thread
                model.inference_session(max_length=8).__enter__()
            first = model.generate(input_ids, max_new_tokens=8, do_sample=False)
            rest = model.generate(input_ids[:, :0], max_new_tokens=8, do_sample=False)  # continues this thread's
            assert session.position == input_ids.shape[1] + 15
        return torch.cat([first, rest], dim=1)

    with ThreadPoolExecutor(len(prompts)) as pool:
        outputs = list(pool.map(generate, prompts))
    for input_ids, output in zip(prompts, outputs, strict=True):
        assert torch.equal(output, hf_greedy(reference, input_ids, 16))


@pytest.mark.timeout(300)
def test_threads_generating_together_share_a_session_and_continue_their_own(mesh, reference):
    """Plain greedy calls that start together on fresh sessions run as the rows of one shared session
    (as ``generate_ids``' do); each thread's own session is owed its tokens and continues from them,
    and every thread gets transformers' tokens."""
    model_dir, bootstrap = mesh
    prompts = [torch.tensor([PROMPT[i:] + PROMPT[:i]]) for i in range(4)]
    all_open = threading.Barrier(len(prompts) + 2, timeout=60)

    def from_embeddings(model: DistributedModelForCausalLM) -> torch.Tensor:  # never shares: its ids are unknown
        embeds = model.get_input_embeddings()(torch.tensor([PROMPT]))
        with model.inference_session(max_length=len(PROMPT) + 8):
            all_open.wait()
            return model.generate(inputs_embeds=embeds, max_new_tokens=8, do_sample=False)

    def generate(model: DistributedModelForCausalLM, input_ids: torch.Tensor) -> torch.Tensor:
        with model.inference_session(max_length=input_ids.shape[1] + 16) as session:
            all_open.wait()
            first = model.generate(input_ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
            assert session.position == input_ids.shape[1] + 7
            rest = model.generate(input_ids[:, :0], max_new_tokens=8, do_sample=False)  # sends the owed ids
            assert session.position == input_ids.shape[1] + 15
        return torch.cat([first, rest], dim=1)

    with DistributedModelForCausalLM.from_pretrained(model_dir, dht_bootstrap=bootstrap, batch_window_ms=100) as model:
        with ThreadPoolExecutor(len(prompts) + 2) as pool:
            embedded = [pool.submit(from_embeddings, model) for _ in range(2)]
            outputs = list(pool.map(lambda ids: generate(model, ids), prompts))
        assert model.batcher.batches >= 1 and model.batcher.batched_rows >= 2  # the first call may run alone
        assert model.batcher.unstarted == 0
    for input_ids, output in zip(prompts, outputs, strict=True):
        assert torch.equal(output, hf_greedy(reference, input_ids, 16))
    for future in embedded:
        assert torch.equal(future.result(), hf_greedy(reference, torch.tensor([PROMPT]), 8)[:, len(PROMPT) :])


@pytest.mark.timeout(300)
def test_an_inference_session_is_announced_until_it_steps_or_closes(model):
    """A fresh one-row session announces a call that may share (other threads' windows wait for it);
    its first step, made through the model or directly, ends that, and so does closing it."""
    assert model.batcher._arriving == 0
    with model.inference_session(max_length=8) as session:
        assert model.batcher._arriving == 1
        session.step(model.get_input_embeddings()(torch.tensor([PROMPT[:3]])))  # directly, not via the model
        assert model.batcher._arriving == 0
    with model.inference_session(max_length=8):
        assert model.batcher._arriving == 1
    assert model.batcher._arriving == 0
    with model.inference_session(max_length=8, batch_size=2):  # rows of its own: it never shares
        assert model.batcher._arriving == 0


class _Recorder:
    """A streamer that keeps what transformers hands it."""

    def __init__(self):
        self.puts: list[list[int]] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.reshape(-1).tolist())

    def end(self) -> None:
        self.ended = True


class _StopAtLength(StoppingCriteria):
    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


@pytest.mark.timeout(300)
def test_plain_greedy_generate_takes_the_lean_loop_with_transformers_streams_and_stops(model, reference, monkeypatch):
    """A plain greedy call on one sequence runs FarMesh's lean decoding loop, not transformers' own,
    and gives what transformers gives: tokens, the streamer's calls, its minimum and maximum lengths,
    EOS and other stopping criteria."""
    ran_transformers_loop = []
    sample = GenerationMixin._sample
    monkeypatch.setattr(
        GenerationMixin, "_sample", lambda self, *a, **k: ran_transformers_loop.append(self) or sample(self, *a, **k)
    )
    input_ids = torch.tensor([PROMPT])
    eos = int(hf_greedy(reference, input_ids, 6)[0, -1])
    calls = [
        dict(max_new_tokens=20, min_new_tokens=20),
        dict(max_new_tokens=20, eos_token_id=eos, pad_token_id=0),  # stops at EOS
        dict(max_new_tokens=20, min_new_tokens=10, eos_token_id=eos, pad_token_id=0),
        dict(max_new_tokens=20, stopping_criteria=StoppingCriteriaList([_StopAtLength(len(PROMPT) + 4)])),
    ]
    for options in calls:
        streamed = []
        for lm in (model, reference):
            streamer = _Recorder()
            out = lm.generate(input_ids, streamer=streamer, do_sample=False, **options)
            streamed.append((out, streamer.puts, streamer.ended))
        assert torch.equal(streamed[0][0], streamed[1][0]), options
        assert streamed[0][1:] == streamed[1][1:], options
        assert not any(lm is model for lm in ran_transformers_loop), options
    lengths = [len(PROMPT) + 20, len(PROMPT) + 6, len(PROMPT) + 20, len(PROMPT) + 4]
    assert [len(model.generate(input_ids, do_sample=False, **o)[0]) for o in calls] == lengths
    penalised = model.generate(input_ids, max_new_tokens=4, do_sample=False, repetition_penalty=1.3)
    assert any(lm is model for lm in ran_transformers_loop)  # a processor that rescales: transformers' loop
    assert torch.equal(
        penalised, reference.generate(input_ids, max_new_tokens=4, do_sample=False, repetition_penalty=1.3)
    )


@pytest.mark.timeout(300)
def test_plain_greedy_generate_goes_round_the_nodes_in_a_token_loop(looping, chooser, reference):
    """After transformers' own first step, the node with the last layer chooses the tokens (see
    test_token_loop.py); a model with token loops off chooses every one itself. Both give transformers'
    tokens, and a second call in the session goes on from the first's."""
    input_ids = torch.tensor([PROMPT])
    greedy = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    expected = reference.generate(input_ids, **greedy)
    for lm, looped in ((looping, 19), (chooser, 0)):
        with lm.inference_session(max_length=len(PROMPT) + 40) as session:
            first = lm.generate(input_ids, **greedy)
            assert torch.equal(first, expected)
            assert session.looped_tokens == looped
            more = lm.generate(first, **greedy)
        assert torch.equal(more, reference.generate(first, **greedy))


@pytest.mark.timeout(300)
def test_seeded_sampling_matches_transformers(model, reference):
    input_ids = torch.tensor([PROMPT])
    options = dict(max_new_tokens=16, do_sample=True, temperature=0.7, top_k=50, top_p=0.9)
    outputs = []
    for lm in (model, reference):
        torch.manual_seed(0)
        outputs.append(lm.generate(input_ids, **options))
    assert outputs[0].shape == (1, len(PROMPT) + 16)
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.timeout(300)
def test_backward_through_forward_matches_transformers(model, reference):
    input_ids = torch.tensor([PROMPT])
    grads = []
    for lm, embed in ((model, model.get_input_embeddings()), (reference, reference.get_input_embeddings())):
        embeds = embed(input_ids).detach().requires_grad_()
        out = lm(inputs_embeds=embeds, labels=input_ids)
        out.loss.backward()
        grads.append(embeds.grad)
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=0)


@pytest.mark.timeout(300)
def test_plain_greedy_generate_takes_quick_logits_and_stays_exact(mesh, reference, monkeypatch):
    """Petals-style greedy generate with a large head (forced here for a small one) chooses from the
    quick approximate logits where their bound allows, and its tokens are still transformers'."""
    monkeypatch.setattr(split_head, "MIN_WEIGHT_BYTES", 0)
    model_dir, bootstrap = mesh
    input_ids = torch.tensor([PROMPT])
    greedy = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    penalised = dict(max_new_tokens=8, do_sample=False, repetition_penalty=1.3)
    with DistributedModelForCausalLM.from_pretrained(model_dir, dht_bootstrap=bootstrap, token_loop=False) as model:
        with model.inference_session(max_length=len(PROMPT) + 24):
            assert torch.equal(model.generate(input_ids, **greedy), reference.generate(input_ids, **greedy))
        assert model.quick_logits > 12  # of 24 steps (a step whose bound could change its choice is exact)
        quick = model.quick_logits
        assert torch.equal(model.generate(input_ids, **penalised), reference.generate(input_ids, **penalised))
        assert model.quick_logits == quick  # a processor that rescales scores: exact logits only


@pytest.mark.timeout(300)
def test_minimum_lengths_hold_back_eos_as_transformers_does(looping, chooser, reference, monkeypatch):
    """``min_new_tokens`` and ``min_length`` mask EOS through FarMesh's ``NoEosBefore`` (no vocabulary
    mask per step) with transformers' tokens, in the client and in a token loop on the nodes. EOS is
    made a token the greedy continuation reaches at its 5th step, so the masks change the output."""
    calls = []
    monkeypatch.setattr(NoEosBefore, "__call__", lambda self, ids, scores: calls.append(1) or masked(self, ids, scores))
    input_ids = torch.tensor([PROMPT])
    eos = int(hf_greedy(reference, input_ids, 5)[0, -1])
    unmasked = dict(max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=0)
    stopped = looping.generate(input_ids, **unmasked)
    assert stopped.shape[1] <= len(PROMPT) + 5 and int(stopped[0, -1]) == eos
    for minimum in ({"min_new_tokens": 12}, {"min_length": len(PROMPT) + 12}):
        calls.clear()
        out = chooser.generate(input_ids, **unmasked, **minimum)
        assert torch.equal(out, reference.generate(input_ids, **unmasked, **minimum))
        assert out.shape[1] >= len(PROMPT) + 12 and len(calls) >= 12
        assert torch.equal(looping.generate(input_ids, **unmasked, **minimum), out)  # masked on the last node


# ---- assisted decoding: a step checks several drafted tokens, the session rewinds past rejected ones ----
REPEATING = [5, 6, 7, 8, 9, 10, 11, 12] * 4  # prompt lookup drafts from it (the model continues otherwise)


@pytest.fixture
def session_calls(monkeypatch) -> list[tuple[str, int]]:
    """("step", tokens sent) and ("rewind", tokens dropped) for every session (spies on the real methods)."""
    calls = []
    step, rewind = InferenceSession.step, InferenceSession.rewind

    def stepped(session, hidden):
        calls.append(("step", hidden.shape[1]))
        return step(session, hidden)

    def rewound(session, position):
        calls.append(("rewind", session.position - position))
        rewind(session, position)

    monkeypatch.setattr(InferenceSession, "step", stepped)
    monkeypatch.setattr(InferenceSession, "rewind", rewound)
    return calls


@pytest.mark.timeout(300)
def test_prompt_lookup_generates_what_transformers_does(model, reference, session_calls):
    """transformers' prompt lookup through the mesh: each step sends the drafted tokens at once, and the
    session rewinds past those the model rejects (``RemoteCache.crop``); the tokens are transformers'."""
    input_ids = torch.tensor([REPEATING])
    options = dict(max_new_tokens=24, do_sample=False, prompt_lookup_num_tokens=4)
    assert torch.equal(model.generate(input_ids, **options), reference.generate(input_ids, **options))
    assert sum(n for call, n in session_calls if call == "rewind") > 0  # drafts were sent, and rejected


@pytest.mark.timeout(300)
@pytest.mark.parametrize("client", ["chooser", "looping"], ids=["relayed", "pushed-and-looping"])
def test_rejected_drafts_leave_nothing_behind_in_a_longer_session(client, reference, session_calls, request):
    """In a session with room to spare, drafts the model rejected would stay in the nodes' caches and
    change every later token: the session continues as transformers' greedy generation does, also
    where each node pushes its output to the next and the greedy continuation loops through them."""
    model = request.getfixturevalue(client)
    input_ids = torch.tensor([REPEATING])
    options = dict(max_new_tokens=16, do_sample=False, prompt_lookup_num_tokens=4)
    with model.inference_session(max_length=len(REPEATING) + 64) as session:
        first = model.generate(input_ids, **options)
        assert session.position == first.shape[1] - 1  # all but the last token, which is sent next
        full = model.generate(first, max_new_tokens=16, do_sample=False)
    assert (session.pushed_inputs > 0) == (client == "looping")
    assert sum(n for call, n in session_calls if call == "rewind") > 0
    assert torch.equal(first, reference.generate(input_ids, **options))
    assert torch.equal(full, hf_greedy(reference, first, 16))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("weights", ["same", "other"])
def test_an_assistant_models_drafts_give_transformers_tokens(model, reference, mesh, weights, tmp_path, session_calls):
    """Speculative decoding with a small local model drafting: with the served model's own weights
    every draft holds and a step yields several tokens; with other weights most are rejected. Either
    way the tokens are those of transformers' assisted generation with the same assistant."""
    assistant_dir = mesh[0] if weights == "same" else make_checkpoint(str(tmp_path / "assistant"), seed=7)
    assistant = AutoModelForCausalLM.from_pretrained(assistant_dir, dtype=torch.float32).eval()
    drafts = assistant.generation_config  # 4 drafts a step, however unsure the (random) assistant is
    drafts.num_assistant_tokens, drafts.num_assistant_tokens_schedule = 4, "constant"
    drafts.assistant_confidence_threshold = 0.0
    input_ids = torch.tensor([PROMPT])
    options = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, assistant_model=assistant)
    out = model.generate(input_ids, **options)
    assert torch.equal(out, reference.generate(input_ids, **options))
    steps = [n for call, n in session_calls if call == "step"]
    dropped = sum(n for call, n in session_calls if call == "rewind")
    if weights == "same":
        assert len(steps) <= 24 / 4 and dropped == 0
    else:
        assert dropped > 0
