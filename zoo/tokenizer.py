"""A sentencepiece BPE tokenizer with byte fallback: any UTF-8 text round-trips exactly.

Special ids, fixed for every model trained here:
    0  <pad>            padding for ragged batches; `encode` never produces it, packed rows never hold it
    1  <unk>            required by sentencepiece; unused, since unknown characters fall back to bytes
    2  <|endoftext|>    document boundary (`eos_id`): a control symbol, appended after each document
                        by the data pipeline. `encode` never produces it, not even from the literal
                        text "<|endoftext|>", and `decode` drops it.
    3..258  <0x00>..<0xFF>  byte-fallback pieces, then the learned merges.
There is no BOS (as in GPT-2): the previous document's <|endoftext|> marks where the next one starts.

Text is kept verbatim (identity normalisation, no dummy prefix, whitespace kept), so concatenated
documents tokenize exactly as written. Sentencepiece writes spaces as "▁" (U+2581) and decodes
every "▁" back to a space, so a literal "▁" in the text is encoded as its three byte pieces
(which sentencepiece itself never emits, "▁" being in every vocabulary) and restored by `decode`.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import sentencepiece as spm
import tokenizers
from etils import epath

from zoo.paths import write_atomically

PAD_ID, UNK_ID, EOS_ID = 0, 1, 2
EOS_PIECE = "<|endoftext|>"
SPACE_SYMBOL = "\u2581"
SENTENCE_CHARS = 4096  # training sentences are paragraphs cut to this many characters

TRAINER_OPTIONS = dict(
    model_type="bpe",
    byte_fallback=True,
    character_coverage=1.0,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    max_sentence_length=4 * SENTENCE_CHARS,  # bytes
    pad_id=PAD_ID,
    unk_id=UNK_ID,
    eos_id=EOS_ID,
    bos_id=-1,
    eos_piece=EOS_PIECE,
    num_threads=1,  # the thread count is recorded in the model file: fixed, so equal inputs give equal files
    minloglevel=2,
)


class TextTokenizer(abc.ABC):
    """What the zoo needs of a tokenizer: text <-> ids, `eos_id` between documents, and the bytes of
    its file (what a token store keeps and is keyed by)."""

    FILE_NAME: str  # its file's name inside a token store

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without <|endoftext|> (the pipeline appends it per document)."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; <|endoftext|> (and padding) decode to nothing."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def eos_id(self) -> int: ...

    @property
    @abc.abstractmethod
    def pad_id(self) -> int: ...

    @abc.abstractmethod
    def serialized(self) -> bytes:
        """The tokenizer file's bytes (`tokenizer_from_bytes` reads them back)."""

    @functools.cached_property
    def fingerprint(self) -> str:
        """A digest of the tokenizer file: what a token store is keyed by."""
        return fingerprint([self.serialized()])

    def check_vocab(self, model_vocab_size: int) -> None:
        """Raise if some token id would index past a model's embedding table."""
        if self.vocab_size > model_vocab_size:
            raise ValueError(
                f"the tokenizer has {self.vocab_size} tokens but the model's vocab_size is {model_vocab_size}: "
                f"set vocab_size >= {self.vocab_size} in the model config (or train a smaller tokenizer)"
            )


class WithSpecialTokens(TextTokenizer):
    """A tokenizer and new tokens `names` with the ids from `first` on (the model's vocabulary size
    before they were added), each id an attribute by its name (`tokenizer.start`). Text never
    encodes to them: code that frames the text puts them in; they decode as "<|name|>"."""

    def __init__(self, base: TextTokenizer, first: int, names: Sequence[str]):
        self.base, self.first, self.names = base, first, tuple(names)
        self.FILE_NAME = base.FILE_NAME
        self.ids = {name: first + i for i, name in enumerate(self.names)}

    def __getattr__(self, name: str) -> int:
        ids = self.__dict__.get("ids", {})
        if name not in ids:
            raise AttributeError(name)
        return ids[name]

    def encode(self, text: str) -> list[int]:
        return self.base.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        pieces, run = [], []
        for i in ids:
            if i >= self.first:
                pieces += [self.base.decode(run), f"<|{self.names[i - self.first]}|>"]
                run = []
            else:
                run.append(i)
        return "".join([*pieces, self.base.decode(run)])

    @property
    def vocab_size(self) -> int:
        return self.first + len(self.names)

    @property
    def eos_id(self) -> int:
        return self.base.eos_id

    @property
    def pad_id(self) -> int:
        return self.base.pad_id

    def serialized(self) -> bytes:
        return self.base.serialized()


class Tokenizer(TextTokenizer):
    """Text <-> token ids with a sentencepiece model; `eos_id` separates documents."""

    FILE_NAME = "tokenizer.model"

    def __init__(self, processor: spm.SentencePieceProcessor):
        self._sp = processor
        if processor.eos_id() < 0:
            raise ValueError("the sentencepiece model has no end-of-text piece (eos_id = -1)")
        self._space_bytes = [processor.piece_to_id(f"<0x{byte:02X}>") for byte in SPACE_SYMBOL.encode()]
        if processor.unk_id() in self._space_bytes:
            raise ValueError("the sentencepiece model has no byte-fallback pieces; train it with byte_fallback=True")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a `.model` file written by `train_tokenizer` (or any sentencepiece model with byte fallback),
        local or at a URL such as gs://bucket/tokenizer.model."""
        path = epath.Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder: give the sentencepiece .model file itself")
        if not path.is_file():
            raise FileNotFoundError(f"no sentencepiece model at {path}: train one with zoo.tokenizer.train_tokenizer")
        try:
            return cls(spm.SentencePieceProcessor(model_proto=path.read_bytes()))
        except (RuntimeError, ValueError) as error:  # RuntimeError: sentencepiece cannot parse the file
            raise ValueError(f"{path} is not a sentencepiece model this tokenizer can use ({error})") from error

    def serialized(self) -> bytes:
        """The sentencepiece model file's bytes."""
        return self._sp.serialized_model_proto()

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without <|endoftext|> (the pipeline appends it per document)."""
        parts = text.split(SPACE_SYMBOL)
        ids = self._sp.encode(parts[0])
        for part in parts[1:]:
            ids += self._space_bytes + self._sp.encode(part)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; special pieces (<pad>, <|endoftext|>) decode to nothing."""
        ids, n = [int(i) for i in ids], len(self._space_bytes)
        parts, start, i = [], 0, 0
        while i <= len(ids) - n:
            if ids[i : i + n] == self._space_bytes:
                parts.append(self._sp.decode(ids[start:i]))
                start = i = i + n
            else:
                i += 1
        parts.append(self._sp.decode(ids[start:]))
        return SPACE_SYMBOL.join(parts)


class ByteLevelBPE(TextTokenizer):
    """GPT-2's byte-level BPE, through HF `tokenizers`: merges over the bytes of UTF-8 text from a
    256-symbol base, so no text is unknown; text is split by GPT-2's pattern (contractions, letter,
    number and other runs, whitespace) before merging. `<|endoftext|>` separates documents and also
    pads (GPT-2 has no padding token). `encode` never produces it, not even from the literal text."""

    FILE_NAME = "tokenizer.json"

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        self._tk = tokenizer
        self._tk.encode_special_tokens = True  # "<|endoftext|>" in a text is text, not the special token
        self._eos = tokenizer.token_to_id(EOS_PIECE)
        if self._eos is None:
            raise ValueError(f"the byte-level BPE has no {EOS_PIECE} token")

    @classmethod
    def load(cls, path: str | os.PathLike) -> ByteLevelBPE:
        """A `tokenizer.json`, or a folder holding one or GPT-2's `vocab.json` and `merges.txt` (a
        `save_pretrained` folder), local or at a URL."""
        path = epath.Path(path)
        if path.is_dir() and not (path / "tokenizer.json").exists():
            vocab, merges = path / "vocab.json", path / "merges.txt"
            if not (vocab.exists() and merges.exists()):
                raise FileNotFoundError(f"{path} holds neither tokenizer.json nor vocab.json and merges.txt")
            tokenizer = _byte_level(tokenizers.models.BPE(json.loads(vocab.read_text()), _merges(merges.read_text())))
            tokenizer.add_special_tokens([EOS_PIECE])  # GPT-2's vocab.json holds it: its id is kept
            return cls(tokenizer)
        return cls(tokenizers.Tokenizer.from_str((path / "tokenizer.json" if path.is_dir() else path).read_text()))

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        return self._eos

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=True)

    def serialized(self) -> bytes:
        return self._tk.to_str().encode("utf-8")


def _byte_level(model: tokenizers.models.BPE) -> tokenizers.Tokenizer:
    """A BPE model with GPT-2's splitting pattern and byte alphabet around it."""
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    return tokenizer


def _merges(text: str) -> list[tuple[str, str]]:
    """The pairs of a GPT-2 `merges.txt` (a "#version" header line is skipped)."""
    lines = [line for line in text.splitlines() if line and not line.startswith("#version")]
    return [tuple(line.split(" ")) for line in lines]


def train_byte_level_bpe(texts: Iterable[str], path: str | os.PathLike, vocab_size: int = 4096) -> ByteLevelBPE:
    """Train a byte-level BPE on `texts` (its 256 byte symbols, then merges, then <|endoftext|> last,
    as in GPT-2) and write it as `tokenizer.json` at `path` (local or a URL)."""
    tokenizer = _byte_level(tokenizers.models.BPE())
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size - 1,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_sentences(texts), trainer)
    tokenizer.add_special_tokens([EOS_PIECE])
    trained = ByteLevelBPE(tokenizer)
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, trained.serialized())
    return trained


def tokenizer_from_bytes(data: bytes) -> TextTokenizer:
    """A tokenizer from its file's bytes: a byte-level BPE's tokenizer.json (JSON) or a sentencepiece model."""
    if data.lstrip().startswith(b"{"):
        return ByteLevelBPE(tokenizers.Tokenizer.from_str(data.decode("utf-8")))
    return Tokenizer(spm.SentencePieceProcessor(model_proto=data))


def tokenizer_in(folder: str | os.PathLike) -> TextTokenizer:
    """The tokenizer whose file (`tokenizer.model` or `tokenizer.json`) `folder` holds, e.g. a run's or a store's."""
    files = [epath.Path(folder) / kind.FILE_NAME for kind in (Tokenizer, ByteLevelBPE)]
    return load_tokenizer(next((path for path in files if path.exists()), files[0]))


def load_tokenizer(path: str | os.PathLike) -> TextTokenizer:
    """A sentencepiece `.model` file, or a byte-level BPE (`tokenizer.json`, or a folder with it or
    with GPT-2's vocab.json and merges.txt), local or at a URL."""
    path = epath.Path(path)
    if path.is_dir():
        if (path / "tokenizer.json").exists() or (path / "vocab.json").exists():
            return ByteLevelBPE.load(path)
        raise IsADirectoryError(
            f"{path} is a folder without tokenizer.json or vocab.json and merges.txt: give a sentencepiece "
            f".model file or a byte-level BPE's folder"
        )
    if path.suffix == ".json":
        return ByteLevelBPE.load(path)
    return Tokenizer.load(path)


def train_tokenizer(
    texts_or_files: Iterable[str | os.PathLike],
    model_prefix: str | os.PathLike,
    vocab_size: int = 4096,
    **options: Any,
) -> Tokenizer:
    """Train a byte-fallback BPE on texts (str) or UTF-8 files (paths); writes `{model_prefix}.model`
    (local or at a URL: sentencepiece trains in memory, the model file is written through epath)."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(texts_or_files),
            model_writer=model,
            vocab_size=vocab_size,
            **{**TRAINER_OPTIONS, **options},
        )
    except RuntimeError as error:
        clear = _vocab_size_error(str(error), vocab_size)
        if clear is None:
            raise
        raise clear from error
    path = epath.Path(f"{model_prefix}.model")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, model.getvalue())  # a process loading it concurrently never sees half a file
    return Tokenizer(spm.SentencePieceProcessor(model_proto=model.getvalue()))


def cached_tokenizer(
    texts: Sequence[str],
    cache_dir: str | os.PathLike,
    name: str,
    vocab_size: int = 4096,
    metadata: dict[str, Any] | None = None,
    **options: Any,
) -> Tokenizer:
    """`train_tokenizer` of `texts`, trained once then loaded from `cache_dir`: the file name holds a digest
    of the texts, vocab_size and options, so other documents (e.g. another max_documents) train another.
    `metadata` (what the texts are, e.g. the sample they were drawn as) is written beside it as JSON."""
    options = {**TRAINER_OPTIONS, **options}
    key = fingerprint([repr(sorted(options.items())), str(vocab_size), *texts])
    path = epath.Path(cache_dir) / f"{name}-bpe{vocab_size}-{key}.model"
    if path.exists():
        return Tokenizer.load(path)
    tokenizer = train_tokenizer(texts, path.with_suffix(""), vocab_size, **options)
    if metadata is not None:
        write_atomically(path.with_suffix(".json"), json.dumps(metadata, indent=1).encode())
    return tokenizer


def fingerprint(parts: Iterable[str | bytes]) -> str:
    """16 hex digits of SHA-256 over `parts` in order, each length-prefixed so boundaries count: a cache key."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8") if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()[:16]


def _vocab_size_error(message: str, vocab_size: int) -> ValueError | None:
    """sentencepiece's failures for a vocabulary too small or too large, as errors naming the size that works."""
    if match := re.search(r"smaller than required_chars\. \d+ vs (\d+)", message):
        return ValueError(
            f"vocab_size={vocab_size} is too small for this text: it needs at least {match[1]} "
            f"(every distinct character of the text, plus the special and byte pieces)"
        )
    if match := re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", message):
        return ValueError(
            f"vocab_size={vocab_size} is more than this text supports: at most {match[1]} "
            f"(train on more text for a larger vocabulary)"
        )
    return None


def _sentences(texts_or_files: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Training sentences: paragraphs (sentencepiece skips any longer than max_sentence_length, so cut them)."""
    for item in texts_or_files:
        text = epath.Path(item).read_text(encoding="utf-8") if isinstance(item, os.PathLike) else item
        for paragraph in re.split(r"(?<=\n\n)", text):
            yield from _cut(paragraph, SENTENCE_CHARS)


def _cut(text: str, size: int) -> Sequence[str]:
    """`text` in consecutive pieces of at most `size` characters."""
    return [text[start : start + size] for start in range(0, len(text), size)]
