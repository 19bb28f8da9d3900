"""Train the same GPT-2-style model with zoo (JAX) and with PyTorch transformers; compare tokens/s.

    python experiments/bench_vs_pytorch.py [--batch 8] [--steps 5] [--warmup 2] [--set KEY=VALUE] [--json PATH]

Same model: a GPT2LMHeadModel is initialised in torch and its weights are converted with
zoo.interop.from_transformers, so both start from identical float32 weights (dropout 0, GPT-2's tanh
GELU, the same LayerNorm eps). Same step: AdamW with the same hyper-parameters and no weight decay or
clipping in either, on the same random batch every step. The first-step losses must agree (~1e-4).
Default shape: gpt2-small's vocabulary (whose output layer dominates a small GPT-2's cost) with
4 layers of width 256 (4 heads) at context 128, so a few steps take seconds per framework on 2 cores;
--set overrides it (d_ff follows 4 x d_model unless set). Times: median of --steps steps after
--warmup steps (jax's compile; torch's first iterations), blocking until the jax step is done.
One device (jax.devices()[0]); torch uses os.cpu_count() threads. MFU is model FLOPs per second
over the device's peak (on a CPU, measured by XLA on a float32 2048² matmul): near 1, a framework
can only win by doing less arithmetic.

Needs the interop extra (torch, transformers): pip install -e ".[interop]"
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
import optax

from zoo import configs, interop
from zoo.models.gpt import GPT, GPTConfig
from zoo.report import HelpFormatter, markdown_table, settings
from zoo.train.metrics import device_peak_flops, gpt_flops_per_token
from zoo.train.steps import next_token_loss, train_state, train_step_fn

if TYPE_CHECKING:
    import torch

SHAPE = dict(num_layers=4, d_model=256, num_heads=4, context_length=128, dropout=0.0)
ADAMW = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="rows per step, each context_length tokens")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a gpt2-small config field over the default shape {SHAPE} (repeatable)",
    )
    parser.add_argument("--torch-compile", action="store_true", help="also time torch.compile(model)")
    parser.add_argument("--json", metavar="PATH", help="also write the config and rows as JSON to PATH")
    return parser.parse_args(argv)


def model_config(assignments: list[str]) -> GPTConfig:
    """gpt2-small at the default shape with the --set overrides; d_ff is 4 x d_model unless set."""
    cfg = configs.override(configs.gpt("gpt2-small", **SHAPE), assignments)
    if not any(a.partition("=")[0].strip() == "d_ff" for a in assignments):
        cfg = dataclasses.replace(cfg, d_ff=4 * cfg.d_model)
    return cfg


def import_interop() -> tuple[Any, Any]:
    """The torch and transformers modules, imported only when a run needs them (--help does not);
    without them, stop naming the extra that installs them."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing comes from the hub: the model is built from a config
    try:
        import torch
        import transformers
    except ImportError as error:
        raise SystemExit(f'{error}: this benchmark needs the interop extra: pip install -e ".[interop]"') from None
    return torch, transformers


def torch_model(cfg: GPTConfig) -> torch.nn.Module:
    """A freshly initialised GPT2LMHeadModel with cfg's shape, activation, LayerNorm eps and dropout."""
    _, transformers = import_interop()
    activation = {"gelu_tanh": "gelu_new", "gelu": "gelu"}[cfg.activation]
    hf_config = transformers.GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.context_length,
        n_embd=cfg.d_model,
        n_layer=cfg.num_layers,
        n_head=cfg.num_heads,
        n_inner=cfg.d_ff,
        activation_function=activation,
        layer_norm_epsilon=cfg.layer_norm_eps,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=0.0,
        initializer_range=cfg.init_std,
        bos_token_id=None,
        eos_token_id=None,
    )
    return transformers.GPT2LMHeadModel(hf_config).train()


def zoo_step(cfg: GPTConfig, params: dict, tokens: np.ndarray) -> Callable[[], float]:
    """One jitted zoo train step per call, on jax.devices()[0], its state donated."""
    # plain AdamW; inject_hyperparams keeps the learning rate in its state, where train_step_fn reports it from
    optimizer = optax.inject_hyperparams(optax.adamw)(
        ADAMW["lr"], *ADAMW["betas"], ADAMW["eps"], weight_decay=ADAMW["weight_decay"]
    )
    step = jax.jit(train_step_fn(GPT(cfg), optimizer, next_token_loss), donate_argnums=0)
    device = jax.devices()[0]
    carry = {"state": jax.device_put(train_state(params, optimizer, jax.random.key(0)), device)}
    batch = jax.device_put(tokens.astype(np.int32), device)

    def call() -> float:
        carry["state"], metrics = jax.block_until_ready(step(carry["state"], batch))
        return float(metrics["loss"])

    return call


def torch_step(model: torch.nn.Module, tokens: np.ndarray) -> Callable[[], float]:
    """One eager PyTorch train step per call: forward, cross-entropy, backward, AdamW."""
    torch, _ = import_interop()
    optimizer = torch.optim.AdamW(model.parameters(), **ADAMW)
    batch = torch.from_numpy(tokens.astype(np.int64))
    inputs, targets = batch[:, :-1], batch[:, 1:].reshape(-1)

    def call() -> float:
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets)
        loss.backward()
        optimizer.step()
        return loss.item()

    return call


def measure(framework: str, step: Callable[[], float], warmup: int, steps: int, tokens_per_step: int) -> dict:
    """Call `step` (which returns its loss once done) warmup + steps times: a row with the median time
    and throughput of the timed steps, the first step's time, and every step's loss."""
    losses, seconds = [], []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        losses.append(step())
        seconds.append(time.perf_counter() - start)
    step_s = statistics.median(seconds[warmup:])
    return {
        "framework": framework,
        "step_ms": 1e3 * step_s,
        "tokens_per_s": tokens_per_step / step_s,
        "first_step_s": seconds[0],
        "first_loss": losses[0],
        "losses": losses,
        "seconds": seconds,
    }


def table(rows: list[dict]) -> str:
    """The rows as a markdown table, throughput relative to eager PyTorch's."""
    header = [
        "framework",
        "step (median ms)",
        "tokens/s",
        "× pytorch (eager)",
        "MFU",
        "first step (s)",
        "first loss",
        "last loss",
    ]
    cells = [
        [
            r["framework"],
            f"{r['step_ms']:.1f}",
            f"{r['tokens_per_s']:.0f}",
            f"{r['vs_pytorch']:.2f}",
            f"{r['mfu']:.2f}",
            f"{r['first_step_s']:.2f}",
            f"{r['first_loss']:.6f}",
            f"{r['losses'][-1]:.6f}",
        ]
        for r in rows
    ]
    return markdown_table(header, cells, left=1)


def main(argv: list[str] | None = None) -> None:
    """Time both frameworks on one model and batch, print the table and optionally write JSON."""
    args = parse_args(argv)
    torch, _ = import_interop()
    torch.set_num_threads(os.cpu_count())
    cfg = model_config(args.set)
    torch.manual_seed(0)
    model = torch_model(cfg)
    params = interop.from_transformers(model).params
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, cfg.context_length + 1))
    fields = ("num_layers", "d_model", "num_heads", "d_ff", "context_length", "vocab_size")
    config = {
        "model": {k: getattr(cfg, k) for k in fields},
        "batch": args.batch,
        "warmup": args.warmup,
        "steps": args.steps,
        "adamw": ADAMW,
        "jax": f"{jax.__version__} on {jax.devices()[0]}",
        "torch": f"{torch.__version__}, {torch.get_num_threads()} threads (os.cpu_count()), "
        f"{model.config._attn_implementation} attention",
    }
    print(settings(config), end="\n\n", flush=True)

    timing = (args.warmup, args.steps, args.batch * cfg.context_length)
    rows = [
        measure("zoo (jax.jit)", zoo_step(cfg, params, tokens), *timing),
        measure("pytorch (eager)", torch_step(copy.deepcopy(model), tokens), *timing),
    ]
    failure = None
    if args.torch_compile:
        try:
            compiled = torch.compile(copy.deepcopy(model))
            rows.append(measure("pytorch (torch.compile)", torch_step(compiled, tokens), *timing))
        except Exception as error:  # e.g. inductor without a C++ compiler
            failure = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
    zoo, pytorch = rows[0], rows[1]
    peak, source = device_peak_flops()
    for r in rows:
        r["vs_pytorch"] = r["tokens_per_s"] / pytorch["tokens_per_s"]
        r["mfu"] = r["tokens_per_s"] * gpt_flops_per_token(cfg) / peak
    print(table(rows))
    print(f"\nzoo/pytorch tokens/s: {zoo['vs_pytorch']:.2f}x (MFU against {peak / 1e9:.0f} GFLOP/s, {source})")
    print(
        f"first-step losses: zoo {zoo['first_loss']:.6f}, pytorch {pytorch['first_loss']:.6f} "
        f"(difference {abs(zoo['first_loss'] - pytorch['first_loss']):.1e})"
    )
    if failure:
        print(f"torch.compile skipped: {failure}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": config, "rows": rows, "torch_compile_failure": failure}, f, indent=2)


if __name__ == "__main__":
    main()
