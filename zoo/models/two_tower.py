"""Contrastive image-text pretraining: an image tower (a ViT, pooled) and a text tower (a GPT, its
last real token's state or the mean of its tokens' states), each projected to a shared space and
L2-normalised, compared by a learned temperature (CLIP, Radford et al. 2021) or a learned temperature
and bias (SigLIP, Zhai et al. 2023).

    model = TwoTower(TwoTowerConfig(vision=vit_cfg, text=gpt_cfg, loss="siglip"))
    images, texts, scale, bias = model.apply({"params": params}, batch["image"], batch["tokens"], batch["lengths"])
    loss, accuracy = two_tower.loss(model, params, batch)
    labels = zero_shot(model, params, images, class_prompts, lengths)   # the nearest prompt's index

The losses are over the global batch whatever the layout. Under a mesh the batch is split over the
data axes, so each device holds its rows' image and text embeddings; the similarity matrix needs
every text. `similarities` gathers the text embeddings to every device (one all-gather of
batch x embed_dim values: 2 MiB at a batch of 4,096 and 128 float32 dimensions, against the towers'
gigabytes) and keeps the [batch, batch] logits split by rows, so each device computes its rows' dot
products; CLIP's text-to-image term then reduces each column across devices (an all-reduce of
2 x batch numbers).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from zoo.models.gpt import GPT, GPTConfig
from zoo.models.vit import ViT, ViTConfig
from zoo.nn.transformer import dense_init

LOSSES = ("clip", "siglip")
TEXT_POOLINGS = ("last", "mean")
# Initial temperatures and bias: CLIP's 1 / 0.07; SigLIP's 10 and -10 (its paper, section 3.2).
INITIAL_LOG_SCALE = {"clip": math.log(1 / 0.07), "siglip": math.log(10.0)}
INITIAL_BIAS = -10.0


@dataclasses.dataclass(frozen=True)
class TwoTowerConfig:
    """The towers' configs, the shared space's width, how a text is pooled, and the loss (which
    sets the initial temperature, and gives SigLIP its bias)."""

    vision: ViTConfig
    text: GPTConfig
    embed_dim: int = 128
    text_pooling: str = "last"  # "last": the last real token's state (causal: it has read the text); "mean"
    loss: str = "siglip"  # "clip" (softmax both ways) or "siglip" (sigmoid per pair)

    def __post_init__(self) -> None:
        if self.text_pooling not in TEXT_POOLINGS:
            raise ValueError(f"text_pooling={self.text_pooling!r}; choose one of {TEXT_POOLINGS}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r}; choose one of {LOSSES}")
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim={self.embed_dim} must be >= 1")


class TwoTower(nn.Module):
    """(images [B, H, W, C], tokens [B, T], lengths [B]) -> (image embeddings [B, E], text embeddings
    [B, E], both unit-norm float32, the logit scale exp(t) and the bias b (0 for CLIP))."""

    cfg: TwoTowerConfig

    def setup(self) -> None:
        cfg = self.cfg
        self.image_encoder = ViT(cfg.vision)
        self.text_encoder = GPT(cfg.text)
        project = lambda tower: nn.Dense(
            cfg.embed_dim,
            use_bias=False,
            dtype=tower.dtype,
            param_dtype=tower.param_dtype,
            kernel_init=dense_init(1 / math.sqrt(tower.d_model), ("embed", None)),
        )
        self.image_projection, self.text_projection = project(cfg.vision), project(cfg.text)
        constant = lambda value: nn.with_logical_partitioning(nn.initializers.constant(value), ())
        self.log_scale = self.param("log_scale", constant(INITIAL_LOG_SCALE[cfg.loss]), (), jnp.float32)
        if cfg.loss == "siglip":
            self.bias = self.param("bias", constant(INITIAL_BIAS), (), jnp.float32)

    def embed_images(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
        return _unit(self.image_projection(self.image_encoder.pooled(images, deterministic)))

    def embed_texts(self, tokens: jax.Array, lengths: jax.Array, deterministic: bool = True) -> jax.Array:
        """Each text's embedding from its first `lengths` tokens (the rest is padding)."""
        states = self.text_encoder.hidden_states(tokens, deterministic)
        if self.cfg.text_pooling == "last":
            pooled = jnp.take_along_axis(states, (lengths - 1)[:, None, None], axis=1)[:, 0]
        else:
            real = (jnp.arange(tokens.shape[1]) < lengths[:, None])[..., None]
            pooled = (states * real).sum(axis=1) / jnp.maximum(lengths, 1)[:, None]
        return _unit(self.text_projection(pooled))

    def __call__(
        self, images: jax.Array, tokens: jax.Array, lengths: jax.Array, deterministic: bool = True
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        bias = self.bias if self.cfg.loss == "siglip" else jnp.zeros((), jnp.float32)
        scale = jnp.exp(self.log_scale)
        return self.embed_images(images, deterministic), self.embed_texts(tokens, lengths, deterministic), scale, bias


def _unit(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


def similarities(images: jax.Array, texts: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """Logits [B, B] = scale · images · textsᵀ + bias over the global batch: the texts gathered whole
    to every device, the rows left split as the batch is (see the module's docstring)."""
    texts = nn.with_logical_constraint(texts, (None, None))
    logits = scale * jnp.einsum("ie,te->it", images, texts) + bias
    return nn.with_logical_constraint(logits, ("batch", None))


def clip_loss(logits: jax.Array) -> jax.Array:
    """CLIP's symmetric softmax loss: the mean of image→text and text→image cross-entropies, the
    matching pair (the diagonal) the target."""
    targets = jnp.arange(logits.shape[0])
    image_to_text = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    text_to_image = optax.softmax_cross_entropy_with_integer_labels(logits.T, targets).mean()
    return (image_to_text + text_to_image) / 2


def sigmoid_loss(logits: jax.Array) -> jax.Array:
    """SigLIP's loss: every pair is a binary decision, matching (the diagonal) or not, −log σ(±logit)
    summed over the B² pairs and divided by B."""
    signs = 2 * jnp.eye(logits.shape[0]) - 1
    return -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / logits.shape[0]


def loss(model: TwoTower, params: Any, batch: dict, **apply_kwargs: Any) -> tuple[jax.Array, jax.Array]:
    """(the config's contrastive loss over the global batch, in-batch image→text top-1 accuracy) on
    {"image", "tokens", "lengths"}."""
    images, texts, scale, bias = model.apply(
        {"params": params}, batch["image"], batch["tokens"], batch["lengths"], **apply_kwargs
    )
    logits = similarities(images, texts, scale, bias)
    value = clip_loss(logits) if model.cfg.loss == "clip" else sigmoid_loss(logits)
    return value, (jnp.argmax(logits, axis=1) == jnp.arange(logits.shape[0])).mean()


@functools.partial(jax.jit, static_argnums=0)
def zero_shot(model: TwoTower, params: Any, images: jax.Array, prompts: jax.Array, lengths: jax.Array) -> jax.Array:
    """Each image's class [B]: the index of the nearest of the class `prompts` [C, T] (with their
    `lengths` [C]), e.g. "a photo of a {label}" for every label."""
    variables = {"params": params}
    image = model.apply(variables, images, method=TwoTower.embed_images)
    classes = model.apply(variables, prompts, lengths, method=TwoTower.embed_texts)
    return jnp.argmax(image @ classes.T, axis=1)
