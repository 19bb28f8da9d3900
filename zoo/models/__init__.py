"""Model families: one file each."""

from zoo.models.gpt import GPT, GPTConfig
from zoo.models.vit import ViT, ViTConfig

__all__ = ["GPT", "GPTConfig", "ViT", "ViTConfig"]
