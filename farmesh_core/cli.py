"""The ``farmesh`` command: run a DHT peer, a Far Node, generate, inspect the mesh, run the demo."""

import argparse
import gc
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
        layers=args.layers, num_layers=args.num_layers, num_threads=args.num_threads, spread_threads=args.spread_threads,
        keep_freed_memory=args.keep_freed_memory,
        lean_layers=args.lean_layers,
        pack_batch_weights=args.pack_batch_weights, exact_batches=args.exact_batches, direct_lane=args.direct_lane,
        serve_head=args.serve_head, max_session_length=args.max_session_length, step_timeout=args.step_timeout,
        max_message_bytes=args.max_message_bytes, **_network_options(args),
    )  # fmt: skip
    options.update(
        auth=args.auth, auth_key_file=args.auth_key_file, auth_revoked_file=args.auth_revoked_file,
        ledger=args.ledger, ledger_path=args.ledger_path,
    )  # fmt: skip
    if args.kv_cache_gb is not None:
        options["kv_cache_bytes"] = int(args.kv_cache_gb * 1024**3)
    if args.rebalance_period is not None:
        options["rebalance_period"] = args.rebalance_period
    if args.metrics_port is not None:
        from farmesh_core.metrics import serve_metrics

        serve_metrics(args.metrics_port, args.metrics_host)
    FarNode(args.model, args.dht_bootstrap, **options).run()


def _ends_with_its_output() -> None:
    """For commands that end once their work is done (generate, status, demo).

    hivemind's futures share memory through torch's ``file_system`` strategy, whose manager process
    (``torch_shm_manager``) inherits the command's stdout and stderr and outlives it by ~2 s: a pipe
    reading the command's output stayed open that long. Passing file descriptors instead starts no
    manager; it costs ~1.7 ms per DHT call (3.2 against 1.5), so long-running nodes keep hivemind's
    choice. Called before the command makes any future, after importing hivemind (which sets its own)."""
    import hivemind.utils.mpfuture  # noqa: F401
    import torch.multiprocessing

    torch.multiprocessing.set_sharing_strategy("file_descriptor")


def cmd_generate(args) -> None:
    _ends_with_its_output()
    from farmesh_core.client import DistributedInferenceClient

    client = DistributedInferenceClient(
        args.model, args.dht_bootstrap, routing=args.routing, quantization=args.quantization, auth=args.auth,
        auth_token=args.auth_token, adapter=args.adapter, **_network_options(args),
    )  # fmt: skip
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
    _ends_with_its_output()
    from farmesh_core.status import mesh_status, render_status

    status = mesh_status(args.model, args.dht_bootstrap, **_network_options(args))
    print(json.dumps(status, indent=2) if args.json else render_status(status))


def cmd_token(args) -> None:
    from farmesh_plugins import auth

    if args.token_command == "keygen":
        auth.create_key_file(args.key_file)
        print(f"Wrote a new mesh key to {args.key_file}: give it to the nodes (--auth-key-file), keep it secret.")
    elif args.token_command == "issue":
        print(auth.issue_token(auth.read_key_file(args.key_file), args.client, auth.parse_duration(args.expires)))
    else:
        print(auth.revoke(args.revoked_file, args.token))


def cmd_usage(args) -> None:
    from farmesh_plugins.ledgers import render_usage, usage_totals

    totals = usage_totals(args.db, by_session=args.sessions)
    print(json.dumps(totals, indent=2) if args.json else render_usage(totals))


def cmd_coordinator(args) -> None:
    from farmesh_core.coordinator import serve

    serve(
        args.model, args.dht_bootstrap, host=args.host, port=args.port, model_name=args.model_name,
        max_concurrent=args.max_concurrent, log_level=args.log_level, routing=args.routing,
        quantization=args.quantization, auth=args.auth, auth_token=args.auth_token,
        batch_window_ms=args.batch_window_ms, **_network_options(args),
    )  # fmt: skip


def cmd_demo(args) -> None:
    _ends_with_its_output()
    from farmesh_core.demo import run_demo

    run_demo(prompt=args.prompt, max_tokens=args.max_tokens, model_dir=args.model_dir, train_only=args.train_only)


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
    p.add_argument(
        "--rebalance-period", type=float, default=None, metavar="SECONDS",
        help="with --num-layers: re-check the placement this often and move when the mesh gains clearly "
        "(default 60; 0 = never move)",
    )  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--quantization", default="none", help="none, int8 (CPU), bnb-int8 or nf4 (farmesh[bnb])")
    p.add_argument("--auth", default="open", help="open (anyone) or token (private mesh, needs --auth-key-file)")
    p.add_argument("--auth-key-file", default=None, help="the mesh's secret key (made by `farmesh token keygen`)")
    p.add_argument("--auth-revoked-file", default=None, help="revoked token ids, one a line; re-read on change")
    p.add_argument("--ledger", default="null", help="null, or sqlite: usage per client and session (--ledger-path)")
    p.add_argument("--ledger-path", default=None, help="database file of the sqlite ledger")
    p.add_argument("--adapters", nargs="*", default=[], help="LoRA dirs (farmesh-lora), named by basename")
    p.add_argument("--kv-cache-gb", type=float, default=None, help="KV cache budget of all sessions")
    p.add_argument("--max-session-length", type=int, default=8192)
    p.add_argument("--step-timeout", type=float, default=30.0, help="seconds an idle session is kept open")
    p.add_argument("--max-message-bytes", type=int, default=32 * 1024**2, help="larger messages are refused unread")
    p.add_argument(
        "--num-threads",
        type=int,
        default=None,
        help="torch threads of large steps (prefill, forward) and of a lone one-token step's matmuls",
    )
    p.add_argument(
        "--no-spread-threads", dest="spread_threads", action="store_false",
        help="leave the placement of a step's torch threads to the kernel (by default, while a step runs on "
        "several threads, they are pinned apart: the leading one to one CPU, each worker to a share of the others)",
    )  # fmt: skip
    p.add_argument(
        "--no-keep-freed-memory", dest="keep_freed_memory", action="store_false",
        help="leave glibc malloc's thresholds as they are (by default freed blocks up to 32 MiB are kept for reuse)",
    )  # fmt: skip
    p.add_argument(
        "--no-lean-layers", dest="lean_layers", action="store_false",
        help="run every layer through its transformers modules (by default, inference steps of unmodified "
        "Llama layers are plain torch calls: the same results, faster on CPU)",
    )  # fmt: skip
    p.add_argument(
        "--pack-batch-weights", action=argparse.BooleanOptionalAction, default=None,
        help="keep a copy of the layers' weights packed for decode batches of several sessions (on CPU: "
        "quicker batches, the weights' memory again); by default, where memory leaves room for it",
    )  # fmt: skip
    p.add_argument(
        "--exact-batches", action=argparse.BooleanOptionalAction, default=None,
        help="decode batches of several sessions, and a shared session's rows, give each row its step's bits "
        "alone, so tokens stay transformers' even at float32 near ties (slower batches); by default, batches "
        "of sessions only, where the layers' weights fit the CPU's last-level cache",
    )  # fmt: skip
    p.add_argument(
        "--serve-head", action=argparse.BooleanOptionalAction, default=None,
        help="where the node serves the model's last layer, load the embeddings and LM head too and choose greedy "
        "tokens itself, so a generation goes round the nodes without waiting for the client at each token; by "
        "default, where they take no more memory than the node's layers, or at most 256 MiB",
    )  # fmt: skip
    p.add_argument(
        "--no-direct-lane", dest="direct_lane", action="store_false",
        help="serve over P2P only (by default a plain TCP port serves ticket holders too: faster, not encrypted)",
    )  # fmt: skip
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    p.add_argument("--metrics-host", default="0.0.0.0", help="address of the metrics endpoint")
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
    p.add_argument("--quantization", default=None, help="use only nodes with this quantization (default: any)")
    p.add_argument("--adapter", default=None, help="LoRA adapter name (a node's --adapters basename); default: none")
    p.add_argument("--auth", default="open", help="open, or token for a private mesh")
    p.add_argument("--auth-token", default=None, help="the token for --auth token (default: $FARMESH_TOKEN)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("status", help="which Far Nodes serve which layers, and the gaps")
    p.add_argument("model")
    _add_network(p)
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("coordinator", help="the Far Mesh Coordinator: an OpenAI-compatible HTTP API over the mesh")
    p.add_argument("model", help="checkpoint directory or Hugging Face id in the local cache")
    _add_network(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for other machines)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="the model id clients use (default: the directory name)")
    p.add_argument("--max-concurrent", type=int, default=16, help="generations run at once; more wait")
    p.add_argument(
        "--batch-window-ms", type=float, default=2.0,
        help="how long a request made while others generate waits for more: those with prompts of its "
        "length and its settings then share one session (0: each request its own session)",
    )  # fmt: skip
    p.add_argument("--routing", default="min-latency", help="routing policy of the sessions")
    p.add_argument("--quantization", default=None, help="use only nodes with this quantization (default: any)")
    p.add_argument("--auth", default="open", help="open, or token for a private mesh")
    p.add_argument("--auth-token", default=None, help="the token for --auth token (default: $FARMESH_TOKEN)")
    p.set_defaults(func=cmd_coordinator)

    p = sub.add_parser("token", help="keys and auth tokens of a private mesh (nodes run with --auth token)")
    tokens = p.add_subparsers(dest="token_command", required=True)
    t = tokens.add_parser("keygen", help="write a new secret mesh key to a file readable by you only")
    t.add_argument("--key-file", required=True)
    t = tokens.add_parser("issue", help="print a signed token for a client")
    t.add_argument("--client", required=True, help="the client's name, recorded with its usage")
    t.add_argument("--expires", default="30d", help="validity: 30d, 12h, 45m, 2w or seconds (default 30d)")
    t.add_argument("--key-file", required=True)
    t = tokens.add_parser("revoke", help="add a token (or its id) to a revocation list; prints the id")
    t.add_argument("token", help="the token or its id")
    t.add_argument("--revoked-file", required=True, help="the file the nodes read (--auth-revoked-file)")
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("usage", help="usage totals per client from a node's sqlite ledger")
    p.add_argument("--db", required=True, help="the ledger's database (the node's --ledger-path)")
    p.add_argument("--sessions", action="store_true", help="one line per client and session")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=cmd_usage)

    p = sub.add_parser("demo", help="a tiny model, a DHT and two Far Nodes on loopback, then a generation")
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--model-dir", default=None, help="where the demo checkpoint lives (trained if missing)")
    p.add_argument("--train-only", action="store_true", help="train the demo model if missing, print its path")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "simulate", help="compare routing policies on a synthetic mesh and workload; prints JSON",
        description="Unset options take SimulationConfig's defaults; the JSON output echoes every value used.",
    )  # fmt: skip
    p.add_argument("--config", metavar="FILE.json", help="SimulationConfig fields as JSON; options below override")
    p.add_argument("--policies", help="comma-separated policy names (default: every registered policy)")
    p.add_argument("--nodes", type=int, help="Far Nodes in the mesh (default 1000)")
    p.add_argument("--layers", type=int, help="layers of the model (default 80)")
    p.add_argument("--clients", type=int, help="client locations, each with its own round trips to the nodes")
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
    _accept_log_level(sub)  # `farmesh node ... --log-level DEBUG` works too
    return parser


def _accept_log_level(subparsers) -> None:
    """Give every subcommand (nested ones too) ``--log-level``; unset, the root's value stands."""
    for subparser in subparsers.choices.values():
        subparser.add_argument("--log-level", default=argparse.SUPPRESS, help="DEBUG, INFO, WARNING or ERROR")
        for action in subparser._actions:
            if isinstance(action, argparse._SubParsersAction):
                _accept_log_level(action)


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
    finally:
        # The process ends now: spare it the collector's walk over torch's and transformers' objects at
        # exit (1.2 s; a stopped Far Node then exits in 0.2 s).
        gc.freeze()


if __name__ == "__main__":
    main()
