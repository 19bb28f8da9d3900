"""Batches prepared ahead on a background thread, so the chip never waits for the host.

    with Prefetcher(lambda step: shard_batch(pipeline.batch_at(step), mesh), start, stop, depth=2) as batches:
        for step in range(start, stop):
            state, metrics = train_step(state, next(batches))

The thread calls `batch_at(start)`, `batch_at(start + 1)`, ... up to `stop - 1`, in order, and
hands each batch over through a queue of `depth` slots: while the current step runs, the next
`depth` batches are built (and, when `batch_at` shards them, already sent to the devices). The
batches are the ones `batch_at` would give without prefetching, so resuming at any step stays
exact. An exception in the producer is raised again in the consumer, with the producer's
traceback; `close()` (or leaving the `with` block, also on an exception or a preemption) stops
and joins the thread. Depth 0 prepares each batch in the consumer, when it is asked for.

A thread, not a process: the heavy parts (numpy, image decoding, the device transfer) release
the GIL, and a thread shares the pipeline's memory without copying batches between processes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

_DONE = object()  # the producer's last item when it handed over every batch up to `stop`


class _Failure:
    """An exception raised by `batch_at`, carried to the consumer (its traceback goes with it)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetcher(Iterator[Any]):
    """Iterates over batch_at(start), ..., batch_at(stop - 1), built `depth` batches ahead on a thread."""

    def __init__(self, batch_at: Callable[[int], Any], start: int, stop: int, depth: int = 2) -> None:
        if depth < 0:
            raise ValueError(f"depth={depth} must be >= 0 (0: no prefetching)")
        self._batch_at, self._step, self._stop = batch_at, start, stop
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._closing = threading.Event()
        self._end: object | None = None  # _DONE or a _Failure, once the consumer met it
        self._thread = threading.Thread(target=self._produce, name="prefetch", daemon=True) if depth else None
        if self._thread:
            self._thread.start()

    def _produce(self) -> None:
        """Build the batches in order and queue them, until `stop`, an error or `close()`."""
        try:
            while self._step < self._stop and not self._closing.is_set():
                self._queue.put(self._batch_at(self._step))
                self._step += 1
            self._queue.put(_DONE)
        except BaseException as error:  # handed to the consumer, which raises it
            self._queue.put(_Failure(error))

    def __next__(self) -> Any:
        """The next step's batch (waits for it); StopIteration after `stop - 1` or `close()`."""
        item = self._end or self._take()
        if item is _DONE or isinstance(item, _Failure):
            self._end = item
            if isinstance(item, _Failure):
                raise item.error
            raise StopIteration
        return item

    def _take(self) -> Any:
        """The next item: from the producer's queue, or built here at depth 0."""
        if self._closing.is_set():
            return _DONE
        if self._thread:
            return self._queue.get()
        if self._step >= self._stop:
            return _DONE
        self._step += 1
        return self._batch_at(self._step - 1)

    def close(self) -> None:
        """Stop the producer (after the batch it is building, if any), drop the queued batches and join it."""
        self._closing.set()
        while self._thread and self._thread.is_alive():
            self._drain()
            self._thread.join(timeout=0.01)
        self._drain()

    def _drain(self) -> None:
        """Empty the queue, so that a producer blocked on a full queue moves on and sees `close()`."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
