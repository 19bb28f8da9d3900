"""Benchmark dense vs banded causal attention, forward + backward, as a markdown table.

    python experiments/bench_attention.py [--lengths 1024 2048 4096 8192] [--windows 128 256] [--json PATH]

Each row times the jitted grad of sum(attention(q, k, v) * cotangent) w.r.t. q, k, v: one warm-up
call, then the median of --repeats calls. Temp memory is XLA's compile-time memory_analysis().
Dense's cost ignores the window (only its mask changes), so it is measured once per length and
its row repeated for each window. No correctness check here: tests/ compare against dense.
"""

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from zoo.nn.dot_product_attention import IMPLEMENTATIONS, attention, supports
from zoo.report import HelpFormatter, fmt, markdown_table, settings

MiB = 2**20
CANDIDATES = ("dense", "banded", "cudnn", "splash")  # "xla" runs only when asked for


def measure(impl: str, window: int, q: jax.Array, k: jax.Array, v: jax.Array, ct: jax.Array, repeats: int) -> dict:
    """Compile and time the forward + backward pass of one implementation at one size."""

    def loss(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        out = attention(q, k, v, window=window, implementation=impl)
        return jnp.sum(out.astype(jnp.float32) * ct.astype(jnp.float32))

    start = time.perf_counter()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()  # may be None on some backends
    jax.block_until_ready(compiled(q, k, v))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v))
        times.append(time.perf_counter() - start)
    sizes = {
        f"{name}_mib": getattr(memory, f"{name}_size_in_bytes") / MiB if memory else None
        for name in ("temp", "argument", "output")
    }
    return {"time_ms": 1e3 * statistics.median(times), **sizes, "compile_s": compile_s}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is zero."""
    return numerator / denominator if numerator is not None and denominator else None


def runs(impl: str, shape: tuple[int, ...], dtype: jnp.dtype, window: int) -> bool:
    """Whether supports() accepts `impl` for windowed causal attention at this shape and dtype."""
    return supports(impl, jax.ShapeDtypeStruct(shape, dtype), causal=True, window=window, key_mask=None)


def parse_args() -> argparse.Namespace:
    """The command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="sequence lengths T")
    parser.add_argument("--windows", type=int, nargs="+", default=[128, 256], help="window sizes w")
    parser.add_argument("--batch", type=int, default=1, help="batch size B")
    parser.add_argument("--heads", type=int, default=4, help="attention heads H")
    parser.add_argument("--head-dim", type=int, default=64, help="head dimension D")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="q, k, v dtype")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per row (median reported)")
    parser.add_argument(
        "--implementations",
        nargs="+",
        choices=IMPLEMENTATIONS,
        default=list(CANDIDATES),
        help="those that supports() rejects on this backend, dtype or size are skipped",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    return parser.parse_args()


def main() -> None:
    """Run the sweep, print the table and optionally write JSON."""
    args = parse_args()
    dtype = jnp.dtype(args.dtype)
    shapes = {length: (args.batch, length, args.heads, args.head_dim) for length in args.lengths}
    impls = [i for i in args.implementations if any(runs(i, shapes[t], dtype, w) for t in shapes for w in args.windows)]
    config = {
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "dtype": args.dtype,
        "shape": f"[B={args.batch}, T, H={args.heads}, D={args.head_dim}]",
        "implementations": impls,
        "unsupported": [i for i in args.implementations if i not in impls],
    }
    print(settings(config), end="\n\n", flush=True)

    rows, results = [], {}
    for length in args.lengths:
        q, k, v, ct = (jax.random.normal(jax.random.key(i), shapes[length], dtype) for i in range(4))
        for window in args.windows:
            for impl in [i for i in impls if runs(i, shapes[length], dtype, window)]:
                key = (impl, length, None if impl == "dense" else window)  # dense's cost ignores w
                if key not in results:
                    print(f"measuring T={length} w={window} {impl}", file=sys.stderr, flush=True)
                    results[key] = measure(impl, window, q, k, v, ct, args.repeats)
                rows.append({"T": length, "w": window, "implementation": impl, **results[key]})
    for row in rows:
        reference = results.get(("dense", row["T"], None), {})
        row["speedup"] = ratio(reference.get("time_ms"), row["time_ms"])
        row["memory_ratio"] = ratio(reference.get("temp_mib"), row["temp_mib"])

    header = ["T", "w", "implementation", "time (ms)", "speed-up", "temp (MiB)", "memory ratio", "compile (s)"]
    keys = ["T", "w", "implementation", "time_ms", "speedup", "temp_mib", "memory_ratio", "compile_s"]
    print(markdown_table(header, [[fmt(row[key]) for key in keys] for row in rows]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": config, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
