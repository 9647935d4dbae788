"""Hugging Face transformers' DETR encoder and decoder layers on fastdetr's fused chain (transformers >= 5).

`fastdetr.optimize` converts transformers' `DetrEncoderLayer` / `DetrDecoderLayer` in the layout of
transformers 5 (`DetrSelfAttention` / `DetrCrossAttention` with `q_proj k_proj v_proj o_proj`, `DetrMLP`
with `fc1 fc2 activation_fn`) by assigning a subclass of the layer's own class (`fastdetr.nn.hf.
fused_subclass`): the same module, the same Parameters, the same state_dict. Its forward runs the chain
`fastdetr.nn.TransformerEncoderLayer` / `TransformerDecoderLayer` run (self-attention with the position added
to q and k inside the in-projection kernel, flash attention with the key padding mask, out-projection +
dropout + residual + LayerNorm in one epilogue, the FFN as linear+ReLU+dropout then linear+residual+LayerNorm,
or the on-chip FFN kernel in inference) through a view (`_LayerView`) that names transformers' modules the
way that chain reads them. The separate q, k, v weights stay separate Parameters: the view stacks them
afresh at each call (`torch.cat`, differentiable), so nothing goes stale after an optimizer step.

The key padding mask comes from the mask transformers' `create_bidirectional_mask` made from the pixel mask
(bool, True = attend, or additive float; (B, 1, T, S)): its first query row, on the device (no sync). A layer
whose attention module has forward hooks (transformers records `output_attentions` that way), a non-ReLU
MLP, a head dim the attention kernel does not take, inputs on a device Triton cannot run, or a mask that is
not (B, 1, T, S) or (B, S) run transformers' own forward. Of the keyword arguments transformers passes down
(`use_cache`, flash-attention lengths, ...) only `output_attentions` changes what a layer must return; the
others mean nothing to a bidirectional layer that does not call transformers' attention functions. The
training-time clamp of non-finite encoder outputs (a host sync in transformers) is not applied on the fused
path.

transformers 4.x's layout (`DetrAttention` with `out_proj`, `fc1` / `fc2` on the layer) is not converted
yet: `fastdetr.optimize` leaves it unchanged with a log line.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdetr.nn import functional
from fastdetr.nn.transformer import TransformerDecoderLayer, TransformerEncoderLayer, _caster, _no_autocast


class _Dropout:
    """The `.p` the fused chain reads off an nn.Dropout, for transformers' float dropout rates."""

    def __init__(self, p: float) -> None:
        self.p = float(p)


class _AttentionView:
    """transformers' q/k/v/o projections under nn.MultiheadAttention's names (`in_proj_weight` [q; k; v])."""

    def __init__(self, attention: nn.Module, num_heads: int) -> None:
        self._attention = attention
        self.num_heads = num_heads
        self.dropout = float(attention.attention_dropout)
        self.out_proj = attention.o_proj

    @property
    def in_proj_weight(self) -> Tensor:
        a = self._attention
        return torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])

    @property
    def in_proj_bias(self) -> Tensor:
        a = self._attention
        return torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])


class _LayerView:
    """A transformers DETR layer under the names `TransformerEncoderLayer._fused_forward` /
    `TransformerDecoderLayer._fused_forward` and `fastdetr.nn.functional` read (post-norm)."""

    normalize_before = False
    activation = staticmethod(F.relu)

    def __init__(self, layer: nn.Module, decoder: bool) -> None:
        self._layer = layer
        self.training = layer.training
        self.self_attn = _AttentionView(layer.self_attn, _heads(layer.self_attn))
        self.linear1, self.linear2 = layer.mlp.fc1, layer.mlp.fc2
        self.dropout = _Dropout(layer.mlp.activation_dropout)       # the FFN's hidden dropout
        self.norm1, self.dropout1 = layer.self_attn_layer_norm, _Dropout(layer.dropout)
        if decoder:
            self.multihead_attn = _AttentionView(layer.encoder_attn, _heads(layer.encoder_attn))
            self.norm2, self.dropout2 = layer.encoder_attn_layer_norm, _Dropout(layer.dropout)
            self.norm3, self.dropout3 = layer.final_layer_norm, _Dropout(layer.mlp.dropout)
        else:
            self.norm2, self.dropout2 = layer.final_layer_norm, _Dropout(layer.mlp.dropout)

    def parameters(self):
        return self._layer.parameters()


def _heads(attention: nn.Module) -> int:
    return attention.q_proj.out_features // attention.head_dim


def _attentions(layer: nn.Module, decoder: bool) -> tuple[nn.Module, ...]:
    return (layer.self_attn, layer.encoder_attn) if decoder else (layer.self_attn,)


def structure_supported(layer: nn.Module, decoder: bool) -> str | None:
    """Why the fused chain cannot run this layer, from its structure alone, or None when it can."""
    if not isinstance(layer.mlp.activation_fn, nn.ReLU) and layer.mlp.activation_fn is not F.relu:
        return f"activation {type(layer.mlp.activation_fn).__name__} (the fused FFN is ReLU)"
    for attention in _attentions(layer, decoder):
        projections = (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj)
        if any(p.bias is None for p in projections):
            return "attention projections without bias"
        if attention.head_dim not in functional.attention_head_dims():
            dims = " or ".join(map(str, functional.attention_head_dims())) or "no Triton"
            return f"head dim {attention.head_dim} ({dims})"
    norms = [layer.self_attn_layer_norm, layer.final_layer_norm] + ([layer.encoder_attn_layer_norm] if decoder
                                                                    else [])
    if any(norm.weight is None or norm.bias is None for norm in norms):
        return "LayerNorm without affine parameters"
    if layer.mlp.fc1.bias is None or layer.mlp.fc2.bias is None:
        return "MLP without bias"
    return None


def _key_padding(mask: Tensor | None, batch: int, source: int) -> tuple[bool, Tensor | None]:
    """(usable, key padding mask (B, S) True on padding) from transformers' attention mask, on the device."""
    if mask is None:
        return True, None
    if mask.dim() == 4 and mask.shape[0] == batch and mask.shape[1] == 1 and mask.shape[-1] == source:
        row = mask[:, 0, 0, :]
        return True, (~row if row.dtype == torch.bool else row < 0)
    if mask.dim() == 2 and tuple(mask.shape) == (batch, source):
        return True, (~mask if mask.dtype == torch.bool else mask == 0)
    return False, None


def _runs_fused(layer: nn.Module, decoder: bool, tensors: tuple[Tensor | None, ...]) -> bool:
    """Whether this call takes the fused chain (module docstring's conditions, per call)."""
    if any(a._forward_hooks or a._forward_pre_hooks for a in _attentions(layer, decoder)):
        return False      # something records the attention module's outputs (output_attentions)
    present = [t for t in tensors if t is not None]
    if not functional.use_triton(*present, layer.mlp.fc1.weight):
        return False
    if structure_supported(layer, decoder) is not None:
        return False
    dtype = functional.autocast_dtype(layer.mlp.fc1.weight) or layer.mlp.fc1.weight.dtype
    return all(t.dim() == 3 and (t.dtype == dtype or functional.autocast_dtype(t)) for t in present)


class FusedDetrEncoderLayer:
    """transformers' DETR encoder layer on fastdetr's fused chain: same arguments and output."""

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                spatial_position_embeddings: Tensor | None = None, **kwargs) -> Tensor:
        """hidden_states (B, S, d); attention_mask from create_bidirectional_mask or None;
        spatial_position_embeddings (B, S, d). Returns (B, S, d)."""
        batch, source = hidden_states.shape[:2]
        usable, padding = _key_padding(attention_mask, batch, source)
        if (kwargs.get("output_attentions") or not usable
                or not _runs_fused(self, False, (hidden_states, spatial_position_embeddings))):
            return super().forward(hidden_states, attention_mask, spatial_position_embeddings, **kwargs)
        view = _LayerView(self, decoder=False)
        src = hidden_states.transpose(0, 1)
        pos = None if spatial_position_embeddings is None else spatial_position_embeddings.transpose(0, 1)
        cast, (src, pos) = _caster(view, src, pos)
        with _no_autocast(src):
            out = TransformerEncoderLayer._fused_forward(view, src, pos, padding, None, cast)
        return out.transpose(0, 1)


class FusedDetrDecoderLayer:
    """transformers' DETR decoder layer on fastdetr's fused chain: same arguments and output."""

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                spatial_position_embeddings: Tensor | None = None,
                object_queries_position_embeddings: Tensor | None = None,
                encoder_hidden_states: Tensor | None = None, encoder_attention_mask: Tensor | None = None,
                **kwargs) -> Tensor:
        """hidden_states (B, Q, d) queries; encoder_hidden_states (B, S, d) memory; masks from
        create_bidirectional_mask or None; spatial_position_embeddings (B, S, d) for the keys,
        object_queries_position_embeddings (B, Q, d). Returns (B, Q, d)."""
        batch, queries = hidden_states.shape[:2]
        tensors = (hidden_states, spatial_position_embeddings, object_queries_position_embeddings,
                   encoder_hidden_states)
        usable_self, query_padding = _key_padding(attention_mask, batch, queries)
        source = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        usable_cross, memory_padding = _key_padding(encoder_attention_mask, batch, source)
        if (kwargs.get("output_attentions") or encoder_hidden_states is None or not (usable_self and usable_cross)
                or not _runs_fused(self, True, tensors)):
            return super().forward(hidden_states, attention_mask, spatial_position_embeddings,
                                   object_queries_position_embeddings, encoder_hidden_states,
                                   encoder_attention_mask=encoder_attention_mask, **kwargs)
        view = _LayerView(self, decoder=True)
        tgt, memory, pos, query_pos = (None if t is None else t.transpose(0, 1) for t in
                                       (hidden_states, encoder_hidden_states, spatial_position_embeddings,
                                        object_queries_position_embeddings))
        cast, (tgt, memory, pos, query_pos) = _caster(view, tgt, memory, pos, query_pos)
        with _no_autocast(tgt):
            out = TransformerDecoderLayer._fused_forward(view, tgt, memory, pos, query_pos, query_padding,
                                                         memory_padding, None, cast)
        return out.transpose(0, 1)


def _is_attention(module: nn.Module) -> bool:
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    if not all(isinstance(getattr(module, name, None), nn.Linear) for name in names):
        return False
    return isinstance(getattr(module, "head_dim", None), int) and isinstance(
        getattr(module, "attention_dropout", None), (int, float))


def layer_kind(module: nn.Module) -> str | None:
    """"encoder" or "decoder" for a transformers 5 DETR layer (class name and structure), else None."""
    name = type(module).__name__
    if name not in ("DetrEncoderLayer", "DetrDecoderLayer"):
        return None
    mlp = getattr(module, "mlp", None)
    if not (_is_attention(getattr(module, "self_attn", None)) and mlp is not None
            and isinstance(getattr(mlp, "fc1", None), nn.Linear) and isinstance(getattr(mlp, "fc2", None), nn.Linear)
            and hasattr(mlp, "activation_fn") and isinstance(getattr(module, "dropout", None), (int, float))
            and isinstance(getattr(module, "self_attn_layer_norm", None), nn.LayerNorm)
            and isinstance(getattr(module, "final_layer_norm", None), nn.LayerNorm)):
        return None
    if name == "DetrDecoderLayer":
        if not (_is_attention(getattr(module, "encoder_attn", None))
                and isinstance(getattr(module, "encoder_attn_layer_norm", None), nn.LayerNorm)):
            return None
        return "decoder"
    return "encoder"
