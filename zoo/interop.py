"""Weights from Hugging Face `transformers` checkpoints:
`cfg, params, tokenizer = from_transformers(model_or_path)`.

Supported classes (and their `save_pretrained` directories):
- GPT-2: `GPT2LMHeadModel`, `GPT2Model` -> `zoo.models.gpt.GPTConfig` (pre-LN, final LN).
- GPT-1: `OpenAIGPTLMHeadModel`, `OpenAIGPTModel` -> `GPTConfig` (post-LN, no final LN).
- ViT: `ViTForImageClassification` -> `zoo.models.vit.ViTConfig` ("token" pooling).

`params` is a plain nested dict of float32 arrays with exactly the tree of
`nn.unbox(model.init(rng, x)["params"])`. A model object needs torch (its state dict is
read through it); a directory (config.json + model.safetensors, or a sharded index) is read
with `json` and `safetensors.numpy` only, without importing torch or transformers.
Both routes go through `from_state_dict`. A GPT-2 directory's tokenizer (`tokenizer.json`, or
`vocab.json` + `merges.txt`) comes back too, so imported weights generate and evaluate real text;
otherwise `tokenizer` is None (a model object, ViT, and GPT-1, whose lower-cased character-level
BPE with ftfy and spaCy pre-processing the zoo does not implement).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from zoo.configs import GPT_PRESETS
from zoo.models.gpt import GPT, GPTConfig
from zoo.models.vit import ViT, ViTConfig
from zoo.tokenizer import ByteLevelBPE, TextTokenizer

Config = GPTConfig | ViTConfig
StateDict = dict[str, np.ndarray]

# transformers' ACT2FN names -> ours (gelu_new, gelu_pytorch_tanh and gelu_fast are all the tanh form).
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}
# OpenAIGPT's own table: its "gelu" is the tanh approximation (gelu_new), as in the released GPT-1 code.
_GPT1_ACTIVATIONS = {"gelu": "gelu_tanh"}

# transformers' config defaults for every field we read: a config.json that omits a field means its default.
_HF_DEFAULTS = {
    "gpt2": {
        "vocab_size": 50257,
        "n_positions": 1024,
        "n_embd": 768,
        "n_layer": 12,
        "n_head": 12,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": 0.1,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
    },
    "openai-gpt": {
        "vocab_size": 40478,
        "n_positions": 512,
        "n_embd": 768,
        "n_layer": 12,
        "n_head": 12,
        "afn": "gelu",
        "resid_pdrop": 0.1,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
    },
    "vit": {
        "image_size": 224,
        "patch_size": 16,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-12,
        "num_channels": 3,
        "qkv_bias": True,
        "head_dim": None,
    },
}

_ARCHITECTURES = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Model"),
    "openai-gpt": ("OpenAIGPTLMHeadModel", "OpenAIGPTModel"),
    "vit": ("ViTForImageClassification",),
}

# ViT per-layer weights: transformers >= 5 module names first, then the checkpoint (v4) names.
_VIT_LAYER_KEYS = {
    "attn_norm": ("layers.{i}.layernorm_before", "encoder.layer.{i}.layernorm_before"),
    "mlp_norm": ("layers.{i}.layernorm_after", "encoder.layer.{i}.layernorm_after"),
    "q": ("layers.{i}.attention.q_proj", "encoder.layer.{i}.attention.attention.query"),
    "k": ("layers.{i}.attention.k_proj", "encoder.layer.{i}.attention.attention.key"),
    "v": ("layers.{i}.attention.v_proj", "encoder.layer.{i}.attention.attention.value"),
    "out": ("layers.{i}.attention.o_proj", "encoder.layer.{i}.attention.output.dense"),
    "up": ("layers.{i}.mlp.fc1", "encoder.layer.{i}.intermediate.dense"),
    "down": ("layers.{i}.mlp.fc2", "encoder.layer.{i}.output.dense"),
}


class Imported(NamedTuple):
    """What `from_transformers` returns."""

    config: Config
    params: dict
    tokenizer: TextTokenizer | None  # a GPT-2 directory's byte-level BPE, else None


def from_transformers(model_or_path: Any) -> Imported:
    """(config, params, tokenizer) from a transformers model object or a local `save_pretrained` directory."""
    if isinstance(model_or_path, (str, os.PathLike)):
        model_type, hf_config, state = _read_directory(Path(model_or_path))
        return Imported(
            *from_state_dict(model_type, hf_config, state), _gpt2_tokenizer(model_type, Path(model_or_path))
        )
    if not (hasattr(model_or_path, "config") and hasattr(model_or_path, "state_dict")):
        raise TypeError(f"expected a transformers model or a checkpoint directory, got {type(model_or_path).__name__}")
    hf_config = {**model_or_path.config.to_dict(), "architectures": [type(model_or_path).__name__]}
    state = {k: v.detach().cpu().float().numpy() for k, v in model_or_path.state_dict().items()}
    return Imported(*from_state_dict(model_or_path.config.model_type, hf_config, state), None)


def from_state_dict(model_type: str, hf_config: dict, state_dict: StateDict) -> tuple[Config, dict]:
    """(config, params) from a transformers model type, its config dict and its weights as numpy."""
    converters: dict[str, Callable[[dict, StateDict], tuple[Config, dict]]] = {
        "gpt2": _convert_gpt2,
        "openai-gpt": _convert_gpt1,
        "vit": _convert_vit,
    }
    if model_type not in converters:
        raise ValueError(f"model_type={model_type!r} is not supported; supported: {', '.join(converters)}")
    hf_config = {**_HF_DEFAULTS[model_type], **hf_config}
    _check_architectures(model_type, hf_config)
    cfg, params = converters[model_type](hf_config, state_dict)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    _check_tree(cfg, params)
    return cfg, params


def _read_directory(path: Path) -> tuple[str, dict, StateDict]:
    """Model type, config dict and weights of a `save_pretrained` directory (no torch needed)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: expected a save_pretrained directory")
    hf_config = json.loads(config_file.read_text())
    if "model_type" not in hf_config:
        raise ValueError(f"{config_file} has no model_type field")
    return hf_config["model_type"], hf_config, _read_safetensors(path)


def _gpt2_tokenizer(model_type: str, path: Path) -> TextTokenizer | None:
    """A GPT-2 directory's byte-level BPE, when it holds one."""
    files = [path / "tokenizer.json"], [path / "vocab.json", path / "merges.txt"]
    if model_type != "gpt2" or not any(all(file.is_file() for file in group) for group in files):
        return None
    return ByteLevelBPE.load(path)


def _read_safetensors(path: Path) -> StateDict:
    """All tensors of model.safetensors, or of the shards listed in model.safetensors.index.json."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
    return {key: value for shard in shards for key, value in load_file(path / shard).items()}


def _check_architectures(model_type: str, hf_config: dict) -> None:
    """Refuse heads we have no place for (e.g. GPT2ForSequenceClassification)."""
    unsupported = [a for a in hf_config.get("architectures") or () if a not in _ARCHITECTURES[model_type]]
    if unsupported:
        raise ValueError(
            f"architectures={unsupported} is not supported for model_type={model_type!r}; "
            f"supported: {', '.join(_ARCHITECTURES[model_type])}"
        )


def _require(hf_config: dict, field: str, *expected: Any) -> None:
    """Raise a ValueError naming `field` when the config sets it to anything but `expected`."""
    value = hf_config[field]
    if value not in expected:
        raise ValueError(
            f"{field}={value!r} is not supported (only {' or '.join(map(repr, expected))}): our model has no equivalent"
        )


def _activation(field: str, name: str, table: dict[str, str]) -> str:
    """Our activation name for a transformers one, or a ValueError naming the field."""
    if name not in table:
        raise ValueError(f"{field}={name!r} is not supported; supported: {', '.join(table)}")
    return table[name]


def _strip_prefix(state: StateDict, prefix: str) -> StateDict:
    """The weights with `prefix` removed where present (LM-head models nest the base model under it)."""
    return {k.removeprefix(prefix): v for k, v in state.items()}


def _take(state: StateDict, *names: str) -> np.ndarray:
    """The first of `names` in the weights (alternative spellings of one tensor)."""
    for name in names:
        if name in state:
            return np.asarray(state[name])
    raise ValueError(f"weight {' or '.join(repr(n) for n in names)} missing from the checkpoint")


def _norm(state: StateDict, *names: str) -> dict:
    """LayerNorm weight/bias -> scale/bias."""
    return {
        "scale": _take(state, *(f"{n}.weight" for n in names)),
        "bias": _take(state, *(f"{n}.bias" for n in names)),
    }


def _conv1d(state: StateDict, name: str) -> dict:
    """A transformers Conv1D (weight [in, out], already our kernel layout) as a Dense."""
    return {"kernel": _take(state, f"{name}.weight"), "bias": _take(state, f"{name}.bias")}


def _linear(state: StateDict, *names: str) -> dict:
    """A torch Linear (weight [out, in]) as a Dense (kernel [in, out])."""
    return {
        "kernel": _take(state, *(f"{n}.weight" for n in names)).T,
        "bias": _take(state, *(f"{n}.bias" for n in names)),
    }


def _stack_periods(blocks: list[dict], period: int) -> dict:
    """Per-layer trees -> the scanned tree: block_j holds layers j, j + period, ... stacked on axis 0."""
    return {f"block_{j}": jax.tree.map(lambda *xs: np.stack(xs), *blocks[j::period]) for j in range(period)}


def _check_tied(state: StateDict, hf_config: dict, token: str) -> None:
    """Our output layer is the token embedding: refuse untied checkpoints."""
    _require(hf_config, "tie_word_embeddings", True)
    if "lm_head.weight" in state and not np.array_equal(state["lm_head.weight"], _take(state, f"{token}.weight")):
        raise ValueError("lm_head.weight differs from the token embedding: untied output layers are not supported")


def _gpt_block(state: StateDict, i: int, cfg: GPTConfig) -> dict:
    """HF GPT-2/GPT-1 layer i (Conv1D weights, fused c_attn split as [3, heads, head_dim])."""
    d, h, dh = cfg.d_model, cfg.num_heads, cfg.head_dim
    c_attn, c_proj = _conv1d(state, f"h.{i}.attn.c_attn"), _conv1d(state, f"h.{i}.attn.c_proj")
    return {
        "attn_norm": _norm(state, f"h.{i}.ln_1"),
        "attn": {
            "qkv": {"kernel": c_attn["kernel"].reshape(d, 3, h, dh), "bias": c_attn["bias"].reshape(3, h, dh)},
            "out": {"kernel": c_proj["kernel"].reshape(h, dh, d), "bias": c_proj["bias"]},
        },
        "mlp_norm": _norm(state, f"h.{i}.ln_2"),
        "mlp": {"up": _conv1d(state, f"h.{i}.mlp.c_fc"), "down": _conv1d(state, f"h.{i}.mlp.c_proj")},
    }


def _gpt_params(state: StateDict, cfg: GPTConfig, token: str, position: str) -> dict:
    """Our GPT tree from HF GPT-2/GPT-1 weights (prefix already stripped)."""
    blocks = [_gpt_block(state, i, cfg) for i in range(cfg.num_layers)]
    params = {
        "token_embed": {"embedding": _take(state, f"{token}.weight")},
        "pos_embed": _take(state, f"{position}.weight"),
        "layers": _stack_periods(blocks, len(cfg.attention_pattern)),
    }
    if cfg.final_norm:
        params["final_norm"] = _norm(state, "ln_f")
    return params


def _convert_gpt2(hf_config: dict, state_dict: StateDict) -> tuple[GPTConfig, dict]:
    """GPT2LMHeadModel / GPT2Model: pre-LN with a final LN."""
    _require(hf_config, "scale_attn_weights", True)
    _require(hf_config, "scale_attn_by_inverse_layer_idx", False)
    _require(hf_config, "reorder_and_upcast_attn", False)
    _require(hf_config, "add_cross_attention", False)
    d_model = hf_config["n_embd"]
    cfg = dataclasses.replace(
        GPT_PRESETS["gpt2-small"],
        vocab_size=hf_config["vocab_size"],
        context_length=hf_config["n_positions"],
        num_layers=hf_config["n_layer"],
        d_model=d_model,
        num_heads=hf_config["n_head"],
        d_ff=hf_config["n_inner"] or 4 * d_model,
        activation=_activation("activation_function", hf_config["activation_function"], _ACTIVATIONS),
        layer_norm_eps=hf_config["layer_norm_epsilon"],
        dropout=float(hf_config["resid_pdrop"]),
        init_std=hf_config["initializer_range"],
    )
    state = _strip_prefix(state_dict, "transformer.")
    _check_tied(state, hf_config, "wte")
    return cfg, _gpt_params(state, cfg, "wte", "wpe")


def _convert_gpt1(hf_config: dict, state_dict: StateDict) -> tuple[GPTConfig, dict]:
    """OpenAIGPTLMHeadModel / OpenAIGPTModel: post-LN (ln_1 after attention, ln_2 after the MLP)."""
    cfg = dataclasses.replace(
        GPT_PRESETS["gpt1"],
        vocab_size=hf_config["vocab_size"],
        context_length=hf_config["n_positions"],
        num_layers=hf_config["n_layer"],
        d_model=hf_config["n_embd"],
        num_heads=hf_config["n_head"],
        d_ff=4 * hf_config["n_embd"],
        activation=_activation("afn", hf_config["afn"], _GPT1_ACTIVATIONS),
        layer_norm_eps=hf_config["layer_norm_epsilon"],
        dropout=float(hf_config["resid_pdrop"]),
        init_std=hf_config["initializer_range"],
        pos_init_std=hf_config["initializer_range"],
    )
    state = _strip_prefix(state_dict, "transformer.")
    _check_tied(state, hf_config, "tokens_embed")
    return cfg, _gpt_params(state, cfg, "tokens_embed", "positions_embed")


def _square_patch(patch_size: int | list[int]) -> int:
    """ViT patch size as one int (ours are square)."""
    if isinstance(patch_size, int):
        return patch_size
    if len(set(patch_size)) != 1:
        raise ValueError(f"patch_size={patch_size!r} is not supported: only square patches")
    return patch_size[0]


def _num_labels(hf_config: dict) -> int:
    """Classifier outputs: transformers stores them as id2label (num_labels is derived; default 2)."""
    num_labels = len(hf_config["id2label"]) if "id2label" in hf_config else hf_config.get("num_labels", 2)
    if num_labels < 1:
        raise ValueError(f"num_labels={num_labels} is not supported: our ViT always has a classifier")
    return num_labels


def _vit_config(hf_config: dict) -> ViTConfig:
    """Our ViTConfig from a transformers ViTConfig dict."""
    _require(hf_config, "qkv_bias", True)
    d_model, heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
    _require(hf_config, "head_dim", None, d_model // heads)
    return ViTConfig(
        image_size=hf_config["image_size"],
        patch_size=_square_patch(hf_config["patch_size"]),
        num_channels=hf_config["num_channels"],
        num_classes=_num_labels(hf_config),
        num_layers=hf_config["num_hidden_layers"],
        d_model=d_model,
        num_heads=heads,
        d_ff=hf_config["intermediate_size"],
        pooling="token",
        layer_norm_eps=hf_config["layer_norm_eps"],
        dropout=float(hf_config["hidden_dropout_prob"]),
        activation=_activation("hidden_act", hf_config["hidden_act"], _ACTIVATIONS),
        init_std=hf_config["initializer_range"],
    )


def _vit_block(state: StateDict, i: int, cfg: ViTConfig) -> dict:
    """HF ViT layer i: separate q/k/v Linears stacked into our fused [embed, 3, heads, head_dim]."""
    names = {part: tuple(n.format(i=i) for n in spellings) for part, spellings in _VIT_LAYER_KEYS.items()}
    d, h, dh = cfg.d_model, cfg.num_heads, cfg.d_model // cfg.num_heads
    q, k, v = (_linear(state, *names[part]) for part in "qkv")
    out = _linear(state, *names["out"])
    return {
        "attn_norm": _norm(state, *names["attn_norm"]),
        "attn": {
            "qkv": {
                "kernel": np.stack([q["kernel"], k["kernel"], v["kernel"]], axis=1).reshape(d, 3, h, dh),
                "bias": np.stack([q["bias"], k["bias"], v["bias"]]).reshape(3, h, dh),
            },
            "out": {"kernel": out["kernel"].reshape(h, dh, d), "bias": out["bias"]},
        },
        "mlp_norm": _norm(state, *names["mlp_norm"]),
        "mlp": {"up": _linear(state, *names["up"]), "down": _linear(state, *names["down"])},
    }


def _convert_vit(hf_config: dict, state_dict: StateDict) -> tuple[ViTConfig, dict]:
    """ViTForImageClassification: patch conv [D, C, P, P] -> [P, P, C, D], classifier on [CLS]."""
    cfg = _vit_config(hf_config)
    state = _strip_prefix(state_dict, "vit.")
    blocks = [_vit_block(state, i, cfg) for i in range(cfg.num_layers)]
    patch = _take(state, "embeddings.patch_embeddings.projection.weight")
    return cfg, {
        "patch_embed": {
            "kernel": patch.transpose(2, 3, 1, 0),
            "bias": _take(state, "embeddings.patch_embeddings.projection.bias"),
        },
        "cls": _take(state, "embeddings.cls_token"),
        "pos_embed": _take(state, "embeddings.position_embeddings"),
        "layers": {"block": jax.tree.map(lambda *xs: np.stack(xs), *blocks)},
        "final_norm": _norm(state, "layernorm"),
        "head": _linear(state, "classifier"),
    }


def _check_tree(cfg: Config, params: dict) -> None:
    """Refuse params whose tree or shapes differ from our model's (an inconsistent config/checkpoint)."""
    if isinstance(cfg, GPTConfig):
        model, example = GPT(cfg), jax.ShapeDtypeStruct((1, 1), jnp.int32)
    else:
        model, example = ViT(cfg), jax.ShapeDtypeStruct((1, *cfg.image_size, cfg.num_channels), jnp.float32)
    expected = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), example)["params"])
    if jax.tree.structure(params) != jax.tree.structure(expected):
        raise ValueError(f"converted tree {jax.tree.structure(params)} != model tree {jax.tree.structure(expected)}")
    wrong = [
        f"{jax.tree_util.keystr(path)}: {got.shape} != {want.shape}"
        for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(expected))
        if got.shape != want.shape
    ]
    if wrong:
        raise ValueError("checkpoint shapes do not match the config: " + "; ".join(wrong))
