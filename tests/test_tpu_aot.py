"""Programs compiled ahead of time for TPU chips are the programs a TPU would run: attention
follows the target devices (the splash kernel, each device on its own shard of batch and heads),
not the CPU host that compiles them. Needs libtpu (the `tpu` extra), no TPU."""

import importlib.util
import re

import jax
import jax.numpy as jnp
import pytest

from zoo import bench, configs, sharding
from zoo.nn import dot_product_attention as attn

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="AOT compilation for TPU topologies needs libtpu: pip install 'zoo[tpu]'",
)

MOSAIC = bench.MOSAIC_KERNEL
LENGTH = 256


def tiny_gpt(**overrides) -> configs.GPTConfig:
    sizes = dict(num_layers=2, d_model=128, num_heads=4, d_ff=256, vocab_size=512, context_length=LENGTH)
    return configs.gpt("gpt2-small", **(sizes | overrides))


def compiled_text(cfg: configs.GPTConfig, layout: str) -> str:
    step = bench.compile_train_step(cfg, layout, batch=8, devices=bench.topology_devices("v5e:2x2"))
    return step.compiled.as_text()


def gathers_of_the_sequence(hlo: str, head_dim: int) -> list[str]:
    """All-gathers whose result holds a whole [.., length, .., head_dim] activation (q, k or v)."""
    gathers = [line for line in hlo.splitlines() if re.search(r"\ball-gather(-start)?\(", line)]
    return [
        line
        for line in gathers
        if any(
            {LENGTH, head_dim} <= {int(d) for d in dims.split(",") if d}
            for dims in re.findall(r"\[([\d,]*)\]", line.split("=", 1)[1].split("all-gather")[0])
        )
    ]


def test_gpt_train_step_for_tpu_runs_splash_on_each_shard():
    """Data parallel; the next test covers FSDP with tensor parallelism (each compile is ~40 s on 2 cores)."""
    cfg = tiny_gpt()
    hlo = compiled_text(cfg, "dp")
    assert MOSAIC in hlo
    assert not gathers_of_the_sequence(hlo, cfg.head_dim)


def test_banded_layers_and_gpt3_2_7b_head_dim_compile_to_splash():
    """GPT-3's (dense, banded) pair, at gpt3-2.7b's head dim of 80, under FSDP and tensor parallelism."""
    base = configs.gpt("gpt3-2.7b")
    cfg = tiny_gpt(d_model=4 * base.head_dim, attention_pattern=base.attention_pattern, window=128)
    assert cfg.head_dim == 80
    hlo = compiled_text(cfg, "fsdp_tp")
    assert hlo.count(MOSAIC) >= 2 * 2  # forward and backward kernels of both layer kinds
    assert not gathers_of_the_sequence(hlo, cfg.head_dim)


def test_the_choice_follows_the_mesh_devices_not_the_host():
    q = jax.ShapeDtypeStruct((8, LENGTH, 4, 64), jnp.bfloat16)
    assert attn.choose_implementation(q) == "dense"  # no mesh: the CPU host's devices
    with jax.set_mesh(sharding.mesh_for("fsdp", bench.topology_devices("v5e:2x2"))):
        assert attn.target_device()[0] == "tpu"
        assert attn.choose_implementation(q) == "splash"
        assert attn.choose_implementation(q, window=64) == "splash"
        untileable = jax.ShapeDtypeStruct((8, 200, 4, 64), jnp.bfloat16)  # tiles are multiples of 128
        assert attn.choose_implementation(untileable, window=64) == "banded"
        with pytest.raises(ValueError, match="splash needs a length that is a multiple of 128, got 200"):
            attn.attention(untileable, untileable, untileable, implementation="splash")
