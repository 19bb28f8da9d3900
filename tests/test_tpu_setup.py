"""tpu_setup.sh: a dry run prints the install steps and touches nothing; bad flags fail."""

import pathlib
import subprocess

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "tpu_setup.sh"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_dry_run_prints_the_steps_and_changes_nothing(tmp_path):
    venv = tmp_path / "venv"
    result = run("--dry-run", "--venv", str(venv))
    assert result.returncode == 0, result.stderr
    steps = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
    assert steps[0] == f"+ python3 -m venv {venv}"
    assert any("pip install -e" in step for step in steps)
    assert any("jax[tpu]==" in step for step in steps)
    assert not venv.exists()


def test_help_and_unknown_options():
    assert run("--help").returncode == 0 and "--dry-run" in run("--help").stdout
    bad = run("--bogus")
    assert bad.returncode == 2 and "unknown option '--bogus'" in bad.stderr
