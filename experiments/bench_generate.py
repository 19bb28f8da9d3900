"""Benchmark generation: zoo.generate against Hugging Face transformers' generate on the same GPT-2
weights, the cached decode step's latency against recomputation by position, and the KV-cache
memory of GPT-3's rolling banded cache.

    python experiments/bench_generate.py                       # gpt2-small, batch 1 and 8
    python experiments/bench_generate.py --batch-sizes 1 8 --max-new-tokens 64 --json gen.json --plot gen.png
    python experiments/bench_generate.py --preset gpt2-medium --batch-sizes 1 8 32 --max-new-tokens 128
    JAX_PLATFORMS=cpu python experiments/bench_generate.py --preset tiny     # seconds: a 2-layer model

1. Tokens/s: a GPT2LMHeadModel with random weights (seeded, nothing downloaded) is converted with
   zoo.interop.from_transformers, so both frameworks decode from identical float32 weights, greedily,
   on the same device (torch on the GPU when jax is on one and torch has CUDA), from the same random
   prompts of --prompt-length tokens, --max-new-tokens each (no stop tokens: transformers gets
   min_new_tokens = max_new_tokens). First untimed calls: zoo's (it compiles) and a one-token one of
   transformers' (warm-up); then the median of --repeats calls counts, prefill included. "agree" is
   the fraction of new tokens the two produce alike (greedy from identical weights: near 1). torch
   uses --torch-threads threads, XLA all cores. On a CPU that other jobs share, threads that wait for
   each other lose most of their time: compare single-threaded there, with --torch-threads 1 and
   XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1".
2. Latency by position, batch 1: one cached single-token step (GPT.extend, as zoo.generate steps,
   over caches holding the positions before it) beside recomputing the model over all the tokens so
   far (model.apply, compiled per length), at --positions; the median of --step-repeats calls each,
   compiled ahead of time.
3. Cache memory of --memory-preset (GPT-3: dense and banded layers alternate) at its context, from
   jax.eval_shape of init_caches (nothing allocated): banded layers' rolling cache of `window` slots
   against every layer caching the whole context, in float32 and bfloat16.
4. On H100/H200 GPUs (or any device, given --peak-hbm-gbps): the decode step's HBM-bandwidth use,
   (param bytes + cache bytes) / step time / peak, the step time being a zoo call's seconds over the
   new tokens.

Needs the interop extra (torch, transformers): pip install -e ".[interop]"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from bench_vs_pytorch import import_interop  # experiments/bench_vs_pytorch.py, beside this file

import zoo
from zoo import configs, interop
from zoo.models.gpt import GPT, GPTConfig, advance, init_caches
from zoo.nn.transformer import KVCache
from zoo.report import HelpFormatter, fmt, markdown_table, settings

if TYPE_CHECKING:
    import torch

MiB = 2**20
# transformers.GPT2Config fields of each model size: "tiny" for tests, the GPT-2 presets' shapes.
PRESETS = {
    "tiny": dict(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=128),
    **{
        name: dict(
            n_layer=cfg.num_layers,
            n_embd=cfg.d_model,
            n_head=cfg.num_heads,
            n_positions=cfg.context_length,
            vocab_size=cfg.vocab_size,
        )
        for name, cfg in configs.GPT_PRESETS.items()
        if name.startswith("gpt2")
    },
}
BANDED_PRESETS = [name for name, cfg in configs.GPT_PRESETS.items() if "banded" in cfg.attention_pattern]
THROUGHPUT = {
    "batch": "batch",
    "new tokens": "new_tokens",
    "zoo tokens/s": "zoo_tokens_per_s",
    "transformers tokens/s": "transformers_tokens_per_s",
    "zoo / transformers": "ratio",
    "agree": "agree",
    "zoo first call (s)": "zoo_first_call_s",
    "zoo ms/step": "step_ms",
    "params + cache (MiB)": "step_mib",
}
LATENCY = {
    "tokens so far": "tokens_so_far",
    "cached step (ms)": "cached_ms",
    "recompute (ms)": "recompute_ms",
    "recompute / cached": "recompute_over_cached",
}
MEMORY = {
    "preset": "preset",
    "context": "context",
    "window": "window",
    "dtype": "dtype",
    "batch": "batch",
    "rolling cache (MiB)": "rolling_mib",
    "full cache (MiB)": "full_mib",
    "rolling / full": "ratio",
}
# Peak HBM bandwidth in GB/s by device kind, the first name the kind contains (NVIDIA's data sheets;
# H100 and H200 are the SXM figures of zoo.bench.CHIPS).
PEAK_HBM_GBPS = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100": 3350.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--preset", default="gpt2-small", choices=list(PRESETS), help="model size of parts 1 and 2")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="prompts decoded at once")
    parser.add_argument("--prompt-length", type=int, default=32, help="tokens in each (random) prompt")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per prompt")
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed generate calls per framework and batch size (median reported)"
    )
    parser.add_argument(
        "--step-repeats", type=int, default=3, help="timed calls per position of part 2, each way (median reported)"
    )
    parser.add_argument(
        "--positions",
        type=int,
        nargs="+",
        help="tokens so far at which to time one more token; none given: context/16, /8, /4, /2 and the context",
    )
    parser.add_argument(
        "--memory-preset", default="gpt3-small", choices=BANDED_PRESETS, help="the model whose caches part 3 sizes"
    )
    parser.add_argument(
        "--peak-hbm-gbps",
        type=float,
        help="peak memory bandwidth in GB/s for the HBM-use column (default on H100 / H200: "
        + ", ".join(f"{kind} {peak:.0f}" for kind, peak in PEAK_HBM_GBPS.items())
        + "; otherwise no column)",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=os.cpu_count(),
        help="torch's intra-op threads (on a busy CPU, 1 can be much faster: see above)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights and the prompts")
    parser.add_argument("--json", metavar="PATH", help="also write the settings and rows as JSON to PATH")
    parser.add_argument("--plot", metavar="PATH", help="also draw tokens/s, latency and cache memory as a PNG")
    args = parser.parse_args(argv)
    context = PRESETS[args.preset]["n_positions"]
    if args.repeats < 1 or args.step_repeats < 1:
        parser.error("--repeats and --step-repeats must be >= 1")
    if args.prompt_length < 1 or args.max_new_tokens < 1 or args.prompt_length + args.max_new_tokens > context:
        parser.error(f"need 1 <= --prompt-length, 1 <= --max-new-tokens and their sum <= the context ({context})")
    if any(not 1 <= p <= context for p in args.positions or ()):
        parser.error(f"--positions must lie in [1, {context}] (the context of --preset {args.preset})")
    return args


def torch_model(preset: str, seed: int) -> torch.nn.Module:
    """A GPT2LMHeadModel of the preset's shape with seeded random weights, in eval mode (no dropout), on
    the GPU when jax runs on one and torch can use it (else the CPU), so both decode on the same device."""
    torch, transformers = import_interop()
    torch.manual_seed(seed)
    hf_config = transformers.GPT2Config(**PRESETS[preset], bos_token_id=None, eos_token_id=None, pad_token_id=0)
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    return transformers.GPT2LMHeadModel(hf_config).eval().to(device)


def timed(call: Callable[[], Any], repeats: int) -> tuple[Any, list[float]]:
    """(the last output, the seconds of each of `repeats` calls); `call` returns once its work is done."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = call()
        seconds.append(time.perf_counter() - start)
    return out, seconds


def blocking(function: Callable, *args: Any) -> Callable[[], Any]:
    """A call of function(*args) that returns once its result is computed."""
    return lambda: jax.block_until_ready(function(*args))


def zoo_call(model: GPT, params: Any, prompts: np.ndarray, new_tokens: int) -> Callable[[], np.ndarray]:
    """One greedy zoo.generate of the prompts per call, without stop tokens, blocking until done."""
    return lambda: np.asarray(jax.block_until_ready(zoo.generate(model, params, prompts, new_tokens, stop_tokens=())))


def torch_call(model: torch.nn.Module, prompts: np.ndarray, new_tokens: int) -> Callable[[], np.ndarray]:
    """One greedy transformers generate of exactly `new_tokens` per prompt per call (KV cache, no grad)."""
    torch, _ = import_interop()
    ids = torch.from_numpy(prompts.astype(np.int64)).to(model.device)

    def call() -> np.ndarray:
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                use_cache=True,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
            )
        return out[:, ids.shape[1] :].cpu().numpy()

    return call


def tree_bytes(tree: Any) -> int:
    """Bytes of every array (or shape-dtype struct) in a pytree."""
    return sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))


def cache_bytes(cfg: GPTConfig, batch: int) -> int:
    """Bytes of `init_caches(cfg, batch)`, computed by jax.eval_shape without allocating them."""
    return tree_bytes(jax.eval_shape(lambda: init_caches(cfg, batch)))


def peak_hbm(flag_gbps: float | None) -> float | None:
    """Peak memory bandwidth in bytes/s: the flag's, else the data sheet's for an H100/H200, else None."""
    kind = jax.devices()[0].device_kind.lower() if jax.default_backend() == "gpu" else ""
    gbps = flag_gbps or next((peak for name, peak in PEAK_HBM_GBPS.items() if name.lower() in kind), None)
    return None if gbps is None else gbps * 1e9


def throughput_rows(args: argparse.Namespace, hf_model: torch.nn.Module, cfg: GPTConfig, params: Any) -> list[dict]:
    """Per batch size: both frameworks' tokens/s on the same prompts, their ratio and agreement, and
    (with a known peak) the decode step's HBM-bandwidth use."""
    model, peak, new = GPT(cfg), peak_hbm(args.peak_hbm_gbps), args.max_new_tokens
    prompts = np.random.default_rng(args.seed).integers(0, cfg.vocab_size, (max(args.batch_sizes), args.prompt_length))
    rows = []
    for batch in args.batch_sizes:
        zoo_generate = zoo_call(model, params, prompts[:batch], new)
        _, (first_s,) = timed(zoo_generate, 1)  # compiles
        ours, ours_s = timed(zoo_generate, args.repeats)
        timed(torch_call(hf_model, prompts[:batch], 1), 1)  # warms up
        theirs, theirs_s = timed(torch_call(hf_model, prompts[:batch], new), args.repeats)
        ours_s, theirs_s = statistics.median(ours_s), statistics.median(theirs_s)
        row = {
            "batch": batch,
            "new_tokens": new,
            "zoo_tokens_per_s": batch * new / ours_s,
            "transformers_tokens_per_s": batch * new / theirs_s,
            "ratio": theirs_s / ours_s,
            "agree": float(np.mean(ours == theirs)),
            "zoo_first_call_s": first_s,
            "step_ms": 1e3 * ours_s / new,
            "step_bytes": tree_bytes(params) + cache_bytes(cfg, batch),
        }
        row["step_mib"] = row["step_bytes"] / MiB
        if peak:
            row["hbm_use"] = row["step_bytes"] / (ours_s / new) / peak
        rows.append(row)
        print(f"measured batch {batch}", file=sys.stderr, flush=True)
    return rows


def filled(cfg: GPTConfig, length: int) -> dict[str, KVCache]:
    """Caches of one row whose slots hold the positions < `length` (a ring slot the latest of them), as
    a prefill of `length` tokens leaves them, with zero keys and values: a step costs the same whatever
    they hold, and no prefill has to run (or compile)."""

    def fill(cache: KVCache) -> KVCache:
        slots = np.arange(cache.pos.shape[-1])
        latest = length - 1 - np.mod(length - 1 - slots, slots.size)
        return cache.replace(pos=jnp.broadcast_to(np.where(latest >= 0, latest, -1), cache.pos.shape))

    return {name: fill(cache) for name, cache in init_caches(cfg, 1).items()}


def latency_rows(cfg: GPTConfig, params: Any, positions: list[int], repeats: int, seed: int) -> list[dict]:
    """Per number of tokens so far n (the new one included), at batch 1: the median seconds of one
    cached step at position n - 1 over a cache of the n - 1 tokens before it (GPT.extend, as
    zoo.generate steps), and of the model over all n tokens (model.apply, compiled per length)."""
    model = GPT(cfg)
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (1, cfg.context_length)), jnp.int32)

    def step(params: Any, token: jax.Array, caches: dict[str, KVCache], position: jax.Array) -> tuple:
        caches = advance(caches, position, jnp.ones_like(position))
        return model.apply({"params": params}, token[:, None], caches, method=GPT.extend)

    def recompute(params: Any, tokens: jax.Array) -> jax.Array:
        return model.apply({"params": params}, tokens)[:, -1]

    one_step = jax.jit(step).lower(params, tokens[:, 0], filled(cfg, 0), jnp.zeros(1, jnp.int32)).compile()
    rows = []
    for n in positions:
        cached = (params, tokens[:, n - 1], filled(cfg, n - 1), jnp.array([n - 1], jnp.int32))
        _, cached_s = timed(blocking(one_step, *cached), repeats)
        whole = jax.jit(recompute).lower(params, tokens[:, :n]).compile()
        _, recompute_s = timed(blocking(whole, params, tokens[:, :n]), repeats)
        cached_ms, recompute_ms = 1e3 * statistics.median(cached_s), 1e3 * statistics.median(recompute_s)
        rows.append(
            {
                "tokens_so_far": n,
                "cached_ms": cached_ms,
                "recompute_ms": recompute_ms,
                "recompute_over_cached": recompute_ms / cached_ms,
            }
        )
        print(f"measured {n} tokens so far", file=sys.stderr, flush=True)
    return rows


def memory_rows(preset: str, batch_sizes: list[int]) -> list[dict]:
    """Cache bytes of the preset at its context per dtype and batch: banded layers holding a ring of
    `window` slots against the same model with every layer dense (a slot per position)."""
    rows = []
    for dtype in ("float32", "bfloat16"):
        rolling = configs.gpt(preset, dtype=dtype)
        full = dataclasses.replace(rolling, attention_pattern=("dense",))
        for batch in batch_sizes:
            rolling_bytes, full_bytes = cache_bytes(rolling, batch), cache_bytes(full, batch)
            rows.append(
                {
                    "preset": preset,
                    "context": rolling.context_length,
                    "window": rolling.window,
                    "dtype": dtype,
                    "batch": batch,
                    "rolling_bytes": rolling_bytes,
                    "full_bytes": full_bytes,
                    "rolling_mib": rolling_bytes / MiB,
                    "full_mib": full_bytes / MiB,
                    "ratio": rolling_bytes / full_bytes,
                }
            )
    return rows


def table(rows: list[dict], columns: dict[str, str], left: int = 0) -> str:
    """The rows as a markdown table: one column per header in `columns`, showing the row's value at its key."""
    return markdown_table(list(columns), [[fmt(row[key]) for key in columns.values()] for row in rows], left)


def plot(results: dict, path: str) -> None:
    """Three panels: tokens/s per batch size, latency by tokens so far, cache MiB per batch and dtype."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no plot at {path}")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed_ax, latency_ax, memory_ax) = plt.subplots(1, 3, figsize=(15, 4))
    throughput = results["throughput"]
    x = np.arange(len(throughput))
    for offset, key, label in ((-0.2, "zoo_tokens_per_s", "zoo"), (0.2, "transformers_tokens_per_s", "transformers")):
        speed_ax.bar(x + offset, [r[key] for r in throughput], width=0.4, label=label)
    speed_ax.set_xticks(x, [f"batch {r['batch']}" for r in throughput])
    speed_ax.set_ylabel("tokens/s")
    latency = results["latency"]
    for key, label in (("cached_ms", "cached step"), ("recompute_ms", "recompute")):
        latency_ax.plot([r["tokens_so_far"] for r in latency], [r[key] for r in latency], marker="o", label=label)
    latency_ax.set_xlabel("tokens so far")
    latency_ax.set_ylabel("one more token (ms)")
    memory = results["memory"]
    x = np.arange(len(memory))
    for offset, key, label in ((-0.2, "rolling_bytes", "rolling banded"), (0.2, "full_bytes", "full context")):
        memory_ax.bar(x + offset, [r[key] / MiB for r in memory], width=0.4, label=label)
    memory_ax.set_xticks(x, [f"{r['dtype']}\nbatch {r['batch']}" for r in memory])
    memory_ax.set_ylabel(f"{memory[0]['preset']} cache (MiB)")
    for ax in (speed_ax, latency_ax, memory_ax):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Measure the three parts, print their tables and optionally write JSON and a plot."""
    args = parse_args(argv)
    torch, _ = import_interop()
    torch.set_num_threads(args.torch_threads)
    hf_model = torch_model(args.preset, args.seed)
    cfg, params = interop.from_transformers(hf_model)[:2]
    positions = args.positions or sorted({max(1, cfg.context_length >> k) for k in range(5)})
    config = {
        "preset": args.preset,
        "model": {k: getattr(cfg, k) for k in ("num_layers", "d_model", "num_heads", "context_length", "vocab_size")},
        "prompt_length": args.prompt_length,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "step_repeats": args.step_repeats,
        "jax": f"{jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()})",
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "torch": f"{torch.__version__} on {hf_model.device}, {torch.get_num_threads()} threads, "
        f"{hf_model.config._attn_implementation} attention",
    }
    print(settings(config), end="\n\n", flush=True)
    results = {
        "config": config,
        "throughput": throughput_rows(args, hf_model, cfg, params),
        "latency": latency_rows(cfg, params, positions, args.step_repeats, args.seed),
        "memory": memory_rows(args.memory_preset, args.batch_sizes),
    }
    hbm = {"HBM use": "hbm_use"} if "hbm_use" in results["throughput"][0] else {}
    print(f"\n## Tokens/s, greedy, {args.prompt_length}-token prompts (zoo ms/step: a zoo call's time per new token)\n")
    print(table(results["throughput"], THROUGHPUT | hbm))
    print(f"\n## One more token at batch 1, context {cfg.context_length}: the cached step against recomputation\n")
    print(table(results["latency"], LATENCY))
    print(f"\n## KV-cache memory of {args.memory_preset}: banded layers' rolling cache against full-context caches\n")
    print(table(results["memory"], MEMORY, left=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
