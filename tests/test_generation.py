"""zoo.generate: cached decoding equals recomputing the model over the growing sequence, for dense,
banded (GPT-3) and post-LN (GPT-1) models, ragged batches and past the context; samplers draw from
the distribution they name; bad prompts get clear errors; banded caches hold O(window)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo import configs, sharding
from zoo.generation import choose, generate
from zoo.models.gpt import GPT, advance, init_caches

CONTEXT = 64
VOCAB = 96  # divides the tensor axis, which shards the vocabulary
MODELS = {
    "dense": dict(attention_pattern=("dense",)),
    "gpt3 dense+banded": dict(attention_pattern=("dense", "banded"), window=8),
    "gpt1 post-LN": dict(norm_position="post", final_norm=False),
}


@functools.cache
def tiny(kind: str):
    cfg = configs.gpt(
        "gpt2-small",
        num_layers=4,
        d_model=32,
        num_heads=4,
        d_ff=64,
        context_length=CONTEXT,
        vocab_size=VOCAB,
        dropout=0.0,
        **MODELS[kind],
    )
    model = GPT(cfg)
    params = model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"]
    return model, params


def recomputed_greedy(model, params, prompt, steps) -> list[int]:
    """Greedy decoding by running the model over the last context_length tokens at every step."""
    apply = jax.jit(lambda window: model.apply({"params": params}, window))
    sequence, new = list(prompt), []
    for _ in range(steps):
        window = sequence[-CONTEXT:]
        logits = apply(jnp.asarray([window + [0] * (CONTEXT - len(window))], jnp.int32))[0, len(window) - 1]
        new.append(int(jnp.argmax(logits)))
        sequence.append(new[-1])
    return new


def prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, n).tolist() for n in lengths]


@pytest.mark.parametrize("kind", MODELS)
def test_greedy_cached_decoding_is_recomputation_for_a_ragged_batch_past_the_context(kind):
    model, params = tiny(kind)
    batch = prompts([1, 5, 37])
    steps = 40  # the 37-token prompt runs 13 tokens past the 64-token context
    out = np.asarray(generate(model, params, batch, steps))
    for row, prompt in zip(out, batch):
        assert row.tolist() == recomputed_greedy(model, params, prompt, steps)


def test_each_cached_step_gives_the_recomputed_logits():
    model, params = tiny("gpt3 dense+banded")
    [prompt] = prompts([11])
    extend = jax.jit(lambda tokens, caches: model.apply({"params": params}, tokens, caches, method=GPT.extend))
    full = jax.jit(lambda window: model.apply({"params": params}, window))
    caches = advance(init_caches(model.cfg, 1), jnp.zeros(1, jnp.int32), jnp.array([11]))
    logits, caches = extend(jnp.array([prompt]), caches)
    sequence = list(prompt)
    for position in range(11, 30):
        token = int(jnp.argmax(logits[0, -1]))
        sequence.append(token)
        caches = advance(caches, jnp.array([position]), jnp.ones(1, jnp.int32))
        logits, caches = extend(jnp.array([[token]]), caches)
        expected = full(jnp.array([sequence + [0] * (CONTEXT - len(sequence))]))[0, len(sequence) - 1]
        np.testing.assert_allclose(logits[0, -1], expected, atol=1e-5)


@pytest.mark.parametrize("layout", ["dp", "tensor=4", "fsdp_tp"])
def test_decoding_under_a_layout_gives_the_one_device_tokens(layout):
    model, params = tiny("gpt3 dense+banded")
    batch = prompts([3, 9, 5, 7, 2, 4, 8, 6], seed=2)  # 8 rows: the batch splits over the devices
    alone = generate(model, params, batch, 10)
    devices = jax.devices()[:4] if layout == "tensor=4" else None  # the 4 heads split over 4 devices
    mesh = sharding.mesh_for(layout, devices)
    with sharding.sharding_context(mesh):
        sharded = jax.device_put(params, sharding.logical_shardings(params, mesh))
        np.testing.assert_array_equal(generate(model, sharded, batch, 10), alone)


def test_a_short_prompt_beside_a_long_one_generates_what_it_generates_alone():
    model, params = tiny("gpt3 dense+banded")
    short, long = prompts([3, 30], seed=4)
    together = generate(model, params, [short, long], 12)
    np.testing.assert_array_equal(together[0], generate(model, params, [short], 12)[0])


def test_a_prompt_longer_than_the_context_keeps_its_last_tokens():
    model, params = tiny("dense")
    [prompt] = prompts([CONTEXT + 20])
    np.testing.assert_array_equal(generate(model, params, [prompt], 5), generate(model, params, [prompt[-CONTEXT:]], 5))


def test_rows_stop_at_their_first_stop_token_and_repeat_it():
    model, params = tiny("dense")
    [prompt] = prompts([6])
    free = np.asarray(generate(model, params, [prompt], 10))[0]
    stop = int(free[3])
    first = free.tolist().index(stop)
    cut = np.asarray(generate(model, params, [prompt], 10, stop_tokens=(stop,)))[0]
    assert cut.tolist() == [*free[: first + 1].tolist(), *[stop] * (9 - first)]


def test_a_stream_sees_each_steps_tokens_in_order_until_every_row_stops():
    model, params = tiny("dense")
    batch = prompts([6, 2])
    steps = []
    new = np.asarray(
        generate(
            model, params, batch, 10, stop_tokens=(int(generate(model, params, batch, 3)[0, 2]),), stream=steps.append
        )
    )
    assert np.array_equal(np.stack(steps, axis=1), new[:, : len(steps)]) and 3 <= len(steps) <= 10


def test_zero_or_one_new_tokens_and_bad_prompts():
    model, params = tiny("dense")
    assert generate(model, params, [[1, 2]], 0).shape == (1, 0)
    assert generate(model, params, [[1, 2]], 1).shape == (1, 1)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, params, [[1], []], 3)
    with pytest.raises(ValueError, match=r"ids in \[0, 96\]"):
        generate(model, params, [[0, VOCAB]], 3)
    with pytest.raises(ValueError, match="needs an rng"):
        generate(model, params, [[1]], 3, temperature=1.0)


def test_samples_follow_the_tempered_distribution_cut_by_top_k_and_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = lambda n, **cut: np.asarray(
        jax.vmap(lambda key: choose(logits, key, **cut)[0])(jax.random.split(jax.random.key(0), n))
    )
    frequency = lambda tokens: np.bincount(tokens, minlength=4) / tokens.size
    tempered = jax.nn.softmax(logits[0] / 2.0)
    assert np.abs(frequency(draws(20000, temperature=2.0, top_k=None, top_p=None)) - tempered).sum() < 0.03
    assert np.abs(frequency(draws(20000, temperature=1.0, top_k=2, top_p=None)) - [0.625, 0.375, 0, 0]).sum() < 0.03
    # top-p 0.8: 0.5 + 0.3 reach it, so exactly the first two tokens remain
    assert np.abs(frequency(draws(20000, temperature=1.0, top_k=None, top_p=0.8)) - [0.625, 0.375, 0, 0]).sum() < 0.03
    assert set(draws(2000, temperature=1.0, top_k=None, top_p=0.81).tolist()) == {0, 1, 2}


def test_sampling_is_a_pure_function_of_the_key():
    model, params = tiny("dense")
    batch = prompts([4, 4])
    sample = lambda seed: np.asarray(generate(model, params, batch, 16, temperature=1.0, rng=jax.random.key(seed)))
    np.testing.assert_array_equal(sample(0), sample(0))
    assert (sample(0) != sample(1)).any()


def test_samples_of_one_prefill_are_the_samples_of_repeated_prompts():
    model, params = tiny("gpt3 dense+banded")
    batch, key = prompts([4, 11]), jax.random.key(3)
    repeated = [row for row in batch for _ in range(3)]
    once = np.asarray(generate(model, params, batch, 12, temperature=1.0, rng=key, samples=3))
    np.testing.assert_array_equal(once, generate(model, params, repeated, 12, temperature=1.0, rng=key))
    assert len({tuple(row) for row in once[:3]}) > 1  # a prompt's samples differ


def test_banded_caches_hold_the_window_not_the_context():
    def decode_argument_bytes(context: int) -> tuple[int, int]:
        cfg = configs.gpt(
            "gpt3-small", num_layers=2, d_model=32, num_heads=4, d_ff=64, context_length=context, vocab_size=VOCAB,
            attention_pattern=("banded",), window=16,
        )  # fmt: skip
        model = GPT(cfg)
        params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
        step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, c, method=GPT.extend))
        compiled = step.lower(params, jax.ShapeDtypeStruct((2, 1), jnp.int32), init_caches(cfg, 2)).compile()
        memory = compiled.memory_analysis()
        return memory.argument_size_in_bytes, memory.temp_size_in_bytes

    (args_short, temp_short), (args_long, temp_long) = decode_argument_bytes(64), decode_argument_bytes(1024)
    assert args_long - args_short == (1024 - 64) * 32 * 4  # only the position table grows
    assert temp_long == temp_short
