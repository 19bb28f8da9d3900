"""Training pieces: the next-token loss, GPT-3's optimizer, and a step that learns."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import zoo
from zoo.train import adamw, eval_step_fn, learning_rate, next_token_loss, train_state, train_step_fn

CFG = zoo.GPTConfig(vocab_size=13, context_length=8, num_layers=2, d_model=16, num_heads=2, d_ff=32, dropout=0.0)


def test_loss_of_a_model_that_knows_nothing_is_log_vocab():
    model = zoo.GPT(CFG)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 13, (2, 9)), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), tokens[:, :-1])["params"]
    params = jax.tree.map(jnp.zeros_like, params)  # zero embeddings: uniform predictions
    np.testing.assert_allclose(next_token_loss(model, params, tokens), np.log(13), rtol=1e-6)


def test_weight_decay_touches_matrices_only():
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
    optimizer = adamw(learning_rate=0.1, total_steps=10, warmup_steps=0, weight_decay=0.5)
    updates, _ = optimizer.update(jax.tree.map(jnp.zeros_like, params), optimizer.init(params), params)
    assert float(jnp.abs(updates["kernel"]).max()) > 0 and float(jnp.abs(updates["bias"]).max()) == 0


def test_schedule_warms_up_then_decays_to_a_tenth():
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1.0, 10, 100, 0.1)  # what adamw builds
    assert float(schedule(0)) == 0 and float(schedule(10)) == 1 and abs(float(schedule(100)) - 0.1) < 1e-6


def tiny_run(rows: int, seed: int, optimizer: optax.GradientTransformation):
    """A tiny GPT, a batch of `rows` token rows, and a fresh train state."""
    model = zoo.GPT(CFG)
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, 13, (rows, 9)), jnp.int32)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens[:, :-1])["params"])
    return model, tokens, params, train_state(params, optimizer, jax.random.key(0))


def test_train_step_learns_a_repeated_batch_and_reports_what_it_did():
    optimizer = adamw(1e-2, total_steps=30, warmup_steps=2)
    model, tokens, params, state = tiny_run(4, 0, optimizer)
    step = jax.jit(train_step_fn(model, optimizer, next_token_loss))
    evaluate = jax.jit(eval_step_fn(model, next_token_loss))
    before = float(evaluate(params, tokens)["loss"])
    for _ in range(30):
        state, metrics = step(state, tokens)
    assert int(state["step"]) == 30
    assert float(evaluate(state["params"], tokens)["loss"]) < 0.5 * before
    assert set(metrics) == {"loss", "grad_norm", "lr"} and float(metrics["grad_norm"]) > 0
    assert float(metrics["lr"]) == float(learning_rate(state["opt_state"])) < 1e-2  # decaying after warm-up


def test_gradient_accumulation_equals_the_whole_batch():
    optimizer = adamw(1e-2, total_steps=10, warmup_steps=0)
    model, tokens, _, state = tiny_run(8, 1, optimizer)
    whole, whole_metrics = jax.jit(train_step_fn(model, optimizer, next_token_loss))(state, tokens)
    accumulated, metrics = jax.jit(train_step_fn(model, optimizer, next_token_loss, accumulation_steps=4))(
        state, tokens
    )
    np.testing.assert_allclose(metrics["loss"], whole_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], whole_metrics["grad_norm"], rtol=1e-5)
    # Adam divides by the gradient's size: where that is ~0 (key biases), rounding noise moves
    # params by up to lr x 1e-3, so compare at that scale.
    for a, b in zip(jax.tree.leaves(accumulated["params"]), jax.tree.leaves(whole["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
