"""GPT: one module that is GPT-1, GPT-2 or GPT-3 by config; pure, scanned, logically named."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo

TINY = zoo.GPTConfig(
    vocab_size=61,
    context_length=24,
    num_layers=4,
    d_model=24,
    num_heads=3,
    d_ff=48,
    attention_pattern=("dense", "banded"),
    window=4,
    dropout=0.0,
)
LOGICAL_NAMES = {"batch", "length", "embed", "heads", "head_dim", "mlp", "vocab", "layers", None}


def init(cfg, length=None, seed=0):
    tokens = jax.random.randint(jax.random.key(seed + 1), (2, length or cfg.context_length), 0, cfg.vocab_size)
    params = jax.jit(zoo.GPT(cfg).init)(jax.random.key(seed), tokens)["params"]
    return params, tokens


def logits_fn(cfg):
    return jax.jit(lambda params, tokens: zoo.GPT(cfg).apply({"params": params}, tokens))


@pytest.fixture(scope="module")
def tiny():
    return init(TINY)


def test_logits_shape_and_dtype(tiny):
    params, tokens = tiny
    logits = zoo.GPT(TINY).apply({"params": params}, tokens[:, :17])
    assert logits.shape == (2, 17, TINY.vocab_size) and logits.dtype == jnp.float32


def test_apply_is_a_pure_function_of_params_and_tokens(tiny):
    """Logits depend on params and tokens only: separately built models agree, jitted or not; apply
    writes no state (its only collection comes back unchanged) and one call leaves no trace on the next."""
    params, tokens = tiny
    other = (tokens + 1) % TINY.vocab_size
    model = zoo.GPT(dataclasses.replace(TINY))
    first, variables = model.apply({"params": params}, tokens, mutable=True)
    assert set(variables) == {"params"}
    jax.tree.map(np.testing.assert_array_equal, nn.unbox(variables["params"]), nn.unbox(params))
    np.testing.assert_allclose(logits_fn(TINY)(params, tokens), first, rtol=1e-5, atol=1e-5)
    moved = model.apply({"params": params}, other)
    np.testing.assert_array_equal(model.apply({"params": params}, tokens), first)
    assert np.abs(moved - first).max() > 1e-2  # the logits do depend on the tokens


def test_causal_future_tokens_do_not_change_past_logits(tiny):
    params, tokens = tiny
    run = logits_fn(TINY)
    changed = tokens.at[:, 10:].set((tokens[:, 10:] + 1) % TINY.vocab_size)
    np.testing.assert_allclose(run(params, tokens)[:, :10], run(params, changed)[:, :10], atol=1e-6)


@pytest.mark.parametrize("pattern, sees_far_past", [(("banded",), False), (("dense",), True)])
def test_banded_layers_see_only_their_window(pattern, sees_far_past):
    """With only banded layers of window w, position i cannot see token i - L·(w-1) - 1 or earlier."""
    cfg = dataclasses.replace(TINY, attention_pattern=pattern, num_layers=2)
    params, tokens = init(cfg)
    run = logits_fn(cfg)
    changed = tokens.at[:, 0].set((tokens[:, 0] + 1) % cfg.vocab_size)
    receptive = cfg.num_layers * (cfg.window - 1) + 1
    far = np.abs(run(params, tokens)[:, receptive:] - run(params, changed)[:, receptive:]).max()
    assert (far > 1e-4) == sees_far_past


def silence_attention(params, block):
    """`params` with the attention output of `block` zeroed in every scan step: those layers mix no positions."""
    params = nn.unbox(params)
    layer = params["layers"][block]
    silent = {**layer, "attn": {**layer["attn"], "out": jax.tree.map(jnp.zeros_like, layer["attn"]["out"])}}
    return {**params, "layers": {**params["layers"], block: silent}}


@pytest.mark.parametrize("mixing, sees_far_past", [("block_0", True), ("block_1", False)])
def test_gpt3_alternates_dense_and_banded_layers(tiny, mixing, sees_far_past):
    """In TINY's scanned (dense, banded) pairs, block_0 attends to the whole past and block_1 only to its
    window: with only one of them mixing positions, token 0 reaches every later position through dense
    layers, and none beyond the two banded layers' receptive field 2·(w-1)."""
    params, tokens = tiny
    layers = nn.unbox(params)["layers"]
    assert set(layers) == {"block_0", "block_1"} and layers["block_1"]["attn"]["qkv"]["kernel"].shape[0] == 2
    only = silence_attention(params, "block_1" if mixing == "block_0" else "block_0")
    changed = tokens.at[:, 0].set((tokens[:, 0] + 1) % TINY.vocab_size)
    run = logits_fn(TINY)
    reach = np.abs(run(only, tokens) - run(only, changed)).max(axis=(0, 2))  # per position
    beyond = 2 * (TINY.window - 1) + 1
    assert (reach[1:beyond] > 1e-4).all()  # both kinds see the first token nearby
    assert (reach[beyond:] > 1e-4).all() if sees_far_past else reach[beyond:].max() < 1e-6


def test_gpt1_is_post_ln_without_final_norm():
    cfg = dataclasses.replace(
        zoo.configs.gpt("gpt1"), num_layers=2, d_model=24, num_heads=2, d_ff=32, vocab_size=50, context_length=16
    )
    params, tokens = init(cfg)
    assert "final_norm" not in params
    # Post-LN: every block output is layer-normalised, so the hidden states have unit variance.
    hidden = zoo.GPT(cfg).apply({"params": params}, tokens, method=zoo.GPT.hidden_states)
    np.testing.assert_allclose(hidden.std(axis=-1), 1.0, atol=1e-2)


def test_depth_is_scanned_so_the_program_does_not_grow_with_layers():
    def program_size(num_layers):
        cfg = dataclasses.replace(TINY, num_layers=num_layers)
        tokens = jnp.zeros((1, 8), jnp.int32)
        params = jax.eval_shape(zoo.GPT(cfg).init, jax.random.key(0), tokens)
        return len(jax.make_jaxpr(zoo.GPT(cfg).apply)(params, tokens).jaxpr.eqns)

    assert program_size(2) == program_size(16)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_unrolling_the_layer_loop_changes_the_program_not_the_model(tiny, tiny_grads, remat):
    unrolled = dataclasses.replace(TINY, scan_unroll=2, remat=remat)  # both repetitions of the pattern: no loop
    params, tokens = tiny
    assert jax.tree.structure(init(unrolled)[0]) == jax.tree.structure(params)
    np.testing.assert_allclose(logits_fn(unrolled)(params, tokens), logits_fn(TINY)(params, tokens), atol=1e-6)
    for a, b in zip(jax.tree.leaves(nn.unbox(tiny_grads)), jax.tree.leaves(nn.unbox(loss_grads(unrolled, *tiny)))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_every_parameter_has_logical_axis_names(tiny):
    params, _ = tiny
    specs = nn.get_partition_spec(params)
    leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    for (path, value), spec in zip(jax.tree_util.tree_leaves_with_path(nn.unbox(params)), leaves):
        assert len(spec) == value.ndim, path
        assert set(spec) <= LOGICAL_NAMES and any(name is not None for name in spec), path
    scanned = specs["layers"]["block_0"]["mlp"]["up"]["kernel"]
    assert tuple(scanned) == ("layers", "embed", "mlp")


def test_scaled_residual_init():
    cfg = dataclasses.replace(TINY, d_model=96, num_heads=4, d_ff=384, num_layers=8, init_std=0.02)
    params = nn.unbox(init(cfg, length=4)[0])
    down = params["layers"]["block_0"]["mlp"]["down"]["kernel"]
    up = params["layers"]["block_0"]["mlp"]["up"]["kernel"]
    assert abs(float(down.std()) / (0.02 / np.sqrt(16)) - 1) < 0.1
    assert abs(float(up.std()) / 0.02 - 1) < 0.1


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32(tiny):
    params, tokens = tiny
    cfg = dataclasses.replace(TINY, dtype="bfloat16")
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox(params)))
    low, full = logits_fn(cfg)(params, tokens), logits_fn(TINY)(params, tokens)
    assert low.dtype == jnp.float32 and np.isfinite(low).all()
    assert np.abs(low - full).max() < 0.05 * np.abs(full).max()


def loss_grads(cfg, params, tokens):
    loss = lambda p: zoo.GPT(cfg).apply({"params": p}, tokens).mean()
    return jax.jit(jax.grad(loss))(params)


@pytest.fixture(scope="module")
def tiny_grads(tiny):
    return loss_grads(TINY, *tiny)


@pytest.mark.parametrize("remat", ["full", "dots_no_batch"])
def test_remat_changes_memory_not_math(tiny, tiny_grads, remat):
    rematted = loss_grads(dataclasses.replace(TINY, remat=remat), *tiny)
    for a, b in zip(jax.tree.leaves(nn.unbox(tiny_grads)), jax.tree.leaves(nn.unbox(rematted))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_dropout_is_active_only_in_training(tiny):
    params, tokens = tiny
    cfg = dataclasses.replace(TINY, dropout=0.5)
    train = jax.jit(
        lambda seed: zoo.GPT(cfg).apply(
            {"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.key(seed)}
        )
    )
    assert not np.allclose(train(0), train(1))
    np.testing.assert_allclose(logits_fn(cfg)(params, tokens), logits_fn(TINY)(params, tokens), atol=1e-5)


@pytest.mark.parametrize(
    "tokens, message",
    [
        (jnp.zeros((1, 25), jnp.int32), "input length 25 exceeds context_length=24"),
        (jnp.full((1, 5), 61, jnp.int32), r"token ids must be in \[0, vocab_size=61\), got ids in \[61, 61\]"),
        (jnp.full((1, 5), -1, jnp.int32), "token ids must be in"),
        (jnp.zeros((1, 5), jnp.float32), "tokens must be integers"),
        (jnp.zeros((5,), jnp.int32), "tokens must be integers"),
    ],
)
def test_bad_tokens_get_clear_errors(tiny, tokens, message):
    params, _ = tiny
    with pytest.raises(ValueError, match=message):
        zoo.GPT(TINY).apply({"params": params}, tokens)
