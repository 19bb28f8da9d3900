"""LoRA and prompt tuning on params pytrees: the adapted model starts as the base model, computes
what its merged params compute, trains only what it should, and shards like its kernels."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo import adaptation, sharding
from zoo.adaptation import lora, prompt
from zoo.models.gpt import GPT, GPTConfig
from zoo.models.vit import ViT, ViTConfig
from zoo.train import recipes
from zoo.train.steps import classification_loss, next_token_loss, train_state, train_step_fn

CFG = GPTConfig(
    vocab_size=64, context_length=16, num_layers=2, d_model=32, num_heads=4, d_ff=64, dropout=0.0,
    attention_pattern=("dense", "banded"), window=4,
)  # fmt: skip
ALL = r"attn/(qkv|out)|mlp/(up|down)"


@pytest.fixture(scope="module")
def gpt():
    model = GPT(CFG)
    tokens = jax.random.randint(jax.random.key(1), (2, CFG.context_length + 1), 0, CFG.vocab_size)
    return model, nn.unbox(model.init(jax.random.key(0), tokens[:, :-1])["params"]), tokens


def randomised(adapters, seed=5):
    """Adapters with B non-zero too (a trained adapter), so merged-vs-unmerged can differ."""
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    modules = jax.tree.map(lambda x: 0.1 * jax.random.normal(next(keys), x.shape), adapters["modules"])
    return {**adapters, "modules": modules}


def test_adapters_stack_over_the_scanned_layers_with_rank_inner_axes(gpt):
    _, params, _ = gpt
    adapters = lora.init(params, jax.random.key(2), rank=3, alpha=6.0, targets=ALL)
    block = adapters["modules"]["layers"]["block_0"]
    assert block["attn"]["qkv"]["a"].shape == (1, 32, 3)
    assert block["attn"]["qkv"]["b"].shape == (1, 3, 3, 4, 8)
    assert block["attn"]["out"]["a"].shape == (1, 4, 8, 3)
    assert block["attn"]["out"]["b"].shape == (1, 3, 32)
    assert block["mlp"]["up"]["b"].shape == (1, 3, 64)
    assert float(adapters["scale"]) == 2.0
    assert not np.any(np.asarray(block["mlp"]["down"]["b"]))


def test_at_init_the_adapted_model_is_the_base_model_exactly(gpt):
    model, params, tokens = gpt
    adapters = lora.init(params, jax.random.key(2), rank=4, targets=ALL)
    base = model.apply({"params": params}, tokens[:, :-1])
    np.testing.assert_array_equal(model.apply({"params": lora.inject(params, adapters)}, tokens[:, :-1]), base)
    np.testing.assert_array_equal(model.apply({"params": lora.merge(params, adapters)}, tokens[:, :-1]), base)


def test_unmerged_adapters_compute_what_the_merged_kernels_compute(gpt):
    model, params, tokens = gpt
    adapters = randomised(lora.init(params, jax.random.key(2), rank=4, targets=ALL))
    unmerged = model.apply({"params": lora.inject(params, adapters)}, tokens[:, :-1])
    merged = model.apply({"params": lora.merge(params, adapters)}, tokens[:, :-1])
    base = model.apply({"params": params}, tokens[:, :-1])
    assert np.abs(np.asarray(unmerged - base)).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(unmerged, merged, atol=1e-5)


def test_merge_adds_scale_times_a_b_to_the_kernel(gpt):
    _, params, _ = gpt
    adapters = randomised(lora.init(params, jax.random.key(2), rank=2, alpha=3.0, targets=r"block_1/mlp/up"))
    factors = adapters["modules"]["layers"]["block_1"]["mlp"]["up"]
    kernel = params["layers"]["block_1"]["mlp"]["up"]["kernel"]
    expected = np.asarray(kernel) + 1.5 * np.einsum("lir,lro->lio", factors["a"], factors["b"])
    merged = lora.merge(params, adapters)
    np.testing.assert_allclose(merged["layers"]["block_1"]["mlp"]["up"]["kernel"], expected, rtol=1e-5, atol=1e-7)
    untouched = merged["layers"]["block_0"]["mlp"]["up"]["kernel"]
    np.testing.assert_array_equal(untouched, params["layers"]["block_0"]["mlp"]["up"]["kernel"])


def test_targets_must_name_adaptable_kernels(gpt):
    _, params, _ = gpt
    with pytest.raises(ValueError, match="matches no kernel"):
        lora.init(params, jax.random.key(0), targets=r"attention/query")
    with pytest.raises(ValueError, match="cannot adapt: token_embed"):
        lora.init({"token_embed": {"kernel": jnp.zeros((4, 4))}}, jax.random.key(0), targets="token")


def adamw_on(mask):
    return adaptation.train_only(recipes.optimizer(recipes.Recipe(1e-2, 0, 10, 0.1, 0.1, (0.9, 0.95))), mask)


def lora_step(model, params, adapters, loss_fn, trainable_base=None):
    """One compiled AdamW step on {"base", "lora"} with only the adapters (and `trainable_base`) training."""
    both = {"base": params, "lora": adapters}
    base_mask = jax.tree.map(lambda _: False, params) if trainable_base is None else trainable_base
    mask = {"base": base_mask, "lora": lora.trainable(adapters)}
    optimizer = adamw_on(mask)
    step = jax.jit(train_step_fn(model, optimizer, adaptation.frozen(lora.loss(loss_fn), mask)))
    return optimizer, step, train_state(both, optimizer, jax.random.key(0))


def test_a_training_step_changes_only_the_adapters_and_keeps_no_moments_for_the_base(gpt):
    model, params, tokens = gpt
    adapters = lora.init(params, jax.random.key(2), rank=4, targets=ALL)
    _, step, state = lora_step(model, params, adapters, next_token_loss)
    for _ in range(3):
        state, metrics = step(state, tokens)
    assert np.isfinite(metrics["loss"])
    jax.tree.map(np.testing.assert_array_equal, state["params"]["base"], params)
    np.testing.assert_array_equal(state["params"]["lora"]["scale"], adapters["scale"])
    b = state["params"]["lora"]["modules"]["layers"]["block_0"]["attn"]["qkv"]["b"]
    assert np.abs(np.asarray(b)).max() > 0
    moments = lora.count(state["opt_state"])
    assert lora.count(adapters["modules"]) * 2 <= moments < lora.count(adapters["modules"]) * 2 + 64
    # after training, merged and unmerged still agree
    trained = state["params"]["lora"]
    unmerged = model.apply({"params": lora.inject(params, trained)}, tokens[:, :-1])
    merged = model.apply({"params": lora.merge(params, trained)}, tokens[:, :-1])
    np.testing.assert_allclose(unmerged, merged, atol=1e-5)


def test_adapters_shard_like_their_kernels_on_the_8_device_mesh(gpt):
    model, _, tokens = gpt
    mesh = sharding.mesh_for("fsdp_tp")
    boxed = jax.eval_shape(lambda key: model.init(key, tokens[:, :-1])["params"], jax.random.key(0))
    adapters = jax.eval_shape(lambda key: lora.init(boxed, key, rank=4, targets=ALL), jax.random.key(1))
    shardings = sharding.logical_shardings({"base": boxed, "lora": adapters}, mesh)
    kernel = shardings["base"]["layers"]["block_0"]["attn"]["qkv"]["kernel"].spec
    a = shardings["lora"]["modules"]["layers"]["block_0"]["attn"]["qkv"]["a"].spec
    b = shardings["lora"]["modules"]["layers"]["block_0"]["attn"]["qkv"]["b"].spec
    assert any(kernel) and tuple(a) == (*tuple(kernel)[:2], None)[: len(a)]
    assert tuple(b)[2:] == tuple(kernel)[2:] and tuple(b)[:1] == tuple(kernel)[:1]
    down = shardings["lora"]["modules"]["layers"]["block_1"]["mlp"]["down"]
    assert down["a"].spec[:2] == shardings["base"]["layers"]["block_1"]["mlp"]["down"]["kernel"].spec[:2]


def test_lora_on_vit_trains_the_adapters_and_the_new_head():
    cfg = ViTConfig(
        image_size=8, patch_size=4, num_channels=1, num_classes=3, num_layers=2, d_model=16, num_heads=2, d_ff=32
    )
    model = ViT(cfg)
    batch = {"image": jax.random.normal(jax.random.key(0), (4, 8, 8, 1)), "label": jnp.array([0, 1, 2, 1])}
    params = nn.unbox(model.init(jax.random.key(1), batch["image"])["params"])
    adapters = lora.init(params, jax.random.key(2), rank=2, targets=r"attn/qkv")
    head = adaptation.where(params, r"^head/")
    _, step, state = lora_step(model, params, adapters, classification_loss, trainable_base=head)
    state, _ = step(state, batch)
    new = state["params"]["base"]
    assert np.abs(np.asarray(new["head"]["kernel"])).max() > 0  # zero-initialised, now trained
    np.testing.assert_array_equal(new["pos_embed"], params["pos_embed"])


def test_prompt_tuning_prepends_vectors_and_scores_the_real_tokens_only(gpt):
    model, params, tokens = gpt
    vectors = prompt.init(params, jax.random.key(3), length=4)
    rows = np.asarray(params["token_embed"]["embedding"])
    assert all(any(np.array_equal(v, r) for r in rows) for v in np.asarray(vectors))  # vocabulary rows
    logits = model.apply({"params": params}, tokens[:, :8], prefix=vectors)
    assert logits.shape == (2, 8, CFG.vocab_size)
    # a prefix of token embeddings is the same as those tokens in front (minus their logits)
    ids = jnp.array([3, 9])
    as_tokens = model.apply({"params": params}, jnp.concatenate([jnp.tile(ids, (2, 1)), tokens[:, :8]], 1))
    as_prefix = model.apply({"params": params}, tokens[:, :8], prefix=params["token_embed"]["embedding"][ids])
    np.testing.assert_allclose(as_prefix, as_tokens[:, 2:], atol=1e-5)
    with pytest.raises(ValueError, match="after a prefix of 4 exceeds context_length=16"):
        model.apply({"params": params}, tokens[:, :13], prefix=vectors)


def test_prompt_tuning_trains_the_prompt_alone(gpt):
    model, params, tokens = gpt
    both = {"base": params, "prompt": prompt.init(params, jax.random.key(3), length=2)}
    mask = {"base": jax.tree.map(lambda _: False, params), "prompt": True}
    optimizer = adamw_on(mask)
    loss = adaptation.frozen(prompt.loss(next_token_loss), mask)
    state = train_state(both, optimizer, jax.random.key(0))
    state, metrics = jax.jit(train_step_fn(model, optimizer, loss))(state, tokens[:, :12])
    assert np.isfinite(metrics["loss"]) and float(metrics["grad_norm"]) > 0
    jax.tree.map(np.testing.assert_array_equal, state["params"]["base"], params)
    assert np.abs(np.asarray(state["params"]["prompt"] - both["prompt"])).max() > 0


def test_where_marks_the_paths_a_pattern_matches():
    tree = {"head": {"kernel": 1, "bias": 2}, "layers": {"head_dim": 3}}
    assert adaptation.where(tree, r"^head/") == {"head": {"kernel": True, "bias": True}, "layers": {"head_dim": False}}


def test_adapters_save_alone_and_load_onto_another_layout(gpt, tmp_path):
    model, params, tokens = gpt
    adapters = randomised(lora.init(params, jax.random.key(2), rank=4, targets=ALL))
    lora.save(tmp_path / "adapters", adapters)
    size = sum(f.stat().st_size for f in (tmp_path / "adapters").rglob("*") if f.is_file())
    assert size < 4 * lora.count(params)  # the adapters' bytes, not the model's
    boxed = jax.eval_shape(lambda key: model.init(key, tokens[:, :-1])["params"], jax.random.key(0))
    shapes = jax.eval_shape(lambda key: lora.init(boxed, key, rank=4, targets=ALL), jax.random.key(1))
    mesh = sharding.mesh_for("fsdp_tp")
    like = jax.tree.map(
        lambda s, where: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where),
        nn.unbox(shapes),
        sharding.logical_shardings(shapes, mesh),
    )
    loaded = lora.load(tmp_path / "adapters", like)
    jax.tree.map(np.testing.assert_array_equal, loaded, adapters)
    assert [x.sharding for x in jax.tree.leaves(loaded)] == [s.sharding for s in jax.tree.leaves(like)]
    np.testing.assert_array_equal(jax.tree.leaves(lora.load(tmp_path / "adapters"))[0], jax.tree.leaves(adapters)[0])
