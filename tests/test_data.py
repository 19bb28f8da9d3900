"""Data pipelines: tfds builds without TensorFlow, packing, and batches that are pure functions of
(seed, step, process), so resuming at step k and splitting over processes change nothing."""

import gzip
import pathlib
import re
import struct

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core.data_sources.array_record import ArrayRecordDataSource

from zoo.data import images, shakespeare, text
from zoo.tokenizer import train_tokenizer

# The real data, where a machine has it: $ZOO_DATA_DIR/fashion-mnist (with Debian's dataset-fashion-mnist,
# ZOO_DATA_DIR=/usr/share/datasets); the loaders themselves are tested on IDX files the tests write.
FASHION_MNIST = images.local_dataset("fashion-mnist")
needs_fashion_mnist = pytest.mark.skipif(
    FASHION_MNIST is None, reason=f"real Fashion-MNIST not in ${images.DATA_ENV}/fashion-mnist"
)


@pytest.fixture
def mock_tfds(monkeypatch):
    """tfds's mock data, with batch reads working (its mock source breaks `__getitems__`, tfds 4.9.10)."""
    monkeypatch.setattr(ArrayRecordDataSource, "__getitems__", lambda self, keys: [self[key] for key in keys])
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = "".join(shakespeare.works()[name][:20_000] for name in ("hamlet", "sonnets"))
    return train_tokenizer([corpus], tmp_path_factory.mktemp("tok") / "bpe", 400)


def write_text_dir(folder: pathlib.Path, splits: dict[str, dict[str, str]]) -> pathlib.Path:
    """`folder`/<split>/<name>.txt for each {split: {name: text}}."""
    for split, documents in splits.items():
        (folder / split).mkdir(parents=True, exist_ok=True)
        for name, document in documents.items():
            (folder / split / f"{name}.txt").write_text(document, encoding="utf-8")
    return folder


@pytest.fixture
def text_dir(tmp_path) -> pathlib.Path:
    plays = shakespeare.works()
    return write_text_dir(
        tmp_path / "plays",
        {
            "train": {name: plays[name][:8000] for name in ("hamlet", "lear")},
            "validation": {"macbeth": plays["macbeth"][:2000]},
        },
    )


# --- shuffling and batches -------------------------------------------------------------------


def test_the_shuffle_is_pinned():
    # Exact resume across library upgrades: these numbers must never change.
    assert int(text.hash64(0, 0, 0, 3)) == 7606012053026511699  # SplitMix64, checked against a pure-Python one
    assert text.epoch_order(10, 0, 0).tolist() == [0, 1, 9, 4, 2, 3, 6, 8, 7, 5]


def test_each_epoch_visits_every_row_once_in_a_new_order():
    rows = np.arange(12)[:, None]
    pipeline = text.TextPipeline(rows, global_batch=4, seed=3)
    epochs = [np.concatenate([pipeline.batch_at(step)[:, 0] for step in range(e * 3, e * 3 + 3)]) for e in range(3)]
    assert all(sorted(epoch) == list(range(12)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3


def test_batches_straddle_epochs_when_the_batch_does_not_divide_the_rows():
    pipeline = text.TextPipeline(np.arange(10)[:, None], global_batch=4, seed=0)
    stream = np.concatenate([pipeline.batch_at(step)[:, 0] for step in range(5)])
    assert sorted(stream[:10]) == sorted(stream[10:]) == list(range(10))


def test_batches_depend_only_on_seed_and_step():
    rows = np.arange(300).reshape(100, 3)
    a, b = text.TextPipeline(rows, 8, seed=1), text.TextPipeline(rows, 8, seed=1)
    np.testing.assert_array_equal(a.batch_at(37), b.batch_at(37))
    assert a.batch_at(5).dtype == np.int32 and a.batch_at(5).shape == (8, 3)
    assert not np.array_equal(a.batch_at(5), text.TextPipeline(rows, 8, seed=2).batch_at(5))


def test_resume_at_step_k_replays_the_uninterrupted_run():
    rows = np.arange(50 * 5).reshape(50, 5)
    uninterrupted = [batch for _, batch in zip(range(12), text.TextPipeline(rows, 8, seed=7))]
    first = text.TextPipeline(rows, 8, seed=7)
    for _ in range(5):
        next(first)
    state = first.get_state()
    assert state == {"step": 5, "seed": 7}
    resumed = text.TextPipeline(rows, 8, seed=7)
    resumed.set_state(state)
    for expected, batch in zip(uninterrupted[5:], resumed):
        np.testing.assert_array_equal(batch, expected)


def test_resume_with_another_seed_is_refused():
    pipeline = text.TextPipeline(np.zeros((4, 3)), 2, seed=0)
    with pytest.raises(ValueError, match=r"seed 1 .* seed 0"):
        pipeline.set_state({"step": 3, "seed": 1})


def test_process_slices_are_disjoint_and_make_up_the_global_batch():
    rows = np.arange(40)[:, None].repeat(3, axis=1)
    single = text.TextPipeline(rows, 8, seed=5)
    halves = [text.TextPipeline(rows, 8, seed=5, process_index=p, process_count=2) for p in range(2)]
    for step in (0, 4, 9):  # 9 straddles an epoch boundary
        parts = [half.batch_at(step) for half in halves]
        assert all(part.shape == (4, 3) for part in parts)
        assert not set(parts[0][:, 0]) & set(parts[1][:, 0])
        np.testing.assert_array_equal(np.concatenate(parts), single.batch_at(step))


def test_bad_process_settings_are_named():
    with pytest.raises(ValueError, match=r"global_batch=6 .* process_count=4"):
        text.TextPipeline(np.zeros((10, 3)), 6, seed=0, process_count=4)
    with pytest.raises(ValueError, match="process_index=2"):
        text.TextPipeline(np.zeros((10, 3)), 6, seed=0, process_index=2, process_count=2)


def test_unshuffled_batches_are_in_order():
    pipeline = text.TextPipeline(np.arange(10)[:, None], 5, seed=0, shuffle=False)
    assert pipeline.steps_per_epoch == 2
    assert pipeline.batch_at(1)[:, 0].tolist() == [5, 6, 7, 8, 9]


# --- packing and text datasets ---------------------------------------------------------------


def test_packing_keeps_every_token_in_order_with_eos_after_each_document(tokenizer):
    docs = ["First document.\n", "Second, longer document: 日本 ▁ 🎭.\n" * 5, "x"]
    stream = [token for doc in docs for token in [*tokenizer.encode(doc), tokenizer.eos_id]]
    rows = text.packed_rows(tokenizer, docs, length=7)
    assert rows.dtype == np.int32 and rows.shape == (len(stream) // 8, 8)
    assert rows.ravel().tolist() == stream[: rows.size]
    assert len(stream) - rows.size < 8


def test_packing_too_little_text_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="one row of length"):
        text.packed_rows(tokenizer, ["hi"], length=64)


def test_local_text_files_build_once_and_read_back(tmp_path, capsys):
    splits = {"train": {name: f"text of {name} ▁ é\n\n" for name in "bac"}, "validation": {"z": "zz"}}
    source = write_text_dir(tmp_path / "source", splits)
    builder = text.build_text_files(source, tmp_path / "data", "demo")
    assert list(text.source_texts(builder.as_data_source("train"))) == [f"text of {n} ▁ é\n\n" for n in "abc"]
    assert list(text.source_texts(builder.as_data_source("validation"), "name")) == ["z"]
    printed = capsys.readouterr().out
    assert f"building tfds local_text_files/{builder.builder_config.name} from {source}" in printed
    assert "Downloading" not in printed and "downloaded" not in printed  # tfds's wording for a download
    again = text.build_text_files(source, tmp_path / "data", "demo")
    assert again.builder_config.name == builder.builder_config.name and not capsys.readouterr().out  # reused


def test_a_text_folder_is_rebuilt_when_its_files_change(tmp_path):
    source = write_text_dir(tmp_path / "source", {"train": {"a": "old text"}, "validation": {"z": "zz"}})
    before = text.build_text_files(source, tmp_path / "data", "demo")
    (source / "train" / "a.txt").write_text("new text", encoding="utf-8")
    after = text.build_text_files(source, tmp_path / "data", "demo")
    assert list(text.source_texts(after.as_data_source("train"))) == ["new text"]
    assert list(text.source_texts(before.as_data_source("train"))) == ["old text"]


def test_a_missing_text_folder_or_split_is_named_with_the_layout(tmp_path):
    layout = re.escape("DIR/train/*.txt and DIR/<eval split>/*.txt")
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=rf"text folder {re.escape(str(missing))} does not exist.*{layout}"):
        text.prepare_corpus(tmp_path / "data", 8, 300, text_dir=missing)
    source = write_text_dir(tmp_path / "source", {"train": {"a": "some text"}})
    with pytest.raises(FileNotFoundError, match=rf"no validation/\*\.txt files \(splits found: train\).*{layout}"):
        text.prepare_corpus(tmp_path / "data", 8, 300, text_dir=source)
    with pytest.raises(FileNotFoundError, match=r"no train/\*\.txt files \(splits found: none\)"):
        text.prepare_corpus(tmp_path / "data", 8, 300, text_dir=source / "train")
    assert not (tmp_path / "data").exists()


def test_the_shipped_corpus_names_its_splits(tmp_path):
    with pytest.raises(ValueError, match="the shipped Shakespeare has the splits train and validation, not 'test'"):
        text.prepare_corpus(tmp_path, 8, 300, eval_split="test")


def test_a_given_tokenizer_is_used_for_every_corpus(tmp_path, tokenizer, text_dir):
    given = tmp_path / "given.model"
    given.write_bytes(tokenizer._sp.serialized_model_proto())
    for source in ({}, {"text_dir": text_dir}):  # {}: the shipped Shakespeare
        corpus = text.prepare_corpus(tmp_path / "data", 16, 4096, tokenizer_path=given, max_documents=1, **source)
        assert corpus.tokenizer.vocab_size == tokenizer.vocab_size == 400 > int(corpus.train.max())
        assert corpus.tokenizer.encode("To be, or not") == tokenizer.encode("To be, or not")
    assert not (tmp_path / "data" / "tokenizers").exists()


def test_a_missing_or_invalid_tokenizer_is_named_before_anything_is_built(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model", encoding="utf-8")
    for path, error in (
        (tmp_path, IsADirectoryError),
        (tmp_path / "missing.model", FileNotFoundError),
        (tmp_path / "notes.txt", ValueError),
    ):
        with pytest.raises(error, match=re.escape(str(path))):
            text.prepare_corpus(tmp_path / "data", 16, 300, tokenizer_path=path)
    assert not (tmp_path / "data").exists()


def test_tokenizers_are_keyed_by_the_documents_they_learn_from(tmp_path, text_dir):
    one, two, again = (text.prepare_corpus(tmp_path, 16, 400, text_dir=text_dir, max_documents=n) for n in (1, 2, 1))
    assert len(list((tmp_path / "tokenizers").glob("plays-bpe400-*.model"))) == 2
    assert one.tokenizer._sp.serialized_model_proto() != two.tokenizer._sp.serialized_model_proto()
    np.testing.assert_array_equal(again.train, one.train)


@pytest.mark.parametrize("bad", [-1, 50])
def test_token_ids_outside_the_vocabulary_are_named(bad):
    rows = np.array([[1, 2, 3], [4, bad, 5]])
    low, high = min(bad, 1), max(bad, 5)
    with pytest.raises(ValueError, match=rf"validation rows hold token ids in \[{low}, {high}\], outside \[0, 50\)"):
        text.check_token_ids(rows, 50, "validation")
    text.check_token_ids(np.array([[0, 49]]), 50, "training")


def test_shipped_shakespeare_packs_through_tfds_and_is_cached(tmp_path):
    corpus = text.prepare_shakespeare(tmp_path, length=64, vocab_size=512)
    assert corpus.tokenizer.vocab_size == 512
    assert corpus.train.shape[1] == corpus.validation.shape[1] == 65
    assert corpus.train.shape[0] > 10 * corpus.validation.shape[0] > 0
    assert shakespeare.works()["macbeth"].startswith(corpus.tokenizer.decode(corpus.validation[0]))
    model_file = next((tmp_path / "tokenizers").glob("*.model"))
    mtime = model_file.stat().st_mtime_ns
    cached = text.prepare_shakespeare(tmp_path, length=64, vocab_size=512)
    assert model_file.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(cached.train, corpus.train)


def test_unknown_validation_play_is_named(tmp_path):
    with pytest.raises(ValueError, match="hamlet2"):
        text.prepare_shakespeare(tmp_path, length=64, validation=("hamlet2",))


def test_tfds_text_datasets_by_name(mock_tfds):
    # The code path for machines that download; tfds's mock data stands in for tiny_shakespeare.
    docs = list(text.tfds_documents("tiny_shakespeare", "train"))
    assert len(docs) == 6 and all(isinstance(doc, str) for doc in docs)


# --- images ----------------------------------------------------------------------------------


def write_idx(path: pathlib.Path, array: np.ndarray, compress: bool = True) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


@pytest.fixture
def idx_folder(tmp_path) -> pathlib.Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("t10k", 5)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return tmp_path


def test_idx_files_parse_gzipped_or_not(tmp_path):
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array)
    write_idx(tmp_path / "a", array, compress=False)
    assert (tmp_path / "a").read_bytes()[:4] == struct.pack(">I", 2051)
    for path in (tmp_path / "a.gz", tmp_path / "a"):
        parsed = images.read_idx(path)
        assert parsed.dtype == np.uint8
        np.testing.assert_array_equal(parsed, array)


def test_bad_idx_files_are_errors(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01" + bytes(8))
    with pytest.raises(ValueError, match="not an IDX file"):
        images.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(struct.pack(">I", 2049) + struct.pack(">I", 10) + bytes(7))
    with pytest.raises(ValueError, match=r"\(10,\) .* 7 bytes"):
        images.read_idx(tmp_path / "short")


def test_fashion_mnist_builder_keeps_the_idx_order(idx_folder, tmp_path):
    builder = images.build_fashion_mnist(idx_folder, tmp_path / "data")
    examples = images.load_examples(builder.as_data_source("train"))
    expected_images, expected_labels = images.read_idx_pair(
        idx_folder / "train-images-idx3-ubyte.gz", idx_folder / "train-labels-idx1-ubyte.gz"
    )
    assert examples.shape == (12, 28, 28, 1) and examples.images.dtype == np.uint8
    np.testing.assert_array_equal(examples.images, expected_images)
    np.testing.assert_array_equal(examples.labels, expected_labels)
    assert len(builder.as_data_source("test")) == 5
    assert builder.info.features["label"].names[9] == "ankle boot"


def test_fashion_mnist_builder_names_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte\.gz"):
        images.build_fashion_mnist(tmp_path, tmp_path / "data")


@needs_fashion_mnist
def test_real_fashion_mnist_idx_files():
    folder = FASHION_MNIST
    train_images, train_labels = images.read_idx_pair(
        folder / "train-images-idx3-ubyte.gz", folder / "train-labels-idx1-ubyte.gz"
    )
    assert train_images.shape == (60000, 28, 28, 1)
    assert np.bincount(train_labels).tolist() == [6000] * 10
    np.testing.assert_allclose(train_images.mean() / 255, images.FASHION_MNIST_MEAN[0], atol=1e-4)
    np.testing.assert_allclose((train_images / 255).std(), images.FASHION_MNIST_STD[0], atol=1e-4)


def test_crop_and_flip_is_a_shifted_mirrored_window():
    batch = np.random.default_rng(0).integers(0, 256, (64, 6, 5, 2), dtype=np.uint8)
    keys = text.hash64(1, np.arange(64))
    out = images.crop_and_flip(batch, 2, keys)
    assert out.shape == batch.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, images.crop_and_flip(batch, 2, keys))
    padded = np.pad(batch, ((0, 0), (2, 2), (2, 2), (0, 0)))
    flips = 0
    for image, window_source in zip(out, padded):
        windows = [(window_source[y : y + 6, x : x + 5], f) for y in range(5) for x in range(5) for f in (0, 1)]
        matches = [f for window, f in windows if np.array_equal(image, window[:, ::-1] if f else window)]
        assert matches
        flips += matches[0]
    assert 16 < flips < 48
    np.testing.assert_array_equal(images.crop_and_flip(batch, 0, keys & ~np.uint64(1 << 32)), batch)


def pipeline(examples, **kwargs):
    return images.ImagePipeline(
        examples,
        global_batch=8,
        seed=kwargs.pop("seed", 0),
        image_size=(6, 5),
        channels=2,
        mean=(0.5, 0.4),
        std=(0.25, 0.2),
        **kwargs,
    )


def test_image_batches_are_deterministic_resumable_and_split_over_processes():
    examples = images.synthetic_examples(30, (6, 5), 2, num_classes=3)
    single = pipeline(examples)
    batch = single.batch_at(4)
    assert batch["image"].shape == (8, 6, 5, 2) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32
    for key in ("image", "label"):
        np.testing.assert_array_equal(pipeline(examples).batch_at(4)[key], batch[key])
    resumed = pipeline(examples)
    resumed.set_state({"step": 4, "seed": 0})
    np.testing.assert_array_equal(next(resumed)["image"], batch["image"])
    halves = [pipeline(examples, process_index=p, process_count=2).batch_at(4) for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), batch["image"])
    assert not np.array_equal(pipeline(examples, seed=1).batch_at(4)["image"], batch["image"])


def test_unaugmented_batches_are_normalised_examples_in_order():
    examples = images.synthetic_examples(16, (6, 5), 2, num_classes=3)
    batch = pipeline(examples, augment=False, shuffle=False).batch_at(1)
    expected = (examples.images[8:16] / 255 - np.array([0.5, 0.4])) / np.array([0.25, 0.2])
    np.testing.assert_allclose(batch["image"], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(batch["label"], examples.labels[8:16])


def test_images_decoded_in_parallel_equal_the_serial_decoding():
    examples = images.synthetic_examples(30, (6, 5), 2, num_classes=3)
    serial = pipeline(examples, workers=1)
    for workers in (2, 3, 8, 64):  # slices of unequal sizes, and more workers than rows
        parallel = pipeline(examples, workers=workers)
        for step in (0, 3, 7):
            for key in ("image", "label"):
                np.testing.assert_array_equal(parallel.batch_at(step)[key], serial.batch_at(step)[key])


def test_images_read_from_a_source_and_resized_in_parallel_equal_the_serial_reading(mock_tfds):
    imagenet = images.tfds_examples("imagenet2012", "train", image_size=16)  # mock images vary in size
    serial, parallel = (
        images.ImagePipeline(imagenet, 6, 0, 16, 3, mean=(0.5,) * 3, std=(0.25,) * 3, workers=w) for w in (1, 4)
    )
    for key in ("image", "label"):
        np.testing.assert_array_equal(parallel.batch_at(1)[key], serial.batch_at(1)[key])


@pytest.mark.parametrize(
    "image_size, channels, match",
    [
        (32, 1, r"\(28, 28, 1\) but the model expects \(32, 32, 1\).*image_size"),
        (28, 3, r"\(28, 28, 1\) but the model expects \(28, 28, 3\).*num_channels=1"),
    ],
)
def test_images_that_do_not_fit_the_model_are_named(image_size, channels, match):
    examples = images.synthetic_examples(4, 28, 1, num_classes=10)
    with pytest.raises(ValueError, match=match):
        images.ImagePipeline(examples, 4, 0, image_size, channels, mean=(0.5,) * channels, std=(0.5,) * channels)


def test_images_without_a_channel_axis_are_named():
    with pytest.raises(ValueError, match=r"channel axis"):
        images.check_images((10, 28, 28), 28, 1)


def test_fit_image_resizes_to_cover_then_centre_crops():
    """The image is scaled (aspect kept) just enough to cover the target, then its centre is cut out."""
    wide = np.arange(2 * 6 * 1, dtype=np.uint8).reshape(2, 6, 1)  # already the target height: a crop only
    np.testing.assert_array_equal(images.fit_image(wide, (2, 2)), wide[:, 2:4])
    np.testing.assert_array_equal(images.fit_image(np.full((1, 1, 3), 7, np.uint8), (3, 5)), np.full((3, 5, 3), 7))
    halves = np.zeros((10, 25, 1), np.uint8)
    halves[:, 13:] = 250  # dark left half, bright right half
    fitted = images.fit_image(halves, (16, 12))  # 10 rows to 16: 25 columns to 40, the middle 12 kept
    assert fitted.shape == (16, 12, 1) and fitted.dtype == np.uint8
    assert (fitted[:, :5] < 10).all() and (fitted[:, 8:] > 240).all()  # the edge stays in the middle
    for shape in ((40, 30, 3), (16, 16, 3)):
        image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        assert images.fit_image(image, (16, 12)).shape == (16, 12, 3)


def test_tfds_image_datasets_by_name(mock_tfds):
    # The code path for machines that download; tfds's mock data stands in for the real sets.
    cifar = images.tfds_examples("cifar10", "train")
    assert cifar.shape == (6, 32, 32, 3)
    imagenet = images.tfds_examples("imagenet2012", "train", image_size=16)  # mock images vary in size
    batch = images.ImagePipeline(imagenet, 4, 0, 16, 3, mean=(0.5,) * 3, std=(0.25,) * 3).batch_at(0)
    assert batch["image"].shape == (4, 16, 16, 3)
    with pytest.raises(ValueError, match="different shapes"):
        images.tfds_examples("imagenet2012", "train")
