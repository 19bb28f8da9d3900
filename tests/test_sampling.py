"""Sampling continues prompts with the model's own predictions, within and past its context."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo.sampling import sample

CFG = zoo.GPTConfig(
    vocab_size=17,
    context_length=8,
    num_layers=2,
    d_model=16,
    num_heads=2,
    d_ff=32,
    attention_pattern=("dense", "banded"),
    window=3,
    dropout=0.0,
)


@pytest.fixture(scope="module")
def model_and_params():
    model = zoo.GPT(CFG)
    return model, jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]


def greedy_reference(model, params, prompt, num_tokens):
    """Token by token in Python: the argmax after the latest context_length tokens."""
    tokens, apply = list(np.asarray(prompt[0])), jax.jit(model.apply)
    for _ in range(num_tokens):
        context = jnp.asarray([tokens[-CFG.context_length :]], jnp.int32)
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
    a, b, other = (sample(model, params, prompt, 6, jax.random.key(seed)) for seed in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert (np.asarray(a[:, 2:]) != np.asarray(other[:, 2:])).any()  # 12 draws from 17 tokens: never all alike
    np.testing.assert_array_equal(a[:, :2], prompt)
    np.testing.assert_array_equal(other[:, :2], prompt)
    assert int(a.max()) < CFG.vocab_size


class KnownLogits(nn.Module):
    """A stand-in model whose logits are `logits` at every position: its next-token distribution is known."""

    cfg: zoo.GPTConfig
    logits: tuple[float, ...]

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.broadcast_to(jnp.asarray(self.logits), (*tokens.shape, len(self.logits)))


LOGITS = (1.0, 2.0, -1.0, 1.5, 0.0, 0.5)


def token_frequencies(temperature: float, top_k: int | None, rows: int = 2000, tokens: int = 5) -> np.ndarray:
    """How often each token is drawn from KnownLogits(LOGITS) in rows x tokens samples."""
    model = KnownLogits(dataclasses.replace(CFG, vocab_size=len(LOGITS)), LOGITS)
    out = sample(model, {}, jnp.zeros((rows, 1), jnp.int32), tokens, jax.random.key(0), temperature, top_k)
    return np.bincount(np.asarray(out[:, 1:]).ravel(), minlength=len(LOGITS)) / (rows * tokens)


@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.5, None), (1.0, 3), (2.0, 2)])
def test_tokens_are_drawn_from_the_tempered_softmax_of_the_top_k(temperature, top_k):
    """Frequencies over 10,000 draws match softmax(logits / temperature) renormalised over the k largest
    logits (4 standard deviations: 0.02), and no token outside them is ever drawn."""
    logits = np.asarray(LOGITS) / temperature
    if top_k is not None:
        logits[np.argsort(logits)[:-top_k]] = -np.inf
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    frequencies = token_frequencies(temperature, top_k)
    np.testing.assert_allclose(frequencies, expected, atol=0.02)
    assert (frequencies[expected == 0] == 0).all()


def test_a_low_temperature_samples_greedily():
    assert (token_frequencies(0.01, None) == np.eye(len(LOGITS))[np.argmax(LOGITS)]).all()


def test_bad_arguments_get_clear_errors(model_and_params):
    model, params = model_and_params
    with pytest.raises(ValueError, match="temperature=0"):
        sample(model, params, jnp.ones((1, 2), jnp.int32), 3, jax.random.key(0), temperature=0)
    with pytest.raises(ValueError, match="prompt must be"):
        sample(model, params, jnp.ones((2,), jnp.int32), 3, jax.random.key(0))


# --- arguments outside the vocabulary get clear errors ------------------------------------------


@pytest.mark.parametrize("top_k", [0, -1, CFG.vocab_size + 1])
def test_top_k_outside_the_vocabulary_is_named(model_and_params, top_k):
    model, params = model_and_params
    with pytest.raises(ValueError, match=rf"top_k={top_k} must be in \[1, vocab_size={CFG.vocab_size}\]"):
        sample(model, params, jnp.ones((1, 2), jnp.int32), 3, jax.random.key(0), top_k=top_k)


@pytest.mark.parametrize("bad_id", [-1, CFG.vocab_size])
def test_prompt_ids_outside_the_vocabulary_are_named(model_and_params, bad_id):
    model, params = model_and_params
    prompt = jnp.asarray([[1, bad_id], [2, 3]], jnp.int32)
    with pytest.raises(ValueError, match=rf"prompt token ids must be in \[0, vocab_size={CFG.vocab_size}\).*{bad_id}"):
        sample(model, params, prompt, 3, jax.random.key(0))
