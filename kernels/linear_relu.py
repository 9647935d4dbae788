"""Linear + ReLU + dropout: DETR's FFN linear1 (d_model 256 -> 2048); and linear + row mask.

What is fused: h = dropout(relu(x @ W^T + b)). The reference is
`linear_relu_dropout_ref` at the bottom of this file: `F.linear`, `F.relu`,
`F.dropout` (three kernels, two extra HBM round trips of the (M, N) tensor and
a stored (M, N) dropout mask).

Forward (Triton, one kernel): a program owns a BLOCK_M x BLOCK_N tile of h, runs
the GEMM over K in BLOCK_K steps with fp32 accumulation (ieee dots for fp32
inputs), and in its epilogue adds the bias, applies ReLU and dropout (Philox,
counter = (column, row, 0, offset), key = seed, as in `linear_layernorm`; seed
and offset read from a (2,) int32 device tensor, `common.dropout_key`, no device
sync) and stores h in the input dtype.

Backward: one Triton elementwise kernel computes the gradient of the
pre-activation, d_pre = dh * scale where h > 0, else 0, and per-program fp32
partial column sums of it (the bias gradient, reduced with torch: deterministic,
no atomics). The saved output h holds both masks: a dropped element is exactly
0, and a kept one is relu(pre) * scale with scale >= 1, positive exactly where
pre > 0 -- so h > 0 is (ReLU mask AND dropout keep mask), and the Philox draws
need not even be regenerated. (A positive pre-activation too small for the
output dtype stores h = 0 and gets no gradient; the reference rounds the
pre-activation to that dtype before its ReLU, so it does the same.) Triton
here because one pass reads dh and h and writes d_pre and the bias sums; torch
would take a comparison, a multiply and a separate reduction. The GEMM
gradients dx = d_pre @ W and dW = d_pre^T @ x are torch matmuls (cuBLAS on a
GPU): plain GEMMs with nothing to fuse in their epilogues.

Saved for backward: x (M*K), W (N*K) and h (M*N, the output, so no extra
bytes) -- less than the reference's autograd, which keeps x, W, relu's output
and an (M, N) dropout mask. The pre-activation is never stored.

The same forward kernel, with the ReLU and dropout left out and a row mask in its
epilogue, is `linear_masked_rows`: multi-scale deformable attention's value
projection with the padding-mask fill (`value_proj(x).masked_fill(mask, 0)`),
one GEMM where the reference writes the projection and then its filled copy.

Limits: x, weight and bias share one dtype in `DTYPES` (fp32, fp16 or bf16;
others run `linear_relu_dropout_ref`), bias is a tensor (not None), M < 2**31.
Any N and K (both masked). fp32 dots run in true fp32 ("ieee", not tf32), for
the 1e-5 tolerance. The dropout mask differs from torch's (another RNG), with
the same keep rate. Block sizes were picked for no register spills on sm_80 /
sm_90 (`aot_configs()`), not tuned on a GPU.
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
    _gemm_dropout_keep,
    _upcast_dot,
    aot_signature,
    as_rows,
    dropout_key,
    launch_key,
    unit_last_stride,
    unused_dropout_key,
)

# limits (module docstring)
DTYPES = tuple(TRITON_DTYPE_NAMES)


def _check_inputs(x, weight, bias, dropout_p, name="linear_relu_dropout") -> None:
    """Shape, dtype and range checks that read metadata only."""
    if bias is None:
        raise ValueError(f"{name}: bias must be a tensor, not None")
    if weight.dim() != 2:
        raise ValueError(f"{name}: weight must be (N, K); got {tuple(weight.shape)}")
    width, inner = weight.shape
    if x.dim() < 1 or x.shape[-1] != inner:
        raise ValueError(f"{name}: x (..., K={inner}) expected; got {tuple(x.shape)}")
    if tuple(bias.shape) != (width,):
        raise ValueError(f"{name}: bias must be ({width},); got {tuple(bias.shape)}")
    dtypes = {t.dtype for t in (x, weight, bias)}
    if len(dtypes) != 1:
        raise ValueError(f"{name}: x, weight and bias must share a dtype; got {sorted(map(str, dtypes))}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name}: inputs must be floating point; got {x.dtype}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{name}: dropout_p must be in [0, 1); got {dropout_p}")


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _configs() -> dict:
    """Launch configs by (kernel, dtype family); all compiled ahead of time in CI.

    The forward keeps a BLOCK_M x BLOCK_N fp32 accumulator live and, in its
    epilogue, one Philox draw per element; fp32 tiles are twice the bytes and
    their ieee dots use no tensor cores, so they are smaller. The backward is
    elementwise plus column sums.
    """
    return {
        ("fwd", "16bit"): dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3,
                               DOT_PRECISION="tf32"),   # ignored by fp16/bf16 dots
        # 8 warps: at 4, the unaligned variant spills on sm_80 under Triton 3.8 / 3.9
        ("fwd", "fp32"): dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=2,
                              DOT_PRECISION="ieee"),
        # 4 warps: at 8, the 16-bit kernel with aligned (DETR-shaped) arguments keeps a 16-byte stack on sm_90;
        # 16 rows: at 32, the fp16 one keeps a 40-byte stack there under Triton 3.9
        ("bwd", "16bit"): dict(BLOCK_M=16, BLOCK_N=128, num_warps=4, num_stages=1),
        ("bwd", "fp32"): dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=1),
    }


def block_config(kernel: str, dtype: torch.dtype) -> dict:
    """Launch config of `kernel` ("fwd" or "bwd") for inputs of `dtype`."""
    return dict(_configs()[(kernel, "fp32" if dtype == torch.float32 else "16bit")])


# dropout_p is a runtime argument (not a constexpr): one variant serves training
# and inference; the dropout key is read from memory (a tensor), never specialised.

@triton.jit
def _linear_relu_fwd_kernel(
    X_ptr,                      # (M, K), last stride 1
    W_ptr,                      # (N, K), last stride 1
    Bias_ptr,                   # (N,)
    H_ptr,                      # (M, N) out, input dtype
    RowMask_ptr,                # (M,) uint8, nonzero where the row is zeroed (ROW_MASK only)
    stride_x_m, stride_w_n, stride_h_m,
    num_rows, num_cols, inner_dim,   # M, N, K
    dropout_p, DropoutKey_ptr,     # dropout on relu(x W^T + b), off when dropout_p == 0
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    RELU: tl.constexpr = True, ROW_MASK: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m < num_rows
    col_ok = offs_n < num_cols
    rows = offs_m.to(tl.int64)[:, None]
    cols = offs_n.to(tl.int64)

    # main loop: acc = x W^T over K
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k_start in range(0, inner_dim, BLOCK_K):
        ks = k_start + offs_k
        k_ok = ks < inner_dim
        x = tl.load(X_ptr + rows * stride_x_m + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W_ptr + cols[:, None] * stride_w_n + ks[None, :], mask=col_ok[:, None] & k_ok[None, :],
                    other=0.0)
        acc += _dot(x, tl.trans(w), DOT_PRECISION, UPCAST_DOT)

    # epilogue: + bias, ReLU, dropout (linear1); or + bias and the masked rows zeroed (the value projection)
    bias = tl.load(Bias_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)
    h = acc + bias[None, :]
    if RELU:
        # NaN propagates, as in torch.relu (a plain max.f32 on the GPU would return 0)
        h = tl.maximum(h, 0.0, propagate_nan=tl.PropagateNan.ALL)
    if ROW_MASK:
        # masked_fill: a masked row is 0 whatever the GEMM gave (NaN and inf included)
        zeroed = tl.load(RowMask_ptr + offs_m, mask=row_ok, other=0)
        h = tl.where(zeroed[:, None] != 0, 0.0, h)
    if dropout_p > 0.0:
        row_ids = offs_m[:, None] + tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
        col_ids = offs_n[None, :] + tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
        keep = _gemm_dropout_keep(tl.load(DropoutKey_ptr), tl.load(DropoutKey_ptr + 1), row_ids, col_ids, dropout_p)
        h = tl.where(keep, h * (1.0 / (1.0 - dropout_p)), 0.0)
    mask = row_ok[:, None] & col_ok[None, :]
    tl.store(H_ptr + rows * stride_h_m + cols[None, :], h.to(H_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _linear_relu_bwd_kernel(
    dH_ptr,                     # (M, N), last stride 1
    H_ptr,                      # (M, N) forward output, last stride 1
    dPre_ptr,                   # (M, N) out, input dtype: gradient of x W^T + b
    dBias_partial_ptr,          # (num_row_programs, N) fp32 out
    stride_dh_m, stride_h_m, stride_dpre_m,
    num_rows, num_cols,         # M, N
    dropout_p,                  # as in forward
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < num_rows
    col_ok = offs_n < num_cols
    mask = row_ok[:, None] & col_ok[None, :]
    rows = offs_m.to(tl.int64)[:, None]

    dh = tl.load(dH_ptr + rows * stride_dh_m + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    h = tl.load(H_ptr + rows * stride_h_m + offs_n[None, :], mask=mask, other=0.0)
    # h > 0 is the ReLU mask AND the dropout keep mask (see the module docstring)
    d_pre = tl.where(h > 0, dh * (1.0 / (1.0 - dropout_p)), 0.0)
    tl.store(dPre_ptr + rows * stride_dpre_m + offs_n[None, :], d_pre.to(dPre_ptr.dtype.element_ty), mask=mask)
    # this program's share of the bias gradient (summed over row programs by torch)
    partial = pid_m.to(tl.int64) * num_cols + offs_n
    tl.store(dBias_partial_ptr + partial, tl.sum(d_pre, 0), mask=col_ok)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def linear_relu_forward(x, weight, bias, dropout_p=0.0, seed=0, rng_offset=0, relu=True, row_mask=None,
                        dropout_key=None):
    """Launch the forward kernel.

    x: (M, K), weight: (N, K), bias: (N,), one dtype; seed, rng_offset: ints in
    [0, 2**31) keying the dropout RNG (kept values scaled by 1 / (1 - dropout_p)).
    relu=False leaves the ReLU out; row_mask (M,) bool zeroes the rows where it
    is True (after everything else). Returns h (M, N) in x's dtype.
    """
    x = as_rows(x, x.shape[-1])
    weight = unit_last_stride(weight)
    bias = bias.contiguous()
    num_rows, inner = x.shape
    width = weight.shape[0]
    config = block_config("fwd", x.dtype)
    h = torch.empty(num_rows, width, dtype=x.dtype, device=x.device)
    if num_rows == 0 or width == 0:
        return h
    grid = (triton.cdiv(num_rows, config["BLOCK_M"]), triton.cdiv(width, config["BLOCK_N"]))
    zeroed = h if row_mask is None else row_mask.reshape(num_rows).contiguous().view(torch.uint8)
    key = launch_key(dropout_key, seed, rng_offset, x.device)
    _linear_relu_fwd_kernel[grid](
        x, weight, bias, h, zeroed,
        x.stride(0), weight.stride(0), h.stride(0),
        num_rows, width, inner,
        float(dropout_p), key,
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
        DOT_PRECISION=config["DOT_PRECISION"], UPCAST_DOT=_upcast_dot(x.dtype),
        RELU=relu, ROW_MASK=row_mask is not None,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return h


def linear_relu_backward(grad_h, x, weight, h, dropout_p=0.0):
    """ReLU + dropout backward in Triton, then the GEMM gradients with torch matmuls.

    grad_h, h: (M, N); x: (M, K); weight: (N, K); dropout_p as in forward (the
    masks are read off h, never stored). Returns (dx (M, K), dweight (N, K),
    dbias (N,)), all in x's dtype.
    """
    d_pre, dbias = torch.ops.fastdetr.relu_dropout_bwd(as_rows(grad_h, grad_h.shape[-1]), h, float(dropout_p))
    dx = d_pre @ weight
    dweight = d_pre.t() @ x
    return dx, dweight, dbias.to(x.dtype)


# The kernels as torch.library custom ops (`fastdetr::linear_relu_fwd`, with its autograd registered, and
# `fastdetr::relu_dropout_bwd`), which torch.compile (fullgraph) and CUDA graphs hold as single nodes.

@torch.library.custom_op("fastdetr::relu_dropout_bwd", mutates_args=())
def relu_dropout_bwd_op(grad_h: torch.Tensor, h: torch.Tensor, dropout_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The row kernel of `linear_relu_backward`: (d_pre (M, N), dbias (N,) fp32), masks read off h."""
    num_rows, width = h.shape
    config = block_config("bwd", h.dtype)
    row_programs = triton.cdiv(num_rows, config["BLOCK_M"])
    d_pre = torch.empty_like(h)
    partials = torch.zeros(row_programs, width, dtype=torch.float32, device=h.device)
    if num_rows > 0 and width > 0:
        _linear_relu_bwd_kernel[(row_programs, triton.cdiv(width, config["BLOCK_N"]))](
            grad_h, h, d_pre, partials,
            grad_h.stride(0), h.stride(0), d_pre.stride(0),
            num_rows, width,
            float(dropout_p),
            BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
            num_warps=config["num_warps"], num_stages=config["num_stages"],
        )
    return d_pre, partials.sum(dim=0)


@relu_dropout_bwd_op.register_fake
def _(grad_h, h, dropout_p):
    return torch.empty_like(h), h.new_empty((h.shape[1],), dtype=torch.float32)


@torch.library.custom_op("fastdetr::linear_relu_fwd", mutates_args=())
def linear_relu_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dropout_p: float,
                       dropout_key: torch.Tensor, relu: bool, row_mask: torch.Tensor | None) -> torch.Tensor:
    """`linear_relu_forward` on x's rows, shaped (..., N)."""
    h = linear_relu_forward(x, weight, bias, dropout_p, relu=relu, row_mask=row_mask, dropout_key=dropout_key)
    return h.view(*x.shape[:-1], weight.shape[0])


@linear_relu_fwd_op.register_fake
def _(x, weight, bias, dropout_p, dropout_key, relu, row_mask):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _linear_relu_setup_context(ctx, inputs, output):
    x, weight, bias, dropout_p, key, relu, row_mask = inputs
    # ReLU + dropout: the masks are read off the output; masked rows: the mask zeroes the gradient's rows
    ctx.save_for_backward(x, weight, output if relu else row_mask)
    ctx.dropout_p, ctx.relu = dropout_p, relu


def _linear_relu_backward(ctx, grad_h):
    x, weight, saved = ctx.saved_tensors
    rows = as_rows(x, x.shape[-1])
    if ctx.relu:
        dx, dweight, dbias = linear_relu_backward(grad_h, rows, weight, as_rows(saved, weight.shape[0]),
                                                  ctx.dropout_p)
    else:   # a zeroed row passes no gradient; the rest is a plain linear's backward (cuBLAS GEMMs on a GPU)
        grad = as_rows(grad_h, grad_h.shape[-1]).masked_fill(saved.reshape(-1, 1), 0.0)
        dx, dweight, dbias = grad @ weight, grad.t() @ rows, grad.sum(0)
    return dx.view(x.shape), dweight, dbias, None, None, None, None


torch.library.register_autograd("fastdetr::linear_relu_fwd", _linear_relu_backward,
                                setup_context=_linear_relu_setup_context)


_POINTER_TYPES = {"dBias_partial_ptr": "*fp32", "RowMask_ptr": "*u8"}


def aot_configs() -> list[KernelConfig]:
    """Every kernel variant the launchers can choose: the forward twice (linear1's ReLU and dropout, the value
    projection's row mask) and the backward, x 3 dtypes.

    Strides and sizes are typed i32, as the launchers pass them for tensors under
    2**31 elements; UPCAST_DOT is an interpreter-only variant and left out.
    """
    configs = []
    for dtype, dtype_name in TRITON_DTYPE_NAMES.items():
        fwd = block_config("fwd", dtype)
        for relu, row_mask in ((True, False), (False, True)):   # linear1; the masked value projection
            configs.append(KernelConfig(
                _linear_relu_fwd_kernel,
                aot_signature(_linear_relu_fwd_kernel, dtype_name, _POINTER_TYPES, ("dropout_p",)),
                dict(BLOCK_M=fwd["BLOCK_M"], BLOCK_N=fwd["BLOCK_N"], BLOCK_K=fwd["BLOCK_K"],
                     DOT_PRECISION=fwd["DOT_PRECISION"], UPCAST_DOT=False, RELU=relu, ROW_MASK=row_mask),
                dict(num_warps=fwd["num_warps"], num_stages=fwd["num_stages"])))
        bwd = block_config("bwd", dtype)
        configs.append(KernelConfig(
            _linear_relu_bwd_kernel, aot_signature(_linear_relu_bwd_kernel, dtype_name, _POINTER_TYPES, ("dropout_p",)),
            dict(BLOCK_M=bwd["BLOCK_M"], BLOCK_N=bwd["BLOCK_N"]),
            dict(num_warps=bwd["num_warps"], num_stages=bwd["num_stages"])))
    return configs


# ---------------------------------------------------------------------------------------------
# Entry points (differentiable through the ops' registered autograd)
# ---------------------------------------------------------------------------------------------

def linear_relu_dropout(x, weight, bias, dropout_p=0.0):
    """dropout(relu(x @ weight^T + bias)).

    x: (..., K); weight: (N, K); bias: (N,); one dtype (fp32, fp16 or bf16).
    Returns (..., N) in that dtype. Runs the Triton kernels when
    `fastdetr.backend.use_triton` says so; otherwise `linear_relu_dropout_ref`
    (plain PyTorch). dropout_p: probability of zeroing an element (kept ones
    scaled by 1 / (1 - dropout_p)), always applied (the caller passes 0.0 in
    eval mode); the Triton path draws its key on the device (`common.dropout_key`).
    """
    _check_inputs(x, weight, bias, dropout_p)
    if x.dtype not in DTYPES or not use_triton(x, weight, bias):   # fp64: the reference
        return linear_relu_dropout_ref(x, weight, bias, dropout_p)
    key = dropout_key(x.device) if dropout_p > 0.0 else unused_dropout_key(x.device)
    return torch.ops.fastdetr.linear_relu_fwd(x, weight, bias, float(dropout_p), key, True, None)


def linear_masked_rows(x, weight, bias, row_mask):
    """x @ weight^T + bias with the rows where row_mask is True set to 0, as one GEMM with a masked epilogue.

    Multi-scale deformable attention's value projection with its padding mask
    (`value_proj(x).masked_fill(mask[..., None], 0)`): x (..., K), weight (N, K),
    bias (N,), one dtype; row_mask bool of x's leading shape (...). Returns (..., N).
    The Triton kernel where `use_triton` says so, else `linear_masked_rows_ref`.
    Saved for backward: x, weight and the mask (no output, no pre-activation).
    """
    _check_inputs(x, weight, bias, 0.0, "linear_masked_rows")
    if row_mask.dtype != torch.bool or tuple(row_mask.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"linear_masked_rows: row_mask must be bool {tuple(x.shape[:-1])} (x's rows); "
                         f"got {row_mask.dtype} {tuple(row_mask.shape)}")
    if x.dtype not in DTYPES or not use_triton(x, weight, bias, row_mask):
        return linear_masked_rows_ref(x, weight, bias, row_mask)
    return torch.ops.fastdetr.linear_relu_fwd(x, weight, bias, 0.0, unused_dropout_key(x.device), False, row_mask)


def linear_masked_rows_ref(x, weight, bias, row_mask):
    """Plain-PyTorch oracle and fallback of `linear_masked_rows`."""
    return F.linear(x, weight, bias).masked_fill(row_mask[..., None], 0.0)


def linear_relu_dropout_ref(x, weight, bias, dropout_p=0.0):
    """Plain-PyTorch oracle and fallback: dropout(relu(linear(x))), math in the inputs' dtype."""
    _check_inputs(x, weight, bias, dropout_p)
    out = F.relu(F.linear(x, weight, bias))
    if dropout_p > 0.0:
        out = F.dropout(out, dropout_p, training=True)
    return out
