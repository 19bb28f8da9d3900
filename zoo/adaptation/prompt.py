"""Prompt tuning (Lester et al., 2021): P learned vectors put before the token embeddings of a
frozen GPT; the loss stays on the real tokens.

    prompt = prompt.init(params, key, length=16)                   # [16, d_model], vocabulary rows
    logits = model.apply({"params": params}, tokens, prefix=prompt)  # logits of the tokens only
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax


def init(params: Any, rng: jax.Array, length: int) -> jax.Array:
    """`length` prompt vectors [length, d_model], each a copy of a random token's embedding (sampled
    from the vocabulary, as Lester et al. initialise), named ("prompt", "embed") for sharding."""
    embedding = params["token_embed"]["embedding"]
    names = None
    if isinstance(embedding, nn.LogicallyPartitioned):
        embedding, names = embedding.value, embedding.names
    if length < 1:
        raise ValueError(f"length={length} must be >= 1")
    rows = jax.random.choice(rng, embedding.shape[0], (length,), replace=embedding.shape[0] < length)
    prompt = embedding[rows]
    return prompt if names is None else nn.LogicallyPartitioned(prompt, (None, names[1]))


def loss(loss_fn: Callable) -> Callable:
    """`loss_fn` for params {"base": the model's, "prompt": [P, d_model]}: the model runs with the
    prompt before every row (freeze the base with `zoo.adaptation.frozen`)."""
    return lambda model, params, batch, **kwargs: loss_fn(
        model, params["base"], batch, prefix=params["prompt"], **kwargs
    )
