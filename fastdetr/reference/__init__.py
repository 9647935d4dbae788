"""fastdetr.reference: plain-PyTorch DETR, the specification every fused path is tested against.

Built only from torch.nn.MultiheadAttention, nn.Linear, nn.LayerNorm and
nn.Conv2d (plus the ops between them); module and parameter names follow the
original DETR so its checkpoints load unchanged.
"""
from . import deformable_attention
from .backbone import Backbone, FrozenBatchNorm2d, Joiner, ResNetBody
from .deformable_detr import DeformableDETR, DeformableTransformer, MSDeformAttn
from .detr import DETR, MLP, PostProcess
from .position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine
from .transformer import (
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

__all__ = [
    "deformable_attention", "Backbone", "FrozenBatchNorm2d", "Joiner", "ResNetBody", "DETR", "MLP", "PostProcess",
    "PositionEmbeddingLearned", "PositionEmbeddingSine", "Transformer", "TransformerDecoder",
    "TransformerDecoderLayer", "TransformerEncoder", "TransformerEncoderLayer",
    "DeformableDETR", "DeformableTransformer", "MSDeformAttn",
]
