"""Tokenize a corpus once into its token store (zoo.data.store), ahead of training: the language-model
experiments given the same corpus flags and --data-dir then find the store ready and start in seconds.

    python experiments/prepare_text.py --tfds lm1b --eval-split test --workers 16 --data-dir gs://BUCKET/data
    python experiments/prepare_text.py --text-dir my_texts --vocab-size 8192

The tokenizer (unless --tokenizer gives one) is trained on a fixed, seeded sample of the training
documents (at most zoo.data.text.TOKENIZER_SAMPLE_BYTES of text), the same on every host. Shards
already written are kept: a killed preparation, rerun, goes on where it stopped.
"""

import argparse

from zoo import experiment
from zoo.data.text import prepare_corpus


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    experiment.add_corpus_flags(parser, vocab_size=2048)
    args = parser.parse_args(argv)
    corpus = prepare_corpus(
        args.data_dir,
        1,  # rows are cut when read; the store does not depend on the context length
        args.vocab_size,
        tfds_name=args.tfds,
        text_dir=args.text_dir,
        eval_split=args.eval_split,
        tokenizer_path=args.tokenizer,
        workers=args.workers,
    )
    folder = corpus.train.folder.parent
    print(f"token store {folder}: {corpus.train.size:,} training and {corpus.validation.size:,} held-out tokens")


if __name__ == "__main__":
    main()
