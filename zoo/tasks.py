"""Training tasks the experiments build: a GPT on packed token rows, a GPT fine-tuned on encoded
labelled examples, a ViT on labelled images."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from zoo.adaptation import finetune
from zoo.adaptation.finetune import Classifier
from zoo.data.text import ArrayPipeline, StepPipeline, TextPipeline, check_token_ids
from zoo.models.gpt import GPT
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
    for name, arrays in (("training", train), ("evaluation", evaluate)):
        check_token_ids(arrays["tokens"], model.cfg.vocab_size, f"{name} examples")
    train_pipeline = ArrayPipeline(train, global_batch, seed, **_process_slice())
    eval_pipeline = ArrayPipeline(evaluate, global_batch, seed, shuffle=False, **_process_slice())
    return Task(
        model=model,
        loss_fn=finetune.loss(lm_weight),
        example_input={key: value[:1] for key, value in train.items()},
        train_batch=train_pipeline.batch_at,
        eval_batches=evaluation_batches(eval_pipeline, eval_batches),
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
