"""A trained run, loaded back from its workdir: the model, its params (read without the optimizer
state) and the tokenizer the run trained with, to sample, evaluate or fine-tune later.

    run = zoo.load("runs/default")
    new = zoo.generate(run.model, run.params, [run.tokenizer.encode("ROMEO.")], 100)

`load_transformers(folder)` gives the same for a GPT-2 `save_pretrained` folder with its tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh

from zoo import interop, sharding
from zoo.models.gpt import GPT, GPTConfig
from zoo.models.vit import ViT, ViTConfig
from zoo.paths import absolute
from zoo.tokenizer import TextTokenizer, WithSpecialTokens, tokenizer_in


@dataclasses.dataclass(frozen=True)
class Run:
    """What `load` returns."""

    model: GPT
    params: Any
    tokenizer: TextTokenizer
    step: int
    config: dict


def load(workdir: str | os.PathLike, mesh: Mesh | None = None) -> Run:
    """The language-model run in `workdir` (local or gs://) at its newest checkpoint, its params laid
    out on `mesh` (default: every device, replicated over a data axis) by the logical rules, whatever
    layout it was saved under. A config with "special_tokens" ({"first", "names"}) gives a tokenizer
    that knows them; one with "params_key" holds the model's params under that key of its params
    (a PPO run's "policy", beside its value model)."""
    workdir = epath.Path(workdir)
    if not (workdir / "config.json").exists():
        raise FileNotFoundError(f"{workdir} holds no run (no config.json)")
    config = json.loads((workdir / "config.json").read_text())
    fields = {name: tuple(value) if isinstance(value, list) else value for name, value in config["model"].items()}
    if set(fields) != {field.name for field in dataclasses.fields(GPTConfig)}:
        raise ValueError(f"{workdir} is not a language-model run (its model config is not a GPTConfig)")
    model = GPT(GPTConfig(**fields))
    params, step = _restore_params(workdir, model, jnp.zeros((1, 8), jnp.int32), mesh, config.get("params_key"))
    tokenizer = tokenizer_in(workdir)
    if "special_tokens" in config:  # e.g. a chat model's role tokens, after the tokenizer's own
        tokenizer = WithSpecialTokens(tokenizer, **config["special_tokens"])
    return Run(model, params, tokenizer, step, config)


def load_vit(workdir: str | os.PathLike, mesh: Mesh | None = None) -> tuple[ViT, Any, int]:
    """(model, params, step) of the image-classifier run in `workdir` at its newest checkpoint, laid out
    on `mesh` as `load` does."""
    workdir = epath.Path(workdir)
    if not (workdir / "config.json").exists():
        raise FileNotFoundError(f"{workdir} holds no run (no config.json)")
    fields = json.loads((workdir / "config.json").read_text())["model"]
    if set(fields) != {field.name for field in dataclasses.fields(ViTConfig)}:
        raise ValueError(f"{workdir} is not an image-classifier run (its model config is not a ViTConfig)")
    model = ViT(ViTConfig(**{name: tuple(v) if isinstance(v, list) else v for name, v in fields.items()}))
    cfg = model.cfg
    params, step = _restore_params(workdir, model, jnp.zeros((1, *cfg.image_size, cfg.num_channels)), mesh)
    return model, params, step


def load_pretrained(path: str | os.PathLike, mesh: Mesh | None = None) -> tuple[Any, Any, TextTokenizer | None]:
    """(config, params, tokenizer or None) of weights to start a model or a tower from: a zoo run (a
    language model, as `load`; an image classifier, as `load_vit`) or a transformers
    `save_pretrained` folder (GPT-2, GPT-1 or ViT, converted by `zoo.interop`; host arrays)."""
    path = epath.Path(path)
    if (path / "checkpoints").exists():
        if "patch_size" in json.loads((path / "config.json").read_text())["model"]:
            model, params, _ = load_vit(path, mesh)
            return model.cfg, params, None
        run = load(path, mesh)
        return run.model.cfg, run.params, run.tokenizer
    return interop.from_transformers(path)


def _restore_params(
    workdir: epath.Path, model: nn.Module, example: jax.Array, mesh: Mesh | None, key: str | None = None
) -> tuple[Any, int]:
    """The params (no optimizer state read; with `key`, only params[key]) at the newest checkpoint, and its step."""
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), example)["params"])
    shardings = sharding.logical_shardings(boxed, mesh or sharding.mesh_for("data=-1"))
    abstract = jax.tree.map(
        lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where), nn.unbox(boxed), shardings
    )
    with ocp.CheckpointManager(absolute(workdir / "checkpoints")) as manager:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"{workdir} has no checkpoint yet")
        item = {"params": abstract if key is None else {key: abstract}}
        restore_args = ocp.checkpoint_utils.construct_restore_args(item)
        state = ocp.args.PyTreeRestore(item, restore_args, partial_restore=True)  # the params only
        restored = manager.restore(step, args=ocp.args.Composite(state=state))
    params = restored.state["params"]
    return (params if key is None else params[key]), int(step)


def load_transformers(folder: str | os.PathLike, mesh: Mesh | None = None) -> Run:
    """A GPT-2 `save_pretrained` folder as a Run (step 0): its weights laid out on `mesh` by the logical
    rules, and its tokenizer, which the folder must hold."""
    cfg, params, tokenizer = interop.from_transformers(folder)
    if not isinstance(cfg, GPTConfig) or tokenizer is None:
        raise ValueError(
            f"{folder} is not a GPT-2 folder with its tokenizer (tokenizer.json, or vocab.json and merges.txt)"
        )
    tokenizer.check_vocab(cfg.vocab_size)
    model = GPT(cfg)
    _, shardings = _laid_out(model, mesh or sharding.mesh_for("data=-1"))
    config = {"model": dataclasses.asdict(cfg), "from_transformers": str(folder)}
    return Run(model, jax.device_put(params, shardings), tokenizer, 0, config)


def _laid_out(model: GPT, mesh: Mesh) -> tuple[Any, Any]:
    """The model's param shapes and their shardings on `mesh` by the logical rules."""
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    return nn.unbox(boxed), sharding.logical_shardings(boxed, mesh)
