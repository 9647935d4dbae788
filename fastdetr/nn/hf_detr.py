"""Hugging Face transformers' DETR and Table Transformer encoder / decoder layers on fastdetr's fused chain.

`fastdetr.optimize` converts transformers' `DetrEncoderLayer` / `DetrDecoderLayer` and
`TableTransformerEncoderLayer` / `TableTransformerDecoderLayer` by assigning a subclass of the layer's own
class (`fastdetr.nn.hf.fused_subclass`): the same module, the same Parameters, the same state_dict. Its
forward runs the chain `fastdetr.nn.TransformerEncoderLayer` / `TransformerDecoderLayer` run (self-attention
with the position added to q and k inside the in-projection kernel, flash attention with the key padding
mask, out-projection + dropout + residual + LayerNorm in one epilogue, the FFN as linear+ReLU+dropout then
linear+residual+LayerNorm, or the on-chip FFN kernel in inference) through a view (`_LayerView`) that names
transformers' modules the way that chain reads them. The separate q, k, v weights stay separate Parameters:
the view stacks them afresh at each call (`torch.cat`, differentiable), so nothing goes stale after an
optimizer step.

Two layouts are in use (`Layout`), told apart by structure:
- transformers >= 5's DETR (`TRANSFORMERS_5`): `DetrSelfAttention` / `DetrCrossAttention` with
  `q_proj k_proj v_proj o_proj`, `DetrMLP` with `fc1 fc2 activation_fn`; layers return a tensor; masks from
  `create_bidirectional_mask`, bool (True = attend, sdpa) or additive float.
- transformers 4.x's DETR and Table Transformer in 4.x and 5.x (`TRANSFORMERS_4`): `DetrAttention` /
  `TableTransformerAttention` with `out_proj`, `fc1` / `fc2` / `activation_fn` on the layer; layers return a
  tuple; masks additive float (B, 1, T, S), a bool mask read the way that attention module reads one
  (True = masked).
Table Transformer's layers are pre-norm (its class name says so; the structure is DETR's).

The key padding mask is the mask's first query row, on the device (no sync): transformers builds these masks
from the pixel mask, so every row is the same. A layer whose attention module has forward hooks, a non-ReLU
activation, a head dim the attention kernel does not take, inputs on a device Triton cannot run, a mask that
is not (B, 1, T, S) or (B, S), `output_attentions`, or a keyword argument the layer layout does not name run
transformers' own forward. Of the keyword arguments transformers 5 passes down (`use_cache`, flash-attention
lengths, ...) only `output_attentions` changes what a layer must return; the others mean nothing to a
bidirectional layer that does not call transformers' attention functions. The training-time clamp of
non-finite encoder outputs (a host sync in transformers) is not applied on the fused path.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdetr.nn import functional
from fastdetr.nn.transformer import TransformerDecoderLayer, TransformerEncoderLayer, _caster, _no_autocast


@dataclass(frozen=True)
class Layout:
    """Where a transformers DETR layer keeps what the fused chain reads."""

    name: str
    out_proj: str                  # the attention module's output projection
    attention_dropout: str         # the attention module's float dropout rate
    mlp: str | None                # the module holding fc1 / fc2 / activation_fn, or None: the layer itself
    bool_mask_attends: bool        # a bool mask's True: attend (sdpa's masks) or masked (DetrAttention's)
    returns_tuple: bool
    normalize_before: bool = False


TRANSFORMERS_5 = Layout("transformers 5", "o_proj", "attention_dropout", "mlp", bool_mask_attends=True,
                        returns_tuple=False)
TRANSFORMERS_4 = Layout("transformers 4", "out_proj", "dropout", None, bool_mask_attends=False, returns_tuple=True)
_CLASSES = {"DetrEncoderLayer": ("encoder", False), "DetrDecoderLayer": ("decoder", False),
            "TableTransformerEncoderLayer": ("encoder", True), "TableTransformerDecoderLayer": ("decoder", True)}


class _Dropout:
    """The `.p` the fused chain reads off an nn.Dropout, for transformers' float dropout rates."""

    def __init__(self, p: float) -> None:
        self.p = float(p)


class _AttentionView:
    """transformers' q/k/v/out projections under nn.MultiheadAttention's names (`in_proj_weight` [q; k; v])."""

    def __init__(self, attention: nn.Module, layout: Layout) -> None:
        self._attention = attention
        self.num_heads = _heads(attention)
        self.dropout = float(getattr(attention, layout.attention_dropout))
        self.out_proj = getattr(attention, layout.out_proj)

    @property
    def in_proj_weight(self) -> Tensor:
        a = self._attention
        return torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])

    @property
    def in_proj_bias(self) -> Tensor:
        a = self._attention
        return torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])


def _ffn(layer: nn.Module, layout: Layout) -> nn.Module:
    return layer if layout.mlp is None else getattr(layer, layout.mlp)


class _LayerView:
    """A transformers DETR layer under the names `TransformerEncoderLayer._fused_forward` /
    `TransformerDecoderLayer._fused_forward` and `fastdetr.nn.functional` read."""

    activation = staticmethod(F.relu)

    def __init__(self, layer: nn.Module, layout: Layout, decoder: bool) -> None:
        self._layer = layer
        self.training = layer.training
        self.normalize_before = layout.normalize_before
        ffn = _ffn(layer, layout)
        output_dropout = _Dropout(layer.dropout if layout.mlp is None else ffn.dropout)
        self.self_attn = _AttentionView(layer.self_attn, layout)
        self.linear1, self.linear2 = ffn.fc1, ffn.fc2
        self.dropout = _Dropout(ffn.activation_dropout)       # the FFN's hidden dropout
        self.norm1, self.dropout1 = layer.self_attn_layer_norm, _Dropout(layer.dropout)
        if decoder:
            self.multihead_attn = _AttentionView(layer.encoder_attn, layout)
            self.norm2, self.dropout2 = layer.encoder_attn_layer_norm, _Dropout(layer.dropout)
            self.norm3, self.dropout3 = layer.final_layer_norm, output_dropout
        else:
            self.norm2, self.dropout2 = layer.final_layer_norm, output_dropout

    def parameters(self):
        return self._layer.parameters()


def _heads(attention: nn.Module) -> int:
    return attention.q_proj.out_features // attention.head_dim


def _attentions(layer: nn.Module, decoder: bool) -> tuple[nn.Module, ...]:
    return (layer.self_attn, layer.encoder_attn) if decoder else (layer.self_attn,)


def structure_supported(layer: nn.Module, layout: Layout, decoder: bool) -> str | None:
    """Why the fused chain cannot run this layer, from its structure alone, or None when it can."""
    ffn = _ffn(layer, layout)
    if not isinstance(ffn.activation_fn, nn.ReLU) and ffn.activation_fn is not F.relu:
        return f"activation {type(ffn.activation_fn).__name__} (the fused FFN is ReLU)"
    for attention in _attentions(layer, decoder):
        projections = (attention.q_proj, attention.k_proj, attention.v_proj, getattr(attention, layout.out_proj))
        if any(p.bias is None for p in projections):
            return "attention projections without bias"
        if attention.head_dim not in functional.attention_head_dims():
            dims = " or ".join(map(str, functional.attention_head_dims())) or "no Triton"
            return f"head dim {attention.head_dim} ({dims})"
    norms = [layer.self_attn_layer_norm, layer.final_layer_norm] + ([layer.encoder_attn_layer_norm] if decoder
                                                                    else [])
    if any(norm.weight is None or norm.bias is None for norm in norms):
        return "LayerNorm without affine parameters"
    if ffn.fc1.bias is None or ffn.fc2.bias is None:
        return "MLP without bias"
    return None


def _key_padding(mask: Tensor | None, batch: int, source: int, layout: Layout) -> tuple[bool, Tensor | None]:
    """(usable, key padding mask (B, S) True on padding) from transformers' attention mask, on the device."""
    if mask is None:
        return True, None
    if mask.dim() == 4 and mask.shape[0] == batch and mask.shape[1] == 1 and mask.shape[-1] == source:
        row = mask[:, 0, 0, :]
    elif mask.dim() == 2 and tuple(mask.shape) == (batch, source):
        row = mask
    else:
        return False, None
    if row.dtype == torch.bool:
        return True, (~row if layout.bool_mask_attends else row)
    if mask.dim() == 2:
        return True, row == 0       # a 2-d float or integer mask is 1 on what to attend
    return True, row < 0


def _runs_fused(layer: nn.Module, layout: Layout, decoder: bool, tensors: tuple[Tensor | None, ...]) -> bool:
    """Whether this call takes the fused chain (module docstring's conditions, per call)."""
    if any(a._forward_hooks or a._forward_pre_hooks for a in _attentions(layer, decoder)):
        return False      # something records the attention module's outputs (output_attentions)
    weight = _ffn(layer, layout).fc1.weight
    present = [t for t in tensors if t is not None]
    if not functional.use_triton(*present, weight):
        return False
    if structure_supported(layer, layout, decoder) is not None:
        return False
    dtype = functional.autocast_dtype(weight) or weight.dtype
    return all(t.dim() == 3 and (t.dtype == dtype or functional.autocast_dtype(t)) for t in present)


def _encode(layer: nn.Module, hidden_states: Tensor, attention_mask: Tensor | None,
            position: Tensor | None) -> Tensor | None:
    """The fused encoder layer's output (B, S, d), or None where transformers' forward must run."""
    layout = layout_of(layer)[1]
    batch, source = hidden_states.shape[:2]
    usable, padding = _key_padding(attention_mask, batch, source, layout)
    if not usable or not _runs_fused(layer, layout, False, (hidden_states, position)):
        return None
    view = _LayerView(layer, layout, decoder=False)
    src = hidden_states.transpose(0, 1)
    pos = None if position is None else position.transpose(0, 1)
    cast, (src, pos) = _caster(view, src, pos)
    with _no_autocast(src):
        out = TransformerEncoderLayer._fused_forward(view, src, pos, padding, None, cast)
    return out.transpose(0, 1)


def _decode(layer: nn.Module, hidden_states: Tensor, attention_mask: Tensor | None, position: Tensor | None,
            query_position: Tensor | None, encoder_hidden_states: Tensor | None,
            encoder_attention_mask: Tensor | None) -> Tensor | None:
    """The fused decoder layer's output (B, Q, d), or None where transformers' forward must run."""
    if encoder_hidden_states is None:
        return None
    layout = layout_of(layer)[1]
    batch, queries = hidden_states.shape[:2]
    usable_self, query_padding = _key_padding(attention_mask, batch, queries, layout)
    usable_cross, memory_padding = _key_padding(encoder_attention_mask, batch, encoder_hidden_states.shape[1],
                                                layout)
    tensors = (hidden_states, position, query_position, encoder_hidden_states)
    if not (usable_self and usable_cross and _runs_fused(layer, layout, True, tensors)):
        return None
    view = _LayerView(layer, layout, decoder=True)
    tgt, memory, pos, query_pos = (None if t is None else t.transpose(0, 1) for t in
                                   (hidden_states, encoder_hidden_states, position, query_position))
    cast, (tgt, memory, pos, query_pos) = _caster(view, tgt, memory, pos, query_pos)
    with _no_autocast(tgt):
        out = TransformerDecoderLayer._fused_forward(view, tgt, memory, pos, query_pos, query_padding,
                                                     memory_padding, None, cast)
    return out.transpose(0, 1)


class FusedDetrEncoderLayer:
    """transformers 5's DETR encoder layer on fastdetr's fused chain: same arguments and output."""

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                spatial_position_embeddings: Tensor | None = None, **kwargs) -> Tensor:
        """hidden_states (B, S, d); attention_mask from create_bidirectional_mask or None;
        spatial_position_embeddings (B, S, d). Returns (B, S, d)."""
        out = None if kwargs.get("output_attentions") else _encode(self, hidden_states, attention_mask,
                                                                   spatial_position_embeddings)
        if out is None:
            return super().forward(hidden_states, attention_mask, spatial_position_embeddings, **kwargs)
        return out


class FusedDetrDecoderLayer:
    """transformers 5's DETR decoder layer on fastdetr's fused chain: same arguments and output."""

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                spatial_position_embeddings: Tensor | None = None,
                object_queries_position_embeddings: Tensor | None = None,
                encoder_hidden_states: Tensor | None = None, encoder_attention_mask: Tensor | None = None,
                **kwargs) -> Tensor:
        """hidden_states (B, Q, d) queries; encoder_hidden_states (B, S, d) memory; masks from
        create_bidirectional_mask or None; spatial_position_embeddings (B, S, d) for the keys,
        object_queries_position_embeddings (B, Q, d). Returns (B, Q, d)."""
        out = None if kwargs.get("output_attentions") else _decode(
            self, hidden_states, attention_mask, spatial_position_embeddings, object_queries_position_embeddings,
            encoder_hidden_states, encoder_attention_mask)
        if out is None:
            return super().forward(hidden_states, attention_mask, spatial_position_embeddings,
                                   object_queries_position_embeddings, encoder_hidden_states,
                                   encoder_attention_mask=encoder_attention_mask, **kwargs)
        return out


class FusedLegacyEncoderLayer:
    """transformers 4.x's DETR (and Table Transformer's) encoder layer on fastdetr's fused chain: same
    arguments, same 1-tuple output."""

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                object_queries: Tensor | None = None, output_attentions: bool = False, **kwargs) -> tuple:
        """hidden_states (B, S, d); attention_mask additive (B, 1, S, S) or None; object_queries: the spatial
        position embeddings (B, S, d). Returns (hidden_states,), or transformers' own outputs."""
        out = None if output_attentions or kwargs else _encode(self, hidden_states, attention_mask, object_queries)
        if out is None:
            return super().forward(hidden_states, attention_mask, object_queries=object_queries,
                                   output_attentions=output_attentions, **kwargs)
        return (out,)


class FusedLegacyDecoderLayer:
    """transformers 4.x's DETR (and Table Transformer's) decoder layer on fastdetr's fused chain: same
    arguments, same 1-tuple output."""

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                object_queries: Tensor | None = None, query_position_embeddings: Tensor | None = None,
                encoder_hidden_states: Tensor | None = None, encoder_attention_mask: Tensor | None = None,
                output_attentions: bool = False, **kwargs) -> tuple:
        """hidden_states (B, Q, d) queries; encoder_hidden_states (B, S, d) memory; masks additive
        (B, 1, T, S) or None; object_queries (B, S, d): the spatial position embeddings for the keys;
        query_position_embeddings (B, Q, d). Returns (hidden_states,), or transformers' own outputs."""
        out = None if output_attentions or kwargs else _decode(
            self, hidden_states, attention_mask, object_queries, query_position_embeddings, encoder_hidden_states,
            encoder_attention_mask)
        if out is None:
            return super().forward(hidden_states, attention_mask, object_queries, query_position_embeddings,
                                   encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
                                   output_attentions=output_attentions, **kwargs)
        return (out,)


MIXINS = (FusedDetrEncoderLayer, FusedDetrDecoderLayer, FusedLegacyEncoderLayer, FusedLegacyDecoderLayer)


def _is_attention(module: nn.Module, layout: Layout) -> bool:
    names = ("q_proj", "k_proj", "v_proj", layout.out_proj)
    if not all(isinstance(getattr(module, name, None), nn.Linear) for name in names):
        return False
    return isinstance(getattr(module, "head_dim", None), int) and isinstance(
        getattr(module, layout.attention_dropout, None), (int, float))


def _has_ffn(layer: nn.Module, layout: Layout) -> bool:
    ffn = getattr(layer, layout.mlp, None) if layout.mlp else layer
    return (ffn is not None and isinstance(getattr(ffn, "fc1", None), nn.Linear)
            and isinstance(getattr(ffn, "fc2", None), nn.Linear) and hasattr(ffn, "activation_fn")
            and isinstance(getattr(ffn, "activation_dropout", None), (int, float))
            and isinstance(getattr(ffn, "dropout", None), (int, float)))


def layout_of(module: nn.Module) -> tuple[str, Layout] | None:
    """("encoder" | "decoder", its Layout) for a transformers DETR / Table Transformer layer (class name and
    structure), else None."""
    name = next((cls.__name__ for cls in type(module).__mro__ if cls.__name__ in _CLASSES), None)
    if name is None:
        return None
    kind, pre_norm = _CLASSES[name]
    norms = ("self_attn_layer_norm", "final_layer_norm") + (("encoder_attn_layer_norm",) if kind == "decoder"
                                                            else ())
    if not all(isinstance(getattr(module, norm, None), nn.LayerNorm) for norm in norms):
        return None
    if not isinstance(getattr(module, "dropout", None), (int, float)):
        return None
    attentions = ("self_attn", "encoder_attn") if kind == "decoder" else ("self_attn",)
    for layout in (TRANSFORMERS_5, TRANSFORMERS_4):
        if _has_ffn(module, layout) and all(_is_attention(getattr(module, a, None), layout) for a in attentions):
            return kind, (replace(layout, normalize_before=True) if pre_norm else layout)
    return None


def mixin_for(kind: str, layout: Layout) -> type:
    """The fused forward for a layer of this kind and layout (the first base of its fused subclass)."""
    if layout.returns_tuple:
        return FusedLegacyEncoderLayer if kind == "encoder" else FusedLegacyDecoderLayer
    return FusedDetrEncoderLayer if kind == "encoder" else FusedDetrDecoderLayer
