"""Sampling from a GPT: temperature and top-k, recomputing the context each step.

Each new token runs the model over the last `context_length` tokens (O(T²) per token);
a key/value cache is the faster way and belongs to the generation module to come.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from zoo.models.gpt import GPT


def sample(
    model: GPT,
    params: Any,
    prompt: jax.Array,
    num_tokens: int,
    rng: jax.Array,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> jax.Array:
    """Continue each prompt row (int32 [batch, P], P >= 1) by `num_tokens` tokens; returns
    [batch, P + num_tokens]. Longer than the context, the model sees the latest tokens."""
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be int [batch, length >= 1], got shape {prompt.shape}")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    vocab_size = model.cfg.vocab_size
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k={top_k} must be in [1, vocab_size={vocab_size}] (None: no cut)")
    if not isinstance(prompt, jax.core.Tracer) and prompt.size:  # under jit, out-of-range ids would read NaN
        low, high = int(prompt.min()), int(prompt.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(f"prompt token ids must be in [0, vocab_size={vocab_size}), got ids in [{low}, {high}]")
    return _sample(model, params, prompt, num_tokens, rng, temperature, top_k)


@functools.partial(jax.jit, static_argnums=(0, 3, 6))
def _sample(
    model: GPT, params: Any, prompt: jax.Array, num_tokens: int, rng: jax.Array, temperature: float, top_k: int | None
) -> jax.Array:
    batch, prompt_length = prompt.shape
    total = prompt_length + num_tokens
    window = min(model.cfg.context_length, total)
    tokens = jnp.zeros((batch, total), jnp.int32).at[:, :prompt_length].set(prompt)

    def next_token(position: jax.Array, tokens: jax.Array) -> jax.Array:
        start = jnp.maximum(position - window, 0)
        context = jax.lax.dynamic_slice_in_dim(tokens, start, window, axis=1)
        logits = model.apply({"params": params}, context)[:, position - start - 1] / temperature
        if top_k is not None:
            kth_largest = jax.lax.top_k(logits, top_k)[0][:, -1:]
            logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
        token = jax.random.categorical(jax.random.fold_in(rng, position), logits)
        return tokens.at[:, position].set(token)

    return jax.lax.fori_loop(prompt_length, total, next_token, tokens)
