"""Chain-of-thought and self-consistency at laptop scale: a small GPT trained on arithmetic word
problems with worked solutions (written by code: the steps, then "The answer is N."), then asked
held-out problems. Greedy decoding answers once; self-consistency samples k reasoning paths at a
temperature and takes the majority answer (Wang et al. 2022).

    python experiments/self_consistency.py                       # trains, then evaluates k = 1 5 10 20
    python experiments/self_consistency.py --steps 0 --plot sc.png   # evaluate the run in --workdir again

Whether voting helps a model this small is the result, whichever way it goes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

import default  # experiments/default.py, beside this file
import jax
import numpy as np
from etils import epath
from tqdm import tqdm

import zoo
from zoo import experiment, sharding
from zoo.evaluation import harness, tasks
from zoo.evaluation.consistency import self_consistency
from zoo.report import fmt, markdown_table
from zoo.runs import Run

MODEL = dataclasses.replace(default.MODEL, vocab_size=512)  # the quickstart's model, a smaller vocabulary
PROBLEMS_PER_FILE = 500


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags (of `argv`, default the command line), with this experiment's defaults."""
    parser = experiment.parser(__doc__, workdir="runs/self_consistency", steps=1500, batch=32, checkpoint_every=500)
    experiment.add_text_flags(parser, vocab_size=MODEL.vocab_size, data_dir="runs/self_consistency_data")
    parser.add_argument("--problems", type=int, default=20_000, help="training problems written (default 20000)")
    parser.add_argument("--held-out", type=int, default=200, help="test problems (default 200)")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 5, 10, 20], help="paths voted over (default 1 5 10 20)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    parser.add_argument("--json", type=pathlib.Path, help="also write the results to this JSON file")
    parser.add_argument("--plot", type=pathlib.Path, help="also plot accuracy against k to this PNG")
    args = parser.parse_args(argv)
    args.samples = 0  # the evaluation below is this experiment's sampling
    return args


def write_problems(folder: epath.Path, task: tasks.Task) -> None:
    """The task's training problems as text files (train/) and its test problems (validation/), a
    blank line after each solved problem, training problems that repeat a test question left out."""
    tested = {e.question for e in task.test}
    for split, examples in (("train", [e for e in task.train if e.question not in tested]), ("validation", task.test)):
        (folder / split).mkdir(parents=True, exist_ok=True)
        for i in range(0, len(examples), PROBLEMS_PER_FILE):
            text = "".join(f"{e.question}{e.answer}\n\n" for e in examples[i : i + PROBLEMS_PER_FILE])
            (folder / split / f"{i // PROBLEMS_PER_FILE:04d}.txt").write_text(text)


def evaluate(run: Run, task: tasks.Task, args: argparse.Namespace) -> list[dict]:
    """Greedy accuracy and self-consistency accuracy (and mean agreement) for each k on the test problems."""
    prompts = [e.question for e in task.test]
    truth = [task.extract(e.answer) for e in task.test]
    greedy = harness.generate_until(run.model, run.params, run.tokenizer, prompts, task.until, task.max_new_tokens)
    rows = [{"method": "greedy", "k": 1, "acc": float(np.mean([task.extract(g) == t for g, t in zip(greedy, truth)]))}]
    per_call = max(1, 160 // max(args.k))  # prompts a call: rows = prompts × k
    for k in tqdm(args.k, desc="self-consistency"):
        votes = []
        for first in range(0, len(prompts), per_call):
            votes += self_consistency(
                run.model,
                run.params,
                run.tokenizer,
                prompts[first : first + per_call],
                k,
                temperature=args.temperature,
                rng=jax.random.key(args.seed + k),
                extract=task.extract,
                until=task.until,
                max_new_tokens=task.max_new_tokens,
            )
        rows.append(
            {
                "method": f"self-consistency (T={args.temperature})",
                "k": k,
                "acc": float(np.mean([v.answer == t for v, t in zip(votes, truth)])),
                "agreement": float(np.mean([v.agreement for v in votes])),
            }
        )
    return rows


def plot(rows: list[dict], path: pathlib.Path) -> None:
    """Self-consistency accuracy against k, greedy as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    voted = rows[1:]
    ax.plot([r["k"] for r in voted], [r["acc"] for r in voted], marker="o", label=voted[0]["method"])
    ax.axhline(rows[0]["acc"], color="gray", linestyle="--", label="greedy")
    ax.set(xlabel="sampled reasoning paths k", ylabel="held-out accuracy", title="Self-consistency")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    task = tasks.chain_of_thought(count=max(args.problems, args.held_out))
    task = dataclasses.replace(task, train=task.train[: args.problems], test=task.test[: args.held_out])
    if args.text_dir is None and args.tfds is None and args.store is None:
        args.text_dir = epath.Path(args.data_dir) / f"problems-{args.problems}-{args.held_out}"
        if jax.process_index() == 0 and not (args.text_dir / "validation").exists():
            write_problems(args.text_dir, task)
    if args.steps:
        default.train(args, MODEL)
    mesh = sharding.mesh_for(args.mesh)
    run = zoo.load(args.workdir, mesh)
    with sharding.sharding_context(mesh):
        rows = evaluate(run, task, args)
    print(f"\n## Chain-of-thought arithmetic, {len(task.test)} held-out problems (step {run.step})\n")
    cells = [
        [r["method"], str(r["k"]), fmt(r["acc"], 3), fmt(r["agreement"], 3) if "agreement" in r else ""] for r in rows
    ]
    print(markdown_table(["method", "k", "accuracy", "mean agreement"], cells))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
