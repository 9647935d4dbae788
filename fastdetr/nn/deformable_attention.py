"""`MultiScaleDeformableAttention`: Deformable DETR's `MSDeformAttn` module, with no CUDA extension to build.

The same constructor `(d_model=256, n_levels=4, n_heads=8, n_points=4)`, parameters
(`sampling_offsets`, `attention_weights`, `value_proj`, `output_proj`), state_dict,
initialisation and forward signature as `models/ops/modules/ms_deform_attn.py` of
fundamentalvision/Deformable-DETR, so its checkpoints load unchanged. Each query
predicts, per head, P sampling offsets and P attention weights on each of the L
levels; the points are placed around its reference point, sampled bilinearly from
the projected value maps and summed (`fastdetr.reference.deformable_attention`
states the sampling core's semantics):

    value      = value_proj(input_flatten), zero where input_padding_mask is True    (N, S, M, D)
    offsets    = sampling_offsets(query)                                           (N, Lq, M, L, P, 2)
    weights    = softmax over the L * P points of attention_weights(query)         (N, Lq, M, L, P)
    locations  = reference_points + offsets / (W_l, H_l)             2-d reference points (x, y)
               = (x, y) + offsets / P * (w, h) / 2                   4-d reference boxes (x, y, w, h)
    output     = output_proj(MSDA(value, locations, weights))                      (N, Lq, d_model)

with N the batch, Lq the queries, S = sum of H_l * W_l the value tokens (the levels
flattened and stacked in order), M heads of D = d_model / M channels, locations in
[0, 1] over each level's map (top-left (0, 0); outside allowed, sampling zeros).

How it differs from the official module:
- on CUDA tensors (or on the CPU under TRITON_INTERPRET=1), in fp32, fp16 or bf16,
  everything between the projections is one Triton kernel
  (`fastdetr.kernels.deformable_attention.ms_deform_attn_query`): offsets and
  logits come from one GEMM (the two Linears' weights stacked), and the kernel
  reads them raw, takes the softmax over the L * P points and the locations
  itself and samples: neither weights nor locations are ever written, and
  backward recomputes them and the GEMM (only value, query and the reference
  points are saved). In inference (no gradient needed, L * P <= 32) the GEMM
  runs inside that kernel too, and it writes the output only. With a padding
  mask the value projection is one GEMM with the fill in its epilogue
  (`fastdetr.kernels.linear_relu.linear_masked_rows`). `fuse_query_side`,
  `fuse_value_side` and `fuse_query_gemm` (attributes, default True) turn each
  off, to measure what it buys; with the query side off the sampling core
  alone (`_core`) is still the kernel (`fastdetr.nn.functional.ms_deform_attn`).
  Anywhere else (and while tracing) plain PyTorch, grid_sample per level. The
  official op is a CUDA extension to build, fp32/fp64 only, atomicAdd in backward
  (ours has a deterministic backward on request);
- no `im2col_step` (a CUDA batching knob) and no warning for head dims that are not
  a power of two (the official warns because its kernel prefers them);
- bad inputs raise ValueError naming the argument, where the official asserts or
  fails inside the kernel; the token count against input_spatial_shapes is checked
  here when that tensor is on the CPU (on a GPU it would cost a host sync per call,
  and the core checks it), and not while tracing (`torch.jit.trace`, `torch.onnx.export`)
  or compiling (`torch.compile`: a value a graph cannot guard on),
  where the graph takes the sizes as traced values and the check would be a constant of
  the example;
- the offsets' bias is initialised in place (the official assigns a new Parameter):
  same values, and the parameter keeps its device and dtype.

Padding mask polarity is Deformable DETR's: True on padding (RT-DETR's and
transformers' value masks are True on valid tokens).
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from fastdetr.nn import functional
from fastdetr.reference.deformable_attention import sampling_locations, tracing
from fastdetr.reference.deformable_detr import MSDeformAttn


class MultiScaleDeformableAttention(MSDeformAttn):
    """Multi-scale deformable attention (module docstring): (N, Lq, d_model) -> (N, Lq, d_model).

    d_model: channels of query, input_flatten and the output; n_levels: feature levels L;
    n_heads: heads M (d_model % n_heads == 0); n_points: sampling points P per head and level.
    Parameters and the official initialisation come from the reference `MSDeformAttn` it subclasses
    (fastdetr.reference.deformable_detr), and so does `forward` (output_proj of `sample`); `sample` is
    fastdetr's.
    """

    # the two fusions around the sampling core (module docstring): set either False on an instance to measure
    # what it buys (class attributes, so a module converted by `fastdetr.optimize` has them too)
    fuse_query_side: bool = True
    fuse_value_side: bool = True
    fuse_query_gemm: bool = True     # inference: the offsets+logits GEMM inside the query side's kernel

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_levels={self.n_levels}, n_heads={self.n_heads}, n_points={self.n_points}"

    def sample(self, query: Tensor, reference_points: Tensor, input_flatten: Tensor, input_spatial_shapes: Tensor,
               input_level_start_index: Tensor, input_padding_mask: Tensor | None = None) -> Tensor:
        """`forward` (the reference's: output_proj of this) up to, not including, output_proj.

        query (N, Lq, d_model); reference_points (N, Lq, L, 2) as (x, y) or (N, Lq, L, 4) as (x, y, w, h),
        in [0, 1] of each level, top-left (0, 0), bottom-right (1, 1), padding area included;
        input_flatten (N, S, d_model), the L levels' tokens stacked in order, S = sum of H_l * W_l;
        input_spatial_shapes (L, 2) integer (H_l, W_l); input_level_start_index (L,) each level's first token;
        input_padding_mask (N, S) bool, True on padding, or None. Returns the heads' sampled values
        (N, Lq, d_model); the fused Deformable DETR layers (fastdetr.nn.deformable_transformer) run
        output_proj inside their residual + LayerNorm kernel.
        """
        with warnings.catch_warnings():
            if tracing():
                # the checks and the choice of 2-d points or 4-d boxes read the example's sizes: static facts
                # of the graph, not recorded in the trace
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            self._check_inputs(query, reference_points, input_flatten, input_spatial_shapes,
                               input_level_start_index, input_padding_mask)
        batch, queries, _ = query.shape
        tokens = input_flatten.shape[1]
        heads, levels, points = self.n_heads, self.n_levels, self.n_points

        value = functional.value_projection(input_flatten, self.value_proj, input_padding_mask,
                                            fuse=self.fuse_value_side)
        value = value.view(batch, tokens, heads, self.d_model // heads)
        if self.fuse_query_side and functional.msda_query_side_fusable(value, query, reference_points):
            # one GEMM for offsets and logits; the softmax and the locations happen inside the kernel
            return functional.ms_deform_attn_query_side(
                value, input_spatial_shapes, input_level_start_index, query, self.sampling_offsets,
                self.attention_weights, reference_points, gemm_on_chip=self.fuse_query_gemm)
        offsets = self.sampling_offsets(query).view(batch, queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, queries, heads, levels, points)
        locations = sampling_locations(reference_points, offsets, input_spatial_shapes)
        return self._core(value, input_spatial_shapes, input_level_start_index, locations, weights)

    def _core(self, value: Tensor, shapes: Tensor, starts: Tensor, locations: Tensor, weights: Tensor) -> Tensor:
        """The sampling core: value (N, S, M, D), shapes (L, 2), starts (L,), locations (N, Lq, M, L, P, 2),
        weights (N, Lq, M, L, P) -> (N, Lq, M * D); the Triton kernel where `fastdetr.nn.functional` can
        run it, else the reference."""
        return functional.ms_deform_attn(value, shapes, starts, locations, weights)

    def _check_inputs(self, query: Tensor, reference_points: Tensor, input_flatten: Tensor,
                      input_spatial_shapes: Tensor, input_level_start_index: Tensor,
                      input_padding_mask: Tensor | None) -> None:
        """ValueError naming the argument, from shapes and dtypes (and, on the CPU and not while tracing, the
        spatial shapes' values)."""
        name = type(self).__name__
        if query.dim() != 3 or query.shape[-1] != self.d_model:
            raise ValueError(f"{name}: query must be (N, Lq, d_model={self.d_model}); got {tuple(query.shape)}")
        batch, queries, _ = query.shape
        if input_flatten.dim() != 3 or input_flatten.shape[0] != batch or input_flatten.shape[-1] != self.d_model:
            raise ValueError(f"{name}: input_flatten must be (N={batch}, S, d_model={self.d_model}); "
                             f"got {tuple(input_flatten.shape)}")
        if (reference_points.dim() != 4 or tuple(reference_points.shape[:3]) != (batch, queries, self.n_levels)
                or reference_points.shape[-1] not in (2, 4)):
            raise ValueError(f"{name}: reference_points must be (N={batch}, Lq={queries}, n_levels={self.n_levels}, "
                             f"2 or 4); got {tuple(reference_points.shape)} (the last dim is (x, y) or (x, y, w, h))")
        if tuple(input_spatial_shapes.shape) != (self.n_levels, 2):
            raise ValueError(f"{name}: input_spatial_shapes must be (n_levels={self.n_levels}, 2) as (H, W); "
                             f"got {tuple(input_spatial_shapes.shape)}")
        if input_spatial_shapes.dtype.is_floating_point or input_spatial_shapes.dtype == torch.bool:
            raise ValueError(f"{name}: input_spatial_shapes must be integers; got {input_spatial_shapes.dtype}")
        if tuple(input_level_start_index.shape) != (self.n_levels,):
            raise ValueError(f"{name}: input_level_start_index must be (n_levels={self.n_levels},); "
                             f"got {tuple(input_level_start_index.shape)}")
        tokens = input_flatten.shape[1]
        if input_padding_mask is not None:
            if tuple(input_padding_mask.shape) != (batch, tokens) or input_padding_mask.dtype != torch.bool:
                raise ValueError(f"{name}: input_padding_mask must be bool (N={batch}, S={tokens}), True on padding; "
                                 f"got {input_padding_mask.dtype} {tuple(input_padding_mask.shape)}")
        if input_spatial_shapes.device.type == "cpu" and not tracing() and not torch.compiler.is_compiling():
            held = int(input_spatial_shapes.prod(-1).sum())
            if held != tokens:
                raise ValueError(f"{name}: input_flatten has {tokens} tokens, input_spatial_shapes "
                                 f"{input_spatial_shapes.tolist()} hold {held}")
