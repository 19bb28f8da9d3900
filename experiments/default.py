"""The README's main job: a small GPT-3-style model (alternating dense and banded attention)
learns Shakespeare on a laptop CPU in a few minutes, then writes some.

    python experiments/default.py                      # defaults: a few minutes on 2 cores
    python experiments/default.py --steps 50 --set num_layers=2 --mesh fsdp=-1

The corpus ships with the package (zoo/assets); Macbeth and The Tempest are held out for
validation. A sentencepiece BPE tokenizer is trained on the rest (cached in --data-dir).
Rerunning the same command in the same --workdir resumes from the last checkpoint.
"""

import argparse

import zoo
from zoo import experiment

MODEL = zoo.GPTConfig(
    vocab_size=2048,
    context_length=128,
    num_layers=4,
    d_model=128,
    num_heads=4,
    d_ff=512,
    attention_pattern=("dense", "banded"),
    window=32,
    dropout=0.0,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags (of `argv`, default the command line), with this experiment's defaults."""
    parser = experiment.parser(__doc__, workdir="runs/default", steps=600, batch=16, checkpoint_every=200)
    experiment.add_text_flags(parser, vocab_size=MODEL.vocab_size)
    return parser.parse_args(argv)


def train(args: argparse.Namespace, model: zoo.GPTConfig = MODEL) -> dict:
    """Train `model` as the flags say with this experiment's recipe: GPT-3's optimizer (AdamW, betas
    (0.9, 0.95), clipping 1, weight decay 0.1), a higher peak for this small model, warm-up over the
    first 10% of the run, cosine to 10% at its end."""
    return experiment.run_language_model(
        args, model, "gpt3-small", learning_rate=2e-3, warmup_steps=args.steps // 10, decay_steps=args.steps
    )


def main() -> None:
    train(parse_args())


if __name__ == "__main__":
    main()
