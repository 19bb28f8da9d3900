"""ViT: an image is cut into P x P patches, each linearly projected (a stride-P convolution),
a learned [CLS] token is prepended and learned position embeddings are added; a pre-LN
bidirectional Transformer encoder, a final LN and a linear head on the [CLS] output
("token" pooling) or on the mean of the patch outputs ("gap" pooling, without [CLS]).

Presets Ti/S/B/L/H x 14/16/32 are in `zoo.configs`. `resize_position_embeddings` adapts a
trained model to another image size by 2-D interpolation of its position embeddings.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.nn.transformer import Block, check_block_config, dense_init, layer_norm, scan_layers, zeros_init

POOLINGS = ("token", "gap")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Everything that defines a ViT. Defaults are ViT-B/16 at 224 x 224 with 1000 classes."""

    image_size: tuple[int, int] = (224, 224)  # (height, width); an int means a square
    patch_size: int = 16
    num_channels: int = 3
    num_classes: int = 1000
    num_layers: int = 12
    d_model: int = 768
    num_heads: int = 12
    d_ff: int = 3072
    pooling: str = "token"  # "token" ([CLS] output) or "gap" (mean of patch outputs, no [CLS])
    layer_norm_eps: float = 1e-6
    dropout: float = 0.0
    activation: str = "gelu"
    init_std: float = 0.02
    norm_position: str = "pre"
    use_bias: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    scan_unroll: int = 1  # layers per iteration of the layer loop; >= num_layers: no loop
    attention_impl: str | None = None

    def __post_init__(self):
        if isinstance(self.image_size, int):
            object.__setattr__(self, "image_size", (self.image_size, self.image_size))
        object.__setattr__(self, "image_size", tuple(self.image_size))
        check_block_config(self)
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r}; choose one of {POOLINGS}")
        if self.patch_size < 1 or any(side % self.patch_size for side in self.image_size):
            raise ValueError(f"patch_size={self.patch_size} must divide image_size={self.image_size}")

    @property
    def grid(self) -> tuple[int, int]:
        """Patches per column and per row."""
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    @property
    def num_positions(self) -> int:
        return self.grid[0] * self.grid[1] + (self.pooling == "token")

    @property
    def residual_init_std(self) -> float:
        return self.init_std


class _EncoderLayer(nn.Module):
    """The scanned unit: one bidirectional pre-LN block."""

    cfg: ViTConfig

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> tuple[jax.Array, None]:
        return Block(self.cfg, causal=False, name="block")(x, deterministic), None


class ViT(nn.Module):
    """Image classifier: float images [batch, height, width, channels] -> logits [batch, classes].
    `features` (every position's final state) and `pooled` are the encoder without the head, for
    models that use the ViT as their image tower."""

    cfg: ViTConfig

    def setup(self) -> None:
        cfg = self.cfg
        self.patch_embed = nn.Conv(
            cfg.d_model,
            kernel_size=(cfg.patch_size, cfg.patch_size),
            strides=(cfg.patch_size, cfg.patch_size),
            padding="VALID",
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            kernel_init=dense_init(cfg.init_std, (None, None, None, "embed")),
            bias_init=zeros_init(("embed",)),
        )
        if cfg.pooling == "token":
            self.cls = self.param("cls", zeros_init((None, None, "embed")), (1, 1, cfg.d_model), cfg.param_dtype)
        self.pos_embed = self.param(
            "pos_embed",
            dense_init(cfg.init_std, (None, None, "embed")),
            (1, cfg.num_positions, cfg.d_model),
            cfg.param_dtype,
        )
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.layers = scan_layers(_EncoderLayer, cfg.num_layers, cfg.remat, cfg.scan_unroll)(cfg)
        self.final_norm = layer_norm(cfg)
        self.head = nn.Dense(
            cfg.num_classes,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            kernel_init=zeros_init(("embed", "classes")),
            bias_init=zeros_init(("classes",)),
        )

    def features(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
        """The encoder's final states [batch, positions, d_model] (after the final LN): the [CLS]
        token first with "token" pooling, then the patches in row-major order."""
        cfg = self.cfg
        self._check_images(images)
        x = self.patch_embed(images.astype(cfg.dtype))
        x = x.reshape(x.shape[0], -1, cfg.d_model)
        if cfg.pooling == "token":
            x = jnp.concatenate([jnp.broadcast_to(self.cls.astype(x.dtype), (x.shape[0], 1, cfg.d_model)), x], axis=1)
        x = self.embed_dropout(x + self.pos_embed.astype(x.dtype), deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        x, _ = self.layers(x, deterministic)
        return self.final_norm(x)

    def pooled(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
        """One vector per image [batch, d_model]: the [CLS] output, or the mean of the patch outputs."""
        x = self.features(images, deterministic)
        return x[:, 0] if self.cfg.pooling == "token" else x.mean(axis=1)

    def __call__(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
        return self.head(self.pooled(images, deterministic)).astype(jnp.float32)

    def _check_images(self, images: jax.Array) -> None:
        cfg = self.cfg
        expected = (*cfg.image_size, cfg.num_channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images must be [batch, {expected[0]}, {expected[1]}, {expected[2]}] "
                f"(image_size={cfg.image_size}, num_channels={cfg.num_channels}), got {tuple(images.shape)}; "
                f"resize the images, or adapt the model with zoo.models.vit.resize_position_embeddings"
            )


def resize_position_embeddings(cfg: ViTConfig, params: dict, image_size: int | tuple[int, int]) -> tuple:
    """(config, params) for another image size: the patch-grid position embeddings are
    resized by bilinear interpolation in 2-D; the [CLS] embedding is kept as is."""
    new_cfg = dataclasses.replace(cfg, image_size=image_size)
    pos = params["pos_embed"]
    cls, grid = (pos[:, :1], pos[:, 1:]) if cfg.pooling == "token" else (pos[:, :0], pos)
    grid = grid.reshape(1, *cfg.grid, cfg.d_model)
    grid = jax.image.resize(grid, (1, *new_cfg.grid, cfg.d_model), method="bilinear")
    new_pos = jnp.concatenate([cls, grid.reshape(1, -1, cfg.d_model)], axis=1)
    return new_cfg, {**params, "pos_embed": new_pos}
