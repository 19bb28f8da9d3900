"""Training pieces: the next-token loss, GPT-3's optimizer, and a compiled train step."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


def next_token_loss(model: nn.Module, params: Any, tokens: jax.Array, **apply_kwargs: Any) -> jax.Array:
    """Mean cross-entropy of predicting tokens[:, 1:] from tokens[:, :-1]. Rows hold
    context_length + 1 tokens, so that every position, the last one included, learns to
    predict (sampling past the context reads the last position's logits)."""
    logits = model.apply({"params": params}, tokens[:, :-1], **apply_kwargs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def adamw(
    learning_rate: float,
    total_steps: int,
    warmup_steps: int,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    clip_norm: float = 1.0,
    final_lr_fraction: float = 0.1,
) -> optax.GradientTransformation:
    """GPT-3's optimizer: AdamW with linear warmup then cosine decay to 10% of the peak,
    global-norm clipping, and weight decay on matrices only (not biases or LN scales)."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps, max(total_steps, warmup_steps + 1), learning_rate * final_lr_fraction
    )
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
            learning_rate=schedule, b1=betas[0], b2=betas[1], eps=eps, weight_decay=weight_decay, mask=decay_mask
        ),
    )


def learning_rate(opt_state: Any) -> jax.Array:
    """The learning rate the last update used (`adamw` records it in its state)."""
    return optax.tree_utils.tree_get(opt_state, "hyperparams")["learning_rate"]


def classification_loss(model: nn.Module, params: Any, batch: dict, **apply_kwargs: Any) -> tuple:
    """(mean cross-entropy, accuracy) of `model(batch["image"])` against integer `batch["label"]`."""
    logits = model.apply({"params": params}, batch["image"], **apply_kwargs)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, (jnp.argmax(logits, -1) == batch["label"]).mean()


def train_step_fn(model: nn.Module, optimizer: optax.GradientTransformation, loss_fn: Callable) -> Callable:
    """The un-jitted `(state, batch) -> (state, metrics)` of one optimizer step, where
    state = {params, opt_state, step, rng} and loss_fn(model, params, batch, **kwargs) returns a
    loss or (loss, accuracy). Dropout keys derive from (rng, step): a resumed run repeats them."""

    def step(state: dict, batch: Any) -> tuple[dict, dict]:
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])

        def loss(params):
            out = loss_fn(model, params, batch, deterministic=False, rngs={"dropout": rng})
            return out if isinstance(out, tuple) else (out, None)

        (value, accuracy), grads = jax.value_and_grad(loss, has_aux=True)(state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        metrics = {"loss": value, "grad_norm": optax.global_norm(grads), "lr": learning_rate(opt_state)}
        if accuracy is not None:
            metrics["accuracy"] = accuracy
        new_state = {
            "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state,
            "step": state["step"] + 1,
            "rng": state["rng"],
        }
        return new_state, metrics

    return step


def eval_step_fn(model: nn.Module, loss_fn: Callable) -> Callable:
    """The un-jitted `(params, batch) -> metrics` without dropout."""

    def step(params: Any, batch: Any) -> dict:
        out = loss_fn(model, params, batch)
        return {"loss": out[0], "accuracy": out[1]} if isinstance(out, tuple) else {"loss": out}

    return step
