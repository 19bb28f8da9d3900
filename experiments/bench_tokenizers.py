"""Sentencepiece BPE (byte fallback) vs GPT-2's byte-level BPE at equal vocabulary sizes: tokens
per character and per UTF-8 byte of held-out text, on the shipped Shakespeare (Macbeth and The
Tempest held out) and on classical Chinese poems (every tenth poem held out), each tokenizer
trained on the rest of its corpus. Fewer tokens per byte: more text in a context, cheaper steps.

Then the default experiment (experiments/default.py, run as a subprocess) trains on the shipped
Shakespeare with each kind at --train-vocab-size for --train-steps steps, and its final validation
loss L (nats per token) becomes bits per byte of the text it was measured on: L / ln 2 x tokens /
bytes. Fewer bits per byte: a better model of the same text, whatever its tokenizer.

    python experiments/bench_tokenizers.py --chinese tang300.txt
    python experiments/bench_tokenizers.py --vocab-sizes 1024 4096 --train-steps 0 --json tokenizers.json

The Chinese file is in the fortunes format (poems separated by lines holding "%"), e.g. the Three
Hundred Tang Poems of Debian's `fortunes-zh` (/usr/share/games/fortunes/tang300) with its terminal
colour codes stripped.

The runs evaluate every whole batch of 16 validation rows (the experiment's default, 20 batches,
would score a different share of the plays per tokenizer). A row is context_length + 1 tokens cut
from Macbeth then The Tempest, each followed by <|endoftext|>, as the experiment packs them. Tokens
and bytes count exactly the scored rows, which leave out the rows past the last whole batch and the
tokens past the last whole row (the last 1.0% and 2.3% of the plays' bytes at 2048 tokens). One
approximation remains: the first token of a row is never a target (nothing precedes it), so bits
per byte counts those tokens, one in context_length + 1, at the mean loss of the others.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import pathlib
import shlex
import subprocess
import sys
import tempfile

import default  # experiments/default.py, beside this file

from zoo import configs
from zoo.data import shakespeare
from zoo.experiment import non_negative, positive
from zoo.report import fmt, markdown_table
from zoo.tokenizer import TextTokenizer, load_tokenizer, train_byte_level_bpe, train_tokenizer

KINDS = {  # --kinds name: (the tables' name, its file's name, how to train it into that file)
    "sentencepiece": (
        "sentencepiece BPE",
        "spm.model",
        lambda texts, path, size: train_tokenizer(texts, path.with_suffix(""), size),
    ),
    "byte-level": ("byte-level BPE", "tokenizer.json", train_byte_level_bpe),
}
EVAL_BATCH = 16  # validation rows per batch of the runs: default.py's training batch
DEFAULT_STEPS = default.parse_args([]).steps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chinese", type=pathlib.Path, help="a fortunes file of Chinese poems (default: skip)")
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[1024, 4096], help="(default 1024 4096)")
    parser.add_argument(
        "--kinds", nargs="+", choices=list(KINDS), default=list(KINDS), help="the tokenizers to compare (default both)"
    )
    parser.add_argument(
        "--train-steps",
        type=non_negative,
        default=DEFAULT_STEPS,
        help=f"steps of the default experiment with each tokenizer (default {DEFAULT_STEPS}, its own: as long as "
        f"two runs of the quickstart; 0: no training, the token rates alone take seconds)",
    )
    parser.add_argument(
        "--train-vocab-size",
        type=positive,
        default=default.MODEL.vocab_size,
        help=f"the tokenizers' vocabulary in those runs (default {default.MODEL.vocab_size}, the experiment's)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a model config override for those runs, e.g. --set num_layers=2 (repeatable)",
    )
    parser.add_argument(
        "--workdir",
        type=pathlib.Path,
        help="keep the tokenizers, the runs' workdirs and their data caches here; a rerun reuses the tokenizers "
        "and resumes the runs (default: a temporary folder, removed at the end)",
    )
    parser.add_argument("--json", type=pathlib.Path, help="also write the rows to this JSON file")
    return parser.parse_args(argv)


def shakespeare_splits() -> tuple[list[str], list[str]]:
    """(training plays, held-out plays in name order, as the experiment's validation split holds them)."""
    works = shakespeare.works()
    held_out = sorted(shakespeare.VALIDATION_PLAYS)
    return [t for n, t in works.items() if n not in held_out], [works[n] for n in held_out]


def poem_splits(path: pathlib.Path) -> tuple[list[str], list[str]]:
    """(poems, every tenth poem) of a fortunes file."""
    poems = [p.strip() + "\n" for p in path.read_text(encoding="utf-8").split("\n%\n") if p.strip()]
    return [p for i, p in enumerate(poems) if i % 10], poems[::10]


def tokenizer_folder(corpus: str, size: int, kind: str) -> str:
    """Where a tokenizer of the bench is kept, inside the work folder."""
    return f"{corpus}-{size}-{KINDS[kind][0]}".replace(" ", "_")


def trained(kind: str, texts: list[str], size: int, folder: pathlib.Path) -> tuple[pathlib.Path, TextTokenizer]:
    """The `kind` tokenizer of `size` tokens trained on `texts`, and its file in `folder` (loaded if there)."""
    _, name, train = KINDS[kind]
    path = folder / name
    return path, load_tokenizer(path) if path.exists() else train(texts, path, size)


def rates(tokenizer: TextTokenizer, texts: list[str]) -> dict[str, float]:
    """Tokens per character and per UTF-8 byte of `texts` (each document encoded alone)."""
    tokens = sum(len(tokenizer.encode(text)) for text in texts)
    return {
        "tokens_per_char": tokens / sum(len(text) for text in texts),
        "tokens_per_byte": tokens / sum(len(text.encode("utf-8")) for text in texts),
    }


def evaluated_rows(tokenizer: TextTokenizer, documents: list[str], width: int) -> int:
    """Rows of `width` tokens a run scores: the whole batches of EVAL_BATCH rows of the packed validation stream."""
    stream = sum(len(tokenizer.encode(text)) + 1 for text in documents)  # + <|endoftext|>
    return stream // width // EVAL_BATCH * EVAL_BATCH


def prefix_bytes(tokenizer: TextTokenizer, documents: list[str], tokens: int) -> int:
    """UTF-8 bytes of the text that the first `tokens` tokens of the packed stream of `documents` spell."""
    total = 0
    for text in documents:
        ids = tokenizer.encode(text)
        if tokens <= len(ids):
            return total + len(tokenizer.decode(ids[:tokens]).encode("utf-8"))
        total, tokens = total + len(text.encode("utf-8")), tokens - len(ids) - 1
    return total


def train_default(args: argparse.Namespace, tokenizer: pathlib.Path, work: pathlib.Path, batches: int) -> float:
    """Train experiments/default.py with `tokenizer` in work/runs (a fresh process: the user's command,
    exactly) and return its final validation loss in nats per token, from the run's metrics.jsonl."""
    workdir = work / "runs" / tokenizer.parent.name
    command = [
        sys.executable,
        default.__file__,
        *("--tokenizer", str(tokenizer), "--workdir", str(workdir), "--data-dir", str(work / "data")),
        *("--steps", str(args.train_steps), "--eval-batch", str(EVAL_BATCH), "--eval-batches", str(batches)),
        *("--samples", "0", "--checkpoint-every", "0"),
        *(flag for item in args.set for flag in ("--set", item)),
    ]
    print(f"\n{shlex.join(command)}", flush=True)
    subprocess.run(command, check=True)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [record["eval_loss"] for record in records if "eval_loss" in record][-1]


def model_rows(args: argparse.Namespace, work: pathlib.Path) -> list[dict]:
    """Per kind: the default experiment's validation loss per token, tokens per byte and bits per byte."""
    train, held_out = shakespeare_splits()
    width = configs.override(default.MODEL, args.set).context_length + 1
    rows = []
    for kind in args.kinds:
        folder = work / tokenizer_folder("Shakespeare", args.train_vocab_size, kind)
        path, tokenizer = trained(kind, train, args.train_vocab_size, folder)
        scored = evaluated_rows(tokenizer, held_out, width)
        loss = train_default(args, path, work, scored // EVAL_BATCH)
        tokens = scored * width
        text_bytes = prefix_bytes(tokenizer, held_out, tokens)
        rows.append(
            {
                "corpus": "Shakespeare",
                "vocab_size": args.train_vocab_size,
                "tokenizer": KINDS[kind][0],
                "train_steps": args.train_steps,
                "val_loss_per_token": loss,
                "evaluated_tokens": tokens,
                "evaluated_bytes": text_bytes,
                "tokens_per_byte": tokens / text_bytes,
                "bits_per_byte": loss / math.log(2) * tokens / text_bytes,
            }
        )
    return rows


def rate_rows(args: argparse.Namespace, work: pathlib.Path) -> list[dict]:
    """Per corpus, vocabulary size and kind: tokens per character and per byte of the held-out text."""
    corpora = {"Shakespeare": shakespeare_splits()}
    if args.chinese:
        corpora["Chinese poems"] = poem_splits(args.chinese)
    rows = []
    for corpus, (train, held_out) in corpora.items():
        for size in args.vocab_sizes:
            for kind in args.kinds:
                try:
                    _, tokenizer = trained(kind, train, size, work / tokenizer_folder(corpus, size, kind))
                except ValueError as error:  # a vocabulary the corpus cannot support
                    print(f"skipped {KINDS[kind][0]} at {size} on {corpus}: {error}")
                    continue
                rows.append(
                    {"corpus": corpus, "vocab_size": size, "tokenizer": KINDS[kind][0], **rates(tokenizer, held_out)}
                )
    return rows


def print_tables(rated: list[dict], models: list[dict]) -> None:
    """The token rates, and the runs' losses if any, as markdown tables."""
    print(
        markdown_table(
            ["corpus", "vocabulary", "tokenizer", "tokens / character", "tokens / byte"],
            [
                [
                    r["corpus"],
                    fmt(r["vocab_size"]),
                    r["tokenizer"],
                    fmt(r["tokens_per_char"], 3),
                    fmt(r["tokens_per_byte"], 3),
                ]
                for r in rated
            ],
            left=3,
        )
    )
    if models:
        print(
            "\n"
            + markdown_table(
                ["vocabulary", "tokenizer", "steps", "validation loss / token", "tokens / byte", "bits / byte"],
                [
                    [
                        fmt(r["vocab_size"]),
                        r["tokenizer"],
                        fmt(r["train_steps"]),
                        fmt(r["val_loss_per_token"], 3),
                        fmt(r["tokens_per_byte"], 3),
                        fmt(r["bits_per_byte"], 3),
                    ]
                    for r in models
                ],
                left=2,
            )
        )


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    """Print (and with --json write) the token rates and, unless --train-steps 0, the runs' bits per byte."""
    args = parse_args(argv)
    with contextlib.nullcontext(args.workdir) if args.workdir else tempfile.TemporaryDirectory() as folder:
        work = pathlib.Path(folder)
        results = {"rates": rate_rows(args, work), "models": model_rows(args, work) if args.train_steps else []}
    print_tables(results["rates"], results["models"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
