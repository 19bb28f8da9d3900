"""Training recipes: the papers' optimizers and learning-rate schedules as values an experiment
names, and the one optax optimizer each builds.

Every recipe is Adam with decoupled weight decay (AdamW, the decay times the learning rate as in
optax.adamw; weight decay 0 is plain Adam): GPT-1's "modified L2 regularization" is the decoupled
decay of Loshchilov & Hutter, and GPT-3 and ViT name AdamW / Adam with weight decay. Decay applies
to what a parameter is, by its name in the tree: kernels (every matrix of the layers and heads,
the patch embedding) and the token embedding (also the tied output layer) decay; biases,
LayerNorm scales and offsets, position embeddings and ViT's class token do not, as GPT-1 ("all
non bias or gain weights"), nanoGPT and big_vision (kernels only) do. Scanned layers stack every
parameter on a leading layers axis, so a parameter's rank says nothing about what it is.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

from zoo.configs import GPT3_TRAINING

DECAYED_NAMES = frozenset({"kernel", "embedding"})  # the last key of a decayed parameter's path
GPT3_WARMUP_TOKENS, GPT3_DECAY_TOKENS = 375e6, 260e9  # Brown et al., 2020, section 2.3 and appendix B
GPT2_AS_GPT3 = {
    "gpt2-small": "gpt3-small",
    "gpt2-medium": "gpt3-medium",
    "gpt2-large": "gpt3-large",
    "gpt2-xl": "gpt3-xl",
}  # the GPT-3 size of about the same parameter count
VIT_BATCH = 4096  # the ViT paper's batch, at which its learning rates hold


@dataclasses.dataclass(frozen=True)
class Recipe:
    """AdamW with global-norm clipping and a schedule in optimizer steps: linear warm-up from 0
    to `learning_rate` over `warmup_steps`, cosine decay to `final_lr_fraction` of it at step
    `decay_steps` (counted from step 0, warm-up included), flat at that value after."""

    learning_rate: float
    warmup_steps: int
    decay_steps: int
    final_lr_fraction: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float = 1e-8
    clip_norm: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.warmup_steps < self.decay_steps:
            raise ValueError(
                f"the schedule needs 0 <= warm-up < decay horizon, got warm-up {self.warmup_steps} "
                f"and decay horizon {self.decay_steps} steps (set --warmup or --decay-steps)"
            )

    def schedule(self) -> optax.Schedule:
        """The learning rate at each step."""
        return optax.warmup_cosine_decay_schedule(
            0.0, self.learning_rate, self.warmup_steps, self.decay_steps, self.learning_rate * self.final_lr_fraction
        )


PRESETS = ("gpt1", *GPT2_AS_GPT3, *GPT3_TRAINING, "vit-imagenet")


def recipe(name: str, *, batch: int, steps: int, context_length: int | None = None) -> Recipe:
    """The recipe of preset `name` (one of PRESETS) for a run of `steps` steps of `batch` rows
    (of `context_length` tokens: GPT-3's horizons are in tokens)."""
    if name in GPT3_TRAINING:  # Table 2.1 and appendix B: cosine to 10% over 260B tokens, then flat
        if context_length is None:
            raise ValueError(f"{name}'s schedule is in tokens: give context_length")
        tokens = batch * context_length
        return Recipe(
            GPT3_TRAINING[name].learning_rate,
            round(GPT3_WARMUP_TOKENS / tokens),
            round(GPT3_DECAY_TOKENS / tokens),
            final_lr_fraction=0.1,
            weight_decay=0.1,
            betas=(0.9, 0.95),
        )
    if name in GPT2_AS_GPT3:
        # The GPT-2 paper gives no recipe (its learning rates were tuned, unpublished). Ours is the
        # GPT-2 reproductions' (nanoGPT): GPT-3's optimizer and the same-size GPT-3 learning rate,
        # 2,000 warm-up steps, cosine to 10% at the end of the run.
        return Recipe(
            GPT3_TRAINING[GPT2_AS_GPT3[name]].learning_rate,
            2000,
            _run_length(steps, 2000),
            final_lr_fraction=0.1,
            weight_decay=0.1,
            betas=(0.9, 0.95),
        )
    if name == "gpt1":
        # Radford et al., 2018: Adam 2.5e-4, 2,000 warm-up steps, cosine to 0, weight decay 0.01;
        # betas, eps and clipping from the released code (finetune-transformer-lm).
        return Recipe(
            2.5e-4, 2000, _run_length(steps, 2000), final_lr_fraction=0.0, weight_decay=0.01, betas=(0.9, 0.999)
        )
    if name == "vit-imagenet":
        # Dosovitskiy et al., 2020, Table 3 (ViT on ImageNet from scratch): Adam (0.9, 0.999),
        # 3e-3 at batch 4096 (ours: scaled linearly with the batch), 10k warm-up steps, cosine to 0,
        # weight decay 0.3, clipping at global norm 1.
        return Recipe(
            3e-3 * batch / VIT_BATCH,
            10_000,
            _run_length(steps, 10_000),
            final_lr_fraction=0.0,
            weight_decay=0.3,
            betas=(0.9, 0.999),
        )
    raise ValueError(f"unknown recipe {name!r}; the recipes: {', '.join(PRESETS)}")


def batch_tokens(name: str) -> float:
    """The paper's batch in tokens for a GPT preset: GPT-3's Table 2.1, GPT-2's 512 x 1024,
    GPT-1's 64 x 512."""
    if name in GPT3_TRAINING:
        return GPT3_TRAINING[name].batch_tokens
    return 64 * 512 if name == "gpt1" else 512 * 1024


def _run_length(steps: int, warmup: int) -> int:
    """A horizon at the end of the run, or one step past warm-up when the run is shorter."""
    return max(steps, warmup + 1)


def decayed(params: Any) -> Any:
    """A tree like `params` of bools: True where weight decay applies (see the module's docstring)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _name(path[-1]) in DECAYED_NAMES, params)


def _name(key: Any) -> Any:
    """The name a tree path entry stands for (a dict key or an attribute)."""
    return getattr(key, "key", getattr(key, "name", None))


def optimizer(recipe: Recipe) -> optax.GradientTransformation:
    """The recipe as optax: global-norm clipping, then AdamW whose injected hyperparameters record
    the learning rate each update used (see `zoo.train.steps.learning_rate`)."""
    return optax.chain(
        optax.clip_by_global_norm(recipe.clip_norm),
        optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
            learning_rate=recipe.schedule(),
            b1=recipe.betas[0],
            b2=recipe.betas[1],
            eps=recipe.eps,
            weight_decay=recipe.weight_decay,
            mask=decayed,
        ),
    )
