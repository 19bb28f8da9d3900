"""The prefetcher: batch_at(start), batch_at(start + 1), ... in order, at most depth + 1 built ahead,
a producer's error raised in the consumer, no thread left after close; and the input benchmark
run end to end at a tiny size. Machinery only, no timings."""

import json
import pathlib
import subprocess
import sys
import threading
import time
import traceback

import jax
import numpy as np
import pytest
from subprocess_env import cpu_environment

from zoo import sharding
from zoo.data.prefetch import Prefetcher

ROOT = pathlib.Path(__file__).resolve().parent.parent


class Recorder:
    """A batch_at that records the steps asked for; optionally fails at one step."""

    def __init__(self, fail_at: int | None = None):
        self.calls: list[int] = []
        self.fail_at = fail_at

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        self.calls.append(step)
        if step == self.fail_at:
            raise KeyError(f"no batch {step}")
        return {"step": np.full((2,), step)}


def prefetch_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "prefetch"]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_yields_exactly_the_batches_from_start_to_stop_in_order(depth):
    batch_at = Recorder()
    with Prefetcher(batch_at, 5, 12, depth) as batches:
        steps = [int(batch["step"][0]) for batch in batches]
    assert steps == list(range(5, 12))
    assert batch_at.calls == list(range(5, 12))  # none past stop


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_never_more_than_depth_plus_one_batches_ahead(depth):
    batch_at = Recorder()
    with Prefetcher(batch_at, 0, 100, depth) as batches:
        for taken in range(4):
            deadline = time.time() + 30
            while len(batch_at.calls) < taken + depth + 1 and time.time() < deadline:
                time.sleep(0.01)  # the producer fills the queue, then blocks
            time.sleep(0.05)
            assert len(batch_at.calls) == taken + depth + 1
            next(batches)


def test_a_producer_error_is_raised_in_the_consumer_with_its_traceback():
    batch_at = Recorder(fail_at=3)
    with Prefetcher(batch_at, 0, 10, depth=2) as batches:
        assert [int(next(batches)["step"][0]) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(KeyError, match="no batch 3") as error:
            next(batches)
    assert "__call__" in "".join(traceback.format_tb(error.value.__traceback__))  # the producer's frame
    assert batch_at.calls == [0, 1, 2, 3]
    assert not prefetch_threads()


def test_close_stops_the_thread_and_later_batches_stop_the_iteration():
    batch_at = Recorder()
    batches = Prefetcher(batch_at, 0, 1000, depth=2)
    next(batches)
    batches.close()
    assert not prefetch_threads()
    assert len(batch_at.calls) <= 4
    with pytest.raises(StopIteration):
        next(batches)


def test_leaving_the_block_on_an_exception_stops_the_thread():
    with pytest.raises(RuntimeError, match="preempted"), Prefetcher(Recorder(), 0, 1000, depth=2) as batches:
        next(batches)
        raise RuntimeError("preempted")
    assert not prefetch_threads()


def test_batches_sharded_on_the_thread_arrive_on_the_devices():
    mesh = sharding.mesh_for("data=-1")
    batch_at = lambda step: sharding.shard_batch({"x": np.full((8, 3), step, np.float32)}, mesh)
    with Prefetcher(batch_at, 2, 4, depth=2) as batches:
        got = list(batches)
    assert [float(batch["x"][0, 0]) for batch in got] == [2.0, 3.0]
    assert all(
        isinstance(batch["x"], jax.Array) and len(batch["x"].sharding.device_set) == jax.device_count() for batch in got
    )


def test_the_input_benchmark_runs_at_a_tiny_size(tmp_path, shakespeare_512):
    out = tmp_path / "input.json"
    flags = "--steps 4 --log-every 2 --repeats 1 --synthetic 64 --set num_layers=2 --set d_model=32 --set d_ff=64"
    tiny = [*flags.split(), "--vocab-size", "512", "--data-dir", str(shakespeare_512), "--json", str(out)]
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "bench_input.py"), *tiny],
        capture_output=True,
        text=True,
        timeout=600,
        env=cpu_environment(devices=1),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [row["experiment"] for row in rows] == ["default", "vit_fashion_mnist"]
    for row in rows:
        assert row["real_ms"] > 0 and row["constant_ms"] > 0
        assert row["ratio"] == pytest.approx(row["real_ms"] / row["constant_ms"])
        assert row["experiment"] in result.stdout
