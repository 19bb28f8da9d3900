"""Paths stay URLs: a gs:// workdir, data dir, text dir or tokenizer given on the command line, and
every path derived from it, remain gs://… and are never made local folders (nothing here opens
them, so no network is needed). A whole run in a gs:// workdir is in test_loop.py."""

import json
import os
import pathlib
import runpy
import sys

import pytest

from zoo import experiment
from zoo.paths import absolute, write_atomically
from zoo.train.metrics import MetricsWriter

ROOT = pathlib.Path(__file__).resolve().parent.parent
GS_FLAGS = {
    "--workdir": "gs://bucket/run",
    "--data-dir": "gs://bucket/data",
    "--text-dir": "gs://bucket/text",
    "--tokenizer": "gs://bucket/data/tokenizers/bpe.model",
}


def parse(*argv: str):
    parser = experiment.parser("", workdir="runs/test", steps=1, batch=1)
    experiment.add_text_flags(parser, vocab_size=512)
    return parser.parse_args(list(argv))


def test_the_language_model_flags_keep_gs_urls():
    args = parse(*[item for flag_value in GS_FLAGS.items() for item in flag_value])
    for flag, url in GS_FLAGS.items():
        assert str(getattr(args, flag[2:].replace("-", "_"))) == url
    assert str(args.workdir / "checkpoints") == "gs://bucket/run/checkpoints"
    assert json.loads(json.dumps(vars(args), default=str))["workdir"] == "gs://bucket/run"  # as config.json has it


@pytest.mark.parametrize(
    ("script", "data"), [("vit_fashion_mnist.py", ["--synthetic", "8"]), ("vit_b16_imagenet.py", [])]
)
def test_the_vit_experiments_keep_gs_urls(script, data, monkeypatch):
    experiment_module = runpy.run_path(str(ROOT / "experiments" / script))
    argv = [script, "--workdir", "gs://bucket/run", "--data-dir", "gs://bucket/tfds", *data]
    monkeypatch.setattr(sys, "argv", argv)
    args = experiment_module["parse_args"]()
    assert (str(args.workdir), str(args.data_dir)) == ("gs://bucket/run", "gs://bucket/tfds")


def test_a_url_stays_a_url_where_a_local_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(absolute("gs://bucket/run/checkpoints")) == "gs://bucket/run/checkpoints"
    assert str(absolute("runs/x")) == str(tmp_path / "runs" / "x")
    assert str(absolute(tmp_path / "y")) == str(tmp_path / "y")


def test_the_metrics_files_of_a_gs_workdir_are_in_it():
    writer = MetricsWriter("gs://bucket/run", enabled=False)  # process > 0: holds no files
    assert str(writer.workdir / "metrics.jsonl") == "gs://bucket/run/metrics.jsonl"


def test_write_atomically_replaces_the_file_and_leaves_no_partial_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_atomically(path, b"one\n")
    write_atomically(path, b"one\ntwo\n")
    assert path.read_bytes() == b"one\ntwo\n"
    assert os.listdir(tmp_path) == ["metrics.jsonl"]
