"""LoRA (Hu et al., 2021) on params pytrees: a frozen kernel W learns a low-rank update
(alpha / rank) · A · B, A [*in, rank] random and B [rank, *out] zero, so that the adapted model
starts as the base model exactly.

    adapters = lora.init(params, key, rank=8, alpha=16.0, targets=r"attn/(qkv|out)")
    logits = model.apply({"params": lora.inject(params, adapters)}, tokens)  # unmerged: x·W + (x·A)·B
    merged = lora.merge(params, adapters)                                     # plain params, W + s·A·B

Adapters are {"scale": alpha / rank, "modules": {path: {"a", "b"}}} with the module paths of the
params. A scanned kernel [layers, *in, *out] gets factors stacked the same way ([layers, *in,
rank], [layers, rank, *out]); given params boxed with logical axis names (a model's `init`, or
its `jax.eval_shape`), the factors carry the kernel's names (the rank axis unsharded), so one
rules table shards them like their kernels. The adaptable kernels are the Transformer blocks'
projections: attention's fused q/k/v ("attn/qkv": q, k and v adapted together) and output
("attn/out"), and the MLP's ("mlp/up", "mlp/down").
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from zoo.paths import absolute

# Module name -> (input axes, output axes) of its kernel; axes before those are stacked layers.
ADAPTABLE = {"qkv": (1, 3), "out": (2, 1), "up": (1, 1), "down": (1, 1)}


def init(params: Any, rng: jax.Array, rank: int = 8, alpha: float = 16.0, targets: str = r"attn/(qkv|out)") -> dict:
    """Adapters for every adaptable kernel whose path ("layers/block_0/attn/qkv/kernel") matches
    the regex `targets` (re.search): A ~ N(0, 1 / fan_in), B = 0, scale alpha / rank."""
    if rank < 1:
        raise ValueError(f"rank={rank} must be >= 1")
    kernels = {path: leaf for path, leaf in _flat(params).items() if path[-1] == "kernel"}
    chosen = {path: leaf for path, leaf in kernels.items() if re.search(targets, "/".join(path))}
    if not chosen:
        raise ValueError(f"targets={targets!r} matches no kernel; the kernels: {', '.join(map('/'.join, kernels))}")
    others = sorted("/".join(path) for path in chosen if path[-2] not in ADAPTABLE)
    if others:
        raise ValueError(f"targets={targets!r} matches kernels LoRA cannot adapt: {', '.join(others)}")
    modules: dict = {}
    for index, (path, kernel) in enumerate(sorted(chosen.items())):
        a, b = _factors(kernel, ADAPTABLE[path[-2]], rank, jax.random.fold_in(rng, index))
        _put(modules, path[:-1], {"a": a, "b": b})
    return {"scale": jnp.asarray(alpha / rank, jnp.float32), "modules": modules}


def _factors(kernel: Any, axes: tuple[int, int], rank: int, rng: jax.Array) -> tuple[Any, Any]:
    """(A, B) for one kernel, boxed with its logical names where it is boxed."""
    names = kernel.names if isinstance(kernel, nn.LogicallyPartitioned) else None
    value = nn.unbox(kernel)
    ins, outs = axes
    lead = value.ndim - ins - outs
    shape = value.shape
    fan_in = math.prod(shape[lead : lead + ins])
    a = jax.random.normal(rng, (*shape[: lead + ins], rank), value.dtype) / math.sqrt(fan_in)
    b = jnp.zeros((*shape[:lead], rank, *shape[lead + ins :]), value.dtype)
    if names is None:
        return a, b
    return (
        nn.LogicallyPartitioned(a, (*names[: lead + ins], None), mesh=kernel.mesh, rules=kernel.rules),
        nn.LogicallyPartitioned(b, (*names[:lead], None, *names[lead + ins :]), mesh=kernel.mesh, rules=kernel.rules),
    )


def inject(params: Any, adapters: dict) -> Any:
    """`params` with each adapted module's factors beside its kernel ("lora_a", "lora_b", B times
    the scale), which the model's projections add as (x · A) · B: the adapted model without
    materialising W + A · B (training), for `model.apply` like any params."""
    flat = _flat(params)
    for module, factors in _modules(adapters):
        flat[(*module, "lora_a")] = factors["a"]
        flat[(*module, "lora_b")] = factors["b"] * adapters["scale"].astype(factors["b"].dtype)
    return _unflat(flat)


def merge(params: Any, adapters: dict) -> Any:
    """Plain params for `model.apply`: every adapted kernel replaced by W + scale · A · B."""
    flat = _flat(params)
    for module, factors in _modules(adapters):
        a, b = factors["a"], factors["b"]
        kernel = flat[(*module, "kernel")]
        lead, rank = a.ndim - 1 - ADAPTABLE[module[-1]][0], a.shape[-1]
        delta = jnp.matmul(a.reshape(*a.shape[:lead], -1, rank), b.reshape(*b.shape[:lead], rank, -1))
        flat[(*module, "kernel")] = (kernel + adapters["scale"] * delta.reshape(kernel.shape)).astype(kernel.dtype)
    return _unflat(flat)


def _modules(adapters: dict) -> list[tuple[tuple[str, ...], dict]]:
    """(module path, {"a", "b"}) of every adapted module."""
    flat = _flat(adapters["modules"])
    return [(path[:-1], {"a": leaf, "b": flat[(*path[:-1], "b")]}) for path, leaf in flat.items() if path[-1] == "a"]


def loss(loss_fn: Callable) -> Callable:
    """`loss_fn` for params {"base": the model's, "lora": adapters}: the model computes with the
    adapters injected, unmerged (freeze the base with `zoo.adaptation.frozen`)."""
    return lambda model, params, batch, **kwargs: loss_fn(
        model, inject(params["base"], params["lora"]), batch, **kwargs
    )


def save(directory: str | os.PathLike, adapters: dict) -> None:
    """Write the adapters alone (megabytes where the model is gigabytes) with orbax; a directory
    that holds some is replaced."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(absolute(directory), adapters, force=True)


def load(directory: str | os.PathLike, like: Any = None) -> dict:
    """Adapters written by `save`; laid out as `like` asks (a tree of `jax.ShapeDtypeStruct`s with
    shardings, e.g. from `jax.eval_shape` of `init` and `zoo.sharding.logical_shardings` on another
    mesh), or as saved where `like` is None."""
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(absolute(directory), like)


def trainable(adapters: dict) -> dict:
    """True for the factors, False for the scale: the mask of what an optimizer updates."""
    return {"scale": False, "modules": jax.tree.map(lambda _: True, adapters["modules"])}


def count(tree: Any) -> int:
    """Number of scalars in a tree of arrays."""
    return sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree.leaves(nn.unbox(tree)))


def _flat(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """A nested dict as {path: leaf}; boxed leaves stay boxed."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flat(value, (*prefix, str(key))))
    return flat


def _unflat(flat: dict[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, leaf in flat.items():
        _put(tree, path[:-1], {path[-1]: leaf})
    return tree


def _put(tree: dict, path: tuple[str, ...], values: dict) -> None:
    for key in path:
        tree = tree.setdefault(key, {})
    tree.update(values)
