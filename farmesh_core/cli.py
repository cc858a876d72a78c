"""The ``farmesh`` command: run a DHT peer, a Far Node, generate, inspect the mesh, run the demo."""

import argparse
import json
import logging
import os
import signal
import sys
import threading

logger = logging.getLogger("farmesh")


def _add_network(parser: argparse.ArgumentParser, bootstrap_required: bool = True) -> None:
    parser.add_argument(
        "--dht-bootstrap", nargs="+", required=bootstrap_required, default=[], metavar="ADDR",
        help="multiaddr(s) of DHT peers, as printed by `farmesh dht`",
    )  # fmt: skip
    parser.add_argument("--host-maddrs", nargs="+", default=None, help="multiaddrs to listen on")
    parser.add_argument("--announce-maddrs", nargs="+", default=None, help="multiaddrs others should dial")
    parser.add_argument("--dht-prefix", default=None, help="DHT namespace (default: derived from the checkpoint)")


def _network_options(args) -> dict:
    return dict(host_maddrs=args.host_maddrs, announce_maddrs=args.announce_maddrs, dht_prefix=args.dht_prefix)


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def cmd_dht(args) -> None:
    from farmesh_core.config import NetworkConfig
    from farmesh_core.dht import start_dht

    config = NetworkConfig(dht_bootstrap=args.dht_bootstrap, host_maddrs=[f"/ip4/{args.host}/tcp/{args.port}"])
    dht = start_dht(config)
    for addr in dht.get_visible_maddrs():
        print(addr, flush=True)
    print("FarMesh DHT peer ready; pass the address above as --dht-bootstrap. Ctrl+C stops it.", flush=True)
    try:
        _wait_for_signal()
    finally:
        dht.shutdown()


def cmd_node(args) -> None:
    from farmesh_core.node import FarNode

    options = dict(
        device=args.device, dtype=args.dtype, quantization=args.quantization, adapters=args.adapters or [],
        layers=args.layers, num_layers=args.num_layers, num_threads=args.num_threads,
        max_session_length=args.max_session_length, **_network_options(args),
    )  # fmt: skip
    if args.kv_cache_gb is not None:
        options["kv_cache_bytes"] = int(args.kv_cache_gb * 1024**3)
    FarNode(args.model, args.dht_bootstrap, **options).run()


def cmd_generate(args) -> None:
    from farmesh_core.client import DistributedInferenceClient

    client = DistributedInferenceClient(args.model, args.dht_bootstrap, routing=args.routing, **_network_options(args))
    try:
        pieces = client.generate(
            args.prompt, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, seed=args.seed, stream=True,
        )  # fmt: skip
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    finally:
        client.close()


def cmd_status(args) -> None:
    from farmesh_core.status import mesh_status, render_status

    status = mesh_status(args.model, args.dht_bootstrap, **_network_options(args))
    print(json.dumps(status, indent=2) if args.json else render_status(status))


def cmd_demo(args) -> None:
    from farmesh_core.demo import run_demo

    run_demo(prompt=args.prompt, max_tokens=args.max_tokens, model_dir=args.model_dir)


def cmd_simulate(args) -> None:
    from farmesh_core.simulate import simulate_command

    simulate_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="farmesh", description="FarMesh: serve and use LLMs across many machines.")
    parser.add_argument("--log-level", default=os.environ.get("FARMESH_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("dht", help="start a bootstrap DHT peer and print its multiaddrs")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for other machines)")
    p.add_argument("--port", type=int, default=0, help="TCP port (0 = any free port)")
    p.add_argument("--dht-bootstrap", nargs="*", default=[], metavar="ADDR", help="join an existing DHT")
    p.set_defaults(func=cmd_dht)

    p = sub.add_parser("node", help="run a Far Node serving a range of a model's layers")
    p.add_argument("model", help="checkpoint directory or Hugging Face id in the local cache")
    _add_network(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--layers", help="START:END (END exclusive), e.g. 0:4")
    group.add_argument("--num-layers", type=int, help="serve this many layers where the mesh needs them")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--quantization", default="none")
    p.add_argument("--adapters", nargs="*", default=[], help="LoRA adapter directories to load")
    p.add_argument("--kv-cache-gb", type=float, default=None, help="KV cache budget of all sessions")
    p.add_argument("--max-session-length", type=int, default=8192)
    p.add_argument("--num-threads", type=int, default=None, help="torch threads for compute")
    p.set_defaults(func=cmd_node)

    p = sub.add_parser("generate", help="generate text through the Far Mesh Network (streams to stdout)")
    p.add_argument("model")
    p.add_argument("prompt")
    _add_network(p)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--routing",
        default="min-latency",
        help="routing policy: min-latency, fewest-hops, max-throughput, random or a plugin's",
    )
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("status", help="which Far Nodes serve which layers, and the gaps")
    p.add_argument("model")
    _add_network(p)
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("demo", help="a tiny model, a DHT and two Far Nodes on loopback, then a generation")
    p.add_argument("--prompt", default="The logging module")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--model-dir", default=None, help="where the demo checkpoint lives (made if missing)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "simulate", help="compare routing policies on a synthetic mesh and workload; prints JSON",
        description="Unset options take SimulationConfig's defaults; the JSON output echoes every value used.",
    )  # fmt: skip
    p.add_argument("--policies", help="comma-separated policy names (default: every registered policy)")
    p.add_argument("--nodes", type=int, help="Far Nodes in the mesh (default 1000)")
    p.add_argument("--layers", type=int, help="layers of the model (default 80)")
    p.add_argument("--min-span", type=int, help="fewest layers a node serves")
    p.add_argument("--max-span", type=int, help="most layers a node serves")
    p.add_argument("--requests", type=int, help="requests in the workload (default 10000)")
    p.add_argument("--arrival-rate", type=float, help="requests per second (Poisson)")
    p.add_argument("--min-tokens", type=int, help="fewest tokens a request generates")
    p.add_argument("--max-tokens", type=int, help="most tokens a request generates")
    p.add_argument("--forward-fraction", type=float, help="share of requests that are one forward batch")
    p.add_argument("--capacity", type=float, help="concurrent requests that double a node's per-layer time")
    p.add_argument("--failure-rate", type=float, help="failures per node per simulated hour")
    p.add_argument("--retries", type=int, help="new chains a request may try after a node of its chain dies")
    p.add_argument("--seed", type=int, help="seed of every random draw (default 0)")
    p.add_argument("--plot", metavar="OUT.png", help="also save a bar chart (needs matplotlib)")
    p.set_defaults(func=cmd_simulate)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.log_level.upper() != "DEBUG":
        logging.getLogger("hivemind").setLevel(logging.WARNING)
    try:
        args.func(args)
    except KeyboardInterrupt:
        pass
    except Exception as e:
        from farmesh_core.errors import FarMeshError

        if not isinstance(e, FarMeshError):
            raise
        logger.error("%s", e)
        sys.exit(1)


if __name__ == "__main__":
    main()
