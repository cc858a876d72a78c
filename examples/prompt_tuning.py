"""Prompt tuning through the Far Mesh Network: train a soft prompt while the layers run remotely.

A few trainable embeddings (the soft prompt) are prepended to the token embeddings of a fixed text;
the decoder layers run on two Far Nodes (forward and backward over RPC), the final norm and LM head
run here, and Adam updates only the prompt. The nodes' weights never change.

    python examples/prompt_tuning.py

With no arguments it makes (or reuses) a tiny seeded checkpoint, starts a DHT and two Far Nodes
(layers 0:4 and 4:8) on 127.0.0.1, trains for a few steps, and stops every process it started.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tempfile  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

TRAINING_TEXT = "The logging module defines functions and classes for a flexible event logging system."


def next_token_loss(client, prompt: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each next token of ``input_ids`` given the soft ``prompt`` and the tokens before it."""
    embeds = client.head.embed(input_ids)
    hidden = client.layers(torch.cat([prompt.expand(input_ids.shape[0], -1, -1).to(embeds.dtype), embeds], dim=1))
    logits = client.head.logits(hidden[:, prompt.shape[1] : -1])  # positions that predict tokens 1..T-1
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1))


def tune_prompt(
    client,
    text: str = TRAINING_TEXT,
    steps: int = 15,
    lr: float = 0.05,
    num_prompt_tokens: int = 4,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
) -> list[float]:
    """Train a soft prompt of ``num_prompt_tokens`` embeddings on ``text`` with Adam; return the loss of
    each step (measured before that step's update). Only the prompt is trained: the client's head is
    frozen and the remote layers have no local parameters."""
    client.head.requires_grad_(False)
    input_ids = client.tokenizer(text, return_tensors="pt").input_ids
    hidden_size = client.head.embed(input_ids[:, :1]).shape[-1]
    generator = torch.Generator().manual_seed(seed)
    prompt = nn.Parameter(0.1 * torch.randn(1, num_prompt_tokens, hidden_size, generator=generator))
    optimizer = torch.optim.Adam([prompt], lr=lr)
    losses = []
    for step in range(steps):
        optimizer.zero_grad()
        loss = next_token_loss(client, prompt, input_ids)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if log is not None:
            log(f"step {step + 1:2d}/{steps}  loss {loss.item():.4f}")
    return losses


def remote_fingerprint(client, seed: int = 1234) -> torch.Tensor:
    """The remote layers' output for a fixed random input: equal before and after training iff the
    nodes' weights did not change."""
    hidden_size = client.head.embed(torch.zeros(1, 1, dtype=torch.long)).shape[-1]
    x = torch.randn(1, 8, hidden_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return client.layers(x)


def main() -> None:
    from farmesh import DistributedInferenceClient
    from farmesh_core.checkpoint_maker import ensure_checkpoint
    from farmesh_core.launch import spawn_dht, spawn_node, stop_process, wait_for_layers

    workdir = os.path.join(tempfile.gettempdir(), "farmesh-prompt-tuning")
    model_dir = ensure_checkpoint(os.path.join(workdir, "tiny-llama"), seed=0)
    procs = []
    try:
        dht, addrs = spawn_dht("127.0.0.1")
        procs.append(dht)
        for span in ("0:4", "4:8"):
            log_path = os.path.join(workdir, f"node-{span.replace(':', '_')}.log")
            procs.append(spawn_node(model_dir, addrs, "--layers", span, log_path=log_path))
        print(f"started a DHT and two Far Nodes (logs in {workdir}); waiting for them to announce their layers")
        wait_for_layers(model_dir, addrs, num_nodes=2, timeout=120, procs=procs[1:])

        with DistributedInferenceClient(model_dir, addrs) as client:
            before = remote_fingerprint(client)
            losses = tune_prompt(client)
            after = remote_fingerprint(client)
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
        assert losses[-1] < losses[0], "the loss should go down"
        assert torch.equal(before, after), "the nodes' weights changed"
        print("the loss went down and the nodes' outputs for a fixed input are unchanged (weights untouched)")
    finally:
        for proc in reversed(procs):
            stop_process(proc)


if __name__ == "__main__":
    main()
