"""``farmesh demo``: the whole system on one machine, in real processes on loopback."""

import logging
import os
import sys
import time

from farmesh_core.demo_model import ensure_demo_model
from farmesh_core.launch import spawn_dht, spawn_node, stop_process, wait_for_layers

logger = logging.getLogger(__name__)


def cache_dir() -> str:
    return os.environ.get("FARMESH_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "farmesh"))


def demo_model_dir() -> str:
    """Where the demo's trained model is cached (see ``farmesh_core.demo_model``)."""
    return os.path.join(cache_dir(), "demo-llama-stories")


def run_demo(prompt: str, max_tokens: int, model_dir: str | None = None, train_only: bool = False) -> None:
    """Train the demo model if missing, start a DHT and two Far Nodes, generate, stop everything."""
    from farmesh_core.client import DistributedInferenceClient

    model_dir = model_dir or demo_model_dir()
    logger.info("Demo checkpoint: %s", model_dir)
    ensure_demo_model(model_dir)
    if train_only:
        print(model_dir)
        return
    processes = []
    try:
        dht, addrs = spawn_dht()
        processes.append(dht)
        logger.info("DHT bootstrap peer: %s", addrs[0])
        for layers in ("0:4", "4:8"):
            processes.append(spawn_node(model_dir, addrs, "--layers", layers))
            logger.info("Starting a Far Node for layers %s (pid %d)", layers, processes[-1].pid)
        wait_for_layers(model_dir, addrs, num_nodes=2, procs=processes[1:])
        with DistributedInferenceClient(model_dir, addrs) as client:
            sys.stdout.write(f"Prompt: {prompt}\nFarMesh: ")
            began, count = time.perf_counter(), 0
            for piece in client.generate(prompt, max_tokens=max_tokens, stream=True):
                sys.stdout.write(piece)
                sys.stdout.flush()
                count += 1
            elapsed = time.perf_counter() - began
            sys.stdout.write(f"\n[{count} tokens through 2 Far Nodes in {elapsed:.2f} s]\n")
    finally:
        for proc in reversed(processes):
            stop_process(proc)
        logger.info("Stopped the DHT and the Far Nodes")
