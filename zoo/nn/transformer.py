"""The Transformer block shared by GPT and ViT: multi-head self-attention and a GELU MLP,
each wrapped in a residual connection with LayerNorm before (pre-LN) or after (post-LN).

Every parameter is declared with logical axis names and every large activation is
constrained by them; one rules table (zoo.sharding) maps the names to mesh axes.
Logical names used: batch, length, embed, heads, head_dim, mlp, vocab, classes, layers.
"""

from __future__ import annotations

from typing import Any, Protocol

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from zoo.nn.dot_product_attention import attention, attention_at_positions

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}
NORM_POSITIONS = ("pre", "post")

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class BlockConfig(Protocol):
    """The config fields a Transformer block reads (GPTConfig and ViTConfig both have them)."""

    d_model: int
    num_heads: int
    d_ff: int
    norm_position: str
    activation: str
    layer_norm_eps: float
    dropout: float
    init_std: float
    residual_init_std: float
    use_bias: bool
    dtype: str
    param_dtype: str
    scan_unroll: int
    attention_impl: str | None


def dense_init(std: float, names: tuple[str | None, ...]) -> Any:
    """Normal(0, std) initialiser that records the parameter's logical axis names."""
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


def zeros_init(names: tuple[str | None, ...]) -> Any:
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def layer_norm(cfg: BlockConfig, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm with statistics in float32 whatever the compute dtype."""
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_eps,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=zeros_init(("embed",)),
        name=name,
    )


class Projection(nn.Module):
    """x · W + b contracting the last `len(in_names)` axes of x; W is [*in, *out] with logical
    names. (flax's DenseGeneral reshapes its kernel through a flat 2-D matrix at init, which
    clashes with N-D logical constraints under a mesh: google/flax#3676.) Where the params hold
    LoRA factors A [*in, rank] and B [rank, *out] beside W, adds (x · A) · B: the low-rank update
    without the merged W + A · B."""

    features: tuple[int, ...]
    in_names: tuple[str | None, ...]
    out_names: tuple[str | None, ...]
    init_std: float
    use_bias: bool
    dtype: str
    param_dtype: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        contracted = len(self.in_names)
        kernel = self.param(
            "kernel",
            dense_init(self.init_std, (*self.in_names, *self.out_names)),
            (*x.shape[-contracted:], *self.features),
            self.param_dtype,
        )
        x = x.astype(self.dtype)
        y = jnp.tensordot(x, kernel.astype(self.dtype), axes=contracted)
        if self.has_variable("params", "lora_a"):  # LoRA adapters put in by zoo.adaptation.lora.inject
            a, b = (self.get_variable("params", name).astype(self.dtype) for name in ("lora_a", "lora_b"))
            y = y + jnp.tensordot(jnp.tensordot(x, a, axes=contracted), b, axes=1)
        if self.use_bias:
            bias = self.param("bias", zeros_init(self.out_names), self.features, self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused q/k/v projection [embed, 3, heads, head_dim]."""

    cfg: BlockConfig
    causal: bool
    window: int | None = None

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        key_mask: jax.Array | None = None,
        cache: KVCache | None = None,
        bidirectional: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Attention over x's own tokens; with a `cache` (causal layers, when generating), over the
        cache's keys and x's, returning (output, the cache with x's keys written in). `bidirectional`
        [B]: each row's prefix-LM prefix length (absolute positions; see `attention`)."""
        cfg = self.cfg
        head_dim = cfg.d_model // cfg.num_heads
        common = dict(use_bias=cfg.use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        qkv = Projection(
            (3, cfg.num_heads, head_dim), ("embed",), (None, "heads", "head_dim"), cfg.init_std, **common, name="qkv"
        )(x)
        q, k, v = (nn.with_logical_constraint(qkv[:, :, i], ("batch", "length", "heads", "head_dim")) for i in range(3))
        if cache is None:
            out = attention(
                q,
                k,
                v,
                causal=self.causal,
                window=self.window,
                key_mask=key_mask,
                bidirectional=bidirectional,
                implementation=cfg.attention_impl,
            )
        elif x.shape[1] == 1:  # a decode step: the token's slot is written, then the cache attended over
            cache = cache.put(k, v)
            out = attention_at_positions(
                q, cache.k.astype(k.dtype), cache.v.astype(v.dtype), cache.start[:, None], cache.pos, self.window
            )
        else:
            positions = cache.new_positions(x.shape[1])
            out = attention_at_positions(
                q,
                jnp.concatenate([cache.k.astype(k.dtype), k], axis=1),
                jnp.concatenate([cache.v.astype(v.dtype), v], axis=1),
                cache.start[:, None] + jnp.arange(x.shape[1]),
                jnp.concatenate([cache.pos, positions], axis=1),
                self.window,
                bidirectional,
            )
            cache = cache.written(k, v)
        if cache is not None:
            names = ("batch", "length", "heads", "head_dim")  # the cache shards like the keys it holds
            cache = cache.replace(
                k=nn.with_logical_constraint(cache.k, names), v=nn.with_logical_constraint(cache.v, names)
            )
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        out = Projection(
            (cfg.d_model,), ("heads", "head_dim"), ("embed",), cfg.residual_init_std, **common, name="out"
        )(out)
        return out if cache is None else (out, cache)


@flax.struct.dataclass
class KVCache:
    """One attention layer's keys and values for generation: `size` slots per row, slot
    position % size holding the key at that absolute position (`pos`, -1: empty): a dense layer
    has a slot per position of the context, a banded layer a ring of `window` slots. `start` and
    `lengths` [B] say where the tokens being added begin and how many of them are real (the rest
    are padding: never written, never seen)."""

    k: jax.Array  # [B, size, heads, head_dim]
    v: jax.Array
    pos: jax.Array  # int32 [B, size]
    start: jax.Array  # int32 [B]
    lengths: jax.Array  # int32 [B]

    def new_positions(self, length: int) -> jax.Array:
        """Absolute positions [B, length] of the tokens being added; -1 for padding."""
        offsets = jnp.arange(length)
        return jnp.where(offsets < self.lengths[:, None], self.start[:, None] + offsets, -1)

    def put(self, k: jax.Array, v: jax.Array) -> KVCache:
        """The cache with one new token per row [B, 1, heads, head_dim] in slot start % size, in place
        of position start - size: no query at `start` or after sees that one (it is past a banded
        layer's window; a dense layer's cache is longer than the decode)."""
        rows, slot = jnp.arange(self.pos.shape[0]), self.start % self.pos.shape[1]
        return self.replace(
            k=self.k.at[rows, slot].set(k[:, 0].astype(self.k.dtype)),
            v=self.v.at[rows, slot].set(v[:, 0].astype(self.v.dtype)),
            pos=self.pos.at[rows, slot].set(self.start),
        )

    def written(self, k: jax.Array, v: jax.Array) -> KVCache:
        """The cache with the new keys and values [B, L, heads, head_dim] in their slots: slot s takes
        the latest real new position p with p % size == s (a ring shorter than L keeps the last ones)."""
        size, length = self.pos.shape[1], k.shape[1]
        last = self.start + self.lengths - 1
        latest = last[:, None] - jnp.mod(last[:, None] - jnp.arange(size), size)  # [B, size]
        fresh = (latest >= self.start[:, None]) & (self.lengths[:, None] > 0)
        index = jnp.clip(latest - self.start[:, None], 0, length - 1)[:, :, None, None]
        pick = lambda new, old: jnp.where(
            fresh[:, :, None, None], jnp.take_along_axis(new, index, axis=1).astype(old.dtype), old
        )
        return self.replace(k=pick(k, self.k), v=pick(v, self.v), pos=jnp.where(fresh, latest, self.pos))


class MLP(nn.Module):
    """Position-wise feed-forward: Dense(d_ff), GELU, Dense(d_model)."""

    cfg: BlockConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        dense = lambda features, std, names, name: Projection(
            (features,), names[:1], names[1:], std, cfg.use_bias, cfg.dtype, cfg.param_dtype, name=name
        )
        h = dense(cfg.d_ff, cfg.init_std, ("embed", "mlp"), "up")(x)
        h = nn.with_logical_constraint(ACTIVATIONS[cfg.activation](h), ("batch", "length", "mlp"))
        return dense(cfg.d_model, cfg.residual_init_std, ("mlp", "embed"), "down")(h)


class Block(nn.Module):
    """One Transformer layer. Pre-LN: x + f(LN(x)). Post-LN (GPT-1): LN(x + f(x))."""

    cfg: BlockConfig
    causal: bool
    window: int | None = None

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        deterministic: bool,
        key_mask: jax.Array | None = None,
        cache: KVCache | None = None,
        bidirectional: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """The layer's output; with a KV `cache` (generation), (output, the updated cache).
        `bidirectional` [B]: each row's prefix-LM prefix length (causal layers)."""
        cfg = self.cfg
        attend = SelfAttention(cfg, self.causal, self.window, name="attn")
        updated = []

        def attention_sublayer(h: jax.Array) -> jax.Array:
            if cache is None:
                return attend(h, key_mask, bidirectional=bidirectional)
            out, new_cache = attend(h, key_mask, cache, bidirectional)
            updated.append(new_cache)
            return out

        sublayers = (("attn", attention_sublayer), ("mlp", lambda h: MLP(cfg, name="mlp")(h)))
        for name, sublayer in sublayers:
            norm = layer_norm(cfg, f"{name}_norm")
            dropout = nn.Dropout(cfg.dropout, deterministic=deterministic)
            if cfg.norm_position == "pre":
                x = x + dropout(sublayer(norm(x)))
            else:
                x = norm(x + dropout(sublayer(x)))
            x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return x if cache is None else (x, updated[0])


def check_block_config(cfg: BlockConfig) -> None:
    """Raise a ValueError naming the field for a config no block can be built from."""
    if cfg.d_model % cfg.num_heads:
        raise ValueError(f"num_heads={cfg.num_heads} does not divide d_model={cfg.d_model}")
    if cfg.norm_position not in NORM_POSITIONS:
        raise ValueError(f"norm_position={cfg.norm_position!r}; choose one of {NORM_POSITIONS}")
    if cfg.activation not in ACTIVATIONS:
        raise ValueError(f"activation={cfg.activation!r}; choose one of {tuple(ACTIVATIONS)}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"dropout={cfg.dropout} must be in [0, 1)")
    if cfg.scan_unroll < 1:
        raise ValueError(f"scan_unroll={cfg.scan_unroll} must be >= 1 (layer-scan steps per loop iteration)")
    for field in ("dtype", "param_dtype"):
        try:
            jnp.dtype(getattr(cfg, field))
        except TypeError:
            value = getattr(cfg, field)
            raise ValueError(f"{field}={value!r} is not a dtype name such as 'float32' or 'bfloat16'") from None


def scan_layers(
    period: type[nn.Module], num_periods: int, remat: str, unroll: int = 1, in_axes: Any = nn.broadcast
) -> type[nn.Module]:
    """Stack `num_periods` copies of a layer group under `nn.scan` (params get a leading
    "layers" axis), so compile time does not grow with depth; optionally rematerialised.
    `unroll` copies of the period run per loop iteration (>= num_periods: straight-line code).
    The period's call is `(x, deterministic, *args) -> (x, out)`; `in_axes` says, per argument
    after x, whether it is scanned (0: one slice per period, e.g. a KV cache) or broadcast."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}; choose one of {tuple(REMAT_POLICIES)}")
    if remat != "none":
        # In a loop XLA cannot merge the recomputation into the forward pass; in straight-line code it could.
        straight_line = unroll >= num_periods
        period = nn.remat(period, policy=REMAT_POLICIES[remat], prevent_cse=straight_line, static_argnums=(2,))
    return nn.scan(
        period,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=in_axes,
        length=num_periods,
        unroll=unroll,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
