"""Batches of fixed-length token windows for language modelling."""

from __future__ import annotations

import numpy as np


def encode_bytes(text: str) -> np.ndarray:
    """UTF-8 bytes as token ids (vocabulary 256): a tokenizer with nothing to train."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def decode_bytes(tokens) -> str:
    return bytes(np.asarray(tokens, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


def random_windows(tokens: np.ndarray, batch: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """`batch` windows of `length` consecutive tokens at uniformly random offsets: int32 [batch, length]."""
    if len(tokens) < length:
        raise ValueError(f"corpus of {len(tokens)} tokens is shorter than one window of {length}")
    starts = rng.integers(0, len(tokens) - length + 1, size=batch)
    return np.stack([tokens[start:start + length] for start in starts])


def sequential_windows(tokens: np.ndarray, batch: int, length: int, max_batches: int | None = None):
    """Non-overlapping windows in corpus order, `batch` at a time (for evaluation)."""
    rows = len(tokens) // length
    windows = tokens[: rows * length].reshape(rows, length)
    for count, start in enumerate(range(0, rows - batch + 1, batch)):
        if max_batches is not None and count >= max_batches:
            return
        yield windows[start:start + batch]
