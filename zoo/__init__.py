"""zoo: GPT-1/2/3 and ViT as pure Flax modules, with exact O(T·w) banded attention."""

from zoo import configs, interop, models, nn
from zoo.generation import generate
from zoo.models import GPT, GPTConfig, ViT, ViTConfig
from zoo.runs import load

__all__ = ["GPT", "GPTConfig", "ViT", "ViTConfig", "configs", "generate", "interop", "load", "models", "nn"]
