"""The training loop every experiment shares: sharded init (or resume), compiled steps,
metrics, evaluation, checkpoints and preemption.

Resumption is exact: the batch of step k is a pure function of (seed, k) (the data
pipelines' `batch_at`), dropout keys derive from (seed, k), and the checkpoint holds the
params, optimizer state, step and key. Rerunning the same command in the same workdir
continues from the last checkpoint with the same losses. A rerun may ask for more steps (or
another mesh, logging or checkpoint interval); one whose config differs in a section of
`FIXED_SECTIONS` (the model, the data stream, the optimizer recipe) is refused before anything
is read or written, and one that asks for no more steps than the workdir holds does nothing.

Nothing non-finite reaches the params or a checkpoint: the optimizer is wrapped in
`optax.apply_if_finite`, so a step whose loss or gradient is NaN or Inf changes nothing (it is
counted as "skipped" in the logged metrics, with "skipped_total" over the run), and
`max_bad_steps` consecutive ones stop the run with an error, its last checkpoint untouched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
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

# Config sections a resumed run must keep: they fix the model's shapes, the training data stream
# and the optimizer's math. Other sections (e.g. "args": the command line) may change.
FIXED_SECTIONS = ("model", "data", "recipe")
# The per-step guard metrics: not averaged over a log window like the others.
_GUARD_KEYS = ("skipped", "bad_streak", "skipped_total")


@dataclasses.dataclass
class Task:
    """What the loop trains: a model, its loss, and this process's data by step.

    `loss_fn(model, params, batch, **apply_kwargs)` returns a loss or (loss, accuracy);
    `train_batch(step)` returns this process's rows of the global batch of `step` (a pytree of
    numpy arrays); `eval_batches()` yields evaluation batches the same way (None: no evaluation);
    `global_rows` is the global batch size; `flops_per_row` counts training FLOPs of one row (for
    MFU) and `items_per_row` the tokens or images in one row (for throughput). `init_params` builds
    params other than `model.init`'s (a model with a new head, base params beside adapters) and
    `start_params` puts weights in a new run's fresh params (pretrained ones: it may return host
    arrays; the loop lays them out like the fresh ones). `train_step`, for a method other than one
    gradient step of `loss_fn` per batch (PPO: a rollout, then epochs of minibatch updates), builds
    from the optimizer the un-jitted `(state, batch, constants) -> (state, metrics)`; `constants`
    are arrays every step reads and never changes (frozen models), already laid out on the mesh,
    not checkpointed (the task rebuilds them)."""

    model: nn.Module
    loss_fn: Callable
    example_input: Any
    train_batch: Callable[[int], Any]
    eval_batches: Callable[[], Iterable[Any]] | None
    global_rows: int
    flops_per_row: float
    items_per_row: int
    item_name: str = "tokens"
    init_params: Callable[[jax.Array], Any] | None = None  # key -> params boxed with logical names (None: model.init)
    start_params: Callable[[Any], Any] | None = None  # fresh params -> the params a new run starts from
    train_step: Callable[[optax.GradientTransformation], Callable] | None = None  # None: train_step_fn's
    constants: Any = None


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """How long to train and how often to report, evaluate and checkpoint."""

    steps: int
    seed: int = 0
    log_every: int = 50
    eval_every: int = 0  # 0: evaluate at the end only
    checkpoint_every: int = 500  # 0: checkpoint at the end (and on preemption) only
    keep_checkpoints: int = 3
    accumulation_steps: int = 1  # micro-batches per optimizer step
    progress: bool = True
    prefetch: int = 2  # batches built and sent to the devices ahead, on a thread (0: none)
    max_bad_steps: int = 10  # consecutive steps with a non-finite loss or gradient that stop the run

    def __post_init__(self) -> None:
        """Refuse settings that would train backwards or divide by zero, naming the field."""
        least = {
            "steps": 1,
            "log_every": 1,
            "eval_every": 0,
            "checkpoint_every": 0,
            "keep_checkpoints": 1,
            "accumulation_steps": 1,
            "prefetch": 0,
            "max_bad_steps": 1,
        }
        for name, minimum in least.items():
            if getattr(self, name) < minimum:
                raise ValueError(f"LoopConfig.{name}={getattr(self, name)} must be >= {minimum}")


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def state_shardings(
    task: Task, optimizer: optax.GradientTransformation, mesh: Mesh, rng: jax.Array
) -> tuple[Any, Any, Callable[[jax.Array], Any]]:
    """(abstract state with shardings, the shardings, the params' init function) of the
    train state {params, opt_state, step, rng}."""
    init_params = task.init_params or (lambda key: task.model.init(key, task.example_input)["params"])
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


def initial_state(
    init_params: Callable[[jax.Array], Any], optimizer: optax.GradientTransformation, shardings: Any, rng: jax.Array
) -> dict:
    """A fresh state built directly in its shardings: no array is ever whole on one device."""

    init = lambda key: train_state(nn.unbox(init_params(key)), optimizer, key)
    return jax.jit(init, out_shardings=shardings)(rng)


def skipping_non_finite(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """`optimizer` skipping every update with a NaN or Inf gradient (train_step_fn makes a non-finite
    loss's gradients non-finite too), never giving up: the loop stops the run instead."""
    return optax.apply_if_finite(optimizer, max_consecutive_errors=np.iinfo(np.int32).max)


def train(
    task: Task,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    workdir: str | os.PathLike,
    loop: LoopConfig,
    config: dict,
) -> dict:
    """Train `task` for `loop.steps` steps on `mesh`, resuming from `workdir` if it holds a
    checkpoint (of the same `config` in `FIXED_SECTIONS`); returns the last logged and evaluated
    metrics (and "preempted" if SIGTERM stopped the run after a final checkpoint). The final
    checkpoint is written before the final evaluation, so a failing evaluation loses no training."""
    workdir = epath.Path(workdir)  # a folder, or a URL all hosts share (gs://bucket/run)
    lead = jax.process_index() == 0
    config = json.loads(json.dumps(config, default=str))  # paths and the like as strings
    optimizer = skipping_non_finite(optimizer)
    rng = jax.random.key(loop.seed)
    abstract, shardings, init_params = state_shardings(task, optimizer, mesh, rng)
    with Checkpointer(
        workdir / "checkpoints", save_every=loop.checkpoint_every, keep=loop.keep_checkpoints
    ) as checkpointer:
        if checkpointer.latest_step() is not None:
            _check_same_run(workdir, config)
        restored = checkpointer.restore(abstract)
        if restored is None:
            with sharding.sharding_context(mesh):  # the model's kernels see the mesh they run on
                state = initial_state(init_params, optimizer, shardings, rng)
            if task.start_params is not None:
                # a copy laid out like the fresh params (jit never aliases its inputs): the train step
                # donates its state, and the caller keeps what it passed in
                copy = jax.jit(lambda params: params, out_shardings=shardings["params"])
                state["params"] = copy(task.start_params(state["params"]))
        else:
            state = restored[0]
        start = int(jax.device_get(state["step"]))
        if start >= loop.steps:
            _say(
                lead,
                f"{workdir} holds step {start}, at or past steps={loop.steps}: nothing trained, "
                f"evaluated or written (ask for more steps to continue)",
            )
            return {"start_step": start, "state": state}
        if restored is not None:
            _say(lead, f"resuming {workdir} at step {start} (of {loop.steps})")
        if lead:
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / "config.json").write_text(json.dumps(config, indent=2))
        return _run(task, optimizer, mesh, workdir, loop, config, checkpointer, state, shardings, start)


def _run(
    task: Task,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    workdir: epath.Path,
    loop: LoopConfig,
    config: dict,
    checkpointer: Checkpointer,
    state: dict,
    shardings: Any,
    start: int,
) -> dict:
    """The steps from `start` to `loop.steps`, then the final checkpoint and evaluation."""
    lead = jax.process_index() == 0
    batch_sharding = sharding.batch_sharding(mesh)
    if task.train_step is None:
        gradient_step = train_step_fn(task.model, optimizer, task.loss_fn, loop.accumulation_steps)
        step_fn = lambda state, batch, constants: gradient_step(state, batch)
    else:
        step_fn = task.train_step(optimizer)
    train_step = sharding.jit_sharded(
        _guarded(step_fn),
        mesh,
        in_shardings=(shardings, batch_sharding, jax.tree.map(lambda x: x.sharding, task.constants)),
        out_shardings=(shardings, _replicated(mesh)),
        donate_argnums=(0,),
    )
    eval_step = sharding.jit_sharded(
        eval_step_fn(task.model, task.loss_fn),
        mesh,
        in_shardings=(shardings["params"], batch_sharding),
        out_shardings=_replicated(mesh),
    )
    health = jax.jit(_health)
    writer = MetricsWriter(workdir, enabled=lead)
    peak, _ = device_peak_flops()
    summary: dict[str, Any] = {"start_step": start}
    pending: list[dict] = []
    saved_at, logged_at, logged_time = start, start, time.perf_counter()
    bar = tqdm(total=loop.steps, initial=start, desc="train (completed steps)", disable=not (lead and loop.progress))

    def save(step: int, force: bool = False) -> None:
        """Checkpoint `step` when due (or `force`), after checking that the state is sound."""
        nonlocal saved_at
        if step == saved_at or not (force or checkpointer.due(step)):
            return
        finite, streak = jax.device_get(health(state))
        if not finite:
            raise FloatingPointError(
                f"step {step}: the train state holds NaN or Inf; not checkpointed "
                f"(the last checkpoint in {checkpointer.directory} is step {saved_at})"
            )
        _check_streak(int(streak), step, loop.max_bad_steps, checkpointer, saved_at)
        if checkpointer.save(step, state, {"step": step, "seed": loop.seed}, config, force=True):
            saved_at = step

    try:
        with (
            PreemptionGuard(sync_every=loop.log_every) as guard,  # polled across processes when we log anyway
            Prefetcher(
                lambda step: sharding.shard_batch(task.train_batch(step), mesh), start, loop.steps, loop.prefetch
            ) as batches,
        ):
            for step in range(start, loop.steps):
                state, metrics = train_step(state, next(batches), task.constants)
                pending.append(metrics)  # fetched only when logged: no host sync per step
                done = step + 1
                if done % loop.log_every == 0 or done == loop.steps:
                    fetched = jax.device_get(pending)  # waits for the steps to finish
                    now = time.perf_counter()
                    logged = {**_window(fetched), **_throughput(task, done - logged_at, now - logged_time, peak)}
                    pending, logged_at, logged_time = [], done, now
                    writer.write(done, logged)
                    summary.update(logged)
                    bar.update(done - bar.n)  # the steps that completed, not the ones dispatched
                    bar.set_postfix(loss=f"{logged['loss']:.3f}", skipped=int(logged["skipped_total"]))
                    _check_streak(
                        max(int(m["bad_streak"]) for m in fetched), done, loop.max_bad_steps, checkpointer, saved_at
                    )
                if loop.eval_every and done % loop.eval_every == 0 and done < loop.steps:
                    summary.update(_evaluate(task, eval_step, state["params"], mesh, writer, done))
                save(done)
                if guard.should_stop(done):
                    save(done, force=True)
                    summary["preempted"] = True
                    break
        bar.close()
        if not summary.get("preempted"):
            save(loop.steps, force=True)  # first: the evaluation may fail, the training is kept
            summary.update(_evaluate(task, eval_step, state["params"], mesh, writer, loop.steps))
    finally:
        writer.close()
    summary["state"] = state
    return summary


def _say(lead: bool, message: str) -> None:
    """Print `message` once (on the first process)."""
    if lead:
        print(message, flush=True)


def _guarded(step_fn: Callable) -> Callable:
    """`step_fn` whose metrics also say whether apply_if_finite skipped the step ("skipped"), how
    many consecutive steps it skipped ("bad_streak") and how many in the whole run ("skipped_total")."""

    def step(state: dict, batch: Any, constants: Any) -> tuple[dict, dict]:
        state, metrics = step_fn(state, batch, constants)
        guard = state["opt_state"]
        return state, {
            **metrics,
            "skipped": ~guard.last_finite,
            "bad_streak": guard.notfinite_count,
            "skipped_total": guard.total_notfinite,
        }

    return step


def _health(state: dict) -> tuple[jax.Array, jax.Array]:
    """(every float of the state is finite, consecutive skipped steps up to now)."""
    leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.inexact)]
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
    return finite, state["opt_state"].notfinite_count


def _check_streak(streak: int, step: int, limit: int, checkpointer: Checkpointer, saved_at: int) -> None:
    """Stop the run once `limit` consecutive steps had a non-finite loss or gradient."""
    if streak >= limit:
        raise FloatingPointError(
            f"{streak} consecutive steps up to step {step} had a NaN or Inf loss or gradient (their updates "
            f"were skipped); stopping at the limit of {limit} (--max-bad-steps). The last checkpoint in "
            f"{checkpointer.directory}, step {saved_at}, holds no update of those steps."
        )


def _window(metrics: list[dict]) -> dict[str, float]:
    """The log window's metrics: each averaged over the steps that updated the params (NaN if none
    did), the number of skipped steps in the window, and in the run so far."""
    kept = [m for m in metrics if not m["skipped"]]
    means = {
        key: float(np.mean([m[key] for m in kept])) if kept else float("nan")
        for key in metrics[0]
        if key not in _GUARD_KEYS
    }
    return {**means, "skipped": float(len(metrics) - len(kept)), "skipped_total": float(metrics[-1]["skipped_total"])}


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
    results = jax.device_get([eval_step(params, sharding.shard_batch(batch, mesh)) for batch in task.eval_batches()])
    if not results:
        warnings.warn(f"step {step}: the evaluation yielded no batch; nothing evaluated", stacklevel=2)
        return {}
    metrics = {f"eval_{key}": float(np.mean([r[key] for r in results])) for key in results[0]}
    writer.write(step, metrics)
    return metrics


def _check_same_run(workdir: epath.Path, config: dict) -> None:
    """Refuse to resume the run in `workdir` with a config that differs in `FIXED_SECTIONS`, naming
    each field and its two values. Fields that only one side has (older code wrote the saved
    config) are not compared; a workdir without config.json is not checked."""
    path = workdir / "config.json"
    if not path.exists():
        return
    saved = json.loads(path.read_text())
    differences = []
    for section in FIXED_SECTIONS:
        old, new = _flat(saved.get(section, {})), _flat(config.get(section, {}))
        differences += [
            f"{key}={old[key]!r}; this command asks {new[key]!r}"
            for key in old.keys() & new.keys()
            if old[key] != new[key]
        ]
    if differences:
        raise ValueError(
            f"{workdir} holds "
            + ", and ".join(sorted(differences))
            + ": use another --workdir (or the saved run's settings) to train this one"
        )


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as {"a.b": leaf}; lists stay leaves."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat
