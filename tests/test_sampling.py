"""Sampling continues prompts with the model's own predictions, within and past its context."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo.sampling import sample

CFG = zoo.GPTConfig(vocab_size=17, context_length=8, num_layers=2, d_model=16, num_heads=2, d_ff=32,
                    attention_pattern=("dense", "banded"), window=3, dropout=0.0)


@pytest.fixture(scope="module")
def model_and_params():
    model = zoo.GPT(CFG)
    return model, jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]


def greedy_reference(model, params, prompt, num_tokens):
    """Token by token in Python: the argmax after the latest context_length tokens."""
    tokens, apply = list(np.asarray(prompt[0])), jax.jit(model.apply)
    for _ in range(num_tokens):
        context = jnp.asarray([tokens[-CFG.context_length:]], jnp.int32)
        tokens.append(int(jnp.argmax(apply({"params": params}, context)[0, -1])))
    return tokens


def test_top_1_sampling_is_greedy_decoding_past_the_context(model_and_params):
    model, params = model_and_params
    prompt = jnp.asarray([[3, 1, 4]], jnp.int32)
    out = sample(model, params, prompt, num_tokens=10, rng=jax.random.key(1), top_k=1)
    assert out.shape == (1, 13)
    assert list(np.asarray(out[0])) == greedy_reference(model, params, prompt, 10)


def test_samples_are_reproducible_by_key_and_keep_the_prompt(model_and_params):
    model, params = model_and_params
    prompt = jnp.asarray([[1, 2], [5, 6]], jnp.int32)
    a, b = (sample(model, params, prompt, 6, jax.random.key(seed)) for seed in (0, 0))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:, :2], prompt)
    assert int(a.max()) < CFG.vocab_size


def test_bad_arguments_get_clear_errors(model_and_params):
    model, params = model_and_params
    with pytest.raises(ValueError, match="temperature=0"):
        sample(model, params, jnp.ones((1, 2), jnp.int32), 3, jax.random.key(0), temperature=0)
    with pytest.raises(ValueError, match="prompt must be"):
        sample(model, params, jnp.ones((2,), jnp.int32), 3, jax.random.key(0))
