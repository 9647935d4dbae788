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

Inference (no gradient needed, eval mode, d_model <= 256): the FFN is one
kernel, `fastdetr.kernels.ffn.ffn_inference`, that keeps the 2048-wide hidden
on chip.

The forward reads nothing but the attributes the original DETR layers also
have (`self_attn`, `multihead_attn`, `linear1`, `linear2`, `norm1..3`,
`dropout`, `dropout1..3`, `activation`, `normalize_before`), so
`fastdetr.optimize` may swap the class of the original repository's layers too.

Everything else runs the parent's (reference) forward, unchanged:
activations other than ReLU, an attention mask (src_mask, tgt_mask,
memory_mask), head dims other than 32 and 64, non-bool key padding masks,
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
import torch.nn.functional as F
from torch import Tensor, nn

from fastdetr.backend import use_triton
from fastdetr.reference import transformer as reference

_HEAD_DIMS = (32, 64)


def _attention_supported(attn: nn.MultiheadAttention) -> bool:
    return (
        isinstance(attn, nn.MultiheadAttention)
        and attn._qkv_same_embed_dim
        and attn.in_proj_bias is not None
        and attn.bias_k is None
        and not attn.add_zero_attn
        and not attn.batch_first
        and attn.head_dim in _HEAD_DIMS
        and attn.out_proj.bias is not None
    )


def _fusable(layer: nn.Module, norms: tuple[nn.LayerNorm, ...], attns: tuple[nn.MultiheadAttention, ...],
             tensors: tuple[Tensor | None, ...], masks: tuple[Tensor | None, ...]) -> bool:
    """Whether `layer` and these inputs are what the fused chain supports (see the module docstring)."""
    if layer.activation is not F.relu:
        return False
    if not all(_attention_supported(attn) for attn in attns):
        return False
    if layer.linear1.bias is None or layer.linear2.bias is None:
        return False
    if any(norm.weight is None or norm.bias is None for norm in norms):
        return False
    present = [t for t in tensors if t is not None]
    dtype = _autocast_dtype(layer.linear1.weight) or layer.linear1.weight.dtype
    if any(t.dim() != 3 or (t.dtype != dtype and not _autocast_dtype(t)) for t in present):
        return False
    if any(mask is not None and mask.dtype != torch.bool for mask in masks):
        return False
    return use_triton(*present, *masks, layer.linear1.weight)


def _autocast_dtype(tensor: Tensor) -> torch.dtype | None:
    """The dtype autocast would compute a linear in on `tensor`'s device, or None when autocast is off."""
    device_type = tensor.device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _caster(layer: nn.Module, *tensors: Tensor | None):
    """(cast, tensors): under autocast, `cast` turns a parameter (or input) into autocast's dtype -- a
    differentiable copy, as autocast makes for nn.Linear; none when it has that dtype already -- and the
    tensors come back cast. Without autocast, the identity."""
    dtype = _autocast_dtype(layer.linear1.weight)
    if dtype is None:
        return (lambda t: t), tensors

    def cast(tensor: Tensor) -> Tensor:
        return tensor.to(dtype)

    return cast, tuple(None if t is None else cast(t) for t in tensors)


def _heads(x: Tensor, heads: int) -> Tensor:
    """(L, B, E) -> (B, H, L, D), a view: the attention kernel reads it in place."""
    return x.unflatten(-1, (heads, x.shape[-1] // heads)).permute(1, 2, 0, 3)


def _merge_heads(x: Tensor) -> Tensor:
    """(B, H, L, D) -> (L, B, E); a view when the kernel wrote (L, B, H, D) storage."""
    batch, heads, length, head_dim = x.shape
    return x.permute(2, 0, 1, 3).reshape(length, batch, heads * head_dim)


def _attend(attn: nn.MultiheadAttention, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
            training: bool) -> Tensor:
    from fastdetr.kernels.attention import attention

    heads = attn.num_heads
    dropout_p = attn.dropout if training else 0.0
    out = attention(_heads(q, heads), _heads(k, heads), _heads(v, heads), key_padding_mask=key_padding_mask,
                    dropout_p=dropout_p)
    return _merge_heads(out)


def _self_attention(attn: nn.MultiheadAttention, x: Tensor, pos: Tensor | None,
                    key_padding_mask: Tensor | None, training: bool, cast) -> Tensor:
    """DETR's self-attention core (q = k = x + pos, v = x) up to, not including, out_proj: (L, B, E)."""
    from fastdetr.kernels.in_projection import in_projection

    qkv = in_projection(x, pos, cast(attn.in_proj_weight), cast(attn.in_proj_bias))
    q, k, v = qkv.split(x.shape[-1], dim=-1)
    return _attend(attn, q, k, v, key_padding_mask, training)


def _cross_attention(attn: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
                     key_padding_mask: Tensor | None, training: bool, cast) -> Tensor:
    """Attention with distinct query and key inputs, up to out_proj; plain F.linear in-projections."""
    weight_q, weight_k, weight_v = cast(attn.in_proj_weight).chunk(3)
    bias_q, bias_k, bias_v = cast(attn.in_proj_bias).chunk(3)
    q, k, v = F.linear(query, weight_q, bias_q), F.linear(key, weight_k, bias_k), F.linear(value, weight_v, bias_v)
    return _attend(attn, q, k, v, key_padding_mask, training)


def _residual_norm(x: Tensor, linear: nn.Linear, residual: Tensor, norm: nn.LayerNorm, dropout: nn.Dropout,
                   training: bool, cast) -> Tensor:
    """norm(residual + dropout(linear(x))) in one fused op (post-norm)."""
    from fastdetr.kernels.linear_layernorm import linear_residual_layernorm

    return linear_residual_layernorm(x, cast(linear.weight), cast(linear.bias), residual, cast(norm.weight),
                                     cast(norm.bias),
                                     eps=norm.eps, dropout_p=dropout.p if training else 0.0)


def _residual_then_norm(x: Tensor, linear: nn.Linear, residual: Tensor, norm: nn.LayerNorm, dropout: nn.Dropout,
                        training: bool, cast) -> tuple[Tensor, Tensor]:
    """(stream, norm(stream)) with stream = residual + dropout(linear(x)), in one fused op (pre-norm)."""
    from fastdetr.kernels.linear_layernorm import linear_residual_and_layernorm

    return linear_residual_and_layernorm(x, cast(linear.weight), cast(linear.bias), residual, cast(norm.weight),
                                         cast(norm.bias),
                                         eps=norm.eps, dropout_p=dropout.p if training else 0.0)


def _layer_norm(x: Tensor, norm: nn.LayerNorm, cast) -> Tensor:
    return F.layer_norm(x, norm.normalized_shape, cast(norm.weight), cast(norm.bias), norm.eps)


def _needs_grad(layer: nn.Module, *tensors: Tensor | None) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors) or any(p.requires_grad for p in layer.parameters())


def _ffn(layer: nn.Module, x: Tensor, residual: Tensor, norm: nn.LayerNorm | None, dropout: nn.Dropout,
         cast) -> Tensor:
    """residual + dropout(linear2(dropout(relu(linear1(x))))), then `norm` when given (post-norm)."""
    training = layer.training
    if not training and not _needs_grad(layer, x, residual) and x.shape[-1] <= 256:
        from fastdetr.kernels.ffn import ffn_inference  # the hidden stays on chip

        return ffn_inference(x, cast(layer.linear1.weight), cast(layer.linear1.bias), cast(layer.linear2.weight),
                             cast(layer.linear2.bias), residual, None if norm is None else cast(norm.weight),
                             None if norm is None else cast(norm.bias), eps=1e-5 if norm is None else norm.eps)
    from fastdetr.kernels.linear_layernorm import linear_residual
    from fastdetr.kernels.linear_relu import linear_relu_dropout

    hidden = linear_relu_dropout(x, cast(layer.linear1.weight), cast(layer.linear1.bias),
                                 dropout_p=layer.dropout.p if training else 0.0)
    if norm is not None:
        return _residual_norm(hidden, layer.linear2, residual, norm, dropout, training, cast)
    return linear_residual(hidden, cast(layer.linear2.weight), cast(layer.linear2.bias), residual,
                           dropout_p=dropout.p if training else 0.0)


def _no_autocast(tensor: Tensor):
    """Autocast off around the fused chain: its ops get inputs already in one dtype (F.layer_norm and
    F.linear inside it would otherwise change dtypes under autocast)."""
    return torch.autocast(tensor.device.type, enabled=False)


class TransformerEncoderLayer(reference.TransformerEncoderLayer):
    """DETR's encoder layer; ReLU layers run fused kernels, post-norm and pre-norm (see the module docstring)."""

    def forward(self, src: Tensor, src_mask: Tensor | None = None,
                src_key_padding_mask: Tensor | None = None, pos: Tensor | None = None) -> Tensor:
        """src (S, B, d), src_key_padding_mask (B, S) True on padding, pos (S, B, d) -> (S, B, d).

        Under autocast the fused chain runs in autocast's dtype (weights and inputs cast, as autocast
        casts them for nn.Linear) and returns that dtype, where the reference's final LayerNorm
        returns float32."""
        if src_mask is not None or not _fusable(self, (self.norm1, self.norm2), (self.self_attn,),
                                                (src, pos), (src_key_padding_mask,)):
            return super().forward(src, src_mask=src_mask, src_key_padding_mask=src_key_padding_mask, pos=pos)
        if pos is not None and pos.shape != src.shape:
            pos = pos.expand_as(src)
        cast, (src, pos) = _caster(self, src, pos)
        with _no_autocast(src):
            return self._fused_forward(src, pos, src_key_padding_mask, cast)

    def _fused_forward(self, src: Tensor, pos: Tensor | None, src_key_padding_mask: Tensor | None, cast) -> Tensor:
        training = self.training
        if self.normalize_before:
            normed = _layer_norm(src, self.norm1, cast)
            attended = _self_attention(self.self_attn, normed, pos, src_key_padding_mask, training, cast)
            src, normed = _residual_then_norm(attended, self.self_attn.out_proj, src, self.norm2, self.dropout1,
                                              training, cast)
            return _ffn(self, normed, src, None, self.dropout2, cast)
        attended = _self_attention(self.self_attn, src, pos, src_key_padding_mask, training, cast)
        src = _residual_norm(attended, self.self_attn.out_proj, src, self.norm1, self.dropout1, training, cast)
        return _ffn(self, src, src, self.norm2, self.dropout2, cast)


class TransformerDecoderLayer(reference.TransformerDecoderLayer):
    """DETR's decoder layer; ReLU layers run fused kernels, post-norm and pre-norm (see the module docstring)."""

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Tensor | None = None,
                memory_mask: Tensor | None = None, tgt_key_padding_mask: Tensor | None = None,
                memory_key_padding_mask: Tensor | None = None, pos: Tensor | None = None,
                query_pos: Tensor | None = None) -> Tensor:
        """tgt (Q, B, d), memory (S, B, d), memory_key_padding_mask (B, S), pos (S, B, d),
        query_pos (Q, B, d) -> (Q, B, d). Autocast as in TransformerEncoderLayer.forward."""
        masks = (tgt_key_padding_mask, memory_key_padding_mask)
        if (tgt_mask is not None or memory_mask is not None
                or not _fusable(self, (self.norm1, self.norm2, self.norm3), (self.self_attn, self.multihead_attn),
                                (tgt, memory, pos, query_pos), masks)):
            return super().forward(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                                   tgt_key_padding_mask=tgt_key_padding_mask,
                                   memory_key_padding_mask=memory_key_padding_mask, pos=pos, query_pos=query_pos)
        if query_pos is not None and query_pos.shape != tgt.shape:
            query_pos = query_pos.expand_as(tgt)
        cast, (tgt, memory, pos, query_pos) = _caster(self, tgt, memory, pos, query_pos)
        with _no_autocast(tgt):
            return self._fused_forward(tgt, memory, pos, query_pos, tgt_key_padding_mask, memory_key_padding_mask,
                                       cast)

    def _fused_forward(self, tgt: Tensor, memory: Tensor, pos: Tensor | None, query_pos: Tensor | None,
                       tgt_key_padding_mask: Tensor | None, memory_key_padding_mask: Tensor | None, cast) -> Tensor:
        training = self.training
        key = memory if pos is None else memory + pos
        if self.normalize_before:
            normed = _layer_norm(tgt, self.norm1, cast)
            attended = _self_attention(self.self_attn, normed, query_pos, tgt_key_padding_mask, training, cast)
            tgt, normed = _residual_then_norm(attended, self.self_attn.out_proj, tgt, self.norm2, self.dropout1,
                                              training, cast)
            query = normed if query_pos is None else normed + query_pos
            attended = _cross_attention(self.multihead_attn, query, key, memory, memory_key_padding_mask, training,
                                        cast)
            tgt, normed = _residual_then_norm(attended, self.multihead_attn.out_proj, tgt, self.norm3,
                                              self.dropout2, training, cast)
            return _ffn(self, normed, tgt, None, self.dropout3, cast)
        attended = _self_attention(self.self_attn, tgt, query_pos, tgt_key_padding_mask, training, cast)
        tgt = _residual_norm(attended, self.self_attn.out_proj, tgt, self.norm1, self.dropout1, training, cast)
        query = tgt if query_pos is None else tgt + query_pos
        attended = _cross_attention(self.multihead_attn, query, key, memory, memory_key_padding_mask, training,
                                    cast)
        tgt = _residual_norm(attended, self.multihead_attn.out_proj, tgt, self.norm2, self.dropout2, training, cast)
        return _ffn(self, tgt, tgt, self.norm3, self.dropout3, cast)
