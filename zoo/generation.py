"""Generation from a GPT with a KV cache: one prefill of the whole prompt batch, then one compiled
loop of single-token steps over the cache (`GPT.extend`), stopping early once every row has stopped.

    new = generate(model, params, [[5, 6, 7], [8]], max_new_tokens=20)                 # greedy
    new = generate(model, params, prompts, 20, temperature=0.8, top_p=0.95, rng=key)  # sampled

Rows keep their own positions: a short prompt beside a long one generates what it generates alone.
Prompts are right-padded to a bucket (a power of two from 8 up to the context length), so a new
prompt length compiles again only when it needs a larger bucket. A dense layer's cache holds the
positions the decode reaches (a power of two >= bucket + max_new_tokens, at most the context
length), since every step reads all of its slots. A prompt longer than the context
keeps its last `context_length` tokens. Past the context, each step recomputes the model over the
row's last `context_length` tokens (at positions 0 … T-1, as training saw them): the cache
holds keys at absolute positions, which a sliding window would shift.

An image prompt: `prefix` holds each row's image tokens (embeddings, e.g.
`ImageToText.image_tokens`), prefilled once before the text prompt; image and prompt attend to each
other both ways, the new tokens causally (the prefix-LM form the model was trained in).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from zoo.models.gpt import GPT, advance, init_caches

MIN_BUCKET = 8


def generate(
    model: GPT,
    params: Any,
    prompts: Sequence[Sequence[int]] | np.ndarray | jax.Array,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    rng: jax.Array | None = None,
    samples: int = 1,
    stream: Callable[[np.ndarray], None] | None = None,
    prefix: jax.Array | None = None,
) -> jax.Array:
    """The new tokens, int32 [B * samples, max_new_tokens], of each prompt (token-id sequences of any
    lengths, or an int array [B, P]), each row cut at its first stop token (kept; the rest of the
    row repeats it). temperature=0 is greedy; otherwise `rng` is required and the result is a pure
    function of it. Temperature divides the logits before top-k and top-p cut them; top-p keeps the
    smallest set of most likely tokens whose probability reaches p (exactly, over the whole
    vocabulary). With `samples` > 1 each prompt is prefilled once and continued `samples` times (its
    rows next to each other), e.g. for self-consistency. `stream`, if given, is called with each
    step's new tokens (an int32 array of the rows) as the compiled loop chooses them, e.g. to print
    them as they come; a new function compiles again. Every call has been made when generate returns.
    `prefix` [B, P, d_model]: embeddings put before each prompt (image tokens; see the module's
    docstring); the prefix, the prompt and the new tokens must fit in the context."""
    cfg = model.cfg
    rows = [np.asarray(row, np.int64).reshape(-1) for row in prompts]
    if not rows or any(row.size == 0 for row in rows):
        raise ValueError("every prompt needs at least one token (an empty prompt has nothing to continue)")
    low, high = min(int(row.min()) for row in rows), max(int(row.max()) for row in rows)
    if low < 0 or high >= cfg.vocab_size:
        raise ValueError(f"prompt token ids must be in [0, vocab_size={cfg.vocab_size}), got ids in [{low}, {high}]")
    if samples < 1:
        raise ValueError(f"samples={samples} must be >= 1")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0: greedy)")
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs an rng key")
    if top_k is not None and not 1 <= top_k <= cfg.vocab_size:
        raise ValueError(f"top_k={top_k} must be in [1, vocab_size={cfg.vocab_size}] (None: no cut)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (None: no cut)")
    room = cfg.context_length  # positions left for the prompt (and, with a prefix, the new tokens)
    if prefix is not None:
        if prefix.ndim != 3 or prefix.shape[0] != len(rows) or prefix.shape[2] != cfg.d_model:
            raise ValueError(
                f"prefix must be [prompts={len(rows)}, length, d_model={cfg.d_model}], got {tuple(prefix.shape)}"
            )
        longest = max(row.size for row in rows)
        if prefix.shape[1] + longest + max_new_tokens > cfg.context_length:
            raise ValueError(
                f"a prefix of {prefix.shape[1]}, a prompt of {longest} and {max_new_tokens} new tokens pass "
                f"context_length={cfg.context_length} (with a prefix, generation stays within the context)"
            )
        room = cfg.context_length - prefix.shape[1] - max_new_tokens
    rows = [row[-cfg.context_length :] for row in rows]  # longer prompts: the latest tokens
    lengths = np.array([row.size for row in rows], np.int32)
    bucket = min(max(MIN_BUCKET, 1 << int(lengths.max() - 1).bit_length()), room)
    padded = np.zeros((len(rows), bucket), np.int32)
    for i, row in enumerate(rows):
        padded[i, : row.size] = row
    if max_new_tokens == 0:
        return jnp.zeros((len(rows) * samples, 0), jnp.int32)
    sampling = (float(temperature), top_k, top_p, tuple(int(t) for t in stop_tokens), samples)
    key = jax.random.key(0) if rng is None else rng
    new = _generate(
        model, params, jnp.asarray(padded), jnp.asarray(lengths), key, max_new_tokens, sampling, stream, prefix
    )
    if stream is not None:
        jax.effects_barrier()  # every step's call has been made when generate returns
    return new


def generate_padded(
    model: GPT,
    params: Any,
    prompt: jax.Array,
    lengths: jax.Array,
    max_new_tokens: int,
    rng: jax.Array,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
) -> jax.Array:
    """`generate` for callers that are compiled themselves (PPO's rollouts inside its train step):
    prompts already right-padded, int32 [B, P], with their lengths [B]; no host-side checks. The
    new tokens [B, max_new_tokens], each row cut at its first stop token as `generate` does."""
    sampling = (float(temperature), top_k, top_p, tuple(int(t) for t in stop_tokens), 1)
    return _generate(model, params, prompt, lengths, rng, max_new_tokens, sampling, None)


def choose(logits: jax.Array, key: jax.Array, temperature: float, top_k: int | None, top_p: float | None) -> jax.Array:
    """Next tokens [B] from float32 logits [B, vocab]: the argmax at temperature 0, else a sample of
    softmax(logits / temperature) restricted to the top-k tokens, then to the top-p nucleus."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        order = jnp.argsort(-logits, axis=-1)
        probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        keep_sorted = jnp.cumsum(probs, axis=-1) - probs < top_p  # the mass before a token is short of p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7))
def _generate(
    model: GPT,
    params: Any,
    prompt: jax.Array,
    lengths: jax.Array,
    rng: jax.Array,
    max_new: int,
    sampling: tuple[float, int | None, float | None, tuple[int, ...], int],
    stream: Callable[[np.ndarray], None] | None,
    prefix: jax.Array | None = None,
) -> jax.Array:
    temperature, top_k, top_p, stop_tokens, samples = sampling
    cfg, variables = model.cfg, {"params": params}
    offset = 0 if prefix is None else prefix.shape[1]  # the position of a row's first token
    reach = offset + prompt.shape[1] + max_new  # no position of this decode reaches it: fewer slots to read
    slots = min(cfg.context_length, 1 << (reach - 1).bit_length())
    caches = advance(init_caches(cfg, prompt.shape[0], slots), jnp.zeros_like(lengths), offset + lengths)
    logits, caches = model.apply(variables, prompt, caches, prefix, method=GPT.extend)
    if samples > 1:  # every cache leaf, like the prompts, has the batch at axis 1 (after the layer scan's)
        caches = jax.tree.map(lambda leaf: jnp.repeat(leaf, samples, axis=1), caches)
        prompt, lengths, logits = (jnp.repeat(x, samples, axis=0) for x in (prompt, lengths, logits))
    batch, bucket = prompt.shape
    rows = jnp.arange(batch)
    sequence = jnp.zeros((batch, bucket + max_new), jnp.int32).at[:, :bucket].set(prompt)

    def cached(token: jax.Array, position: jax.Array, caches: Any, sequence: jax.Array) -> tuple[jax.Array, Any]:
        caches = advance(caches, offset + position, jnp.ones_like(position))
        logits, caches = model.apply(variables, token[:, None], caches, method=GPT.extend)
        return logits[:, 0], caches

    def recomputed(token: jax.Array, position: jax.Array, caches: Any, sequence: jax.Array) -> tuple[jax.Array, Any]:
        """The model over each row's last context_length tokens, as if there were no cache."""
        length = position + 1
        start = jnp.maximum(length - cfg.context_length, 0)
        window = jax.vmap(lambda row, s: jax.lax.dynamic_slice(row, (s,), (cfg.context_length,)))(
            jnp.pad(sequence, ((0, 0), (0, cfg.context_length))), start
        )
        logits = model.apply(variables, window)
        return logits[rows, length - start - 1], caches

    def step(state: tuple) -> tuple:
        i, logits, caches, sequence, position, out, done, fill = state
        token = choose(logits, jax.random.fold_in(rng, i), temperature, top_k, top_p)
        token = jnp.where(done, fill, token)
        stopped = jnp.isin(token, jnp.asarray(stop_tokens, jnp.int32)) if stop_tokens else jnp.zeros_like(done)
        fill = jnp.where(done, fill, token)
        done = done | stopped
        out = out.at[:, i].set(token)
        if stream is not None:
            io_callback(stream, None, token, ordered=True)
        sequence = sequence.at[rows, position].set(token)
        if reach <= cfg.context_length:  # no row passes the context: no recomputation compiled
            logits, caches = cached(token, position, caches, sequence)
        else:
            fits = jnp.all(done | (position < cfg.context_length))
            logits, caches = jax.lax.cond(fits, cached, recomputed, token, position, caches, sequence)
        return i + 1, logits, caches, sequence, position + 1, out, done, fill

    def going(state: tuple) -> jax.Array:
        i, *_, done, _ = state
        return (i < max_new) & ~jnp.all(done)

    out = jnp.zeros((batch, max_new), jnp.int32)
    done = jnp.zeros(batch, bool)
    state = (0, logits[rows, lengths - 1], caches, sequence, lengths, out, done, jnp.zeros(batch, jnp.int32))
    i, _, _, _, _, out, done, fill = jax.lax.while_loop(going, step, state)
    return jnp.where(jnp.arange(max_new) < i, out, fill[:, None])
