"""The ViT experiments run end to end from the command line (tiny settings, random images)."""

import json
import pathlib
import re
import subprocess
import sys

import pytest
from subprocess_env import cpu_environment, experiment_module

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = "--set num_layers=1 --set d_model=32 --set num_heads=2 --set d_ff=64".split()


def run(script: str, *args: str, check: bool = True, devices: int = 1) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=cpu_environment(devices),
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def dirs(tmp_path: pathlib.Path) -> list[str]:
    """--workdir and --data-dir in the test's temporary folder."""
    return ["--workdir", str(tmp_path / "run"), "--data-dir", str(tmp_path / "data")]


def test_fashion_mnist_without_data_stops_at_once_naming_what_to_pass(tmp_path, monkeypatch, capsys):
    """No --data, no $ZOO_DATA_DIR/fashion-mnist and no tfds build: an error before any download is tried."""
    monkeypatch.delenv("ZOO_DATA_DIR", raising=False)
    with pytest.raises(SystemExit) as stopped:
        experiment_module("vit_fashion_mnist").parse_args(["--data-dir", str(tmp_path / "data")])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert all(hint in error for hint in ("--data DIR", "ZOO_DATA_DIR", "--download", "--synthetic N")), error


def test_fashion_mnist_finds_its_data_by_the_environment_variable(tmp_path, monkeypatch):
    (tmp_path / "fashion-mnist").mkdir()
    monkeypatch.setenv("ZOO_DATA_DIR", str(tmp_path))
    assert experiment_module("vit_fashion_mnist").parse_args([]).data == tmp_path / "fashion-mnist"
    monkeypatch.setenv("ZOO_DATA_DIR", str(tmp_path / "elsewhere"))
    assert experiment_module("vit_fashion_mnist").parse_args(["--synthetic", "8"]).data is None


def test_fashion_mnist_trains_and_reports_test_accuracy(tmp_path):
    out = run("vit_fashion_mnist.py", *"--synthetic 256 --steps 3 --batch 16".split(), *TINY, *dirs(tmp_path)).stdout
    assert "256 training and 256 test images" in out
    assert re.search(r"step 3: test accuracy \d+\.\d\d% on 256 images", out), out
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["num_layers"] == 1 and config["model"]["image_size"] == [28, 28]
    assert config["recipe"]["learning_rate"] == 2e-3 and config["recipe"]["decay_steps"] == 101
    assert config["data"] == {"data": None, "synthetic": 256, "batch": 16, "seed": 0}
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3


def test_fashion_mnist_names_the_image_size_mismatch(tmp_path):
    result = run(
        "vit_fashion_mnist.py", *"--synthetic 32 --steps 1 --set image_size=14".split(), *dirs(tmp_path), check=False
    )
    assert result.returncode != 0
    assert "images are (height, width, channels) = (28, 28, 1) but the model expects (14, 14, 1)" in result.stderr


def test_vit_b16_imagenet_recipe_runs_sharded_on_mock_data(tmp_path):
    out = run(
        "vit_b16_imagenet.py",
        *"--mock --steps 2 --batch 8".split(),
        *TINY,
        *"--set image_size=32".split(),
        *dirs(tmp_path),
        devices=2,
    ).stdout
    assert "16 training and 8 validation images" in out and "mesh {'data': 1, 'fsdp': 2, 'tensor': 1}" in out
    assert re.search(r"step 2: validation accuracy \d+\.\d\d% on 8 images", out), out
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["dtype"] == "bfloat16" and config["model"]["dropout"] == 0.1
    assert config["recipe"]["learning_rate"] == pytest.approx(3e-3 * 8 / 4096)  # the paper's, scaled to the batch
    assert config["recipe"]["betas"] == [0.9, 0.999] and config["recipe"]["weight_decay"] == 0.3
    assert config["args"]["mesh"] == "fsdp=-1"
