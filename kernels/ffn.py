"""The whole inference FFN of a DETR layer in one kernel, the hidden kept on chip.

What is fused: z = residual + relu(x @ W1^T + b1) @ W2^T + b2, then
out = LayerNorm(z) with (ln_weight, ln_bias, eps) when ln_weight is given
(post-norm layers, where residual is x itself), else out = z (pre-norm layers:
x = norm2(src), residual = src, and the next layer normalises). Dropout is off
(inference). The reference is `ffn_inference_ref` at the bottom of this file:
`F.linear`, `F.relu`, `F.linear`, an add, `F.layer_norm` -- four or five
kernels, and the (M, H) hidden (H = 2048 in DETR, 8x d_model) is written to
memory and read back. `linear_relu` + `linear_layernorm` (the training path)
still store the hidden, which their backward needs; inference does not.

Forward (Triton, one kernel): a program owns BLOCK_M rows and the whole d_model
width D (padded to BLOCK_D, a power of two >= 64, masked). It walks the hidden
in BLOCK_H chunks: h = relu(x W1[chunk]^T + b1[chunk]) by a GEMM over D in
BLOCK_K steps (fp32 accumulation), rounded to the input dtype as the
reference's F.linear rounds its output, then acc += h W2[:, chunk]^T into a
BLOCK_M x BLOCK_D fp32 accumulator. Only acc and one h chunk are ever live; the
epilogue adds b2 and the residual, optionally applies LayerNorm (mean and rstd
in fp32 over the valid columns: `_layernorm_rows`, shared with
`linear_layernorm`) and stores in the input dtype. Weights are re-read by
every row program (from L2: W1 + W2 are 2 MB in bf16 at DETR size).

Register budget (per thread, 32 * num_warps threads): acc takes
BLOCK_M * BLOCK_D / (32 * num_warps) fp32 registers (64 for 64 x 256 and 8
warps), the h chunk BLOCK_M * BLOCK_H / (32 * num_warps) more, and the W2 chunk
(BLOCK_D x BLOCK_H) is the largest tile loaded per step. Without a known
16-element alignment of d_model and the row strides -- what `aot_configs()`
compiles, and what a GPU runs for an odd d_model -- every load is scalar, with
an address and a predicate per element, and that sets the tile sizes (no
spills; `fastdetr kernel-report` prints each config's registers and shared
memory). The specialisation Triton's JIT applies on a GPU for DETR's shapes
(d_model 256, strides multiples of 16) vectorises the loads and needs fewer
registers. In-tile offsets are int32 (one register per element instead of
two); only the program's row base is int64.

Limits, as constants other modules import: D <= `MAX_FUSED_WIDTH` (256,
DETR's d_model; wider rows, dtypes outside `DTYPES` and calls that need a
gradient run `ffn_inference_ref`, plain PyTorch); any H (masked); x, the
weights, the biases, residual and the LayerNorm parameters share one dtype in
`DTYPES` (fp32, fp16 or bf16); b1, b2 are tensors (not None); ln_weight and
ln_bias are given together or not at all; M < 2**31, each weight under 2**31
elements. fp32 dots run in true fp32 ("ieee", not tf32), for the 1e-5
tolerance. Block sizes were picked for no register spills on sm_80 / sm_90 and
tensor cores for 16-bit inputs (wgmma on sm_90, mma on sm_80; `aot_configs()`),
not tuned on a GPU. The grid is one program per
BLOCK_M rows, each walking the whole hidden: at DETR's decoder size (100
queries x batch) that is a handful of programs, too few to fill a GPU -- a
split over H (partial sums, then the epilogue) would be the next step if timing
shows it.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastdetr.backend import use_triton
from fastdetr.kernels.common import (
    TRITON_DTYPE_NAMES,
    KernelConfig,
    _dot,
    _layernorm_rows,
    _upcast_dot,
    aot_signature,
    as_rows,
)

# limits (module docstring)
MAX_FUSED_WIDTH = 256
DTYPES = tuple(TRITON_DTYPE_NAMES)
_BLOCK_D_CHOICES = (64, 128, 256)


def _check_inputs(x, w1, b1, w2, b2, residual, ln_weight, ln_bias) -> None:
    """Shape and dtype checks that read metadata only."""
    for name, tensor in (("b1", b1), ("b2", b2), ("residual", residual)):
        if tensor is None:
            raise ValueError(f"ffn_inference: {name} must be a tensor, not None")
    if (ln_weight is None) != (ln_bias is None):
        raise ValueError("ffn_inference: ln_weight and ln_bias must be given together (LayerNorm) or both None")
    if w1.dim() != 2:
        raise ValueError(f"ffn_inference: w1 must be (H, D); got {tuple(w1.shape)}")
    hidden, width = w1.shape
    if x.dim() < 1 or x.shape[-1] != width:
        raise ValueError(f"ffn_inference: x (..., D={width}) expected; got {tuple(x.shape)}")
    if tuple(w2.shape) != (width, hidden):
        raise ValueError(f"ffn_inference: w2 must be ({width}, {hidden}) = (D, H); got {tuple(w2.shape)}")
    if tuple(residual.shape) != tuple(x.shape):
        raise ValueError(f"ffn_inference: residual must have x's shape {tuple(x.shape)}; got {tuple(residual.shape)}")
    for name, tensor, size in (("b1", b1, hidden), ("b2", b2, width), ("ln_weight", ln_weight, width),
                               ("ln_bias", ln_bias, width)):
        if tensor is not None and tuple(tensor.shape) != (size,):
            raise ValueError(f"ffn_inference: {name} must be ({size},); got {tuple(tensor.shape)}")
    present = [t for t in (x, w1, b1, w2, b2, residual, ln_weight, ln_bias) if t is not None]
    dtypes = {t.dtype for t in present}
    if len(dtypes) != 1:
        raise ValueError(f"ffn_inference: all inputs must share a dtype; got {sorted(map(str, dtypes))}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"ffn_inference: inputs must be floating point; got {x.dtype}")


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _configs() -> dict:
    """Launch configs by (dtype family, BLOCK_D); all compiled ahead of time in CI.

    BLOCK_D is d_model padded to a power of two (at least 64: narrower rows are
    masked). 16-bit: BLOCK_M = 64 and 8 warps, so sm_90 picks wgmma (whole
    warpgroups, 64-row tiles); 8 warps also halve each thread's share of the
    accumulator. The hidden chunk BLOCK_H shrinks as BLOCK_D grows: the W2
    chunk (BLOCK_D x BLOCK_H) is the largest tile loaded per step, and without
    known alignment (d_model or a stride not a multiple of 16 elements, the case
    the AOT compile checks) its loads are scalar, each element holding an
    address and a predicate. fp32: ieee dots run on the FMA units with operands
    in registers, so 16-row tiles.
    """
    tiles_16bit = {64: dict(BLOCK_H=64, BLOCK_K=32), 128: dict(BLOCK_H=32, BLOCK_K=32),
                   256: dict(BLOCK_H=16, BLOCK_K=32)}
    configs = {}
    for block_d in _BLOCK_D_CHOICES:
        configs[("16bit", block_d)] = dict(BLOCK_M=64, **tiles_16bit[block_d], num_warps=8, num_stages=2,
                                           DOT_PRECISION="tf32")   # ignored by fp16/bf16 dots
        # 1 stage: at 2, the aligned (DETR-shaped) variants keep an 8-16 byte stack on sm_90; BLOCK_K = 16 up
        # to BLOCK_D = 128: at 32 they keep one there under Triton 3.8 / 3.9 (at 256, 16 costs registers)
        configs[("fp32", block_d)] = dict(BLOCK_M=16, BLOCK_H=32, BLOCK_K=16 if block_d <= 128 else 32,
                                          num_warps=4 if block_d == 64 else 8, num_stages=1, DOT_PRECISION="ieee")
    return configs


def _block_d(width: int) -> int:
    return max(_BLOCK_D_CHOICES[0], triton.next_power_of_2(width))


def block_config(dtype: torch.dtype, width: int) -> dict:
    """Launch config for inputs of `dtype` and d_model D = `width` (<= 256)."""
    block_d = _block_d(width)
    return dict(_configs()[("fp32" if dtype == torch.float32 else "16bit", block_d)], BLOCK_D=block_d)


# `apply_layernorm` is a runtime argument (not a constexpr): one variant serves
# post-norm and pre-norm layers; unspecialised so the value 1 compiles no variant of its own.

@triton.jit(do_not_specialize=["apply_layernorm"])
def _ffn_fwd_kernel(
    X_ptr,                      # (M, D), last stride 1
    W1_ptr,                     # (H, D), last stride 1
    B1_ptr,                     # (H,)
    W2_ptr,                     # (D, H), last stride 1
    B2_ptr,                     # (D,)
    Residual_ptr,               # (M, D), last stride 1
    LnW_ptr, LnB_ptr,           # (D,), (D,); read only if apply_layernorm
    Y_ptr,                      # (M, D) out, input dtype
    stride_x_m, stride_w1_h, stride_w2_d, stride_res_m, stride_y_m,
    num_rows, d_model, hidden,  # M, D, H
    eps,
    apply_layernorm,            # 0 / 1
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    # int64 only in the program's scalar row base; in-tile offsets stay int32 (the
    # launcher checks BLOCK_M * stride < 2**31), so loop-invariant address tensors cost
    # one register per element instead of two
    row_start = pid.to(tl.int64) * BLOCK_M
    x_base = X_ptr + row_start * stride_x_m
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_h = tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m < num_rows - row_start
    col_ok = offs_d < d_model

    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for h_start in range(0, hidden, BLOCK_H):
        hs = h_start + offs_h
        h_ok = hs < hidden
        # stage 1: pre = x W1[chunk]^T over D
        pre = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)
        for k_start in range(0, d_model, BLOCK_K):
            ks = k_start + offs_k
            k_ok = ks < d_model
            x = tl.load(x_base + offs_m[:, None] * stride_x_m + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            w1 = tl.load(W1_ptr + hs[:, None] * stride_w1_h + ks[None, :], mask=h_ok[:, None] & k_ok[None, :],
                         other=0.0)
            pre += _dot(x, tl.trans(w1), DOT_PRECISION, UPCAST_DOT)
        b1 = tl.load(B1_ptr + hs, mask=h_ok, other=0.0).to(tl.float32)
        # the reference's F.linear rounds x W1^T + b1 to the input dtype before its ReLU;
        # NaN propagates, as in torch.relu (a plain max.f32 on the GPU would return 0).
        # Masked hidden units are relu(0) = 0 and meet zeroed W2 columns.
        pre = (pre + b1[None, :]).to(X_ptr.dtype.element_ty).to(tl.float32)
        h = tl.maximum(pre, 0.0, propagate_nan=tl.PropagateNan.ALL).to(X_ptr.dtype.element_ty)
        # stage 2: acc += h W2[:, chunk]^T; the hidden chunk never leaves the chip
        w2 = tl.load(W2_ptr + offs_d[:, None] * stride_w2_d + hs[None, :], mask=col_ok[:, None] & h_ok[None, :],
                     other=0.0)
        acc += _dot(h, tl.trans(w2), DOT_PRECISION, UPCAST_DOT)

    # epilogue: + b2 + residual, LayerNorm over the valid columns (post-norm layers)
    mask = row_ok[:, None] & col_ok[None, :]
    b2 = tl.load(B2_ptr + offs_d, mask=col_ok, other=0.0).to(tl.float32)
    residual = tl.load(Residual_ptr + row_start * stride_res_m + offs_m[:, None] * stride_res_m + offs_d[None, :],
                       mask=mask, other=0.0)
    z = acc + b2[None, :] + residual.to(tl.float32)
    if apply_layernorm != 0:
        z, _, _, _ = _layernorm_rows(z, col_ok, d_model, eps, LnW_ptr, LnB_ptr, offs_d)
    tl.store(Y_ptr + row_start * stride_y_m + offs_m[:, None] * stride_y_m + offs_d[None, :],
             z.to(Y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------

def ffn_inference_forward(x, w1, b1, w2, b2, residual, ln_weight=None, ln_bias=None, eps=1e-5):
    """Launch the kernel.

    x, residual: (M, D); w1: (H, D); b1: (H,); w2: (D, H); b2: (D,); ln_weight,
    ln_bias: (D,) or both None (no LayerNorm); D <= 256; one dtype (fp32, fp16
    or bf16). Returns out (M, D) in x's dtype.
    """
    width = x.shape[-1]
    if width > MAX_FUSED_WIDTH:
        raise ValueError(f"ffn_inference_forward: D = {width} > {MAX_FUSED_WIDTH}; use the reference path")
    config = block_config(x.dtype, width)
    # int32 in-tile offsets: a row tile's (BLOCK_M rows) and a whole weight's under 2**31
    x, residual = (as_rows(t, width, max_row_offset=config["BLOCK_M"]) for t in (x, residual))
    w1, w2 = (as_rows(w, w.shape[1], max_row_offset=w.shape[0]) for w in (w1, w2))
    b1, b2 = b1.contiguous(), b2.contiguous()
    num_rows, hidden = x.shape[0], w1.shape[0]
    apply_layernorm = ln_weight is not None
    if apply_layernorm:
        ln_weight, ln_bias = ln_weight.contiguous(), ln_bias.contiguous()
    else:   # never read when apply_layernorm is 0
        ln_weight = ln_bias = b2
    out = torch.empty(num_rows, width, dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return out
    _ffn_fwd_kernel[(triton.cdiv(num_rows, config["BLOCK_M"]),)](
        x, w1, b1, w2, b2, residual, ln_weight, ln_bias, out,
        x.stride(0), w1.stride(0), w2.stride(0), residual.stride(0), out.stride(0),
        num_rows, width, hidden,
        float(eps), int(apply_layernorm),
        BLOCK_M=config["BLOCK_M"], BLOCK_D=config["BLOCK_D"], BLOCK_H=config["BLOCK_H"],
        BLOCK_K=config["BLOCK_K"], DOT_PRECISION=config["DOT_PRECISION"], UPCAST_DOT=_upcast_dot(x.dtype),
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return out


def aot_configs() -> list[KernelConfig]:
    """Every kernel variant the launcher can choose: 3 dtypes x BLOCK_D {64, 128, 256}.

    Strides and sizes are typed i32, as the launcher passes them for tensors under
    2**31 elements; UPCAST_DOT is an interpreter-only variant and left out.
    """
    configs = []
    for dtype, dtype_name in TRITON_DTYPE_NAMES.items():
        for block_d in _BLOCK_D_CHOICES:
            config = block_config(dtype, block_d)
            configs.append(KernelConfig(
                _ffn_fwd_kernel, aot_signature(_ffn_fwd_kernel, dtype_name, float_args=("eps",)),
                dict(BLOCK_M=config["BLOCK_M"], BLOCK_D=block_d, BLOCK_H=config["BLOCK_H"],
                     BLOCK_K=config["BLOCK_K"], DOT_PRECISION=config["DOT_PRECISION"], UPCAST_DOT=False),
                dict(num_warps=config["num_warps"], num_stages=config["num_stages"])))
    return configs


# The kernel as a torch.library custom op (`fastdetr::ffn_inference`), which torch.compile (fullgraph) and
# CUDA graphs hold as one node. Inference only: no autograd is registered (`ffn_inference` takes the reference
# when a gradient is needed).

@torch.library.custom_op("fastdetr::ffn_inference", mutates_args=())
def ffn_inference_op(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                     residual: torch.Tensor, ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None,
                     eps: float) -> torch.Tensor:
    """`ffn_inference_forward` on x's rows, shaped like x."""
    return ffn_inference_forward(x, w1, b1, w2, b2, residual, ln_weight, ln_bias, eps).view(x.shape)


@ffn_inference_op.register_fake
def _(x, w1, b1, w2, b2, residual, ln_weight, ln_bias, eps):
    return x.new_empty(x.shape)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------

def _needs_grad(tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def ffn_inference(x, w1, b1, w2, b2, residual, ln_weight=None, ln_bias=None, eps=1e-5):
    """residual + relu(x @ w1^T + b1) @ w2^T + b2, then LayerNorm over the last dimension if ln_weight is given.

    x: (..., D); w1: (H, D); b1: (H,); w2: (D, H); b2: (D,); residual: x's
    shape (x itself in post-norm layers, src when x = norm2(src) in pre-norm
    ones); ln_weight, ln_bias: (D,), or both None for no LayerNorm; all one
    dtype. Returns x's shape, in that dtype. Inference only: no dropout. A bad
    shape or dtype raises ValueError naming the argument (metadata only, no sync).

    Runs the Triton kernel when `fastdetr.backend.use_triton` says so, D <= 256
    and no gradient is needed; otherwise `ffn_inference_ref` (plain PyTorch).
    In particular an input that requires grad while grad is enabled takes the
    reference, whose autograd then works as usual: the kernel has no backward
    (the training path is `linear_relu_dropout` + `linear_residual_layernorm`).
    """
    tensors = (x, w1, b1, w2, b2, residual, ln_weight, ln_bias)
    _check_inputs(*tensors)
    if (x.dtype not in DTYPES or w1.shape[1] > MAX_FUSED_WIDTH or _needs_grad(tensors)
            or not use_triton(*tensors)):
        return ffn_inference_ref(x, w1, b1, w2, b2, residual, ln_weight, ln_bias, eps)
    return torch.ops.fastdetr.ffn_inference(x, w1, b1, w2, b2, residual, ln_weight, ln_bias, float(eps))


def ffn_inference_ref(x, w1, b1, w2, b2, residual, ln_weight=None, ln_bias=None, eps=1e-5):
    """Plain-PyTorch oracle and fallback: residual + linear2(relu(linear1(x))), then layer_norm if ln_weight.

    Math in the inputs' dtype; autograd works through it.
    """
    _check_inputs(x, w1, b1, w2, b2, residual, ln_weight, ln_bias)
    z = residual + F.linear(F.relu(F.linear(x, w1, b1)), w2, b2)
    if ln_weight is None:
        return z
    return F.layer_norm(z, (w1.shape[1],), ln_weight, ln_bias, eps)
