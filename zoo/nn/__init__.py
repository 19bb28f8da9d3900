"""Building blocks: attention (dense, banded, fused kernels) and the Transformer block."""

from zoo.nn.dot_product_attention import attention, banded_attention, choose_implementation, dense_attention
from zoo.nn.transformer import MLP, Block, SelfAttention

__all__ = [
    "MLP",
    "Block",
    "SelfAttention",
    "attention",
    "banded_attention",
    "choose_implementation",
    "dense_attention",
]
