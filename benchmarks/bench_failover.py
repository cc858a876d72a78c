#!/usr/bin/env python
"""Failover: kill the node in use mid-generation, measure the pause, check the text is unchanged.

Three Far Nodes (0:4, 4:8, 4:8 for the tiny Llama: the first half of the layers, then the second
half twice); each run generates 64 greedy tokens and SIGKILLs the second-half node of the chain
after token 16, then restarts a spare so the next run can kill again.
Prints JSON: pause after each kill, total time vs a run without a fault, identical yes/no.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from bench_model import BenchModel

from farmesh_core.checkpoint_maker import ensure_checkpoint
from farmesh_core.launch import kill_process_group, node_peer_id, spawn_dht, spawn_node, stop_process, wait_for_layers

NEW_TOKENS, KILL_AFTER = 64, 16


def timed_generation(client, input_ids, on_token=None) -> tuple[list[int], list[float]]:
    tokens, times = [], []
    with client.inference_session(input_ids.shape[1] + NEW_TOKENS) as session:
        began = time.perf_counter()
        for token in client.generate_ids(input_ids, NEW_TOKENS, session=session, min_new_tokens=NEW_TOKENS):
            tokens.append(int(token[0]))
            times.append(time.perf_counter() - began)
            if on_token is not None:
                on_token(len(tokens), session)
    return tokens, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    model_dir = args.model or ensure_checkpoint(os.path.join(tempfile.gettempdir(), "farmesh-bench-tiny-llama"))
    from farmesh_core.client import DistributedInferenceClient

    workdir = tempfile.mkdtemp(prefix="farmesh-failover-")
    dht, addrs = spawn_dht()
    nodes: dict[str, object] = {}

    def start(span: str) -> None:
        log = os.path.join(workdir, f"node-{len(os.listdir(workdir))}.log")
        proc = spawn_node(model_dir, addrs, "--layers", span, log_path=log)
        nodes[node_peer_id(log)] = proc

    try:
        model = BenchModel(model_dir)
        first, second = model.two_nodes
        for span in (first, second, second):
            start(span)
        wait_for_layers(model_dir, addrs, num_nodes=3, procs=list(nodes.values()))
        input_ids = model.random_prompt(0)
        runs = []
        with DistributedInferenceClient(model_dir, addrs) as client:
            expected, clean_times = timed_generation(client, input_ids)
            for _ in range(args.kills):

                def kill(count, session):
                    if count == KILL_AFTER:
                        victim = next(h.peer_id for h in session.route if h.start == model.half)
                        kill_process_group(nodes.pop(victim))

                tokens, times = timed_generation(client, input_ids, kill)
                pause = max(b - a for a, b in zip(times[KILL_AFTER - 1 :], times[KILL_AFTER:], strict=False))
                runs.append({"pause_s": pause, "total_s": times[-1], "identical": tokens == expected})
                start(second)  # a new spare for the next kill
                wait_for_layers(model_dir, addrs, num_nodes=3, procs=list(nodes.values()))
                client.mesh.records(refresh=True)
        pauses = [r["pause_s"] for r in runs]
        result = {
            "kills": len(runs),
            "identical": sum(r["identical"] for r in runs),
            "pause_after_kill_s": {"median": statistics.median(pauses), "max": max(pauses), "all": pauses},
            "total_s_no_fault": clean_times[-1],
            "total_s_with_fault": [r["total_s"] for r in runs],
            "median_token_gap_no_fault_s": statistics.median(
                b - a for a, b in zip(clean_times, clean_times[1:], strict=False)
            ),
        }
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    finally:
        for proc in [*nodes.values(), dht]:
            stop_process(proc)


if __name__ == "__main__":
    main()
