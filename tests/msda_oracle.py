"""What the multi-scale deformable attention tests compare with: a float64 oracle written as explicit gathers.

`ms_deform_attn_oracle` takes the arguments of `fastdetr.reference.deformable_attention.ms_deform_attn`
(value (N, S, M, D), spatial_shapes (L, 2) as (H, W), level_start_index (L,), sampling_locations
(N, Lq, M, L, P, 2) as (x, y), attention_weights (N, Lq, M, L, P)) and computes the same thing without
grid_sample: each point's pixel coordinate is x = loc_x * W - 0.5, y = loc_y * H - 0.5, its four corners
floor(x) + {0, 1} by floor(y) + {0, 1} are gathered from the level's tokens with bilinear weights, and a corner
outside [0, W) x [0, H) contributes zero. Everything is done in float64 and returned in float64, (N, Lq, M * D);
it is differentiable in value, sampling_locations and attention_weights (floor() has zero gradient, so the
location gradient is the one-sided derivative from the right at a pixel centre, where the bilinear interpolant
has a kink).

`random_msda_inputs` makes fresh inputs in the official layout; `place_on_pixel_grid` moves some of their
locations onto exact pixel centres and borders. The kernel tests import these (`from msda_oracle import ...`).
"""
from __future__ import annotations

import torch
from torch import Tensor


def ms_deform_attn_oracle(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                          sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """MSDA by explicit four-corner gathers, in float64: (N, Lq, M * D). Levels are read from level_start_index."""
    value = value.double()
    sampling_locations = sampling_locations.double()
    attention_weights = attention_weights.double()
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    batch_index = torch.arange(batch, device=value.device).view(batch, 1, 1, 1)   # broadcasts to (N, Lq, M, P)
    head_index = torch.arange(heads, device=value.device).view(1, 1, heads, 1)
    out = value.new_zeros(batch, queries, heads, head_dim)
    for level, ((height, width), start) in enumerate(zip(spatial_shapes.tolist(), level_start_index.tolist())):
        level_value = value[:, start:start + height * width]                         # (N, H*W, M, D)
        x = sampling_locations[:, :, :, level, :, 0] * width - 0.5                     # (N, Lq, M, P), pixels
        y = sampling_locations[:, :, :, level, :, 1] * height - 0.5
        x0, y0 = x.floor(), y.floor()
        fx, fy = x - x0, y - y0
        corners = ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy))
        for dx, dy, bilinear in corners:
            column, row = (x0 + dx).long(), (y0 + dy).long()
            inside = (column >= 0) & (column < width) & (row >= 0) & (row < height)
            token = torch.where(inside, row * width + column, 0)                      # any valid index when outside
            gathered = level_value[batch_index, token, head_index]                    # (N, Lq, M, P, D)
            weight = bilinear * inside * attention_weights[:, :, :, level]            # (N, Lq, M, P)
            out = out + (weight.unsqueeze(-1) * gathered).sum(3)
    return out.reshape(batch, queries, heads * head_dim)


def level_starts(shapes: list[tuple[int, int]]) -> list[int]:
    """The first token of each level when the levels are stacked in order."""
    starts, total = [], 0
    for height, width in shapes:
        starts.append(total)
        total += height * width
    return starts


def random_msda_inputs(batch: int, queries: int, heads: int, head_dim: int, shapes: list[tuple[int, int]],
                       points: int, dtype: torch.dtype, generator: torch.Generator, spread: float = 1.0,
                       outside: float = 0.125, device: torch.device | str = "cpu"):
    """Fresh random MSDA inputs: (value, spatial_shapes, level_start_index, sampling_locations, attention_weights).

    value ~ N(0, 1); attention_weights a softmax over the L * P points of N(0, 1) logits (positive, summing
    to 1 per query and head, as the module makes them); sampling_locations uniform in [0, 1], except a
    fraction `outside` of the coordinates drawn uniform in [-spread, 0) or (1, 1 + spread] (beyond the map,
    or in its half-pixel border). spatial_shapes and level_start_index are int64. Everything is drawn on the
    CPU from `generator`, then moved to `device`; float tensors are in `dtype`.
    """
    levels = len(shapes)
    tokens = sum(height * width for height, width in shapes)

    def normal(*size: int) -> Tensor:
        return torch.randn(*size, generator=generator, dtype=torch.float64)

    def uniform(*size: int) -> Tensor:
        return torch.rand(*size, generator=generator, dtype=torch.float64)

    value = normal(batch, tokens, heads, head_dim)
    locations = uniform(batch, queries, heads, levels, points, 2)
    far = uniform(*locations.shape) * spread
    far = torch.where(uniform(*locations.shape) < 0.5, -far, 1 + far)
    locations = torch.where(uniform(*locations.shape) < outside, far, locations)
    logits = normal(batch, queries, heads, levels * points)
    weights = logits.softmax(-1).view(batch, queries, heads, levels, points)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64).view(levels, 2)
    level_start_index = torch.tensor(level_starts(shapes), dtype=torch.int64)
    return (value.to(device, dtype), spatial_shapes.to(device), level_start_index.to(device),
            locations.to(device, dtype), weights.to(device, dtype))


def place_on_pixel_grid(sampling_locations: Tensor, spatial_shapes: Tensor, generator: torch.Generator,
                        fraction: float = 0.25) -> tuple[Tensor, Tensor]:
    """Move a `fraction` of the coordinates onto exact pixel centres and borders: (locations, on_centre).

    A moved coordinate of level l (size W along x, H along y) becomes one of (i + 0.5) / W for i in
    -1 .. W (pixel centres, the first and last just outside the map), i / W for i in 0 .. W (pixel borders,
    0 and 1 among them). on_centre (same shape as sampling_locations, bool) is True where a coordinate was
    put on a pixel centre: there the pixel coordinate x = loc * W - 0.5 is an integer (up to the dtype's
    rounding, which may fall on either side), the interpolant has a kink, and its derivative depends on
    which side floor() rounds to (the gradient tests skip those).
    A border is x = i - 0.5, inside a linear piece, so it is differentiable. Returns a new tensor.
    """
    shape = sampling_locations.shape
    levels = shape[3]
    # (L, 2) as (W, H): the size along each of the (x, y) coordinates
    sizes = spatial_shapes.flip(-1).to("cpu", torch.float64).view(1, 1, 1, levels, 1, 2).expand(shape)
    moved = torch.rand(shape, generator=generator, dtype=torch.float64) < fraction
    on_centre = moved & (torch.rand(shape, generator=generator, dtype=torch.float64) < 0.5)
    # centres: i in -1 .. W, borders: i in 0 .. W
    pick = torch.rand(shape, generator=generator, dtype=torch.float64)
    centre = ((pick * (sizes + 2)).floor() - 1 + 0.5) / sizes
    border = (pick * (sizes + 1)).floor() / sizes
    snapped = torch.where(on_centre, centre, border)
    locations = torch.where(moved, snapped, sampling_locations.to("cpu", torch.float64))
    return (locations.to(sampling_locations.device, sampling_locations.dtype),
            on_centre.to(sampling_locations.device))


DETR_LEVELS = ((8, 10), (4, 5), (2, 3), (1, 1))   # Deformable DETR's 4-level structure, down to 1 x 1, small


def relative_error(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN never passes."""
    assert not torch.isnan(out).any(), "NaN never passes"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
