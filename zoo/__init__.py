"""zoo: GPT-1/2/3 and ViT as pure Flax modules, with exact O(T·w) banded attention."""

from zoo import adaptation, configs, interop, models, nn
from zoo.adaptation import lora
from zoo.generation import generate
from zoo.models import GPT, GPTConfig, ViT, ViTConfig
from zoo.runs import load

__all__ = [
    "GPT",
    "GPTConfig",
    "ViT",
    "ViTConfig",
    "adaptation",
    "configs",
    "generate",
    "interop",
    "load",
    "lora",
    "models",
    "nn",
]
