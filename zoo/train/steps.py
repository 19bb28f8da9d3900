"""Training pieces: the next-token loss, GPT-3's optimizer, and a compiled train step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from zoo.train import recipes


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
    """GPT-3's optimizer with its cosine over the whole run (the horizon at `total_steps`, or one
    step past warm-up): `recipes.optimizer` of that recipe, for callers that name no preset."""
    return recipes.optimizer(
        recipes.Recipe(
            learning_rate,
            warmup_steps,
            max(total_steps, warmup_steps + 1),
            final_lr_fraction,
            weight_decay,
            betas,
            eps,
            clip_norm,
        )
    )


def learning_rate(opt_state: Any) -> jax.Array:
    """The learning rate the last update used (`recipes.optimizer` records it in its state)."""
    return optax.tree_utils.tree_get(opt_state, "hyperparams")["learning_rate"]


def classification_loss(model: nn.Module, params: Any, batch: dict, **apply_kwargs: Any) -> tuple:
    """(mean cross-entropy, accuracy) of `model(batch["image"])` against integer `batch["label"]`."""
    logits = model.apply({"params": params}, batch["image"], **apply_kwargs)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, (jnp.argmax(logits, -1) == batch["label"]).mean()


def train_state(params: Any, optimizer: optax.GradientTransformation, rng: jax.Array) -> dict:
    """The state a train step carries: params, optimizer state, step 0 and the run's key data."""
    return {
        "params": params,
        "opt_state": optimizer.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(rng),
    }


def _losses(loss_fn: Callable, model: nn.Module, params: Any, batch: Any, **kwargs: Any) -> tuple:
    """(loss, accuracy), accuracy None where the loss function reports none."""
    out = loss_fn(model, params, batch, **kwargs)
    return out if isinstance(out, tuple) else (out, None)


def _metrics(loss: jax.Array, accuracy: jax.Array | None) -> dict:
    return {"loss": loss} if accuracy is None else {"loss": loss, "accuracy": accuracy}


def train_step_fn(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    loss_fn: Callable,
    accumulation_steps: int = 1,
    unroll_accumulation: bool = False,
) -> Callable:
    """The un-jitted `(state, batch) -> (state, metrics)` of one optimizer step, where
    state = {params, opt_state, step, rng} and loss_fn(model, params, batch, **kwargs) returns a
    loss or (loss, accuracy). Dropout keys derive from (rng, step): a resumed run repeats them.
    With `accumulation_steps` = k, the batch's rows are split into k micro-batches whose mean
    gradient makes the one update (rows i, k + i, 2k + i, ... form micro-batch i, so each device
    keeps its own rows). `unroll_accumulation` compiles the micro-batches without a loop (for
    XLA's cost analysis, which counts a loop's body once). A NaN or Inf loss makes the gradients
    NaN, so that a guard on the updates (the loop's `optax.apply_if_finite`) skips that step too."""

    def value_and_grads(params: Any, batch: Any, rng: jax.Array):
        loss = lambda p: _losses(loss_fn, model, p, batch, deterministic=False, rngs={"dropout": rng})
        return jax.value_and_grad(loss, has_aux=True)(params)

    def accumulated(params: Any, batch: Any, rng: jax.Array):
        micro = jax.tree.map(lambda x: x.reshape(-1, accumulation_steps, *x.shape[1:]).swapaxes(0, 1), batch)

        def add(total: Any, inputs: tuple[jax.Array, Any]) -> tuple[Any, None]:
            index, micro_batch = inputs
            out = value_and_grads(params, micro_batch, jax.random.fold_in(rng, index))
            return jax.tree.map(jnp.add, total, out), None

        shapes = jax.eval_shape(value_and_grads, params, jax.tree.map(lambda x: x[0], micro), rng)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        total, _ = jax.lax.scan(add, zeros, (jnp.arange(accumulation_steps), micro), unroll=unroll_accumulation)
        return jax.tree.map(lambda x: x / accumulation_steps, total)

    def step(state: dict, batch: Any) -> tuple[dict, dict]:
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        compute = value_and_grads if accumulation_steps == 1 else accumulated
        (value, accuracy), grads = compute(state["params"], batch, rng)
        grads = jax.tree.map(lambda g: jnp.where(jnp.isfinite(value), g, jnp.nan), grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        metrics = {**_metrics(value, accuracy), "grad_norm": optax.tree.norm(grads), "lr": learning_rate(opt_state)}
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
        return _metrics(*_losses(loss_fn, model, params, batch))

    return step
