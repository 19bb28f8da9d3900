"""Continue prompts with a trained run (any language-model experiment's --workdir), or with GPT-2
weights and tokenizer from a transformers `save_pretrained` folder, through zoo.generate.

    python experiments/generate.py --workdir runs/default --prompt "ROMEO."
    python experiments/generate.py --workdir runs/default --prompt-file prompts.txt --temperature 0 --max-new-tokens 50
    python experiments/generate.py --workdir runs/default --prompt "KING." --num-samples 4 --top-p 0.9 --seed 3
    python experiments/generate.py --from-transformers path/to/gpt2 --prompt "The meaning of life is"

A prompt file holds one prompt a line. Each continuation is printed after its prompt; a single
continuation streams to the terminal as its tokens come.
"""

import argparse

import jax
import numpy as np
from etils import epath

import zoo
from zoo import runs, sharding
from zoo.tokenizer import TextTokenizer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a language-model run's folder (local or gs://)")
    source.add_argument("--from-transformers", metavar="DIR", help="a GPT-2 save_pretrained folder with its tokenizer")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompt-file", type=epath.Path, help="a file of prompts, one a line")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to add (default 200)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, help="sample among the k likeliest tokens")
    parser.add_argument("--top-p", type=float, help="sample within the smallest set of probability >= p")
    parser.add_argument("--num-samples", type=int, default=1, help="continuations per prompt (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--mesh", default="data=-1", help="the devices' layout (default data=-1)")
    args = parser.parse_args(argv)
    args.prompts = args.prompt + (args.prompt_file.read_text().splitlines() if args.prompt_file else [])
    if not args.prompts:
        parser.error("give --prompt or --prompt-file")
    return args


class Printer:
    """Prints row 0's text as its tokens come, up to its first stop token."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer, self.tokens, self.shown = tokenizer, [], ""

    def __call__(self, tokens: np.ndarray) -> None:
        if self.tokens and self.tokens[-1] == self.tokenizer.eos_id:
            return
        self.tokens.append(int(tokens[0]))
        text = self.tokenizer.decode(self.tokens)
        if not text.endswith("\ufffd"):  # a character's bytes may still be arriving
            self.show(text)

    def show(self, text: str) -> None:
        print(text[len(self.shown) :], end="", flush=True)
        self.shown = text

    def finish(self) -> None:
        """Shows what is left, then ends the line."""
        self.show(self.tokenizer.decode(self.tokens))
        print()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    mesh = sharding.mesh_for(args.mesh)
    run = (
        runs.load_transformers(args.from_transformers, mesh) if args.from_transformers else zoo.load(args.workdir, mesh)
    )
    texts = args.prompts
    printer = Printer(run.tokenizer) if len(texts) * args.num_samples == 1 else None
    if printer:
        print(f"--- 1 (step {run.step}) ---\n{texts[0]}", end="", flush=True)
    with sharding.sharding_context(mesh):
        new = zoo.generate(
            run.model,
            run.params,
            [run.tokenizer.encode(text) for text in texts],
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            stop_tokens=(run.tokenizer.eos_id,),
            rng=jax.random.key(args.seed),
            samples=args.num_samples,
            stream=printer,
        )
    if printer:
        printer.finish()
        return
    for i, tokens in enumerate(jax.device_get(new)):
        text = texts[i // args.num_samples]
        print(f"--- {i + 1} (step {run.step}) ---\n{text}{run.tokenizer.decode(tokens.tolist())}")


if __name__ == "__main__":
    main()
