"""The loop's guards, in process on a linear model: a NaN or Inf step is skipped and counted and
a run of them stops training without a bad checkpoint; a rerun with another model or data is
refused and one with no more steps does nothing; the final checkpoint comes before the final
evaluation; a failed checkpoint write stops the run and the rerun resumes; bad settings are
refused by name."""

import errno
import json
import os
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import zoo
from zoo import experiment, sharding, tasks
from zoo.checkpoint import CheckpointWriteError
from zoo.train import LoopConfig, Task, train

ROWS = 8
CONFIG = {"model": {"features": 1}, "data": {"batch": ROWS, "seed": 0}, "args": {"steps": 0}}


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    """No matmul benchmark for the MFU figure and no loss plot: these runs check what the loop does."""
    monkeypatch.setattr("zoo.train.loop.device_peak_flops", lambda: (1e12, "test"))
    monkeypatch.setattr("zoo.train.metrics.MetricsWriter.plot_losses", lambda self: None)


class Linear(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        return nn.Dense(1)(x)


def regression(bad_steps=(), poison="loss"):
    """A loss on the rows of one step that is NaN at `bad_steps`: with finite gradients
    (poison="loss"), or through the gradients too (poison="grads")."""

    def loss_fn(model, params, batch, **kwargs):
        loss = jnp.mean((model.apply({"params": params}, batch["x"], **kwargs)[:, 0] - batch["y"]) ** 2)
        bad = jnp.isin(batch["step"][0], jnp.asarray(bad_steps, jnp.int32))
        return loss + jnp.where(bad, jnp.nan, 0.0) if poison == "loss" else loss * jnp.where(bad, jnp.nan, 1.0)

    return loss_fn


def batch_at(step: int) -> dict:
    x = np.random.default_rng(step).normal(size=(ROWS, 4)).astype(np.float32)
    return {"x": x, "y": x.sum(1), "step": np.full((ROWS,), step, np.int32)}


def task(loss_fn=None, eval_batches=lambda: [batch_at(10**6)]) -> Task:
    return Task(
        model=Linear(),
        loss_fn=loss_fn or regression(),
        example_input=np.zeros((1, 4), np.float32),
        train_batch=batch_at,
        eval_batches=eval_batches,
        global_rows=ROWS,
        flops_per_row=1.0,
        items_per_row=1,
        item_name="rows",
    )


def run(workdir, steps, the_task=None, optimizer=None, config=CONFIG, **loop):
    settings = {"log_every": 1, "checkpoint_every": 1, "progress": False, **loop}
    return train(
        the_task or task(),
        optimizer or adam(1e-2),
        sharding.mesh_for("data=-1"),
        workdir,
        LoopConfig(steps=steps, **settings),
        config,
    )


def adam(learning_rate: float) -> optax.GradientTransformation:
    """Adam recording its learning rate, which the train step reports."""
    return optax.inject_hyperparams(optax.adam)(learning_rate=learning_rate)


def records(workdir) -> list[dict]:
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def committed_steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def params_at(workdir, step: int) -> dict:
    """The params a committed checkpoint step holds."""
    with ocp.CheckpointManager(pathlib.Path(workdir) / "checkpoints") as manager:
        return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]["params"]


def assert_same(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("poison", ["loss", "grads"])
def test_a_non_finite_step_changes_nothing_and_is_counted_per_window_and_in_all(tmp_path, poison):
    clean = run(tmp_path / "clean", 3)
    skipping = run(tmp_path / "skipping", 4, task(regression(bad_steps=[3], poison=poison)), log_every=2)
    assert_same(skipping["state"]["params"], clean["state"]["params"])  # step 3's update was skipped
    windows = [r for r in records(tmp_path / "skipping") if "loss" in r]
    assert [(r["step"], r["skipped"], r["skipped_total"]) for r in windows] == [(2, 0, 0), (4, 1, 1)]
    assert np.isfinite(windows[-1]["loss"])  # the window's loss averages the steps that updated


def test_consecutive_non_finite_steps_stop_the_run_and_no_checkpoint_holds_them(tmp_path):
    with pytest.raises(FloatingPointError, match=r"3 consecutive steps up to step 7 .* step 6"):
        run(tmp_path, 10, task(regression(bad_steps=range(4, 10))), max_bad_steps=3, checkpoint_every=2)
    assert committed_steps(tmp_path) == [2, 4, 6]  # nothing after the limit; 2 and 4 not rotated out
    assert_same(params_at(tmp_path, 6), params_at(tmp_path, 4))  # the skipped steps 5 and 6 changed nothing
    assert [r["skipped_total"] for r in records(tmp_path) if "loss" in r] == [0, 0, 0, 0, 1, 2, 3]


def test_a_state_that_overflowed_is_never_checkpointed(tmp_path):
    """Finite updates can still overflow the params: step 2 takes them from -3e38 to -inf."""
    overflow = lambda model, params, batch, **kwargs: jnp.mean(params["Dense_0"]["bias"])
    with pytest.raises(FloatingPointError, match="step 2: the train state holds NaN or Inf"):
        run(tmp_path, 4, task(overflow), optax.inject_hyperparams(optax.sgd)(learning_rate=3e38))
    assert committed_steps(tmp_path) == [1]


def test_a_rerun_asking_no_more_steps_does_nothing_and_a_longer_one_continues(tmp_path, capsys):
    run(tmp_path, 4)
    before = {name: (tmp_path / name).read_bytes() for name in ("metrics.jsonl", "config.json")}
    summary = run(tmp_path, 2, config={**CONFIG, "args": {"steps": 2}})
    assert "holds step 4, at or past steps=2: nothing trained" in capsys.readouterr().out
    assert "eval_loss" not in summary and int(summary["state"]["step"]) == 4
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert committed_steps(tmp_path) == [2, 3, 4]
    run(tmp_path, 6, config={**CONFIG, "args": {"steps": 6}}, keep_checkpoints=1)
    assert f"resuming {tmp_path} at step 4 (of 6)" in capsys.readouterr().out
    assert [r["step"] for r in records(tmp_path) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert json.loads((tmp_path / "config.json").read_text())["args"] == {"steps": 6}


@pytest.mark.parametrize("section, field, value", [("model", "features", 2), ("data", "seed", 1)])
def test_a_rerun_with_another_model_or_data_is_refused_before_anything_is_read_or_written(
    tmp_path, section, field, value
):
    run(tmp_path, 2)
    saved = (tmp_path / "config.json").read_text()
    changed = {**CONFIG, section: {**CONFIG[section], field: value}}
    with pytest.raises(ValueError, match=f"holds {field}=.*; this command asks {value}: use another"):
        run(tmp_path, 4, config=changed)
    assert (tmp_path / "config.json").read_text() == saved and committed_steps(tmp_path) == [1, 2]


def broken_evaluation():
    raise RuntimeError("the evaluation broke")


def test_the_final_checkpoint_is_written_before_the_final_evaluation(tmp_path):
    with pytest.raises(RuntimeError, match="the evaluation broke"):
        run(tmp_path / "broken", 3, task(eval_batches=lambda: iter(broken_evaluation, None)), checkpoint_every=0)
    assert committed_steps(tmp_path / "broken") == [3]  # 0: only the final checkpoint
    with pytest.warns(UserWarning, match="the evaluation yielded no batch"):
        summary = run(tmp_path / "empty", 2, task(eval_batches=lambda: []))
    assert "eval_loss" not in summary and committed_steps(tmp_path / "empty") == [1, 2]


def test_a_checkpoint_that_fails_to_write_stops_the_run_and_the_rerun_resumes_from_the_last_good_one(
    tmp_path, monkeypatch
):
    """The third step's JSON item fails in orbax's background commit, as on a full disk."""
    handler = ocp.handlers.JsonCheckpointHandler
    write, calls = handler._save_fn, []

    async def full_disk(self, item, directory):
        calls.append(directory)
        if len(calls) == 5:  # two JSON items a step
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return await write(self, item, directory)

    monkeypatch.setattr(handler, "_save_fn", full_disk)
    with pytest.raises(
        CheckpointWriteError,
        match=f"step 3 could not be written to {tmp_path}.*No space left.*the last committed step, 2, stays restorable",
    ):
        run(tmp_path, 6, keep_checkpoints=1)
    monkeypatch.setattr(handler, "_save_fn", write)
    assert run(tmp_path, 6)["start_step"] == 2


def test_the_progress_bar_counts_completed_steps(tmp_path, monkeypatch):
    """It moves when the logged metrics are fetched (the steps are done), not at each dispatch."""
    updates = []

    class Bar:
        def __init__(self, total, initial, **kwargs):
            self.n = initial

        def update(self, n):
            updates.append(n)
            self.n += n

        def set_postfix(self, **kwargs):
            pass

        def close(self):
            pass

    monkeypatch.setattr("zoo.train.loop.tqdm", Bar)
    run(tmp_path, 7, log_every=3)
    assert updates == [3, 3, 1]


@pytest.mark.parametrize("flag", ["--steps", "--log-every", "--grad-accum", "--batch", "--max-bad-steps"])
def test_flags_refuse_values_below_one_naming_the_flag(flag, capsys):
    with pytest.raises(SystemExit):
        experiment.parser("", workdir="w", steps=1, batch=8).parse_args([flag, "0"])
    assert f"argument {flag}: 0 is below 1" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--eval-every", "--checkpoint-every"])
def test_interval_flags_take_zero_and_refuse_negatives(flag, capsys):
    parser = experiment.parser("", workdir="w", steps=1, batch=8)
    assert experiment.loop_config(parser.parse_args([flag, "0"]))
    with pytest.raises(SystemExit):
        parser.parse_args([flag, "-5"])
    assert f"argument {flag}: -5 is below 0" in capsys.readouterr().err


def test_loop_config_refuses_a_run_without_steps():
    with pytest.raises(ValueError, match=r"LoopConfig\.steps=-5 must be >= 1"):
        LoopConfig(steps=-5)


def text_args(*argv: str):
    parser = experiment.parser("", workdir="w", steps=1, batch=8)
    experiment.add_text_flags(parser, vocab_size=64)
    return parser.parse_args(list(argv))


def test_the_eval_batch_defaults_to_the_batch_capped_at_the_validation_rows():
    mesh = sharding.mesh_for("data=-1")
    assert experiment.eval_batch(text_args("--batch", "248"), mesh, rows=25) == 24  # gpt3.py's case
    assert experiment.eval_batch(text_args("--batch", "16"), mesh, rows=400) == 16
    assert experiment.eval_batch(text_args("--eval-batch", "32"), mesh, rows=400) == 32
    with pytest.raises(ValueError, match="--eval-batch 12 must be a multiple of data x fsdp = 8"):
        experiment.check_batch(text_args("--eval-batch", "12"), mesh)


def test_a_validation_split_smaller_than_one_eval_batch_is_refused_at_start_up():
    cfg = zoo.GPTConfig(vocab_size=64, context_length=8, num_layers=1, d_model=8, num_heads=1, d_ff=16)
    rows = np.zeros((40, 9), np.int32)
    with pytest.raises(ValueError, match="the evaluation split holds 3 rows, fewer than one evaluation batch of 8"):
        tasks.language_model(zoo.GPT(cfg), rows, rows[:3], 8, 0)
    assert tasks.language_model(zoo.GPT(cfg), rows, rows[:3], 8, 0, eval_batches=0).eval_batches is None
    assert len(list(tasks.language_model(zoo.GPT(cfg), rows, rows[:3], 8, 0, eval_batch=1).eval_batches())) == 3
