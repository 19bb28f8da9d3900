"""The sentencepiece tokenizer: exact round trips of any UTF-8, fixed special ids, determinism, clear errors."""

import pathlib
import re

import numpy as np
import pytest

from zoo.tokenizer import EOS_ID, EOS_PIECE, PAD_ID, Tokenizer, cached_tokenizer, train_tokenizer

CORPUS = (
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n\n" * 30
    + "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles.\n" * 30
)
VOCAB = 320  # 3 specials + 256 bytes + merges: as much as this small corpus supports


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return train_tokenizer([CORPUS], tmp_path_factory.mktemp("tok") / "bpe", VOCAB)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "To be, or not to be",
        "  leading and   inner spaces\t\ttabs\r\nCRLF\n\n\n",
        "naïve café, Ελληνικά, русский, 日本語, 한국어, العربية",
        "emoji 🎭👑 and ZWJ 👩‍👩‍👧",
        "\x00\x01 control \x7f",
        "▁ literal U+2581 ▁▁x▁",
        "<|endoftext|> is plain text here",
        "\u2028\ufeff",
    ],
)
def test_round_trips_any_utf8(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_round_trips_random_code_points(tokenizer):
    rng = np.random.default_rng(0)
    points = rng.integers(0, 0x110000, 2000)
    text = "".join(chr(p) for p in points if not 0xD800 <= p < 0xE000)  # no lone surrogates in UTF-8
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_unseen_characters_fall_back_to_bytes(tokenizer):
    ids = tokenizer.encode("日")
    assert ids == [3 + byte for byte in "日".encode()]


def test_special_ids_are_fixed(tokenizer):
    assert (tokenizer.pad_id, tokenizer.eos_id) == (PAD_ID, EOS_ID) == (0, 2)
    assert tokenizer._sp.id_to_piece(EOS_ID) == EOS_PIECE
    assert tokenizer._sp.bos_id() == -1
    assert tokenizer.vocab_size == VOCAB


def test_eos_is_never_encoded_and_decodes_to_nothing(tokenizer):
    assert EOS_ID not in tokenizer.encode(f"one{EOS_PIECE}two")
    ids = [*tokenizer.encode("one"), EOS_ID, *tokenizer.encode("two")]
    assert tokenizer.decode(ids) == "onetwo"


def test_same_inputs_give_the_same_model_from_texts_or_files(tmp_path):
    (tmp_path / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    train_tokenizer([CORPUS], tmp_path / "a", VOCAB)
    train_tokenizer([tmp_path / "corpus.txt"], tmp_path / "b", VOCAB)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()


def test_load_gives_the_trained_tokenizer(tokenizer, tmp_path):
    path = tmp_path / "t.model"
    path.write_bytes(tokenizer._sp.serialized_model_proto())
    assert Tokenizer.load(path).encode(CORPUS[:200]) == tokenizer.encode(CORPUS[:200])


def test_missing_model_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.model"):
        Tokenizer.load(tmp_path / "nothing.model")


def test_a_folder_or_a_file_that_is_no_model_is_named(tmp_path):
    with pytest.raises(IsADirectoryError, match=f"{re.escape(str(tmp_path))} is a folder"):
        Tokenizer.load(tmp_path)
    for content in (b"not a model", b""):
        (tmp_path / "notes.model").write_bytes(content)
        with pytest.raises(ValueError, match=r"notes\.model is not a sentencepiece model"):
            Tokenizer.load(tmp_path / "notes.model")


def test_too_small_a_vocabulary_names_the_smallest_that_works(tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size=270 is too small .* at least \d+") as error:
        train_tokenizer([CORPUS], tmp_path / "a", 270)
    smallest = int(str(error.value).split("at least ")[1].split()[0])
    assert train_tokenizer([CORPUS], tmp_path / "b", smallest).vocab_size == smallest
    with pytest.raises(ValueError, match=f"at least {smallest}"):
        train_tokenizer([CORPUS], tmp_path / "c", smallest - 1)


def test_too_large_a_vocabulary_names_the_largest_that_works(tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size=5000 is more than this text supports: at most \d+") as error:
        train_tokenizer([CORPUS], tmp_path / "a", 5000)
    largest = int(str(error.value).split("at most ")[1].split()[0])
    assert train_tokenizer([CORPUS], tmp_path / "b", largest).vocab_size == largest


def test_cached_tokenizers_are_keyed_by_their_texts_and_options(tmp_path):
    first = cached_tokenizer([CORPUS], tmp_path, "demo", VOCAB)
    (model_file,) = tmp_path.glob("demo-bpe320-*.model")
    mtime = model_file.stat().st_mtime_ns
    again = cached_tokenizer([CORPUS], tmp_path, "demo", VOCAB)
    assert model_file.stat().st_mtime_ns == mtime and again.encode(CORPUS) == first.encode(CORPUS)
    cached_tokenizer([CORPUS[: len(CORPUS) // 2]], tmp_path, "demo", VOCAB)  # fewer documents: other texts
    cached_tokenizer([CORPUS], tmp_path, "demo", 300)
    cached_tokenizer([CORPUS], tmp_path, "demo", VOCAB, split_digits=False)
    assert len(list(tmp_path.glob("demo-*.model"))) == 4


def test_vocab_check_names_both_sizes(tokenizer):
    tokenizer.check_vocab(VOCAB)
    tokenizer.check_vocab(512)
    with pytest.raises(ValueError, match=rf"{VOCAB} tokens .* vocab_size is 256"):
        tokenizer.check_vocab(256)


def test_model_prefix_folders_are_created(tmp_path):
    train_tokenizer([CORPUS], tmp_path / "deep" / "er" / "bpe", VOCAB)
    assert pathlib.Path(tmp_path / "deep" / "er" / "bpe.model").is_file()
