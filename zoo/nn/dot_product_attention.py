"""Scaled dot-product attention: a dense reference, an exact O(T·w) banded version, and
the fused kernels of each backend (cuDNN on GPU, Pallas splash on TPU).

Layout everywhere is that of `jax.nn.dot_product_attention`: [batch, length, heads, head_dim].
Window semantics (SPEC.md): with `window=w`, query i attends keys j with i - w < j <= i,
so w counts the query itself; w = 1 returns v and w >= T is dense causal attention.

The prefix-LM mask (PaliGemma's `mask_ar`): with `bidirectional=P` [B], row b's first P[b]
positions form a prefix whose queries see all of the prefix, later ones included; the positions
after it are causal (and see the whole prefix). Query i sees key j iff j <= i or j < P. With a
window as well, a key must also lie within w of the query on either side: |i - j| < w.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, PartitionSpec

Implementation = Literal["dense", "banded", "xla", "cudnn", "splash"]
IMPLEMENTATIONS: tuple[str, ...] = ("dense", "banded", "xla", "cudnn", "splash")

# Large but finite, so that a fully masked row never produces NaN (SPEC.md).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    window: int | None = None,
    key_mask: jax.Array | None = None,
    bidirectional: jax.Array | None = None,
    implementation: Implementation | None = None,
) -> jax.Array:
    """Multi-head attention of q [B, T, H, D] over k, v [B, S, H, D]; returns [B, T, H, D].

    `window` (causal only) limits each query to the w most recent keys, itself included.
    `key_mask` [B, S] marks valid keys (False = padding); a query that sees no valid key
    outputs 0 (the fused kernels may differ there). `bidirectional` [B] (causal only) gives each
    row a prefix of that many positions that attend to each other both ways (the prefix-LM
    mask; see the module's docstring). `implementation=None` picks the
    fastest exact implementation for the target devices (`target_device`) and the arguments.
    """
    _check_arguments(q, k, v, causal, window, key_mask, bidirectional, implementation)
    masks = dict(causal=causal, window=window, key_mask=key_mask, bidirectional=bidirectional)
    if implementation is None:
        implementation = choose_implementation(q, **masks)
    elif reason := unsupported_reason(implementation, q, **masks):
        given = lambda x: "given" if x is not None else None
        raise ValueError(
            f"implementation={implementation!r} cannot run here: {reason} (dtype={q.dtype}, shape={q.shape}, "
            f"causal={causal}, window={window}, key_mask={given(key_mask)}, bidirectional={given(bidirectional)})"
        )
    return _IMPLEMENTATIONS[implementation](q, k, v, **masks)


def _check_arguments(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    causal: bool,
    window: int | None,
    key_mask: jax.Array | None,
    bidirectional: jax.Array | None,
    implementation: str,
) -> None:
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"expected q [B, T, H, D] and k, v [B, S, H, D] with matching B, H, D; "
            f"got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    if window is not None:
        if not causal:
            raise ValueError(f"window={window} is defined for causal attention only (causal=False given)")
        if window < 1:
            raise ValueError(f"window must be >= 1 (the query itself counts), got window={window}")
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"causal attention needs as many queries as keys, got {q.shape[1]} and {k.shape[1]}")
    if key_mask is not None and key_mask.shape != k.shape[:2]:
        raise ValueError(f"key_mask must have shape [batch, keys] = {k.shape[:2]}, got {key_mask.shape}")
    if bidirectional is not None:
        if not causal:
            raise ValueError("bidirectional (a prefix-LM prefix) is defined for causal attention only (causal=False)")
        if bidirectional.shape != q.shape[:1]:
            raise ValueError(f"bidirectional must have shape [batch] = {q.shape[:1]}, got {bidirectional.shape}")
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation={implementation!r}; choose one of {IMPLEMENTATIONS} or None")


# --------------------------------------------------------------------------------------
# Choosing an implementation
# --------------------------------------------------------------------------------------


def target_device() -> tuple[str, str]:
    """(platform, device kind) of the devices the program being traced is compiled for: the active
    mesh's (so a compile for abstract TPU chips from a CPU host chooses TPU kernels), else the
    default backend's."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.abstract_device is not None:
        return mesh.abstract_device.platform, mesh.abstract_device.device_kind
    device = jax.devices()[0]
    return device.platform, device.device_kind


def unsupported_reason(
    implementation: str,
    q: jax.Array,
    *,
    causal: bool,
    window: int | None,
    key_mask: jax.Array | None,
    bidirectional: jax.Array | None = None,
) -> str | None:
    """Why `implementation` cannot compute this attention exactly on the target devices, or None if it can."""
    platform, device_kind = target_device()
    head_dim = q.shape[-1]
    if implementation in ("dense", "xla"):
        return None
    if implementation == "banded":
        return None if window is not None else "banded attention needs a window"
    if implementation == "cudnn":
        max_head_dim = 256 if _is_hopper(device_kind) else 128
        checks = {
            f"cuDNN runs on GPUs, the target is {platform!r}": platform == "gpu",
            f"cuDNN needs bfloat16 or float16, got {q.dtype}": q.dtype in (jnp.bfloat16, jnp.float16),
            f"cuDNN needs a head dim that is a multiple of 8 and at most {max_head_dim}, got {head_dim}": head_dim % 8
            == 0
            and head_dim <= max_head_dim,
            "cuDNN here takes no key mask": key_mask is None,
            "cuDNN here takes no prefix-LM mask": bidirectional is None,
        }
    elif implementation == "splash":
        checks = {
            f"splash runs on TPUs, the target is {platform!r}": platform == "tpu",
            "splash here is causal only": causal,
            "splash here takes no key mask": key_mask is None,
            "splash here takes no prefix-LM mask": bidirectional is None,
            f"splash needs a length that is a multiple of 128, got {q.shape[1]}": q.shape[1] % 128 == 0,
            # A Pallas kernel in a program over several devices must be told their mesh (jax.set_mesh,
            # as zoo.sharding.sharding_context does) to run on each one's shard.
            f"splash outside a mesh runs on one device, and there are {jax.device_count()}": not _outside_a_mesh()
            or jax.device_count() == 1,
        }
    else:
        return f"unknown implementation {implementation!r}"
    return next((reason for reason, holds in checks.items() if not holds), None)


def supports(
    implementation: str,
    q: jax.Array,
    *,
    causal: bool,
    window: int | None,
    key_mask: jax.Array | None,
    bidirectional: jax.Array | None = None,
) -> bool:
    """Whether `implementation` can compute this attention exactly on the target devices."""
    masks = dict(causal=causal, window=window, key_mask=key_mask, bidirectional=bidirectional)
    return unsupported_reason(implementation, q, **masks) is None


def choose_implementation(
    q: jax.Array,
    *,
    causal: bool = True,
    window: int | None = None,
    key_mask: jax.Array | None = None,
    bidirectional: jax.Array | None = None,
) -> str:
    """The fastest exact implementation: the target devices' fused kernel when its constraints
    hold, else blocked banded attention when the band is narrow, else the dense reference."""
    for fused in ("cudnn", "splash"):
        if supports(fused, q, causal=causal, window=window, key_mask=key_mask, bidirectional=bidirectional):
            return fused
    # Banded computes a T x 2w strip of logits, dense a T x T square.
    # (A window w >= T is plain causal attention: dense.)
    if window is not None and 2 * window < q.shape[1]:
        return "banded"
    return "dense"


def _outside_a_mesh() -> bool:
    return jax.sharding.get_abstract_mesh().empty


def _is_hopper(device_kind: str) -> bool:
    return any(name in device_kind.lower() for name in ("h100", "h200", "h800", "gh200"))


# --------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------


def _scale(q: jax.Array) -> float:
    return 1.0 / math.sqrt(q.shape[-1])


def _allowed(
    q_pos: jax.Array, k_pos: jax.Array, causal: bool, window: int | None, prefix: jax.Array | None = None
) -> jax.Array:
    """Boolean mask [..., queries, keys] of the (query, key) pairs attention may use; `prefix`
    (broadcast against that shape): the bidirectional prefix's length."""
    q, k = q_pos[..., :, None], k_pos[..., None, :]
    allowed = k <= q if causal else jnp.ones(jnp.broadcast_shapes(q.shape, k.shape), bool)
    if prefix is not None:
        allowed = allowed | (k < prefix)
    if window is not None:  # the upper bound only binds inside a bidirectional prefix
        allowed = allowed & (k > q - window) & (k < q + window)
    return allowed


def _softmax_weighted_sum(logits: jax.Array, allowed: jax.Array, v_strip: jax.Array, spec: str) -> jax.Array:
    """Masked float32 softmax over the last axis, then the weighted sum of values. A query
    with no visible key (all padding) gets weight 0 everywhere, so its output is 0."""
    logits = jnp.where(allowed, logits, MASK_VALUE)
    probs = (jax.nn.softmax(logits, axis=-1) * allowed).astype(v_strip.dtype)
    return jnp.einsum(spec, probs, v_strip)


def dense_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    window: int | None = None,
    key_mask: jax.Array | None = None,
    bidirectional: jax.Array | None = None,
) -> jax.Array:
    """Reference: materialises all T x S logits in float32 and masks them. O(T·S) memory."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * _scale(q)
    prefix = None if bidirectional is None else bidirectional[:, None, None, None]
    allowed = _allowed(jnp.arange(q.shape[1]), jnp.arange(k.shape[1]), causal, window, prefix)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    return _softmax_weighted_sum(logits, allowed, v, "bhqk,bkhd->bqhd")


def attention_at_positions(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    k_pos: jax.Array,
    window: int | None = None,
    bidirectional: jax.Array | None = None,
) -> jax.Array:
    """Causal attention of queries at absolute positions `q_pos` [B, L] over keys at `k_pos` [B, S]
    in any order (a KV cache's slots; -1: an empty slot): query i sees key j iff
    0 <= k_pos[j] <= q_pos[i] (and q_pos[i] - k_pos[j] < window), or k_pos[j] < `bidirectional`
    [B] (a prefix-LM prefix, within the window). Dense over the S keys."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * _scale(q)
    prefix = None if bidirectional is None else bidirectional[:, None, None]
    allowed = _allowed(q_pos, k_pos, True, window, prefix) & (k_pos >= 0)[:, None, :]
    return _softmax_weighted_sum(logits, allowed[:, None], v, "bhqk,bkhd->bqhd")


def banded_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    window: int | None = None,
    key_mask: jax.Array | None = None,
    bidirectional: jax.Array | None = None,
) -> jax.Array:
    """Exact causal local attention in O(T·w) compute and memory.

    The sequence is cut into blocks of b = w positions (padded up to a multiple of b). A query
    at offset r of block n sees keys back to position n·b + r - w + 1 >= (n - 1)·b, so each query
    block needs only its own key block and the previous one: a strip 2b wide, inside which the
    exact band mask is applied. Block -1 does not exist and is masked, as is the padding. With a
    bidirectional prefix, a prefix query also sees keys up to w - 1 ahead, in the next block: the
    strip is then 3b wide.
    """
    del causal  # banded attention is causal by construction (checked by the caller)
    assert window is not None, "banded attention needs a window"
    batch, length, heads, head_dim = q.shape
    block = min(window, length)  # any block of at least min(w, T) positions works
    num_blocks = -(-length // block)
    pad = num_blocks * block - length

    def blocks(x: jax.Array) -> jax.Array:  # [B, T, ...] -> [B, n, b, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(batch, num_blocks, block, *x.shape[2:])

    ahead = bidirectional is not None  # the strip takes the next block too

    def strip(x: jax.Array) -> jax.Array:  # [B, n, b, ...] -> [B, n, 2b or 3b, ...]
        pad = [(0, 0)] * (x.ndim - 2)
        parts = [jnp.pad(x[:, :-1], [(0, 0), (1, 0), *pad]), x]
        if ahead:
            parts.append(jnp.pad(x[:, 1:], [(0, 0), (0, 1), *pad]))
        return jnp.concatenate(parts, axis=2)

    qb = blocks(q)
    k_strip, v_strip = strip(blocks(k)), strip(blocks(v))
    logits = jnp.einsum("bnqhd,bnkhd->bnhqk", qb, k_strip, preferred_element_type=jnp.float32) * _scale(q)

    starts = jnp.arange(num_blocks)[:, None] * block
    q_pos = starts + jnp.arange(block)  # [n, b]
    k_pos = starts - block + jnp.arange((2 + ahead) * block)  # [n, 2b or 3b]
    prefix = None if bidirectional is None else bidirectional[:, None, None, None]
    allowed = _allowed(q_pos, k_pos, causal=True, window=window, prefix=prefix)  # [(B,) n, b, strip]
    allowed &= ((k_pos >= 0) & (k_pos < length))[:, None, :]
    allowed = jnp.expand_dims(allowed, 0) if prefix is None else allowed
    allowed = allowed[:, :, None]  # [1 or B, n, 1, b, strip]
    if key_mask is not None:
        key_strip = strip(blocks(key_mask))  # [B, n, strip]
        allowed = allowed & key_strip[:, :, None, None, :]

    out = _softmax_weighted_sum(logits, allowed, v_strip, "bnhqk,bnkhd->bnqhd")
    return out.reshape(batch, num_blocks * block, heads, head_dim)[:, :length]


def _xla_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    window: int | None = None,
    key_mask: jax.Array | None = None,
    bidirectional: jax.Array | None = None,
    implementation: str = "xla",
) -> jax.Array:
    """`jax.nn.dot_product_attention`; `is_causal` is always passed with a window (SPEC.md). A
    prefix-LM mask is passed whole, as the boolean mask."""
    mask = None if key_mask is None else key_mask[:, None, None, :]
    if bidirectional is not None:
        prefix = bidirectional[:, None, None, None]
        allowed = _allowed(jnp.arange(q.shape[1]), jnp.arange(k.shape[1]), causal, window, prefix)
        mask = allowed if mask is None else mask & allowed
        causal, window = False, None
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=mask,
        is_causal=causal,
        local_window_size=None if window is None else (window - 1, 0),
        implementation=implementation,
    )


def _splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    window: int | None = None,
    key_mask: jax.Array | None = None,
    bidirectional: jax.Array | None = None,
    interpret: bool = False,
) -> jax.Array:
    """TPU Pallas splash attention, run on each device's shard of the batch and heads."""
    del causal, key_mask, bidirectional  # checked by `supports`: causal, no key mask, no prefix
    kernel = functools.partial(_splash_kernel, window=window, interpret=interpret)
    return _on_each_shard(kernel, q, k, v)


def _on_each_shard(kernel: Callable[..., jax.Array], q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """`kernel(q, k, v)` on each device's block of [batch, length, heads, head_dim] under the active
    mesh (a Pallas kernel cannot be partitioned automatically): the batch split as the logical rules
    split `batch`, the heads as they split `heads`, each only where it divides; the sequence whole.
    Outside a mesh, on one device, or inside a shard_map already, the kernel runs directly."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.are_all_axes_manual:
        return kernel(q, k, v)
    spec = _shard_spec(q.shape, mesh)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


def _shard_spec(shape: tuple[int, ...], mesh: AbstractMesh) -> PartitionSpec:
    """The partition of [batch, length, heads, head_dim] the logical rules give batch and heads on
    `mesh`, less any mesh axis of size 1 and any dimension its axes do not divide."""
    logical = nn.logical_to_mesh_axes(("batch", None, "heads", None))

    def axes_for(size: int, entry: str | tuple[str, ...] | None) -> tuple[str, ...] | None:
        axes = tuple(a for a in (entry if isinstance(entry, tuple) else (entry,)) if a and mesh.shape.get(a, 1) > 1)
        return axes if axes and size % math.prod(mesh.shape[a] for a in axes) == 0 else None

    return PartitionSpec(*(axes_for(size, entry) for size, entry in zip(shape, logical)))


def _splash_kernel(q: jax.Array, k: jax.Array, v: jax.Array, *, window: int | None, interpret: bool) -> jax.Array:
    """The splash kernel on [B, T, H, D]; a lazy `LocalMask` lets it skip tiles outside the band."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

    length, heads = q.shape[1], q.shape[2]
    shape = (length, length)
    if window is None:
        mask = mask_lib.CausalMask(shape)
    else:
        mask = mask_lib.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    block = next(b for b in (512, 256, 128) if length % b == 0)
    sizes = kernel_lib.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    kernel = kernel_lib.make_splash_mha(
        mask_lib.MultiHeadMask([mask] * heads),
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )
    to_heads_first = lambda x: jnp.swapaxes(x, 1, 2)
    out = jax.vmap(kernel)(to_heads_first(q * _scale(q)), to_heads_first(k), to_heads_first(v))
    return to_heads_first(out).astype(q.dtype)


_IMPLEMENTATIONS = {
    "dense": dense_attention,
    "banded": banded_attention,
    "xla": _xla_attention,
    "cudnn": functools.partial(_xla_attention, implementation="cudnn"),
    "splash": _splash_attention,
}
