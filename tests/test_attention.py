"""Attention: every implementation equals the dense masked reference, in values and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from zoo import sharding
from zoo.nn import dot_product_attention as attn

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def random_qkv(batch, length, heads, head_dim, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(k, (batch, length, heads, head_dim), jnp.float32).astype(dtype) for k in keys]


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert np.all(np.isfinite(actual)), "NaN or inf in the result"
    scale = float(np.max(np.abs(expected))) or 1.0  # absolute error against an all-zero reference (w = 1: dq, dk)
    return float(np.max(np.abs(actual - expected))) / scale


def value_and_grads(fn, q, k, v, key_mask=None, **static):
    """Output and the q, k, v cotangents for a fixed random output cotangent (jax.vjp)."""

    @jax.jit
    def run(q, k, v, key_mask):
        out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, key_mask=key_mask, **static), q, k, v)
        cotangent = jax.random.normal(jax.random.key(7), out.shape, jnp.float32).astype(out.dtype)
        return (out, *pullback(cotangent))

    return run(q, k, v, key_mask)


# (batch, length, heads, head_dim, window): T not divisible by w, w = 1, w = T, w > T, several heads.
BANDED_CASES = [
    (2, 37, 3, 8, 5),
    (1, 64, 2, 16, 16),
    (3, 50, 4, 8, 1),
    (2, 33, 2, 8, 33),
    (1, 20, 1, 8, 64),
    (2, 129, 5, 16, 32),
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", BANDED_CASES, ids=lambda c: "B{}-T{}-H{}-D{}-w{}".format(*c))
def test_banded_equals_dense_in_values_and_gradients(case, dtype):
    batch, length, heads, head_dim, window = case
    q, k, v = random_qkv(batch, length, heads, head_dim, dtype)
    banded = value_and_grads(attn.banded_attention, q, k, v, window=window)
    dense = value_and_grads(attn.dense_attention, q, k, v, window=window)
    for name, actual, expected in zip(("out", "dq", "dk", "dv"), banded, dense):
        assert relative_error(actual, expected) <= TOLERANCE[dtype], name


@pytest.mark.parametrize("window", [None, 1, 6, 40])
def test_dense_reference_agrees_with_jax_dot_product_attention(window):
    """An independent check of the reference itself: jax.nn.dot_product_attention (XLA)."""
    q, k, v = random_qkv(2, 23, 3, 8)
    ours = value_and_grads(attn.dense_attention, q, k, v, window=window)
    theirs = value_and_grads(attn.attention, q, k, v, window=window, implementation="xla")
    for actual, expected in zip(ours, theirs):
        assert relative_error(actual, expected) <= 1e-5


def test_window_one_returns_values():
    q, k, v = random_qkv(2, 11, 2, 8)
    np.testing.assert_allclose(attn.attention(q, k, v, window=1), v, rtol=1e-6)
    np.testing.assert_allclose(attn.banded_attention(q, k, v, window=1), v, rtol=1e-6)


def test_window_covering_the_sequence_is_causal_attention():
    q, k, v = random_qkv(1, 17, 2, 8)
    causal = attn.dense_attention(q, k, v)
    for window in (17, 100):
        assert relative_error(attn.attention(q, k, v, window=window), causal) <= 1e-6
        assert relative_error(attn.banded_attention(q, k, v, window=window), causal) <= 1e-6


@pytest.mark.parametrize("padding", ["right", "left"])
def test_padded_batches(padding):
    """Keys masked out by key_mask are never attended; fully masked rows (left padding)
    stay finite in values and gradients, and the valid rows match the unpadded sequence."""
    q, k, v = random_qkv(3, 26, 2, 8)
    lengths = np.array([26, 19, 7])
    positions = np.arange(26)
    key_mask = positions < lengths[:, None] if padding == "right" else positions >= 26 - lengths[:, None]
    key_mask = jnp.asarray(key_mask)
    banded = value_and_grads(attn.banded_attention, q, k, v, window=6, key_mask=key_mask)
    dense = value_and_grads(attn.dense_attention, q, k, v, window=6, key_mask=key_mask)
    for actual, expected in zip(banded, dense):
        assert relative_error(actual, expected) <= 1e-5
    if padding == "right":
        row = 1
        alone = attn.dense_attention(q[row : row + 1, :19], k[row : row + 1, :19], v[row : row + 1, :19], window=6)
        assert relative_error(banded[0][row : row + 1, :19], alone) <= 1e-5


def test_fully_masked_rows_do_not_produce_nan():
    q, k, v = random_qkv(1, 8, 1, 8)
    key_mask = jnp.zeros((1, 8), bool)
    for fn in (attn.dense_attention, attn.banded_attention):
        for array in value_and_grads(fn, q, k, v, window=3, key_mask=key_mask):
            assert np.all(np.isfinite(np.asarray(array)))


def test_splash_kernel_equals_dense_in_interpret_mode():
    """The TPU kernel path, run by the Pallas interpreter on CPU: dense causal and banded."""
    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
    q, k, v = random_qkv(1, 256, 2, 128)
    for window in (None, 64):
        splash = attn._splash_attention(q, k, v, window=window, interpret=True)
        assert relative_error(splash, attn.dense_attention(q, k, v, window=window)) <= 1e-5


@pytest.mark.parametrize("layout, heads, window", [("fsdp_tp", 3, 32), ("dp_tp", 4, None)])
def test_splash_on_each_shard_equals_dense_in_values_and_gradients(layout, heads, window):
    """Under a mesh the kernel runs on each device's shard (a Pallas kernel cannot be partitioned
    automatically): batch over data x fsdp, heads over tensor where they divide (3 heads stay whole
    on tensor=2, so their gradients are summed right). Pallas interpreter on the 8 CPU devices."""
    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
    mesh = sharding.mesh_for(layout)
    q, k, v = random_qkv(4, 128, heads, 64)
    splash = functools.partial(attn._splash_attention, interpret=True)
    with sharding.sharding_context(mesh):
        assert attn._shard_spec(q.shape, mesh.abstract_mesh) == (
            P(("fsdp",), None, None, None) if heads == 3 else P(("data",), None, ("tensor",), None)
        )
        sharded = [jax.device_put(x, sharding.batch_sharding(mesh)) for x in (q, k, v)]
        actual = value_and_grads(splash, *sharded, window=window)
    expected = value_and_grads(attn.dense_attention, q, k, v, window=window)
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        assert relative_error(a, e) <= 1e-5, name


def test_splash_needs_the_mesh_of_a_program_over_several_devices(monkeypatch):
    """A Pallas kernel in a multi-device program must run under shard_map, which needs the mesh:
    without one, on a host of 8 TPU chips (pretended here), splash is not chosen and says why."""
    monkeypatch.setattr(attn, "target_device", lambda: ("tpu", "TPU v5 lite"))
    q = jax.ShapeDtypeStruct((8, 256, 4, 64), jnp.bfloat16)
    assert attn.choose_implementation(q, window=64) == "banded"
    with pytest.raises(ValueError, match="splash outside a mesh runs on one device, and there are 8"):
        attn.attention(q, q, q, implementation="splash")
    with jax.set_mesh(sharding.mesh_for("fsdp")):
        assert attn.choose_implementation(q, window=64) == "splash"


def test_banded_memory_grows_linearly_with_length():
    """Compiled temp memory of forward+backward: banded is O(T·w), dense O(T²)."""

    def temp_bytes(fn, length, window=64):
        q, k, v = random_qkv(1, length, 2, 16)
        loss = lambda q, k, v: fn(q, k, v, window=window).sum()
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    banded_1k, banded_2k = temp_bytes(attn.banded_attention, 1024), temp_bytes(attn.banded_attention, 2048)
    dense_2k = temp_bytes(attn.dense_attention, 2048)
    assert banded_2k < 2.5 * banded_1k
    assert banded_2k * 8 < dense_2k  # ideal ratio T / 2w = 16


def test_automatic_choice_on_cpu():
    q = jnp.zeros((1, 1024, 2, 8))
    assert attn.choose_implementation(q, window=128) == "banded"
    assert attn.choose_implementation(q, window=512) == "dense"
    assert attn.choose_implementation(q, window=None) == "dense"
    assert attn.choose_implementation(q, causal=False) == "dense"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(window=0), "window must be >= 1"),
        (dict(window=4, causal=False), "causal attention only"),
        (dict(implementation="flash"), "unknown implementation"),
        (dict(implementation="cudnn"), "cannot run here"),
        (dict(implementation="banded"), "cannot run here"),
        (dict(key_mask=jnp.ones((2, 5), bool)), "key_mask must have shape"),
    ],
)
def test_bad_arguments_get_clear_errors(kwargs, message):
    q, k, v = random_qkv(2, 9, 2, 8)
    with pytest.raises(ValueError, match=message):
        attn.attention(q, k, v, **kwargs)


def test_mismatched_shapes_get_clear_errors():
    q, k, v = random_qkv(2, 9, 2, 8)
    with pytest.raises(ValueError, match=r"expected q \[B, T, H, D\]"):
        attn.attention(q, k[:, :, :1], v)
