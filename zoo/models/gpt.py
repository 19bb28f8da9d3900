"""GPT: one decoder-only Transformer that is GPT-1, GPT-2 or GPT-3 by config.

- GPT-1: post-LN blocks (x = LN(x + f(x))), no final LN, 512 positions.
- GPT-2: pre-LN blocks (x = x + f(LN(x))), a final LN, 1024 positions,
  residual projections initialised with std / sqrt(2 · layers) (the paper's scaling).
- GPT-3: GPT-2 with 2048 positions and layers alternating dense and locally banded
  attention (`attention_pattern=("dense", "banded")`, `window` keys per query).

All three use the tanh approximation of GELU (as released) and tie the output layer to the token
embedding. The repeating `attention_pattern` is the unit scanned over depth: a GPT-3 pair (dense,
banded) is one scan step.

Embeddings can be put before the tokens (`prefix`: prompt tuning's learned tokens, or an image
encoder's image tokens), and a prefix of each row can attend both ways (`bidirectional`, the
prefix-LM form of PaliGemma: image tokens and a question see each other, the answer is causal).
Presets with the papers' sizes are in `zoo.configs`.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zoo.nn.transformer import Block, KVCache, check_block_config, dense_init, layer_norm, scan_layers

ATTENTION_KINDS = ("dense", "banded")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Everything that defines a GPT. Defaults are GPT-2 small."""

    vocab_size: int = 50257
    context_length: int = 1024
    num_layers: int = 12
    d_model: int = 768
    num_heads: int = 12
    d_ff: int = 3072
    norm_position: str = "pre"  # "pre" (GPT-2/3) or "post" (GPT-1)
    final_norm: bool = True  # LN after the last block (pre-LN models)
    attention_pattern: tuple[str, ...] = ("dense",)  # repeated over depth; "dense" | "banded"
    window: int = 256  # keys seen by a banded layer, the query included
    activation: str = "gelu_tanh"  # "gelu_tanh" (GPT-1/2/3, as released) or "gelu" (exact)
    layer_norm_eps: float = 1e-5
    dropout: float = 0.1  # embedding and residual dropout (no dropout on attention weights)
    init_std: float = 0.02
    pos_init_std: float = 0.01
    scaled_residual_init: bool = True  # residual projections: init_std / sqrt(2 · num_layers)
    use_bias: bool = True
    dtype: str = "float32"  # compute dtype, e.g. "bfloat16"
    param_dtype: str = "float32"
    remat: str = "none"  # "none" | "full" | "dots" | "dots_no_batch"
    scan_unroll: int = 1  # pattern repetitions per iteration of the layer loop; >= their number: no loop
    attention_impl: str | None = None  # None picks the best for the backend (zoo.nn.attention)

    def __post_init__(self):
        check_block_config(self)
        if not self.attention_pattern or any(kind not in ATTENTION_KINDS for kind in self.attention_pattern):
            raise ValueError(f"attention_pattern={self.attention_pattern!r}: a non-empty tuple of {ATTENTION_KINDS}")
        if self.num_layers % len(self.attention_pattern):
            raise ValueError(
                f"num_layers={self.num_layers} is not a multiple of the attention_pattern "
                f"length {len(self.attention_pattern)} ({self.attention_pattern})"
            )
        if self.window < 1:
            raise ValueError(f"window={self.window} must be >= 1 (the query itself counts)")
        if "banded" in self.attention_pattern and self.window > self.context_length:
            raise ValueError(
                f"window={self.window} is larger than context_length={self.context_length}: "
                f"banded layers would be dense; lower window or use attention_pattern=('dense',)"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def residual_init_std(self) -> float:
        if self.scaled_residual_init:
            return self.init_std / math.sqrt(2 * self.num_layers)
        return self.init_std


class _Period(nn.Module):
    """One repetition of the attention pattern: a block per entry (the scanned unit). With KV
    caches (generation: this period's slice of each block's cache), also returns them updated."""

    cfg: GPTConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        deterministic: bool,
        caches: dict[str, KVCache] | None = None,
        bidirectional: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, KVCache] | None]:
        updated = {}
        for i, kind in enumerate(self.cfg.attention_pattern):
            window = self.cfg.window if kind == "banded" else None
            block = Block(self.cfg, causal=True, window=window, name=f"block_{i}")
            if caches is None:
                x = block(x, deterministic, bidirectional=bidirectional)
            else:
                x, updated[f"block_{i}"] = block(
                    x, deterministic, cache=caches[f"block_{i}"], bidirectional=bidirectional
                )
        return x, updated or None


class GPT(nn.Module):
    """Decoder-only language model: int32 tokens [batch, length] -> logits [batch, length, vocab]."""

    cfg: GPTConfig

    def setup(self) -> None:
        cfg = self.cfg
        self.token_embed = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=dense_init(cfg.init_std, ("vocab", "embed")),
        )
        self.pos_embed = self.param(
            "pos_embed",
            dense_init(cfg.pos_init_std, (None, "embed")),
            (cfg.context_length, cfg.d_model),
            cfg.param_dtype,
        )
        num_periods = cfg.num_layers // len(cfg.attention_pattern)
        self.layers = scan_layers(_Period, num_periods, cfg.remat, cfg.scan_unroll, (nn.broadcast, 0, nn.broadcast))(
            cfg
        )
        self.embed_dropout = nn.Dropout(cfg.dropout)
        if cfg.final_norm:
            self.final_norm = layer_norm(cfg)

    def hidden_states(
        self,
        tokens: jax.Array,
        deterministic: bool = True,
        prefix: jax.Array | None = None,
        bidirectional: jax.Array | None = None,
    ) -> jax.Array:
        """Final hidden states [batch, length, d_model] (after the final LN, if any). A `prefix` of
        embeddings, [P, d_model] for every row (prompt tuning) or [batch, P, d_model] (image tokens),
        is put before the tokens at positions 0 to P - 1; the states returned are the tokens' only.
        `bidirectional` [batch]: the first that many positions of each row (the prefix's included)
        attend to each other both ways; the rest are causal (the prefix-LM mask)."""
        self._check_tokens(tokens, 0 if prefix is None else prefix.shape[-2])
        x = self.token_embed(tokens)
        if prefix is not None:
            prefix = jnp.broadcast_to(prefix.astype(x.dtype), (x.shape[0], *prefix.shape[-2:]))
            x = jnp.concatenate([prefix, x], axis=1)
        x = x + self.pos_embed[: x.shape[1]].astype(self.cfg.dtype)
        x = self.embed_dropout(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        x, _ = self.layers(x, deterministic, None, bidirectional)
        x = x[:, x.shape[1] - tokens.shape[1] :]
        return self.final_norm(x) if self.cfg.final_norm else x

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Next-token logits in float32 from final hidden states: the output layer is the
        transposed token embedding (tied weights)."""
        logits = self.token_embed.attend(hidden).astype(jnp.float32)
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

    def __call__(
        self,
        tokens: jax.Array,
        deterministic: bool = True,
        prefix: jax.Array | None = None,
        bidirectional: jax.Array | None = None,
    ) -> jax.Array:
        """Next-token logits [batch, length, vocab] in float32 (after a `prefix`, if any; see
        `hidden_states`)."""
        return self.logits(self.hidden_states(tokens, deterministic, prefix, bidirectional))

    def extend(
        self, tokens: jax.Array, caches: dict[str, KVCache], prefix: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, KVCache]]:
        """Generation: run new tokens [B, L] at each row's own positions (the caches' `start` + i; the
        first `lengths` of each row real, the rest padding) over the KV `caches` (`init_caches`);
        returns the logits [B, L, vocab] (float32) and the caches with the new keys and values. A
        `prefix` [B, P, d_model] of embeddings (image tokens; a prefill from position 0) goes before
        the tokens, the caches' `lengths` counting it, and the prefix and the real tokens attend to
        each other both ways, as `bidirectional` has them in training."""
        first = jax.tree.leaves(caches, is_leaf=lambda leaf: isinstance(leaf, KVCache))[0]
        x = self.token_embed(tokens)
        bidirectional = None
        if prefix is not None:
            x = jnp.concatenate([prefix.astype(x.dtype), x], axis=1)
            bidirectional = first.start[0] + first.lengths[0]
        positions = first.start[0][:, None] + jnp.arange(x.shape[1])
        pos_embed = jnp.take(self.pos_embed, jnp.clip(positions, 0, self.cfg.context_length - 1), axis=0)
        x, caches = self.layers(x + pos_embed.astype(self.cfg.dtype), True, caches, bidirectional)
        x = x[:, x.shape[1] - tokens.shape[1] :]
        x = self.final_norm(x) if self.cfg.final_norm else x
        return self.token_embed.attend(x).astype(jnp.float32), caches

    def _check_tokens(self, tokens: jax.Array, prefix_length: int = 0) -> None:
        cfg = self.cfg
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integers [batch, length], got {tokens.dtype} {tokens.shape}")
        if tokens.shape[1] + prefix_length > cfg.context_length:
            prefix = f" after a prefix of {prefix_length}" if prefix_length else ""
            raise ValueError(f"input length {tokens.shape[1]}{prefix} exceeds context_length={cfg.context_length}")
        concrete = isinstance(tokens, (np.ndarray, jax.Array)) and not isinstance(tokens, jax.core.Tracer)
        if concrete and tokens.size:  # ids are checkable outside jit only
            ids = np.asarray(tokens)
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= cfg.vocab_size:
                raise ValueError(f"token ids must be in [0, vocab_size={cfg.vocab_size}), got ids in [{low}, {high}]")


def init_caches(cfg: GPTConfig, batch: int, length: int | None = None) -> dict[str, KVCache]:
    """Empty KV caches for generating `batch` rows, one per block of the attention pattern, each with
    a leading axis over the pattern's repetitions (the layer scan): a dense layer keeps `length`
    slots (default `context_length`; fewer suffice for a decode that ends before position `length`,
    and every step reads them all), a banded one a ring of at most `window` (GPT-3's banded layers:
    O(w), not O(T))."""
    periods = cfg.num_layers // len(cfg.attention_pattern)
    length = cfg.context_length if length is None else length
    caches = {}
    for i, kind in enumerate(cfg.attention_pattern):
        size = min(cfg.window, length) if kind == "banded" else length
        zeros = jnp.zeros((periods, batch, size, cfg.num_heads, cfg.head_dim), cfg.dtype)
        caches[f"block_{i}"] = KVCache(
            k=zeros,
            v=zeros,
            pos=jnp.full((periods, batch, size), -1, jnp.int32),
            start=jnp.zeros((periods, batch), jnp.int32),
            lengths=jnp.zeros((periods, batch), jnp.int32),
        )
    return caches


def advance(caches: dict[str, KVCache], start: jax.Array, lengths: jax.Array) -> dict[str, KVCache]:
    """The caches set to receive `lengths` [B] new tokens of each row at positions `start` [B] on."""
    return {
        name: cache.replace(
            start=jnp.broadcast_to(start, cache.start.shape).astype(jnp.int32),
            lengths=jnp.broadcast_to(lengths, cache.lengths.shape).astype(jnp.int32),
        )
        for name, cache in caches.items()
    }
