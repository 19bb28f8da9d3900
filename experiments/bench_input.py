"""Does the input pipeline keep the chips fed? The train step of default.py (a small GPT on
Shakespeare) and of vit_fashion_mnist.py (a small ViT on Fashion-MNIST), each trained by the loop
on the devices at hand on its real batches (built and sent to the devices ahead by the
loop's prefetcher) and on one constant batch. A ratio real / constant of 1.00 means the step never
waits for its input.

    python experiments/bench_input.py                       # both experiments, 2 x 2 runs of 50 steps
    python experiments/bench_input.py --prefetch 0          # the same without prefetching
    python experiments/bench_input.py --experiments vit_fashion_mnist --steps 120 --json input.json

Each run starts fresh in a temporary workdir, with the experiment's model, batch and data (and
--set overrides); the loop logs the mean step time of every --log-every steps and the first interval
(compilation, warm-up) is dropped. Real and constant runs alternate, --repeats of each (real first,
then constant first, ...), so that a machine busy with other work slows both alike; they share one
compiled step (through a temporary persistent compilation cache). The median interval of each kind
is reported, in milliseconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import tempfile

import default  # experiments/default.py and experiments/vit_fashion_mnist.py, beside this file
import jax
import vit_fashion_mnist

import zoo
from zoo import configs, experiment, tasks
from zoo.data.text import prepare_corpus
from zoo.report import fmt, markdown_table
from zoo.train.loop import LoopConfig, Task, train
from zoo.train.steps import adamw


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--experiments",
        nargs="+",
        default=["default", "vit_fashion_mnist"],
        choices=["default", "vit_fashion_mnist"],
        help="which experiments (default both)",
    )
    parser.add_argument("--steps", type=int, default=50, help="training steps per run (default 50)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="runs of each kind, alternated; even, each kind goes first as often (default 2)",
    )
    parser.add_argument("--log-every", type=int, default=5, help="steps per timed interval (default 5)")
    parser.add_argument(
        "--prefetch",
        type=int,
        default=LoopConfig.prefetch,
        help=f"batches prepared ahead (default {LoopConfig.prefetch}; 0: none)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of both models' configs, e.g. --set num_layers=2 (repeatable)",
    )
    parser.add_argument("--data-dir", default="runs/data", help="cache of tfds builds and tokenizers")
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=default.MODEL.vocab_size,
        help=f"default.py's tokenizer vocabulary (default {default.MODEL.vocab_size})",
    )
    parser.add_argument("--data", help="the ViT's Fashion-MNIST IDX folder (default as vit_fashion_mnist.py's)")
    parser.add_argument("--synthetic", type=int, metavar="N", help="the ViT on N random images instead of the data")
    parser.add_argument("--json", type=pathlib.Path, help="also write the rows to this JSON file")
    return parser.parse_args(argv)


def gpt_task(args: argparse.Namespace) -> tuple[Task, int]:
    """default.py's model and packed Shakespeare rows, and its batch."""
    flags = default.parse_args(["--data-dir", args.data_dir, "--vocab-size", str(args.vocab_size)])
    cfg = configs.override(default.MODEL, args.set)
    corpus = prepare_corpus(flags.data_dir, cfg.context_length, flags.vocab_size)
    cfg = dataclasses.replace(cfg, vocab_size=corpus.tokenizer.vocab_size)
    task = tasks.language_model(zoo.GPT(cfg), corpus.train, corpus.validation, flags.batch, flags.seed, eval_batches=0)
    return task, flags.batch


def vit_task(args: argparse.Namespace) -> tuple[Task, int]:
    """vit_fashion_mnist.py's model and augmented training images, and its batch."""
    data = ["--data", args.data] if args.data else []
    synthetic = ["--synthetic", str(args.synthetic)] if args.synthetic else []
    flags = vit_fashion_mnist.parse_args(["--data-dir", args.data_dir, *data, *synthetic])
    cfg = configs.override(vit_fashion_mnist.MODEL, args.set)
    source = vit_fashion_mnist.image_data(flags)
    images = source.pipeline(source.examples(cfg, "train"), flags.batch, cfg, flags.seed, training=True)
    return tasks.image_classifier(zoo.ViT(cfg), images, images, eval_batches=0), flags.batch


def step_ms(task: Task, mesh: jax.sharding.Mesh, args: argparse.Namespace) -> list[float]:
    """The loop's mean step time of each logged interval but the first, training `task` afresh."""
    loop = LoopConfig(
        steps=args.steps, log_every=args.log_every, checkpoint_every=args.steps, progress=False, prefetch=args.prefetch
    )
    with tempfile.TemporaryDirectory() as workdir:
        train(task, adamw(1e-3, args.steps, 1), mesh, workdir, loop, {})
        records = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [1000 * record["step_s"] for record in records[1:]]


def constant(task: Task) -> Task:
    """`task` fed its first batch at every step."""
    batch = task.train_batch(0)
    return dataclasses.replace(task, train_batch=lambda step: batch)


def compare(task: Task, mesh: jax.sharding.Mesh, args: argparse.Namespace) -> tuple[float, float]:
    """Median step ms of `task` on its real batches and on a constant one, in runs alternated
    real, constant, constant, real, ... so that neither kind always goes first."""
    real, fixed = [], []
    runs = [(task, real), (constant(task), fixed)]
    for repeat in range(args.repeats):
        for run, times in runs[::-1] if repeat % 2 else runs:
            times += step_ms(run, mesh, args)
    return statistics.median(real), statistics.median(fixed)


def table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    header = ["experiment", "batch", "devices", "prefetch", "real ms/step", "constant ms/step", "real / constant"]
    return markdown_table(
        header,
        [
            [
                row["experiment"],
                fmt(row["batch"]),
                row["devices"],
                fmt(row["prefetch"]),
                fmt(row["real_ms"], 1),
                fmt(row["constant_ms"], 1),
                fmt(row["ratio"], 3),
            ]
            for row in rows
        ],
        left=1,
    )


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        jax.config.update("jax_compilation_cache_dir", cache)  # before the first compilation
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        mesh = experiment.start(default.parse_args([]))  # the experiments' mesh: data over every device
        devices = f"{jax.device_count()} {jax.devices()[0].platform}"
        for name in args.experiments:
            task, batch = (gpt_task if name == "default" else vit_task)(args)
            real, fixed = compare(task, mesh, args)
            rows.append(
                {
                    "experiment": name,
                    "batch": batch,
                    "devices": devices,
                    "prefetch": args.prefetch,
                    "real_ms": real,
                    "constant_ms": fixed,
                    "ratio": real / fixed,
                }
            )
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
