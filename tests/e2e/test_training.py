"""Training through the mesh: a DHT and two Far Nodes (layers 0:4 and 4:8) as real processes.

Gradients through ``client.layers`` (backward RPC on the nodes) equal plain transformers' within 1e-4,
for the inputs and for local trainable prompt embeddings; the prompt-tuning example makes the loss go
down; and no client ever changes a node's weights.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from farmesh import DistributedInferenceClient
from tests.helpers import hf_model

pytestmark = pytest.mark.timeout(300)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "prompt_tuning.py"
GRAD_TOL = dict(atol=1e-4, rtol=1e-4)


def load_example():
    spec = importlib.util.spec_from_file_location("farmesh_prompt_tuning_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def client(llama_mesh):
    with DistributedInferenceClient(llama_mesh.model_dir, llama_mesh.addrs) as client:
        yield client


def hf_layers(model_dir: str, hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """transformers' decoder layers ``start:end`` run one by one, with rotary position embeddings."""
    hf = hf_model(model_dir)
    position_ids = torch.arange(hidden.shape[1])[None].expand(hidden.shape[0], -1)
    emb = hf.model.rotary_emb(hidden, position_ids)
    for layer in hf.model.layers[start:end]:
        out = layer(hidden, position_ids=position_ids, position_embeddings=emb)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def inputs(hidden_size: int, num_prompt_tokens: int = 3, batch: int = 2, seq: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.nn.Parameter(0.1 * torch.randn(1, num_prompt_tokens, hidden_size, generator=g))
    x = (0.1 * torch.randn(batch, seq, hidden_size, generator=g)).requires_grad_()
    return prompt, x


def with_prompt(prompt: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([prompt.expand(x.shape[0], -1, -1), x], dim=1)


# ---- gradients equal transformers' ----------------------------------------------------------------
@pytest.mark.parametrize(
    "span, seq", [((0, 8), 10), ((2, 6), 10), ((0, 8), 100)],
    ids=["all-layers", "across-the-node-boundary", "messages-over-64-KiB"],
)  # fmt: skip
def test_layer_gradients_equal_transformers(client, llama_mesh, span, seq):
    """d loss / d inputs and d loss / d prompt through remote layers equal those through transformers'
    decoder layers run locally (layers 2:6 span both nodes). With 100 tokens each message carries
    over 200 KB, which both ends read in place (``TensorMessage``)."""
    start, end = span
    hidden_size = hf_model(llama_mesh.model_dir).config.hidden_size
    prompt, x = inputs(hidden_size, seq=seq)
    weights = torch.randn(2, 3 + seq, hidden_size, generator=torch.Generator().manual_seed(7))

    remote_out = client.layers[start:end](with_prompt(prompt, x))
    remote_grads = torch.autograd.grad((remote_out * weights).sum(), [x, prompt])
    local_out = hf_layers(llama_mesh.model_dir, with_prompt(prompt, x), start, end)
    local_grads = torch.autograd.grad((local_out * weights).sum(), [x, prompt])

    torch.testing.assert_close(remote_out, local_out, atol=1e-5, rtol=1e-5)
    for remote, local in zip(remote_grads, local_grads, strict=True):
        assert remote.abs().max() > 0
        torch.testing.assert_close(remote, local, **GRAD_TOL)


def test_language_model_loss_gradients_equal_transformers(client, llama_mesh):
    """A next-token cross-entropy over local head + remote layers has the same gradients w.r.t. the
    input embeddings and the prompt as transformers' whole model fed ``inputs_embeds``."""
    hf = hf_model(llama_mesh.model_dir)
    prompt, x = inputs(hf.config.hidden_size)
    targets = torch.randint(0, hf.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(3))

    def loss_of(logits):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    remote_loss = loss_of(client.head.logits(client.layers(with_prompt(prompt, x))))
    remote_grads = torch.autograd.grad(remote_loss, [x, prompt])
    local_loss = loss_of(hf(inputs_embeds=with_prompt(prompt, x)).logits)
    local_grads = torch.autograd.grad(local_loss, [x, prompt])

    torch.testing.assert_close(remote_loss, local_loss, atol=1e-5, rtol=1e-5)
    for remote, local in zip(remote_grads, local_grads, strict=True):
        assert remote.abs().max() > 0
        torch.testing.assert_close(remote, local, **GRAD_TOL)


# ---- prompt tuning (the example's own loop) and node weights ---------------------------------------
def test_prompt_tuning_lowers_the_loss_and_leaves_node_weights_alone(llama_mesh):
    """A few steps of the example's ``tune_prompt`` make the loss go down, and a remote forward of a
    fixed input gives identical outputs before and after (equal to transformers' layers)."""
    example = load_example()
    with DistributedInferenceClient(llama_mesh.model_dir, llama_mesh.addrs) as client:
        before = example.remote_fingerprint(client)
        losses = example.tune_prompt(client, steps=8, log=None)
        after = example.remote_fingerprint(client)
    assert len(losses) == 8
    assert losses[-1] < losses[0] - 1.0, f"the loss should go down clearly: {losses}"
    assert torch.equal(before, after), "a client changed the nodes' weights"
    x = torch.randn(1, 8, before.shape[-1], generator=torch.Generator().manual_seed(1234))
    with torch.no_grad():
        torch.testing.assert_close(after, hf_layers(llama_mesh.model_dir, x, 0, 8), atol=1e-5, rtol=1e-5)


def test_backward_does_not_change_node_weights(client, llama_mesh):
    """Many backward calls with large gradients leave every node's output for a fixed input unchanged."""
    hidden_size = hf_model(llama_mesh.model_dir).config.hidden_size
    fixed = torch.randn(1, 8, hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = client.layers(fixed)
    for seed in range(3):
        x = torch.randn(2, 6, hidden_size, generator=torch.Generator().manual_seed(seed)).requires_grad_()
        (client.layers(x) * 1e3).sum().backward()
    with torch.no_grad():
        assert torch.equal(client.layers(fixed), before)
