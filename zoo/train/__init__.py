"""Training: losses, GPT-3's optimizer, compiled steps, metrics and the loop."""

from zoo.train.loop import LoopConfig, Task, train
from zoo.train.steps import (
    adamw,
    classification_loss,
    eval_step_fn,
    learning_rate,
    next_token_loss,
    train_state,
    train_step_fn,
)

__all__ = [
    "LoopConfig",
    "Task",
    "adamw",
    "classification_loss",
    "eval_step_fn",
    "learning_rate",
    "next_token_loss",
    "train",
    "train_state",
    "train_step_fn",
]
