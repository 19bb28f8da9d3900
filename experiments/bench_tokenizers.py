"""Sentencepiece BPE (byte fallback) vs GPT-2's byte-level BPE at equal vocabulary sizes: tokens
per character and per UTF-8 byte of held-out text, on the shipped Shakespeare (Macbeth and The
Tempest held out) and on classical Chinese poems (every tenth poem held out), each tokenizer
trained on the rest of its corpus. Fewer tokens per byte: more text in a context, cheaper steps.

    python experiments/bench_tokenizers.py --chinese tang300.txt
    python experiments/bench_tokenizers.py --vocab-sizes 1024 4096 --json tokenizers.json

The Chinese file is in the fortunes format (poems separated by lines holding "%"), e.g. the Three
Hundred Tang Poems of Debian's `fortunes-zh` (/usr/share/games/fortunes/tang300) with its terminal
colour codes stripped.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

from zoo.data import shakespeare
from zoo.report import fmt, markdown_table
from zoo.tokenizer import TextTokenizer, train_byte_level_bpe, train_tokenizer

KINDS = {
    "sentencepiece BPE": lambda texts, folder, size: train_tokenizer(texts, folder / "spm", size),
    "byte-level BPE": lambda texts, folder, size: train_byte_level_bpe(texts, folder / "tokenizer.json", size),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chinese", type=pathlib.Path, help="a fortunes file of Chinese poems (default: skip)")
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[1024, 4096], help="(default 1024 4096)")
    parser.add_argument("--json", type=pathlib.Path, help="also write the rows to this JSON file")
    return parser.parse_args(argv)


def shakespeare_splits() -> tuple[list[str], list[str]]:
    """(training plays, held-out plays) of the shipped corpus."""
    works = shakespeare.works()
    held_out = shakespeare.VALIDATION_PLAYS
    return [t for n, t in works.items() if n not in held_out], [works[n] for n in held_out]


def poem_splits(path: pathlib.Path) -> tuple[list[str], list[str]]:
    """(poems, every tenth poem) of a fortunes file."""
    poems = [p.strip() + "\n" for p in path.read_text(encoding="utf-8").split("\n%\n") if p.strip()]
    return [p for i, p in enumerate(poems) if i % 10], poems[::10]


def rates(tokenizer: TextTokenizer, texts: list[str]) -> dict[str, float]:
    """Tokens per character and per UTF-8 byte of `texts` (each document encoded alone)."""
    tokens = sum(len(tokenizer.encode(text)) for text in texts)
    return {
        "tokens_per_char": tokens / sum(len(text) for text in texts),
        "tokens_per_byte": tokens / sum(len(text.encode("utf-8")) for text in texts),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    corpora = {"Shakespeare": shakespeare_splits()}
    if args.chinese:
        corpora["Chinese poems"] = poem_splits(args.chinese)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for corpus, (train, held_out) in corpora.items():
            for size in args.vocab_sizes:
                for kind, make in KINDS.items():
                    folder = pathlib.Path(work) / f"{corpus}-{size}-{kind}".replace(" ", "_")
                    try:
                        tokenizer = make(train, folder, size)
                    except ValueError as error:  # a vocabulary the corpus cannot support
                        print(f"skipped {kind} at {size} on {corpus}: {error}")
                        continue
                    rows.append({"corpus": corpus, "vocab_size": size, "tokenizer": kind, **rates(tokenizer, held_out)})
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
                for r in rows
            ],
            left=3,
        )
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
