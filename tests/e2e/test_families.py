"""Every architecture family through a real mesh: a DHT and two Far Nodes (layers 0:4 and 4:8).

Each family (Mistral, Mixtral, Falcon with the new decoder architecture, multi-query Falcon, Bloom)
gets a tiny seeded checkpoint from the maker and its own mesh of real processes, compared with plain
transformers on the same checkpoint: greedy tokens identical (concurrent sessions too), hidden states
within 1e-5. Variants that need no mesh to show their difference (alibi Falcon, Mistral past its
sliding window) are checked on local layers. A model type without an adapter names the package to install.
"""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from farmesh_core.architecture import adapter_for
from farmesh_core.checkpoint import Checkpoint
from farmesh_core.checkpoint_maker import make_checkpoint
from farmesh_core.client import DistributedInferenceClient
from farmesh_core.client.causal_lm import DistributedModelForCausalLM
from farmesh_core.errors import UnsupportedArchitectureError
from farmesh_core.launch import stop_process, wait_for_layers
from farmesh_core.node.kv_cache import SessionCache
from farmesh_core.node.layer_span import LayerSpan
from tests.preloaded import spawn_dht, spawn_node

pytestmark = pytest.mark.timeout(300)

NUM_LAYERS, NEW_TOKENS = 8, 48
PROMPT, SECOND_PROMPT = "The logging module", " Return a new dictionary"
FAMILIES = {
    "mistral": ("mistral", {}),
    "mixtral": ("mixtral", {}),
    "falcon-new": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),
    "falcon-multi-query": ("falcon", {"multi_query": True, "new_decoder_architecture": False}),
    "bloom": ("bloom", {}),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def hf_greedy(model, input_ids: torch.Tensor, new_tokens: int) -> list[int]:
    """Transformers' greedy continuation, exactly ``new_tokens`` long (EOS held back until then)."""
    with torch.no_grad():
        out = model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return out[0, input_ids.shape[1] :].tolist()


class Family:
    """One family's checkpoint, its plain-transformers reference and a client of its mesh."""

    def __init__(self, model_dir: str, addrs: list[str]):
        self.model_dir, self.addrs = model_dir, addrs
        self.hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.client = DistributedInferenceClient(model_dir, addrs)
        self.prompt = self.client.tokenizer(PROMPT, return_tensors="pt").input_ids

    def generate(self, input_ids: torch.Tensor, new_tokens: int, **options) -> list[int]:
        steps = self.client.generate_ids(input_ids, new_tokens, min_new_tokens=new_tokens, **options)
        return torch.cat(list(steps)).tolist()

    def hf_states(self, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Each decoder layer's input in transformers for a random batch; ``states[0]`` feeds layer 0."""
        ids = torch.randint(3, self.hf.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            return self.hf.base_model(input_ids=ids, output_hidden_states=True).hidden_states


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """A tiny checkpoint of the family, a DHT and two Far Node processes; all stopped by PID after."""
    model_type, overrides = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model_dir = make_checkpoint(str(root / "model"), model_type, **overrides)
    procs = []
    try:
        dht, addrs = spawn_dht()
        procs.append(dht)
        for span in ("0:4", "4:8"):
            log = str(root / f"node-{span.replace(':', '_')}.log")
            procs.append(spawn_node(model_dir, addrs, "--layers", span, log_path=log))
        wait_for_layers(model_dir, addrs, num_nodes=2, procs=procs[1:])
        family = Family(model_dir, addrs)
        try:
            yield family
        finally:
            family.client.close()
    finally:
        for proc in reversed(procs):
            stop_process(proc)


def test_greedy_generation_equals_transformers(family):
    """48 greedy tokens through two nodes are transformers' greedy tokens, one for one."""
    expected = hf_greedy(family.hf, family.prompt, NEW_TOKENS)
    assert len(set(expected)) > 8, "a reference that repeats a few tokens would prove little"
    assert family.generate(family.prompt, NEW_TOKENS) == expected


def test_first_node_forward_equals_local_layers(family):
    """``layers[0:4]`` returns what transformers' first four layers make of the same input."""
    states = family.hf_states()
    with torch.no_grad():
        assert_close(family.client.layers[0:4](states[0]), states[4])


def test_session_continued_with_a_second_prompt_equals_transformers(family):
    """A session that generates, then takes a second prompt and generates on, matches transformers
    run on everything the session has seen."""
    second = family.client.tokenizer(SECOND_PROMPT, add_special_tokens=False, return_tensors="pt").input_ids
    with family.client.inference_session(max_length=family.prompt.shape[1] + second.shape[1] + 2 * 16) as session:
        first_tokens = family.generate(family.prompt, 16, session=session)
        seen = torch.cat([family.prompt, torch.tensor([first_tokens])], dim=1)
        pending = seen[:, session.position :]  # the last token chosen may not have been fed yet
        second_tokens = family.generate(torch.cat([pending, second], dim=1), 16, session=session)
    assert first_tokens == hf_greedy(family.hf, family.prompt, 16)
    assert second_tokens == hf_greedy(family.hf, torch.cat([seen, second], dim=1), 16)


def test_concurrent_sessions_each_equal_transformers(family):
    """Three sessions at once: the nodes batch their one-token steps (each family's
    ``prepare_decode_batch``), and each session still gets transformers' greedy tokens."""
    texts = [PROMPT, SECOND_PROMPT, " A wrapper around the file object"]
    prompts = [family.client.tokenizer(text, return_tensors="pt").input_ids for text in texts]
    expected = [hf_greedy(family.hf, prompt, 24) for prompt in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(lambda prompt: family.generate(prompt, 24), prompts)) == expected


def test_generations_started_together_share_a_session_and_equal_transformers(family):
    """Prompts of one length started together run as the rows of one session (a batch through each
    family's layers on the nodes), and each row gets transformers' greedy tokens."""
    vocab = family.hf.config.vocab_size
    prompts = [torch.randint(3, vocab, (1, 10), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    expected = [hf_greedy(family.hf, prompt, 24) for prompt in prompts]
    with DistributedInferenceClient(family.model_dir, family.addrs, batch_window_ms=100) as client:

        def generate(prompt: torch.Tensor) -> list[int]:
            return [int(t[0]) for t in client.generate_ids(prompt, 24, min_new_tokens=24)]

        with ThreadPoolExecutor(len(prompts)) as pool:
            assert list(pool.map(generate, prompts)) == expected
        assert client.batcher.batched_rows >= 2 and client.batcher.unstarted == 0  # (the first may run alone)


def test_transformers_generate_in_threads_equals_transformers(family):
    """The Petals-compatible model (transformers' ``generate``, FarMesh's lean greedy loop) in two
    threads at once, each in its own session: transformers' greedy tokens, also where EOS may stop."""
    texts = [PROMPT, SECOND_PROMPT]
    prompts = [family.client.tokenizer(text, return_tensors="pt").input_ids for text in texts]
    options = [dict(max_new_tokens=24, min_new_tokens=24), dict(max_new_tokens=24)]
    with DistributedModelForCausalLM.from_pretrained(family.model_dir, dht_bootstrap=family.addrs) as model:

        def generate(prompt: torch.Tensor, **kwargs) -> torch.Tensor:
            with torch.inference_mode(), model.inference_session(max_length=prompt.shape[1] + 24):
                return model.generate(prompt, do_sample=False, **kwargs)

        with ThreadPoolExecutor(len(prompts)) as pool:
            for kwargs in options:
                outputs = list(pool.map(lambda prompt, kwargs=kwargs: generate(prompt, **kwargs), prompts))
                for prompt, output in zip(prompts, outputs, strict=True):
                    with torch.no_grad():
                        assert torch.equal(output, family.hf.generate(prompt, do_sample=False, **kwargs)), kwargs


# ---- variants checked on local layers (no mesh needed) --------------------------------------------
@pytest.mark.parametrize(
    "model_type, overrides",
    [("falcon", {"alibi": True}), ("mistral", {"sliding_window": 12})],
    ids=["falcon-alibi", "mistral-sliding-window-12"],
)
def test_local_layers_generate_like_transformers(tmp_path, model_type, overrides):
    """Alibi Falcon, and Mistral on a prompt longer than its window: a span of all layers plus the
    client head, stepped with a session cache, gives transformers' greedy tokens."""
    model_dir = make_checkpoint(str(tmp_path / "model"), model_type, **overrides)
    checkpoint = Checkpoint(model_dir)
    adapter = adapter_for(checkpoint.config)
    span = LayerSpan(checkpoint, adapter, 0, NUM_LAYERS, torch.float32, "cpu")
    head = adapter.load_client_head(checkpoint, checkpoint.config, torch.float32)
    prompt = torch.randint(3, 1024, (1, 20), generator=torch.Generator().manual_seed(1))
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = hf_greedy(hf, prompt, 32)

    cache, tokens, new_input = SessionCache(max_length=52), [], prompt
    with torch.no_grad():
        for _ in range(len(expected)):
            hidden = span.forward(head.embed(new_input), 0, NUM_LAYERS, cache, cache.length)
            logits = head.logits(hidden[:, -1])
            logits[:, hf.config.eos_token_id] = -torch.inf  # as min_new_tokens does in the reference
            tokens.append(int(logits.argmax(-1)))
            new_input = torch.tensor([[tokens[-1]]])
    assert tokens == expected


# ---- a model type without an adapter ---------------------------------------------------------------
def test_model_type_without_adapter_names_the_package(tmp_path):
    """A checkpoint whose ``model_type`` no installed adapter serves is refused with the pip command."""
    AutoConfig.for_model("gpt2", n_layer=2, n_embd=64, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="pip install farmesh-gpt2"):
        DistributedInferenceClient(str(tmp_path), [])
