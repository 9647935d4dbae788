"""Deformable DETR's encoder and decoder layers with fused kernels: `DeformableTransformerEncoderLayer`,
`DeformableTransformerDecoderLayer`.

Subclasses of `fastdetr.reference.deformable_detr`'s layers: same constructor, parameters, names and
state_dict; only `forward` changes. `fastdetr.optimize` switches the class of these layers (and of the
official repository's, which have the same attributes and forward arguments) in place. A ReLU layer runs
as a chain of fastdetr's fused ops, tensors batch-first (B, tokens, d_model) throughout:

    encoder layer    MSDA sample(src + pos, ...)          fastdetr.nn.MultiScaleDeformableAttention.sample:
                                                         value projection with the padding fill in its
                                                         epilogue, offsets + softmax + sampling in one kernel
                     linear_residual_layernorm           norm1(src + dropout1(output_proj(.)))
                     linear_relu_dropout                 dropout2(relu(linear1(.)))
                     linear_residual_layernorm           norm2(src + dropout3(linear2(.)))
    decoder layer    in_projection(tgt, query_pos)       [Q|K] = (tgt + query_pos) W_qk^T + b, V = tgt W_v^T + b
                     attention(q, k, v)                  flash attention over the queries (head dims the
                                                         kernel takes; else nn.MultiheadAttention, as the
                                                         reference, then the same LayerNorm)
                     linear_residual_layernorm           norm2(tgt + dropout2(out_proj(.)))
                     MSDA sample(tgt + query_pos, ...)    cross-attention on the memory
                     linear_residual_layernorm           norm1(tgt + dropout1(output_proj(.)))
                     FFN                                 dropout3 / dropout4 / norm3, as the encoder's

In inference (eval mode, no gradient, d_model within its tile) each FFN is one kernel that keeps the
hidden on chip (`fastdetr.kernels.ffn.ffn_inference`), as DETR's.

Autocast: the MSDA modules run under the caller's autocast as they do in the reference (their kernels
compute in autocast's dtype); the rest of the chain runs in autocast's dtype with autocast itself off,
weights cast per forward (differentiable copies), as `fastdetr.nn.transformer`'s layers do, and a layer
returns that dtype (the reference's LayerNorm returns float32 under autocast).

Everything else runs the parent's (reference) forward (`fastdetr.nn.functional.layer_fusable`):
activations other than ReLU, Linears without bias, LayerNorms without affine, non-bool padding masks,
an attention module without `sample`, inputs in another dtype, and tensors for which
`fastdetr.backend.use_triton` is false (plain CPU tensors without the interpreter).
"""
from __future__ import annotations

from torch import Tensor

from fastdetr.nn import functional as fused
from fastdetr.nn.transformer import _caster, _no_autocast
from fastdetr.reference import deformable_detr as reference


def _fusable(layer, msda, norms, tensors: tuple, mask: Tensor | None) -> bool:
    """The fused chain's needs: an MSDA module with `sample`, and `layer_fusable`'s (no MultiheadAttention:
    the decoder decides its self-attention on its own)."""
    return callable(getattr(msda, "sample", None)) and fused.layer_fusable(layer, norms, (), tensors, (mask,))


class DeformableTransformerEncoderLayer(reference.DeformableTransformerEncoderLayer):
    """Deformable DETR's encoder layer; ReLU layers run fused kernels (module docstring)."""

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """src, pos (B, S, d); reference_points (B, S, L, 2); padding_mask (B, S) True on padding -> (B, S, d)."""
        if not _fusable(self, self.self_attn, (self.norm1, self.norm2), (src, pos), padding_mask):
            return super().forward(src, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        attn = self.self_attn
        sampled = attn.sample(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        cast, (src, sampled) = _caster(self, src, sampled)
        training = self.training
        with _no_autocast(src):
            src = fused.residual_norm(sampled, attn.output_proj, src, self.norm1, self.dropout1, training, cast)
            return fused.ffn(self, src, src, self.norm2, self.dropout3, cast, hidden_dropout=self.dropout2)


class DeformableTransformerDecoderLayer(reference.DeformableTransformerDecoderLayer):
    """Deformable DETR's decoder layer; ReLU layers run fused kernels (module docstring)."""

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, src: Tensor,
                src_spatial_shapes: Tensor, level_start_index: Tensor, src_padding_mask: Tensor | None = None
                ) -> Tensor:
        """tgt, query_pos (B, Q, d); reference_points (B, Q, L, 2 or 4); src (B, S, d) -> (B, Q, d)."""
        norms = (self.norm1, self.norm2, self.norm3)
        if not _fusable(self, self.cross_attn, norms, (tgt, query_pos, src), src_padding_mask):
            return super().forward(tgt, query_pos, reference_points, src, src_spatial_shapes, level_start_index,
                                   src_padding_mask)
        training = self.training
        attn = self.self_attn
        if fused.attention_supported(attn) and attn.in_proj_bias is not None and attn.out_proj.bias is not None:
            cast, (tgt, pos) = _caster(self, tgt, query_pos)
            with _no_autocast(tgt):
                attended = fused.self_attention(attn, tgt, pos, None, training, cast, batch_first=True)
                tgt = fused.residual_norm(attended, attn.out_proj, tgt, self.norm2, self.dropout2, training, cast)
        else:
            tgt = self.self_attention_block(tgt, query_pos)
        cross = self.cross_attn
        sampled = cross.sample(tgt + query_pos, reference_points, src, src_spatial_shapes, level_start_index,
                               src_padding_mask)
        cast, (tgt, sampled) = _caster(self, tgt, sampled)
        with _no_autocast(tgt):
            tgt = fused.residual_norm(sampled, cross.output_proj, tgt, self.norm1, self.dropout1, training, cast)
            return fused.ffn(self, tgt, tgt, self.norm3, self.dropout4, cast, hidden_dropout=self.dropout3)
