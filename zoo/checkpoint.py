"""Checkpoints of a training run on orbax's CheckpointManager, and SIGTERM preemption handling.

A checkpoint step holds three orbax items: `state` (the pytree of possibly sharded jax.Arrays:
params, opt_state, step, rng key data), `data_state` and `config` (JSON). Orbax does the
atomic commit (a step is written under a temporary name and renamed once complete), the async
write, retention of the latest `keep` steps and the multi-process coordination: every process
calls `save`/`restore`, each writes and reads only its own shards, the primary host (process 0,
orbax's default `MultiprocessingOptions`) writes the JSON items and the step metadata.

A write that fails in the background (a full disk, a workdir that became unwritable) surfaces at
the next `save`, `wait` or `close` as a `CheckpointWriteError` naming the step, the directory and
the reason; the step is not committed and the steps committed before it stay restorable.
"""

from __future__ import annotations

import logging
import os
import signal
import warnings
from types import FrameType, TracebackType
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from zoo.paths import absolute

log = logging.getLogger(__name__)

Restored = tuple[Any, dict, dict, int]


class CheckpointWriteError(OSError):
    """A checkpoint step that could not be written; the earlier committed steps are intact."""


class Checkpointer:
    """Saves `state`, `data_state` and `config` every `save_every` steps (0: only when forced),
    keeps the latest `keep`, and restores the newest step that reads back cleanly onto the
    shardings asked for."""

    def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int = 3, async_save: bool = True):
        if save_every < 0 or keep < 1:
            raise ValueError(f"save_every must be >= 0 and keep >= 1, got save_every={save_every}, keep={keep}")
        policies = ocp.checkpoint_managers
        interval = [policies.FixedIntervalPolicy(save_every)] if save_every else []
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.AnySavePolicy([*interval, policies.PreemptionCheckpointingPolicy()]),
            preservation_policy=policies.LatestN(keep),
            enable_async_checkpointing=async_save,
        )
        self.directory = absolute(directory)  # orbax's tensorstore paths must be absolute
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._writing: int | None = None  # the step whose write may still be in flight

    def due(self, step: int) -> bool:
        """Whether `step` is on the save schedule (or a preemption asks for a checkpoint)."""
        return self._manager.should_save(int(step))

    def save(self, step: int, state: Any, data_state: dict, config: dict, force: bool = False) -> bool:
        """Starts writing this step when it is on schedule (or `force`); True if it did. The arrays
        are copied to host before this returns, so the caller may donate them right after. Raises
        `CheckpointWriteError` if the previous save failed in the background, or this one fails."""
        step = int(step)
        if (force and step in self._manager.all_steps()) or not (force or self.due(step)):
            return False
        self.wait()
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_state=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config),
        )
        self._writing = step
        try:
            self._manager.save(step, args=args, force=True)
        except Exception as e:
            raise self._write_error(e) from e
        return True

    def wait(self) -> None:
        """Blocks until every started save is committed (renamed to its final step directory);
        raises `CheckpointWriteError` if one failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._write_error(e) from e
        self._writing = None

    def latest_step(self) -> int | None:
        """The newest committed step, or None (a corrupt newest step still counts here)."""
        return self._manager.latest_step()

    def restore(self, abstract_state: Any) -> Restored | None:
        """`(state, data_state, config, step)` from the newest step that restores, laid out as the
        `jax.ShapeDtypeStruct`s (with `sharding=`) of `abstract_state` ask; each unreadable step
        is skipped with a warning. None when there is no checkpoint; raises when none restores."""
        self.wait()
        self._manager.reload()
        steps = sorted(self._manager.all_steps(), reverse=True)
        step, restored, error = self._restore_newest(steps, abstract_state)
        if jax.process_count() > 1:
            step, restored = self._agree_across_processes(step, restored, abstract_state)
        if restored is not None:
            return restored.state, dict(restored.data_state), dict(restored.config), step
        if steps:
            raise RuntimeError(f"none of the checkpoint steps {steps} in {self.directory} restores") from error
        return None

    def close(self) -> None:
        """Waits for pending saves (raising `CheckpointWriteError` if one failed) and releases
        orbax's background threads."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        """The checkpointer itself; leaving the block closes it."""
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: Any) -> None:
        """Closes: pending saves finish first. When the block raised, a failed save is logged
        rather than raised, so that the block's own error is the one reported."""
        try:
            self.close()
        except CheckpointWriteError as e:
            if exc_type is None:
                raise
            log.error("%s", e)

    def _write_error(self, error: Exception) -> CheckpointWriteError:
        """The error of a failed save: the step, where, why, and what stays restorable."""
        reason = error.strerror if isinstance(error, OSError) and error.strerror else _first_line(error)
        step = "a step" if self._writing is None else f"step {self._writing}"
        return CheckpointWriteError(
            f"checkpoint {step} could not be written to {self.directory}: {reason} "
            f"({type(error).__name__}); the last committed step, {self._committed()}, stays restorable"
        )

    def _committed(self) -> int | None:
        """The newest step committed on storage, read again: orbax's own list already dropped the
        steps that the failed save's retention would have deleted after it committed."""
        self._manager.reload()
        return self._manager.latest_step()

    def _restore_newest(self, steps: list[int], abstract_state: Any) -> tuple[int, Any, Exception | None]:
        """Tries `steps` newest first: `(step, restored, None)`, or `(-1, None, last error)`."""
        error: Exception | None = None
        for step in steps:
            try:
                return step, self._restore_step(step, abstract_state), None
            except Exception as e:  # any read failure (missing, truncated, corrupt file) makes the step unusable
                error = e
                warnings.warn(
                    f"checkpoint step {step} in {self.directory} cannot be restored, trying an older step: "
                    f"{type(e).__name__}: {_first_line(e)}",
                    stacklevel=3,
                )
        return -1, None, error

    def _restore_step(self, step: int, abstract_state: Any) -> Any:
        """Orbax's restore of one step's three items, the arrays onto `abstract_state`'s shardings."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data_state=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
        )
        return self._manager.restore(step, args=args)

    def _agree_across_processes(self, step: int, restored: Any, abstract_state: Any) -> tuple[int, Any]:
        """Makes every process resume from the same step: a file that only some processes read
        (one shard's data) can be corrupt, so when the steps differ all processes restore the
        oldest of them again, together, as orbax's restore is collective."""
        steps = multihost_utils.process_allgather(np.int64(step))
        oldest = int(np.min(steps))
        if oldest == int(np.max(steps)):
            return step, restored
        log.warning("processes restored steps %s; all restore step %d", sorted(set(steps.tolist())), oldest)
        return oldest, None if oldest < 0 else self._restore_step(oldest, abstract_state)


class PreemptionGuard:
    """Turns SIGTERM into a stop request that the train loop polls with `should_stop(step)`, so a
    preempted run stops at one step on every process, saves and exits instead of being killed."""

    def __init__(self, sync_every: int = 1):
        """`sync_every`: in multi-process runs without jax's preemption service, combine the
        processes' flags (a host-blocking allgather) only every `sync_every` steps."""
        self._sync_every = sync_every
        self._received = False
        self._stopped = False
        self._jax_service = False
        self._previous: Any = None

    def __enter__(self) -> PreemptionGuard:
        """Installs the SIGTERM handler, unless jax.distributed's preemption service has one."""
        # In a multi-process run, jax.distributed's preemption service already catches SIGTERM
        # and agrees on a step without a collective per step; a Python handler would displace it.
        self._jax_service = jax.process_count() > 1 and bool(jax.config.jax_enable_preemption_service)
        if not self._jax_service:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        """Reinstalls the SIGTERM handler that was there before."""
        if not self._jax_service:
            # None: the previous handler was not installed from Python and cannot be reinstalled.
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)

    def should_stop(self, step: int) -> bool:
        """True from the step at which every process stops: at once in a single process, else at a
        step all processes agree on (call it at every step, on every process)."""
        self._stopped = self._stopped or self._poll(int(step))
        return self._stopped

    def _poll(self, step: int) -> bool:
        """This step's stop decision, combined across processes when there are several."""
        if self._jax_service:
            return multihost_utils.reached_preemption_sync_point(step)
        if jax.process_count() == 1:
            return self._received
        if step % self._sync_every:
            return False
        return bool(np.any(multihost_utils.process_allgather(np.bool_(self._received))))

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        """Records the request; the loop finishes its step, saves and exits."""
        log.warning("SIGTERM received: stopping after a final checkpoint")
        self._received = True


def _first_line(error: Exception, limit: int = 300) -> str:
    """The start of an error message (tensorstore's run to kilobytes of spec JSON)."""
    return str(error).split("\n", 1)[0][:limit]
