"""`fastdetr.nn.MultiheadAttention`: torch.nn.MultiheadAttention with the fused attention kernel.

A subclass: same constructor, parameters (`in_proj_weight`, `in_proj_bias`,
`out_proj.*`), state_dict, forward signature and (L, B, E) / batch_first
layouts, so it is a drop-in for DETR's attention modules and loads the same
checkpoints. What changes is the middle: the projections stay cuBLAS GEMMs
(one GEMM for Q and K when query is key, as in DETR's self-attention), and
softmax(QK^T)V with the key padding mask and attention dropout runs in
`fastdetr.kernels.attention` instead of materialising every B x H x L x S
score matrix.

The Triton path runs when `fastdetr.backend.use_triton` says so (CUDA tensors,
or CPU tensors under TRITON_INTERPRET=1); other CPU tensors run the parent's
forward, unchanged. Anything the kernel does not support falls back to the
parent's forward with one warning per reason: `need_weights=True` (the
weights are never materialised), an `attn_mask` or `is_causal`, a float key
padding mask, separate key/value dimensions, `add_bias_kv`, `add_zero_attn`,
unbatched inputs, head dims other than 32 and 64, or inputs of another dtype
than the parameters.

One deliberate difference: a query whose keys are all padded gets zeros,
where torch.nn.MultiheadAttention returns NaN.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdetr.backend import use_triton

_warned: set[str] = set()


class FusedFallbackWarning(UserWarning):
    """A fused module ran its plain-PyTorch forward instead of the kernel (said once per reason)."""


def _fallback(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(
            f"fastdetr.nn.MultiheadAttention: {reason}; running torch.nn.MultiheadAttention's forward instead",
            FusedFallbackWarning, stacklevel=3,
        )


class MultiheadAttention(nn.MultiheadAttention):
    """torch.nn.MultiheadAttention whose attention core is a fused Triton kernel (see the module docstring)."""

    @classmethod
    def convert(cls, module: nn.MultiheadAttention) -> "MultiheadAttention":
        """Turn an existing nn.MultiheadAttention into this class in place (same Parameter objects) and return it."""
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"expected a torch.nn.MultiheadAttention, got {type(module).__name__}")
        module.__class__ = cls
        return module

    def _unsupported(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None,
                     need_weights: bool, attn_mask: Tensor | None, is_causal: bool) -> str | None:
        if need_weights:
            return "need_weights=True (attention weights are never materialised; pass need_weights=False)"
        if attn_mask is not None or is_causal:
            return "attn_mask / is_causal is not supported by the fused kernel"
        if not self._qkv_same_embed_dim:
            return "separate key/value dimensions (kdim/vdim) are not supported"
        if self.bias_k is not None or self.add_zero_attn:
            return "add_bias_kv / add_zero_attn are not supported"
        if query.dim() != 3:
            return "unbatched (2-D) inputs are not supported"
        if self.head_dim not in (32, 64):
            return f"head dim {self.head_dim} is not supported (32 or 64)"
        if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
            return "a float key padding mask is not supported (use a bool mask, True = ignore)"
        dtype = self.in_proj_weight.dtype
        if any(t.dtype != dtype for t in (query, key, value)):
            return f"inputs of another dtype than the parameters ({dtype})"
        return None

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """query (L, B, E), key and value (S, B, E) -- (B, L, E) / (B, S, E) with batch_first;
        key_padding_mask (B, S) bool, True = ignore. Returns (output like query, None) on the fused path."""
        parent = super().forward
        if not use_triton(query, key, value, self.in_proj_weight):
            return parent(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                          attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        reason = self._unsupported(query, key, value, key_padding_mask, need_weights, attn_mask, is_causal)
        if reason is not None:
            _fallback(reason)
            return parent(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                          attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        return self._fused_forward(query, key, value, key_padding_mask), None

    def _fused_forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        from fastdetr.kernels.attention import attention

        if self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        length, batch, embed = query.shape
        source = key.shape[0]
        if key.shape[1] != batch or value.shape[:2] != key.shape[:2]:
            raise ValueError(
                f"MultiheadAttention: query {tuple(query.shape)}, key {tuple(key.shape)} and value "
                f"{tuple(value.shape)} disagree on batch or source length"
            )
        if key_padding_mask is not None and key_padding_mask.shape != (batch, source):
            raise ValueError(f"key_padding_mask: expected shape {(batch, source)}, got {tuple(key_padding_mask.shape)}")
        heads, head_dim = self.num_heads, self.head_dim
        weight, bias = self.in_proj_weight, self.in_proj_bias
        bias_q, bias_k, bias_v = (None, None, None) if bias is None else bias.chunk(3)
        if query is key:
            # DETR's self-attention (q = k = x + pos): one GEMM for both projections.
            qk = F.linear(query, weight[: 2 * embed], None if bias is None else bias[: 2 * embed])
            q, k = qk[..., :embed], qk[..., embed:]
        else:
            q = F.linear(query, weight[:embed], bias_q)
            k = F.linear(key, weight[embed: 2 * embed], bias_k)
        v = F.linear(value, weight[2 * embed:], bias_v)
        # (L, B, E) -> (B, H, L, D) views: the kernel reads the projections in place.
        q = q.unflatten(-1, (heads, head_dim)).permute(1, 2, 0, 3)
        k = k.unflatten(-1, (heads, head_dim)).permute(1, 2, 0, 3)
        v = v.unflatten(-1, (heads, head_dim)).permute(1, 2, 0, 3)
        dropout_p = self.dropout if self.training else 0.0
        out = attention(q, k, v, key_padding_mask=key_padding_mask, dropout_p=dropout_p)
        # (B, H, L, D) -> (L, B, E); a view when the kernel wrote (L, B, H, D) storage.
        out = out.permute(2, 0, 1, 3).reshape(length, batch, embed)
        out = self.out_proj(out)
        return out.transpose(0, 1) if self.batch_first else out
