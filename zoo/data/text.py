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
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from zoo.data import shakespeare
from zoo.paths import absolute
from zoo.tokenizer import Tokenizer, train_tokenizer

READ_CHUNK = 1024  # records per data-source read

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

    def __init__(self, size: int, global_batch: int, seed: int, process_index: int = 0,
                 process_count: int = 1, shuffle: bool = True):
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

    def __init__(self, rows: Any, global_batch: int, seed: int, process_index: int = 0,
                 process_count: int = 1, shuffle: bool = True):
        super().__init__(len(rows), global_batch, seed, process_index, process_count, shuffle)
        self.rows = rows

    def batch_at(self, step: int) -> np.ndarray:
        return np.asarray(self.rows[self.indices(step)], dtype=np.int32)


def packed_rows(tokenizer: Tokenizer, documents: Iterable[str], length: int) -> np.ndarray:
    """Every document's tokens then <|endoftext|>, concatenated and cut into int32 rows [n, length + 1]."""
    stream = np.fromiter(
        itertools.chain.from_iterable(tokenizer.encode(text) + [tokenizer.eos_id] for text in documents), np.int32
    )
    rows = len(stream) // (length + 1)
    if rows == 0:
        raise ValueError(f"{len(stream)} tokens do not fill one row of length + 1 = {length + 1}")
    return stream[: rows * (length + 1)].reshape(rows, length + 1)


class LocalTextFiles(tfds.core.GeneratorBasedBuilder):
    """Local text files as a tfds dataset: one example {"name", "text"} per file, one split per folder."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = "A folder per split (train/, validation/, ...) of UTF-8 *.txt files, one a document."

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict({"name": tfds.features.Text(), "text": tfds.features.Text()})
        return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)  # file-name order

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        folders = sorted(path for path in epath.Path(dl_manager.manual_dir).iterdir() if path.is_dir())
        if not folders:
            raise ValueError(f"{dl_manager.manual_dir} has no split folders (train/, validation/, ...)")
        return {folder.name: self._generate_examples(folder) for folder in folders}

    def _generate_examples(self, folder: epath.Path) -> Iterator[tuple[str, dict[str, str]]]:
        for path in sorted(folder.glob("*.txt")):
            yield path.stem, {"name": path.stem, "text": path.read_text(encoding="utf-8")}


def text_files_builder(data_dir: str | os.PathLike, name: str) -> LocalTextFiles:
    """The builder of corpus `name` (a tfds config) in `data_dir`, built or not."""
    return LocalTextFiles(config=tfds.core.BuilderConfig(name=name), data_dir=os.fspath(data_dir),
                          file_format="array_record")


def build_text_files(source_dir: str | os.PathLike, data_dir: str | os.PathLike, name: str) -> LocalTextFiles:
    """Build corpus `name` from `source_dir`/<split>/*.txt into `data_dir`; once built, it is reused as is."""
    builder = text_files_builder(data_dir, name)
    if not builder.is_prepared():
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


def source_texts(source: Any, text_key: str = "text") -> Iterator[str]:
    """The texts of a tfds data source, decoded from UTF-8, in index order."""
    for record in records(source):
        text = record[text_key]
        yield text.decode("utf-8") if isinstance(text, bytes) else str(text)


def tfds_documents(name: str, split: str, data_dir: str | os.PathLike | None = None, text_key: str = "text",
                   download: bool = True) -> Iterator[str]:
    """Documents of any tfds text dataset by name (e.g. "tiny_shakespeare", "lm1b"), downloaded if needed."""
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=download,
                              builder_kwargs={"file_format": "array_record"})
    return source_texts(source, text_key)


class PackedCorpus(NamedTuple):
    """A tokenizer and the train and validation rows it packed."""

    tokenizer: Tokenizer
    train: np.ndarray       # int32 [rows, length + 1]
    validation: np.ndarray  # int32 [rows, length + 1]


def prepare_shakespeare(data_dir: str | os.PathLike, length: int, vocab_size: int = 4096,
                        validation: tuple[str, ...] = shakespeare.VALIDATION_PLAYS) -> PackedCorpus:
    """The shipped Shakespeare as packed rows; the tfds build and the tokenizer (trained on train) are cached."""
    data_dir = epath.Path(data_dir)
    builder = _build_shakespeare(data_dir, validation)
    train, held_out = (list(source_texts(builder.as_data_source(split))) for split in ("train", "validation"))
    tokenizer_path = data_dir / "tokenizers" / f"{builder.builder_config.name}-bpe{vocab_size}.model"
    if tokenizer_path.exists():
        tokenizer = Tokenizer.load(tokenizer_path)
    else:
        tokenizer = train_tokenizer(train, tokenizer_path.with_suffix(""), vocab_size)
    return PackedCorpus(tokenizer, packed_rows(tokenizer, train, length), packed_rows(tokenizer, held_out, length))


def _build_shakespeare(data_dir: epath.Path, validation: tuple[str, ...]) -> LocalTextFiles:
    """The tfds build of the shipped works, one config per held-out set (e.g. "shakespeare-macbeth-tempest")."""
    texts = shakespeare.works()
    unknown = set(validation) - set(texts)
    if unknown:
        raise ValueError(f"unknown plays {sorted(unknown)}; available: {', '.join(sorted(texts))}")
    builder = text_files_builder(data_dir, "-".join(["shakespeare", *sorted(validation)]))
    if builder.is_prepared():
        return builder
    with tempfile.TemporaryDirectory() as source:
        for name, text in texts.items():
            folder = pathlib.Path(source) / ("validation" if name in validation else "train")
            folder.mkdir(exist_ok=True)
            (folder / f"{name}.txt").write_text(text, encoding="utf-8")
        return build_text_files(source, data_dir, builder.builder_config.name)


def prepare_corpus(data_dir: str | os.PathLike, length: int, vocab_size: int, *, tfds_name: str | None = None,
                   text_dir: str | os.PathLike | None = None, eval_split: str = "validation",
                   tokenizer_path: str | os.PathLike | None = None,
                   max_documents: int | None = None) -> PackedCorpus:
    """Packed rows of a tfds text dataset by name (downloaded if needed), of local text files
    (`text_dir`/train/*.txt and `text_dir`/<eval_split>/*.txt), or else of the shipped
    Shakespeare. The tokenizer is loaded from `tokenizer_path`, or trained on the training split
    (at most `max_documents` documents) and cached in `data_dir`."""
    if tfds_name is None and text_dir is None:
        return prepare_shakespeare(data_dir, length, vocab_size)
    data_dir = epath.Path(data_dir)
    if text_dir is not None:
        name = absolute(text_dir).name
        builder = build_text_files(text_dir, data_dir, name)
        split = lambda s: source_texts(builder.as_data_source(s))  # noqa: E731
    else:
        name = tfds_name.replace("/", "-")
        split = lambda s: tfds_documents(tfds_name, s, data_dir)  # noqa: E731
    train = list(itertools.islice(split("train"), max_documents))
    held_out = list(itertools.islice(split(eval_split), max_documents))
    if tokenizer_path is not None:
        tokenizer = Tokenizer.load(tokenizer_path)
    else:
        cached = data_dir / "tokenizers" / f"{name}-bpe{vocab_size}.model"
        tokenizer = Tokenizer.load(cached) if cached.exists() else train_tokenizer(train, cached.with_suffix(""),
                                                                                    vocab_size)
    return PackedCorpus(tokenizer, packed_rows(tokenizer, train, length), packed_rows(tokenizer, held_out, length))
