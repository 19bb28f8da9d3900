"""Training pieces: the next-token loss, the papers' recipes and their optimizer, and a step that learns."""

import dataclasses
import json
import math
import pathlib
import re
import runpy
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import zoo
from zoo import experiment
from zoo.train import adamw, eval_step_fn, next_token_loss, train_state, train_step_fn
from zoo.train.recipes import Recipe, decayed, recipe

CFG = zoo.GPTConfig(vocab_size=13, context_length=8, num_layers=2, d_model=16, num_heads=2, d_ff=32, dropout=0.0)
GPT3_STYLE = dataclasses.replace(CFG, attention_pattern=("dense", "banded"), window=4)
GPT1_STYLE = zoo.configs.gpt("gpt1", vocab_size=13, context_length=8, num_layers=2, d_model=16, num_heads=2, d_ff=32)
VIT = zoo.ViTConfig(
    image_size=8, patch_size=4, num_channels=1, num_classes=3, num_layers=2, d_model=16, num_heads=2, d_ff=32
)
ROOT = pathlib.Path(__file__).resolve().parent.parent
KERNELS = ("attn/qkv/kernel", "attn/out/kernel", "mlp/up/kernel", "mlp/down/kernel")


class Successor(nn.Module):
    """Logits log(V - 1) on the token after each input token (mod V), 0 elsewhere: p(successor) = 1/2."""

    vocab_size: int

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.log(self.vocab_size - 1.0) * jax.nn.one_hot((tokens + 1) % self.vocab_size, self.vocab_size)


def test_the_loss_scores_each_position_against_the_next_token():
    """Rows that count up by one: predicting token t+1 from tokens up to t costs exactly log 2 per token;
    a target off by a position costs log(2(V-1)) there instead."""
    tokens = (jnp.arange(9)[None, :] + jnp.asarray([[0], [5], [11]])) % 13  # wraps around the vocabulary
    np.testing.assert_allclose(next_token_loss(Successor(13), {}, tokens), np.log(2), rtol=1e-6)


def param_shapes(model: nn.Module, example: jax.Array) -> dict:
    """The model's parameter tree (scanned layers stacked on a leading axis), as shapes."""
    return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), example)["params"])


def gpt_shapes(cfg: zoo.GPTConfig) -> dict:
    return param_shapes(zoo.GPT(cfg), jnp.zeros((1, cfg.context_length), jnp.int32))


@pytest.mark.parametrize(
    "shapes, expected",
    [
        (
            lambda: gpt_shapes(GPT3_STYLE),  # a scanned (dense, banded) pair: block_0 and block_1
            {"token_embed/embedding", *(f"layers/block_{i}/{k}" for i in (0, 1) for k in KERNELS)},
        ),
        (
            lambda: gpt_shapes(GPT1_STYLE),  # post-LN, no final LN: the LN scales sit in the scanned block
            {"token_embed/embedding", *(f"layers/block_0/{k}" for k in KERNELS)},
        ),
        (
            lambda: param_shapes(zoo.ViT(VIT), jnp.zeros((1, 8, 8, 1))),
            {"patch_embed/kernel", "head/kernel", *(f"layers/block/{k}" for k in KERNELS)},
        ),
    ],
    ids=["gpt3-style", "gpt1-style", "vit"],
)
def test_weight_decay_hits_kernels_and_token_embeddings_only(shapes, expected):
    """Not biases, LN scales and offsets, position embeddings or the class token, though scanning
    gives every one of them a layers axis (their rank says nothing)."""
    flat = traverse_util.flatten_dict(decayed(shapes()), sep="/")
    assert {path for path, decays in flat.items() if decays} == expected


def test_a_decayed_step_shrinks_kernels_by_lr_times_decay_and_leaves_norms_and_biases_alone():
    block = gpt_shapes(GPT3_STYLE)["layers"]["block_1"]  # stacked: the LN scale is [layers, d_model]
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), {"mlp": block["mlp"], "mlp_norm": block["mlp_norm"]})
    opt = adamw(learning_rate=0.1, total_steps=10, warmup_steps=0, weight_decay=0.5)
    updates, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    after = optax.apply_updates(params, updates)
    np.testing.assert_allclose(after["mlp"]["up"]["kernel"], 1 - 0.1 * 0.5, rtol=1e-6)
    for untouched in (after["mlp_norm"]["scale"], after["mlp_norm"]["bias"], after["mlp"]["up"]["bias"]):
        np.testing.assert_array_equal(untouched, 1)


def cosine(peak: float, warmup: int, horizon: int, final: float, step: int) -> float:
    """The warm-up-then-cosine learning rate, by hand."""
    if step < warmup:
        return peak * step / warmup
    progress = min(step, horizon) - warmup
    return peak * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress / (horizon - warmup))))


def test_gpt3_recipe_warms_up_over_375m_tokens_then_decays_to_a_tenth_at_260b_and_stays():
    r = recipe("gpt3-xl", batch=1000, steps=300_000, context_length=1000)  # 1M tokens a step
    assert (r.warmup_steps, r.decay_steps, r.betas, r.weight_decay, r.clip_norm) == (
        375,
        260_000,
        (0.9, 0.95),
        0.1,
        1.0,
    )
    lr = r.schedule()
    for step, expected in [
        (0, 0.0),
        (150, 2e-4 * 150 / 375),
        (375, 2e-4),
        (260_000, 2e-5),
        (280_000, 2e-5),
        (300_000, 2e-5),
    ]:
        np.testing.assert_allclose(lr(step), expected, rtol=1e-5, atol=1e-12, err_msg=f"step {step}")
    for step in (10_000, 130_187, 259_000):
        np.testing.assert_allclose(lr(step), cosine(2e-4, 375, 260_000, 0.1, step), rtol=1e-5, err_msg=f"step {step}")


def test_gpt3_recipe_horizons_follow_the_batch_and_context_in_use():
    assert recipe("gpt3-small", batch=250, steps=1, context_length=2048).decay_steps == round(260e9 / 512_000)
    assert recipe("gpt3-small", batch=500, steps=1, context_length=1024).warmup_steps == round(375e6 / 512_000)
    assert recipe("gpt3-small", batch=500, steps=1, context_length=512).warmup_steps == round(375e6 / 256_000)


def test_gpt1_recipe_is_adam_with_decoupled_decay_and_a_cosine_to_zero_at_the_end():
    r = recipe("gpt1", batch=64, steps=10_000)
    assert (r.learning_rate, r.warmup_steps, r.decay_steps, r.weight_decay) == (2.5e-4, 2000, 10_000, 0.01)
    lr = r.schedule()
    np.testing.assert_allclose([lr(0), lr(2000), lr(6000), lr(10_000)], [0, 2.5e-4, 1.25e-4, 0], atol=1e-10)


def test_gpt2_and_vit_recipes():
    gpt2 = recipe("gpt2-medium", batch=512, steps=100_000, context_length=1024)
    assert (gpt2.learning_rate, gpt2.warmup_steps, gpt2.decay_steps, gpt2.final_lr_fraction) == (
        3e-4,
        2000,
        100_000,
        0.1,
    )
    vit = recipe("vit-imagenet", batch=1024, steps=50_000)
    assert (vit.learning_rate, vit.warmup_steps, vit.weight_decay, vit.betas) == (7.5e-4, 10_000, 0.3, (0.9, 0.999))
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe("gpt4", batch=1, steps=1)


def test_recipe_flags_change_only_what_they_name(tmp_path):
    base = recipe("gpt2-small", batch=8, steps=5000)
    args = experiment.parser("", workdir=str(tmp_path), steps=5000, batch=8).parse_args(
        ["--lr", "1e-3", "--weight-decay", "0.2", "--betas", "0.8", "0.9"]
    )
    assert experiment.recipe_from_flags(args, base) == dataclasses.replace(
        base, learning_rate=1e-3, weight_decay=0.2, betas=(0.8, 0.9)
    )


def test_a_longer_resumed_run_keeps_the_saved_horizon_then_stays_flat(tmp_path):
    """`--steps 10` then `--steps 20` in the same workdir: the second run's recipe would re-stretch
    the cosine over 20 steps (its lr jumping back up at step 10); it keeps the first one's."""
    first = Recipe(2e-3, warmup_steps=1, decay_steps=10, final_lr_fraction=0.1, weight_decay=0.1, betas=(0.9, 0.95))
    (tmp_path / "config.json").write_text(json.dumps({"recipe": dataclasses.asdict(first)}))
    longer = dataclasses.replace(first, warmup_steps=2, decay_steps=20)  # what the experiment builds for 20 steps
    parse = experiment.parser("", workdir=str(tmp_path), steps=20, batch=2).parse_args
    resumed = experiment.recipe_from_flags(parse(["--steps", "20"]), longer)
    assert resumed == first
    lr = [float(resumed.schedule()(step)) for step in range(8, 20)]
    np.testing.assert_allclose(lr[:3], [cosine(2e-3, 1, 10, 0.1, step) for step in (8, 9, 10)], rtol=1e-5)
    np.testing.assert_allclose(lr[2:], 2e-4, rtol=1e-5)  # flat from the horizon on
    assert experiment.recipe_from_flags(parse(["--decay-steps", "20"]), longer).decay_steps == 20
    assert experiment.recipe_from_flags(parse([]), longer) == first
    (tmp_path / "config.json").unlink()
    assert experiment.recipe_from_flags(parse([]), longer) == longer  # a fresh run takes the experiment's


def test_gpt3_experiment_derives_its_batch_from_the_context_after_overrides(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["gpt3.py", "--preset", "gpt3-small", "--set", "context_length=500", "--help"])
    with pytest.raises(SystemExit):
        runpy.run_path(str(ROOT / "experiments" / "gpt3.py"), run_name="__main__")
    help_text = capsys.readouterr().out  # 0.5M tokens a step (Table 2.1) at the overridden context of 500
    assert re.search(r"--batch BATCH\s+global batch size in rows \(default\s+1000\)", help_text), help_text


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
    # the 30th update used the lr of step 29: past the 2-step warm-up, near the end of the cosine to 10%
    np.testing.assert_allclose(metrics["lr"], cosine(1e-2, 2, 30, 0.1, 29), rtol=1e-6)


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


def test_metrics_writer_starts_without_importing_pytorch(tmp_path):
    """tensorboardX imports torch where it is installed (2.5 s); a run's TensorBoard writer does not."""
    code = (
        "import sys; from zoo.train.metrics import MetricsWriter; "
        f"MetricsWriter({str(tmp_path)!r}, enabled=True).write(1, {{'loss': 1.0}}); "
        "assert 'tensorboardX' in sys.modules and 'torch' not in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
