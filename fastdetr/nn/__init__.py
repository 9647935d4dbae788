"""fastdetr.nn: drop-in modules whose forward runs fastdetr's fused kernels.

Each subclasses (or mirrors) the module it replaces, with the same parameters
and state_dict, so checkpoints and optimizer state carry over.
"""
from .attention import MultiheadAttention
from .transformer import TransformerDecoderLayer, TransformerEncoderLayer

__all__ = ["MultiheadAttention", "TransformerEncoderLayer", "TransformerDecoderLayer"]
