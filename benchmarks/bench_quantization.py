#!/usr/bin/env python
"""Speed and memory of each quantizer against ``none``, on a Llama large enough for weights to matter.

The model (made once with ``make_checkpoint``): hidden 1024, 8 layers, intermediate 2816, 16 heads,
about 100M parameters in the layers (400 MB in float32). Each quantizer is measured in its own
process, so memory figures do not mix: the RSS growth from loading the span, the bytes of its
weights (quantization scales included), the time of a 16-token prefill and of one-token decode steps
through all 8 layers with a SessionCache (what a node does per generated token), and how far the
span's output moves from float32. Prints JSON. bitsandbytes quantizers are included when it is
installed (``pip install farmesh[bnb]``); on a CPU they are slow, so they get fewer decode steps.
"""

import argparse
import ctypes
import gc
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

MODEL = dict(
    hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16
)
BNB_QUANTIZERS = ("bnb-int8", "nf4")


def rss_bytes() -> int:
    """Resident memory now, after handing freed heap back to the OS (glibc keeps it otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(model_dir: str, name: str, steps: int, prompt_tokens: int) -> dict:
    """Load layers 0:8 with quantizer ``name`` and time them; runs in a fresh process."""
    import torch

    from farmesh_core.architecture import adapter_for
    from farmesh_core.checkpoint import Checkpoint
    from farmesh_core.config import NodeConfig
    from farmesh_core.node.kv_cache import SessionCache
    from farmesh_core.node.layer_span import LayerSpan
    from farmesh_core.plugins import get_quantizers
    from farmesh_plugins.quantization import module_nbytes

    checkpoint = Checkpoint(model_dir)
    adapter = adapter_for(checkpoint.config)
    layers = adapter.num_layers(checkpoint.config)
    hidden_size = adapter.hidden_size(checkpoint.config)

    def load(quantization: str) -> LayerSpan:
        quantizer, config = get_quantizers()[quantization], NodeConfig(model_id=model_dir, quantization=quantization)
        return LayerSpan(
            checkpoint, adapter, 0, layers, torch.float32, "cpu", lambda layer, index: quantizer(layer, config)
        )

    generator = torch.Generator().manual_seed(0)
    prompt = torch.randn(1, prompt_tokens, hidden_size, generator=generator)
    tokens = torch.randn(steps, 1, 1, hidden_size, generator=generator)
    cache = SessionCache(prompt_tokens + steps)

    rss_before, began = rss_bytes(), time.perf_counter()
    span = load(name)
    load_s = time.perf_counter() - began
    with torch.inference_mode():
        span.forward(prompt[:, :4], 0, layers, SessionCache(4))  # warm-up: every weight is touched once
    # Weights read from a safetensors file stay memory-mapped until a quantizer replaces them: they
    # count once touched, which is what a serving node holds.
    rss_delta = rss_bytes() - rss_before
    with torch.inference_mode():
        began = time.perf_counter()
        output = span.forward(prompt, 0, layers, cache, 0)
        prefill_s = time.perf_counter() - began
        decode = []
        for position in range(steps):
            began = time.perf_counter()
            span.forward(tokens[position], 0, layers, cache, prompt_tokens + position)
            decode.append(time.perf_counter() - began)
    result = {
        "load_s": round(load_s, 2),
        "weight_bytes": sum(module_nbytes(layer) for layer in span.layers.values()),
        "rss_delta_bytes": rss_delta,
        "prefill_ms": round(prefill_s * 1e3, 2),
        "decode_steps": steps,
        "decode_ms_median": round(statistics.median(decode) * 1e3, 3),
        "decode_ms_min": round(min(decode) * 1e3, 3),
        "decode_ms_p90": round(sorted(decode)[int(0.9 * (len(decode) - 1))] * 1e3, 3),
    }
    if name != "none":  # accuracy of the prefill output, against float32 loaded afterwards
        del span
        gc.collect()
        with torch.inference_mode():
            reference = load("none").forward(prompt, 0, layers, SessionCache(prompt_tokens), 0)
        result["output_max_rel_error"] = round(((output - reference).abs().max() / reference.abs().max()).item(), 5)
        result["output_cosine"] = round(torch.cosine_similarity(output.flatten(), reference.flatten(), dim=0).item(), 5)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: made once in the temp dir)")
    parser.add_argument(
        "--quantizers", default=None, help="comma-separated (default: none, int8, bnb ones if installed)"
    )
    parser.add_argument("--steps", type=int, default=32, help="decode steps per quantizer")
    parser.add_argument(
        "--bnb-steps", type=int, default=8, help="decode steps for bitsandbytes quantizers (slow on CPU)"
    )
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 gives steadier numbers on a shared CPU)"
    )
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one quantizer, print JSON
    args = parser.parse_args()

    if args.one is not None:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(measure(args.model, args.one, args.steps, args.prompt_tokens)))
        return

    from farmesh_core.checkpoint_maker import ensure_checkpoint

    model_dir = args.model or ensure_checkpoint(
        os.path.join(tempfile.gettempdir(), "farmesh-bench-quant-llama"), **MODEL
    )
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    names = args.quantizers.split(",") if args.quantizers else ["none", "int8", *(BNB_QUANTIZERS if has_bnb else ())]
    results = {}
    for name in names:
        steps = args.bnb_steps if name in BNB_QUANTIZERS else args.steps
        command = [sys.executable, __file__, "--one", name, "--model", model_dir, "--steps", str(steps),
                   "--prompt-tokens", str(args.prompt_tokens), "--threads", str(args.threads)]  # fmt: skip
        print(f"measuring {name}...", file=sys.stderr, flush=True)
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            results[name] = {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
            continue
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    base = results.get("none", {})
    for name, result in results.items():
        if name != "none" and "error" not in result and "error" not in base and base:
            result["decode_speedup_vs_none"] = round(base["decode_ms_median"] / result["decode_ms_median"], 2)
            # the fastest steps: what the hardware can do when other processes leave the CPU alone
            result["decode_speedup_vs_none_best"] = round(base["decode_ms_min"] / result["decode_ms_min"], 2)
            result["weight_bytes_vs_none"] = round(result["weight_bytes"] / base["weight_bytes"], 3)
    import torch

    print(json.dumps({
        "model": {**MODEL, "path": model_dir},
        "torch": torch.__version__, "threads": args.threads, "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "bitsandbytes": has_bnb, "prompt_tokens": args.prompt_tokens,
        "results": results,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
