"""zoo.data.store: a corpus tokenized once into shards, read back as the rows in-memory packing
gives; a killed preparation resumes to the same bytes; a changed corpus or tokenizer is a new store."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from etils import epath

from zoo.data import shakespeare, store, text
from zoo.tokenizer import ByteLevelBPE, train_byte_level_bpe, train_tokenizer

SPLITS = ("train", "validation")


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """The shipped corpus's tfds build and a small tokenizer trained on a few plays."""
    data_dir = tmp_path_factory.mktemp("data")
    corpus = text.prepare_shakespeare(data_dir, length=32, vocab_size=400, max_documents=2)
    builder = next(data_dir.glob("local_text_files/*/1.0.0"))
    return builder, corpus.tokenizer


def documents(builder, split):
    return list(text.source_texts(text.tfds.builder_from_directory(os.fspath(builder)).as_data_source(split)))


def files(folder) -> dict[str, bytes]:
    """Every finished file of a store (not a killed write's temporary leftovers), by relative path."""
    folder = pathlib.Path(folder)
    finished = [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")]
    return {str(p.relative_to(folder)): p.read_bytes() for p in finished}


def test_rows_equal_the_in_memory_packing_of_every_split_across_shard_boundaries(shipped, tmp_path):
    builder, tokenizer = shipped
    built = store.build_store(builder, SPLITS, tokenizer, tmp_path, workers=2, documents_per_shard=3, progress=False)
    for split in SPLITS:
        expected = text.packed_rows(tokenizer, documents(builder, split), length=32)
        rows = built.rows(split, 32)
        assert rows.shape == expected.shape
        np.testing.assert_array_equal(np.asarray(rows), expected)
        picks = np.array([len(expected) - 1, 0, 5, 5])
        np.testing.assert_array_equal(rows[picks], expected[picks])
        np.testing.assert_array_equal(rows[3], expected[3])
        assert (rows.min(), rows.max()) == (expected.min(), expected.max())
    assert built.tokenizer().serialized() == tokenizer.serialized()  # a store alone is enough to train on
    assert len(list((tmp_path.iterdir().__next__() / "train").glob("*.docs.npy"))) > 10  # 40 plays, 3 a shard


def test_the_first_documents_only(shipped, tmp_path):
    builder, tokenizer = shipped
    built = store.build_store(builder, SPLITS, tokenizer, tmp_path, documents_per_shard=3, progress=False)
    expected = text.packed_rows(tokenizer, documents(builder, "train")[:5], length=32)
    np.testing.assert_array_equal(np.asarray(built.rows("train", 32, max_documents=5)), expected)


def test_hosts_split_the_preparation_and_a_last_call_writes_the_index(shipped, tmp_path):
    builder, tokenizer = shipped
    whole = store.build_store(builder, SPLITS, tokenizer, tmp_path / "one", documents_per_shard=4, progress=False)
    for host in (0, 1):
        assert (
            store.build_store(
                builder, SPLITS, tokenizer, tmp_path / "two", host=host, hosts=2, documents_per_shard=4, progress=False
            )
            is None
        )
    shared = store.build_store(builder, SPLITS, tokenizer, tmp_path / "two", documents_per_shard=4, progress=False)
    assert files(shared.folder) == files(whole.folder)


def test_a_killed_preparation_resumes_to_the_same_bytes(shipped, tmp_path):
    builder, tokenizer = shipped
    whole = store.build_store(builder, SPLITS, tokenizer, tmp_path / "whole", documents_per_shard=1, progress=False)
    model = tmp_path / "tokenizer.model"
    model.write_bytes(tokenizer.serialized())
    code = (
        "from zoo.data import store; from zoo.tokenizer import Tokenizer; "
        f"store.build_store({str(builder)!r}, {SPLITS!r}, Tokenizer.load({str(model)!r}), "
        f"{str(tmp_path / 'killed')!r}, documents_per_shard=1, progress=False)"
    )
    process = subprocess.Popen([sys.executable, "-c", code])
    folder = tmp_path / "killed" / whole.folder.name
    deadline = time.time() + 120
    while not list(folder.glob("train/*.json")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (folder / "index.json").exists(), "the preparation finished before it could be killed"
    finished = len(list(folder.glob("train/*.json")))
    resumed = store.build_store(builder, SPLITS, tokenizer, tmp_path / "killed", documents_per_shard=1, progress=False)
    assert 0 < finished < len(list(folder.glob("train/*.json")))
    assert files(resumed.folder) == files(whole.folder)


def test_an_edited_file_or_another_tokenizer_makes_a_new_store(tmp_path):
    source = tmp_path / "texts"
    for split, names in (("train", "abc"), ("validation", "z")):
        (source / split).mkdir(parents=True)
        for name in names:
            (source / split / f"{name}.txt").write_text(shakespeare.works()["hamlet"][:3000] + name, encoding="utf-8")
    first = text.prepare_corpus(tmp_path / "data", 16, 400, text_dir=source)
    (source / "train" / "b.txt").write_text("an edited play\n" * 100, encoding="utf-8")
    edited = text.prepare_corpus(tmp_path / "data", 16, 400, text_dir=source)
    other = train_tokenizer([shakespeare.works()["macbeth"]], tmp_path / "other", 400)
    other_path = tmp_path / "other.model"
    retokenized = text.prepare_corpus(tmp_path / "data", 16, 400, text_dir=source, tokenizer_path=other_path)
    folders = {rows.folder.parent for rows in (first.train, edited.train, retokenized.train)}
    assert len(folders) == 3 and all((folder / "index.json").exists() for folder in folders)
    assert other.vocab_size == retokenized.tokenizer.vocab_size
    assert len(first.train) != len(edited.train)


def test_a_cloud_path_is_read_by_byte_ranges(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    np.save(tmp_path / "00000.npy", tokens)
    reader = store._RangeReader(epath.Path(tmp_path / "00000.npy"))
    np.testing.assert_array_equal(reader[slice(17, 530)], tokens[17:530])


def test_a_store_without_its_index_is_unfinished(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a finished token store"):
        store.TokenStore(tmp_path)


def test_two_processes_read_disjoint_rows_that_make_the_global_batch(shipped, tmp_path):
    builder, tokenizer = shipped
    rows = store.build_store(builder, SPLITS, tokenizer, tmp_path, progress=False).rows("train", 32)
    whole = text.TextPipeline(rows, 8, seed=3).batch_at(5)
    halves = [text.TextPipeline(rows, 8, seed=3, process_index=p, process_count=2).batch_at(5) for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate(halves), whole)
    assert not {tuple(r) for r in halves[0]} & {tuple(r) for r in halves[1]}


def test_shards_hold_about_32_mb_of_text_by_the_corpus_mean_document():
    splits = {"train": {"shards": ["900", "100"], "bytes": "100000000"}, "test": {"shards": ["24"], "bytes": "2400000"}}
    assert store.shard_documents({"splits": splits}) == 320  # 1024 documents of 100 KB: 320 make 32 MB
    assert store.shard_documents({"splits": {"train": {"shards": ["2"], "bytes": str(10**9)}}}) == 1


def test_the_tokenizer_learns_from_a_bounded_seeded_sample_in_index_order():
    source = [{"text": f"{i:03d}" + "x" * 997} for i in range(100)]  # 100 documents of 1000 bytes
    sample = text.tokenizer_sample(source, max_bytes=10_000, seed=0)
    assert len(sample) == 10 and sample == sorted(sample)  # 10 kB, in index order
    assert text.tokenizer_sample(source, max_bytes=10_000, seed=0) == sample
    assert text.tokenizer_sample(source, max_bytes=10_000, seed=1) != sample
    assert len(text.tokenizer_sample(source, max_bytes=10**9)) == 100  # a small corpus whole
    assert all(int(doc[:3]) < 20 for doc in text.tokenizer_sample(source, max_bytes=10**9, documents=20))


def test_the_tokenizer_records_its_sample(shipped):
    builder, _ = shipped
    [record] = builder.parents[2].glob("tokenizers/*.json")
    assert (
        json.loads(record.read_text())["sample"] | {"order": None}
        == {
            "documents": 2,  # the fixture's max_documents
            "of": 2,
            "bytes": sum(len(doc.encode()) for doc in documents(builder, "train")[:2]),
            "max_bytes": text.TOKENIZER_SAMPLE_BYTES,
            "seed": 0,
            "order": None,
        }
    )


def test_a_byte_level_bpe_store_reads_back_with_its_tokenizer(shipped, tmp_path):
    builder, _ = shipped
    bbpe = train_byte_level_bpe(documents(builder, "train")[:2], tmp_path / "tokenizer.json", 400)
    built = store.build_store(builder, SPLITS, bbpe, tmp_path / "stores", documents_per_shard=5, progress=False)
    expected = text.packed_rows(bbpe, documents(builder, "validation"), length=32)
    np.testing.assert_array_equal(np.asarray(built.rows("validation", 32)), expected)
    assert isinstance(built.tokenizer(), ByteLevelBPE) and built.tokenizer().serialized() == bbpe.serialized()
