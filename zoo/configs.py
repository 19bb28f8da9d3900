"""Named presets with the papers' sizes: `gpt(name, **overrides)` and `vit(name, **overrides)`.

GPT-3's printed table is inconsistent in two rows (SPEC.md); our choice keeps d_model and
derives the heads from d_head:
- gpt3-xl: d_model 2048 with 24 heads does not divide; we use 16 heads of 128.
- gpt3-13b: d_model 5140 is not 40 x 128; we use d_model 5120 (40 heads of 128).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import numbers
import types
import typing
from typing import Any

from zoo.models.gpt import GPTConfig
from zoo.models.vit import ViTConfig


def _gpt2(layers: int, d_model: int, heads: int) -> GPTConfig:
    return GPTConfig(num_layers=layers, d_model=d_model, num_heads=heads, d_ff=4 * d_model)


def _gpt3(layers: int, d_model: int, heads: int) -> GPTConfig:
    return dataclasses.replace(
        _gpt2(layers, d_model, heads), context_length=2048, attention_pattern=("dense", "banded"), window=256
    )


GPT_PRESETS: dict[str, GPTConfig] = {
    "gpt1": GPTConfig(
        vocab_size=40478,  # 40,000 BPE merges plus the base symbols, as released
        context_length=512,
        norm_position="post",
        final_norm=False,
        pos_init_std=0.02,
        scaled_residual_init=False,
    ),
    "gpt2-small": _gpt2(12, 768, 12),
    "gpt2-medium": _gpt2(24, 1024, 16),
    "gpt2-large": _gpt2(36, 1280, 20),
    "gpt2-xl": _gpt2(48, 1600, 25),
    "gpt3-small": _gpt3(12, 768, 12),
    "gpt3-medium": _gpt3(24, 1024, 16),
    "gpt3-large": _gpt3(24, 1536, 16),
    "gpt3-xl": _gpt3(24, 2048, 16),  # paper: 24 heads (does not divide 2048)
    "gpt3-2.7b": _gpt3(32, 2560, 32),
    "gpt3-6.7b": _gpt3(32, 4096, 32),
    "gpt3-13b": _gpt3(40, 5120, 40),  # paper: d_model 5140 (not 40 x 128)
    "gpt3-175b": _gpt3(96, 12288, 96),
}

# Parameter counts the papers report, for checking the presets.
GPT_PAPER_PARAMS: dict[str, float] = {
    "gpt1": 117e6,
    "gpt2-small": 124e6,
    "gpt2-medium": 355e6,
    "gpt2-large": 774e6,
    "gpt2-xl": 1558e6,
    "gpt3-small": 125e6,
    "gpt3-medium": 350e6,
    "gpt3-large": 760e6,
    "gpt3-xl": 1.3e9,
    "gpt3-2.7b": 2.7e9,
    "gpt3-6.7b": 6.7e9,
    "gpt3-13b": 13e9,
    "gpt3-175b": 175e9,
}


@dataclasses.dataclass(frozen=True)
class GPT3Training:
    """GPT-3's per-size pretraining hyper-parameters (Brown et al., 2020, Table 2.1)."""

    batch_tokens: float
    learning_rate: float


GPT3_TRAINING: dict[str, GPT3Training] = {
    "gpt3-small": GPT3Training(0.5e6, 6.0e-4),
    "gpt3-medium": GPT3Training(0.5e6, 3.0e-4),
    "gpt3-large": GPT3Training(0.5e6, 2.5e-4),
    "gpt3-xl": GPT3Training(1e6, 2.0e-4),
    "gpt3-2.7b": GPT3Training(1e6, 1.6e-4),
    "gpt3-6.7b": GPT3Training(2e6, 1.2e-4),
    "gpt3-13b": GPT3Training(2e6, 1.0e-4),
    "gpt3-175b": GPT3Training(3.2e6, 0.6e-4),
}

# ViT sizes (Dosovitskiy et al.; Ti and S from DeiT): layers, width, heads, MLP.
_VIT_SIZES = {
    "ti": (12, 192, 3, 768),
    "s": (12, 384, 6, 1536),
    "b": (12, 768, 12, 3072),
    "l": (24, 1024, 16, 4096),
    "h": (32, 1280, 16, 5120),
}
VIT_PRESETS: dict[str, ViTConfig] = {
    f"vit-{size}/{patch}": ViTConfig(patch_size=patch, num_layers=layers, d_model=width, num_heads=heads, d_ff=mlp)
    for size, (layers, width, heads, mlp) in _VIT_SIZES.items()
    for patch in (14, 16, 32)
}

# Parameter counts of the /16 models at 224 px with 1000 classes.
VIT_PAPER_PARAMS: dict[str, float] = {
    "vit-ti/16": 5.7e6,
    "vit-s/16": 22e6,
    "vit-b/16": 86e6,
    "vit-l/16": 307e6,
    "vit-h/16": 632e6,
}


def gpt(name: str, **overrides: Any) -> GPTConfig:
    """The GPT preset `name`, with any field overridden, e.g. gpt("gpt3-small", dtype="bfloat16")."""
    return _lookup(GPT_PRESETS, name, overrides)


def vit(name: str, **overrides: Any) -> ViTConfig:
    """The ViT preset `name` ("vit-ti|s|b|l|h/14|16|32"), e.g. vit("vit-b/16", num_classes=10)."""
    return _lookup(VIT_PRESETS, name, overrides)


def replace(config: Any, **overrides: Any) -> Any:
    """`dataclasses.replace` that names near matches of a field that does not exist and refuses a value
    that does not fit the field's annotated type (ints are taken for floats, lists for tuples)."""
    fields = {field.name for field in dataclasses.fields(config)}
    for key in overrides:
        if key not in fields:
            near = difflib.get_close_matches(key, fields, n=3)
            hint = f"; did you mean {' or '.join(near)}?" if near else f"; fields: {', '.join(sorted(fields))}"
            raise ValueError(f"{type(config).__name__} has no field {key!r}{hint}")
    hints = typing.get_type_hints(type(config))
    overrides = {key: _convert(value, hints[key]) for key, value in overrides.items()}
    try:
        new = dataclasses.replace(config, **overrides)
    except (TypeError, ValueError):  # e.g. `num_layers % 2` on a str: name the mistyped value instead
        _check_types(config, overrides, hints)
        raise
    # Checked as stored, so a value the config normalises (ViT's image_size=32 -> (32, 32)) passes.
    _check_types(new, {key: getattr(new, key) for key in overrides}, hints)
    return new


def _check_types(config: Any, values: dict[str, Any], hints: dict[str, Any]) -> None:
    """Raise a TypeError naming the first of `values` that its field's annotated type does not admit."""
    for key, value in values.items():
        if not _admits(hints[key], value):
            expected = hints[key].__name__ if isinstance(hints[key], type) else str(hints[key])
            raise TypeError(
                f"{type(config).__name__}.{key}={value!r}: expected "
                f"{expected.replace('typing.', '')}, got {type(value).__name__}"
            )


def _admits(annotation: Any, value: Any) -> bool:
    """Whether `value` fits `annotation` (int, float, bool, str, tuples, unions, Optional, Literal)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_admits(arg, value) for arg in args)
    if origin is typing.Literal:
        return value in args
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_admits(args[0], item) for item in value)
        return len(args) == len(value) and all(_admits(arg, item) for arg, item in zip(args, value))
    if annotation is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if annotation is type(None):
        return value is None
    return isinstance(value, origin or annotation)


def _convert(value: Any, annotation: Any) -> Any:
    """A list for a tuple field becomes a tuple, an int for a float field a float; anything else as is."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    kinds = {typing.get_origin(arg) or arg for arg in (typing.get_args(annotation) if union else (annotation,))}
    kinds -= {type(None)}
    if isinstance(value, list) and kinds == {tuple}:
        return tuple(value)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and kinds == {float}:
        return float(value)
    return value


def override(config: Any, assignments: list[str]) -> Any:
    """Apply command-line `key=value` strings; values are Python literals, else strings, checked against
    the field types (e.g. ["num_layers=6", "dtype=bfloat16", "attention_pattern=('dense', 'banded')"]).
    A dotted key sets a field of a nested config: "text.num_layers=4" in an ImageToTextConfig."""
    overrides, nested = {}, {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep:
            raise ValueError(f"expected key=value, got {assignment!r}")
        outer, dot, inner = key.strip().partition(".")
        if dot:
            nested.setdefault(outer, []).append(f"{inner}={value}")
            continue
        try:
            overrides[outer] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[outer] = value
    for outer, inner in nested.items():
        fields = {field.name for field in dataclasses.fields(config)}
        if outer not in fields or not dataclasses.is_dataclass(getattr(config, outer)):
            raise ValueError(f"{type(config).__name__} has no nested config {outer!r} (in {', '.join(inner)})")
        overrides[outer] = override(getattr(config, outer), inner)
    return replace(config, **overrides)


def _lookup(presets: dict, name: str, overrides: dict) -> Any:
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(presets)}")
    return replace(presets[name], **overrides)
