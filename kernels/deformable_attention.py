"""Multi-scale deformable attention (MSDA) in Triton: forward and backward, fp32 / fp16 / bf16, no build step.

What is computed: the official Deformable-DETR op's sampling core. For each
query q of image n and head m, P points on each of L levels are sampled
bilinearly from that level's value map and summed with their attention weights,

    out[n, q, m, :] = sum_{l, p} A[n, q, m, l, p] * bilinear(value_l[n, :, m, :], loc[n, q, m, l, p])

with grid_sample's semantics (bilinear, zeros padding, align_corners=False):
pixel coordinate (x * W_l - 0.5, y * H_l - 0.5), corners outside the map read as
zero. The plain-PyTorch definition is `fastdetr.reference.deformable_attention.
ms_deform_attn`; `fastdetr.nn.functional.ms_deform_attn` chooses between the two.

Forward (one kernel): a program owns BLOCK_Q (batch, query) rows of one head and
the whole head dim (BLOCK_D >= D, masked); it walks the L x P samples, loads the
four corner rows of value (masked loads: a corner outside the map is never
read), and accumulates in fp32; only the output is written.

Backward (one kernel, the same programs): reloads the corners, and from the
output gradient g computes dA = <g, sample>, dloc from the bilinear weights'
derivatives (times W_l, H_l), both written once per sample (no reduction
across programs), and dvalue, which is a scatter: a value row is read by any
number of samples. Two ways to reduce it:
- default: fp32 `atomic_add` into an fp32 buffer (one pass; the order of the
  additions, and so the last bits of dvalue, can change from run to run);
- deterministic (`deterministic=True`, or `torch.use_deterministic_algorithms(True)`):
  the kernel writes each sample corner's (value row, coefficient) instead; a
  stable sort groups them by value row, and a gather kernel sums each row's
  entries in that fixed order: bit-identical across runs, at the price of the
  sort and 16 bytes per sample corner (N * Lq * M * L * P * 4 entries).

The query side, fused (`ms_deform_attn_query`, `ms_deform_attn_projected`):
the same forward and backward programs read the raw sampling offsets and
attention logits instead of locations and weights -- typically two slices of
one GEMM's output, read in place -- take the softmax over each head's L x P
logits online (flash attention's running max and rescaling, one pass) and form
each location from the reference point (2-d: point + offset / (W_l, H_l)) or
box (4-d: centre + offset / P * (w, h) / 2) in registers. The backward first
takes the softmax statistics in a pass over the logits, then, per sample, the
same corner gradients, writing d offset = d location * scale and dA; after a
barrier a last pass turns dA into the logits' gradient A * (dA - sum A dA). The
reference points' gradient is written per head and summed over heads by torch
(no atomics). `ms_deform_attn_projected` puts the GEMM in front and runs it
again in backward rather than saving its output. Head dims up to
`QUERY_SIDE_MAX_HEAD_DIM`. In inference it runs one kernel with the GEMM on
chip as well (`_msda_project_fwd_kernel`): a program computes its 16 rows'
offsets and logits for its head with dots over the query's channels, keeps
them as (16, L * P) register tiles (L * P <= `MAX_PROJECT_SAMPLES`), takes the
softmax on the tile, and samples the head dim 16 channels at a time, picking
each sample's column out of the tiles: nothing but the output is written.

Limits, as constants other modules import: head dim D <= `MAX_HEAD_DIM` (any
D, masked to a power of two >= 16); any L, P, H_l x W_l (1 x 1 included); q and
value dtypes in `DTYPES`, math in fp32, output in value's dtype; value's last
stride must be 1 (anything else is copied once), locations and weights are made
contiguous once. Locations far outside [0, 1] are clamped before the integer
conversion (their corners are all outside: zero). Block sizes were picked for no
register spills on sm_80 / sm_90 (`aot_configs()`), not tuned on a GPU.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from fastdetr.backend import use_triton
from fastdetr.kernels.common import (
    TRITON_DTYPE_NAMES,
    KernelConfig,
    _dot,
    _upcast_dot,
    aot_signature,
    as_rows,
    unit_last_stride,
)

# limits (module docstring)
DTYPES = tuple(TRITON_DTYPE_NAMES)
MAX_HEAD_DIM = 256
QUERY_SIDE_MAX_HEAD_DIM = 128   # the fused query side's backward spilled at 256 in every tile tried
MAX_PROJECT_SAMPLES = 32        # L * P of the inference kernel with the GEMM on chip (its tile's width)
_SAMPLES_BLOCK_CHOICES = (16, 32)
_PROJECT_BLOCK_D = 16
_BLOCK_D_CHOICES = (16, 32, 64, 128, 256)
_CORNERS = 4


def _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                  names=("ms_deform_attn", "sampling_locations", "attention_weights")) -> None:
    """Shape and dtype checks from metadata only (never a tensor's values: no host sync). names: the caller
    and its names for the locations and weights, for the messages."""
    caller, loc_name, weight_name = names
    if value.dim() != 4:
        raise ValueError(f"{caller}: value must be (N, S, M, D); got {tuple(value.shape)}")
    batch, _, heads, head_dim = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(f"{caller}: {loc_name} must be (N, Lq, M, L, P, 2); "
                         f"got {tuple(sampling_locations.shape)}")
    n, queries, m, levels, points, _ = sampling_locations.shape
    if (n, m) != (batch, heads):
        raise ValueError(f"{caller}: {loc_name} {tuple(sampling_locations.shape)} disagree with "
                         f"value {tuple(value.shape)} on N or M")
    if tuple(attention_weights.shape) != (batch, queries, heads, levels, points):
        raise ValueError(f"{caller}: {weight_name} must be {(batch, queries, heads, levels, points)}; "
                         f"got {tuple(attention_weights.shape)}")
    if tuple(spatial_shapes.shape) != (levels, 2) or tuple(level_start_index.shape) != (levels,):
        raise ValueError(f"{caller}: spatial_shapes must be ({levels}, 2) and level_start_index "
                         f"({levels},); got {tuple(spatial_shapes.shape)} and {tuple(level_start_index.shape)}")
    for name, tensor in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
            raise ValueError(f"{caller}: {name} must be integers; got {tensor.dtype}")
    for name, tensor in (("value", value), (loc_name, sampling_locations), (weight_name, attention_weights)):
        if tensor.dtype not in DTYPES:
            raise ValueError(f"{caller}: {name} must be one of {DTYPES}; got {tensor.dtype}")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"{caller}: head dim {head_dim} (value {tuple(value.shape)}) exceeds "
                         f"MAX_HEAD_DIM = {MAX_HEAD_DIM}")


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

def _block_d(head_dim: int) -> int:
    return next(block for block in _BLOCK_D_CHOICES if block >= head_dim)


@functools.lru_cache(maxsize=None)
def _configs() -> dict:
    """Launch config by (kernel, BLOCK_D): BLOCK_Q rows x BLOCK_D columns per program, fp32 accumulators.

    The backward holds the output-gradient tile and four corner tiles at once, so
    it takes half the forward's rows. The gather kernel (deterministic dvalue)
    owns one value row and walks its entries BLOCK_E at a time.
    """
    configs = {}
    for block_d in _BLOCK_D_CHOICES:
        # 512 tile elements per forward program (4 per thread of 4 warps), 256 per backward one over 8
        # warps: the unaligned variants gather every element with its own 64-bit address and predicate;
        # twice these tiles spilled (sm_90 forward, sm_80 deterministic backward), and so did the 16-bit
        # atomic backward at 4 warps on sm_80 (ptxas capped it at 96 registers and used the stack)
        configs[("fwd", block_d)] = dict(BLOCK_Q=max(2, 512 // block_d), num_warps=4, num_stages=1)
        # (at D 256 two rows over 4 warps: 8 warps used the stack on sm_90 in the deterministic variant)
        configs[("bwd", block_d)] = dict(BLOCK_Q=max(2, 256 // block_d), num_warps=4 if block_d == 256 else 8,
                                         num_stages=1)
        configs[("gather", block_d)] = dict(BLOCK_E=max(8, min(64, 4096 // block_d)), num_warps=4, num_stages=1)
        # the query side (up to QUERY_SIDE_MAX_HEAD_DIM): the forward's tile over 8 warps, at most 16 rows (at 4
        # warps sm_90 used 8-16 bytes of stack at D 16, 64 and 128, and so did 32 rows of D 16 on sm_80); its
        # backward takes the backward's config
        configs[("query_fwd", block_d)] = dict(BLOCK_Q=max(2, min(16, 512 // block_d)), num_warps=8, num_stages=1)
    return configs


def block_config(kernel: str, head_dim: int) -> dict:
    """Launch config of `kernel` ("fwd", "bwd", "gather", "query_fwd" or "project") for head dim `head_dim`,
    with its BLOCK_D."""
    block_d = _block_d(head_dim)
    if kernel == "project":
        # inference with the GEMM on chip: 16 rows (a tensor-core dot's least), the query read 32 channels at
        # a time, the head dim 16 channels at a time (wider value slices used 8-48 bytes of stack: 32 at 4 and
        # 8 warps, 64 and 128 whole)
        return dict(BLOCK_Q=16, BLOCK_C=32, BLOCK_D=min(block_d, _PROJECT_BLOCK_D), num_warps=8, num_stages=1)
    return dict(_configs()[(kernel, block_d)], BLOCK_D=block_d)


@triton.jit
def _pixel_coords(loc_x, loc_y, height, width):
    """(x0, y0 (int32, clamped), fx, fy) in fp32 of locations (x, y) on a height x width map.

    Pixel coordinate x = loc_x * W - 0.5 (grid_sample, align_corners=False);
    x0 = floor(x), fx = x - x0. Coordinates are clamped to [-2, W + 1] before the
    int32 conversion: any corner that far out lies outside the map either way.
    """
    x = loc_x * width.to(tl.float32) - 0.5
    y = loc_y * height.to(tl.float32) - 0.5
    x_floor = tl.floor(x)
    y_floor = tl.floor(y)
    fx = x - x_floor
    fy = y - y_floor
    x0 = tl.minimum(tl.maximum(x_floor, -2.0), width.to(tl.float32) + 1.0).to(tl.int32)
    y0 = tl.minimum(tl.maximum(y_floor, -2.0), height.to(tl.float32) + 1.0).to(tl.int32)
    return x0, y0, fx, fy


@triton.jit
def _sample_point(Loc_ptr, Attn_ptr, sample, row_ok, height, width):
    """One sample of each row, read from the locations and weights: (attention weight, x0, y0, fx, fy)."""
    loc_x = tl.load(Loc_ptr + 2 * sample, mask=row_ok, other=0.0).to(tl.float32)
    loc_y = tl.load(Loc_ptr + 2 * sample + 1, mask=row_ok, other=0.0).to(tl.float32)
    weight = tl.load(Attn_ptr + sample, mask=row_ok, other=0.0).to(tl.float32)
    x0, y0, fx, fy = _pixel_coords(loc_x, loc_y, height, width)
    return weight, x0, y0, fx, fy


@triton.jit
def _corner_rows(xi, yi, height, width, start, row_ok):
    """(token index within the image, inside) of corner (xi, yi) of each row: the row is read only if inside."""
    inside = row_ok & (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
    return start + yi * width + xi, inside


@triton.jit
def _load_corner(Value_ptr, value_rows, token, inside, stride_v_s, offs_d, d_ok):
    """(BLOCK_Q, BLOCK_D) fp32 corner values; rows outside the map are never loaded (zeros)."""
    ptrs = Value_ptr + value_rows[:, None] + token.to(tl.int64)[:, None] * stride_v_s + offs_d[None, :]
    return tl.load(ptrs, mask=inside[:, None] & d_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _bilinear(Value_ptr, value_rows, x0, y0, fx, fy, height, width, start, row_ok, stride_v_s, offs_d, d_ok):
    """(BLOCK_Q, BLOCK_D) fp32 bilinear sample at (x0 + fx, y0 + fy) of each row: four masked corner loads."""
    token, inside = _corner_rows(x0, y0, height, width, start, row_ok)
    sampled = _load_corner(Value_ptr, value_rows, token, inside, stride_v_s, offs_d, d_ok) * \
        ((1.0 - fx) * (1.0 - fy))[:, None]
    token, inside = _corner_rows(x0 + 1, y0, height, width, start, row_ok)
    sampled += _load_corner(Value_ptr, value_rows, token, inside, stride_v_s, offs_d, d_ok) * \
        (fx * (1.0 - fy))[:, None]
    token, inside = _corner_rows(x0, y0 + 1, height, width, start, row_ok)
    sampled += _load_corner(Value_ptr, value_rows, token, inside, stride_v_s, offs_d, d_ok) * \
        ((1.0 - fx) * fy)[:, None]
    token, inside = _corner_rows(x0 + 1, y0 + 1, height, width, start, row_ok)
    sampled += _load_corner(Value_ptr, value_rows, token, inside, stride_v_s, offs_d, d_ok) * (fx * fy)[:, None]
    return sampled


@triton.jit
def _level(Shapes_ptr, Starts_ptr, level):
    """Level `level`'s (H, W) and first token, from spatial_shapes (L, 2) and level_start_index (L,)."""
    return tl.load(Shapes_ptr + 2 * level), tl.load(Shapes_ptr + 2 * level + 1), tl.load(Starts_ptr + level)


@triton.jit
def _program_rows(num_rows, head_dim, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's head and (batch, query) rows, as the forward and backward kernels split the work:
    (head, rows (BLOCK_Q,) int64, row_ok, offs_d (BLOCK_D,), d_ok)."""
    head = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    return head, rows.to(tl.int64), rows < num_rows, offs_d, offs_d < head_dim


@triton.jit
def _msda_fwd_kernel(
    Value_ptr,                                # (N, S, M, D), last stride 1
    Shapes_ptr, Starts_ptr,                   # (L, 2) int32 (H, W), (L,) int32 first token of each level
    Loc_ptr,                                  # (N, Lq, M, L, P, 2) contiguous, (x, y)
    Attn_ptr,                                 # (N, Lq, M, L, P) contiguous
    Out_ptr,                                  # (N, Lq, M, D) contiguous, value's dtype
    stride_v_n, stride_v_s, stride_v_m,
    num_rows, num_queries, num_heads, head_dim, num_levels, num_points,   # num_rows = N * Lq
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    head, rows64, row_ok, offs_d, d_ok = _program_rows(num_rows, head_dim, BLOCK_Q, BLOCK_D)
    value_rows = (rows64 // num_queries) * stride_v_n + head * stride_v_m     # (BLOCK_Q,) base of image n, head m
    row_head = rows64 * num_heads + head                                        # index of (n, q, m)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for level in range(0, num_levels):
        height, width, start = _level(Shapes_ptr, Starts_ptr, level)
        for point in range(0, num_points):
            sample = (row_head * num_levels + level) * num_points + point
            weight, x0, y0, fx, fy = _sample_point(Loc_ptr, Attn_ptr, sample, row_ok, height, width)
            sampled = _bilinear(Value_ptr, value_rows, x0, y0, fx, fy, height, width, start, row_ok, stride_v_s,
                                offs_d, d_ok)
            acc += sampled * weight[:, None]
    tl.store(Out_ptr + row_head[:, None] * head_dim + offs_d[None, :], acc.to(Out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _corner_grads(Value_ptr, GradValue_ptr, Keys_ptr, Coefs_ptr, entry, value_rows, image_tokens, token,
                  inside, corner_weight, weight, grad, row_ok, stride_v_s, offs_d, d_ok, head_dim, num_heads, head,
                  DETERMINISTIC: tl.constexpr):
    """One corner's share of the backward: returns <g, corner value> (BLOCK_Q,) and reduces its dvalue.

    dvalue[corner] += weight * corner_weight * g: fp32 `atomic_add`, or with
    DETERMINISTIC the (value row key, coefficient) pair of this sample corner
    written at `entry` (key -1 outside the map) for the sort-and-gather pass.
    """
    v = _load_corner(Value_ptr, value_rows, token, inside, stride_v_s, offs_d, d_ok)
    coef = weight * corner_weight
    key = (image_tokens + token.to(tl.int64)) * num_heads + head   # (n * S + token) * M + m: a row of (N*S*M, D)
    if DETERMINISTIC:
        tl.store(Keys_ptr + entry, tl.where(inside, key, -1), mask=row_ok)
        tl.store(Coefs_ptr + entry, coef, mask=row_ok)
    else:
        tl.atomic_add(GradValue_ptr + key[:, None] * head_dim + offs_d[None, :], coef[:, None] * grad,
                      mask=inside[:, None] & d_ok[None, :])
    return tl.sum(v * grad, 1)


@triton.jit
def _bilinear_grads(Value_ptr, GradValue_ptr, Keys_ptr, Coefs_ptr, entry, value_rows, image_tokens, x0, y0, fx, fy,
                    weight, grad, height, width, start, row_ok, stride_v_s, offs_d, d_ok, head_dim, num_heads, head,
                    DETERMINISTIC: tl.constexpr):
    """One sample's backward from the output gradient g: reduces its four corners' dvalue (`_corner_grads`,
    entries entry .. entry + 3) and returns (dA, dloc_x, dloc_y) (BLOCK_Q,) fp32 for attention weight `weight`:
    dA = <g, sample>, dloc from the bilinear weights' derivatives, times the map size."""
    token, inside = _corner_rows(x0, y0, height, width, start, row_ok)
    g00 = _corner_grads(Value_ptr, GradValue_ptr, Keys_ptr, Coefs_ptr, entry, value_rows, image_tokens,
                        token, inside, (1.0 - fx) * (1.0 - fy), weight, grad, row_ok, stride_v_s,
                        offs_d, d_ok, head_dim, num_heads, head, DETERMINISTIC)
    token, inside = _corner_rows(x0 + 1, y0, height, width, start, row_ok)
    g10 = _corner_grads(Value_ptr, GradValue_ptr, Keys_ptr, Coefs_ptr, entry + 1, value_rows, image_tokens,
                        token, inside, fx * (1.0 - fy), weight, grad, row_ok, stride_v_s,
                        offs_d, d_ok, head_dim, num_heads, head, DETERMINISTIC)
    token, inside = _corner_rows(x0, y0 + 1, height, width, start, row_ok)
    g01 = _corner_grads(Value_ptr, GradValue_ptr, Keys_ptr, Coefs_ptr, entry + 2, value_rows, image_tokens,
                        token, inside, (1.0 - fx) * fy, weight, grad, row_ok, stride_v_s,
                        offs_d, d_ok, head_dim, num_heads, head, DETERMINISTIC)
    token, inside = _corner_rows(x0 + 1, y0 + 1, height, width, start, row_ok)
    g11 = _corner_grads(Value_ptr, GradValue_ptr, Keys_ptr, Coefs_ptr, entry + 3, value_rows, image_tokens,
                        token, inside, fx * fy, weight, grad, row_ok, stride_v_s,
                        offs_d, d_ok, head_dim, num_heads, head, DETERMINISTIC)
    grad_weight = (1.0 - fx) * (1.0 - fy) * g00 + fx * (1.0 - fy) * g10 + (1.0 - fx) * fy * g01 + fx * fy * g11
    grad_x = ((1.0 - fy) * (g10 - g00) + fy * (g11 - g01)) * weight * width.to(tl.float32)
    grad_y = ((1.0 - fx) * (g01 - g00) + fx * (g11 - g10)) * weight * height.to(tl.float32)
    return grad_weight, grad_x, grad_y


@triton.jit
def _msda_bwd_kernel(
    Value_ptr, Shapes_ptr, Starts_ptr, Loc_ptr, Attn_ptr,   # as in forward
    GradOut_ptr,                              # (N, Lq, M, D) contiguous
    GradValue_ptr,                            # (N, S, M, D) fp32 contiguous, zeroed (atomic path)
    GradLoc_ptr, GradAttn_ptr,                # like Loc and Attn, fp32
    Keys_ptr, Coefs_ptr,                      # (N * Lq * M * L * P * 4,) int64 / fp32 (DETERMINISTIC)
    stride_v_n, stride_v_s, stride_v_m,
    num_rows, num_queries, num_heads, head_dim, num_levels, num_points, num_tokens,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, DETERMINISTIC: tl.constexpr,
):
    head, rows64, row_ok, offs_d, d_ok = _program_rows(num_rows, head_dim, BLOCK_Q, BLOCK_D)
    image = rows64 // num_queries
    value_rows = image * stride_v_n + head * stride_v_m
    row_head = rows64 * num_heads + head
    grad = tl.load(GradOut_ptr + row_head[:, None] * head_dim + offs_d[None, :],
                   mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    for level in range(0, num_levels):
        height, width, start = _level(Shapes_ptr, Starts_ptr, level)
        for point in range(0, num_points):
            sample = (row_head * num_levels + level) * num_points + point
            weight, x0, y0, fx, fy = _sample_point(Loc_ptr, Attn_ptr, sample, row_ok, height, width)
            grad_weight, grad_x, grad_y = _bilinear_grads(
                Value_ptr, GradValue_ptr, Keys_ptr, Coefs_ptr, sample * 4, value_rows, image * num_tokens, x0, y0,
                fx, fy, weight, grad, height, width, start, row_ok, stride_v_s, offs_d, d_ok, head_dim, num_heads,
                head, DETERMINISTIC)
            tl.store(GradAttn_ptr + sample, grad_weight, mask=row_ok)
            tl.store(GradLoc_ptr + 2 * sample, grad_x, mask=row_ok)
            tl.store(GradLoc_ptr + 2 * sample + 1, grad_y, mask=row_ok)


# ---- the query side fused: softmax and locations in the kernel ---------------------------------------------

@triton.jit
def _reciprocal(x):
    """1 / x in fp32 by the approximate division (2 ulp): the IEEE one is a called subroutine on NVIDIA GPUs,
    whose call frame showed up as 8-16 bytes of stack in the report."""
    return tl.fdiv(tl.full(x.shape, 1.0, tl.float32), x, ieee_rounding=False)


@triton.jit
def _level_reference(Ref_ptr, ref_rows, level, height, width, num_points, row_ok, BOX: tl.constexpr):
    """Each row's reference on `level` and the scale that turns offsets into locations, (BLOCK_Q,) fp32:
    (ref_x, ref_y, scale_x, scale_y). 2-d points: scale 1 / (W_l, H_l) (offsets in the level's pixels);
    4-d boxes (x, y, w, h): scale (w, h) / (2 P) (offsets in units of the box)."""
    if BOX:
        base = Ref_ptr + ref_rows + 4 * level
        ref_x = tl.load(base, mask=row_ok, other=0.0).to(tl.float32)
        ref_y = tl.load(base + 1, mask=row_ok, other=0.0).to(tl.float32)
        ref_w = tl.load(base + 2, mask=row_ok, other=0.0).to(tl.float32)
        ref_h = tl.load(base + 3, mask=row_ok, other=0.0).to(tl.float32)
        half_per_point = _reciprocal(tl.zeros_like(ref_x) + 2.0 * num_points.to(tl.float32))
        scale_x = ref_w * half_per_point
        scale_y = ref_h * half_per_point
    else:
        base = Ref_ptr + ref_rows + 2 * level
        ref_x = tl.load(base, mask=row_ok, other=0.0).to(tl.float32)
        ref_y = tl.load(base + 1, mask=row_ok, other=0.0).to(tl.float32)
        scale_x = _reciprocal(tl.zeros_like(ref_x) + width.to(tl.float32))
        scale_y = _reciprocal(tl.zeros_like(ref_x) + height.to(tl.float32))
    return ref_x, ref_y, scale_x, scale_y


@triton.jit
def _query_sample(Off_ptr, off_rows, Logit_ptr, logit_rows, column, ref_x, ref_y, scale_x, scale_y, row_ok):
    """Sample `column` = (m * L + l) * P + p of each row: (logit, offset x, offset y, location x, location y)."""
    off_x = tl.load(Off_ptr + off_rows + 2 * column, mask=row_ok, other=0.0).to(tl.float32)
    off_y = tl.load(Off_ptr + off_rows + 2 * column + 1, mask=row_ok, other=0.0).to(tl.float32)
    logit = tl.load(Logit_ptr + logit_rows + column, mask=row_ok, other=0.0).to(tl.float32)
    return logit, off_x, off_y, ref_x + off_x * scale_x, ref_y + off_y * scale_y


@triton.jit
def _softmax_stats(Logit_ptr, logit_rows, first_column, num_samples, row_ok, BLOCK_Q: tl.constexpr):
    """(max, 1 / sum exp(logit - max)) of each row's num_samples logits from first_column: one online pass."""
    run_max = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_Q], tl.float32)
    for column in range(first_column, first_column + num_samples):
        logit = tl.load(Logit_ptr + logit_rows + column, mask=row_ok, other=0.0).to(tl.float32)
        new_max = tl.maximum(run_max, logit, propagate_nan=tl.PropagateNan.ALL)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(logit - new_max)
        run_max = new_max
    return run_max, _reciprocal(run_sum)


@triton.jit
def _msda_query_fwd_kernel(
    Value_ptr, Shapes_ptr, Starts_ptr,        # as in _msda_fwd_kernel
    Off_ptr,                                  # (N * Lq, >= M * L * P * 2) rows of stride_off, (m, l, p, xy) order
    Logit_ptr,                                # (N * Lq, >= M * L * P) rows of stride_logit, (m, l, p) order
    Ref_ptr,                                  # (N * Lq, L, 2) points (x, y) or (N * Lq, L, 4) boxes, contiguous
    Out_ptr,                                  # (N, Lq, M, D) contiguous, value's dtype
    stride_v_n, stride_v_s, stride_v_m, stride_off, stride_logit,
    num_rows, num_queries, num_heads, head_dim, num_levels, num_points,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, BOX: tl.constexpr,
):
    head, rows64, row_ok, offs_d, d_ok = _program_rows(num_rows, head_dim, BLOCK_Q, BLOCK_D)
    value_rows = (rows64 // num_queries) * stride_v_n + head * stride_v_m
    off_rows = rows64 * stride_off
    logit_rows = rows64 * stride_logit
    ref_rows = rows64 * num_levels * (4 if BOX else 2)
    # the softmax over the head's L * P logits is taken online (flash attention's rescaling): one pass
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    run_max = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_Q], tl.float32)
    for level in range(0, num_levels):
        height, width, start = _level(Shapes_ptr, Starts_ptr, level)
        ref_x, ref_y, scale_x, scale_y = _level_reference(Ref_ptr, ref_rows, level, height, width,
                                                          num_points, row_ok, BOX)
        for point in range(0, num_points):
            column = (head * num_levels + level) * num_points + point
            logit, _, _, loc_x, loc_y = _query_sample(Off_ptr, off_rows, Logit_ptr, logit_rows, column, ref_x,
                                                      ref_y, scale_x, scale_y, row_ok)
            x0, y0, fx, fy = _pixel_coords(loc_x, loc_y, height, width)
            sampled = _bilinear(Value_ptr, value_rows, x0, y0, fx, fy, height, width, start, row_ok, stride_v_s,
                                offs_d, d_ok)
            new_max = tl.maximum(run_max, logit, propagate_nan=tl.PropagateNan.ALL)
            rescale = tl.exp(run_max - new_max)
            weight = tl.exp(logit - new_max)
            acc = acc * rescale[:, None] + sampled * weight[:, None]
            run_sum = run_sum * rescale + weight
            run_max = new_max
    out = acc * _reciprocal(run_sum)[:, None]
    tl.store(Out_ptr + (rows64 * num_heads + head)[:, None] * head_dim + offs_d[None, :],
             out.to(Out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _msda_query_bwd_kernel(
    Value_ptr, Shapes_ptr, Starts_ptr, Off_ptr, Logit_ptr, Ref_ptr,   # as in _msda_query_fwd_kernel
    GradOut_ptr,                              # (N, Lq, M, D) contiguous
    GradValue_ptr,                            # (N, S, M, D) fp32 contiguous, zeroed (atomic path)
    GradOff_ptr,                              # (N * Lq, M * L * P * 2) fp32 rows of stride_grad_off
    GradLogit_ptr,                            # (N * Lq, M * L * P) fp32 rows of stride_grad_logit
    GradRef_ptr,                              # (N * Lq, M, L, 2 or 4) fp32: each head's share (summed by torch)
    Keys_ptr, Coefs_ptr,                      # as in _msda_bwd_kernel (DETERMINISTIC)
    stride_v_n, stride_v_s, stride_v_m, stride_off, stride_logit, stride_grad_off, stride_grad_logit,
    num_rows, num_queries, num_heads, head_dim, num_levels, num_points, num_tokens,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, BOX: tl.constexpr, DETERMINISTIC: tl.constexpr,
):
    head, rows64, row_ok, offs_d, d_ok = _program_rows(num_rows, head_dim, BLOCK_Q, BLOCK_D)
    image = rows64 // num_queries
    value_rows = image * stride_v_n + head * stride_v_m
    off_rows = rows64 * stride_off
    logit_rows = rows64 * stride_logit
    ref_width = 4 if BOX else 2
    ref_rows = rows64 * num_levels * ref_width
    row_head = rows64 * num_heads + head
    samples = num_levels * num_points
    grad = tl.load(GradOut_ptr + row_head[:, None] * head_dim + offs_d[None, :],
                   mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    half_per_point = _reciprocal(tl.zeros([BLOCK_Q], tl.float32) + 2.0 * num_points.to(tl.float32))   # boxes
    run_max, inv_sum = _softmax_stats(Logit_ptr, logit_rows, head * samples, samples, row_ok, BLOCK_Q)
    grad_off_rows = rows64 * stride_grad_off
    grad_logit_rows = rows64 * stride_grad_logit
    weighted = tl.zeros([BLOCK_Q], tl.float32)        # sum over samples of A * dA, for the softmax backward
    for level in range(0, num_levels):
        height, width, start = _level(Shapes_ptr, Starts_ptr, level)
        ref_x, ref_y, scale_x, scale_y = _level_reference(Ref_ptr, ref_rows, level, height, width,
                                                          num_points, row_ok, BOX)
        grad_ref_x = tl.zeros([BLOCK_Q], tl.float32)
        grad_ref_y = tl.zeros([BLOCK_Q], tl.float32)
        grad_ref_w = tl.zeros([BLOCK_Q], tl.float32)
        grad_ref_h = tl.zeros([BLOCK_Q], tl.float32)
        for point in range(0, num_points):
            column = (head * num_levels + level) * num_points + point
            logit, off_x, off_y, loc_x, loc_y = _query_sample(Off_ptr, off_rows, Logit_ptr, logit_rows, column,
                                                              ref_x, ref_y, scale_x, scale_y, row_ok)
            weight = tl.exp(logit - run_max) * inv_sum
            x0, y0, fx, fy = _pixel_coords(loc_x, loc_y, height, width)
            grad_weight, grad_x, grad_y = _bilinear_grads(
                Value_ptr, GradValue_ptr, Keys_ptr, Coefs_ptr, (row_head * samples + level * num_points + point) * 4,
                value_rows, image * num_tokens, x0, y0, fx, fy, weight, grad, height, width, start, row_ok,
                stride_v_s, offs_d, d_ok, head_dim, num_heads, head, DETERMINISTIC)
            weighted += weight * grad_weight
            # dA for now; the pass below turns it into the logit's gradient A * (dA - sum A dA)
            tl.store(GradLogit_ptr + grad_logit_rows + column, grad_weight, mask=row_ok)
            tl.store(GradOff_ptr + grad_off_rows + 2 * column, grad_x * scale_x, mask=row_ok)
            tl.store(GradOff_ptr + grad_off_rows + 2 * column + 1, grad_y * scale_y, mask=row_ok)
            grad_ref_x += grad_x
            grad_ref_y += grad_y
            if BOX:
                # location = centre + offset * size / (2 P): d size = d location * offset / (2 P)
                grad_ref_w += grad_x * off_x * half_per_point
                grad_ref_h += grad_y * off_y * half_per_point
        grad_ref = GradRef_ptr + (row_head * num_levels + level) * ref_width
        tl.store(grad_ref, grad_ref_x, mask=row_ok)
        tl.store(grad_ref + 1, grad_ref_y, mask=row_ok)
        if BOX:
            tl.store(grad_ref + 2, grad_ref_w, mask=row_ok)
            tl.store(grad_ref + 3, grad_ref_h, mask=row_ok)
    # the dA above were stored by other threads of this program: make them visible before reading them back
    tl.debug_barrier()
    for column in range(head * samples, head * samples + samples):
        logit = tl.load(Logit_ptr + logit_rows + column, mask=row_ok, other=0.0).to(tl.float32)
        weight = tl.exp(logit - run_max) * inv_sum
        grad_weight = tl.load(GradLogit_ptr + grad_logit_rows + column, mask=row_ok, other=0.0)
        tl.store(GradLogit_ptr + grad_logit_rows + column, weight * (grad_weight - weighted), mask=row_ok)


@triton.jit
def _project_columns(Query_ptr, rows64, row_ok, stride_q, W_ptr, w_rows, w_ok, channels,
                     BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr, SAMPLES_BLOCK: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """(BLOCK_Q, SAMPLES_BLOCK) fp32: query rows @ W[w_rows]^T over `channels`, W (rows, C) with unit last stride
    and row stride `channels`; columns where not w_ok are 0."""
    acc = tl.zeros([BLOCK_Q, SAMPLES_BLOCK], tl.float32)
    for c_start in range(0, channels, BLOCK_C):
        cs = c_start + tl.arange(0, BLOCK_C)
        c_ok = cs < channels
        q = tl.load(Query_ptr + rows64[:, None] * stride_q + cs[None, :], mask=row_ok[:, None] & c_ok[None, :],
                    other=0.0)
        w = tl.load(W_ptr + w_rows[None, :] * channels + cs[:, None], mask=c_ok[:, None] & w_ok[None, :],
                    other=0.0)
        acc += _dot(q, w, DOT_PRECISION, UPCAST_DOT)
    return acc


@triton.jit
def _column(tile, columns, index):
    """Column `index` of a (BLOCK_Q, SAMPLES_BLOCK) register tile, as (BLOCK_Q,): a masked row sum."""
    return tl.sum(tl.where(columns[None, :] == index, tile, 0.0), 1)


@triton.jit
def _msda_project_fwd_kernel(
    Value_ptr, Shapes_ptr, Starts_ptr,        # as in _msda_fwd_kernel
    Query_ptr,                                # (N * Lq, C) rows of stride_q, unit last stride
    OffW_ptr, OffB_ptr,                       # (M * L * P * 2, C) contiguous, (M * L * P * 2,): sampling offsets
    LogitW_ptr, LogitB_ptr,                   # (M * L * P, C) contiguous, (M * L * P,): attention logits
    Ref_ptr,                                  # (N * Lq, L, 2) points or (N * Lq, L, 4) boxes, contiguous
    Out_ptr,                                  # (N, Lq, M, D) contiguous, value's dtype
    stride_v_n, stride_v_s, stride_v_m, stride_q,
    num_rows, num_queries, num_heads, head_dim, num_levels, num_points, channels,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, SAMPLES_BLOCK: tl.constexpr,
    BOX: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    head, rows64, row_ok, offs_d, _ = _program_rows(num_rows, head_dim, BLOCK_Q, BLOCK_D)
    value_rows = (rows64 // num_queries) * stride_v_n + head * stride_v_m
    ref_rows = rows64 * num_levels * (4 if BOX else 2)
    samples = num_levels * num_points
    columns = tl.arange(0, SAMPLES_BLOCK)
    col_ok = columns < samples
    sample_rows = (head * samples + columns).to(tl.int64)       # this head's rows of the logits' weight
    # the query side's GEMM for this head, on chip: offsets (x, y) and logits of its L * P samples
    off_x = _project_columns(Query_ptr, rows64, row_ok, stride_q, OffW_ptr, 2 * sample_rows, col_ok, channels,
                             BLOCK_Q, BLOCK_C, SAMPLES_BLOCK, DOT_PRECISION, UPCAST_DOT)
    off_y = _project_columns(Query_ptr, rows64, row_ok, stride_q, OffW_ptr, 2 * sample_rows + 1, col_ok, channels,
                             BLOCK_Q, BLOCK_C, SAMPLES_BLOCK, DOT_PRECISION, UPCAST_DOT)
    logits = _project_columns(Query_ptr, rows64, row_ok, stride_q, LogitW_ptr, sample_rows, col_ok, channels,
                              BLOCK_Q, BLOCK_C, SAMPLES_BLOCK, DOT_PRECISION, UPCAST_DOT)
    off_x += tl.load(OffB_ptr + 2 * sample_rows, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    off_y += tl.load(OffB_ptr + 2 * sample_rows + 1, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    logits += tl.load(LogitB_ptr + sample_rows, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    # softmax over the L * P samples of each row, whole: they are all in registers
    logits = tl.where(col_ok[None, :], logits, float("-inf"))
    row_max = tl.max(logits, 1)
    weights = tl.where(col_ok[None, :], tl.exp(logits - row_max[:, None]), 0.0)
    weights = weights * _reciprocal(tl.sum(weights, 1))[:, None]
    # the head dim BLOCK_D channels at a time (the samples' coordinates recomputed for each slice): the
    # register tiles of the GEMM stay live throughout, so the value tiles stay small at any head dim
    out_rows = (rows64 * num_heads + head)[:, None] * head_dim
    for d_start in range(0, head_dim, BLOCK_D):
        channels_d = d_start + offs_d
        channel_ok = channels_d < head_dim
        acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
        for level in range(0, num_levels):
            height, width, start = _level(Shapes_ptr, Starts_ptr, level)
            ref_x, ref_y, scale_x, scale_y = _level_reference(Ref_ptr, ref_rows, level, height, width, num_points,
                                                              row_ok, BOX)
            for point in range(0, num_points):
                sample = level * num_points + point
                loc_x = ref_x + _column(off_x, columns, sample) * scale_x
                loc_y = ref_y + _column(off_y, columns, sample) * scale_y
                x0, y0, fx, fy = _pixel_coords(loc_x, loc_y, height, width)
                sampled = _bilinear(Value_ptr, value_rows, x0, y0, fx, fy, height, width, start, row_ok,
                                    stride_v_s, channels_d, channel_ok)
                acc += sampled * _column(weights, columns, sample)[:, None]
        tl.store(Out_ptr + out_rows + channels_d[None, :], acc.to(Out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & channel_ok[None, :])


@triton.jit
def _msda_value_grad_gather_kernel(
    Order_ptr,                                # (E,) int64: entries sorted by value row key (stable)
    SegStart_ptr,                             # (N * S * M + 1,) int64: row r owns Order[SegStart[r]:SegStart[r+1]]
    Coefs_ptr,                                # (E,) fp32 coefficients, by entry
    GradOut_ptr,                              # (N, Lq, M, D) contiguous
    GradValue_ptr,                            # (N, S, M, D) contiguous, value's dtype
    head_dim, entries_per_row_head,           # L * P * 4: entry // that = (n, q, m)
    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)      # (n * S + token) * M + m
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    first = tl.load(SegStart_ptr + row)
    last = tl.load(SegStart_ptr + row + 1)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for chunk in range(first, last, BLOCK_E):
        offs_e = chunk + tl.arange(0, BLOCK_E)
        e_ok = offs_e < last
        entry = tl.load(Order_ptr + offs_e, mask=e_ok, other=0)
        coef = tl.load(Coefs_ptr + entry, mask=e_ok, other=0.0)
        source = entry // entries_per_row_head                                    # the (n, q, m) row of g
        grad = tl.load(GradOut_ptr + source[:, None] * head_dim + offs_d[None, :],
                       mask=e_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(coef[:, None] * grad, 0)
    tl.store(GradValue_ptr + row * head_dim + offs_d, acc.to(GradValue_ptr.dtype.element_ty), mask=d_ok)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _int32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.int32).contiguous()   # a device op: no host sync


def _forward_output(value, queries, samples):
    """A forward launcher's (N, Lq, M, D) output buffer, and its finished (N, Lq, M * D) result when there is
    nothing to launch (no queries: empty; no samples or no value tokens: zeros), else None."""
    batch, tokens, heads, head_dim = value.shape
    out = torch.empty(batch, queries, heads, head_dim, dtype=value.dtype, device=value.device)
    if out.numel() == 0:
        return out, out.view(batch, queries, heads * head_dim)
    if samples == 0 or tokens == 0:
        return out, out.zero_().view(batch, queries, heads * head_dim)
    return out, None


def ms_deform_attn_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Launch the forward kernel; shapes as `ms_deform_attn`. Returns (N, Lq, M * D) in value's dtype."""
    value = unit_last_stride(value)
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    out, finished = _forward_output(value, queries, levels * points)
    if finished is not None:
        return finished
    config = block_config("fwd", head_dim)
    grid = (triton.cdiv(batch * queries, config["BLOCK_Q"]), heads)
    _msda_fwd_kernel[grid](
        value, _int32(spatial_shapes), _int32(level_start_index), sampling_locations.contiguous(),
        attention_weights.contiguous(), out,
        value.stride(0), value.stride(1), value.stride(2),
        batch * queries, queries, heads, head_dim, levels, points,
        BLOCK_Q=config["BLOCK_Q"], BLOCK_D=config["BLOCK_D"],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return out.view(batch, queries, heads * head_dim)


def ms_deform_attn_backward(grad_out, value, spatial_shapes, level_start_index, sampling_locations,
                            attention_weights, deterministic=False):
    """Launch the backward: (dvalue, dlocations, dweights), each in its input's dtype.

    grad_out: (N, Lq, M * D). deterministic: reduce dvalue by sort and gather
    instead of fp32 atomics (module docstring): bit-identical across runs.
    """
    value = unit_last_stride(value)
    batch, tokens, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    device = value.device
    grad_out = grad_out.reshape(batch, queries, heads, head_dim).contiguous()
    if grad_out.numel() == 0 or levels * points == 0 or tokens == 0:
        return (torch.zeros_like(value), torch.zeros_like(sampling_locations), torch.zeros_like(attention_weights))
    # every sample's dA and dloc are written by the kernel: no zero fill
    grad_loc = torch.empty(sampling_locations.shape, dtype=torch.float32, device=device)
    grad_attn = torch.empty(attention_weights.shape, dtype=torch.float32, device=device)
    config = block_config("bwd", head_dim)
    grad_value, keys, coefs = _value_grad_buffers(value, batch * queries * heads * levels * points * _CORNERS,
                                                  deterministic)
    grid = (triton.cdiv(batch * queries, config["BLOCK_Q"]), heads)
    _msda_bwd_kernel[grid](
        value, _int32(spatial_shapes), _int32(level_start_index), sampling_locations.contiguous(),
        attention_weights.contiguous(), grad_out, grad_value, grad_loc, grad_attn, keys, coefs,
        value.stride(0), value.stride(1), value.stride(2),
        batch * queries, queries, heads, head_dim, levels, points, tokens,
        BLOCK_Q=config["BLOCK_Q"], BLOCK_D=config["BLOCK_D"], DETERMINISTIC=deterministic,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    if deterministic:
        grad_value = _gather_value_grad(keys, coefs, grad_out, value, levels * points * _CORNERS)
    return grad_value.to(value.dtype), grad_loc.to(sampling_locations.dtype), grad_attn.to(attention_weights.dtype)


def _value_grad_buffers(value, entries, deterministic):
    """(grad_value, keys, coefs) for the backward kernels: a zeroed fp32 dvalue for the atomics, or the
    (key, coefficient) record of `entries` sample corners for sort and gather (the unused ones one element)."""
    device = value.device
    if deterministic:
        return (torch.empty(1, dtype=torch.float32, device=device),       # never read: no atomics
                torch.empty(entries, dtype=torch.int64, device=device),
                torch.empty(entries, dtype=torch.float32, device=device))
    return (torch.zeros(value.shape, dtype=torch.float32, device=device),
            torch.empty(1, dtype=torch.int64, device=device),            # never read
            torch.empty(1, dtype=torch.float32, device=device))


def _gather_value_grad(keys, coefs, grad_out, value, entries_per_row_head):
    """dvalue from the recorded (key, coefficient) entries: stable sort by key, then one program per value row."""
    batch, tokens, heads, head_dim = value.shape
    num_value_rows = batch * tokens * heads
    keys = torch.where(keys < 0, num_value_rows, keys)          # outside the map: sorted past every row
    sorted_keys, order = torch.sort(keys, stable=True)
    boundaries = torch.arange(num_value_rows + 1, dtype=torch.int64, device=keys.device)
    seg_start = torch.searchsorted(sorted_keys, boundaries)
    grad_value = torch.empty(batch, tokens, heads, head_dim, dtype=value.dtype, device=value.device)
    config = block_config("gather", head_dim)
    _msda_value_grad_gather_kernel[(num_value_rows,)](
        order, seg_start, coefs, grad_out, grad_value, head_dim, entries_per_row_head,
        BLOCK_E=config["BLOCK_E"], BLOCK_D=config["BLOCK_D"],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return grad_value


def ms_deform_attn_query_forward(value, spatial_shapes, level_start_index, offsets, logits, reference_points):
    """Launch the query-side forward: `ms_deform_attn_query`'s shapes, offsets and logits as (N * Lq, ...)
    rows with unit inner stride (`as_rows`), reference_points contiguous. Returns (N, Lq, M * D) in value's dtype."""
    value = unit_last_stride(value)
    batch, _, heads, head_dim = value.shape
    queries, levels = reference_points.shape[1], reference_points.shape[2]
    points = logits.shape[1] // (heads * levels) if heads * levels else 0
    out, finished = _forward_output(value, queries, levels * points)
    if finished is not None:
        return finished
    config = block_config("query_fwd", head_dim)
    grid = (triton.cdiv(batch * queries, config["BLOCK_Q"]), heads)
    _msda_query_fwd_kernel[grid](
        value, _int32(spatial_shapes), _int32(level_start_index), offsets, logits, reference_points, out,
        value.stride(0), value.stride(1), value.stride(2), offsets.stride(0), logits.stride(0),
        batch * queries, queries, heads, head_dim, levels, points,
        BLOCK_Q=config["BLOCK_Q"], BLOCK_D=config["BLOCK_D"], BOX=reference_points.shape[-1] == 4,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return out.view(batch, queries, heads * head_dim)


def _samples_block(samples: int) -> int:
    return next(block for block in _SAMPLES_BLOCK_CHOICES if block >= samples)


def ms_deform_attn_project_forward(value, spatial_shapes, level_start_index, query, offsets_weight, offsets_bias,
                                   logits_weight, logits_bias, reference_points):
    """Launch the inference kernel with the query side's GEMM on chip (`ms_deform_attn_projected`'s arguments,
    query and the four parameters in one dtype, L * P <= MAX_PROJECT_SAMPLES). Returns (N, Lq, M * D)."""
    value = unit_last_stride(value)
    batch, _, heads, head_dim = value.shape
    queries, levels = reference_points.shape[1], reference_points.shape[2]
    channels = query.shape[-1]
    samples = logits_weight.shape[0] // heads if heads else 0
    out, finished = _forward_output(value, queries, samples)
    if finished is not None:
        return finished
    rows = as_rows(query, channels)
    config = block_config("project", head_dim)
    grid = (triton.cdiv(batch * queries, config["BLOCK_Q"]), heads)
    _msda_project_fwd_kernel[grid](
        value, _int32(spatial_shapes), _int32(level_start_index), rows, offsets_weight.contiguous(),
        offsets_bias.contiguous(), logits_weight.contiguous(), logits_bias.contiguous(),
        reference_points.contiguous(), out,
        value.stride(0), value.stride(1), value.stride(2), rows.stride(0),
        batch * queries, queries, heads, head_dim, levels, samples // levels, channels,
        BLOCK_Q=config["BLOCK_Q"], BLOCK_D=config["BLOCK_D"], BLOCK_C=config["BLOCK_C"],
        SAMPLES_BLOCK=_samples_block(samples), BOX=reference_points.shape[-1] == 4,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32", UPCAST_DOT=_upcast_dot(query.dtype),
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return out.view(batch, queries, heads * head_dim)


def ms_deform_attn_query_backward(grad_out, value, spatial_shapes, level_start_index, offsets, logits,
                                  reference_points, deterministic=False, grad_offsets=None, grad_logits=None):
    """Launch the query-side backward: (dvalue, doffsets, dlogits, dreference_points).

    doffsets and dlogits are fp32 (N * Lq, ...) rows, written into grad_offsets and
    grad_logits when given (rows with unit inner stride, e.g. two slices of one
    buffer laid out like the GEMM's output), else into fresh ones; dvalue and
    dreference_points are in their input's dtype.
    """
    value = unit_last_stride(value)
    batch, tokens, heads, head_dim = value.shape
    queries, levels, ref_width = reference_points.shape[1:]
    samples = logits.shape[1] // heads if heads else 0
    points = samples // levels if levels else 0
    device = value.device
    grad_out = grad_out.reshape(batch, queries, heads, head_dim).contiguous()
    # every entry of these is written by the kernel: no zero fill
    if grad_offsets is None:
        grad_offsets = torch.empty(batch * queries, heads * samples * 2, dtype=torch.float32, device=device)
    if grad_logits is None:
        grad_logits = torch.empty(batch * queries, heads * samples, dtype=torch.float32, device=device)
    if grad_out.numel() == 0 or samples == 0 or tokens == 0:
        return (torch.zeros_like(value), grad_offsets.zero_(), grad_logits.zero_(),
                torch.zeros_like(reference_points))
    grad_ref = torch.empty(batch, queries, heads, levels, ref_width, dtype=torch.float32, device=device)
    grad_value, keys, coefs = _value_grad_buffers(value, batch * queries * heads * samples * _CORNERS,
                                                  deterministic)
    config = block_config("bwd", head_dim)
    grid = (triton.cdiv(batch * queries, config["BLOCK_Q"]), heads)
    _msda_query_bwd_kernel[grid](
        value, _int32(spatial_shapes), _int32(level_start_index), offsets, logits, reference_points, grad_out,
        grad_value, grad_offsets, grad_logits, grad_ref, keys, coefs,
        value.stride(0), value.stride(1), value.stride(2), offsets.stride(0), logits.stride(0),
        grad_offsets.stride(0), grad_logits.stride(0),
        batch * queries, queries, heads, head_dim, levels, points, tokens,
        BLOCK_Q=config["BLOCK_Q"], BLOCK_D=config["BLOCK_D"], BOX=ref_width == 4, DETERMINISTIC=deterministic,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    if deterministic:
        grad_value = _gather_value_grad(keys, coefs, grad_out, value, samples * _CORNERS)
    return grad_value.to(value.dtype), grad_offsets, grad_logits, grad_ref.sum(2).to(reference_points.dtype)

_POINTER_TYPES = {"Shapes_ptr": "*i32", "Starts_ptr": "*i32", "GradValue_ptr": "*fp32", "GradLoc_ptr": "*fp32",
                  "GradAttn_ptr": "*fp32", "Keys_ptr": "*i64", "Coefs_ptr": "*fp32", "Order_ptr": "*i64",
                  "SegStart_ptr": "*i64", "Ref_ptr": "*fp32", "GradOff_ptr": "*fp32", "GradLogit_ptr": "*fp32",
                  "GradRef_ptr": "*fp32"}


def aot_configs() -> list[KernelConfig]:
    """Every variant the launchers can choose: 3 dtypes x 5 BLOCK_D x (forward, backward with atomics,
    backward deterministic, gather; and up to QUERY_SIDE_MAX_HEAD_DIM the query side's forward and two
    backwards for 2-d points and for 4-d boxes). One dtype for value, locations, weights, offsets and logits
    (the modules' case), fp32 reference points (they are, under autocast)."""
    configs = []
    for dtype_name in TRITON_DTYPE_NAMES.values():
        for block_d in _BLOCK_D_CHOICES:
            fwd, bwd, gather = (block_config(kernel, block_d) for kernel in ("fwd", "bwd", "gather"))
            configs.append(KernelConfig(_msda_fwd_kernel, aot_signature(_msda_fwd_kernel, dtype_name, _POINTER_TYPES),
                                        dict(BLOCK_Q=fwd["BLOCK_Q"], BLOCK_D=block_d),
                                        dict(num_warps=fwd["num_warps"], num_stages=fwd["num_stages"])))
            for deterministic in (False, True):
                configs.append(KernelConfig(
                    _msda_bwd_kernel, aot_signature(_msda_bwd_kernel, dtype_name, _POINTER_TYPES),
                    dict(BLOCK_Q=bwd["BLOCK_Q"], BLOCK_D=block_d, DETERMINISTIC=deterministic),
                    dict(num_warps=bwd["num_warps"], num_stages=bwd["num_stages"])))
            if block_d <= QUERY_SIDE_MAX_HEAD_DIM:
                query_fwd = block_config("query_fwd", block_d)
                for box in (False, True):
                    configs.append(KernelConfig(
                        _msda_query_fwd_kernel, aot_signature(_msda_query_fwd_kernel, dtype_name, _POINTER_TYPES),
                        dict(BLOCK_Q=query_fwd["BLOCK_Q"], BLOCK_D=block_d, BOX=box),
                        dict(num_warps=query_fwd["num_warps"], num_stages=query_fwd["num_stages"])))
                    for deterministic in (False, True):
                        configs.append(KernelConfig(
                            _msda_query_bwd_kernel,
                            aot_signature(_msda_query_bwd_kernel, dtype_name, _POINTER_TYPES),
                            dict(BLOCK_Q=bwd["BLOCK_Q"], BLOCK_D=block_d, BOX=box, DETERMINISTIC=deterministic),
                            dict(num_warps=bwd["num_warps"], num_stages=bwd["num_stages"])))
            if block_d <= _PROJECT_BLOCK_D:   # wider head dims run this BLOCK_D in slices
                project = block_config("project", block_d)
                for samples_block in _SAMPLES_BLOCK_CHOICES:
                    for box in (False, True):
                        configs.append(KernelConfig(
                            _msda_project_fwd_kernel,
                            aot_signature(_msda_project_fwd_kernel, dtype_name, _POINTER_TYPES),
                            dict(BLOCK_Q=project["BLOCK_Q"], BLOCK_D=block_d, BLOCK_C=project["BLOCK_C"],
                                 SAMPLES_BLOCK=samples_block, BOX=box,
                                 DOT_PRECISION="ieee" if dtype_name == "fp32" else "tf32", UPCAST_DOT=False),
                            dict(num_warps=project["num_warps"], num_stages=project["num_stages"])))
            gather_types = dict(_POINTER_TYPES, GradValue_ptr="*" + dtype_name)
            configs.append(KernelConfig(
                _msda_value_grad_gather_kernel,
                aot_signature(_msda_value_grad_gather_kernel, dtype_name, gather_types),
                dict(BLOCK_E=gather["BLOCK_E"], BLOCK_D=block_d),
                dict(num_warps=gather["num_warps"], num_stages=gather["num_stages"])))
    return configs


# ---------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------
# The launchers as torch.library custom ops in the `fastdetr` namespace, which torch.compile (fullgraph) and
# CUDA graphs hold as single nodes, each with a fake implementation; the autograd.Functions below are thin
# callers of them.

def _fake_output(value, queries):
    batch, _, heads, head_dim = value.shape
    return value.new_empty((batch, queries, heads * head_dim))


@torch.library.custom_op("fastdetr::msda_fwd", mutates_args=())
def msda_fwd_op(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                attention_weights: Tensor) -> Tensor:
    """`ms_deform_attn_forward`: (N, Lq, M * D)."""
    return ms_deform_attn_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


@msda_fwd_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    return _fake_output(value, sampling_locations.shape[1])


@torch.library.custom_op("fastdetr::msda_bwd", mutates_args=())
def msda_bwd_op(grad_out: Tensor, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                sampling_locations: Tensor, attention_weights: Tensor,
                deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
    """`ms_deform_attn_backward`: (dvalue, dlocations, dweights), each in its input's dtype and shape."""
    return ms_deform_attn_backward(grad_out, value, spatial_shapes, level_start_index, sampling_locations,
                                   attention_weights, deterministic)


@msda_bwd_op.register_fake
def _(grad_out, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, deterministic):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


@torch.library.custom_op("fastdetr::msda_query_fwd", mutates_args=())
def msda_query_fwd_op(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, offsets: Tensor,
                      logits: Tensor, reference_points: Tensor) -> Tensor:
    """`ms_deform_attn_query_forward` (offsets and logits as rows): (N, Lq, M * D)."""
    return ms_deform_attn_query_forward(value, spatial_shapes, level_start_index, offsets, logits, reference_points)


@msda_query_fwd_op.register_fake
def _(value, spatial_shapes, level_start_index, offsets, logits, reference_points):
    return _fake_output(value, reference_points.shape[1])


@torch.library.custom_op("fastdetr::msda_query_bwd", mutates_args=())
def msda_query_bwd_op(grad_out: Tensor, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                      offsets: Tensor, logits: Tensor, reference_points: Tensor, deterministic: bool,
                      one_buffer: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`ms_deform_attn_query_backward`: (dvalue, doffsets, dlogits, dreference_points), the middle two fp32 rows.
    one_buffer: doffsets and dlogits written side by side into one (N * Lq, 3 M L P) fp32 buffer, laid out like
    the query side's GEMM output, returned as the second output (the third then 0-element)."""
    if not one_buffer:
        return ms_deform_attn_query_backward(grad_out, value, spatial_shapes, level_start_index, offsets, logits,
                                             reference_points, deterministic)
    split = offsets.shape[1]
    both = torch.empty(offsets.shape[0], split + logits.shape[1], dtype=torch.float32, device=offsets.device)
    grad_value, _, _, grad_ref = ms_deform_attn_query_backward(
        grad_out, value, spatial_shapes, level_start_index, offsets, logits, reference_points, deterministic,
        grad_offsets=both[:, :split], grad_logits=both[:, split:])
    return grad_value, both, both.new_empty((0,)), grad_ref


@msda_query_bwd_op.register_fake
def _(grad_out, value, spatial_shapes, level_start_index, offsets, logits, reference_points, deterministic,
      one_buffer):
    rows = offsets.shape[0]
    fp32 = dict(dtype=torch.float32)
    if one_buffer:
        grad_offsets = offsets.new_empty((rows, offsets.shape[1] + logits.shape[1]), **fp32)
        grad_logits = offsets.new_empty((0,), **fp32)
    else:
        grad_offsets, grad_logits = (offsets.new_empty(t.shape, **fp32) for t in (offsets, logits))
    return torch.empty_like(value), grad_offsets, grad_logits, torch.empty_like(reference_points)


@torch.library.custom_op("fastdetr::msda_project_fwd", mutates_args=())
def msda_project_fwd_op(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, query: Tensor,
                        offsets_weight: Tensor, offsets_bias: Tensor, logits_weight: Tensor, logits_bias: Tensor,
                        reference_points: Tensor) -> Tensor:
    """`ms_deform_attn_project_forward` (inference, the GEMM on chip): (N, Lq, M * D)."""
    return ms_deform_attn_project_forward(value, spatial_shapes, level_start_index, query, offsets_weight,
                                          offsets_bias, logits_weight, logits_bias, reference_points)


@msda_project_fwd_op.register_fake
def _(value, spatial_shapes, level_start_index, query, offsets_weight, offsets_bias, logits_weight, logits_bias,
      reference_points):
    return _fake_output(value, reference_points.shape[1])


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------

class MSDeformAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                deterministic):
        # the layouts the launchers read, made once: backward reuses them instead of copying again
        value = unit_last_stride(value)
        sampling_locations, attention_weights = sampling_locations.contiguous(), attention_weights.contiguous()
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        ctx.deterministic = deterministic
        # the level tables made int32 outside the op, where a dispatch mode (fastdetr.measure) sees the copy
        return torch.ops.fastdetr.msda_fwd(value, _int32(spatial_shapes), _int32(level_start_index),
                                           sampling_locations, attention_weights)

    @staticmethod
    def backward(ctx, grad_out):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        deterministic = ctx.deterministic
        if deterministic is None:
            deterministic = torch.are_deterministic_algorithms_enabled()
        grad_value, grad_loc, grad_attn = torch.ops.fastdetr.msda_bwd(
            grad_out, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            bool(deterministic))
        return grad_value, None, None, grad_loc, grad_attn, None


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                   deterministic=None):
    """Multi-scale deformable attention by the Triton kernels (module docstring): (N, Lq, M * D).

    value (N, S, M, D); spatial_shapes (L, 2) integer (H, W); level_start_index
    (L,); sampling_locations (N, Lq, M, L, P, 2) as (x, y) in [0, 1] of each
    level (outside allowed: zeros); attention_weights (N, Lq, M, L, P); float
    tensors in `DTYPES`, output in value's dtype. Gradients for value,
    sampling_locations and attention_weights. deterministic: None (default)
    follows `torch.are_deterministic_algorithms_enabled()` at backward time;
    True / False force the sort-and-gather or the atomic dvalue. The tensors
    must be ones Triton runs (CUDA, or the CPU under TRITON_INTERPRET=1):
    `fastdetr.nn.functional.ms_deform_attn` picks this or the reference.
    level_start_index must match spatial_shapes (not checked: that would read
    them on the host).
    """
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if not use_triton(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        raise RuntimeError("ms_deform_attn: the kernel needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU); "
                           f"got value on {value.device}. fastdetr.reference.deformable_attention.ms_deform_attn "
                           "is the plain-PyTorch op")
    return MSDeformAttnFunction.apply(value, spatial_shapes, level_start_index, sampling_locations,
                                      attention_weights, deterministic)


def _check_query_inputs(value, spatial_shapes, level_start_index, sampling_offsets, attention_logits,
                        reference_points) -> None:
    """`ms_deform_attn_query`'s shape and dtype checks, from metadata only."""
    if reference_points.dim() != 4 or reference_points.shape[-1] not in (2, 4):
        raise ValueError(f"ms_deform_attn_query: reference_points must be (N, Lq, L, 2) points or (N, Lq, L, 4) "
                         f"boxes; got {tuple(reference_points.shape)}")
    if sampling_offsets.dim() != 6:
        raise ValueError(f"ms_deform_attn_query: sampling_offsets must be (N, Lq, M, L, P, 2); "
                         f"got {tuple(sampling_offsets.shape)}")
    # the offsets stand where the sampling core's locations do: the same checks
    _check_inputs(value, spatial_shapes, level_start_index, sampling_offsets, attention_logits,
                  ("ms_deform_attn_query", "sampling_offsets", "attention_logits"))
    batch, queries, _, levels = sampling_offsets.shape[:4]
    if tuple(reference_points.shape[:3]) != (batch, queries, levels):
        raise ValueError(f"ms_deform_attn_query: reference_points {tuple(reference_points.shape)} disagree with "
                         f"sampling_offsets {tuple(sampling_offsets.shape)} on N, Lq or L")
    if reference_points.dtype not in DTYPES:
        raise ValueError(f"ms_deform_attn_query: reference_points must be one of {DTYPES}; "
                         f"got {reference_points.dtype}")
    if value.shape[-1] > QUERY_SIDE_MAX_HEAD_DIM:
        raise ValueError(f"ms_deform_attn_query: head dim {value.shape[-1]} exceeds QUERY_SIDE_MAX_HEAD_DIM = "
                         f"{QUERY_SIDE_MAX_HEAD_DIM}; ms_deform_attn (the sampling core alone) takes up to "
                         f"{MAX_HEAD_DIM}")


class MSDeformAttnQueryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_offsets, attention_logits,
                reference_points, deterministic):
        value = unit_last_stride(value)
        batch, queries, heads, levels, points, _ = sampling_offsets.shape
        offsets = as_rows(sampling_offsets, heads * levels * points * 2)
        logits = as_rows(attention_logits, heads * levels * points)
        reference_points = reference_points.contiguous()
        ctx.save_for_backward(value, spatial_shapes, level_start_index, offsets, logits, reference_points)
        ctx.deterministic = deterministic
        ctx.inputs = (sampling_offsets.shape, sampling_offsets.dtype), (attention_logits.shape, attention_logits.dtype)
        return torch.ops.fastdetr.msda_query_fwd(value, _int32(spatial_shapes), _int32(level_start_index), offsets,
                                                 logits, reference_points)

    @staticmethod
    def backward(ctx, grad_out):
        value, spatial_shapes, level_start_index, offsets, logits, reference_points = ctx.saved_tensors
        deterministic = ctx.deterministic
        if deterministic is None:
            deterministic = torch.are_deterministic_algorithms_enabled()
        grad_value, grad_off, grad_logit, grad_ref = torch.ops.fastdetr.msda_query_bwd(
            grad_out, value, spatial_shapes, level_start_index, offsets, logits, reference_points,
            bool(deterministic), False)
        (offsets_shape, offsets_dtype), (logits_shape, logits_dtype) = ctx.inputs
        return (grad_value, None, None, grad_off.view(offsets_shape).to(offsets_dtype),
                grad_logit.view(logits_shape).to(logits_dtype), grad_ref, None)


def ms_deform_attn_query(value, spatial_shapes, level_start_index, sampling_offsets, attention_logits,
                         reference_points, deterministic=None):
    """Multi-scale deformable attention from the query side's raw outputs, by the Triton kernels: (N, Lq, M * D).

    What `MultiScaleDeformableAttention` computes between its projections, in one
    kernel: the softmax of attention_logits (N, Lq, M, L, P) over each head's
    L * P points, the locations from reference_points and sampling_offsets
    (N, Lq, M, L, P, 2) -- (N, Lq, L, 2) points (x, y): point + offset / (W_l,
    H_l); (N, Lq, L, 4) boxes (x, y, w, h): centre + offset / P * (w, h) / 2 --
    and the sampling (`ms_deform_attn`). Neither the weights nor the locations
    are written: the forward writes the output only, the backward recomputes both
    from what it saved (value, offsets, logits, reference points). Offsets and
    logits are typically slices of one GEMM's output (`fastdetr.nn.
    functional.ms_deform_attn_query`): read in place, no copy. Gradients for
    value, offsets, logits and reference points; deterministic as in
    `ms_deform_attn`. The plain-PyTorch definition is `fastdetr.reference.
    deformable_attention.ms_deform_attn_query`.
    """
    _check_query_inputs(value, spatial_shapes, level_start_index, sampling_offsets, attention_logits,
                        reference_points)
    if not use_triton(value, spatial_shapes, level_start_index, sampling_offsets, attention_logits,
                      reference_points):
        raise RuntimeError("ms_deform_attn_query: the kernel needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU); "
                           f"got value on {value.device}. fastdetr.reference.deformable_attention."
                           "ms_deform_attn_query is the plain-PyTorch op")
    return MSDeformAttnQueryFunction.apply(value, spatial_shapes, level_start_index, sampling_offsets,
                                           attention_logits, reference_points, deterministic)


def _stacked(offsets_weight, offsets_bias, logits_weight, logits_bias, dtype):
    """The offsets' and logits' Linears as one (weight, bias) in `dtype`: made afresh from the Parameters."""
    return (torch.cat([offsets_weight, logits_weight]).to(dtype), torch.cat([offsets_bias, logits_bias]).to(dtype))


class MSDeformAttnProjectedFunction(torch.autograd.Function):
    """The query side whole: one GEMM for offsets and logits, then the query-side kernel; backward recomputes
    the GEMM instead of saving its output (it saves the query, which the weight gradient needs anyway)."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, query, offsets_weight, offsets_bias, logits_weight,
                logits_bias, reference_points, dtype, deterministic):
        value = unit_last_stride(value)
        reference_points = reference_points.contiguous()
        weight, bias = _stacked(offsets_weight, offsets_bias, logits_weight, logits_bias, dtype)
        both = as_rows(F.linear(query.to(dtype), weight, bias), weight.shape[0])
        split = offsets_weight.shape[0]
        out = torch.ops.fastdetr.msda_query_fwd(value, _int32(spatial_shapes), _int32(level_start_index),
                                                both[:, :split], both[:, split:], reference_points)
        ctx.save_for_backward(value, spatial_shapes, level_start_index, query, offsets_weight, offsets_bias,
                              logits_weight, logits_bias, reference_points)
        ctx.dtype, ctx.deterministic = dtype, deterministic
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (value, spatial_shapes, level_start_index, query, offsets_weight, offsets_bias, logits_weight, logits_bias,
         reference_points) = ctx.saved_tensors
        deterministic = ctx.deterministic
        if deterministic is None:
            deterministic = torch.are_deterministic_algorithms_enabled()
        weight, bias = _stacked(offsets_weight, offsets_bias, logits_weight, logits_bias, ctx.dtype)
        rows = as_rows(query.to(ctx.dtype), query.shape[-1])
        both = F.linear(rows, weight, bias)                     # recomputed: the same GEMM as the forward's
        split = offsets_weight.shape[0]
        grad_value, grad_both, _, grad_ref = torch.ops.fastdetr.msda_query_bwd(
            grad_out, value, spatial_shapes, level_start_index, both[:, :split], both[:, split:], reference_points,
            bool(deterministic), True)
        grad_both = grad_both.to(ctx.dtype)
        grad_query = (grad_both @ weight).view(query.shape).to(query.dtype)
        grad_weight = grad_both.t() @ rows
        grad_bias = grad_both.sum(0)
        return (grad_value, None, None, grad_query,
                grad_weight[:split].to(offsets_weight.dtype), grad_bias[:split].to(offsets_bias.dtype),
                grad_weight[split:].to(logits_weight.dtype), grad_bias[split:].to(logits_bias.dtype),
                grad_ref, None, None)


def ms_deform_attn_projected(value, spatial_shapes, level_start_index, query, offsets_weight, offsets_bias,
                             logits_weight, logits_bias, reference_points, dtype=None, deterministic=None,
                             gemm_on_chip=True):
    """`MultiScaleDeformableAttention` from its query on: (N, Lq, M * D), value already projected.

    offsets = query @ offsets_weight^T + offsets_bias (M * L * P * 2 columns, the
    official (m, l, p, xy) order) and logits = query @ logits_weight^T + logits_bias
    (M * L * P) as one GEMM, in `dtype` (default query's; autocast's dtype under
    autocast, as the module passes it), then `ms_deform_attn_query`'s kernel.
    Saved for backward: value, query and reference points (and the parameters):
    neither the GEMM's output nor locations nor weights -- backward runs the GEMM
    again, one (N * Lq, C) x (C, 3 M L P) product, to save M * L * P * 3 values
    per query. Gradients for value, query, the four parameters and the reference
    points; deterministic as in `ms_deform_attn`. Inference (no grad needed) with
    L * P <= MAX_PROJECT_SAMPLES runs one kernel that does the GEMM on chip too
    (per program: its rows' offsets and logits for one head, by tensor-core dots
    in 16-bit, ieee fp32 dots in fp32) and writes the output only; gemm_on_chip=False
    runs the GEMM by torch there as well (to measure what the on-chip GEMM buys).
    """
    dtype = dtype or query.dtype
    if query.dim() != 3 or offsets_weight.dim() != 2 or offsets_weight.shape[1] != query.shape[-1] \
            or tuple(logits_weight.shape) != (offsets_weight.shape[0] // 2, query.shape[-1]):
        raise ValueError(f"ms_deform_attn_projected: query (N, Lq, C), offsets_weight (M*L*P*2, C) and "
                         f"logits_weight (M*L*P, C) expected; got {tuple(query.shape)}, "
                         f"{tuple(offsets_weight.shape)}, {tuple(logits_weight.shape)}")
    if value.dim() != 4 or reference_points.dim() != 4:
        raise ValueError(f"ms_deform_attn_projected: value (N, S, M, D) and reference_points (N, Lq, L, 2 or 4) "
                         f"expected; got {tuple(value.shape)} and {tuple(reference_points.shape)}")
    batch, queries = query.shape[:2]
    heads, levels = value.shape[2], reference_points.shape[2]
    points = logits_weight.shape[0] // max(heads * levels, 1)
    if heads * levels * points != logits_weight.shape[0]:
        raise ValueError(f"ms_deform_attn_projected: logits_weight has {logits_weight.shape[0]} rows, not "
                         f"heads {heads} x levels {levels} x points")
    # the kernel's checks on what the GEMM will produce (shapes and dtypes as metadata)
    probe = torch.empty((), dtype=dtype, device="meta").expand(batch, queries, heads, levels, points)   # no data
    _check_query_inputs(value, spatial_shapes, level_start_index, probe[..., None].expand(*probe.shape, 2), probe,
                        reference_points)
    if not use_triton(value, spatial_shapes, level_start_index, query, offsets_weight, reference_points):
        raise RuntimeError("ms_deform_attn_projected: the kernel needs CUDA tensors (or TRITON_INTERPRET=1 on the "
                           f"CPU); got value on {value.device}. fastdetr.reference.deformable_attention."
                           "ms_deform_attn_query is the plain-PyTorch op, after the two Linears")
    tensors = (value, query, offsets_weight, offsets_bias, logits_weight, logits_bias, reference_points)
    if gemm_on_chip and levels * points <= MAX_PROJECT_SAMPLES and not (
            torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        # inference: the GEMM on chip as well, nothing but the output written
        return torch.ops.fastdetr.msda_project_fwd(
            value, _int32(spatial_shapes), _int32(level_start_index), query.to(dtype), offsets_weight.to(dtype),
            offsets_bias.to(dtype), logits_weight.to(dtype), logits_bias.to(dtype), reference_points)
    return MSDeformAttnProjectedFunction.apply(value, spatial_shapes, level_start_index, query, offsets_weight,
                                               offsets_bias, logits_weight, logits_bias, reference_points, dtype,
                                               deterministic)
