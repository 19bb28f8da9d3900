"""The README's main job: a small GPT-3-style model (alternating dense and banded attention)
learns Shakespeare on a laptop CPU in a few minutes, then writes some.

    python experiments/default.py                      # defaults: a few minutes on 2 cores
    python experiments/default.py --steps 50 --set num_layers=2 --mesh fsdp=-1

The corpus ships with the package (zoo/assets); Macbeth and The Tempest are held out for
validation. A sentencepiece BPE tokenizer is trained on the rest (cached in --data-dir).
Rerunning the same command in the same --workdir resumes from the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

import jax
import numpy as np

import zoo
from zoo import experiment, tasks
from zoo.data.text import prepare_shakespeare
from zoo.sampling import sample
from zoo.train import adamw
from zoo.train.loop import train

MODEL = zoo.GPTConfig(
    vocab_size=2048, context_length=128, num_layers=4, d_model=128, num_heads=4, d_ff=512,
    attention_pattern=("dense", "banded"), window=32, dropout=0.0,
)


def parse_args():
    parser = experiment.parser(__doc__, workdir="runs/default", steps=600, batch=16, log_every=50,
                               checkpoint_every=200)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    parser.add_argument("--warmup", type=int, default=60, help="linear warm-up steps (default 60)")
    parser.add_argument("--data-dir", type=pathlib.Path, default=pathlib.Path("runs/data"),
                        help="cache of the tfds build and the tokenizer (default runs/data)")
    parser.add_argument("--eval-batches", type=int, default=20, help="validation batches (default 20)")
    parser.add_argument("--samples", type=int, default=2, help="texts to sample at the end (default 2)")
    parser.add_argument("--sample-tokens", type=int, default=120, help="tokens per sample (default 120)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    mesh = experiment.start(args)
    cfg = zoo.configs.override(MODEL, args.set)
    corpus = prepare_shakespeare(args.data_dir, cfg.context_length, vocab_size=cfg.vocab_size)
    print(f"corpus: {corpus.train.size:,} training and {corpus.validation.size:,} validation tokens; "
          f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices")

    model = zoo.GPT(cfg)
    task = tasks.language_model(model, corpus.train, corpus.validation, args.batch, args.seed, args.eval_batches)
    config = {"model": dataclasses.asdict(cfg), "args": vars(args)}
    summary = train(task, adamw(args.lr, args.steps, args.warmup), mesh, args.workdir,
                    experiment.loop_config(args), config)
    if summary.get("preempted"):
        return
    if "eval_loss" in summary:
        print(f"step {args.steps}: validation loss {summary['eval_loss']:.3f} nats/token, "
              f"perplexity {math.exp(summary['eval_loss']):.1f}")

    if not args.samples:
        return
    prompt = np.asarray([corpus.tokenizer.encode("ROMEO.\n")] * args.samples, np.int32)
    texts = sample(model, summary["state"]["params"], prompt, args.sample_tokens,
                   jax.random.key(args.seed), temperature=0.8)
    if jax.process_index() == 0:
        for i, tokens in enumerate(jax.device_get(texts)):
            print(f"\n--- sample {i + 1} ---\n{corpus.tokenizer.decode(tokens.tolist())}")


if __name__ == "__main__":
    main()
