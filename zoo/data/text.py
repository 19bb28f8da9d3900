"""Language-model data: documents from tensorflow-datasets (no TensorFlow needed), tokenized,
packed into rows of `length + 1` tokens and served in resumable, per-process batches.

    corpus = prepare_shakespeare("data", length=128)            # tfds build + tokenizer, cached
    train = TextPipeline(corpus.train, global_batch=64, seed=0)
    tokens = train.batch_at(step)                                # int32 [64, 129]

Batch k is a pure function of (seed, k, process): restarting at step k (`set_state`) replays
exactly the batches an uninterrupted run would have seen. The shuffle comes from a counter-based
hash, not a library random generator, so no numpy (or grain) upgrade can change the order.
"""

from __future__ import annotations

import abc
import functools
import itertools
import os
import pathlib
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from zoo.data import shakespeare
from zoo.data.store import TokenRows, TokenStore, build_store
from zoo.paths import absolute
from zoo.tokenizer import TextTokenizer, cached_tokenizer, fingerprint, load_tokenizer

READ_CHUNK = 1024  # records per data-source read
TOKENIZER_SAMPLE_BYTES = 200_000_000  # text a tokenizer learns from, at most (about)

HASH_SHUFFLE, HASH_AUGMENT = 0, 1  # first hash key: shuffling and augmentation draw independent numbers


def hash64(*keys: Any) -> np.ndarray:
    """SplitMix64 of integer keys (arrays broadcast): uint64 randomness fixed forever by the keys."""
    h = np.zeros((), np.uint64)
    with np.errstate(over="ignore"):
        for key in keys:
            h = h ^ np.asarray(key).astype(np.uint64)
            h = h + np.uint64(0x9E3779B97F4A7C15)
            h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            h = h ^ (h >> np.uint64(31))
    return h


@functools.lru_cache(maxsize=4)
def epoch_order(size: int, seed: int, epoch: int) -> np.ndarray:
    """The record order of one epoch: a permutation of range(size) fixed by (seed, epoch)."""
    order = np.argsort(hash64(HASH_SHUFFLE, seed, epoch, np.arange(size)), kind="stable")
    order.flags.writeable = False
    return order


class StepPipeline(abc.ABC):
    """Endless batches over `size` records, epoch after epoch, each epoch shuffled by (seed, epoch).

    The global batch at step k holds stream positions [k·global_batch, (k+1)·global_batch); process p
    gets the p-th of `process_count` equal consecutive slices of it. State is {"step", "seed"}.
    """

    def __init__(
        self,
        size: int,
        global_batch: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        shuffle: bool = True,
    ):
        if size < 1:
            raise ValueError("the data set is empty")
        if global_batch < 1 or global_batch % process_count:
            raise ValueError(
                f"global_batch={global_batch} must be a positive multiple of process_count={process_count}"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
        self.size, self.global_batch, self.seed, self.shuffle = size, global_batch, seed, shuffle
        self.process_index, self.process_count = process_index, process_count
        self.step = 0

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.process_count

    @property
    def steps_per_epoch(self) -> int:
        """Whole global batches in one pass (evaluate over these with shuffle=False: no example twice)."""
        return self.size // self.global_batch

    def positions(self, step: int) -> np.ndarray:
        """Stream positions of this process's rows of the global batch at `step`."""
        start = step * self.global_batch + self.process_index * self.local_batch
        return np.arange(start, start + self.local_batch, dtype=np.int64)

    def indices(self, step: int) -> np.ndarray:
        """Record indices of this process's rows at `step`."""
        positions = self.positions(step)
        epochs, offsets = np.divmod(positions, self.size)
        if not self.shuffle:
            return offsets
        indices = np.empty_like(offsets)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            indices[here] = epoch_order(self.size, self.seed, int(epoch))[offsets[here]]
        return indices

    @abc.abstractmethod
    def batch_at(self, step: int) -> Any:
        """This process's batch at `step`."""

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def get_state(self) -> dict[str, int]:
        """What a checkpoint must keep to resume exactly: the next step and the seed."""
        return {"step": self.step, "seed": self.seed}

    def set_state(self, state: dict[str, int]) -> None:
        """Resume at `state["step"]`; the seed must be the one the state was saved with."""
        if state["seed"] != self.seed:
            raise ValueError(f"the saved state has seed {state['seed']} but this pipeline has seed {self.seed}")
        self.step = int(state["step"])


class TextPipeline(StepPipeline):
    """Batches of packed token rows [local_batch, length + 1], shuffled by seed, resumable by step."""

    def __init__(
        self,
        rows: Any,
        global_batch: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        shuffle: bool = True,
    ):
        super().__init__(len(rows), global_batch, seed, process_index, process_count, shuffle)
        self.rows = rows

    def batch_at(self, step: int) -> np.ndarray:
        return np.asarray(self.rows[self.indices(step)], dtype=np.int32)


class ArrayPipeline(StepPipeline):
    """Batches of records held as a dict of arrays with one leading record axis (e.g. encoded
    fine-tuning examples), shuffled by seed, resumable by step."""

    def __init__(
        self,
        arrays: dict[str, np.ndarray],
        global_batch: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        shuffle: bool = True,
    ):
        sizes = {len(value) for value in arrays.values()}
        if len(sizes) != 1:
            raise ValueError(f"the arrays hold different numbers of records: {sorted(sizes)}")
        super().__init__(sizes.pop(), global_batch, seed, process_index, process_count, shuffle)
        self.arrays = arrays

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        indices = self.indices(step)
        return {key: value[indices] for key, value in self.arrays.items()}


def packed_rows(tokenizer: TextTokenizer, documents: Iterable[str], length: int) -> np.ndarray:
    """Every document's tokens then <|endoftext|>, concatenated and cut into int32 rows [n, length + 1]."""
    stream = np.fromiter(
        itertools.chain.from_iterable([*tokenizer.encode(text), tokenizer.eos_id] for text in documents), np.int32
    )
    rows = len(stream) // (length + 1)
    if rows == 0:
        raise ValueError(f"{len(stream)} tokens do not fill one row of length + 1 = {length + 1}")
    return stream[: rows * (length + 1)].reshape(rows, length + 1)


TEXT_DIR_LAYOUT = "DIR/train/*.txt and DIR/<eval split>/*.txt, one document a file"


class LocalTextFiles(tfds.core.GeneratorBasedBuilder):
    """Local text files as a tfds dataset: one example {"name", "text"} per file, one split per folder."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"A folder of text files: {TEXT_DIR_LAYOUT}."

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict({"name": tfds.features.Text(), "text": tfds.features.Text()})
        return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)  # file-name order

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        splits = text_file_splits(dl_manager.manual_dir)
        return {split: self._generate_examples(files) for split, files in splits.items()}

    def _generate_examples(self, files: list[epath.Path]) -> Iterator[tuple[str, dict[str, str]]]:
        for path in files:
            yield path.stem, {"name": path.stem, "text": path.read_text(encoding="utf-8")}

    def _log_download_bytes(self) -> None:
        """Silent: tfds would print "Downloading and preparing dataset Unknown size" for a local build."""

    def _log_download_done(self) -> None:
        """Silent: tfds would print "downloaded"; `build_text_files` says what it builds."""


def text_file_splits(source_dir: str | os.PathLike) -> dict[str, list[epath.Path]]:
    """{split: its *.txt files in name order} for each folder of `source_dir` holding any; a missing folder is named."""
    source_dir = epath.Path(source_dir)
    if not source_dir.is_dir():
        raise FileNotFoundError(f"the text folder {source_dir} does not exist: it should hold {TEXT_DIR_LAYOUT}")
    splits = {folder.name: sorted(folder.glob("*.txt")) for folder in sorted(source_dir.iterdir()) if folder.is_dir()}
    return {split: files for split, files in splits.items() if files}


def text_files_builder(data_dir: str | os.PathLike, name: str) -> LocalTextFiles:
    """The builder of corpus `name` (a tfds config) in `data_dir`, built or not."""
    return LocalTextFiles(
        config=tfds.core.BuilderConfig(name=name), data_dir=os.fspath(data_dir), file_format="array_record"
    )


def build_text_files(
    source_dir: str | os.PathLike, data_dir: str | os.PathLike, name: str, required_splits: Sequence[str] = ("train",)
) -> LocalTextFiles:
    """Build `source_dir`/<split>/*.txt into `data_dir` as config `name`-<digest of the files' names and
    contents>, so a build is reused only while its files are unchanged; a missing split is named."""
    splits = text_file_splits(source_dir)
    for split in required_splits:
        if split not in splits:
            raise FileNotFoundError(
                f"{source_dir} has no {split}/*.txt files (splits found: "
                f"{', '.join(splits) or 'none'}); a text folder holds {TEXT_DIR_LAYOUT}"
            )
    key = fingerprint(
        part
        for split, files in splits.items()
        for path in files
        for part in (f"{split}/{path.name}", path.read_bytes())
    )
    builder = text_files_builder(data_dir, f"{name}-{key}")
    if not builder.is_prepared():
        print(
            f"building tfds local_text_files/{builder.builder_config.name} from {source_dir} into {data_dir} "
            f"(reused while the files are unchanged)"
        )
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(source_dir)))
    return builder


def read_records(source: Any, keys: Iterable[int]) -> list[dict[str, Any]]:
    """Records `keys` of a tfds data source in one batch read (or of any sequence, one by one)."""
    keys = [int(key) for key in keys]
    if hasattr(source, "__getitems__"):
        return list(source.__getitems__(keys))
    return [source[key] for key in keys]


def records(source: Any) -> Iterator[dict[str, Any]]:
    """Every record of a tfds data source (or any sequence of dicts), in index order, read in chunks."""
    for start in range(0, len(source), READ_CHUNK):
        yield from read_records(source, range(start, min(start + READ_CHUNK, len(source))))


def record_text(record: dict[str, Any], text_key: str = "text") -> str:
    """A record's text, decoded from UTF-8 (tfds data sources give bytes)."""
    text = record[text_key]
    return text.decode("utf-8") if isinstance(text, bytes) else str(text)


def source_texts(source: Any, text_key: str = "text") -> Iterator[str]:
    """The texts of a tfds data source, decoded from UTF-8, in index order."""
    for record in records(source):
        yield record_text(record, text_key)


def tfds_builder(name: str, data_dir: str | os.PathLike | None = None) -> tfds.core.DatasetBuilder:
    """The prepared builder of any tfds text dataset by name (e.g. "tiny_shakespeare", "lm1b"),
    downloaded and prepared (as array_record, for reads by index) if needed."""
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return builder


def tfds_documents(
    name: str, split: str, data_dir: str | os.PathLike | None = None, text_key: str = "text"
) -> Iterator[str]:
    """Documents of any tfds text dataset by name, downloaded if needed."""
    return source_texts(tfds_builder(name, data_dir).as_data_source(split), text_key)


def tokenizer_sample(
    source: Any, max_bytes: int, seed: int = 0, text_key: str = "text", documents: int | None = None
) -> list[str]:
    """The texts of a fixed, seeded sample of a data source's documents (of its first `documents`),
    at most about `max_bytes` of them, in index order: what a tokenizer learns from, the same on
    every host. Documents are drawn in the order `epoch_order(size, seed, 0)` until `max_bytes` are
    read, so memory is bounded by the sample, not the corpus (sentencepiece's own input_sentence_size
    samples only after loading every sentence). A corpus smaller than `max_bytes` is used whole."""
    size = len(source) if documents is None else min(documents, len(source))
    order, chosen, total = epoch_order(size, seed, 0), [], 0
    for start in range(0, size, READ_CHUNK):
        keys = order[start : start + READ_CHUNK]
        for key, record in zip(keys, read_records(source, keys)):
            chosen.append((int(key), record_text(record, text_key)))
            total += len(chosen[-1][1].encode("utf-8"))
            if total >= max_bytes:
                return [text for _, text in sorted(chosen)]
    return [text for _, text in sorted(chosen)]


class PackedCorpus(NamedTuple):
    """A tokenizer and the train and validation rows of its token store."""

    tokenizer: TextTokenizer
    train: TokenRows  # int32 rows [n, length + 1] by index
    validation: TokenRows


def shipped_builder(data_dir: epath.Path, validation: tuple[str, ...]) -> tuple[tfds.core.DatasetBuilder, str]:
    """The shipped Shakespeare built as local text files (`validation` plays held out), and its name."""
    texts = shakespeare.works()
    unknown = set(validation) - set(texts)
    if unknown:
        raise ValueError(f"unknown plays {sorted(unknown)}; available: {', '.join(sorted(texts))}")
    name = "-".join(["shakespeare", *sorted(validation)])
    with tempfile.TemporaryDirectory(prefix="shipped-shakespeare-") as source:
        for play, text in texts.items():
            folder = pathlib.Path(source) / ("validation" if play in validation else "train")
            folder.mkdir(exist_ok=True)
            (folder / f"{play}.txt").write_text(text, encoding="utf-8")
        return build_text_files(source, data_dir, name, ("train", "validation")), name


def prepare_shakespeare(
    data_dir: str | os.PathLike,
    length: int,
    vocab_size: int = 4096,
    validation: tuple[str, ...] = shakespeare.VALIDATION_PLAYS,
    **options: Any,
) -> PackedCorpus | None:
    """The shipped Shakespeare as packed rows, `validation` plays held out (`prepare_corpus`'s options)."""
    return prepare_corpus(data_dir, length, vocab_size, validation_plays=validation, **options)


def prepare_corpus(
    data_dir: str | os.PathLike,
    length: int,
    vocab_size: int,
    *,
    tfds_name: str | None = None,
    text_dir: str | os.PathLike | None = None,
    eval_split: str = "validation",
    validation_plays: tuple[str, ...] = shakespeare.VALIDATION_PLAYS,
    tokenizer_path: str | os.PathLike | None = None,
    max_documents: int | None = None,
    workers: int = 1,
    host: int = 0,
    hosts: int = 1,
    store_dir: str | os.PathLike | None = None,
) -> PackedCorpus | None:
    """Packed rows of a tfds text dataset by name (downloaded if needed), of local text files
    (`text_dir`/train/*.txt and `text_dir`/<eval_split>/*.txt), or else of the shipped
    Shakespeare (`validation_plays` held out), at most `max_documents` documents a split (plays in
    name order). The tokenizer is loaded from `tokenizer_path`, or trained on the training split and
    cached in `data_dir`, keyed by its inputs; the corpus is tokenized once into a token store."""
    if tfds_name is None and text_dir is None and eval_split != "validation":
        raise ValueError(f"the shipped Shakespeare has the splits train and validation, not {eval_split!r}")
    tokenizer = None if tokenizer_path is None else load_tokenizer(tokenizer_path)  # a bad path fails first
    data_dir = epath.Path(data_dir)
    if text_dir is not None:
        name = absolute(text_dir).name
        builder = build_text_files(text_dir, data_dir, name, ("train", eval_split))
    elif tfds_name is not None:
        name = tfds_name.replace("/", "-")
        builder = tfds_builder(tfds_name, data_dir)
    else:
        builder, name = shipped_builder(data_dir, validation_plays)
    return _pack(
        builder,
        eval_split,
        tokenizer,
        data_dir,
        name,
        vocab_size,
        length,
        max_documents,
        workers=workers,
        host=host,
        hosts=hosts,
        store_dir=store_dir,
    )


def _pack(
    builder: tfds.core.DatasetBuilder,
    eval_split: str,
    tokenizer: TextTokenizer | None,
    data_dir: epath.Path,
    name: str,
    vocab_size: int,
    length: int,
    max_documents: int | None,
    *,
    workers: int,
    host: int,
    hosts: int,
    store_dir: str | os.PathLike | None,
) -> PackedCorpus | None:
    """Train a tokenizer on a bounded sample of train (its first `max_documents`) unless given one,
    tokenize train and `eval_split` once into a token store in `store_dir` (default
    `data_dir`/token-stores), and cut both into rows
    (None on a host that wrote only its share of the store's shards: hosts > 1)."""
    if tokenizer is None:
        source = builder.as_data_source("train")
        sample = tokenizer_sample(source, TOKENIZER_SAMPLE_BYTES, documents=max_documents)
        drawn = {
            "documents": len(sample),
            "of": min(len(source), max_documents or len(source)),
            "bytes": sum(len(text.encode("utf-8")) for text in sample),
            "max_bytes": TOKENIZER_SAMPLE_BYTES,
            "seed": 0,
            "order": "zoo.data.text.epoch_order(documents, seed, 0), then index order",
        }
        tokenizer = cached_tokenizer(sample, data_dir / "tokenizers", name, vocab_size, metadata={"sample": drawn})
    splits = ("train", eval_split)
    store = build_store(
        builder.data_dir,
        splits,
        tokenizer,
        store_dir or data_dir / "token-stores",
        name=name,
        workers=workers,
        host=host,
        hosts=hosts,
    )
    if store is None:
        return None
    return PackedCorpus(
        tokenizer,
        store.rows("train", length, max_documents),
        store.rows(eval_split, length, max_documents),
    )


def open_corpus(
    store: str | os.PathLike, length: int, eval_split: str = "validation", max_documents: int | None = None
) -> PackedCorpus:
    """A prepared token store (local or gs://) as a corpus, its tokenizer included: training from it
    needs neither the corpus nor its tfds build."""
    store = TokenStore(store)
    rows = [store.rows(split, length, max_documents) for split in ("train", eval_split)]
    return PackedCorpus(store.tokenizer(), *rows)


def check_token_ids(rows: np.ndarray, vocab_size: int, name: str) -> None:
    """Raise unless every id of `rows` is in [0, vocab_size): under jit the embedding lookup checks nothing
    (an id >= vocab_size reads NaN, a negative one wraps around to the end of the table)."""
    if rows.size:
        low, high = int(rows.min()), int(rows.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"the {name} rows hold token ids in [{low}, {high}], outside [0, {vocab_size}): "
                f"the tokenizer and the model's vocab_size={vocab_size} disagree"
            )
