"""DETR's transformer layers with fused kernels: `TransformerEncoderLayer`, `TransformerDecoderLayer`.

Subclasses of `fastdetr.reference.transformer`'s layers: same constructor,
parameters, names and state_dict; only `forward` changes. A post-norm layer
(DETR's default) runs as a chain of fastdetr's fused ops instead of
nn.MultiheadAttention + Linear + Dropout + LayerNorm:

    self-attention   in_projection(x, pos)        [Q|K] = (x + pos) W_qk^T + b, V = x W_v^T + b
                     attention(q, k, v, mask)      flash attention, key padding mask, dropout
                     linear_residual_layernorm     norm1(x + dropout1(out_proj(.)))
    cross-attention  (decoder only) three F.linear: q = (tgt + query_pos) W_q^T, k = (memory + pos) W_k^T,
                     v = memory W_v^T (no fused kernel for distinct query and key inputs),
                     then attention and linear_residual_layernorm (norm2) as above
    FFN              linear_relu_dropout           dropout(relu(linear1(.)))
                     linear_residual_layernorm     normN(x + dropoutN(linear2(.)))

A pre-norm layer (normalize_before=True) runs the same ops with the norms
moved: norm1 is a plain F.layer_norm on the layer input; each attention's
out_proj adds its output to the residual stream with
`linear_residual_and_layernorm`, which also returns the next sublayer's norm
of the stream (norm2 / norm3) from the same pass; linear2 adds with
`linear_residual` (no norm: the stream leaves the layer un-normalised).

Autocast (the trainer's AMP): the fused chain runs in autocast's dtype, its
weights and inputs cast per forward as autocast casts them for nn.Linear
(a differentiable copy; gradients reach the float32 parameters), with
autocast itself off inside; a layer returns that dtype (the reference's final
LayerNorm returns float32 under autocast).

Inference (no gradient needed, eval mode, d_model within the kernel's tile,
`fastdetr.nn.functional.ffn_on_chip`): the FFN is one kernel,
`fastdetr.kernels.ffn.ffn_inference`, that keeps the 2048-wide hidden on chip.

The layer stacks, `TransformerEncoder` and `TransformerDecoder`, own the key
padding mask: each builds the attention kernel's table of valid key blocks
once per forward (`functional.key_padding_table`) and hands it to every
fused layer (`key_padding_table=`), instead of each attention building its own.

The forward reads nothing but the attributes the original DETR layers also
have (`self_attn`, `multihead_attn`, `linear1`, `linear2`, `norm1..3`,
`dropout`, `dropout1..3`, `activation`, `normalize_before`), so
`fastdetr.optimize` may swap the class of the original repository's layers too.

Everything else runs the parent's (reference) forward, unchanged
(`fastdetr.nn.functional.layer_fusable` decides): activations other than
ReLU, an attention mask (src_mask, tgt_mask, memory_mask), head dims the
attention kernel does not take, non-bool key padding masks,
MultiheadAttention variants (kdim/vdim, add_bias_kv, add_zero_attn,
batch_first, no bias), LayerNorms without affine, Linears without bias, mixed
dtypes, unbatched inputs, and tensors for which `fastdetr.backend.use_triton`
is false (plain CPU tensors without the interpreter).

One deliberate difference from the reference: a query whose keys are all
padded gets zeros from the attention kernel, where nn.MultiheadAttention
returns NaN.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fastdetr.nn import functional as fused
from fastdetr.reference import transformer as reference


def _caster(layer: nn.Module, *tensors: Tensor | None):
    """(cast, tensors): under autocast, `cast` turns a parameter (or input) into autocast's dtype -- a
    differentiable copy, as autocast makes for nn.Linear; none when it has that dtype already -- and the
    tensors come back cast. Without autocast, the identity."""
    dtype = fused.autocast_dtype(layer.linear1.weight)
    if dtype is None:
        return (lambda t: t), tensors

    def cast(tensor: Tensor) -> Tensor:
        return tensor.to(dtype)

    return cast, tuple(None if t is None else cast(t) for t in tensors)


def _no_autocast(tensor: Tensor):
    """Autocast off around the fused chain: its ops get inputs already in one dtype (F.layer_norm and
    F.linear inside it would otherwise change dtypes under autocast)."""
    return torch.autocast(tensor.device.type, enabled=False)


def _compute_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a layer's fused chain computes in: autocast's, else its parameters'."""
    return fused.autocast_dtype(layer.linear1.weight) or layer.linear1.weight.dtype


class TransformerEncoderLayer(reference.TransformerEncoderLayer):
    """DETR's encoder layer; ReLU layers run fused kernels, post-norm and pre-norm (see the module docstring)."""

    def forward(self, src: Tensor, src_mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None,
                pos: Tensor | None = None, *, key_padding_table=None) -> Tensor:
        """src (S, B, d), src_key_padding_mask (B, S) True on padding, pos (S, B, d) -> (S, B, d).

        key_padding_table: the attention kernel's block table of src_key_padding_mask, built once by
        the layer stack (`TransformerEncoder`), or None to build it here.
        Under autocast the fused chain runs in autocast's dtype (weights and inputs cast, as autocast
        casts them for nn.Linear) and returns that dtype, where the reference's final LayerNorm
        returns float32."""
        if src_mask is not None or not fused.layer_fusable(self, (self.norm1, self.norm2), (self.self_attn,),
                                                           (src, pos), (src_key_padding_mask,)):
            return super().forward(src, src_mask=src_mask, src_key_padding_mask=src_key_padding_mask, pos=pos)
        if pos is not None and pos.shape != src.shape:
            pos = pos.expand_as(src)
        cast, (src, pos) = _caster(self, src, pos)
        with _no_autocast(src):
            return self._fused_forward(src, pos, src_key_padding_mask, key_padding_table, cast)

    def _fused_forward(self, src: Tensor, pos: Tensor | None, mask: Tensor | None, table, cast) -> Tensor:
        training = self.training
        if self.normalize_before:
            normed = fused.layer_norm(src, self.norm1, cast)
            attended = fused.self_attention(self.self_attn, normed, pos, mask, training, cast, table)
            src, normed = fused.residual_then_norm(attended, self.self_attn.out_proj, src, self.norm2,
                                                   self.dropout1, training, cast)
            return fused.ffn(self, normed, src, None, self.dropout2, cast)
        attended = fused.self_attention(self.self_attn, src, pos, mask, training, cast, table)
        src = fused.residual_norm(attended, self.self_attn.out_proj, src, self.norm1, self.dropout1, training, cast)
        return fused.ffn(self, src, src, self.norm2, self.dropout2, cast)


class TransformerDecoderLayer(reference.TransformerDecoderLayer):
    """DETR's decoder layer; ReLU layers run fused kernels, post-norm and pre-norm (see the module docstring)."""

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Tensor | None = None,
                memory_mask: Tensor | None = None, tgt_key_padding_mask: Tensor | None = None,
                memory_key_padding_mask: Tensor | None = None, pos: Tensor | None = None,
                query_pos: Tensor | None = None, *, key_padding_table=None) -> Tensor:
        """tgt (Q, B, d), memory (S, B, d), memory_key_padding_mask (B, S), pos (S, B, d),
        query_pos (Q, B, d) -> (Q, B, d). key_padding_table: the block table of memory_key_padding_mask
        (from `TransformerDecoder`) or None. Autocast as in TransformerEncoderLayer.forward."""
        masks = (tgt_key_padding_mask, memory_key_padding_mask)
        if (tgt_mask is not None or memory_mask is not None
                or not fused.layer_fusable(self, (self.norm1, self.norm2, self.norm3),
                                           (self.self_attn, self.multihead_attn), (tgt, memory, pos, query_pos),
                                           masks)):
            return super().forward(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                                   tgt_key_padding_mask=tgt_key_padding_mask,
                                   memory_key_padding_mask=memory_key_padding_mask, pos=pos, query_pos=query_pos)
        if query_pos is not None and query_pos.shape != tgt.shape:
            query_pos = query_pos.expand_as(tgt)
        cast, (tgt, memory, pos, query_pos) = _caster(self, tgt, memory, pos, query_pos)
        with _no_autocast(tgt):
            return self._fused_forward(tgt, memory, pos, query_pos, tgt_key_padding_mask, memory_key_padding_mask,
                                       key_padding_table, cast)

    def _fused_forward(self, tgt: Tensor, memory: Tensor, pos: Tensor | None, query_pos: Tensor | None,
                       tgt_mask: Tensor | None, memory_mask: Tensor | None, memory_table, cast) -> Tensor:
        training = self.training
        key = memory if pos is None else memory + pos
        attn, cross = self.self_attn, self.multihead_attn
        if self.normalize_before:
            normed = fused.layer_norm(tgt, self.norm1, cast)
            attended = fused.self_attention(attn, normed, query_pos, tgt_mask, training, cast)
            tgt, normed = fused.residual_then_norm(attended, attn.out_proj, tgt, self.norm2, self.dropout1,
                                                   training, cast)
            query = normed if query_pos is None else normed + query_pos
            attended = fused.cross_attention(cross, query, key, memory, memory_mask, training, cast, memory_table)
            tgt, normed = fused.residual_then_norm(attended, cross.out_proj, tgt, self.norm3, self.dropout2,
                                                   training, cast)
            return fused.ffn(self, normed, tgt, None, self.dropout3, cast)
        attended = fused.self_attention(attn, tgt, query_pos, tgt_mask, training, cast)
        tgt = fused.residual_norm(attended, attn.out_proj, tgt, self.norm1, self.dropout1, training, cast)
        query = tgt if query_pos is None else tgt + query_pos
        attended = fused.cross_attention(cross, query, key, memory, memory_mask, training, cast, memory_table)
        tgt = fused.residual_norm(attended, cross.out_proj, tgt, self.norm2, self.dropout2, training, cast)
        return fused.ffn(self, tgt, tgt, self.norm3, self.dropout3, cast)


def _shared_table(layers: nn.ModuleList, fused_class: type, mask: Tensor | None):
    """The block table of `mask` for the stack's fused layers (built once), or None when none needs one."""
    first = next((layer for layer in layers if isinstance(layer, fused_class)), None)
    if first is None or mask is None:
        return None
    return fused.key_padding_table(mask, _compute_dtype(first))


class TransformerEncoder(reference.TransformerEncoder):
    """DETR's encoder stack: builds the key padding mask's block table once and passes it to each fused layer."""

    def forward(self, src: Tensor, mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None,
                pos: Tensor | None = None) -> Tensor:
        table = _shared_table(self.layers, TransformerEncoderLayer, src_key_padding_mask)
        output = src
        for layer in self.layers:
            extra = {"key_padding_table": table} if isinstance(layer, TransformerEncoderLayer) else {}
            output = layer(output, src_mask=mask, src_key_padding_mask=src_key_padding_mask, pos=pos, **extra)
        return output if self.norm is None else self.norm(output)


class TransformerDecoder(reference.TransformerDecoder):
    """DETR's decoder stack: the memory mask's block table built once for every fused layer's cross-attention."""

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Tensor | None = None,
                memory_mask: Tensor | None = None, tgt_key_padding_mask: Tensor | None = None,
                memory_key_padding_mask: Tensor | None = None, pos: Tensor | None = None,
                query_pos: Tensor | None = None) -> Tensor:
        table = _shared_table(self.layers, TransformerDecoderLayer, memory_key_padding_mask)
        output = tgt
        intermediate = []
        for layer in self.layers:
            extra = {"key_padding_table": table} if isinstance(layer, TransformerDecoderLayer) else {}
            output = layer(output, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                           tgt_key_padding_mask=tgt_key_padding_mask,
                           memory_key_padding_mask=memory_key_padding_mask, pos=pos, query_pos=query_pos, **extra)
            if self.return_intermediate:
                intermediate.append(self.norm(output))
        if self.return_intermediate:
            return torch.stack(intermediate)
        return self.norm(output).unsqueeze(0)
