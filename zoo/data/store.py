"""Token stores: a corpus tokenized once, in parallel worker processes, into shards of token ids on
disk or cloud storage, then read back as packed rows by index, resident memory flat in corpus size.

    store = build_store(builder.data_dir, ("train", "validation"), tokenizer, "data/token-stores")
    rows = store.rows("train", length=128)        # int32 [n, 129] rows by index, as packed_rows cuts them
    batch = rows[np.array([7, 3])]

A store is the folder ROOT/<name>-<corpus key>-<tokenizer key>: a changed corpus (one file edited,
another tfds version) or another tokenizer is another folder, never a stale store. It holds
`index.json` (written last: a store without it is unfinished), its tokenizer's file
(`tokenizer.model` or `tokenizer.json`: a store alone is enough to train on) and, per split, shards of
`documents_per_shard` consecutive documents (by default about SHARD_BYTES of text: a worker's memory
is bounded by a shard, whatever the corpus): `<split>/<shard>.npy`, the shard's token stream (every
document's ids then <|endoftext|>), `<split>/<shard>.docs.npy`, each document's token count (its
<|endoftext|> included: the document boundaries), and `<split>/<shard>.json`, the shard's counts,
written after the two arrays, so a shard with it is finished and a rerun after a kill keeps it.

Shards are numpy `.npy` files: a training row is cut at any token offset of the split's stream,
across document boundaries, so the reader needs byte ranges of a flat array, which an `.npy` file
is behind a short header: memory-mapped on a local disk (the OS reads only the pages of the rows
asked for) and read by byte range on cloud storage, with no dependency but numpy and a format that
does not change. A record store (array_record) would hold documents, not offsets: cutting a row
would read whole documents through a second index from tokens to records.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import io
import json
import multiprocessing
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tqdm import tqdm

from zoo.paths import write_atomically
from zoo.tokenizer import TextTokenizer, fingerprint, tokenizer_from_bytes, tokenizer_in

FORMAT_VERSION = 1
SHARD_BYTES = 32_000_000  # text per shard, about: what one worker holds at a time


def shard_documents(identity: dict[str, Any]) -> int:
    """Documents per shard so that a shard holds about SHARD_BYTES of text, from the corpus's mean
    document size (its recorded bytes over its documents): a fixed function of the corpus."""
    documents = sum(sum(map(int, split["shards"] or [0])) for split in identity["splits"].values())
    total = sum(int(split["bytes"] or 0) for split in identity["splits"].values())
    return max(1, SHARD_BYTES * documents // max(total, 1))


def store_dtype(vocab_size: int) -> np.dtype:
    """uint16 ids while the vocabulary fits (half the bytes of int32), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def corpus_identity(dataset_dir: epath.PathLike, text_key: str = "text") -> dict[str, Any]:
    """What names a prepared tfds dataset's contents: its name, config, version and, per split, the
    number of examples and bytes (the local text-file builder's config name holds a digest of its
    files' names and contents; a tfds dataset by name is identified by its version and sizes)."""
    info = json.loads((epath.Path(dataset_dir) / "dataset_info.json").read_text())
    splits = {
        split["name"]: {"shards": split.get("shardLengths"), "bytes": split.get("numBytes")} for split in info["splits"]
    }
    return {
        "name": info["name"],
        "config": info.get("configName"),
        "version": info["version"],
        "splits": splits,
        "text_key": text_key,
    }


def store_folder(
    root: epath.PathLike, name: str, identity: dict[str, Any], tokenizer: TextTokenizer, documents_per_shard: int
) -> epath.Path:
    """ROOT/<name>-<corpus key>-<tokenizer key>, the keys digests of what the store is made from."""
    corpus_key = fingerprint([json.dumps(identity, sort_keys=True), str(documents_per_shard), str(FORMAT_VERSION)])
    return epath.Path(root) / f"{name}-{corpus_key}-{tokenizer.fingerprint}"


def build_store(
    dataset_dir: epath.PathLike,
    splits: Sequence[str],
    tokenizer: TextTokenizer,
    root: epath.PathLike,
    *,
    name: str = "corpus",
    text_key: str = "text",
    workers: int = 1,
    host: int = 0,
    hosts: int = 1,
    documents_per_shard: int | None = None,
    progress: bool = True,
) -> TokenStore | None:
    """Tokenize `splits` of the prepared tfds dataset in `dataset_dir` into a store under `root`, or
    open it if it exists. `workers` processes tokenize shards in parallel; finished shards are kept
    across kills. `documents_per_shard` defaults to `shard_documents` of the corpus. With `hosts` > 1,
    this host writes only shards i with i % hosts == host and returns None; a last call with hosts=1
    (any host) finds them done and writes the index."""
    identity = corpus_identity(dataset_dir, text_key)
    documents_per_shard = documents_per_shard or shard_documents(identity)
    folder = store_folder(root, name, identity, tokenizer, documents_per_shard)
    if (folder / "index.json").exists():
        return TokenStore(folder)
    sizes = {split: len(_source(os.fspath(dataset_dir), split)) for split in splits}
    jobs = [
        (split, shard)
        for split, size in sizes.items()
        for shard in range(-(-size // documents_per_shard))
        if shard % hosts == host and not (folder / split / f"{shard:05d}.json").exists()
    ]
    job = functools.partial(
        _write_shard, os.fspath(dataset_dir), text_key, tokenizer.serialized(), os.fspath(folder), documents_per_shard
    )
    bar = tqdm(total=len(jobs), desc=f"tokenizing {name} (shards)", unit="shard", disable=not progress)
    start, written, documents = time.perf_counter(), 0, 0
    with _pool(workers) as pool:
        for stats in (pool.map if pool else map)(job, *zip(*jobs)) if jobs else ():
            written, documents = written + stats["bytes"], documents + stats["documents"]
            rate = written / 1e6 / (time.perf_counter() - start)
            bar.set_postfix(documents=f"{documents:,}", MB_s=f"{rate:.1f}", refresh=False)
            bar.update()
    bar.close()
    if hosts > 1:
        return None
    write_atomically(folder / tokenizer.FILE_NAME, tokenizer.serialized())
    index = {
        "format": FORMAT_VERSION,
        "corpus": corpus_identity(dataset_dir, text_key),
        "tokenizer": {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size},
        "dtype": store_dtype(tokenizer.vocab_size).name,
        "documents_per_shard": documents_per_shard,
        "splits": {split: _split_index(folder / split, size, documents_per_shard) for split, size in sizes.items()},
    }
    write_atomically(folder / "index.json", json.dumps(index, indent=1).encode())
    return TokenStore(folder)


def _pool(workers: int) -> Any:
    """`workers` spawned processes (a forked JAX process can deadlock), or None: this process alone."""
    if workers <= 1:
        return contextlib.nullcontext()
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


@functools.cache
def _source(dataset_dir: str, split: str) -> Any:
    return tfds.builder_from_directory(dataset_dir).as_data_source(split)


@functools.cache
def _tokenizer(model: bytes) -> TextTokenizer:
    return tokenizer_from_bytes(model)


def _write_shard(
    dataset_dir: str, text_key: str, model: bytes, folder: str, documents_per_shard: int, split: str, shard: int
) -> dict:
    """Tokenize documents [shard, shard + 1) · documents_per_shard of `split`; write the shard's
    arrays, then its counts (each file atomically): the counts mark the shard finished."""
    from zoo.data.text import read_records, record_text  # here: zoo.data.text imports this module

    source, tokenizer = _source(dataset_dir, split), _tokenizer(model)
    keys = range(shard * documents_per_shard, min((shard + 1) * documents_per_shard, len(source)))
    texts = [record_text(record, text_key) for record in read_records(source, keys)]
    dtype = store_dtype(tokenizer.vocab_size)
    ids = [np.array([*tokenizer.encode(text), tokenizer.eos_id], dtype) for text in texts]  # 2-4 bytes a token
    tokens = np.concatenate(ids) if ids else np.zeros(0, dtype)
    lengths = np.array([len(doc) for doc in ids], np.int64)
    base = epath.Path(folder) / split
    base.mkdir(parents=True, exist_ok=True)
    write_atomically(base / f"{shard:05d}.npy", _npy(tokens))
    write_atomically(base / f"{shard:05d}.docs.npy", _npy(lengths))
    stats = {
        "documents": len(texts),
        "tokens": int(tokens.size),
        "bytes": sum(len(text.encode("utf-8")) for text in texts),
        "min_id": int(tokens.min()) if tokens.size else 0,
        "max_id": int(tokens.max()) if tokens.size else 0,
    }
    write_atomically(base / f"{shard:05d}.json", json.dumps(stats).encode())
    return stats


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _split_index(folder: epath.Path, documents: int, documents_per_shard: int) -> dict[str, Any]:
    shards = [json.loads((folder / f"{i:05d}.json").read_text()) for i in range(-(-documents // documents_per_shard))]
    return {
        "documents": documents,
        "tokens": sum(s["tokens"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
        "shard_tokens": [s["tokens"] for s in shards],
        "min_id": min((s["min_id"] for s in shards if s["tokens"]), default=0),
        "max_id": max((s["max_id"] for s in shards), default=0),
    }


class TokenStore:
    """A finished store: its index and packed rows of each split."""

    def __init__(self, folder: epath.PathLike):
        self.folder = epath.Path(folder)
        index = self.folder / "index.json"
        if not index.exists():
            raise FileNotFoundError(f"{self.folder} is not a finished token store (no index.json): build it again")
        self.index = json.loads(index.read_text())

    def tokenizer(self) -> TextTokenizer:
        """The tokenizer the store was made with (a copy of its file lives in the store)."""
        return tokenizer_in(self.folder)

    def rows(self, split: str, length: int, max_documents: int | None = None) -> TokenRows:
        """Rows of `length` + 1 tokens cut from `split`'s token stream (of its first `max_documents`
        documents, if given), as `packed_rows` cuts them."""
        if split not in self.index["splits"]:
            raise KeyError(f"the store has no split {split!r}; it has {', '.join(self.index['splits'])}")
        index = self.index["splits"][split]
        tokens = index["tokens"]
        if max_documents is not None and max_documents < index["documents"]:
            shards, rest = divmod(max_documents, self.index["documents_per_shard"])
            tokens = sum(index["shard_tokens"][:shards])
            if rest:
                tokens += int(np.load(os.fspath(self.folder / split / f"{shards:05d}.docs.npy"))[:rest].sum())
        return TokenRows(self.folder / split, index, tokens, length + 1)


class TokenRows:
    """Rows [n, width] of a split's token stream, read by index (memory-mapped or by byte range):
    the array interface the pipelines use (len, shape, size, min, max, indexing by an index array)."""

    def __init__(self, folder: epath.Path, split: dict[str, Any], tokens: int, width: int):
        self.folder, self.width, self._split = folder, width, split
        self._ends = np.cumsum(split["shard_tokens"], dtype=np.int64)
        self.shape = (tokens // width, width)
        if self.shape[0] == 0:
            raise ValueError(f"{tokens} tokens do not fill one row of length + 1 = {width}")

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def size(self) -> int:
        return self.shape[0] * self.width

    def min(self) -> int:
        """The smallest token id of the split (from the index: nothing is read)."""
        return self._split["min_id"]

    def max(self) -> int:
        """The largest token id of the split (from the index: nothing is read)."""
        return self._split["max_id"]

    def __getitem__(self, indices: Any) -> np.ndarray:
        """Rows at an index, a slice or an index array, int32, like indexing an array [n, width]."""
        if isinstance(indices, slice):
            indices = np.arange(len(self))[indices]
        flat = np.asarray(indices, np.int64).reshape(-1)
        if flat.size and (flat.min() < -len(self) or flat.max() >= len(self)):
            raise IndexError(f"row indices outside [0, {len(self)})")
        rows = np.empty((flat.size, self.width), np.int32)
        for row, i in enumerate(flat):
            rows[row] = self._tokens(int(i) % len(self) * self.width, self.width)
        return rows.reshape(*np.shape(indices), self.width)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """Every row (reads the whole split: for small corpora and tests)."""
        rows = self[np.arange(len(self))]
        return rows if dtype is None else rows.astype(dtype)

    def _tokens(self, start: int, count: int) -> np.ndarray:
        """Tokens [start, start + count) of the stream, across shard boundaries."""
        pieces = []
        while count:
            shard = int(np.searchsorted(self._ends, start, side="right"))
            offset = start - (self._ends[shard - 1] if shard else 0)
            take = min(count, int(self._ends[shard]) - start)
            pieces.append(self._shard(shard)[offset : offset + take])
            start, count = start + take, count - take
        return np.concatenate(pieces)

    @functools.cache  # noqa: B019 (one reader per split, alive as long as its pipeline)
    def _shard(self, shard: int) -> Any:
        path = self.folder / f"{shard:05d}.npy"
        if "://" in os.fspath(path):
            return _RangeReader(path)
        return np.load(os.fspath(path), mmap_mode="r")


class _RangeReader:
    """An `.npy` file on cloud storage sliced by byte-range reads (`array[a:b]` reads only those ids)."""

    def __init__(self, path: epath.Path):
        self.path = path
        with path.open("rb") as file:
            np.lib.format.read_magic(file)
            _, _, self.dtype = np.lib.format.read_array_header_1_0(file)
            self.offset = file.tell()

    def __getitem__(self, window: slice) -> np.ndarray:
        start, stop = window.start, window.stop
        with self.path.open("rb") as file:
            file.seek(self.offset + start * self.dtype.itemsize)
            return np.frombuffer(file.read((stop - start) * self.dtype.itemsize), self.dtype)
