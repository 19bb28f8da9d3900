"""Training tasks the experiments build: a GPT on packed token rows, a ViT on labelled images."""

from __future__ import annotations

import jax
import numpy as np

from zoo.data.text import StepPipeline, TextPipeline
from zoo.models.gpt import GPT
from zoo.models.vit import ViT
from zoo.train.loop import Task
from zoo.train.metrics import gpt_flops_per_token, vit_flops_per_image
from zoo.train.steps import classification_loss, next_token_loss


def _process_slice() -> dict[str, int]:
    return {"process_index": jax.process_index(), "process_count": jax.process_count()}


def evaluation_batches(pipeline: StepPipeline, max_batches: int | None):
    """A function yielding the first `max_batches` (all, if None) unshuffled batches."""
    count = pipeline.steps_per_epoch if max_batches is None else min(max_batches, pipeline.steps_per_epoch)
    return lambda: (pipeline.batch_at(step) for step in range(count))


def language_model(model: GPT, train_rows: np.ndarray, eval_rows: np.ndarray, global_batch: int, seed: int,
                   eval_batches: int | None = 20) -> Task:
    """Next-token prediction on rows of context_length + 1 tokens."""
    cfg = model.cfg
    if train_rows.shape[1] != cfg.context_length + 1:
        raise ValueError(f"rows of {train_rows.shape[1]} tokens; the model needs context_length + 1 = "
                         f"{cfg.context_length + 1}")
    if int(train_rows.max()) >= cfg.vocab_size:
        raise ValueError(f"token id {int(train_rows.max())} >= the model's vocab_size={cfg.vocab_size}: "
                         f"the tokenizer and the model disagree")
    train = TextPipeline(train_rows, global_batch, seed, **_process_slice())
    evaluate = TextPipeline(eval_rows, global_batch, seed, shuffle=False, **_process_slice())
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
