"""The training loop, driven through the default experiment: exact resume after SIGKILL,
a checkpoint on SIGTERM, restore under another layout, and two processes = one."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = [
    "--set", "num_layers=2", "--set", "d_model=32", "--set", "num_heads=2", "--set", "d_ff=64",
    "--set", "context_length=32", "--set", "window=8", "--vocab-size", "512",
    "--batch", "8", "--log-every", "1", "--checkpoint-every", "2", "--eval-batches", "1", "--samples", "0",
]


def command(workdir, data_dir, steps, *extra):
    return [sys.executable, str(ROOT / "experiments" / "default.py"), "--workdir", str(workdir),
            "--data-dir", str(data_dir), "--steps", str(steps), *TINY, *extra]


def environment(devices=8):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return {**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def run(*args, devices=8, **kwargs):
    result = subprocess.run(command(*args, **kwargs), env=environment(devices), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(workdir) -> dict[int, float]:
    """Training loss by step; a step logged twice (before a kill and after the resume) keeps the last."""
    records = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def committed_steps(workdir) -> list[int]:
    folder = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in folder.glob("*") if p.name.isdigit()) if folder.exists() else []


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    run(workdir, data_dir, 12)
    return losses(workdir)


def start_and_wait_for_checkpoint(workdir, data_dir, steps):
    process = subprocess.Popen(command(workdir, data_dir, steps), env=environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not committed_steps(workdir) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    return process


def test_sigkill_then_rerun_gives_the_uninterrupted_losses_bit_for_bit(tmp_path, data_dir, uninterrupted):
    process = start_and_wait_for_checkpoint(tmp_path, data_dir, 12)
    process.kill()
    process.wait()
    killed_at = max(losses(tmp_path)) if (tmp_path / "metrics.jsonl").exists() else 0
    assert killed_at < 12, "the run finished before it could be killed"
    result = run(tmp_path, data_dir, 12)
    assert losses(tmp_path) == uninterrupted
    assert "eval_loss" in (tmp_path / "metrics.jsonl").read_text() and result.returncode == 0


def test_sigterm_commits_a_checkpoint_and_the_rerun_resumes(tmp_path, data_dir, uninterrupted):
    process = start_and_wait_for_checkpoint(tmp_path, data_dir, 12)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0
    stopped_at = max(losses(tmp_path))
    assert committed_steps(tmp_path)[-1] == stopped_at < 12
    run(tmp_path, data_dir, 12)
    assert losses(tmp_path) == uninterrupted


def test_a_checkpoint_restores_under_another_layout_and_device_count(tmp_path, data_dir, uninterrupted):
    run(tmp_path, data_dir, 6, "--mesh", "fsdp=-1")  # 8 devices, params sharded over fsdp
    assert committed_steps(tmp_path)[-1] == 6
    run(tmp_path, data_dir, 12, "--mesh", "data=2,tensor=2", devices=4)
    resumed = losses(tmp_path)
    assert sorted(resumed) == list(range(1, 13))
    for step in range(7, 13):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path, data_dir, uninterrupted):
    """Two JAX processes of 4 CPU devices each over loopback (gloo) = one process of 8."""
    port = free_port()
    processes = [
        subprocess.Popen(
            command(tmp_path, data_dir, 12, "--coordinator-address", f"127.0.0.1:{port}",
                    "--num-processes", "2", "--process-id", str(i)),
            env=environment(devices=4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    two = losses(tmp_path)
    assert sorted(two) == list(range(1, 13))
    for step, loss in uninterrupted.items():
        assert two[step] == pytest.approx(loss, rel=1e-5)
