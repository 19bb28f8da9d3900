"""Training tasks the experiments build: a GPT on packed token rows, a GPT fine-tuned on encoded
labelled examples, a ViT on labelled images, InstructGPT's three stages (supervised chat,
the reward model, PPO), and the image + text models (image-to-text, contrastive)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from zoo.adaptation import finetune
from zoo.adaptation.finetune import Classifier
from zoo.alignment import chat, ppo, reward
from zoo.alignment.reward import RewardModel
from zoo.data.text import ArrayPipeline, StepPipeline, TextPipeline, check_token_ids
from zoo.models import image_to_text, two_tower
from zoo.models.gpt import GPT, GPTConfig
from zoo.models.image_to_text import ImageToText
from zoo.models.two_tower import TwoTower
from zoo.models.vit import ViT
from zoo.train.loop import Task
from zoo.train.metrics import gpt_flops_per_token, vit_flops_per_image
from zoo.train.steps import classification_loss, next_token_loss


def _process_slice() -> dict[str, int]:
    return {"process_index": jax.process_index(), "process_count": jax.process_count()}


def evaluation_batches(pipeline: StepPipeline, max_batches: int | None) -> Callable[[], Iterator[Any]] | None:
    """A function yielding the first `max_batches` (all, if None) unshuffled batches, or None when
    `max_batches` is 0 (no evaluation). A split smaller than one batch is refused here, at start-up,
    rather than after the training."""
    if max_batches == 0:
        return None
    if pipeline.steps_per_epoch == 0:
        raise ValueError(
            f"the evaluation split holds {pipeline.size} rows, fewer than one evaluation batch of "
            f"{pipeline.global_batch}: evaluate with a smaller batch (--eval-batch) or not at all "
            f"(--eval-batches 0)"
        )
    count = pipeline.steps_per_epoch if max_batches is None else min(max_batches, pipeline.steps_per_epoch)
    return lambda: (pipeline.batch_at(step) for step in range(count))


def _array_batches(
    train: dict[str, np.ndarray],
    evaluate: dict[str, np.ndarray],
    cfg: GPTConfig,
    global_batch: int,
    seed: int,
    what: str,
    eval_batches: int | None,
) -> tuple[Callable[[int], Any], Callable[[], Iterator[Any]] | None]:
    """(train_batch, eval_batches) of encoded arrays (a "tokens" entry among them, its ids checked
    against the model's vocabulary), this process's rows of each global batch."""
    for name, arrays in (("training", train), ("evaluation", evaluate)):
        check_token_ids(arrays["tokens"], cfg.vocab_size, f"{name} {what}")
    train_pipeline = ArrayPipeline(train, global_batch, seed, **_process_slice())
    eval_pipeline = ArrayPipeline(evaluate, global_batch, seed, shuffle=False, **_process_slice())
    return train_pipeline.batch_at, evaluation_batches(eval_pipeline, eval_batches)


def language_model(
    model: GPT,
    train_rows: np.ndarray,
    eval_rows: np.ndarray,
    global_batch: int,
    seed: int,
    eval_batches: int | None = 20,
    eval_batch: int | None = None,
) -> Task:
    """Next-token prediction on rows of context_length + 1 tokens; evaluation on `eval_batches`
    batches of `eval_batch` rows (default: the training batch)."""
    cfg = model.cfg
    for name, rows in (("training", train_rows), ("validation", eval_rows)):
        if rows.shape[1] != cfg.context_length + 1:
            raise ValueError(
                f"{name} rows of {rows.shape[1]} tokens; the model needs context_length + 1 = {cfg.context_length + 1}"
            )
        check_token_ids(rows, cfg.vocab_size, name)
    train = TextPipeline(train_rows, global_batch, seed, **_process_slice())
    evaluate = TextPipeline(eval_rows, eval_batch or global_batch, seed, shuffle=False, **_process_slice())
    return Task(
        model=model,
        loss_fn=next_token_loss,
        example_input=np.zeros((1, cfg.context_length), np.int32),
        train_batch=train.batch_at,
        eval_batches=evaluation_batches(evaluate, eval_batches),
        global_rows=global_batch,
        flops_per_row=gpt_flops_per_token(cfg) * cfg.context_length,
        items_per_row=cfg.context_length,
        item_name="tokens",
    )


def text_classifier(
    model: Classifier,
    train: dict[str, np.ndarray],
    evaluate: dict[str, np.ndarray],
    global_batch: int,
    seed: int,
    lm_weight: float = 0.5,
    eval_batches: int | None = None,
) -> Task:
    """GPT-1's fine-tuning on encoded examples (`zoo.adaptation.finetune.encode`): the task loss plus
    `lm_weight` times the LM loss; reports accuracy."""
    tokens = train["tokens"]
    train_batch, eval_batches = _array_batches(train, evaluate, model.cfg, global_batch, seed, "examples", eval_batches)
    return Task(
        model=model,
        loss_fn=finetune.loss(lm_weight),
        example_input={key: value[:1] for key, value in train.items()},
        train_batch=train_batch,
        eval_batches=eval_batches,
        global_rows=global_batch,
        flops_per_row=gpt_flops_per_token(model.cfg) * tokens.shape[1] * tokens.shape[2],
        items_per_row=1,
        item_name="examples",
    )


def image_classifier(model: ViT, train: StepPipeline, evaluate: StepPipeline, eval_batches: int | None = None) -> Task:
    """Cross-entropy on {"image", "label"} batches; reports accuracy too."""
    cfg = model.cfg
    return Task(
        model=model,
        loss_fn=classification_loss,
        example_input=np.zeros((1, *cfg.image_size, cfg.num_channels), np.float32),
        train_batch=train.batch_at,
        eval_batches=evaluation_batches(evaluate, eval_batches),
        global_rows=train.global_batch,
        flops_per_row=vit_flops_per_image(cfg),
        items_per_row=1,
        item_name="images",
    )


def supervised_chat(
    model: GPT,
    train: dict[str, np.ndarray],
    evaluate: dict[str, np.ndarray],
    global_batch: int,
    seed: int,
    eval_batches: int | None = None,
) -> Task:
    """Supervised fine-tuning on encoded conversations (`zoo.alignment.chat.encode`): the next-token
    loss on the assistant's tokens only."""
    cfg = model.cfg
    train_batch, eval_batches = _array_batches(train, evaluate, cfg, global_batch, seed, "conversations", eval_batches)
    length = train["tokens"].shape[1] - 1
    return Task(
        model=model,
        loss_fn=chat.loss,
        example_input=train["tokens"][:1, :-1],
        train_batch=train_batch,
        eval_batches=eval_batches,
        global_rows=global_batch,
        flops_per_row=gpt_flops_per_token(cfg) * length,
        items_per_row=length,
    )


def reward_model(
    model: RewardModel,
    train: dict[str, np.ndarray],
    evaluate: dict[str, np.ndarray],
    global_batch: int,
    seed: int,
    eval_batches: int | None = None,
) -> Task:
    """The reward model on encoded comparisons (`zoo.alignment.reward.encode`), every pair of a
    prompt's K responses in the same batch; reports pairwise accuracy."""
    train_batch, eval_batches = _array_batches(
        train, evaluate, model.cfg, global_batch, seed, "comparisons", eval_batches
    )
    _, k, length = train["tokens"].shape
    return Task(
        model=model,
        loss_fn=reward.loss,
        example_input=train["tokens"][:1, 0],
        train_batch=train_batch,
        eval_batches=eval_batches,
        global_rows=global_batch,
        flops_per_row=gpt_flops_per_token(model.cfg) * k * length,
        items_per_row=k,
        item_name="responses",
    )


def proximal_policy(
    policy: GPT,
    config: ppo.PPOConfig,
    prompts: dict[str, np.ndarray],
    pretraining: np.ndarray,
    held_out: np.ndarray,
    global_batch: int,
    seed: int,
    constants: dict,
    start_params: Callable[[Any], Any],
    stop_token: int,
    true_score: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    eval_batches: int | None = 8,
) -> Task:
    """PPO(-ptx) of `policy` on batches of `prompts` ({"prompt", "length", "instruction"}) beside
    rows of the pretraining corpus; the value model is a `RewardModel` of the policy's shape.
    `constants` = {"reference", "reward"} (laid out on the mesh); `start_params(fresh)` gives
    {"policy", "value"} to start from. Evaluation: the policy's next-token loss on `held_out`
    pretraining rows (what PPO-ptx keeps low)."""
    critic = RewardModel(policy.cfg)
    check_token_ids(pretraining, policy.cfg.vocab_size, "pretraining rows")
    tokens = prompts["prompt"].shape[1] + config.response_tokens
    if tokens > policy.cfg.context_length:
        raise ValueError(
            f"prompts of {prompts['prompt'].shape[1]} tokens and responses of {config.response_tokens} exceed "
            f"context_length={policy.cfg.context_length}"
        )
    prompt_pipeline = ArrayPipeline(prompts, global_batch, seed, **_process_slice())
    ptx_pipeline = TextPipeline(pretraining, global_batch, seed, **_process_slice())
    held_out_pipeline = TextPipeline(held_out, global_batch, seed, shuffle=False, **_process_slice())

    def init_params(key: jax.Array) -> dict:
        example = prompts["prompt"][:1]
        return {"policy": policy.init(key, example)["params"], "value": critic.init(key, example)["params"]}

    per_token = gpt_flops_per_token(policy.cfg)  # training FLOPs; a forward pass is a third
    forward_tokens = config.response_tokens + 4 * tokens  # generation, then policy, reference, value, reward
    trained_tokens = config.epochs * (2 * tokens + (pretraining.shape[1] if config.ptx_coef else 0))
    return Task(
        model=policy,
        loss_fn=lambda model, params, batch, **kwargs: next_token_loss(model, params["policy"], batch, **kwargs),
        example_input=prompts["prompt"][:1],
        train_batch=lambda step: {**prompt_pipeline.batch_at(step), "ptx": ptx_pipeline.batch_at(step)},
        eval_batches=evaluation_batches(held_out_pipeline, eval_batches),
        global_rows=global_batch,
        flops_per_row=per_token * (forward_tokens / 3 + trained_tokens),
        items_per_row=1,
        item_name="prompts",
        init_params=init_params,
        start_params=start_params,
        train_step=ppo.train_step(policy, critic, config, stop_token, true_score),
        constants=constants,
    )


def _image_text_task(
    model: ImageToText | TwoTower,
    loss_fn: Callable,
    example: tuple[np.ndarray, ...],
    train: dict[str, np.ndarray],
    evaluate: dict[str, np.ndarray],
    global_batch: int,
    seed: int,
    eval_batches: int | None,
    start_params: Callable[[Any], Any] | None,
    text_positions: int,
) -> Task:
    """A task on encoded image + text arrays, the model's params initialised from the `example` inputs;
    the text tower runs over `text_positions` positions a row."""
    train_batch, eval_batches = _array_batches(
        train, evaluate, model.cfg.text, global_batch, seed, "image texts", eval_batches
    )
    cfg = model.cfg
    flops = vit_flops_per_image(cfg.vision) + gpt_flops_per_token(cfg.text) * text_positions
    return Task(
        model=model,
        loss_fn=loss_fn,
        example_input=example,
        train_batch=train_batch,
        eval_batches=eval_batches,
        global_rows=global_batch,
        flops_per_row=flops,
        items_per_row=1,
        item_name="images",
        init_params=lambda key: model.init(key, *example)["params"],
        start_params=start_params,
    )


def image_captioning(
    model: ImageToText,
    train: dict[str, np.ndarray],
    evaluate: dict[str, np.ndarray],
    global_batch: int,
    seed: int,
    eval_batches: int | None = None,
    start_params: Callable[[Any], Any] | None = None,
) -> Task:
    """The image-to-text model on `image_to_text.encode` batches: the next-token loss on the answers
    only, with image and prompt as the bidirectional prefix."""
    example = (train["image"][:1], train["tokens"][:1, :-1], train["prompt_lengths"][:1])
    positions = model.cfg.num_image_tokens + example[1].shape[1]  # the decoder reads the image tokens too
    return _image_text_task(
        model, image_to_text.loss, example, train, evaluate, global_batch, seed, eval_batches, start_params, positions
    )


def contrastive(
    model: TwoTower,
    train: dict[str, np.ndarray],
    evaluate: dict[str, np.ndarray],
    global_batch: int,
    seed: int,
    eval_batches: int | None = None,
    start_params: Callable[[Any], Any] | None = None,
) -> Task:
    """The two-tower model on {"image", "tokens", "lengths"} batches: the config's contrastive loss
    over each global batch."""
    example = (train["image"][:1], train["tokens"][:1], train["lengths"][:1])
    return _image_text_task(
        model,
        two_tower.loss,
        example,
        train,
        evaluate,
        global_batch,
        seed,
        eval_batches,
        start_params,
        example[1].shape[1],
    )
