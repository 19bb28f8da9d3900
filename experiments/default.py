"""The README's main job: a small GPT-3-style model (alternating dense and banded attention)
learns Shakespeare byte by byte on a laptop CPU in a few minutes, then writes some.

    python experiments/default.py                      # defaults: about 4 minutes on 2 cores
    python experiments/default.py --steps 50 --set num_layers=2 --set window=16

The corpus ships with the package (zoo/assets); macbeth and tempest are held out for
validation. Bytes are the tokens (vocabulary 256), so there is no tokenizer to train.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import time

import jax
import numpy as np
from tqdm import tqdm

import zoo
from zoo.data import batches, shakespeare
from zoo.sampling import sample
from zoo.train import adamw, lm_eval_loss, lm_train_step

MODEL = zoo.GPTConfig(
    vocab_size=256, context_length=128, num_layers=4, d_model=128, num_heads=4, d_ff=512,
    attention_pattern=("dense", "banded"), window=32, dropout=0.0,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="training steps")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    parser.add_argument("--eval-batches", type=int, default=20, help="validation batches at the end")
    parser.add_argument("--samples", type=int, default=2, help="texts to sample at the end")
    parser.add_argument("--sample-tokens", type=int, default=300, help="bytes per sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("runs/default"),
                        help="where the config and the metrics are written")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model config field, e.g. --set num_layers=6 (repeatable)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    cfg = zoo.configs.override(MODEL, args.set)
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "config.json").write_text(
        json.dumps({"model": dataclasses.asdict(cfg), "run": {k: str(v) for k, v in vars(args).items()}}, indent=2)
    )
    train_text, val_text = shakespeare.split()
    train_tokens, val_tokens = batches.encode_bytes(train_text), batches.encode_bytes(val_text)
    print(f"corpus: {len(train_tokens):,} training bytes, {len(val_tokens):,} validation bytes; "
          f"devices: {jax.devices()}")

    model = zoo.GPT(cfg)
    rng = jax.random.key(args.seed)
    params = jax.jit(model.init)(rng, np.zeros((1, cfg.context_length), np.int32))["params"]
    print(f"model: {sum(p.size for p in jax.tree.leaves(params)):,} parameters, "
          f"{cfg.num_layers} layers {cfg.attention_pattern}, window {cfg.window}")
    optimizer = adamw(args.lr, args.steps, args.warmup)
    opt_state = optimizer.init(params)
    train_step, eval_loss = lm_train_step(model, optimizer), lm_eval_loss(model)

    data_rng = np.random.default_rng(args.seed)
    start, losses = time.perf_counter(), []
    with open(args.workdir / "metrics.jsonl", "w") as metrics, tqdm(range(args.steps), desc="train") as bar:
        for step in bar:
            tokens = batches.random_windows(train_tokens, args.batch, cfg.context_length + 1, data_rng)
            params, opt_state, loss = train_step(params, opt_state, tokens, jax.random.fold_in(rng, step))
            losses.append(loss)
            if (step + 1) % 50 == 0 or step + 1 == args.steps:
                recent = float(np.mean(jax.device_get(losses[-50:])))
                bar.set_postfix(loss=f"{recent:.3f}")
                metrics.write(json.dumps({"step": step + 1, "train_loss": recent}) + "\n")

    val = [eval_loss(params, tokens) for tokens in
           batches.sequential_windows(val_tokens, args.batch, cfg.context_length + 1, args.eval_batches)]
    val_loss = float(np.mean(jax.device_get(val)))
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f} s; validation loss "
          f"{val_loss:.3f} nats/byte, perplexity {math.exp(val_loss):.2f}")

    prompt = batches.encode_bytes("ROMEO.\n")[None].repeat(args.samples, axis=0)
    texts = sample(model, params, prompt, args.sample_tokens, jax.random.fold_in(rng, args.steps), temperature=0.8)
    for i, text in enumerate(texts):
        print(f"\n--- sample {i + 1} ---\n{batches.decode_bytes(text)}")


if __name__ == "__main__":
    main()
