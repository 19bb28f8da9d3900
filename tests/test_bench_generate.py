"""experiments/bench_generate.py end to end at a tiny size: every table's rows are there and plausible."""

import json
from pathlib import Path

import pytest
from subprocess_env import experiment_module

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    *"--preset tiny --batch-sizes 2 --prompt-length 4 --max-new-tokens 4 --repeats 1 --step-repeats 1".split(),
    *"--positions 16 --peak-hbm-gbps 10".split(),
]


def test_tiny_run_prints_and_writes_the_three_tables(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))  # as when run as a script: its neighbours import
    pytest.importorskip("torch", reason="the interop extra (torch, transformers) is not installed")
    pytest.importorskip("transformers", reason="the interop extra (torch, transformers) is not installed")
    script = experiment_module("bench_generate")
    script.main([*TINY, "--json", str(tmp_path / "g.json"), "--plot", str(tmp_path / "g.png")])
    out = capsys.readouterr().out
    assert "| batch | new tokens | zoo tokens/s | transformers tokens/s |" in out and "HBM use" in out
    assert "| tokens so far |" in out and "| gpt3-small |" in out
    result = json.loads((tmp_path / "g.json").read_text())
    (row,) = result["throughput"]
    assert row["batch"] == 2 and row["zoo_tokens_per_s"] > 0 and row["transformers_tokens_per_s"] > 0
    assert row["agree"] == 1.0  # greedy from identical weights
    assert row["hbm_use"] > 0
    (step,) = result["latency"]
    assert step["tokens_so_far"] == 16 and step["cached_ms"] > 0 and step["recompute_ms"] > 0
    memory = {r["dtype"]: r for r in result["memory"]}
    assert set(memory) == {"float32", "bfloat16"}
    assert all(r["context"] == 2048 and 0 < r["rolling_bytes"] < r["full_bytes"] for r in memory.values())
    assert memory["bfloat16"]["rolling_bytes"] < memory["float32"]["rolling_bytes"]
    assert (tmp_path / "g.png").stat().st_size > 0
