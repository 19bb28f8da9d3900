"""Adapting pretrained models: GPT-1's task fine-tuning (`finetune`), LoRA (`lora`) and prompt
tuning (`prompt`), and what trains while the rest stays frozen."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import optax

from zoo.adaptation import finetune, lora, prompt


def where(params: Any, pattern: str) -> Any:
    """A tree like `params` of bools: True where the leaf's path ("base/head/kernel") matches the
    regex `pattern` (re.search)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: bool(re.search(pattern, _path(path))), params)


def frozen(loss_fn: Callable, trainable: Any) -> Callable:
    """`loss_fn` whose params are constants where `trainable` is False: no gradient is computed
    for them (nor counted in the reported gradient norm)."""

    def loss(model: Any, params: Any, batch: Any, **kwargs: Any) -> Any:
        params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)
        return loss_fn(model, params, batch, **kwargs)

    return loss


def train_only(optimizer: optax.GradientTransformation, trainable: Any) -> optax.GradientTransformation:
    """`optimizer` on the leaves where `trainable` is True; the others never change and hold no
    optimizer state (AdamW's moments only for what trains)."""
    labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable)
    return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)


def _path(path: tuple) -> str:
    return "/".join(str(getattr(key, "key", getattr(key, "name", key))) for key in path)


__all__ = ["finetune", "frozen", "lora", "prompt", "train_only", "where"]
