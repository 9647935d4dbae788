"""Position embeddings for the feature map: fixed sine (DETR's default) and learned.

The sine embedding is built from cumulative sums over unpadded pixels, so each
image's embedding covers its own extent, not the padded batch's.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine embedding of (y, x), `num_pos_feats` features per axis (128 for d_model 256).

    With `normalize`, positions are scaled to (0, scale] per image by dividing
    by the last unpadded row/column's cumulative count (+ eps 1e-6). Frequencies
    follow temperature ** (2 * (i // 2) / num_pos_feats). `offset` is added to
    the cumulative counts before that division: 0 in DETR, -0.5 in Deformable
    DETR (pixel centres).
    """

    offset: float = 0.0   # a class default too, so that modules pickled before it existed load

    def __init__(self, num_pos_feats: int = 64, temperature: float = 10000, normalize: bool = False,
                 scale: float | None = None, offset: float = 0.0):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self.offset = offset

    def forward(self, features: Tensor, mask: Tensor) -> Tensor:
        """features (B, C, h, w) (only its device is used), mask (B, h, w) True on padding -> (B, 2F, h, w) fp32."""
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_last, x_last = y_embed[:, -1:, :], x_embed[:, :, -1:]
            if self.offset:
                y_embed, x_embed = y_embed + self.offset, x_embed + self.offset
            y_embed = y_embed / (y_last + eps) * self.scale
            x_embed = x_embed / (x_last + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=features.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        # Interleave sin of even and cos of odd frequencies.
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute embedding: one table per axis, feature maps up to 50 x 50."""

    def __init__(self, num_pos_feats: int = 256, max_size: int = 50):
        super().__init__()
        self.row_embed = nn.Embedding(max_size, num_pos_feats)
        self.col_embed = nn.Embedding(max_size, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, features: Tensor, mask: Tensor) -> Tensor:
        """features (B, C, h, w) -> (B, 2F, h, w); the mask is not used (absolute positions)."""
        height, width = features.shape[-2:]
        max_size = self.row_embed.num_embeddings
        if height > max_size or width > max_size:
            raise ValueError(
                f"PositionEmbeddingLearned covers feature maps up to {max_size} x {max_size}, "
                f"got {height} x {width}"
            )
        x_emb = self.col_embed(torch.arange(width, device=features.device))
        y_emb = self.row_embed(torch.arange(height, device=features.device))
        pos = torch.cat(
            (x_emb.unsqueeze(0).expand(height, -1, -1), y_emb.unsqueeze(1).expand(-1, width, -1)), dim=-1
        )
        return pos.permute(2, 0, 1).unsqueeze(0).expand(features.shape[0], -1, -1, -1)
