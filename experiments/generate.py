"""Continue prompts with a trained run (any language-model experiment's --workdir), through
zoo.load and zoo.generate.

    python experiments/generate.py --workdir runs/default --prompt "ROMEO."
    python experiments/generate.py --workdir runs/default --prompt-file prompts.txt --temperature 0 --max-new-tokens 50
    python experiments/generate.py --workdir runs/default --prompt "KING." --num-samples 4 --top-p 0.9 --seed 3

A prompt file holds one prompt a line. Each continuation is printed after its prompt.
"""

import argparse

import jax
from etils import epath

import zoo
from zoo import sharding


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="the run's folder (local or gs://)")
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
    prompts = args.prompt + (args.prompt_file.read_text().splitlines() if args.prompt_file else [])
    if not prompts:
        parser.error("give --prompt or --prompt-file")
    mesh = sharding.mesh_for(args.mesh)
    run = zoo.load(args.workdir, mesh)
    texts = [text for text in prompts for _ in range(args.num_samples)]
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
        )
    for i, (text, tokens) in enumerate(zip(texts, jax.device_get(new))):
        print(f"--- {i + 1} (step {run.step}) ---\n{text}{run.tokenizer.decode(tokens.tolist())}")


if __name__ == "__main__":
    main()
