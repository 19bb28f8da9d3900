"""Experiments run end to end from the command line (tiny settings), and say what they take."""

import json
import re
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / script), *args],
        capture_output=True, text=True, timeout=300, env={"JAX_PLATFORMS": "cpu", "PATH": ""},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("script", ["default.py", "bench_attention.py", "gpt3.py", "gpt2_small_openwebtext.py"])
def test_help_lists_the_flags(script):
    assert "--help" in run(script, "--help")


def test_default_experiment_trains_evaluates_and_samples(tmp_path):
    out = run(
        "default.py", "--steps", "3", "--batch", "2", "--eval-batches", "1", "--samples", "1",
        "--sample-tokens", "8", "--workdir", str(tmp_path / "run"), "--data-dir", str(tmp_path / "data"),
        "--set", "num_layers=2", "--set", "window=8",
    )
    assert "validation loss" in out and "--- sample 1 ---\nROMEO." in out
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["num_layers"] == 2 and config["model"]["window"] == 8
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    assert (tmp_path / "run" / "loss.png").exists() and any((tmp_path / "run" / "tensorboard").iterdir())


def test_gpt3_experiment_runs_any_preset_scaled_down(tmp_path):
    out = run(
        "gpt3.py", "--preset", "gpt3-medium", "--steps", "2", "--batch", "2", "--eval-batches", "1",
        "--samples", "0", "--vocab-size", "512", "--workdir", str(tmp_path / "run"),
        "--data-dir", str(tmp_path / "data"), "--set", "num_layers=2", "--set", "d_model=32",
        "--set", "num_heads=2", "--set", "d_ff=64", "--set", "context_length=32", "--set", "window=8",
    )
    assert "validation loss" in out
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["dtype"] == "bfloat16" and config["model"]["attention_pattern"] == ["dense", "banded"]
    assert config["model"]["vocab_size"] == 512 and config["args"]["preset"] == "gpt3-medium"


def test_attention_benchmark_prints_a_table(tmp_path):
    out = run("bench_attention.py", "--lengths", "64", "--windows", "8", "--repeats", "1",
              "--json", str(tmp_path / "bench.json"))
    assert re.search(r"\|\s*64 \|\s*8 \|\s*banded \|", out), out
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert {row["implementation"] for row in rows} == {"dense", "banded"}
