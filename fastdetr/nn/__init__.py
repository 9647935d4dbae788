"""fastdetr.nn: drop-in modules whose forward runs fastdetr's fused kernels.

Each subclasses (or mirrors) the module it replaces, with the same parameters
and state_dict, so checkpoints and optimizer state carry over. `functional`
is the one place they (and the matcher) call kernels from and decide when;
`convert` holds `fastdetr.optimize`, which swaps a model's modules to these classes.
"""
from . import functional
from .attention import MultiheadAttention
from .deformable_attention import MultiScaleDeformableAttention
from .deformable_transformer import DeformableTransformerDecoderLayer, DeformableTransformerEncoderLayer
from .transformer import TransformerDecoder, TransformerDecoderLayer, TransformerEncoder, TransformerEncoderLayer

__all__ = ["functional", "MultiheadAttention", "MultiScaleDeformableAttention", "TransformerEncoderLayer",
           "TransformerDecoderLayer", "TransformerEncoder", "TransformerDecoder", "DeformableTransformerEncoderLayer",
           "DeformableTransformerDecoderLayer"]
