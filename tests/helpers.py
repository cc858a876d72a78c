"""Helpers shared by the tests: plain-transformers references and meshes of real processes.

Every mesh is a real ``farmesh dht`` process plus real ``farmesh node`` processes on 127.0.0.1 with
port 0, forked from a preloaded parent (:mod:`tests.preloaded`) and stopped by PID.
"""

import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import torch

from farmesh_core.launch import kill_process_group, node_peer_id, stop_process, wait_for_layers
from tests.preloaded import Process, spawn_dht, spawn_node

PROMPT = "The logging module"
HIDDEN_SIZE = 256  # TINY_LLAMA
NUM_LAYERS = 8


def randn(*shape: int, seed: int) -> torch.Tensor:
    """A seeded standard-normal tensor (the global generator stays untouched)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def op_counts(fn) -> dict[str, int]:
    """How many times ``fn()`` ran each torch op (``aten::bmm``: a one-token matmul split over threads,
    see ``row_matmul.row_blocks``)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    return {event.key: event.count for event in profile.key_averages()}


@cache
def cpu_has_bf16_dot_products() -> bool:
    """Whether this CPU has AVX-512 BF16 or AMX-BF16 (Linux), where oneDNN's GEMV on a packed bfloat16
    weight gave ``F.linear``'s bits. Elsewhere the code checks that at load and may keep ``F.linear``:
    tests then assert that whichever path a weight took kept the bits."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# ---- plain transformers, the definition of correct -----------------------------------------------
@cache
def hf_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@cache
def hf_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def prompt_ids(model_dir: str, prompt: str = PROMPT) -> torch.Tensor:
    return hf_tokenizer(model_dir)(prompt, return_tensors="pt").input_ids


REFERENCE_TOKENS = 64


@cache
def _hf_greedy_run(model_dir: str, prompt: str, max_new_tokens: int) -> tuple[int, ...]:
    ids = prompt_ids(model_dir, prompt)
    with torch.no_grad():
        out = hf_model(model_dir).generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tuple(out[0, ids.shape[1] :].tolist())


def hf_greedy_ids(model_dir: str, prompt: str = PROMPT, max_new_tokens: int = REFERENCE_TOKENS) -> tuple[int, ...]:
    """The new token ids of transformers' greedy ``generate``.

    Greedy decoding of N tokens is the first N tokens of a longer greedy run, so one run of
    REFERENCE_TOKENS per prompt serves every shorter request."""
    return _hf_greedy_run(model_dir, prompt, max(max_new_tokens, REFERENCE_TOKENS))[:max_new_tokens]


def hf_greedy_continuations(model_dir: str, prompts: list[torch.Tensor], new_tokens: int) -> list[list[int]]:
    """transformers' greedy continuation of each prompt (ids [1, n]), exactly ``new_tokens`` long."""
    with torch.no_grad():
        return [
            hf_model(model_dir)
            .generate(p, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)[0, p.shape[1] :]
            .tolist()
            for p in prompts
        ]


def hf_sampled_ids(model_dir: str, prompt: str, max_new_tokens: int, seed: int, **sampling) -> list[int]:
    """The new token ids of transformers' sampling ``generate`` after ``torch.manual_seed(seed)``."""
    ids = prompt_ids(model_dir, prompt)
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        out = hf_model(model_dir).generate(ids, max_new_tokens=max_new_tokens, do_sample=True, **sampling)
    return out[0, ids.shape[1] :].tolist()


def hf_greedy_text(model_dir: str, prompt: str = PROMPT, max_new_tokens: int = REFERENCE_TOKENS) -> str:
    """The decoded new text of transformers' greedy ``generate`` (special tokens skipped)."""
    ids = list(hf_greedy_ids(model_dir, prompt, max_new_tokens))
    return hf_tokenizer(model_dir).decode(ids, skip_special_tokens=True)


@cache
def hf_hidden_states(model_dir: str, seed: int = 0, batch: int = 2, seq: int = 16) -> tuple[torch.Tensor, ...]:
    """A random input [batch, seq, hidden] and what each decoder layer of transformers makes of it.

    ``states[i]`` is the input of layer ``i`` (``states[0]`` the random input); ``states[-1]`` is the
    final norm of the last layer's output, as transformers reports it.
    """
    x = torch.randn(batch, seq, HIDDEN_SIZE, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return hf_model(model_dir).model(inputs_embeds=x, output_hidden_states=True).hidden_states


# ---- meshes of real processes --------------------------------------------------------------------
@dataclass
class Mesh:
    """A DHT process and Far Node processes serving one checkpoint on loopback."""

    model_dir: str
    addrs: list[str]
    dht: Process
    nodes: list[Process]
    layers: list[str]
    logs: list[Path] = field(default_factory=list)

    def connection(self):
        """A bare client connection to this mesh (no head, no tokenizer), for hand-made requests."""
        from farmesh_core.checkpoint import Checkpoint
        from farmesh_core.client.mesh import MeshConnection
        from farmesh_core.config import ClientConfig

        config = ClientConfig(model_id=self.model_dir, dht_bootstrap=self.addrs)
        return MeshConnection(config, Checkpoint(self.model_dir).dht_prefix)

    def assert_alive(self) -> None:
        for proc, layers in zip(self.nodes, self.layers, strict=True):
            assert proc.poll() is None, f"the node serving {layers} died (exit code {proc.returncode})"
        assert self.dht.poll() is None, "the DHT process died"


class MeshLauncher:
    """Starts meshes and remembers every process it started, so ``stop_all`` can stop them by PID."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.dhts: list[Process] = []
        self.nodes: list[Process] = []

    def start(self, model_dir: str, *layers: str, node_args: tuple[str, ...] = ()) -> Mesh:
        dht, addrs = spawn_dht()
        self.dhts.append(dht)
        nodes, logs = [], []
        for span in layers:
            log = self.log_dir / f"node{len(self.nodes)}-{span.replace(':', '_')}.log"
            proc = spawn_node(model_dir, addrs, "--layers", span, *node_args, log_path=str(log))
            self.nodes.append(proc)
            nodes.append(proc)
            logs.append(log)
        try:
            wait_for_layers(model_dir, addrs, num_nodes=len(nodes), timeout=120, procs=nodes)
        except Exception as e:
            tails = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs if log.exists())
            raise RuntimeError(f"the mesh did not come up: {e}\n{tails}") from e
        return Mesh(model_dir, addrs, dht, nodes, list(layers), logs)

    def stop_all(self, timeout: float = 10.0) -> None:
        """SIGTERM every node by PID at once (each withdraws from the DHT and stops), then the DHTs;
        after ``timeout`` SIGKILL each process group (the p2p daemons included) whatever is left."""
        for group in (self.nodes, self.dhts):
            for proc in group:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for proc in group:
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
                kill_process_group(proc)
            group.clear()


@contextmanager
def nodes_by_peer(model_dir: str, spans: list[str], log_dir: Path) -> Iterator[tuple[list[str], dict]]:
    """A DHT and one Far Node per span (logs in ``log_dir``), for tests that kill or stall a given node:
    yields (bootstrap addrs, {peer_id: node process}); every process is stopped by PID afterwards."""
    dht, addrs = spawn_dht()
    procs, logs = [], []
    try:
        for i, span in enumerate(spans):
            logs.append(str(log_dir / f"node{i}.log"))
            procs.append(spawn_node(model_dir, addrs, "--layers", span, log_path=logs[-1]))
        wait_for_layers(model_dir, addrs, num_nodes=len(spans), procs=procs)
        yield addrs, {node_peer_id(log): proc for log, proc in zip(logs, procs, strict=True)}
    finally:
        for proc in [*procs, dht]:
            stop_process(proc)
