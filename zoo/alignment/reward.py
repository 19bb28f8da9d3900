"""The reward model (InstructGPT, Ouyang et al. 2022, section 3.5): a GPT trunk with a scalar head,
trained on K ranked responses per prompt, every pair of a prompt in the same batch, with the loss
-log σ(r_w - r_l) of each pair (w ranked above l). PPO's value model is the same network read at
every response position (InstructGPT initialises it from the reward model).

    model = reward.RewardModel(cfg)
    batch = reward.encode(prompts, responses, scores, length=96)   # K responses per prompt
    loss, accuracy = reward.loss(model, params, batch)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zoo.models.gpt import GPT, GPTConfig
from zoo.nn.transformer import dense_init, zeros_init


class RewardModel(nn.Module):
    """A GPT's final hidden states through a scalar head: tokens [B, T] -> a score per position
    [B, T] (float32). A response's reward is the score at its last token."""

    cfg: GPTConfig

    def setup(self) -> None:
        self.gpt = GPT(self.cfg)
        self.head = nn.Dense(
            1,
            kernel_init=dense_init(self.cfg.init_std, ("embed", "classes")),
            bias_init=zeros_init(("classes",)),
            param_dtype=self.cfg.param_dtype,
        )

    def __call__(self, tokens: jax.Array, deterministic: bool = True) -> jax.Array:
        return self.head(self.gpt.hidden_states(tokens, deterministic))[..., 0].astype(jnp.float32)


def scores_at(model: RewardModel, params: Any, tokens: jax.Array, last: jax.Array, **apply_kwargs: Any) -> jax.Array:
    """The scores of sequences `tokens` [..., T] at their last real tokens `last` [...]."""
    flat = tokens.reshape(-1, tokens.shape[-1])
    scores = model.apply({"params": params}, flat, **apply_kwargs)
    return jnp.take_along_axis(scores, last.reshape(-1, 1), axis=1).reshape(last.shape)


def pairwise_loss(rewards: jax.Array, truth: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(loss, accuracy) of rewards [N, K] against true scores [N, K]: over every pair of a prompt's
    responses whose true scores differ, the mean of -log σ(r_w - r_l), and the fraction of those
    pairs with r_w > r_l. Ties carry no preference and are left out."""
    ranked = truth[:, :, None] > truth[:, None, :]  # [N, K, K]: response i above response j
    margins = rewards[:, :, None] - rewards[:, None, :]
    pairs = jnp.maximum(jnp.sum(ranked), 1)
    loss = jnp.sum(jnp.where(ranked, -jax.nn.log_sigmoid(margins), 0.0)) / pairs
    accuracy = jnp.sum(ranked & (margins > 0)) / pairs
    return loss, accuracy


def loss(model: RewardModel, params: Any, batch: dict, **apply_kwargs: Any) -> tuple[jax.Array, jax.Array]:
    """The pairwise loss and accuracy of a batch of `encode`d comparisons."""
    return pairwise_loss(scores_at(model, params, batch["tokens"], batch["last"], **apply_kwargs), batch["score"])


def encode(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[Sequence[int]]], scores: Any, length: int
) -> dict[str, np.ndarray]:
    """Comparisons as arrays: {"tokens" int32 [N, K, length] (prompt then response, right-padded),
    "last" int32 [N, K] (the last real token), "score" float32 [N, K] (the true scores)}. A
    response too long for the context loses its end; a prompt must leave room for one token."""
    k = len(responses[0])
    if any(len(group) != k for group in responses) or len(prompts) != len(responses):
        raise ValueError("every prompt needs the same number K of responses")
    tokens = np.zeros((len(prompts), k, length), np.int32)
    last = np.zeros((len(prompts), k), np.int32)
    for n, (prompt, group) in enumerate(zip(prompts, responses)):
        if len(prompt) >= length:
            raise ValueError(f"a prompt of {len(prompt)} tokens leaves no room for a response in {length}")
        for i, response in enumerate(group):
            sequence = [*prompt, *response][:length]
            tokens[n, i, : len(sequence)] = sequence
            last[n, i] = len(sequence) - 1
    return {"tokens": tokens, "last": last, "score": np.asarray(scores, np.float32).reshape(len(prompts), k)}
