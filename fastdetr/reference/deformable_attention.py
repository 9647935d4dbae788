"""Multi-scale deformable attention (MSDA) in plain PyTorch: the specification of the fused kernel.

Deformable DETR's attention core, written here from its definition: for every
query q and head m, P points are sampled on each of L feature levels and
summed with their attention weights,

    out[n, q, m] = sum over l, p of  A[n, q, m, l, p] * bilinear(value_l[n, :, m], loc[n, q, m, l, p])

where bilinear() samples level l (H_l x W_l) at pixel coordinate
(x * W_l - 0.5, y * H_l - 0.5) for loc = (x, y) in [0, 1] (values outside are
allowed), zeros outside the map: exactly `F.grid_sample(mode="bilinear",
padding_mode="zeros", align_corners=False)` on the grid 2 * loc - 1, which is
what this function calls, one level at a time.

Layouts (those of the official op): value (N, S, M, D) with S = sum of H_l * W_l,
the levels stacked in order; spatial_shapes (L, 2) integer (H_l, W_l);
level_start_index (L,) the first token of each level; sampling_locations
(N, Lq, M, L, P, 2) as (x, y); attention_weights (N, Lq, M, L, P). Returns
(N, Lq, M * D) in value's dtype. The shapes are read on the host (a sync for
CUDA tensors): this is the reference, not the hot path.

While tracing (`torch.jit.trace`, or `torch.onnx.export`'s TorchScript-based
exporter) the shapes are not read on the host, where the trace would fix them
to the example's feature-map sizes: each level's H_l, W_l and first token are
0-d tensors taken from spatial_shapes and level_start_index (`unbind`), which
the tracer records in the slice and the reshape, and the number of levels L is
sampling_locations' static dim. The values' checks (positive sizes, token count,
level starts) are then skipped: they would be constants of the trace. With
opset >= 16 grid_sample exports as ONNX GridSample.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def check_ms_deform_attn_inputs(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                                sampling_locations: Tensor, attention_weights: Tensor) -> None:
    """Shape and dtype checks from metadata only (no host sync); ValueError naming the argument."""
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be (N, S, M, D); got {tuple(value.shape)}")
    batch, _, heads, _ = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(f"ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2); "
                         f"got {tuple(sampling_locations.shape)}")
    n, queries, m, levels, points, _ = sampling_locations.shape
    if (n, m) != (batch, heads):
        raise ValueError(f"ms_deform_attn: sampling_locations {tuple(sampling_locations.shape)} disagree with "
                         f"value {tuple(value.shape)} on N or M")
    if tuple(attention_weights.shape) != (batch, queries, heads, levels, points):
        raise ValueError(f"ms_deform_attn: attention_weights must be {(batch, queries, heads, levels, points)}; "
                         f"got {tuple(attention_weights.shape)}")
    if tuple(spatial_shapes.shape) != (levels, 2):
        raise ValueError(f"ms_deform_attn: spatial_shapes must be ({levels}, 2) for {levels} levels; "
                         f"got {tuple(spatial_shapes.shape)}")
    if tuple(level_start_index.shape) != (levels,):
        raise ValueError(f"ms_deform_attn: level_start_index must be ({levels},); got {tuple(level_start_index.shape)}")
    for name, tensor in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
            raise ValueError(f"ms_deform_attn: {name} must be integers; got {tensor.dtype}")
    for name, tensor in (("value", value), ("sampling_locations", sampling_locations),
                         ("attention_weights", attention_weights)):
        if not tensor.dtype.is_floating_point:
            raise ValueError(f"ms_deform_attn: {name} must be floating point; got {tensor.dtype}")


def tracing() -> bool:
    """Whether this call is being traced (`torch.jit.trace`, or `torch.onnx.export`'s TorchScript exporter)."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def ms_deform_attn(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                   attention_weights: Tensor) -> Tensor:
    """MSDA by grid_sample, one level at a time (module docstring): (N, Lq, M * D) in value's dtype.

    level_start_index is checked against spatial_shapes (its levels must be
    stacked in order, as the kernel reads them); the sampling math itself uses
    the shapes only, and the level starts only while tracing.
    """
    if tracing():
        with warnings.catch_warnings():
            # the metadata checks compare the example's sizes, true of the example and not recorded
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                        attention_weights)
        shapes = [tuple(shape.unbind(0)) for shape in spatial_shapes.unbind(0)]   # 0-d (H_l, W_l), traced
        starts = list(level_start_index.unbind(0))                               # 0-d, traced
        return _sample_levels(value, shapes, starts, sampling_locations, attention_weights)
    check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    tokens = value.shape[1]
    levels = sampling_locations.shape[3]
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    if any(h < 1 or w < 1 for h, w in shapes):
        # a product of two negative sizes could still add up to value's token count
        raise ValueError(f"ms_deform_attn: spatial_shapes must be positive (H, W) sizes; got {shapes}")
    sizes = [h * w for h, w in shapes]
    if sum(sizes) != tokens:
        raise ValueError(f"ms_deform_attn: spatial_shapes {shapes} hold {sum(sizes)} tokens, value has {tokens}")
    starts = [sum(sizes[:level]) for level in range(levels)]
    if level_start_index.tolist() != starts:
        raise ValueError(f"ms_deform_attn: level_start_index {level_start_index.tolist()} does not match "
                         f"spatial_shapes {shapes} (expected {starts})")
    return _sample_levels(value, shapes, starts, sampling_locations, attention_weights)


def _sample_levels(value: Tensor, shapes: Sequence[tuple[int | Tensor, int | Tensor]], starts: Sequence[int | Tensor],
                   sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """The sampling math, given each level's (H_l, W_l) and first token as ints or (while tracing) 0-d tensors."""
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    grids = 2 * sampling_locations.to(value.dtype) - 1                            # (N, Lq, M, L, P, 2)
    sampled = []
    for level, ((height, width), start) in enumerate(zip(shapes, starts)):
        # (N, H*W, M, D) -> (N*M, D, H, W): one image per (batch, head)
        level_value = value[:, start:start + height * width].permute(0, 2, 3, 1)
        level_value = level_value.reshape(batch * heads, head_dim, height, width)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        grid = grids[:, :, :, level].transpose(1, 2).reshape(batch * heads, queries, points, 2)
        sampled.append(F.grid_sample(level_value, grid, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))                         # (N*M, D, Lq, P)
    stacked = torch.stack(sampled, dim=-2).flatten(-2)                              # (N*M, D, Lq, L*P)
    weights = attention_weights.to(value.dtype).transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    out = (stacked * weights).sum(-1)                                               # (N*M, D, Lq)
    return out.view(batch, heads * head_dim, queries).transpose(1, 2).contiguous()


def sampling_locations(reference_points: Tensor, sampling_offsets: Tensor, spatial_shapes: Tensor) -> Tensor:
    """Deformable DETR's sampling locations (N, Lq, M, L, P, 2) from reference_points and sampling_offsets.

    reference_points (N, Lq, L, 2) points (x, y): point + offset / (W_l, H_l), the
    offsets in pixels of each level; (N, Lq, L, 4) boxes (x, y, w, h): centre +
    offset / P * (w, h) / 2, the offsets in units of the box (the P-th point of
    the initial pattern reaches its edge). sampling_offsets (N, Lq, M, L, P, 2).
    """
    with warnings.catch_warnings():
        if tracing():
            # points or boxes is a static fact of the graph (the example's last dim), not recorded in the trace
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        if reference_points.dim() != 4 or reference_points.shape[-1] not in (2, 4):
            raise ValueError(f"sampling_locations: reference_points must be (N, Lq, L, 2) points or (N, Lq, L, 4) "
                             f"boxes; got {tuple(reference_points.shape)}")
        points_2d = bool(reference_points.shape[-1] == 2)
    if points_2d:
        normalizer = spatial_shapes.flip(-1).to(sampling_offsets.dtype)             # (L, 2) as (W, H)
        return reference_points[:, :, None, :, None, :] + sampling_offsets / normalizer[:, None, :]
    points = sampling_offsets.shape[4]
    centres, sizes = reference_points[:, :, None, :, None, :2], reference_points[:, :, None, :, None, 2:]
    return centres + sampling_offsets / points * sizes * 0.5


def ms_deform_attn_query(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_offsets: Tensor,
                         attention_logits: Tensor, reference_points: Tensor) -> Tensor:
    """MSDA from the query side's raw outputs: softmax of attention_logits (N, Lq, M, L, P) over each head's
    L * P points, `sampling_locations`, then `ms_deform_attn`. What the fused kernel
    `fastdetr.kernels.deformable_attention.ms_deform_attn_query` computes in one pass."""
    batch, queries, heads, levels, points = attention_logits.shape
    weights = attention_logits.reshape(batch, queries, heads, levels * points).softmax(-1)
    locations = sampling_locations(reference_points, sampling_offsets, spatial_shapes)
    return ms_deform_attn(value, spatial_shapes, level_start_index, locations,
                          weights.view(batch, queries, heads, levels, points))
