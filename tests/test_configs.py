"""Presets carry the papers' numbers; bad configs fail early with errors that name the field."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo import configs


def param_count(model: nn.Module, example: jax.ShapeDtypeStruct) -> int:
    """Parameters counted from abstract shapes: nothing is allocated."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), example)
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(nn.unbox(shapes["params"])))


@pytest.mark.parametrize("name", list(configs.GPT_PAPER_PARAMS))
def test_gpt_presets_match_paper_param_counts(name):
    count = param_count(zoo.GPT(configs.gpt(name)), jax.ShapeDtypeStruct((1, 8), jnp.int32))
    assert abs(count / configs.GPT_PAPER_PARAMS[name] - 1) <= 0.02


@pytest.mark.parametrize("name", list(configs.VIT_PAPER_PARAMS))
def test_vit_presets_match_paper_param_counts(name):
    count = param_count(zoo.ViT(configs.vit(name)), jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    assert abs(count / configs.VIT_PAPER_PARAMS[name] - 1) <= 0.02


def test_every_vit_size_and_patch_is_a_preset():
    assert set(configs.VIT_PRESETS) == {f"vit-{s}/{p}" for s in ("ti", "s", "b", "l", "h") for p in (14, 16, 32)}


def test_gpt_family_differences_are_config():
    gpt1, gpt2, gpt3 = configs.gpt("gpt1"), configs.gpt("gpt2-small"), configs.gpt("gpt3-small")
    assert (gpt1.norm_position, gpt1.final_norm, gpt1.context_length) == ("post", False, 512)
    assert (gpt2.norm_position, gpt2.final_norm, gpt2.context_length) == ("pre", True, 1024)
    assert gpt2.activation == "gelu_tanh"
    assert gpt2.attention_pattern == ("dense",)
    assert gpt3 == dataclasses.replace(gpt2, context_length=2048, attention_pattern=("dense", "banded"), window=256)


def test_gpt3_table_inconsistencies_resolved_by_d_head():
    """SPEC.md: xl keeps d_model 2048 with 16 heads of 128; 13b uses d_model 5120 = 40 x 128."""
    xl, big = configs.gpt("gpt3-xl"), configs.gpt("gpt3-13b")
    assert (xl.d_model, xl.num_heads, xl.head_dim) == (2048, 16, 128)
    assert (big.d_model, big.num_heads, big.head_dim) == (5120, 40, 128)


def test_overrides_replace_fields():
    cfg = configs.gpt("gpt3-small", dtype="bfloat16", window=128)
    assert (cfg.dtype, cfg.window, cfg.num_layers) == ("bfloat16", 128, 12)
    assert configs.vit("vit-b/16", num_classes=10, image_size=32).image_size == (32, 32)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown preset 'gpt4'.*gpt2-small.*gpt3-175b"):
        configs.gpt("gpt4")
    with pytest.raises(ValueError, match=r"valid presets: vit-ti/14"):
        configs.vit("vit-b/8")


def test_unknown_override_suggests_near_matches():
    with pytest.raises(ValueError, match="no field 'num_layer'; did you mean num_layers"):
        configs.gpt("gpt2-small", num_layer=2)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(d_model=100, num_heads=3), "num_heads=3 does not divide d_model=100"),
        (dict(window=0), "window=0 must be >= 1"),
        (dict(attention_pattern=("dense", "banded"), window=2048), "window=2048 is larger than context_length=1024"),
        (dict(attention_pattern=("dense", "banded"), num_layers=3), "num_layers=3 is not a multiple"),
        (dict(attention_pattern=("dense", "sparse")), "attention_pattern="),
        (dict(norm_position="middle"), "norm_position='middle'"),
        (dict(activation="relu"), "activation='relu'"),
        (dict(dtype="float42"), "dtype='float42'"),
        (dict(remat="some"), "remat='some'"),
        (dict(scan_unroll=0), "scan_unroll=0 must be >= 1"),
    ],
)
def test_bad_gpt_configs_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        cfg = zoo.GPTConfig(**fields)
        zoo.GPT(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(image_size=30, patch_size=16), r"patch_size=16 must divide image_size=\(30, 30\)"),
        (dict(pooling="max"), "pooling='max'"),
        (dict(d_model=64, num_heads=5), "num_heads=5 does not divide d_model=64"),
    ],
)
def test_bad_vit_configs_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        zoo.ViTConfig(**fields)


@pytest.mark.parametrize(
    "assignment, message",
    [
        ("num_layers=two", r"GPTConfig\.num_layers='two': expected int, got str"),
        ("dropout=abc", r"GPTConfig\.dropout='abc': expected float, got str"),
        ("window=abc", r"GPTConfig\.window='abc': expected int, got str"),
        ("num_layers=2.5", r"GPTConfig\.num_layers=2\.5: expected int, got float"),
        ("num_layers=True", r"GPTConfig\.num_layers=True: expected int, got bool"),
        ("final_norm=1", r"GPTConfig\.final_norm=1: expected bool, got int"),
        ("attention_pattern=dense", r"GPTConfig\.attention_pattern='dense': expected tuple\[str, \.\.\.\], got str"),
        ("attention_pattern=('dense', 2)", r"expected tuple\[str, \.\.\.\]"),
        ("attention_impl=3", r"GPTConfig\.attention_impl=3: expected str \| None, got int"),
    ],
)
def test_overrides_of_the_wrong_type_name_field_value_and_type(assignment, message):
    with pytest.raises(TypeError, match=message):
        configs.override(configs.gpt("gpt2-small"), [assignment])


def test_overrides_accept_what_the_field_types_allow():
    cfg = configs.override(
        configs.gpt("gpt2-small"),
        [
            "dropout=0",
            "num_layers=6",
            "dtype=bfloat16",
            "final_norm=False",
            "attention_impl=None",
            "attention_pattern=['dense', 'banded']",
            "window=8",
        ],
    )
    assert (cfg.dropout, cfg.num_layers, cfg.dtype, cfg.final_norm, cfg.attention_impl) == (
        0.0,
        6,
        "bfloat16",
        False,
        None,
    )
    assert isinstance(cfg.dropout, float) and cfg.attention_pattern == ("dense", "banded")
    assert configs.override(configs.vit("vit-b/16"), ["image_size=32"]).image_size == (32, 32)  # a square
    assert configs.override(configs.vit("vit-b/16"), ["image_size=(32, 48)"]).image_size == (32, 48)
    with pytest.raises(TypeError, match=r"ViTConfig\.image_size='big': expected tuple\[int, int\], got str"):
        configs.override(configs.vit("vit-b/16"), ["image_size=big"])


def test_keyword_overrides_are_type_checked_too():
    with pytest.raises(TypeError, match=r"GPTConfig\.num_heads='4': expected int, got str"):
        configs.gpt("gpt2-small", num_heads="4")
