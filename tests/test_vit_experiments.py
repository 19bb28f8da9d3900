"""The ViT experiments run end to end from the command line (tiny settings, random images)."""

import json
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = ["--set", "num_layers=1", "--set", "d_model=32", "--set", "num_heads=2", "--set", "d_ff=64"]


def run(script: str, *args: str, check: bool = True, devices: int = 1) -> subprocess.CompletedProcess:
    env = {"JAX_PLATFORMS": "cpu", "PATH": "", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / script), *args],
                            capture_output=True, text=True, timeout=300, env=env)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("script, flag", [("vit_fashion_mnist.py", "--synthetic"), ("vit_b16_imagenet.py", "--mock")])
def test_help_lists_the_flags(script, flag):
    out = run(script, "--help").stdout
    assert "--data-dir" in out and "--lr" in out and flag in out


def test_fashion_mnist_trains_and_reports_test_accuracy(tmp_path):
    out = run(
        "vit_fashion_mnist.py", "--synthetic", "256", "--steps", "3", "--batch", "16", *TINY,
        "--workdir", str(tmp_path / "run"), "--data-dir", str(tmp_path / "data"),
    ).stdout
    assert re.search(r"step 3: test accuracy \d+\.\d\d% on 256 images", out), out
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["num_layers"] == 1 and config["model"]["image_size"] == [28, 28]
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3


def test_fashion_mnist_names_the_image_size_mismatch(tmp_path):
    result = run("vit_fashion_mnist.py", "--synthetic", "32", "--steps", "1", "--set", "image_size=14",
                 "--workdir", str(tmp_path / "run"), "--data-dir", str(tmp_path / "data"), check=False)
    assert result.returncode != 0
    assert "images are (height, width, channels) = (28, 28, 1) but the model expects (14, 14, 1)" in result.stderr


def test_vit_b16_imagenet_recipe_runs_sharded_on_mock_data(tmp_path):
    out = run(
        "vit_b16_imagenet.py", "--mock", "--steps", "2", "--batch", "8", *TINY, "--set", "image_size=32",
        "--workdir", str(tmp_path / "run"), "--data-dir", str(tmp_path / "data"), devices=2,
    ).stdout
    assert "16 training and 8 validation images" in out and "mesh {'data': 1, 'fsdp': 2, 'tensor': 1}" in out
    assert re.search(r"step 2: validation top-1 accuracy \d+\.\d\d%", out), out
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["dtype"] == "bfloat16" and config["model"]["dropout"] == 0.1
    assert config["args"]["mesh"] == "fsdp=-1"
