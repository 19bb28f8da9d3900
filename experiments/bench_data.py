"""How fast a corpus becomes a token store, and how cheaply training reads it. The shipped
Shakespeare, replicated 1x, 4x and 16x (each copy's plays under new names) as local text files:

- preparation: the store built from the tfds build with 1, 2 and all-core worker processes
  (MB of text per second, peak resident memory of the preparing process and of its workers);
- reading: time from start to the first batch of a prepared store, the batches per second one
  process sustains (gpt2-small's 32 rows of 1025 tokens, random steps), and its peak resident
  memory, which should stay flat as the corpus grows. An H100 training gpt2-small takes a batch
  of 32 x 1024 tokens about every 100 ms: 10 batches/s is what the reader must beat.

    python experiments/bench_data.py                          # scales 1 4 16, workers 1 2 all
    python experiments/bench_data.py --scales 1 4 --workers 1 2 --json data.json

Each measurement runs in a fresh process, so peak memory is that measurement's own.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

from zoo.report import fmt, markdown_table

ROWS, LENGTH = 32, 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16], help="copies of the corpus")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, os.cpu_count()], help="preparation processes")
    parser.add_argument("--batches", type=int, default=200, help="batches read for the read rate (default 200)")
    parser.add_argument(
        "--documents-per-shard",
        type=int,
        default=4,
        help="plays per shard (default 4: a play is ~125 KB, so shards of ~0.5 MB)",
    )
    parser.add_argument("--vocab-size", type=int, default=2048, help="tokenizer vocabulary (default 2048)")
    parser.add_argument("--json", type=pathlib.Path, help="also write the rows to this JSON file")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def peak_mb() -> dict[str, float]:
    """Peak resident memory (MB) of this process and of its largest finished child."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_mb": own, "worker_peak_mb": children}


def child_prepare(dataset: str, tokenizer: str, root: str, workers: str, documents_per_shard: str) -> dict:
    from zoo.data import store
    from zoo.tokenizer import Tokenizer

    loaded = Tokenizer.load(tokenizer)
    start = time.perf_counter()
    built = store.build_store(
        dataset,
        ("train", "validation"),
        loaded,
        root,
        workers=int(workers),
        documents_per_shard=int(documents_per_shard),
        progress=False,
    )
    seconds = time.perf_counter() - start
    mb = sum(split["bytes"] for split in built.index["splits"].values()) / 1e6
    return {"seconds": seconds, "mb": mb, "mb_per_s": mb / seconds, **peak_mb()}


def child_read(folder: str, batches: str) -> dict:
    import numpy as np

    from zoo.data import store, text

    start = time.perf_counter()
    rows = store.TokenStore(folder).rows("train", LENGTH)
    pipeline = text.TextPipeline(rows, ROWS, seed=0)
    pipeline.batch_at(0)
    first = time.perf_counter() - start
    first_step = int(np.random.default_rng(0).integers(0, 1_000_000))
    steps = range(first_step, first_step + int(batches))  # consecutive, as training reads them
    start = time.perf_counter()
    for step in steps:
        pipeline.batch_at(int(step))
    rate = len(steps) / (time.perf_counter() - start)
    return {"first_batch_s": first, "batches_per_s": rate, "tokens": rows.size, **peak_mb()}


def in_child(*args: str) -> dict:
    """Run a measurement in a fresh process; its JSON result."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def corpus(scale: int, folder: pathlib.Path) -> pathlib.Path:
    """The shipped corpus `scale` times over as text files (train) plus its held-out plays."""
    from zoo.data import shakespeare

    for play, body in shakespeare.works().items():
        held_out = play in shakespeare.VALIDATION_PLAYS
        for copy in range(1 if held_out else scale):
            split = folder / ("validation" if held_out else "train")
            split.mkdir(parents=True, exist_ok=True)
            (split / f"{play}-{copy}.txt").write_text(body, encoding="utf-8")
    return folder


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.child:
        kind, *rest = args.child
        print(json.dumps((child_prepare if kind == "prepare" else child_read)(*rest)))
        return []
    from zoo.data import shakespeare, text
    from zoo.tokenizer import train_tokenizer

    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = pathlib.Path(work)
        model = work / "tokenizer"
        train_tokenizer(list(shakespeare.works().values()), model, args.vocab_size)
        for scale in args.scales:
            builder = text.build_text_files(corpus(scale, work / f"text-{scale}"), work / "tfds", f"x{scale}")
            folder = None
            for workers in args.workers:
                root = work / f"store-{scale}-{workers}"
                result = in_child(
                    "prepare",
                    os.fspath(builder.data_dir),
                    f"{model}.model",
                    os.fspath(root),
                    str(workers),
                    str(args.documents_per_shard),
                )
                rows.append({"scale": scale, "kind": "prepare", "workers": workers, **result})
                folder = next(root.iterdir())
            result = in_child("read", os.fspath(folder), str(args.batches))
            rows.append({"scale": scale, "kind": "read", **result})
            print(f"scale {scale}: done", file=sys.stderr)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


def table(rows: list[dict]) -> str:
    """Preparation and reading side by side, one line per measurement."""
    header = ["corpus", "measurement", "MB", "MB/s", "first batch (s)", "batches/s", "peak MB", "workers' peak MB"]
    lines = []
    for row in rows:
        name = f"prepare, {row['workers']} workers" if row["kind"] == "prepare" else "read"
        lines.append(
            [
                f"{row['scale']}x",
                name,
                fmt(row.get("mb"), 1),
                fmt(row.get("mb_per_s"), 2),
                fmt(row.get("first_batch_s"), 3),
                fmt(row.get("batches_per_s"), 0),
                fmt(row["peak_mb"], 0),
                fmt(row["worker_peak_mb"], 0),
            ]
        )
    return markdown_table(header, lines, left=2)


if __name__ == "__main__":
    main()
