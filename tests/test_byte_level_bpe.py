"""GPT-2's byte-level BPE (zoo.tokenizer.ByteLevelBPE, through HF `tokenizers`) gives the ids of
GPT-2's released encoder algorithm (written out below from its description, not the library we
use) for a vocabulary and merges trained offline here; any text round-trips; loading by file kind."""

import functools
import itertools
import json

import numpy as np
import pytest
import regex

from zoo.data import shakespeare
from zoo.tokenizer import (
    EOS_PIECE,
    ByteLevelBPE,
    Tokenizer,
    load_tokenizer,
    tokenizer_from_bytes,
    train_byte_level_bpe,
    train_tokenizer,
)

VOCAB = 600
TEXTS = [
    "",
    "To be, or not to be: that is the question.",
    "  runs   of spaces\t\ttabs\n\n\nnewlines  \n trailing   ",
    "I'm sure they've said we'll go, can't you? 'Tis done.",
    "naïve café, Ürgen's Ελληνικά, русский",
    "emoji 🎭👑 and a ZWJ family 👩‍👩‍👧",
    "床前明月光，疑是地上霜。舉頭望明月，低頭思故鄉。",
    "numbers 12345 and 3.14159, 1,000,000",
    f"a literal {EOS_PIECE} in the text",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A byte-level BPE trained on three plays, and its GPT-2-style vocab.json + merges.txt folder."""
    folder = tmp_path_factory.mktemp("bbpe")
    plays = [shakespeare.works()[name] for name in ("hamlet", "macbeth", "tempest")]
    bbpe = train_byte_level_bpe(plays, folder / "tokenizer.json", VOCAB)
    gpt2 = folder / "gpt2"
    gpt2.mkdir()
    bbpe._tk.model.save(str(gpt2))  # vocab.json and merges.txt, as GPT-2 released them
    return bbpe, gpt2


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte: printable Latin-1 bytes stand for themselves, the
    others for code points from 256 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


class ReleasedGPT2Encoder:
    """GPT-2's encoder.py algorithm: split by its pattern, map bytes to stand-ins, then repeatedly
    merge the adjacent pair of lowest merge rank."""

    PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def __init__(self, vocab: dict[str, int], merges: list[str]):
        self.encoder, self.byte_encoder = vocab, bytes_to_unicode()
        self.ranks = {tuple(line.split()): rank for rank, line in enumerate(merges)}

    @functools.cache  # noqa: B019 (one encoder per test module)
    def bpe(self, token: str) -> tuple[str, ...]:
        word = tuple(token)
        while len(word) > 1:
            pairs = set(itertools.pairwise(word))
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.PATTERN.findall(text):
            token = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids += [self.encoder[part] for part in self.bpe(token)]
        return ids


@pytest.fixture(scope="module")
def released(trained):
    _, gpt2 = trained
    vocab = json.loads((gpt2 / "vocab.json").read_text())
    merges = [line for line in (gpt2 / "merges.txt").read_text().splitlines() if line and not line.startswith("#")]
    return ReleasedGPT2Encoder(vocab, merges)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_gpt2s_released_algorithm(trained, released, text):
    bbpe, gpt2 = trained
    assert bbpe.encode(text) == released.encode(text)
    assert ByteLevelBPE.load(gpt2).encode(text) == released.encode(text)  # from vocab.json + merges.txt
    assert bbpe.decode(bbpe.encode(text)) == text


def test_the_reference_is_not_trivially_equal(trained, released):
    """The merges matter: without them the reference gives one id per byte, and ours does not."""
    bbpe, _ = trained
    text = "To be, or not to be"
    assert len(bbpe.encode(text)) < len(text.encode()) == len(ReleasedGPT2Encoder(released.encoder, []).encode(text))


def test_any_text_round_trips(trained):
    bbpe, _ = trained
    rng = np.random.default_rng(0)
    for _ in range(50):
        points = rng.integers(1, 0x10FFFF, rng.integers(1, 40))
        text = "".join(chr(p) for p in points if not 0xD800 <= p < 0xE000)  # no lone surrogates: not UTF-8
        assert bbpe.decode(bbpe.encode(text)) == text


def test_end_of_text_is_last_never_encoded_and_decodes_to_nothing(trained):
    bbpe, _ = trained
    assert bbpe.vocab_size == VOCAB and bbpe.eos_id == VOCAB - 1 == bbpe.pad_id
    assert bbpe.eos_id not in bbpe.encode(f"one{EOS_PIECE}two")
    assert bbpe.decode([*bbpe.encode("one"), bbpe.eos_id, *bbpe.encode("two")]) == "onetwo"


def test_tokenizers_load_by_file_kind_and_from_their_bytes(trained, tmp_path):
    bbpe, gpt2 = trained
    spm = train_tokenizer([shakespeare.works()["macbeth"]], tmp_path / "spm", 400)
    assert isinstance(load_tokenizer(tmp_path / "spm.model"), Tokenizer)
    assert isinstance(load_tokenizer(gpt2), ByteLevelBPE) and isinstance(load_tokenizer(gpt2.parent), ByteLevelBPE)
    assert isinstance(load_tokenizer(gpt2.parent / "tokenizer.json"), ByteLevelBPE)
    for tokenizer in (spm, bbpe):
        again = tokenizer_from_bytes(tokenizer.serialized())
        assert type(again) is type(tokenizer) and again.encode(TEXTS[3]) == tokenizer.encode(TEXTS[3])
    with pytest.raises(IsADirectoryError, match=r"without tokenizer\.json"):
        load_tokenizer(tmp_path)
