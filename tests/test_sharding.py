"""Sharding: meshes from layout strings, the rules table, sharded init and optimizer state, and
a sharded train step that matches one device on every layout, over the 8 simulated CPU devices."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import zoo
from zoo import sharding
from zoo.sharding import LAYOUTS, RULES
from zoo.train import adamw, next_token_loss, train_state, train_step_fn

CFG = zoo.GPTConfig(
    vocab_size=64,
    context_length=16,
    num_layers=2,
    d_model=32,
    num_heads=8,  # so that tensor=8 divides the heads
    d_ff=64,
    attention_pattern=("dense", "banded"),
    window=4,
    dropout=0.0,
)
STEPS = 3
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, (8, CFG.context_length + 1)).astype(np.int32)

# Spec and per-device shard shape of the MLP up kernel [layers=1, embed=32, mlp=64] per layout.
UP_KERNEL = {
    "dp": (P(None, None, None), (1, 32, 64)),
    "fsdp": (P(None, "fsdp", None), (1, 4, 64)),
    "tp": (P(None, None, "tensor"), (1, 32, 8)),
    "fsdp_tp": (P(None, "fsdp", "tensor"), (1, 8, 32)),
    "dp_tp": (P(None, None, "tensor"), (1, 32, 32)),
}


def init_params(rng, tokens):
    return zoo.GPT(CFG).init(rng, tokens)["params"]


def optimizer():
    return adamw(1e-3, total_steps=10, warmup_steps=0)


def step_fn():
    return train_step_fn(zoo.GPT(CFG), optimizer(), next_token_loss)


def shardings_for(mesh):
    return sharding.logical_shardings(jax.eval_shape(init_params, jax.random.key(0), TOKENS[:, :-1]), mesh)


@pytest.fixture(scope="module")
def reference():
    """Initial params, losses and final params of STEPS unsharded steps on one device."""
    tokens = jax.device_put(TOKENS, jax.devices()[0])
    params = nn.unbox(jax.jit(init_params)(jax.random.key(0), tokens[:, :-1]))
    initial = jax.tree.map(np.asarray, params)
    state, step = train_state(params, optimizer(), jax.random.key(0)), jax.jit(step_fn())
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, tokens)
        losses.append(float(metrics["loss"]))
    params = state["params"]
    return initial, losses, jax.tree.map(np.asarray, params)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_trains_like_one_device(layout, reference):
    initial, ref_losses, ref_params = reference
    mesh = sharding.mesh_for(layout)
    param_shardings = shardings_for(mesh)
    params = jax.device_put(initial, param_shardings)
    opt_state, opt_shardings = sharding.init_optimizer_sharded(optimizer(), params, param_shardings, mesh)
    replicated = jax.sharding.NamedSharding(mesh, P())
    state_shardings = {"params": param_shardings, "opt_state": opt_shardings, "step": replicated, "rng": replicated}
    step = sharding.jit_sharded(
        step_fn(),
        mesh,
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
    state = {**train_state(params, optimizer(), jax.random.key(0)), "opt_state": opt_state}
    tokens = sharding.shard_batch(TOKENS, mesh)
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, tokens)
        losses.append(float(metrics["loss"]))
    params = state["params"]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-5), params, ref_params)
    assert jax.tree.map(lambda a: a.sharding, params) == param_shardings


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_params_and_optimizer_state_are_sharded_as_the_rules_say(layout, reference):
    mesh = sharding.mesh_for(layout)
    param_shardings = shardings_for(mesh)
    params = jax.device_put(reference[0], param_shardings)
    opt_state, _ = sharding.init_optimizer_sharded(optimizer(), params, param_shardings, mesh)
    spec, shard_shape = UP_KERNEL[layout]
    for tree in (params, optax.tree_utils.tree_get(opt_state, "mu")):
        kernel = tree["layers"]["block_0"]["mlp"]["up"]["kernel"]
        assert kernel.sharding.spec == spec
        assert {shard.data.shape for shard in kernel.addressable_shards} == {shard_shape}
    scalars = [leaf for leaf in jax.tree.leaves(opt_state) if leaf.ndim == 0]
    assert scalars and all(leaf.sharding.is_fully_replicated for leaf in scalars)
    replicated = [leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(params)]
    assert all(replicated) == (layout == "dp")


def test_sharded_init_builds_the_same_params_in_their_shards(reference):
    mesh = sharding.mesh_for("fsdp_tp")
    tokens = sharding.shard_batch(TOKENS, mesh)
    params, param_shardings = sharding.init_sharded(init_params, mesh, jax.random.key(0), tokens[:, :-1])
    assert param_shardings == shardings_for(mesh)
    assert jax.tree.map(lambda a: a.sharding, params) == param_shardings
    assert param_shardings["token_embed"]["embedding"].spec == P("tensor", "fsdp")  # [vocab, embed]
    qkv = param_shardings["layers"]["block_1"]["attn"]["qkv"]["kernel"]  # [layers, embed, 3, heads, head_dim]
    assert qkv.spec == P(None, "fsdp", None, "tensor", None)
    jax.tree.map(np.testing.assert_array_equal, params, reference[0])


def test_activations_shard_batch_but_never_embed():
    # batch takes ("data", "fsdp") first, so embed finds fsdp used and stays unsharded
    assert nn.logical_to_mesh_axes(("batch", "length", "embed"), RULES) == P(("data", "fsdp"), None, None)
    assert nn.logical_to_mesh_axes(("embed", "mlp"), RULES) == P("fsdp", "tensor")
    mesh = sharding.mesh_for("fsdp")
    double = sharding.jit_sharded(lambda x: nn.with_logical_constraint(2 * x, ("batch", "length", "embed")), mesh)
    out = double(jnp.ones((8, 4, 16)))
    assert {shard.data.shape for shard in out.addressable_shards} == {(1, 4, 16)}


@pytest.mark.parametrize("layout, rows", [("dp", 1), ("fsdp", 1), ("tp", 8), ("fsdp_tp", 2), ("dp_tp", 2)])
def test_batch_rows_split_over_data_and_fsdp(layout, rows):
    mesh = sharding.mesh_for(layout)
    batch = sharding.shard_batch({"tokens": TOKENS}, mesh)["tokens"]
    assert {shard.data.shape for shard in batch.addressable_shards} == {(rows, TOKENS.shape[1])}
    np.testing.assert_array_equal(np.asarray(batch), TOKENS)


def test_mesh_from_string_fills_in_the_remaining_devices():
    mesh = sharding.mesh_from_string("data=2,tensor=-1")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3
    assert dict(sharding.mesh_for("fsdp=2,tensor=2", jax.devices()[:4]).shape) == {"data": 1, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("data=2,fsdp=2", "data=2 x fsdp=2 x tensor=1 = 4 devices, but there are 8 devices"),
        ("data=2,pipeline=4", "unknown axis 'pipeline'; valid axes are ('data', 'fsdp', 'tensor')"),
        ("data=-1,fsdp=-1", "only one axis may be -1"),
        ("data=-1,tensor=3", "do not divide the 8 devices"),
        ("data=2,tensor", "malformed item 'tensor'"),
        ("data=2,data=4", "given twice"),
        ("nope", "unknown layout 'nope'; choose one of"),
    ],
)
def test_bad_mesh_specs_are_explained(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        sharding.mesh_for(spec)


def test_initialize_distributed(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args: calls.append(args))
    sharding.initialize_distributed()  # a CPU machine, one process
    sharding.initialize_distributed("10.0.0.1:1234", 1, 0)
    assert calls == []
    sharding.initialize_distributed("10.0.0.1:1234", 2, 1)
    assert calls == [("10.0.0.1:1234", 2, 1)]
    with pytest.raises(ValueError, match="together"):
        sharding.initialize_distributed("10.0.0.1:1234")
