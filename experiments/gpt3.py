"""GPT-3 of any size (or any GPT preset) with its paper's recipe (zoo.train.recipes); for GPT-3:
AdamW β = (0.9, 0.95), clipping 1.0, weight decay 0.1, linear warm-up over 375M tokens, cosine to
10% over 260B tokens then flat, the size's learning rate and batch (Brown et al., 2020, Table 2.1
and appendix B), bf16 compute with float32 params.

    # a TPU v5p pod slice, lm1b from tfds, FSDP over every chip:
    python experiments/gpt3.py --preset gpt3-xl --tfds lm1b --eval-split test --mesh fsdp=-1
    # a CPU smoke run on the shipped Shakespeare:
    python experiments/gpt3.py --preset gpt3-small --steps 3 --batch 2 --set num_layers=2 \\
        --set context_length=64 --set window=16

--batch defaults to the paper's batch in tokens over the context length (after --set), --steps to
300B tokens at that batch; the schedule's horizons in tokens become steps at the batch and context
the run uses. The model's vocabulary follows the tokenizer's.
"""

import argparse

import zoo
from zoo import experiment
from zoo.train import recipes


def main() -> None:
    presets = argparse.ArgumentParser(add_help=False)
    presets.add_argument(
        "--preset", default="gpt3-small", choices=list(zoo.configs.GPT_PRESETS), help="model size (default gpt3-small)"
    )
    early = argparse.ArgumentParser(add_help=False, allow_abbrev=False, parents=[presets])
    early.add_argument("--set", action="append", default=[])
    known = early.parse_known_args()[0]  # the defaults below depend on the model and its context
    cfg = zoo.configs.gpt(known.preset, dtype="bfloat16")
    context = zoo.configs.override(cfg, known.set).context_length
    batch = max(1, round(recipes.batch_tokens(known.preset) / context))
    parser = experiment.parser(
        __doc__,
        workdir=f"runs/{known.preset}",
        steps=round(300e9 / (batch * context)),
        batch=batch,
        checkpoint_every=1000,
        parents=(presets,),
    )
    experiment.add_text_flags(parser, vocab_size=32768)
    args = parser.parse_args()
    experiment.run_language_model(args, cfg, args.preset)


if __name__ == "__main__":
    main()
