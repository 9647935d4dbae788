"""Deformable DETR in plain PyTorch: fundamentalvision/Deformable-DETR's model, module for module.

The same modules, names, initialisation and forward as the official models/deformable_detr.py,
deformable_transformer.py, backbone.py and ops/modules/ms_deform_attn.py, so the official
checkpoints (num_classes 91) strict-load. How it differs:
- built from a `DeformableDETRConfig`; takes every input form `fastdetr.DETR` takes (a list of
  differently sized images, a batch tensor, a (tensor, mask) pair, a NestedTensor-like object);
- the backbone is `fastdetr.reference.Backbone`'s ResNet (torchvision key names, no torchvision),
  so resnet18/34 work too (the official hard-codes ResNet-50's channels); `MSDeformAttn` samples
  with `fastdetr.reference.deformable_attention.ms_deform_attn` (grid_sample per level) where the
  official calls its CUDA extension; `fastdetr.optimize` turns it into
  `fastdetr.nn.MultiScaleDeformableAttention` (the fused kernels), same parameters;
- two-stage: the proposals' sine embedding has d_model / 2 features per coordinate (the official
  hard-codes 128, the same at d_model 256), so narrower models work;
- traceable for ONNX export (`fastdetr.export_onnx`): the levels' sizes come from the feature maps'
  shapes, not host ints, while tracing (`_level_sizes`), and pixel grids are `arange` + offset where the
  official calls linspace with int sizes (the same floats: every step is exactly 1).

Layouts are batch-first, as the official: tokens (B, S, d_model) with S = sum of H_l * W_l over the
levels, stacked in order; queries (B, Q, d_model). Masks are True on padding.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..deformable_config import DeformableDETRConfig
from ..nested import to_image_batch
from .backbone import Backbone
from .deformable_attention import ms_deform_attn, sampling_locations, tracing
from .detr import MLP, as_target_sizes, check_image_dtype
from .position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine
from .transformer import _activation


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """log(x / (1 - x)) with x clamped to [0, 1] and both terms to >= eps, as the official."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _clones(module: nn.Module, count: int) -> nn.ModuleList:
    return nn.ModuleList(copy.deepcopy(module) for _ in range(count))


# (level sizes, device) -> the (L, 2) tensor of those sizes, made once: a forward then copies nothing to the
# device, and a captured CUDA graph replays with a tensor allocated before the capture
_SHAPES: dict[tuple[tuple[tuple[int, int], ...], str], Tensor] = {}


def _spatial_shapes(srcs: list[Tensor], device: torch.device) -> Tensor:
    """(L, 2) int64 (H_l, W_l) of the levels; while tracing from their Shape ops, so an export stays dynamic.

    Otherwise one tensor per (sizes, device), kept (never written in place), carrying the sizes as host ints
    (`_level_sizes` reads them there: no device-to-host copy)."""
    if tracing():
        return torch.stack([torch.stack(list(src.shape[-2:])) for src in srcs]).to(device)
    sizes = tuple((int(src.shape[-2]), int(src.shape[-1])) for src in srcs)
    key = (sizes, str(device))
    if key not in _SHAPES:
        if len(_SHAPES) > 1024:   # many image sizes (dynamic shapes): keep the cache bounded
            _SHAPES.clear()
        shapes = torch.as_tensor(sizes, dtype=torch.long, device=device)
        shapes.level_sizes = sizes
        _SHAPES[key] = shapes
    return _SHAPES[key]


def _level_sizes(spatial_shapes: Tensor) -> list[tuple[Any, Any]]:
    """Each level's (H_l, W_l) from spatial_shapes (L, 2): ints (from the host copy `_spatial_shapes` attaches,
    else read from the tensor), or while tracing 0-d tensors the trace records."""
    if tracing():
        return [tuple(shape.unbind(0)) for shape in spatial_shapes.unbind(0)]
    known = getattr(spatial_shapes, "level_sizes", None)
    if known is not None:
        return list(known)
    return [(height, width) for height, width in spatial_shapes.tolist()]


def _pixel_grid(size: Any, offset: float, device: torch.device) -> Tensor:
    """(size,) float32 offset, offset + 1, ...: the official's linspace(offset, size - 1 + offset, size), exactly."""
    return torch.arange(size, dtype=torch.float32, device=device) + offset


class MSDeformAttn(nn.Module):
    """The official multi-scale deformable attention module: (N, Lq, d_model) -> (N, Lq, d_model).

    Parameters, initialisation and forward as `fastdetr.nn.MultiScaleDeformableAttention`
    (whose docstring states the math), the sampling in plain PyTorch.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model must be divisible by n_heads, but got {d_model} and {n_heads}")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Head m's points start in direction 2*pi*m/M (larger of |dx|, |dy| = 1), point p at p + 1 times
        that on every level; zero offset weights and attention logits; xavier projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([thetas.cos(), thetas.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        scales = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, self.n_points, 1)
        pattern = (directions.view(self.n_heads, 1, 1, 2) * scales).expand(self.n_heads, self.n_levels, -1, -1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(pattern.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: Tensor, reference_points: Tensor, input_flatten: Tensor, input_spatial_shapes: Tensor,
                input_level_start_index: Tensor, input_padding_mask: Tensor | None = None) -> Tensor:
        """query (N, Lq, C); reference_points (N, Lq, L, 2) (x, y) or (N, Lq, L, 4) (x, y, w, h) in [0, 1];
        input_flatten (N, S, C); input_spatial_shapes (L, 2) (H, W); input_level_start_index (L,);
        input_padding_mask (N, S) True on padding, or None. -> (N, Lq, C)."""
        return self.output_proj(self.sample(query, reference_points, input_flatten, input_spatial_shapes,
                                            input_level_start_index, input_padding_mask))

    def sample(self, query: Tensor, reference_points: Tensor, input_flatten: Tensor, input_spatial_shapes: Tensor,
               input_level_start_index: Tensor, input_padding_mask: Tensor | None = None) -> Tensor:
        """The forward up to, not including, output_proj: the heads' sampled values (N, Lq, C). A fused layer
        adds output_proj inside its residual + LayerNorm kernel."""
        batch, queries, _ = query.shape
        tokens = input_flatten.shape[1]
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(batch, tokens, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(batch, queries, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(batch, queries, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(batch, queries, self.n_heads, self.n_levels, self.n_points)
        locations = sampling_locations(reference_points, offsets, input_spatial_shapes)
        return ms_deform_attn(value, input_spatial_shapes, input_level_start_index, locations, weights)


class DeformableTransformerEncoderLayer(nn.Module):
    """MSDA self-attention (query = src + pos, value = src) and FFN, each with residual, dropout and LayerNorm."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, activation: str = "relu",
                 n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = _activation(activation)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """src, pos (B, S, d); reference_points (B, S, L, 2) -> (B, S, d)."""
        attended = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(attended))
        ffn = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class DeformableTransformerEncoder(nn.Module):
    def __init__(self, encoder_layer: DeformableTransformerEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = _clones(encoder_layer, num_layers)
        self.num_layers = num_layers

    @staticmethod
    def get_reference_points(spatial_shapes: Tensor, valid_ratios: Tensor, device: torch.device) -> Tensor:
        """Each token's pixel centre as a fraction of its image's valid area, seen from every level:
        (B, S, L, 2) as (x, y), from spatial_shapes (L, 2) and valid_ratios (B, L, 2) (w, h)."""
        per_level = []
        for level, (height, width) in enumerate(_level_sizes(spatial_shapes)):
            ref_y, ref_x = torch.meshgrid(_pixel_grid(height, 0.5, device), _pixel_grid(width, 0.5, device),
                                          indexing="ij")
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * height)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * width)
            per_level.append(torch.stack((ref_x, ref_y), -1))
        return torch.cat(per_level, 1)[:, :, None] * valid_ratios[:, None]

    def forward(self, src: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, valid_ratios: Tensor,
                pos: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """src, pos (B, S, d) -> memory (B, S, d)."""
        reference_points = self.get_reference_points(spatial_shapes, valid_ratios, device=src.device)
        output = src
        for layer in self.layers:
            output = layer(output, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return output


class DeformableTransformerDecoderLayer(nn.Module):
    """Self-attention (nn.MultiheadAttention, q = k = tgt + query_pos), MSDA cross-attention on the memory,
    FFN; each with residual, dropout and LayerNorm (official names: norm2 after self-, norm1 after cross-)."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, activation: str = "relu",
                 n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = _activation(activation)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, src: Tensor,
                src_spatial_shapes: Tensor, level_start_index: Tensor, src_padding_mask: Tensor | None = None
                ) -> Tensor:
        """tgt, query_pos (B, Q, d); reference_points (B, Q, L, 2 or 4); src (B, S, d) -> (B, Q, d)."""
        tgt = self.self_attention_block(tgt, query_pos)
        attended = self.cross_attn(tgt + query_pos, reference_points, src, src_spatial_shapes, level_start_index,
                                   src_padding_mask)
        tgt = self.norm1(tgt + self.dropout1(attended))
        ffn = self.linear2(self.dropout3(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(ffn))


    def self_attention_block(self, tgt: Tensor, query_pos: Tensor) -> Tensor:
        """norm2(tgt + dropout2(self_attn(q = k = tgt + query_pos, v = tgt))), batch-first (B, Q, d) in and out
        (the module is sequence-first, as the official)."""
        q = k = (tgt + query_pos).transpose(0, 1)
        attended = self.self_attn(q, k, tgt.transpose(0, 1))[0].transpose(0, 1)
        return self.norm2(tgt + self.dropout2(attended))


class DeformableTransformerDecoder(nn.Module):
    """The decoder layers; with box refinement (`bbox_embed` set by the model) each layer's box head moves the
    reference points for the next (detached). Returns every layer's output and reference points."""

    def __init__(self, decoder_layer: DeformableTransformerDecoderLayer, num_layers: int,
                 return_intermediate: bool = True):
        super().__init__()
        self.layers = _clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.return_intermediate = return_intermediate
        # set by DeformableDETR (registered then, after `layers`, as in the official state_dict)
        self.bbox_embed: nn.ModuleList | None = None
        self.class_embed: nn.ModuleList | None = None

    def forward(self, tgt: Tensor, reference_points: Tensor, src: Tensor, src_spatial_shapes: Tensor,
                src_level_start_index: Tensor, src_valid_ratios: Tensor, query_pos: Tensor,
                src_padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """tgt, query_pos (B, Q, d); reference_points (B, Q, 2 or 4) in [0, 1] of the valid area ->
        hs (layers, B, Q, d), references (layers, B, Q, 2 or 4) (each layer's output points), or the last
        layer's alone (no leading dim) without return_intermediate."""
        output = tgt
        intermediate, intermediate_reference_points = [], []
        for lid, layer in enumerate(self.layers):
            # to each level's own coordinates, where the padding is part of the map
            ratios = src_valid_ratios if reference_points.shape[-1] == 2 else torch.cat([src_valid_ratios] * 2, -1)
            output = layer(output, query_pos, reference_points[:, :, None] * ratios[:, None], src,
                           src_spatial_shapes, src_level_start_index, src_padding_mask)
            if self.bbox_embed is not None:
                delta = self.bbox_embed[lid](output)
                if reference_points.shape[-1] == 4:
                    refined = delta + inverse_sigmoid(reference_points)
                else:
                    refined = torch.cat([delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]], -1)
                reference_points = refined.sigmoid().detach()
            if self.return_intermediate:
                intermediate.append(output)
                intermediate_reference_points.append(reference_points)
        if self.return_intermediate:
            return torch.stack(intermediate), torch.stack(intermediate_reference_points)
        return output, reference_points


class DeformableTransformer(nn.Module):
    """Encoder over the flattened levels, then decoder queries: learned (query_embed) or, two-stage, the top-k
    encoder proposals."""

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 1024, dropout: float = 0.1, activation: str = "relu",
                 return_intermediate_dec: bool = True, num_feature_levels: int = 4, dec_n_points: int = 4,
                 enc_n_points: int = 4, two_stage: bool = False, two_stage_num_proposals: int = 300):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        encoder_layer = DeformableTransformerEncoderLayer(d_model, dim_feedforward, dropout, activation,
                                                          num_feature_levels, nhead, enc_n_points)
        self.encoder = DeformableTransformerEncoder(encoder_layer, num_encoder_layers)
        decoder_layer = DeformableTransformerDecoderLayer(d_model, dim_feedforward, dropout, activation,
                                                          num_feature_levels, nhead, dec_n_points)
        self.decoder = DeformableTransformerDecoder(decoder_layer, num_decoder_layers, return_intermediate_dec)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for param in self.parameters():
            if param.dim() > 1:
                nn.init.xavier_uniform_(param)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module._reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    def get_proposal_pos_embed(self, proposals: Tensor) -> Tensor:
        """Sine embedding of the sigmoided proposals (B, K, 4) -> (B, K, 2 * d_model)."""
        num_pos_feats = self.d_model // 2
        dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
        dim_t = 10000 ** (2 * (dim_t // 2) / num_pos_feats)
        pos = proposals.sigmoid()[:, :, :, None] * (2 * math.pi) / dim_t
        return torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4).flatten(2)

    def gen_encoder_output_proposals(self, memory: Tensor, memory_padding_mask: Tensor,
                                     spatial_shapes: Tensor) -> tuple[Tensor, Tensor]:
        """One box per token: its pixel centre, 0.05 * 2**level wide and high (fractions of the valid area),
        as logits (B, S, 4), inf where padded or not inside (0.01, 0.99); and the memory, zeroed there, through
        enc_output and its norm (B, S, d)."""
        batch = memory.shape[0]
        proposals, start = [], 0
        for level, (height, width) in enumerate(_level_sizes(spatial_shapes)):
            level_mask = memory_padding_mask[:, start:start + height * width].view(batch, height, width, 1)
            valid_h = torch.sum(~level_mask[:, :, 0, 0], 1)
            valid_w = torch.sum(~level_mask[:, 0, :, 0], 1)
            grid_y, grid_x = torch.meshgrid(_pixel_grid(height, 0.0, memory.device),
                                            _pixel_grid(width, 0.0, memory.device), indexing="ij")
            grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
            scale = torch.cat([valid_w.unsqueeze(-1), valid_h.unsqueeze(-1)], 1).view(batch, 1, 1, 2)
            grid = (grid.unsqueeze(0).expand(batch, -1, -1, -1) + 0.5) / scale
            wh = torch.ones_like(grid) * 0.05 * (2.0 ** level)
            proposals.append(torch.cat((grid, wh), -1).view(batch, -1, 4))
            start += height * width
        output_proposals = torch.cat(proposals, 1)
        valid = ((output_proposals > 0.01) & (output_proposals < 0.99)).all(-1, keepdim=True)
        output_proposals = torch.log(output_proposals / (1 - output_proposals))
        output_proposals = output_proposals.masked_fill(memory_padding_mask.unsqueeze(-1), float("inf"))
        output_proposals = output_proposals.masked_fill(~valid, float("inf"))
        output_memory = memory.masked_fill(memory_padding_mask.unsqueeze(-1), 0.0).masked_fill(~valid, 0.0)
        return self.enc_output_norm(self.enc_output(output_memory)), output_proposals

    @staticmethod
    def get_valid_ratio(mask: Tensor) -> Tensor:
        """mask (B, H, W) True on padding -> (B, 2) the valid fraction of the width and the height."""
        _, height, width = mask.shape
        valid_h = torch.sum(~mask[:, :, 0], 1)
        valid_w = torch.sum(~mask[:, 0, :], 1)
        return torch.stack([valid_w.float() / width, valid_h.float() / height], -1)

    def forward(self, srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor],
                query_embed: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        """srcs, pos_embeds per level (B, d, H_l, W_l), masks (B, H_l, W_l); query_embed (Q, 2d) (not two-stage)
        -> hs (layers, B, Q, d), init_reference (B, Q, 2 or 4), inter_references (layers, B, Q, 2 or 4), and
        two-stage the encoder's class logits (B, S, C) and box logits (B, S, 4) (else None, None)."""
        if not self.two_stage and query_embed is None:
            raise ValueError("DeformableTransformer: query_embed is needed unless two_stage")
        src_flatten = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1)
        mask_flatten = torch.cat([mask.flatten(1) for mask in masks], 1)
        lvl_pos_embed_flatten = torch.cat([pos.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1)
                                           for level, pos in enumerate(pos_embeds)], 1)
        spatial_shapes = _spatial_shapes(srcs, src_flatten.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([self.get_valid_ratio(mask) for mask in masks], 1)

        memory = self.encoder(src_flatten, spatial_shapes, level_start_index, valid_ratios, lvl_pos_embed_flatten,
                              mask_flatten)

        batch, _, channels = memory.shape
        enc_outputs_class = enc_outputs_coord_unact = None
        if self.two_stage:
            if not tracing() and memory.shape[1] < self.two_stage_num_proposals:
                maps = ", ".join(f"{src.shape[-2]}x{src.shape[-1]}" for src in srcs)
                raise ValueError(f"DeformableTransformer: two-stage takes the top {self.two_stage_num_proposals} of "
                                 f"the encoder's tokens, but the levels' maps ({maps}) hold {memory.shape[1]}; use "
                                 "larger images or fewer proposals (num_queries)")
            output_memory, output_proposals = self.gen_encoder_output_proposals(memory, mask_flatten, spatial_shapes)
            # the model's extra (last) heads score every token as a proposal
            enc_outputs_class = self.decoder.class_embed[self.decoder.num_layers](output_memory)
            enc_outputs_coord_unact = self.decoder.bbox_embed[self.decoder.num_layers](output_memory) + output_proposals
            topk_proposals = torch.topk(enc_outputs_class[..., 0], self.two_stage_num_proposals, dim=1)[1]
            topk_coords_unact = torch.gather(enc_outputs_coord_unact, 1,
                                             topk_proposals.unsqueeze(-1).repeat(1, 1, 4)).detach()
            reference_points = topk_coords_unact.sigmoid()
            pos_trans_out = self.pos_trans_norm(self.pos_trans(self.get_proposal_pos_embed(topk_coords_unact)))
            query_pos, tgt = torch.split(pos_trans_out, channels, dim=2)
        else:
            query_pos, tgt = torch.split(query_embed, channels, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(batch, -1, -1)
            tgt = tgt.unsqueeze(0).expand(batch, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()
        init_reference_out = reference_points

        hs, inter_references = self.decoder(tgt, reference_points, memory, spatial_shapes, level_start_index,
                                            valid_ratios, query_pos, mask_flatten)
        return hs, init_reference_out, inter_references, enc_outputs_class, enc_outputs_coord_unact


class MultiLevelBackbone(Backbone):
    """`Backbone` returning the C3-C5 maps (strides 8/16/32), or C5 alone, each with its downsampled mask.
    Key names `body.*` as the official (torchvision's ResNet in an IntermediateLayerGetter)."""

    def __init__(self, name: str = "resnet50", return_interm_layers: bool = True, **kwargs: Any):
        super().__init__(name, **kwargs)
        last = self.body.num_channels
        self.return_interm_layers = return_interm_layers
        self.strides = [8, 16, 32] if return_interm_layers else [32]
        self.num_channels = [last // 4, last // 2, last] if return_interm_layers else [last]
        if kwargs.get("dilation"):
            self.strides[-1] //= 2

    def feature_maps(self, images: Tensor) -> list[Tensor]:
        """images (B, 3, H, W) -> [C3, C4, C5] (or [C5]), each (B, C_l, h_l, w_l)."""
        body = self.body
        x = body.layer1(body.maxpool(body.relu(body.bn1(body.conv1(images)))))
        c3 = body.layer2(x)
        c4 = body.layer3(c3)
        c5 = body.layer4(c4)
        return [c3, c4, c5] if self.return_interm_layers else [c5]

    def forward(self, images: Tensor, mask: Tensor) -> list[tuple[Tensor, Tensor]]:
        """images (B, 3, H, W), mask (B, H, W) -> [(features (B, C_l, h_l, w_l), mask (B, h_l, w_l))]."""
        # nearest-neighbour downsampling of the padding mask, as in the official
        return [(features, F.interpolate(mask[None].float(), size=features.shape[-2:]).to(torch.bool)[0])
                for features in self.feature_maps(images)]


class DeformableJoiner(nn.Sequential):
    """Backbone (index 0) and position embedding (index 1): keys `backbone.0.*`, `backbone.1.*`."""

    def __init__(self, backbone: MultiLevelBackbone, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)
        self.strides = backbone.strides
        self.num_channels = backbone.num_channels

    def forward(self, images: Tensor, mask: Tensor) -> tuple[list[tuple[Tensor, Tensor]], list[Tensor]]:
        """-> [(features, mask)] per backbone level, [pos (B, d, h_l, w_l)] in the features' dtype."""
        levels = self[0](images, mask)
        return levels, [self[1](features, level_mask).to(features.dtype) for features, level_mask in levels]


class DeformableDETR(nn.Module):
    """Deformable DETR: multi-level backbone, deformable transformer, focal-loss class and box heads.

    forward(samples) -> {
        "pred_logits": (B, num_queries, num_classes)  -- sigmoid (focal-loss) logits, no "no object" class,
        "pred_boxes":  (B, num_queries, 4)            -- normalised (cx, cy, w, h) in [0, 1] of the valid image,
        "aux_outputs": [{"pred_logits", "pred_boxes"}] * (dec_layers - 1)  -- when config.aux_loss,
        "enc_outputs": {"pred_logits": (B, S, num_classes), "pred_boxes": (B, S, 4)}  -- two-stage only,
    }
    """

    def __init__(self, config: DeformableDETRConfig | None = None):
        super().__init__()
        config = DeformableDETRConfig() if config is None else config
        self.config = config
        hidden_dim, num_classes = config.hidden_dim, config.num_classes
        backbone = MultiLevelBackbone(config.backbone, return_interm_layers=config.num_feature_levels > 1,
                                      dilation=config.dilation, width=config.backbone_width,
                                      frozen_batchnorm=config.frozen_batchnorm, train_backbone=config.train_backbone,
                                      freeze_stem=config.freeze_stem)
        # registration order as in the official, so state_dict keys come in the official order
        self.num_queries = config.num_queries
        self.transformer = DeformableTransformer(
            d_model=hidden_dim, nhead=config.nheads, num_encoder_layers=config.enc_layers,
            num_decoder_layers=config.dec_layers, dim_feedforward=config.dim_feedforward, dropout=config.dropout,
            activation=config.activation, return_intermediate_dec=True,
            num_feature_levels=config.num_feature_levels, dec_n_points=config.dec_n_points,
            enc_n_points=config.enc_n_points, two_stage=config.two_stage,
            two_stage_num_proposals=config.num_queries)
        class_embed = nn.Linear(hidden_dim, num_classes)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.class_embed, self.bbox_embed = class_embed, bbox_embed   # replaced by per-layer lists below
        self.num_feature_levels = config.num_feature_levels
        if not config.two_stage:
            self.query_embed = nn.Embedding(config.num_queries, hidden_dim * 2)
        projections = []
        for in_channels in backbone.num_channels:
            projections.append(nn.Sequential(nn.Conv2d(in_channels, hidden_dim, kernel_size=1),
                                             nn.GroupNorm(32, hidden_dim)))
        in_channels = backbone.num_channels[-1]
        for _ in range(config.num_feature_levels - len(backbone.num_channels)):
            projections.append(nn.Sequential(nn.Conv2d(in_channels, hidden_dim, kernel_size=3, stride=2, padding=1),
                                             nn.GroupNorm(32, hidden_dim)))
            in_channels = hidden_dim
        self.input_proj = nn.ModuleList(projections)
        self.backbone = DeformableJoiner(backbone, _position_embedding(config.position_embedding, hidden_dim))
        self.aux_loss = config.aux_loss
        self.with_box_refine = config.with_box_refine
        self.two_stage = config.two_stage

        prior_prob = 0.01   # focal loss: every class starts at probability 0.01
        nn.init.constant_(class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.zeros_(bbox_embed.layers[-1].weight)
        nn.init.zeros_(bbox_embed.layers[-1].bias)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)

        # two-stage: one more class and box head, the last, scores the encoder's proposals
        num_pred = config.dec_layers + 1 if config.two_stage else config.dec_layers
        if config.with_box_refine:
            self.class_embed = _clones(class_embed, num_pred)
            self.bbox_embed = _clones(bbox_embed, num_pred)
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
            self.transformer.decoder.bbox_embed = self.bbox_embed   # shared: the decoder refines with these heads
        else:
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            # one head shared by every layer (its keys repeat under each index, as in the official state_dict)
            self.class_embed = nn.ModuleList([class_embed] * num_pred)
            self.bbox_embed = nn.ModuleList([bbox_embed] * num_pred)
            self.transformer.decoder.bbox_embed = None
        if config.two_stage:
            self.transformer.decoder.class_embed = self.class_embed
            for box_embed in self.bbox_embed:
                nn.init.zeros_(box_embed.layers[-1].bias[2:])

    def forward(self, samples: Any) -> dict[str, Any]:
        images, mask = to_image_batch(samples)
        self._check_dtype(images)
        levels, pos = self.backbone(images, mask)
        srcs = [proj(features) for proj, (features, _) in zip(self.input_proj, levels)]
        masks = [level_mask for _, level_mask in levels]
        for level in range(len(srcs), self.num_feature_levels):
            # the first extra level convolves C5 itself, the next ones the previous projection
            src = self.input_proj[level](levels[-1][0] if level == len(levels) else srcs[-1])
            level_mask = F.interpolate(mask[None].float(), size=src.shape[-2:]).to(torch.bool)[0]
            srcs.append(src)
            masks.append(level_mask)
            pos.append(self.backbone[1](src, level_mask).to(src.dtype))

        query_embeds = None if self.two_stage else self.query_embed.weight
        hs, init_reference, inter_references, enc_outputs_class, enc_outputs_coord_unact = self.transformer(
            srcs, masks, pos, query_embeds)

        outputs_classes, outputs_coords = [], []
        for lvl in range(hs.shape[0]):
            logits, boxes = self.predict(lvl, hs[lvl], init_reference if lvl == 0 else inter_references[lvl - 1])
            outputs_classes.append(logits)
            outputs_coords.append(boxes)
        outputs_class = torch.stack(outputs_classes)
        outputs_coord = torch.stack(outputs_coords)

        out: dict[str, Any] = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": logits, "pred_boxes": boxes}
                                  for logits, boxes in zip(outputs_class[:-1], outputs_coord[:-1])]
        if self.two_stage:
            out["enc_outputs"] = {"pred_logits": enc_outputs_class, "pred_boxes": enc_outputs_coord_unact.sigmoid()}
        return out

    def predict(self, layer: int, hidden: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
        """Decoder layer `layer`'s heads: hidden (B, Q, d) and its input reference points (B, Q, 2 or 4) in
        [0, 1] -> logits (B, Q, num_classes), boxes (B, Q, 4) cxcywh in [0, 1] (the box head's delta on the
        reference's logit)."""
        reference = inverse_sigmoid(reference)
        delta = self.bbox_embed[layer](hidden)
        if reference.shape[-1] == 4:
            delta = delta + reference
        else:
            delta = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
        return self.class_embed[layer](hidden), delta.sigmoid()

    def _check_dtype(self, images: Tensor) -> None:
        """TypeError when the images' floating dtype is not the weights' (metadata only), except under autocast."""
        check_image_dtype(images, self.input_proj[0][0].weight.dtype)


def _position_embedding(kind: str, hidden_dim: int) -> nn.Module:
    """The official's: sine normalised over pixel centres (offset -0.5), or learned; hidden_dim / 2 per axis."""
    if kind == "sine":
        return PositionEmbeddingSine(hidden_dim // 2, normalize=True, offset=-0.5)
    if kind == "learned":
        return PositionEmbeddingLearned(hidden_dim // 2)
    raise ValueError(f"unknown position_embedding {kind!r}; expected 'sine' or 'learned'")


class PostProcess(nn.Module):
    """Turns Deformable DETR outputs into per-image detections in pixel coordinates, as the official.

    The `num_select` best (query, class) pairs of the sigmoid scores, over all queries x classes of an
    image (a query may report several classes); num_select is capped at Q x C.
    forward(outputs, target_sizes) with target_sizes (B, 2) as (height, width) of each original
    image -> a list of B dicts, by descending score: "scores" (k,), "labels" (k,) int64 and
    "boxes" (k, 4) xyxy in pixels.
    """

    def __init__(self, num_select: int = 100):
        super().__init__()
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], target_sizes: Tensor) -> list[dict[str, Tensor]]:
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        target_sizes = as_target_sizes(target_sizes, logits)
        _, num_queries, num_classes = logits.shape
        num_select = min(self.num_select, num_queries * num_classes)
        scores, labels, boxes = top_detections(logits, boxes, target_sizes, num_select)
        return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes)]


def top_detections(logits: Tensor, boxes: Tensor, target_sizes: Tensor,
                   num_select: int) -> tuple[Tensor, Tensor, Tensor]:
    """`PostProcess` on whole batches: logits (B, Q, C), boxes (B, Q, 4) cxcywh in [0, 1], target_sizes (B, 2)
    (height, width), num_select <= Q * C -> scores (B, k), labels (B, k) int64, boxes (B, k, 4) xyxy pixels."""
    from ..box_ops import box_cxcywh_to_xyxy

    num_classes = logits.shape[-1]
    scores, index = torch.topk(logits.sigmoid().flatten(1), num_select, dim=1)
    labels = index % num_classes
    query = index // num_classes
    boxes = box_cxcywh_to_xyxy(boxes).gather(1, query[..., None].expand(-1, -1, 4))
    img_h, img_w = target_sizes.unbind(1)
    scale = torch.stack((img_w, img_h, img_w, img_h), dim=1).to(boxes.dtype)
    return scores, labels, boxes * scale[:, None, :]
