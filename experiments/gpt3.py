"""GPT-3 of any size (or any GPT preset) with the paper's recipe: AdamW β = (0.9, 0.95),
clipping 1.0, weight decay 0.1, warm-up then cosine to 10%, the size's learning rate and
batch (Brown et al., 2020, Table 2.1), bf16 compute with float32 params.

    # a TPU v5p pod slice, lm1b from tfds, FSDP over every chip:
    python experiments/gpt3.py --preset gpt3-xl --tfds lm1b --eval-split test --mesh fsdp=-1
    # a CPU smoke run on the shipped Shakespeare:
    python experiments/gpt3.py --preset gpt3-small --steps 3 --batch 2 --set num_layers=2 --set context_length=64 --set window=16

--batch defaults to the paper's batch in tokens over the context length; the model's
vocabulary follows the tokenizer's.
"""

import argparse

import zoo
from zoo import experiment
from zoo.configs import GPT3_TRAINING


def main() -> None:
    presets = argparse.ArgumentParser(add_help=False)
    presets.add_argument("--preset", default="gpt3-small", choices=list(zoo.configs.GPT_PRESETS),
                         help="model size (default gpt3-small)")
    preset = presets.parse_known_args()[0].preset  # the defaults below depend on it
    cfg = zoo.configs.gpt(preset, dtype="bfloat16")
    recipe = GPT3_TRAINING.get(preset, GPT3_TRAINING["gpt3-small"])
    parser = experiment.parser(__doc__, workdir=f"runs/{preset}", steps=int(300e9 // recipe.batch_tokens),
                               batch=int(recipe.batch_tokens) // cfg.context_length, checkpoint_every=1000,
                               parents=(presets,))
    experiment.add_text_flags(parser, vocab_size=32768)
    args = parser.parse_args()
    warmup = max(1, int(375e6 // (args.batch * cfg.context_length)))  # 375M tokens of warm-up
    experiment.run_language_model(args, cfg, learning_rate=recipe.learning_rate, warmup=min(warmup, args.steps))


if __name__ == "__main__":
    main()
