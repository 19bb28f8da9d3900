"""Checkpoints: bit-exact round trips, schedule and retention, restoring onto other device
layouts, falling back past a corrupt newest step, and SIGTERM turned into a stop request."""

import os
import shutil
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from zoo.checkpoint import Checkpointer, PreemptionGuard

# A failed orbax restore closes its event loop while tensorstore reads are still in flight; their
# late callbacks raise "Event loop is closed" in a thread, which pytest reports during a later test.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

DATA_STATE = {"step": 120, "seed": 0}
CONFIG = {"model": "gpt3-small", "num_layers": 2, "dtype": "bfloat16", "betas": [0.9, 0.95]}


def train_state(step: int = 7) -> dict:
    """A small state as the train loop keeps it: params, AdamW moments after one update, step, rng."""
    params = {
        "dense": {"kernel": jax.random.normal(jax.random.key(1), (16, 4)), "bias": jnp.arange(4.0)},
        "embed": jax.random.normal(jax.random.key(2), (16, 8), jnp.bfloat16),
    }
    optimizer = optax.adamw(1e-3)
    opt_state = optimizer.init(params)
    _, opt_state = optimizer.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
    rng = jax.random.key_data(jax.random.key(step))
    return {"params": params, "opt_state": opt_state, "step": jnp.int32(step), "rng": rng}


def abstract(state: dict, sharding_of=lambda x: x.sharding) -> dict:
    """The state's shapes and dtypes with the sharding `sharding_of(leaf)` asks for."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_of(x)), state)


def assert_bit_equal(restored: dict, expected: dict) -> None:
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def mesh_over(n: int) -> Mesh:
    return Mesh(np.array(jax.devices()[:n]), ("x",))


def shard_rows(x: jax.Array, mesh: Mesh) -> NamedSharding:
    """FSDP-like: split the first axis over the mesh, replicate scalars and short vectors."""
    divisible = x.ndim >= 1 and x.shape[0] % mesh.size == 0
    return NamedSharding(mesh, P("x") if divisible else P())


def test_round_trip_is_bit_exact_even_when_the_arrays_are_donated_after_save(tmp_path):
    state = train_state()
    expected = jax.device_get(state)
    with Checkpointer(tmp_path, save_every=5) as checkpointer:
        assert checkpointer.save(10, state, DATA_STATE, CONFIG)
        jax.tree.map(lambda x: x.delete(), state)  # what the donating train step does next
    with Checkpointer(tmp_path, save_every=5) as checkpointer:
        assert checkpointer.latest_step() == 10
        restored, data_state, config, step = checkpointer.restore(abstract(train_state()))
    assert_bit_equal(restored, expected)
    assert (data_state, config, step) == (DATA_STATE, CONFIG, 10)


def test_saves_on_schedule_or_forced_and_keeps_the_latest(tmp_path):
    state = {"w": jnp.zeros(2)}
    with Checkpointer(tmp_path, save_every=2, keep=2) as checkpointer:
        saved = [checkpointer.save(step, state, DATA_STATE, CONFIG) for step in range(1, 8)]
        assert saved == [False, True, False, True, False, True, False]
        assert checkpointer.save(7, state, DATA_STATE, CONFIG, force=True)
        assert not checkpointer.save(7, state, DATA_STATE, CONFIG, force=True)  # already there
        checkpointer.wait()
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [6, 7]


def test_restores_a_state_saved_on_8_devices_onto_4_devices_and_onto_1(tmp_path):
    eight = mesh_over(8)
    state = jax.tree.map(lambda x: jax.device_put(x, shard_rows(x, eight)), train_state())
    assert state["params"]["dense"]["kernel"].sharding.spec == P("x")
    with Checkpointer(tmp_path, save_every=1) as checkpointer:
        checkpointer.save(3, state, DATA_STATE, CONFIG)
        four = mesh_over(4)
        for target in (lambda x: shard_rows(x, four), lambda x: SingleDeviceSharding(jax.devices()[0])):
            restored, *_ = checkpointer.restore(abstract(state, target))
            assert_bit_equal(restored, state)
            for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract(state, target))):
                assert got.sharding == want.sharding


def corrupt(step_dir: Path, damage: str) -> None:
    """Damages a committed step the ways a crash, a full disk or a bad copy do."""
    array_files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    if damage == "array files truncated":
        for path in array_files:
            os.truncate(path, path.stat().st_size // 2)
    elif damage == "array files deleted":
        for path in array_files:
            path.unlink()
    elif damage == "json item and commit marker deleted":
        (step_dir / "data_state" / "metadata").unlink()
        (step_dir / "commit_success.txt").unlink()


@pytest.mark.parametrize(
    "damage", ["array files truncated", "array files deleted", "json item and commit marker deleted"]
)
def test_a_corrupt_latest_step_falls_back_to_the_previous_one_with_a_warning(tmp_path, damage):
    with Checkpointer(tmp_path, save_every=1) as checkpointer:
        for step in (1, 2):
            checkpointer.save(step, train_state(step), {"step": step}, CONFIG)
    corrupt(tmp_path / "2", damage)
    with (
        Checkpointer(tmp_path, save_every=1) as checkpointer,
        pytest.warns(UserWarning, match="checkpoint step 2 .* cannot be restored"),
    ):
        restored, data_state, _, step = checkpointer.restore(abstract(train_state()))
    assert (step, data_state) == (1, {"step": 1})
    assert_bit_equal(restored, train_state(1))


def test_an_interrupted_save_is_ignored_and_an_all_corrupt_directory_raises(tmp_path):
    with Checkpointer(tmp_path, save_every=1) as checkpointer:
        for step in (1, 2):
            checkpointer.save(step, train_state(step), {"step": step}, CONFIG)
    shutil.move(tmp_path / "2", tmp_path / "2.orbax-checkpoint-tmp-1700000000")  # killed before the rename
    with Checkpointer(tmp_path, save_every=1) as checkpointer:
        assert checkpointer.restore(abstract(train_state()))[3] == 1
    corrupt(tmp_path / "1", "array files deleted")
    with (
        Checkpointer(tmp_path, save_every=1) as checkpointer,
        pytest.warns(UserWarning, match="step 1"),
        pytest.raises(RuntimeError, match="none of the checkpoint"),
    ):
        checkpointer.restore(abstract(train_state()))


def test_no_checkpoint_restores_none(tmp_path):
    with Checkpointer(tmp_path / "run", save_every=1) as checkpointer:
        assert checkpointer.latest_step() is None
        assert checkpointer.restore(abstract(train_state())) is None


def test_sigterm_requests_a_stop_instead_of_killing_and_the_old_handler_comes_back():
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda *_: calls.append("previous"))
    try:
        handler = signal.getsignal(signal.SIGTERM)
        with PreemptionGuard() as guard:
            assert not guard.should_stop(0)
            os.kill(os.getpid(), signal.SIGTERM)
            assert guard.should_stop(1) and guard.should_stop(2)
        assert signal.getsignal(signal.SIGTERM) is handler and calls == []
    finally:
        signal.signal(signal.SIGTERM, previous)
