"""Tokenize a corpus once into its token store (zoo.data.store), ahead of training: the language-model
experiments given the same corpus flags and --data-dir then find the store ready and start in seconds.

    python experiments/prepare_text.py --tfds lm1b --eval-split test --workers 16 --store-dir gs://BUCKET/stores
    python experiments/prepare_text.py --text-dir my_texts --vocab-size 8192
    # split across 4 hosts: each writes its quarter of the shards, then one run writes the index
    python experiments/prepare_text.py --tfds lm1b --eval-split test --host $I --hosts 4 --store-dir gs://BUCKET/stores
    python experiments/prepare_text.py --tfds lm1b --eval-split test --store-dir gs://BUCKET/stores

It prints the store's folder: `--store FOLDER` trains on it from any host (every host of a pod reads
its own rows from the shared folder), with the tokenizer the store holds, and needs neither the
corpus nor its tfds build (which live in --data-dir, on each preparing host's own disk: tfds cannot
write array_record files to gs:// without TensorFlow).

The tokenizer (unless --tokenizer gives one) is trained on a fixed, seeded sample of the training
documents (at most zoo.data.text.TOKENIZER_SAMPLE_BYTES of text), the same on every host. Shards
already written are kept: a killed preparation, rerun, goes on where it stopped.
"""

import argparse

from zoo import experiment


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    experiment.add_corpus_flags(parser, vocab_size=2048)
    parser.add_argument("--host", type=int, default=0, help="this host's index, with --hosts (default 0)")
    parser.add_argument(
        "--hosts", type=int, default=1, help="hosts sharing the preparation, shard i on host i %% hosts (default 1)"
    )
    args = parser.parse_args(argv)
    if not 0 <= args.host < args.hosts:
        parser.error(f"--host {args.host} must be in [0, --hosts {args.hosts})")
    if args.store:
        parser.error("--store opens a prepared store; this script prepares one (in --store-dir)")
    corpus = experiment.corpus_from_flags(args, 1, args.host, args.hosts)  # rows are cut when read: any length
    if corpus is None:
        print(f"host {args.host} of {args.hosts}: its shards are written; run once without --hosts to finish")
        return
    folder = corpus.train.folder.parent
    print(f"token store {folder}: {corpus.train.size:,} training and {corpus.validation.size:,} held-out tokens")
    print(f"train on it anywhere with --store {folder}")


if __name__ == "__main__":
    main()
