"""Linear + residual + LayerNorm: DETR's post-norm epilogue for out_proj and linear2.

What is fused: y = LayerNorm(residual + dropout(x @ W^T + b)) over the last
dimension (d_model = N), with LayerNorm's weight, bias and eps. The reference is
`linear_residual_layernorm_ref` at the bottom of this file: `F.linear`, an add,
`F.layer_norm`, i.e. what a post-norm `nn.TransformerEncoderLayer` does after
its attention or FFN (3-4 kernels and three HBM round trips of an (M, N) tensor).

Forward (Triton, one kernel): a program owns BLOCK_M rows and the whole row
width N (padded to a power of two >= 64, masked), runs the GEMM over K in
BLOCK_K steps with fp32 accumulation, and in its epilogue adds the bias, applies
dropout (Philox, counter = (column, row, 0, offset), key = seed; seed and offset read from
a (2,) int32 device tensor, `common.dropout_key`, no device sync), adds the
residual, computes each row's mean and rstd in fp32, normalises, applies the
LayerNorm affine (`_layernorm_rows`, shared with `ffn`) and stores y in the
input dtype, plus the per-row mean and rstd (fp32) and, only when a gradient is
needed, the pre-norm sum z (input dtype).
Without dropout the 16-bit LayerNorm variant instead starts its accumulator at
residual + bias, before the GEMM: its epilogue then holds one tile less.

Backward: one Triton kernel for the LayerNorm backward (dz from dy, z, mean,
rstd, gamma: row reductions that need the whole row, which a program owns) and
the dropout backward (the same Philox draws regenerate the mask), which also
writes per-program fp32 partial sums of dgamma, dbeta and d(linear bias),
reduced with torch (deterministic, no atomics). The two GEMM gradients,
dx = dlin @ W and dW = dlin^T @ x (dlin = dz through dropout), are torch
matmuls (cuBLAS on a GPU): plain GEMMs with nothing to fuse in their epilogues,
and dW reduces over the rows, which no row-owning program can do without atomics. d(residual) is dz itself.

Saved for backward: x (M*K), W (N*K), z (M*N), mean and rstd (2*M fp32) and the
LayerNorm weight -- the same tensors the reference's autograd keeps (F.linear
saves x and W, F.layer_norm its input z, mean and rstd), so no extra bytes; in
inference (no grad needed) z is not even written. (Saving y instead of z and
recovering xhat = (y - beta) / gamma would spare the z write but divides by
gamma, which training may drive to zero.) The dropout mask is regenerated, not
saved: the reference also keeps an (M, N) mask. With dropout on, backward
allocates one more (M, N) temporary (dlin) besides dz.

Limits, as constants other modules import: N <= `MAX_FUSED_WIDTH` (256,
DETR's d_model; wider rows and dtypes outside `DTYPES` run the `*_ref`
functions, plain PyTorch, with autograd through torch); x, weight, bias,
residual and the LayerNorm parameters share one dtype in `DTYPES` (fp32, fp16
or bf16), and bias, ln_weight and ln_bias are tensors (not None); M < 2**31.
fp32 dots run in true fp32 ("ieee", not tf32), for the 1e-5 tolerance. The
dropout mask differs from torch's (another RNG), with the same keep rate. Block
sizes were picked for no register spills on sm_80 / sm_90 (`aot_configs()`),
not tuned on a GPU.
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
    _layernorm_rows,
    _upcast_dot,
    aot_signature,
    as_rows,
    dropout_key,
    launch_key,
    unit_last_stride,
    unused_dropout_key,
)

# limits (module docstring)
MAX_FUSED_WIDTH = 256
DTYPES = tuple(TRITON_DTYPE_NAMES)
_BLOCK_N_CHOICES = (64, 128, 256)


def _check_inputs(x, weight, bias, residual, ln_weight, ln_bias, dropout_p, norm=True,
                  op="linear_residual_layernorm") -> None:
    """Shape, dtype and range checks that read metadata only; `norm`: ln_weight and ln_bias are required."""
    params = (("bias", bias), ("ln_weight", ln_weight), ("ln_bias", ln_bias)) if norm else (("bias", bias),)
    for name, tensor in params:
        if tensor is None:
            raise ValueError(f"{op}: {name} must be a tensor, not None")
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be (N, K); got {tuple(weight.shape)}")
    width, inner = weight.shape
    if x.dim() < 1 or x.shape[-1] != inner:
        raise ValueError(f"{op}: x (..., K={inner}) expected; got {tuple(x.shape)}")
    if tuple(residual.shape) != (*x.shape[:-1], width):
        raise ValueError(f"{op}: residual must be {(*x.shape[:-1], width)}; got {tuple(residual.shape)}")
    for name, tensor in params:
        if tuple(tensor.shape) != (width,):
            raise ValueError(f"{op}: {name} must be ({width},); got {tuple(tensor.shape)}")
    dtypes = {t.dtype for t in (x, weight, residual, *(tensor for _, tensor in params))}
    if len(dtypes) != 1:
        raise ValueError(f"{op}: all inputs must share a dtype; got {sorted(map(str, dtypes))}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1); got {dropout_p}")


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _configs() -> dict:
    """Launch configs by kernel, dtype family, BLOCK_N (and, forward, LayerNorm on, dropout on).

    All are compiled ahead of time in CI. BLOCK_N is the row width N padded to a
    power of two (at least 64: narrower rows are masked). The forward keeps a
    BLOCK_M x BLOCK_N fp32 accumulator and a BLOCK_N x BLOCK_K tile of W live;
    fp32 tiles are twice the bytes and their ieee dots use no tensor cores, so
    they are smaller. 16-bit: the post-norm forward without dropout (inference,
    eval) takes BLOCK_M = 64 at 8 warps, which sm_90 runs as wgmma; with the
    dropout RNG, or without the LayerNorm (the layout of a bare residual store
    costs more registers), BLOCK_M = 64 spills, so those take BLOCK_M = 16-32 and
    mma.sync (the AOT report lists them; checked with Triton 3.6, 3.8 and 3.9,
    `make report-triton-latest`, where BLOCK_N = 256 at BLOCK_M = 64 still spills
    without alignment on sm_90). The backward kernel is elementwise plus row sums.
    """
    configs = {}
    for block_n in _BLOCK_N_CHOICES:
        warps = 4 if block_n <= 128 else 8
        for apply_norm in (True, False):
            for dropout in (False, True):
                key = (block_n, apply_norm, dropout)
                if apply_norm and not dropout:
                    configs[("fwd", "16bit", *key)] = dict(BLOCK_M=64, BLOCK_K=32, num_warps=8, num_stages=2,
                                                           DOT_PRECISION="tf32")   # ignored by 16-bit dots
                else:
                    # 8 warps from BLOCK_N = 128 on, 16 rows for LayerNorm + dropout at 256: at 4 warps / 32 rows
                    # those spill without alignment on sm_90 under Triton 3.9
                    configs[("fwd", "16bit", *key)] = dict(BLOCK_M=16 if block_n == 256 and apply_norm else 32,
                                                           BLOCK_K=32, num_warps=4 if block_n == 64 else 8,
                                                           num_stages=2, DOT_PRECISION="tf32")
                configs[("fwd", "fp32", *key)] = dict(BLOCK_M=16, BLOCK_K=16, num_warps=warps, num_stages=2,
                                                      DOT_PRECISION="ieee")
        for family in ("16bit", "fp32"):
            configs[("bwd", family, block_n)] = dict(BLOCK_M=16, num_warps=warps, num_stages=1)
    return configs


def _block_n(width: int) -> int:
    return max(_BLOCK_N_CHOICES[0], triton.next_power_of_2(width))


def block_config(kernel: str, dtype: torch.dtype, width: int, apply_norm: bool = True, dropout: bool = False) -> dict:
    """Launch config of `kernel` ("fwd" or "bwd") for inputs of `dtype` and row width N = `width` (<= 256);
    `apply_norm` and `dropout` pick the forward's variant."""
    block_n = _block_n(width)
    family = "fp32" if dtype == torch.float32 else "16bit"
    key = ("fwd", family, block_n, apply_norm, dropout) if kernel == "fwd" else (kernel, family, block_n)
    return dict(_configs()[key], BLOCK_N=block_n, APPLY_NORM=apply_norm, DROPOUT=dropout)


# The forward's LayerNorm and dropout are constexpr variants: the 16-bit forward runs out of registers
# (spills) at BLOCK_M = 64 -- what wgmma needs -- when one variant carries the RNG or the LayerNorm it
# does not use. `store_preln`, and the backward's `apply_norm` and `has_dz_in`, are runtime arguments
# (uniform branches per launch), unspecialised so the value 1 compiles no variant of its own.

@triton.jit(do_not_specialize=["store_preln"])
def _linear_layernorm_fwd_kernel(
    X_ptr,                      # (M, K), last stride 1
    W_ptr,                      # (N, K), last stride 1
    Bias_ptr,                   # (N,)
    Residual_ptr,               # (M, N), last stride 1
    LnW_ptr, LnB_ptr,           # (N,), (N,)
    Y_ptr,                      # (M, N) out, input dtype: LayerNorm(z) (if APPLY_NORM)
    PreLN_ptr,                  # (M, N) out, input dtype: z = residual + x W^T + b (if store_preln)
    Mean_ptr, Rstd_ptr,         # (M,), (M,) fp32 out (if APPLY_NORM)
    stride_x_m, stride_w_n, stride_res_m, stride_y_m, stride_z_m,
    num_rows, num_cols, inner_dim,   # M, N, K
    eps,
    store_preln,                # 0 / 1 (1 when not APPLY_NORM)
    dropout_p, DropoutKey_ptr,   # dropout on (x W^T + b), used when DROPOUT
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    APPLY_NORM: tl.constexpr,   # False: pre-norm's plain residual add (z only)
    DROPOUT: tl.constexpr,      # dropout_p > 0
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m < num_rows
    col_ok = offs_n < num_cols
    rows = offs_m.to(tl.int64)[:, None]
    cols = offs_n.to(tl.int64)

    # 16-bit LayerNorm without dropout (BLOCK_M = 64, wgmma): the accumulator starts at residual + bias, so
    # the epilogue holds no residual tile. Otherwise the unaligned variant spilled at BLOCK_N = 256 under
    # Triton 3.8 and at 128-256 under 3.9 (sm_90 at 256 still spills under 3.9); fp32 tiles take more
    # registers this way.
    residual_first = (APPLY_NORM and not DROPOUT) and X_ptr.dtype.element_ty != tl.float32
    if residual_first:
        residual = tl.load(Residual_ptr + rows * stride_res_m + cols[None, :],
                           mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        bias = tl.load(Bias_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)
        acc = residual.to(tl.float32) + bias[None, :]
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    # main loop: acc += x W^T over K
    for k_start in range(0, inner_dim, BLOCK_K):
        ks = k_start + offs_k
        k_ok = ks < inner_dim
        x = tl.load(X_ptr + rows * stride_x_m + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W_ptr + cols[:, None] * stride_w_n + ks[None, :], mask=col_ok[:, None] & k_ok[None, :],
                    other=0.0)
        acc += _dot(x, tl.trans(w), DOT_PRECISION, UPCAST_DOT)

    # epilogue: + bias, dropout, + residual, then (post-norm, or pre-norm's next norm) LayerNorm
    mask = row_ok[:, None] & col_ok[None, :]
    if residual_first:
        z = acc
    else:
        bias = tl.load(Bias_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
        if DROPOUT:
            row_ids = offs_m[:, None] + tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
            col_ids = offs_n[None, :] + tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
            keep = _gemm_dropout_keep(tl.load(DropoutKey_ptr), tl.load(DropoutKey_ptr + 1), row_ids, col_ids, dropout_p)
            acc = tl.where(keep, acc * (1.0 / (1.0 - dropout_p)), 0.0)
        residual = tl.load(Residual_ptr + rows * stride_res_m + cols[None, :], mask=mask, other=0.0)
        z = acc + residual.to(tl.float32)
    if APPLY_NORM:
        # LayerNorm over the valid columns, statistics in fp32; z comes back with its padded columns zeroed
        y, mean, rstd, z = _layernorm_rows(z, col_ok, num_cols, eps, LnW_ptr, LnB_ptr, offs_n)
        tl.store(Y_ptr + rows * stride_y_m + cols[None, :], y.to(Y_ptr.dtype.element_ty), mask=mask)
        tl.store(Mean_ptr + offs_m, mean, mask=row_ok)
        tl.store(Rstd_ptr + offs_m, rstd, mask=row_ok)
    if store_preln != 0:
        tl.store(PreLN_ptr + rows * stride_z_m + cols[None, :], z.to(PreLN_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["apply_norm", "has_dz_in"])
def _layernorm_bwd_kernel(
    dY_ptr,                     # (M, N), last stride 1: gradient of y (read if apply_norm)
    PreLN_ptr,                  # (M, N) z from forward, last stride 1 (read if apply_norm)
    LnW_ptr,                    # (N,)
    Mean_ptr, Rstd_ptr,         # (M,), (M,) fp32
    dZin_ptr,                   # (M, N), last stride 1: gradient reaching z directly (read if has_dz_in)
    dZ_ptr,                     # (M, N) out, input dtype: gradient of z (= of the residual), written if apply_norm
    dLin_ptr,                   # (M, N) out, input dtype: gradient of x W^T + b (written if dropout_p > 0)
    dLnW_partial_ptr, dLnB_partial_ptr, dBias_partial_ptr,   # (num_programs, N) fp32 out
    stride_dy_m, stride_z_m, stride_dzin_m, stride_dz_m, stride_dlin_m,
    num_rows, num_cols,         # M, N
    apply_norm, has_dz_in,      # 0 / 1 each; at least one is 1
    dropout_p, DropoutKey_ptr,   # as in forward
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = offs_m < num_rows
    col_ok = offs_n < num_cols
    mask = row_ok[:, None] & col_ok[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    partial = pid.to(tl.int64) * num_cols + offs_n

    dz = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if apply_norm != 0:
        dy = tl.load(dY_ptr + rows * stride_dy_m + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        z = tl.load(PreLN_ptr + rows * stride_z_m + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean_ptr + offs_m, mask=row_ok, other=0.0)
        rstd = tl.load(Rstd_ptr + offs_m, mask=row_ok, other=0.0)
        ln_w = tl.load(LnW_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)
        # dz = rstd * (g dy - mean(g dy) - xhat * mean(g dy xhat)), means over the valid columns
        xhat = tl.where(mask, (z - mean[:, None]) * rstd[:, None], 0.0)
        w_dy = tl.where(mask, ln_w[None, :] * dy, 0.0)
        c_xhat = tl.sum(w_dy * xhat, 1) / num_cols
        c_mean = tl.sum(w_dy, 1) / num_cols
        dz = tl.where(mask, (w_dy - xhat * c_xhat[:, None] - c_mean[:, None]) * rstd[:, None], 0.0)
        tl.store(dLnW_partial_ptr + partial, tl.sum(dy * xhat, 0), mask=col_ok)
        tl.store(dLnB_partial_ptr + partial, tl.sum(dy, 0), mask=col_ok)
    if has_dz_in != 0:
        dz += tl.load(dZin_ptr + rows * stride_dzin_m + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    if apply_norm != 0:   # without a norm, dz is dz_in itself: the caller has it
        tl.store(dZ_ptr + rows * stride_dz_m + offs_n[None, :], dz.to(dZ_ptr.dtype.element_ty), mask=mask)
    # through dropout: the same Philox draw as forward for each (row, column)
    d_lin = dz
    if dropout_p > 0.0:
        row_ids = offs_m[:, None] + tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
        col_ids = offs_n[None, :] + tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
        keep = _gemm_dropout_keep(tl.load(DropoutKey_ptr), tl.load(DropoutKey_ptr + 1), row_ids, col_ids, dropout_p)
        d_lin = tl.where(keep, dz * (1.0 / (1.0 - dropout_p)), 0.0)
        tl.store(dLin_ptr + rows * stride_dlin_m + offs_n[None, :], d_lin.to(dLin_ptr.dtype.element_ty),
                 mask=mask)
    # this program's share of the bias gradient (summed over programs by torch)
    tl.store(dBias_partial_ptr + partial, tl.sum(d_lin, 0), mask=col_ok)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def linear_layernorm_forward(x, weight, bias, residual, ln_weight, ln_bias, eps=1e-5, store_preln=True,
                             dropout_p=0.0, seed=0, rng_offset=0, apply_norm=True, dropout_key=None):
    """Launch the forward kernel.

    x: (M, K), weight: (N, K), residual: (M, N), bias / ln_weight / ln_bias: (N,),
    N <= 256, one dtype; seed, rng_offset: ints in [0, 2**31) keying the dropout (or dropout_key, their (2,)
    int32 device tensor, which wins)
    RNG (kept values scaled by 1 / (1 - dropout_p)). Returns (y (M, N) in x's
    dtype, z (M, N) pre-norm sum, mean (M,) fp32, rstd (M,) fp32); z is None
    unless store_preln; y, mean and rstd are None unless apply_norm (then the
    LayerNorm arguments may be None too).
    """
    if not (apply_norm or store_preln):
        raise ValueError("linear_layernorm_forward: nothing to compute (apply_norm and store_preln both off)")
    x, residual = as_rows(x, x.shape[-1]), as_rows(residual, residual.shape[-1])
    weight = unit_last_stride(weight)
    bias = bias.contiguous()
    if apply_norm:
        ln_weight, ln_bias = ln_weight.contiguous(), ln_bias.contiguous()
    num_rows, inner = x.shape
    width = weight.shape[0]
    if width > MAX_FUSED_WIDTH:
        raise ValueError(f"linear_layernorm_forward: N = {width} > {MAX_FUSED_WIDTH}; use the reference path")
    config = block_config("fwd", x.dtype, width, apply_norm=bool(apply_norm), dropout=dropout_p > 0.0)
    z = torch.empty(num_rows, width, dtype=x.dtype, device=x.device) if store_preln else None
    y = mean = rstd = None
    if apply_norm:
        y = torch.empty(num_rows, width, dtype=x.dtype, device=x.device)
        mean = torch.empty(num_rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
    if num_rows == 0:
        return y, z, mean, rstd
    # arguments a launch does not touch point at a tensor it does (never written or read)
    y_arg = y if y is not None else z
    z_arg = z if z is not None else y
    stats = (mean, rstd) if apply_norm else (torch.empty(0, dtype=torch.float32, device=x.device),) * 2
    norm_params = (ln_weight, ln_bias) if apply_norm else (bias, bias)
    key = launch_key(dropout_key, seed, rng_offset, x.device)
    _linear_layernorm_fwd_kernel[(triton.cdiv(num_rows, config["BLOCK_M"]),)](
        x, weight, bias, residual, *norm_params, y_arg, z_arg, *stats,
        x.stride(0), weight.stride(0), residual.stride(0), y_arg.stride(0), z_arg.stride(0),
        num_rows, width, inner,
        float(eps), int(store_preln),
        float(dropout_p), key,
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
        DOT_PRECISION=config["DOT_PRECISION"], UPCAST_DOT=_upcast_dot(x.dtype),
        APPLY_NORM=config["APPLY_NORM"], DROPOUT=config["DROPOUT"],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return y, z, mean, rstd


def linear_layernorm_backward(grad_y, x, weight, z, mean, rstd, ln_weight, dropout_p=0.0, seed=0, rng_offset=0,
                              grad_z=None, dropout_key=None):
    """LayerNorm (and dropout) backward in Triton, then the GEMM gradients with torch matmuls.

    grad_y: (M, N) gradient of y = LayerNorm(z), or None when y was not an
    output (then z, mean, rstd and ln_weight are unused and may be None);
    grad_z: (M, N) gradient reaching z directly (pre-norm's residual stream), or
    None. x: (M, K); weight: (N, K); z: (M, N); mean, rstd: (M,) fp32 from
    forward; dropout arguments as in forward (the mask is regenerated, never
    stored). Returns (dx (M, K), dweight (N, K), dbias (N,), dresidual (M, N),
    dln_weight (N,) or None, dln_bias (N,) or None), in x's dtype.
    """
    apply_norm = grad_y is not None
    if not apply_norm and grad_z is None:
        raise ValueError("linear_layernorm_backward: no gradient given (grad_y and grad_z both None)")
    grad_y = as_rows(grad_y, grad_y.shape[-1]) if apply_norm else None
    grad_z = as_rows(grad_z, grad_z.shape[-1]) if grad_z is not None else None
    some_grad = grad_y if apply_norm else grad_z
    if apply_norm or dropout_p > 0.0:
        dz, d_lin, sums = torch.ops.fastdetr.layernorm_bwd(grad_y, z, ln_weight, mean, rstd, grad_z, float(dropout_p),
                                                           launch_key(dropout_key, seed, rng_offset, x.device))
        dz = dz if apply_norm else grad_z
        d_lin = d_lin if dropout_p > 0.0 else dz
        dbias = sums[-1].to(x.dtype)
        dln_weight, dln_bias = sums[:2].to(x.dtype).unbind(0) if apply_norm else (None, None)
    else:   # no norm, no dropout: the linear's gradient is grad_z itself
        dz = d_lin = some_grad
        dbias = d_lin.sum(dim=0, dtype=torch.float32).to(x.dtype)
        dln_weight = dln_bias = None
    dx = d_lin @ weight
    dweight = d_lin.t() @ x
    return dx, dweight, dbias, dz, dln_weight, dln_bias


def _empty(like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The 0-element stand-in a custom op returns for an output its variant does not compute."""
    return like.new_empty((0,), dtype=dtype)


# The kernels as torch.library custom ops (`fastdetr::linear_layernorm_fwd`, `fastdetr::layernorm_bwd`), which
# torch.compile (fullgraph) and CUDA graphs hold as single nodes; outputs a variant does not compute are
# 0-element tensors (an op returns no None). The autograd.Functions below are thin callers of these ops.

@torch.library.custom_op("fastdetr::linear_layernorm_fwd", mutates_args=())
def linear_layernorm_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor,
                            ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None, eps: float,
                            store_preln: bool, dropout_p: float, dropout_key: torch.Tensor,
                            apply_norm: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`linear_layernorm_forward` on x's and residual's rows: (y (M, N), z (M, N), mean (M,), rstd (M,))."""
    y, z, mean, rstd = linear_layernorm_forward(x, weight, bias, residual, ln_weight, ln_bias, eps, store_preln,
                                                dropout_p, apply_norm=apply_norm, dropout_key=dropout_key)
    if y is None:
        y, mean, rstd = _empty(x), _empty(x, torch.float32), _empty(x, torch.float32)
    return y, (z if z is not None else _empty(x)), mean, rstd


@linear_layernorm_fwd_op.register_fake
def _(x, weight, bias, residual, ln_weight, ln_bias, eps, store_preln, dropout_p, dropout_key, apply_norm):
    rows = x.numel() // x.shape[-1]
    rows_by_width = (rows, weight.shape[0])
    y = x.new_empty(rows_by_width) if apply_norm else _empty(x)
    mean, rstd = ((x.new_empty((rows,), dtype=torch.float32) for _ in range(2)) if apply_norm
                  else (_empty(x, torch.float32), _empty(x, torch.float32)))
    return y, (x.new_empty(rows_by_width) if store_preln else _empty(x)), mean, rstd


@torch.library.custom_op("fastdetr::layernorm_bwd", mutates_args=())
def layernorm_bwd_op(grad_y: torch.Tensor | None, z: torch.Tensor | None, ln_weight: torch.Tensor | None,
                     mean: torch.Tensor | None, rstd: torch.Tensor | None, grad_z: torch.Tensor | None,
                     dropout_p: float, dropout_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The row kernel of `linear_layernorm_backward` (LayerNorm and dropout backward, column partial sums):
    (dz (M, N), d_lin (M, N), sums fp32: the column sums of d ln_weight, d ln_bias and d bias (3, N), or of
    d bias alone (1, N) without grad_y (no norm), when dz is 0-element too); d_lin is 0-element without dropout
    (it is dz then)."""
    apply_norm = grad_y is not None
    some_grad = grad_y if apply_norm else grad_z
    num_rows, width = some_grad.shape
    config = block_config("bwd", some_grad.dtype, width)
    programs = triton.cdiv(num_rows, config["BLOCK_M"])
    dz = torch.empty_like(some_grad) if apply_norm else grad_z
    d_lin = torch.empty_like(some_grad) if dropout_p > 0.0 else dz
    # no rows: one program's worth of zeros, so the sums below are zeros
    partials = (torch.empty(3, programs, width, dtype=torch.float32, device=some_grad.device) if num_rows > 0
                else torch.zeros(3, 1, width, dtype=torch.float32, device=some_grad.device))
    if num_rows > 0:
        stats = (mean, rstd) if apply_norm else (partials[0, 0],) * 2   # unread without a norm
        _layernorm_bwd_kernel[(programs,)](
            some_grad, z if apply_norm else some_grad, ln_weight if apply_norm else partials[0, 0], *stats,
            grad_z if grad_z is not None else some_grad, dz, d_lin, partials[0], partials[1], partials[2],
            some_grad.stride(0), z.stride(0) if apply_norm else 0,
            grad_z.stride(0) if grad_z is not None else 0, dz.stride(0), d_lin.stride(0),
            num_rows, width,
            int(apply_norm), int(grad_z is not None),
            float(dropout_p), dropout_key,
            BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
            num_warps=config["num_warps"], num_stages=config["num_stages"],
        )
    return (dz if apply_norm else _empty(some_grad), d_lin if dropout_p > 0.0 else _empty(some_grad),
            (partials if apply_norm else partials[2:]).sum(dim=1))


@layernorm_bwd_op.register_fake
def _(grad_y, z, ln_weight, mean, rstd, grad_z, dropout_p, dropout_key):
    apply_norm = grad_y is not None
    some_grad = grad_y if apply_norm else grad_z
    width = some_grad.shape[1]
    return (torch.empty_like(some_grad) if apply_norm else _empty(some_grad),
            torch.empty_like(some_grad) if dropout_p > 0.0 else _empty(some_grad),
            some_grad.new_empty((3 if apply_norm else 1, width), dtype=torch.float32))


_POINTER_TYPES = dict.fromkeys(("Mean_ptr", "Rstd_ptr", "dLnW_partial_ptr", "dLnB_partial_ptr", "dBias_partial_ptr"),
                               "*fp32")
_FLOAT_ARGS = ("eps", "dropout_p")


def aot_configs() -> list[KernelConfig]:
    """Every kernel variant the launchers can choose: 3 dtypes x BLOCK_N {64, 128, 256} x (4 forward
    variants: LayerNorm on / off x dropout on / off, and the backward).

    Strides and sizes are typed i32, as the launchers pass them for tensors under
    2**31 elements; UPCAST_DOT is an interpreter-only variant and left out.
    """
    configs = []
    for dtype, dtype_name in TRITON_DTYPE_NAMES.items():
        fwd_signature = aot_signature(_linear_layernorm_fwd_kernel, dtype_name, _POINTER_TYPES, _FLOAT_ARGS)
        for block_n in _BLOCK_N_CHOICES:
            for apply_norm in (True, False):
                for dropout in (False, True):
                    fwd = block_config("fwd", dtype, block_n, apply_norm, dropout)
                    configs.append(KernelConfig(
                        _linear_layernorm_fwd_kernel, fwd_signature,
                        dict(BLOCK_M=fwd["BLOCK_M"], BLOCK_N=block_n, BLOCK_K=fwd["BLOCK_K"],
                             DOT_PRECISION=fwd["DOT_PRECISION"], UPCAST_DOT=False, APPLY_NORM=apply_norm,
                             DROPOUT=dropout),
                        dict(num_warps=fwd["num_warps"], num_stages=fwd["num_stages"])))
            bwd = block_config("bwd", dtype, block_n)
            configs.append(KernelConfig(
                _layernorm_bwd_kernel, aot_signature(_layernorm_bwd_kernel, dtype_name, _POINTER_TYPES, _FLOAT_ARGS),
                dict(BLOCK_M=bwd["BLOCK_M"], BLOCK_N=block_n),
                dict(num_warps=bwd["num_warps"], num_stages=bwd["num_stages"])))
    return configs


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------

class LinearResidualLayerNormFunction(torch.autograd.Function):
    """Post-norm: y = LayerNorm(residual + dropout(x W^T + b))."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, ln_weight, ln_bias, eps, dropout_p, key):
        needs_grad = any(ctx.needs_input_grad[:6])
        y, z, mean, rstd = torch.ops.fastdetr.linear_layernorm_fwd(x, weight, bias, residual, ln_weight, ln_bias,
                                                                   eps, needs_grad, dropout_p, key, True)
        ctx.dropout_p = dropout_p
        if needs_grad:
            ctx.save_for_backward(x, weight, z, mean, rstd, ln_weight, key)
        ctx.x_shape, ctx.residual_shape = x.shape, residual.shape
        return y.view(residual.shape)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, z, mean, rstd, ln_weight, key = ctx.saved_tensors
        dx, dweight, dbias, dresidual, dln_weight, dln_bias = linear_layernorm_backward(
            grad_y, as_rows(x, x.shape[-1]), weight, z, mean, rstd, ln_weight, ctx.dropout_p, dropout_key=key)
        return (dx.view(ctx.x_shape), dweight, dbias, dresidual.view(ctx.residual_shape), dln_weight, dln_bias,
                None, None, None)


class LinearResidualFunction(torch.autograd.Function):
    """Pre-norm: z = residual + dropout(x W^T + b), and, when LayerNorm parameters are given, also y = LayerNorm(z).

    Returns z, or (z, y). The gradient of z is what reaches it directly plus,
    with a norm, LayerNorm's backward of y's gradient, in one Triton kernel.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, residual, ln_weight, ln_bias, eps, dropout_p, key):
        apply_norm = ln_weight is not None
        y, z, mean, rstd = torch.ops.fastdetr.linear_layernorm_fwd(x, weight, bias, residual, ln_weight, ln_bias,
                                                                   eps, True, dropout_p, key, apply_norm)
        ctx.dropout_p, ctx.apply_norm = dropout_p, apply_norm
        ctx.x_shape, ctx.residual_shape = x.shape, residual.shape
        if any(ctx.needs_input_grad[:6]):
            # z and y are outputs: autograd keeps them anyway, so z costs no extra bytes
            ctx.save_for_backward(x, weight, key, *((z, mean, rstd, ln_weight) if apply_norm else ()))
        z = z.view(residual.shape)
        if not apply_norm:
            return z
        return z, y.view(residual.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_z, grad_y=None):
        x, weight, key, *norm_saved = ctx.saved_tensors
        z, mean, rstd, ln_weight = norm_saved if ctx.apply_norm else (None,) * 4
        dx, dweight, dbias, dresidual, dln_weight, dln_bias = linear_layernorm_backward(
            grad_y, as_rows(x, x.shape[-1]), weight, z, mean, rstd, ln_weight, ctx.dropout_p, grad_z=grad_z,
            dropout_key=key)
        return (dx.view(ctx.x_shape), dweight, dbias, dresidual.view(ctx.residual_shape), dln_weight, dln_bias,
                None, None, None)


def _key(x: torch.Tensor, dropout_p: float) -> torch.Tensor:
    return dropout_key(x.device) if dropout_p > 0.0 else unused_dropout_key(x.device)


def linear_residual_layernorm(x, weight, bias, residual, ln_weight, ln_bias, eps=1e-5, dropout_p=0.0):
    """LayerNorm(residual + x @ weight^T + bias) over the last dimension, with LayerNorm's affine.

    x: (..., K); weight: (N, K); bias: (N,); residual: (..., N) with x's leading
    dims; ln_weight, ln_bias: (N,); all one dtype. Returns (..., N) in that dtype.
    Runs the Triton kernels when `fastdetr.backend.use_triton` says so and
    N <= 256; otherwise `linear_residual_layernorm_ref` (plain PyTorch).
    dropout_p: probability of zeroing an element of x W^T + b (kept ones scaled by
    1 / (1 - dropout_p)), always applied (the caller passes 0.0 in eval mode);
    the Triton path draws its key on the device (`common.dropout_key`).
    """
    _check_inputs(x, weight, bias, residual, ln_weight, ln_bias, dropout_p)
    if (x.dtype not in DTYPES or weight.shape[0] > MAX_FUSED_WIDTH
            or not use_triton(x, weight, bias, residual, ln_weight, ln_bias)):
        return linear_residual_layernorm_ref(x, weight, bias, residual, ln_weight, ln_bias, eps, dropout_p)
    return LinearResidualLayerNormFunction.apply(x, weight, bias, residual, ln_weight, ln_bias, float(eps),
                                                 float(dropout_p), _key(x, dropout_p))


def linear_residual_layernorm_ref(x, weight, bias, residual, ln_weight, ln_bias, eps=1e-5, dropout_p=0.0):
    """Plain-PyTorch oracle and fallback: layer_norm(residual + dropout(linear(x))), math in the inputs' dtype."""
    _check_inputs(x, weight, bias, residual, ln_weight, ln_bias, dropout_p)
    return F.layer_norm(linear_residual_ref(x, weight, bias, residual, dropout_p), (weight.shape[0],), ln_weight,
                        ln_bias, eps)


def linear_residual(x, weight, bias, residual, dropout_p=0.0):
    """residual + dropout(x @ weight^T + bias): a pre-norm layer's out_proj / linear2 and its residual add.

    Shapes as in `linear_residual_layernorm`. Runs the Triton forward kernel
    (LayerNorm off) when `use_triton` says so and N <= 256, else `linear_residual_ref`.
    """
    _check_inputs(x, weight, bias, residual, None, None, dropout_p, norm=False, op="linear_residual")
    if x.dtype not in DTYPES or weight.shape[0] > MAX_FUSED_WIDTH or not use_triton(x, weight, bias, residual):
        return linear_residual_ref(x, weight, bias, residual, dropout_p)
    return LinearResidualFunction.apply(x, weight, bias, residual, None, None, 0.0, float(dropout_p),
                                        _key(x, dropout_p))


def linear_residual_and_layernorm(x, weight, bias, residual, ln_weight, ln_bias, eps=1e-5, dropout_p=0.0):
    """(z, LayerNorm(z)) with z = residual + dropout(x @ weight^T + bias), in one kernel.

    A pre-norm layer adds its sublayer to the residual stream (z) and the next
    sublayer reads the stream's LayerNorm: both come from one pass over the
    row. Shapes as in `linear_residual_layernorm`; returns two (..., N) tensors.
    """
    _check_inputs(x, weight, bias, residual, ln_weight, ln_bias, dropout_p, op="linear_residual_and_layernorm")
    if (x.dtype not in DTYPES or weight.shape[0] > MAX_FUSED_WIDTH
            or not use_triton(x, weight, bias, residual, ln_weight, ln_bias)):
        z = linear_residual_ref(x, weight, bias, residual, dropout_p)
        return z, F.layer_norm(z, (weight.shape[0],), ln_weight, ln_bias, eps)
    return LinearResidualFunction.apply(x, weight, bias, residual, ln_weight, ln_bias, float(eps),
                                        float(dropout_p), _key(x, dropout_p))


def linear_residual_ref(x, weight, bias, residual, dropout_p=0.0):
    """Plain-PyTorch oracle and fallback: residual + dropout(linear(x))."""
    out = F.linear(x, weight, bias)
    if dropout_p > 0.0:
        out = F.dropout(out, dropout_p, training=True)
    return residual + out
