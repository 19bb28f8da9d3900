"""The in-context experiments end to end at toy size: self_consistency.py trains on the problems it
writes and votes; eval_incontext.py evaluates that run zero- and one-shot."""

import json
import subprocess
import sys
from pathlib import Path

from subprocess_env import cpu_environment

ROOT = Path(__file__).resolve().parents[1]
TINY = "--set num_layers=2 --set d_model=32 --set num_heads=2 --set d_ff=64".split()


def run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=cpu_environment(devices=1),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_self_consistency_then_in_context_evaluation_of_its_run(tmp_path):
    workdir = str(tmp_path / "run")
    out = run(
        "self_consistency.py", "--steps", "2", "--batch", "4", "--eval-batches", "0", "--problems", "100",
        "--held-out", "3", "--k", "2", "--workdir", workdir, "--data-dir", str(tmp_path / "data"),
        "--json", str(tmp_path / "sc.json"), "--plot", str(tmp_path / "sc.png"), *TINY,
    )  # fmt: skip
    rows = json.loads((tmp_path / "sc.json").read_text())
    assert [(r["method"].split(" ")[0], r["k"]) for r in rows] == [
        ("greedy", 1),
        ("self-consistency", 2),
    ]
    assert "held-out problems (step 2)" in out and (tmp_path / "sc.png").exists()
    assert all(0 <= r["acc"] <= 1 for r in rows)
    problems = (tmp_path / "data" / "problems-100-3" / "train" / "0000.txt").read_text()
    assert problems.count("The answer is") == problems.count("Q: ") > 90
    out = run(
        "eval_incontext.py", "--workdir", workdir, "--shots", "0", "1", "--limit", "3", "--batch", "16",
        "--tasks", "arithmetic 2-digit +", "--json", str(tmp_path / "icl.json"),
    )  # fmt: skip
    results = json.loads((tmp_path / "icl.json").read_text())
    assert [(r["task"], r["shots"]) for r in results["tasks"]] == [("arithmetic 2-digit +", k) for k in (0, 1)]
    assert results["perplexity"]["bits_per_byte"] > 0 and "bits per byte" in out
