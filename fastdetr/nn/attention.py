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
forward, unchanged. Anything the kernel does not support
(`fastdetr.nn.functional.attention_call_unsupported`, the one rule) falls back
to the parent's forward with one warning per reason: `need_weights=True` (the
weights are never materialised), an `attn_mask` or `is_causal`, a float key
padding mask, separate key/value dimensions, `add_bias_kv`, `add_zero_attn`,
unbatched inputs, head dims the kernel does not take
(`fastdetr.kernels.attention.HEAD_DIMS`), or inputs of another dtype than the
parameters.

One deliberate difference: a query whose keys are all padded gets zeros,
where torch.nn.MultiheadAttention returns NaN.
"""
from __future__ import annotations

import warnings

from torch import Tensor, nn

from fastdetr.nn import functional

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

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """query (L, B, E), key and value (S, B, E) -- (B, L, E) / (B, S, E) with batch_first;
        key_padding_mask (B, S) bool, True = ignore. Returns (output like query, None) on the fused path."""
        reason = None
        if functional.use_triton(query, key, value, self.in_proj_weight):
            reason = functional.attention_call_unsupported(self, query, key, value, key_padding_mask, need_weights,
                                                           attn_mask, is_causal)
            if reason is None:
                return functional.multihead_attention(self, query, key, value, key_padding_mask), None
            _fallback(reason)
        return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                               attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
