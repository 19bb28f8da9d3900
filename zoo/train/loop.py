"""The training loop every experiment shares: sharded init (or resume), compiled steps,
metrics, evaluation, checkpoints and preemption.

Resumption is exact: the batch of step k is a pure function of (seed, k) (the data
pipelines' `batch_at`), dropout keys derive from (seed, k), and the checkpoint holds the
params, optimizer state, step and key. Rerunning the same command in the same workdir
continues from the last checkpoint with the same losses.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from zoo import sharding
from zoo.checkpoint import Checkpointer, PreemptionGuard
from zoo.data.prefetch import Prefetcher
from zoo.train.metrics import MetricsWriter, device_peak_flops
from zoo.train.steps import eval_step_fn, train_state, train_step_fn


@dataclasses.dataclass
class Task:
    """What the loop trains: a model, its loss, and this process's data by step.

    `loss_fn(model, params, batch, **apply_kwargs)` returns a loss or (loss, accuracy);
    `train_batch(step)` returns this process's rows of the global batch of `step` (a pytree of
    numpy arrays); `eval_batches()` yields evaluation batches the same way; `global_rows` is
    the global batch size; `flops_per_row` counts training FLOPs of one row (for MFU) and `items_per_row` the tokens or
    images in one row (for throughput)."""

    model: nn.Module
    loss_fn: Callable
    example_input: Any
    train_batch: Callable[[int], Any]
    eval_batches: Callable[[], Iterable[Any]] | None
    global_rows: int
    flops_per_row: float
    items_per_row: int
    item_name: str = "tokens"


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """How long to train and how often to report, evaluate and checkpoint."""

    steps: int
    seed: int = 0
    log_every: int = 50
    eval_every: int = 0  # 0: evaluate at the end only
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    accumulation_steps: int = 1  # micro-batches per optimizer step
    progress: bool = True
    prefetch: int = 2  # batches built and sent to the devices ahead, on a thread (0: none)


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _state_shardings(task: Task, optimizer: optax.GradientTransformation, mesh: Mesh, rng: jax.Array):
    """(abstract state with shardings, the shardings, the params' init function) of the
    train state {params, opt_state, step, rng}."""
    init_params = lambda key: task.model.init(key, task.example_input)["params"]  # noqa: E731
    boxed = jax.eval_shape(init_params, rng)
    param_shardings = sharding.logical_shardings(boxed, mesh)
    abstract_params = nn.unbox(boxed)
    shardings = {
        "params": param_shardings,
        "opt_state": sharding.optimizer_shardings(optimizer, abstract_params, param_shardings, mesh),
        "step": _replicated(mesh),
        "rng": _replicated(mesh),
    }
    abstract = {
        "params": abstract_params,
        "opt_state": jax.eval_shape(optimizer.init, abstract_params),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "rng": jax.eval_shape(jax.random.key_data, rng),
    }
    with_shardings = jax.tree.map(
        lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), abstract, shardings
    )
    return with_shardings, shardings, init_params


def _initial_state(init_params, optimizer, shardings, rng: jax.Array) -> dict:
    """A fresh state built directly in its shardings: no array is ever whole on one device."""

    init = lambda key: train_state(nn.unbox(init_params(key)), optimizer, key)  # noqa: E731
    return jax.jit(init, out_shardings=shardings)(rng)


def train(
    task: Task,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    workdir: str | os.PathLike,
    loop: LoopConfig,
    config: dict,
) -> dict:
    """Train `task` for `loop.steps` steps on `mesh`, resuming from `workdir` if it holds a
    checkpoint; returns the last logged and evaluated metrics (and "preempted" if SIGTERM
    stopped the run after a final checkpoint)."""
    workdir = epath.Path(workdir)  # a folder, or a URL all hosts share (gs://bucket/run)
    lead = jax.process_index() == 0
    config = json.loads(json.dumps(config, default=str))  # paths and the like as strings
    if lead:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(config, indent=2))
    rng = jax.random.key(loop.seed)
    abstract, shardings, init_params = _state_shardings(task, optimizer, mesh, rng)
    checkpointer = Checkpointer(workdir / "checkpoints", save_every=loop.checkpoint_every,
                                keep=loop.keep_checkpoints)
    restored = checkpointer.restore(abstract)
    if restored is None:
        with sharding.sharding_context(mesh):  # the model's kernels see the mesh they run on
            state = _initial_state(init_params, optimizer, shardings, rng)
    else:
        state = restored[0]
    start = int(jax.device_get(state["step"]))

    batch_sharding = sharding.batch_sharding(mesh)
    train_step = sharding.jit_sharded(
        train_step_fn(task.model, optimizer, task.loss_fn, loop.accumulation_steps), mesh,
        in_shardings=(shardings, batch_sharding), out_shardings=(shardings, _replicated(mesh)),
        donate_argnums=(0,),
    )
    eval_step = sharding.jit_sharded(
        eval_step_fn(task.model, task.loss_fn), mesh,
        in_shardings=(shardings["params"], batch_sharding), out_shardings=_replicated(mesh),
    )
    writer = MetricsWriter(workdir, enabled=lead)
    peak, _ = device_peak_flops()
    summary: dict[str, Any] = {"start_step": start}
    pending: list[dict] = []
    saved_at, logged_at, logged_time = start, start, time.perf_counter()
    bar = tqdm(total=loop.steps, initial=start, desc="train", disable=not (lead and loop.progress))

    def save(step: int, force: bool = False) -> None:
        nonlocal saved_at
        if step != saved_at and checkpointer.save(step, state, {"step": step, "seed": loop.seed}, config, force=force):
            saved_at = step

    with (PreemptionGuard(sync_every=loop.log_every) as guard,  # polled across processes when we log anyway
          Prefetcher(lambda step: sharding.shard_batch(task.train_batch(step), mesh), start, loop.steps,
                     loop.prefetch) as batches):
        for step in range(start, loop.steps):
            state, metrics = train_step(state, next(batches))
            pending.append(metrics)  # fetched only when logged: no host sync per step
            done = step + 1
            if done % loop.log_every == 0 or done == loop.steps:
                means = _mean(jax.device_get(pending))  # waits for the steps to finish
                now = time.perf_counter()
                logged = {**means, **_throughput(task, done - logged_at, now - logged_time, peak)}
                pending, logged_at, logged_time = [], done, now
                writer.write(done, logged)
                summary.update(logged)
                bar.set_postfix(loss=f"{logged['loss']:.3f}")
            if loop.eval_every and done % loop.eval_every == 0 and done < loop.steps:
                summary.update(_evaluate(task, eval_step, state["params"], mesh, writer, done))
            save(done)
            bar.update(1)
            if guard.should_stop(done):
                save(done, force=True)
                summary["preempted"] = True
                break
    bar.close()
    if not summary.get("preempted"):
        summary.update(_evaluate(task, eval_step, state["params"], mesh, writer, loop.steps))
        save(loop.steps, force=True)
    checkpointer.wait()
    checkpointer.close()
    writer.close()
    summary["state"] = state
    return summary


def _mean(metrics: list[dict]) -> dict[str, float]:
    """Average each metric over the steps since the last log."""
    return {key: float(np.mean([m[key] for m in metrics])) for key in metrics[0]}


def _throughput(task: Task, steps: int, seconds: float, peak: float) -> dict[str, float]:
    """Items per second, seconds per step and MFU (model FLOPs / (devices x peak)) over `steps` steps."""
    rows = steps * task.global_rows
    return {
        f"{task.item_name}_per_s": rows * task.items_per_row / seconds,
        "step_s": seconds / steps,
        "mfu": rows * task.flops_per_row / seconds / (jax.device_count() * peak),
    }


def _evaluate(task: Task, eval_step: Callable, params: Any, mesh: Mesh, writer: MetricsWriter, step: int) -> dict:
    """Mean eval metrics over `task.eval_batches()`, written as eval_<name>."""
    if task.eval_batches is None:
        return {}
    results = [eval_step(params, sharding.shard_batch(batch, mesh)) for batch in task.eval_batches()]
    metrics = {f"eval_{key}": value for key, value in _mean(jax.device_get(results)).items()}
    writer.write(step, metrics)
    return metrics
