"""experiments/bench_vs_pytorch.py end to end at a tiny size: both frameworks train the same model. No timings."""

import json
import sys

import pytest
from subprocess_env import experiment_module

TINY = [
    *"--set num_layers=2 --set d_model=64 --set num_heads=4 --set context_length=16".split(),
    *"--batch 2 --warmup 1 --steps 1".split(),
]


def test_without_the_interop_extra_a_run_names_the_extra_to_install(monkeypatch):
    for name in ("torch", "transformers"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    with pytest.raises(SystemExit, match=r'pip install -e "\.\[interop\]"'):
        experiment_module("bench_vs_pytorch").main(TINY)


def test_tiny_run_reports_both_frameworks_on_the_same_model(tmp_path, capsys):
    pytest.importorskip("torch", reason="the interop extra (torch, transformers) is not installed")
    pytest.importorskip("transformers", reason="the interop extra (torch, transformers) is not installed")
    experiment_module("bench_vs_pytorch").main([*TINY, "--json", str(tmp_path / "b.json")])
    out = capsys.readouterr().out
    assert "| zoo (jax.jit)" in out and "| pytorch (eager)" in out and "zoo/pytorch tokens/s:" in out
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["config"]["model"]["d_ff"] == 4 * 64  # follows d_model when not set
    zoo, pytorch = result["rows"]
    assert zoo["tokens_per_s"] > 0 and pytorch["tokens_per_s"] > 0
    assert zoo["first_loss"] == pytest.approx(pytorch["first_loss"], abs=1e-4)
    assert len(zoo["losses"]) == len(pytorch["losses"]) == 2
