"""ViT: patches, [CLS] or mean pooling, any image shape the patch divides, resizable positions."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo.models.vit import resize_position_embeddings

TINY = zoo.configs.vit(
    "vit-ti/16", image_size=(24, 40), patch_size=8, num_layers=2, d_model=24, num_heads=3, d_ff=48, num_classes=5
)


def init(cfg, batch=2):
    images = jax.random.uniform(jax.random.key(1), (batch, *cfg.image_size, cfg.num_channels))
    params = jax.jit(zoo.ViT(cfg).init)(jax.random.key(0), images)["params"]
    return nn.unbox(params), images


def classify(cfg, params, images):
    return jax.jit(zoo.ViT(cfg).apply)({"params": params}, images)


def perturb_head(params):
    """The head starts at zero (so logits are 0); give it values to make outputs informative."""
    head = params["head"]
    return {**params, "head": {**head, "kernel": jax.random.normal(jax.random.key(2), head["kernel"].shape)}}


@pytest.mark.parametrize("pooling, positions", [("token", 1 + 3 * 5), ("gap", 3 * 5)])
def test_non_square_images_and_pooling(pooling, positions):
    cfg = dataclasses.replace(TINY, pooling=pooling)
    params, images = init(cfg)
    assert cfg.grid == (3, 5)
    assert params["pos_embed"].shape == (1, positions, 24)
    assert ("cls" in params) == (pooling == "token")
    logits = classify(cfg, perturb_head(params), images)
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32 and np.isfinite(logits).all()


@pytest.mark.parametrize("pooling", ["token", "gap"])
def test_the_head_reads_the_pooled_final_tokens(pooling):
    """ "token" classifies the [CLS] token's final output, "gap" the mean of the patch tokens' (no [CLS]):
    logits equal the head applied by hand to the final LayerNorm's output, captured from the same call."""
    cfg = dataclasses.replace(TINY, pooling=pooling)
    params, images = init(cfg)
    params = perturb_head(params)
    params["head"]["bias"] = jax.random.normal(jax.random.key(3), params["head"]["bias"].shape)
    logits, captured = zoo.ViT(cfg).apply({"params": params}, images, capture_intermediates=True)
    tokens = captured["intermediates"]["final_norm"]["__call__"][0]  # [batch, positions, d_model]
    assert tokens.shape == (2, cfg.num_positions, 24)
    pooled = tokens[:, 0] if pooling == "token" else tokens.mean(axis=1)
    np.testing.assert_allclose(logits, pooled @ params["head"]["kernel"] + params["head"]["bias"], rtol=1e-5, atol=1e-5)
    other = tokens[:, 1] if pooling == "token" else tokens[:, 0]  # what a wrong pooling would read
    assert np.abs(logits - (other @ params["head"]["kernel"] + params["head"]["bias"])).max() > 1e-2


def test_images_are_classified_independently():
    params, images = init(TINY, batch=3)
    params = perturb_head(params)
    together = classify(TINY, params, images)
    alone = classify(TINY, params, images[1:2])
    np.testing.assert_allclose(together[1:2], alone, rtol=1e-5, atol=1e-6)


def test_resizing_positions_to_the_same_size_is_the_identity():
    params, _ = init(TINY)
    cfg, resized = resize_position_embeddings(TINY, params, TINY.image_size)
    assert cfg == TINY
    np.testing.assert_allclose(resized["pos_embed"], params["pos_embed"], atol=1e-6)


def test_resizing_positions_interpolates_in_2d():
    params, _ = init(TINY)
    # A position embedding that is linear in the row index stays linear after bilinear resizing.
    rows = jnp.arange(3, dtype=jnp.float32)[:, None, None] * jnp.ones((3, 5, 24))
    params["pos_embed"] = jnp.concatenate([params["pos_embed"][:, :1], rows.reshape(1, 15, 24)], axis=1)
    cfg, resized = resize_position_embeddings(TINY, params, (48, 40))
    assert cfg.grid == (6, 5) and resized["pos_embed"].shape == (1, 31, 24)
    np.testing.assert_array_equal(resized["pos_embed"][:, 0], params["pos_embed"][:, 0])  # [CLS] kept
    grid = np.asarray(resized["pos_embed"][0, 1:, 0]).reshape(6, 5)
    assert np.all(np.diff(grid, axis=0) >= 0) and np.allclose(grid[:, 0], grid[:, 4])
    images = jnp.zeros((1, 48, 40, 3))
    assert classify(cfg, resized, images).shape == (1, 5)


@pytest.mark.parametrize(
    "shape",
    [(2, 40, 24, 3), (2, 24, 40, 1), (24, 40, 3)],
    ids=["transposed", "grayscale", "no-batch"],
)
def test_wrong_image_shapes_get_clear_errors(shape):
    params, _ = init(TINY)
    with pytest.raises(ValueError, match=r"images must be \[batch, 24, 40, 3\].*got"):
        zoo.ViT(TINY).apply({"params": params}, jnp.zeros(shape))
