"""Fused versions of Hugging Face transformers' multi-scale deformable attention (MSDA) modules.

transformers is not imported here. When `fastdetr.optimize` meets one of these modules, `fused_subclass`
derives a subclass of that module's own class, so transformers' `isinstance` checks (its weight
initialisation, for one) still hold, and assigns it to `__class__`. The two kinds (fastdetr.nn.convert
recognises them by class name and structure):

- the parameter-free sampling core `MultiScaleDeformableAttention` that Deformable DETR's and RT-DETR's
  `*MultiscaleDeformableAttention` hold as `.attn` (and so do the models copied from them: Grounding DINO,
  OmDet-Turbo, ...). It takes the official op's layout, so `FusedSamplingCore.forward` is the op
  (`fastdetr.nn.functional.ms_deform_attn`). The module around it is left as it is: its projections,
  padding mask and sampling locations are already the official module's math;
- RT-DETRv2's `RTDetrV2MultiscaleDeformableAttention`, which has no core module (it calls a function).
  `FusedRTDetrV2Attention.forward` repeats its math (points of every level flattened into one axis, each
  level's own point count `n_points_list`, box offsets scaled by 1 / P_l and `offset_scale`) and then calls
  the op. Its "discrete" sampling method (nearest pixel, no interpolation) and 2-d reference points go
  to the module's own forward.

transformers' value masks are True on valid tokens (Deformable DETR's are True on padding).

`fused_subclass` also makes the fused transformers DETR layers (`fastdetr.nn.hf_detr`'s mixins). A fused class
pickles by reference, like any class: its `__qualname__` is "<mixin>:<original module>:<original
qualname>" with "/" for dots, which this module's `__getattr__` rebuilds on unpickling.
"""
from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdetr.nn import functional, hf_detr


class FusedSamplingCore:
    """transformers' MSDA sampling core on fastdetr's op: same arguments and output (module docstring)."""

    def forward(self, value: Tensor, value_spatial_shapes: Tensor, value_spatial_shapes_list: list[tuple[int, int]],
                level_start_index: Tensor, sampling_locations: Tensor, attention_weights: Tensor,
                im2col_step: int | None = None) -> Tensor:
        """value (N, S, M, D); value_spatial_shapes (L, 2) integer (H, W) and the same as a list of tuples;
        level_start_index (L,); sampling_locations (N, Lq, M, L, P, 2) as (x, y) in [0, 1];
        attention_weights (N, Lq, M, L, P). Returns (N, Lq, M * D). im2col_step (a CUDA batching knob of
        the official op) is ignored."""
        if not isinstance(value_spatial_shapes, Tensor) or not isinstance(level_start_index, Tensor):
            return super().forward(value, value_spatial_shapes, value_spatial_shapes_list, level_start_index,
                                   sampling_locations, attention_weights, im2col_step)
        return functional.ms_deform_attn(value, value_spatial_shapes, level_start_index, sampling_locations,
                                         attention_weights)


class FusedRTDetrV2Attention:
    """RT-DETRv2's MSDA with the sampling on fastdetr's op: same parameters, arguments and outputs."""

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, encoder_hidden_states=None,
                encoder_attention_mask=None, position_embeddings: Tensor | None = None, reference_points=None,
                spatial_shapes=None, spatial_shapes_list=None, level_start_index=None, **kwargs):
        """hidden_states (N, Lq, d_model) queries; encoder_hidden_states (N, S, d_model); attention_mask
        (N, S) bool, True on valid tokens, or None; reference_points (N, Lq, 1, 4) boxes (x, y, w, h);
        spatial_shapes (L, 2) (H, W) and spatial_shapes_list the same as tuples; level_start_index (L,).
        Returns (output (N, Lq, d_model), attention weights (N, Lq, M, sum of P_l) after the softmax)."""
        counts = [int(count) for count in self.n_points_list]
        if (self.method != "default" or reference_points is None or reference_points.shape[-1] != 4
                or spatial_shapes is None or level_start_index is None or spatial_shapes_list is None
                or len(counts) != len(spatial_shapes_list)):
            return super().forward(hidden_states, attention_mask=attention_mask,
                                   encoder_hidden_states=encoder_hidden_states,
                                   encoder_attention_mask=encoder_attention_mask,
                                   position_embeddings=position_embeddings, reference_points=reference_points,
                                   spatial_shapes=spatial_shapes, spatial_shapes_list=spatial_shapes_list,
                                   level_start_index=level_start_index, **kwargs)
        if position_embeddings is not None:
            hidden_states = hidden_states + position_embeddings
        batch, queries, _ = hidden_states.shape
        tokens = encoder_hidden_states.shape[1]
        if sum(height * width for height, width in spatial_shapes_list) != tokens:
            raise ValueError("Make sure to align the spatial shapes with the sequence length of the encoder "
                             f"hidden states: {list(spatial_shapes_list)} against {tokens} tokens")
        heads, points = self.n_heads, sum(counts)

        value = self.value_proj(encoder_hidden_states)
        if attention_mask is not None:
            value = value.masked_fill(~attention_mask[..., None], 0.0)
        value = value.view(batch, tokens, heads, self.d_model // heads)
        offsets = self.sampling_offsets(hidden_states).view(batch, queries, heads, points, 2)
        weights = F.softmax(self.attention_weights(hidden_states).view(batch, queries, heads, points), -1)
        # each point's offset is in units of its box, times 1 / P_l of its level and offset_scale
        scale = self.n_points_scale.to(dtype=hidden_states.dtype).unsqueeze(-1)                  # (sum P_l, 1)
        offsets = offsets * scale * reference_points[:, :, None, :, 2:] * self.offset_scale
        locations = reference_points[:, :, None, :, :2] + offsets                          # (N, Lq, M, sum P_l, 2)
        locations, level_weights = _by_level(locations, weights, counts)
        output = functional.ms_deform_attn(value, spatial_shapes, level_start_index, locations, level_weights)
        return self.output_proj(output), weights


def _by_level(locations: Tensor, weights: Tensor, counts: list[int]) -> tuple[Tensor, Tensor]:
    """Points flattened level after level, locations (N, Lq, M, sum P_l, 2) and weights (N, Lq, M, sum P_l),
    to the op's (N, Lq, M, L, P, 2) and (N, Lq, M, L, P), P = max P_l: a view when every level has P points;
    otherwise the levels with fewer are padded with weight-0 points at (-1, -1), outside every map, which
    read nothing and add nothing."""
    levels, most = len(counts), max(counts)
    if all(count == most for count in counts):
        return locations.unflatten(3, (levels, most)), weights.unflatten(3, (levels, most))
    padded_locations = [F.pad(chunk, (0, 0, 0, most - count), value=-1.0)
                        for chunk, count in zip(locations.split(counts, dim=3), counts)]
    padded_weights = [F.pad(chunk, (0, most - count)) for chunk, count in zip(weights.split(counts, dim=3), counts)]
    return torch.stack(padded_locations, dim=3), torch.stack(padded_weights, dim=3)


_MIXINS = {mixin.__name__: mixin for mixin in (FusedSamplingCore, FusedRTDetrV2Attention, *hf_detr.MIXINS)}


@functools.cache
def fused_subclass(original: type, mixin: type) -> type:
    """The class `mixin` + `original` (one per pair): named "Fused<original name>", pickled by reference."""
    fused = type(f"Fused{original.__name__}", (mixin, original), {"__module__": __name__})
    # pickle splits a qualname at dots: "/" stands for them
    fused.__qualname__ = f"{mixin.__name__}:{original.__module__}:{original.__qualname__}".replace(".", "/")
    fused.__doc__ = f"{original.__name__} on fastdetr's kernels ({mixin.__name__}, {mixin.__module__})."
    return fused


def __getattr__(name: str) -> type:
    # unpickling a fused class: its qualname "<mixin>:<module>:<qualname>" rebuilds it (importing the original's module)
    parts = name.split(":")
    if len(parts) != 3 or parts[0] not in _MIXINS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    mixin, module_name, qualname = parts
    original = importlib.import_module(module_name.replace("/", "."))
    for attribute in qualname.split("/"):
        original = getattr(original, attribute)
    return fused_subclass(original, _MIXINS[mixin])
