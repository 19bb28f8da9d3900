"""Talk to a chat model that experiments/instructgpt.py trained (its sft stage or a PPO run): one
reply to --message, or a conversation typed on the terminal (an empty line ends it).

    python experiments/chat.py --workdir runs/instructgpt/ppo --message "What is 14 + 37?"
    python experiments/chat.py --workdir runs/instructgpt/sft --temperature 0.8
"""

from __future__ import annotations

import argparse
import itertools

import jax

import zoo
from zoo import experiment
from zoo.alignment import chat


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags (of `argv`, default the command line)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a chat run: <instructgpt workdir>/sft, /ppo, ...")
    p.add_argument("--message", help="reply to this one message and stop (default: a conversation)")
    p.add_argument("--system", help="a system message before the conversation")
    p.add_argument("--max-tokens", type=experiment.positive, default=48, help="the longest reply (default 48)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--seed", type=int, default=0, help="of the sampling (default 0)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run = zoo.load(args.workdir)
    if "assistant" not in getattr(run.tokenizer, "names", ()):
        raise SystemExit(f"{args.workdir} is not a chat model (its tokenizer has no chat tokens)")
    messages = [("system", args.system)] if args.system else []
    key = jax.random.key(args.seed)
    for turn in itertools.count():
        text = args.message if args.message is not None else input("you> ")
        if not text:
            return
        messages.append(("user", text))
        answer = chat.reply(
            run.model,
            run.params,
            run.tokenizer,
            [messages],
            args.max_tokens,
            args.temperature,
            jax.random.fold_in(key, turn),
        )[0]
        messages.append(("assistant", answer))
        print(answer if args.message is not None else f"model> {answer}", flush=True)
        if args.message is not None:
            return


if __name__ == "__main__":
    main()
