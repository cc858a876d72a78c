#!/usr/bin/env python
"""Decode speed, time to first token and batch forward: local transformers, FarMesh 1 node, 2 nodes.

Everything is measured in one run on the same machine, by default with the tiny Llama of the Petals
baseline (hidden 256, 8 layers, vocab 1024), the Petals benchmark's prompt (34 tokens) and 64 greedy
tokens; any checkpoint can be given with --model (two nodes split its layers in half). Petals'
figures from a run of ../shared/baselines/petals-bench on the same machine can be merged in with
--petals DIR. Prints one JSON object.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import NamedTuple

import psutil
import torch
from bench_model import BenchModel

from farmesh_core.checkpoint_maker import ensure_checkpoint
from farmesh_core.launch import spawn_dht, spawn_node, stop_process, wait_for_layers

NEW_TOKENS = 64
CONCURRENT_SESSIONS = 8
LOAD_LEVELS = (1, 2, 4, 8, 16)  # sessions at once, for the load curve


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def token_times(iterator, began: float | None = None) -> tuple[list[int], list[float]]:
    """The ids ``iterator`` yields and when each came, in seconds since ``began`` (default: now)."""
    began, ids, times = time.perf_counter() if began is None else began, [], []
    for token in iterator:
        ids.append(int(token[0]))
        times.append(time.perf_counter() - began)
    return ids, times


def decode_metrics(times: list[float]) -> dict:
    return {"ttft_s": times[0], "steady_tok_s": (len(times) - 1) / (times[-1] - times[0])}


class _Streamer:
    def __init__(self):
        self.times, self.ids, self.began, self.prompt_seen = [], [], time.perf_counter(), False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter() - self.began)
        self.ids.append(int(value.reshape(-1)[0]))

    def end(self):
        pass


def local_model(bench_model: BenchModel):
    """transformers' model of the whole checkpoint, in the dtype the nodes run it in by default (its own)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(bench_model.dir, dtype=bench_model.dtype).eval()


def local_generation(model, input_ids: torch.Tensor) -> tuple[list[int], dict]:
    """One greedy generation through transformers' ``generate``, timed token by token."""
    streamer = _Streamer()
    with torch.inference_mode():
        model.generate(
            input_ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, streamer=streamer
        )
    return streamer.ids, decode_metrics(streamer.times)


def bench_local(bench_model: BenchModel, input_ids: torch.Tensor, runs: int) -> tuple[dict, list[int]]:
    """transformers on the whole model: decode and a batch forward."""
    model = local_model(bench_model)
    results, ids = [], None
    for _ in range(runs + 1):
        ids, metrics = local_generation(model, input_ids)
        results.append(metrics)
    x = torch.randn(4, 128, model.config.hidden_size, dtype=bench_model.dtype)
    forward = []
    with torch.inference_mode():
        for _ in range(runs + 1):
            began = time.perf_counter()
            model.base_model(inputs_embeds=x)
            forward.append(x.shape[0] * x.shape[1] / (time.perf_counter() - began))
    return _collect(results[1:], forward[1:]), ids


def _collect(results: list[dict], forward: list[float] | None = None) -> dict:
    out = {
        "ttft_s": summary([r["ttft_s"] for r in results]),
        "steady_tok_s": summary([r["steady_tok_s"] for r in results]),
    }
    if forward:
        out["forward_4x128_tok_s"] = summary(forward)
    return out


def petals_style_generation(model, input_ids: torch.Tensor) -> tuple[list[int], dict]:
    """The Petals-compatible API as Petals' own benchmark calls it: transformers' ``generate`` with a
    streamer, inside an inference session."""
    streamer = _Streamer()
    with torch.inference_mode(), model.inference_session(max_length=input_ids.shape[1] + NEW_TOKENS):
        model.generate(
            input_ids, streamer=streamer, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
            num_beams=1, pad_token_id=0,
        )  # fmt: skip
    return streamer.ids, decode_metrics(streamer.times)


def generation(client, input_ids: torch.Tensor) -> tuple[list[int], dict]:
    began = time.perf_counter()  # before the session, as Petals' benchmark times it (its route is chosen then)
    with client.inference_session(input_ids.shape[1] + NEW_TOKENS + 1) as session:
        # min_new_tokens as local transformers has it: a prompt whose continuation holds EOS goes on to 64
        steps = client.generate_ids(input_ids, NEW_TOKENS, session=session, min_new_tokens=NEW_TOKENS)
        ids, times = token_times(steps, began)
    return ids, decode_metrics(times)


class Mesh(NamedTuple):
    addrs: list[str]  # the DHT's multiaddrs
    nodes: dict[str, subprocess.Popen]  # span -> its node's process


@contextmanager
def running_mesh(model_dir: str, spans: list[str], threads: int | None) -> Iterator[Mesh]:
    """A DHT and nodes serving ``spans`` (with ``threads`` torch threads each), up until the block ends."""
    dht, addrs = spawn_dht()
    extra = ["--num-threads", str(threads)] if threads else []
    nodes = [spawn_node(model_dir, addrs, "--layers", span, *extra) for span in spans]
    try:
        wait_for_layers(model_dir, addrs, num_nodes=len(spans), procs=nodes)
        yield Mesh(addrs, dict(zip(spans, nodes, strict=True)))
    finally:
        for proc in [*nodes, dht]:
            stop_process(proc)


def bench_mesh(model: BenchModel, input_ids: torch.Tensor, spans: list[str], runs: int, threads: int | None):
    """FarMesh with nodes serving ``spans``, the client's defaults (a token loop: see
    ``InferenceSession.loops`` and ``_pushes``); also, run for run alternately with it, with a token loop
    asked for explicitly (the last node chooses each token and sends it round; the same settings), with
    pushes and no loop (the client sends each step to the first node, which pushes to the next), and
    with several nodes with the client relaying every step (push off); and through the
    Petals-compatible API (transformers' ``generate``), as Petals' benchmark calls Petals."""
    from farmesh_core.client import DistributedInferenceClient
    from farmesh_core.client.causal_lm import DistributedModelForCausalLM

    with running_mesh(model.dir, spans, threads) as mesh, ExitStack() as clients:
        client = clients.enter_context(DistributedInferenceClient(model.dir, mesh.addrs))
        causal_lm = clients.enter_context(
            DistributedModelForCausalLM.from_pretrained(model.dir, dht_bootstrap=mesh.addrs)
        )
        variants = {
            "token_loop": {"token_loop": True}, "client_chooses": {"token_loop": False, "push": True},
            "relayed_by_client": {"push": False},
        }  # fmt: skip
        others = {
            name: clients.enter_context(DistributedInferenceClient(model.dir, mesh.addrs, **options))
            for name, options in variants.items()
            if len(spans) > 1 or name != "relayed_by_client"
        }
        results, petals_style, ids = [], [], None
        other_results: dict[str, list] = {name: [] for name in others}
        for _ in range(runs + 1):
            ids, metrics = generation(client, input_ids)
            results.append(metrics)
            for name, other in others.items():
                other_ids, metrics = generation(other, input_ids)
                other_results[name].append(metrics)
                assert other_ids == ids, f"{name} gave other tokens than the default client"
            petals_ids, metrics = petals_style_generation(causal_lm, input_ids)
            petals_style.append(metrics)
            assert petals_ids == ids, "transformers' generate and generate_ids gave different tokens"
        x = torch.randn(4, 128, client.model_config.hidden_size)
        forward = []
        for _ in range(runs + 1):
            began = time.perf_counter()
            client.layers(x)
            forward.append(x.shape[0] * x.shape[1] / (time.perf_counter() - began))
        with client.inference_session(8) as session:
            hops = len(session.route)
        concurrency = {}
        if len(spans) == 2:

            def petals_style_ids(prompt: torch.Tensor, model=causal_lm) -> list[int]:
                return petals_style_generation(model, prompt)[0]

            def generate_ids(prompt: torch.Tensor, client=client) -> list[int]:
                return [int(t[0]) for t in client.generate_ids(prompt, NEW_TOKENS, min_new_tokens=NEW_TOKENS)]

            # Generations that start together share sessions (client/batched_generation.py); the same 8
            # one after another run each alone with no wait (a client that never shares), and also
            # concurrently each in its own session, as every run before shared sessions measured it.
            own = clients.enter_context(DistributedInferenceClient(model.dir, mesh.addrs, batch_window_ms=0))
            alone = partial(generate_ids, client=own)
            concurrency["concurrency"] = bench_concurrency(
                generate_ids, mesh, model, CONCURRENT_SESSIONS, runs, sequential=alone
            )
            concurrency["concurrency"]["shared_sessions"] = {
                "sessions": client.batcher.batches, "rows": client.batcher.batched_rows,
            }  # fmt: skip
            concurrency["concurrency_own_sessions"] = bench_concurrency(alone, mesh, model, CONCURRENT_SESSIONS, runs)
            # as Petals' concurrency benchmark runs it: threads sharing one model, each in its own
            # inference session (plain greedy calls that start together share one there too); the
            # one-after-another rounds through a model that never waits for company
            own_lm = clients.enter_context(
                DistributedModelForCausalLM.from_pretrained(model.dir, dht_bootstrap=mesh.addrs, batch_window_ms=0)
            )
            one_by_one = partial(petals_style_ids, model=own_lm)
            concurrency["concurrency_transformers_generate"] = bench_concurrency(
                petals_style_ids, mesh, model, CONCURRENT_SESSIONS, runs, sequential=one_by_one
            )
            concurrency["concurrency_transformers_generate"]["shared_sessions"] = {
                "sessions": causal_lm.batcher.batches, "rows": causal_lm.batcher.batched_rows,
            }  # fmt: skip
            concurrency["concurrency_processes"] = bench_processes(mesh, model, CONCURRENT_SESSIONS, runs, one_by_one)
            concurrency["load_curve"] = bench_load_curve(generate_ids, model, runs)
    out = _collect(results[1:], forward[1:])
    out["hops"] = hops
    for name, metrics in other_results.items():
        out[name] = _collect(metrics[1:])
    out["transformers_generate"] = _collect(petals_style[1:])
    out.update(concurrency)
    return out, ids


def bench_interleaved(model: BenchModel, input_ids: torch.Tensor, runs: int, threads: int | None) -> dict:
    """The cost of a second node, and 2 nodes against local transformers: a 1-node and a 2-node mesh
    up at once and transformers' model in this process, generation for generation in turn, so that
    all see the same machine (its speed drifts by tens of percent within minutes, which made the
    difference of two separate runs' medians swing by a millisecond, and local transformers' decode
    214-361 tok/s from run to run)."""
    from farmesh_core.client import DistributedInferenceClient

    layouts = {"1_node": model.one_node, "2_nodes": model.two_nodes}
    ms_per_token: dict[str, list[float]] = {name: [] for name in [*layouts, "local"]}
    local = local_model(model)
    with ExitStack() as stack:
        clients = {
            name: stack.enter_context(
                DistributedInferenceClient(
                    model.dir, stack.enter_context(running_mesh(model.dir, spans, threads)).addrs
                )
            )
            for name, spans in layouts.items()
        }
        for run in range(2 * runs + 1):
            for name, client in clients.items():
                metrics = generation(client, input_ids)[1]
                if run:
                    ms_per_token[name].append(1000 / metrics["steady_tok_s"])
            metrics = local_generation(local, input_ids)[1]
            if run:
                ms_per_token["local"].append(1000 / metrics["steady_tok_s"])
    differences = [b - a for a, b in zip(ms_per_token["1_node"], ms_per_token["2_nodes"], strict=True)]
    speedups = [a / b for a, b in zip(ms_per_token["local"], ms_per_token["2_nodes"], strict=True)]
    return {
        "extra_hop_ms": summary(differences),
        "two_nodes_over_local": summary(speedups),  # local's time a token over 2 nodes', round by round
        **{f"ms_per_token_{k}": summary(v) for k, v in ms_per_token.items()},
    }


def bench_concurrency(run: Callable[[torch.Tensor], list[int]], mesh: Mesh, model: BenchModel, sessions: int,
                      rounds: int, sequential: Callable[[torch.Tensor], list[int]] | None = None) -> dict:  # fmt: skip
    """``sessions`` generations ``run(prompt)`` at once (one thread each) vs the same ones one after
    another (through ``sequential``, by default ``run``), the two alternating for ``rounds`` rounds (as
    Petals' concurrency benchmark does): this machine's speed drifts within minutes, and one round of
    each compared two different moments. The ratio is that of the medians.

    The CPU time each process (each node, and this one: the client) spends per token of the
    concurrent rounds is reported too, with the share of the machine's cores all of them kept busy:
    it says whether the concurrent run is bound by the CPU rather than by waiting. The P2P daemons
    and the DHT process are not counted (the steps go over direct lanes)."""
    prompts = [model.random_prompt(i) for i in range(sessions)]
    processes = {f"node {span}": psutil.Process(proc.pid) for span, proc in mesh.nodes.items()}
    processes["client"] = psutil.Process()

    def cpu_seconds() -> dict[str, float]:
        return {name: sum(process.cpu_times()[:2]) for name, process in processes.items()}

    tokens = sessions * NEW_TOKENS
    sequential = sequential or run
    sequential_tok_s, concurrent_tok_s, outputs_equal = [], [], True
    cpu_ms: dict[str, list[float]] = {name: [] for name in processes}
    busy: list[float] = []
    with ThreadPoolExecutor(sessions) as pool:
        for _ in range(rounds):
            began = time.perf_counter()
            one_by_one = [sequential(p) for p in prompts]
            sequential_tok_s.append(tokens / (time.perf_counter() - began))
            before, began = cpu_seconds(), time.perf_counter()
            concurrent = list(pool.map(run, prompts))
            elapsed, after = time.perf_counter() - began, cpu_seconds()
            concurrent_tok_s.append(tokens / elapsed)
            for name in processes:
                cpu_ms[name].append(1000 * (after[name] - before[name]) / tokens)
            busy.append((sum(after.values()) - sum(before.values())) / (elapsed * os.cpu_count()))
            outputs_equal = outputs_equal and concurrent == one_by_one
    return {
        **concurrency_summary(sessions, sequential_tok_s, concurrent_tok_s, outputs_equal),
        "concurrent_cpu_ms_per_token": {name: statistics.median(values) for name, values in cpu_ms.items()},
        "concurrent_cores_busy": statistics.median(busy),
    }


def concurrency_summary(sessions: int, sequential_tok_s: list[float], concurrent_tok_s: list[float], equal: bool):
    """Rounds of ``sessions`` generations one after another and at once: the ratio is that of the medians."""
    return {
        "sessions": sessions,
        "rounds": len(sequential_tok_s),
        "sequential_tok_s": statistics.median(sequential_tok_s),
        "concurrent_tok_s": statistics.median(concurrent_tok_s),
        "ratio": statistics.median(concurrent_tok_s) / statistics.median(sequential_tok_s),
        "ratio_per_round": [c / s for s, c in zip(sequential_tok_s, concurrent_tok_s, strict=True)],
        "outputs_equal": equal,
    }


def _client_process(model_dir: str, addrs: list[str], seed: int, rounds: int, barrier, results) -> None:
    """One of :func:`bench_processes`' clients: its own model, one generation a round at the start line."""
    torch.set_num_threads(1)  # as Petals' benchmark gives each of its client processes
    from farmesh_core.client.causal_lm import DistributedModelForCausalLM

    prompt = BenchModel(model_dir).random_prompt(seed)
    try:
        with DistributedModelForCausalLM.from_pretrained(model_dir, dht_bootstrap=addrs) as model:
            petals_style_generation(model, prompt)  # warm-up
            barrier.wait()
            for _ in range(rounds):
                barrier.wait()
                ids = petals_style_generation(model, prompt)[0]
                results.put((seed, ids, time.perf_counter()))
                barrier.wait()
    except BaseException:
        barrier.abort()  # the benchmark fails at once rather than wait out the barrier's timeout
        raise


def bench_processes(mesh: Mesh, model: BenchModel, sessions: int, rounds: int, one_by_one) -> dict:
    """``sessions`` client processes, each with its own model (so its own sessions: nothing is shared
    but the nodes), generating at once, against the same generations one after another through
    ``one_by_one`` in this process, alternating for ``rounds`` rounds: the "procs" variant of Petals'
    concurrency benchmark. Here only the nodes' continuous batching can make the chain serve more."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(sessions + 1), context.Queue()
    processes = [
        context.Process(target=_client_process, args=(model.dir, mesh.addrs, seed, rounds, barrier, results))
        for seed in range(sessions)
    ]
    prompts = [model.random_prompt(seed) for seed in range(sessions)]
    alone = [one_by_one(prompt) for prompt in prompts]
    for process in processes:
        process.start()
    sequential_tok_s, concurrent_tok_s, outputs_equal = [], [], True
    try:
        barrier.wait(timeout=600)  # every process has its model
        tokens = sessions * NEW_TOKENS
        for _ in range(rounds):
            began = time.perf_counter()
            sequential = [one_by_one(prompt) for prompt in prompts]
            sequential_tok_s.append(tokens / (time.perf_counter() - began))
            outputs_equal = outputs_equal and sequential == alone
            began = time.perf_counter()
            barrier.wait(timeout=600)
            got = [results.get(timeout=600) for _ in range(sessions)]
            concurrent_tok_s.append(tokens / (max(at for _, _, at in got) - began))
            outputs_equal = outputs_equal and all(ids == alone[seed] for seed, ids, _ in got)
            barrier.wait(timeout=600)
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    return concurrency_summary(sessions, sequential_tok_s, concurrent_tok_s, outputs_equal)


def bench_load_curve(run: Callable[[torch.Tensor], list[int]], model: BenchModel, rounds: int) -> dict:
    """Total tokens/s with 1, 2, 4, 8 and 16 sessions generating at once (one thread each), the levels
    taking turns for ``rounds`` rounds: continuous batching should make a busy chain's throughput grow
    with its load. Fairness is each level's slowest session's tokens/s over its fastest's (1 when the
    nodes serve every session alike), and each session's tokens must equal its prompt's alone."""
    prompts = [model.random_prompt(i) for i in range(max(LOAD_LEVELS))]
    alone = [run(p) for p in prompts]

    def timed(prompt: torch.Tensor) -> tuple[list[int], float]:
        began = time.perf_counter()
        ids = run(prompt)
        return ids, NEW_TOKENS / (time.perf_counter() - began)

    total: dict[int, list[float]] = {n: [] for n in LOAD_LEVELS}
    fairness: dict[int, list[float]] = {n: [] for n in LOAD_LEVELS}
    outputs_equal = True
    with ThreadPoolExecutor(max(LOAD_LEVELS)) as pool:
        for _ in range(rounds):
            for sessions in LOAD_LEVELS:
                began = time.perf_counter()
                results = list(pool.map(timed, prompts[:sessions]))
                total[sessions].append(sessions * NEW_TOKENS / (time.perf_counter() - began))
                rates = [rate for _, rate in results]
                fairness[sessions].append(min(rates) / max(rates))
                outputs_equal = outputs_equal and [ids for ids, _ in results] == alone[:sessions]
    return {
        "sessions": list(LOAD_LEVELS),
        "rounds": rounds,
        "total_tok_s": [statistics.median(total[n]) for n in LOAD_LEVELS],
        "slowest_over_fastest_session": [statistics.median(fairness[n]) for n in LOAD_LEVELS],
        "outputs_equal": outputs_equal,
    }


def petals_figures(directory: str) -> dict:
    figures = {}
    concurrency = os.path.join(directory, "concurrency-2servers.json")
    if os.path.exists(concurrency):
        with open(concurrency) as f:
            figures["concurrency_2servers"] = json.load(f)
    for label in ("2servers", "1server"):
        path = os.path.join(directory, f"{label}.json")
        if os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
            g, fw = data["generate"], data["forward"]
            figures[label] = {
                "steady_tok_s": g["petals_steady_tok_s"]["median"],
                "ttft_s": g["petals_ttft_s"]["median"],
                "forward_4x128_tok_s": fw["remote_tok_s"]["median"],
                "local_transformers_4_34_steady_tok_s": g["local_steady_tok_s"]["median"],
            }
    return figures


def plot(result: dict, path: str) -> None:
    """Bar charts of steady decode speed, time to first token, batch forward and the gain of 8
    concurrent sessions: local transformers, FarMesh, Petals; and FarMesh's load curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    petals, one, two = result["petals"], result["farmesh_1_node"], result["farmesh_2_nodes"]
    local = result["local_transformers"]
    decode = {
        "local\ntransformers": local["steady_tok_s"]["median"],
        "FarMesh\n1 node": one["steady_tok_s"]["median"],
        "FarMesh\n2 nodes": two["steady_tok_s"]["median"],
    }
    ttft = {"local\ntransformers": 1000 * local["ttft_s"]["median"], "FarMesh\n2 nodes": 1000 * two["ttft_s"]["median"]}
    forward = {
        "local": local["forward_4x128_tok_s"]["median"],
        "FarMesh\n2 nodes": two["forward_4x128_tok_s"]["median"],
    }
    farmesh_variants = {
        "concurrency": "FarMesh,\ngenerate_ids",  # (shared sessions: see bench_mesh)
        "concurrency_own_sessions": "FarMesh,\nown\nsessions",
        "concurrency_transformers_generate": "FarMesh,\ntransformers\ngenerate",
        "concurrency_processes": "FarMesh,\nprocesses",
    }
    concurrency = {label: two[key]["ratio"] for key, label in farmesh_variants.items() if key in two}
    if "1server" in petals:
        decode["Petals\n1 server"] = petals["1server"]["steady_tok_s"]
    if "2servers" in petals:
        decode["Petals\n2 servers"] = petals["2servers"]["steady_tok_s"]
        ttft["Petals\n2 servers"] = 1000 * petals["2servers"]["ttft_s"]
        forward["Petals\n2 servers"] = petals["2servers"]["forward_4x128_tok_s"]
    variants = petals.get("concurrency_2servers", {}).get("variants", {})
    for variant, label in (("threads", "Petals,\nthreads"), ("procs", "Petals,\nprocesses")):
        if variant in variants and "seq" in variants:
            concurrency[label] = variants[variant]["total_tok_s"]["median"] / variants["seq"]["total_tok_s"]["median"]
    panels = [
        ("steady decode, tokens/s", decode, "{:.0f}"),
        ("time to first token, ms (2 nodes)", ttft, "{:.1f}"),
        ("forward [4x128], tokens/s", forward, "{:.0f}"),
        ("8 concurrent sessions / one after another", concurrency, "{:.2f}x"),
    ]
    panels = [panel for panel in panels if panel[1]]
    curve = two.get("load_curve")
    fig, axes = plt.subplots(1, len(panels) + bool(curve), figsize=(18 + 4 * bool(curve), 4.2))
    for ax, (title, data, label) in zip(axes, panels, strict=False):
        colors = ["#888" if "local" in k else "#c44" if "Petals" in k else "#36c" for k in data]
        ax.bar(list(data), list(data.values()), color=colors)
        ax.tick_params(axis="x", labelsize=10 if len(data) <= 5 else 8)
        ax.set_title(title)
        ax.set_ylim(top=1.15 * max(data.values()))
        for i, v in enumerate(data.values()):
            ax.text(i, v, label.format(v), ha="center", va="bottom")
    if curve:
        ax = axes[-1]
        ax.plot(curve["sessions"], curve["total_tok_s"], "o-", color="#36c", label="FarMesh, 2 nodes")
        if "threads" in variants and "seq" in variants:
            petals_points = [variants["seq"]["total_tok_s"]["median"], variants["threads"]["total_tok_s"]["median"]]
            ax.plot([1, CONCURRENT_SESSIONS], petals_points, "s--", color="#c44", label="Petals, 2 servers")
        ax.set_xscale("log", base=2)
        ax.set_xticks(curve["sessions"], [str(n) for n in curve["sessions"]])
        ax.set_ylim(bottom=0)
        ax.set_title("total tokens/s by sessions at once")
        ax.legend()
    fig.suptitle(f"{result['model_shape']}, {result['cpu_count']} CPU cores, same machine, same day")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="checkpoint dir (default: make the baseline tiny Llama)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--num-threads", type=int, default=None, help="torch threads per node")
    parser.add_argument("--petals", default="/tmp/petals-base/results", help="Petals bench results dir")
    parser.add_argument("--plot", default=None, help="write a PNG chart here (needs matplotlib)")
    args = parser.parse_args()
    model_dir = args.model or ensure_checkpoint(os.path.join(tempfile.gettempdir(), "farmesh-bench-tiny-llama"))
    model = BenchModel(model_dir)
    torch.manual_seed(0)
    input_ids = model.prompt()

    local, local_ids = bench_local(model, input_ids, args.runs)
    # torch's default (one thread per core) collapses when other processes hold a core; one thread
    # is what a small model wants on a shared machine, so both figures are reported.
    default_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    local_one_thread, _ = bench_local(model, input_ids, args.runs)
    torch.set_num_threads(default_threads)
    one, one_ids = bench_mesh(model, input_ids, model.one_node, args.runs, args.num_threads)
    two, two_ids = bench_mesh(model, input_ids, model.two_nodes, args.runs, args.num_threads)
    hop = bench_interleaved(model, input_ids, args.runs, args.num_threads)
    result = {
        "model": model_dir,
        "model_shape": model.describe(),
        "spans_2_nodes": model.two_nodes,
        "prompt_tokens": input_ids.shape[1],
        "new_tokens": NEW_TOKENS,
        "cpu_count": os.cpu_count(),
        "local_transformers": local,
        "local_transformers_1_thread": local_one_thread,
        "local_default_threads": default_threads,
        "farmesh_1_node": one,
        "farmesh_2_nodes": two,
        "tokens_equal_local": {"1_node": one_ids == local_ids, "2_nodes": two_ids == local_ids},
        "extra_hop_ms": hop["extra_hop_ms"]["median"],
        "extra_hop_interleaved": hop,
        "two_nodes_over_local_interleaved": hop["two_nodes_over_local"]["median"],
        "extra_hop_ms_from_separate_runs": 1000
        * (1 / two["steady_tok_s"]["median"] - 1 / one["steady_tok_s"]["median"]),
        "extra_hop_ms_relayed_by_client": 1000
        * (1 / two["relayed_by_client"]["steady_tok_s"]["median"] - 1 / one["steady_tok_s"]["median"]),
        "petals": petals_figures(args.petals),
    }
    petals_two = result["petals"].get("2servers")
    if petals_two:
        result["speedup_vs_petals_2_nodes"] = two["steady_tok_s"]["median"] / petals_two["steady_tok_s"]
    if args.plot:
        plot(result, args.plot)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
