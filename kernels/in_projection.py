"""Attention in-projection with the positional embedding add fused: DETR's self-attention Q, K, V.

What is fused: with nn.MultiheadAttention's packed in_proj_weight W (3E, E) and
in_proj_bias b (3E,), DETR's self-attention (encoder and decoder: query = key =
x + pos, value = x) needs

    [Q | K] = (x + pos) W[:2E]^T + b[:2E],     V = x W[2E:]^T + b[2E:].

The reference (`in_projection_ref`, bottom of this file) writes x + pos to
memory and runs two F.linear calls. Here one GEMM kernel produces the whole
(M, 3E) output in one launch: its A-tile loader adds pos only in programs that
own Q/K columns, so no (x + pos) tensor is ever written. pos may be None (a
plain GEMM with bias).

Column tiling: the Q/K columns [0, 2E) and the V columns [2E, 3E) are tiled
separately (a tile never straddles column 2E), so every program is either
"add pos" or "don't" and runs one dot per K step, whatever E is; the pos load
is masked off in V programs (no memory traffic). Programs walk the column
tiles of one row block consecutively, so the x (and pos) tile is reused from L2.

Backward: plain torch matmuls (cuBLAS on a GPU), no Triton. The three GEMM
gradients are dW_qk = dQK^T (x + pos), dW_v = dV^T x (reductions over the rows),
dpos = dQK W_qk and dx = dpos + dV W_v (one addmm); dbias is the column sum.
Nothing in them is worth a custom kernel: the only fusable piece is the x + pos
prologue of dW_qk, so backward forms x + pos as an (M, E) temporary (freed at
once). Saved for backward: x, pos and W only (no x + pos), the same bytes the
reference's autograd keeps for its two linears (it saves x + pos instead of pos).

Limits: x, pos, weight and bias share one dtype in `DTYPES` (fp32, fp16 or
bf16; others run `in_projection_ref`); bias is a tensor (not None); pos has x's
shape; M < 2**31 rows. fp32 dots run in true fp32 ("ieee", not tf32) for the
1e-5 tolerance; fp16/bf16 round x + pos to the input dtype before the
tensor-core dot, as the reference does. Any E works (tiles are masked). Block
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
    _upcast_dot,
    aot_signature,
    as_rows,
    unit_last_stride,
)

# limits (module docstring)
DTYPES = tuple(TRITON_DTYPE_NAMES)
_BLOCK_N_CHOICES = (64, 128)


def _check_inputs(x, pos, weight, bias) -> None:
    """Shape and dtype checks that read metadata only."""
    if bias is None:
        raise ValueError("in_projection: bias must be a tensor of shape (3E,), not None")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"in_projection: x must be (..., E) with E > 0; got {tuple(x.shape)}")
    embed_dim = x.shape[-1]
    if tuple(weight.shape) != (3 * embed_dim, embed_dim):
        raise ValueError(f"in_projection: weight must be (3E, E) = {(3 * embed_dim, embed_dim)} for x's "
                         f"E = {embed_dim}; got {tuple(weight.shape)}")
    if tuple(bias.shape) != (3 * embed_dim,):
        raise ValueError(f"in_projection: bias must be (3E,) = ({3 * embed_dim},); got {tuple(bias.shape)}")
    if pos is not None and pos.shape != x.shape:
        raise ValueError(f"in_projection: pos must have x's shape {tuple(x.shape)}; got {tuple(pos.shape)}")
    tensors = (x, weight, bias) if pos is None else (x, pos, weight, bias)
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1:
        raise ValueError(f"in_projection: all inputs must share a dtype; got {sorted(map(str, dtypes))}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"in_projection: inputs must be floating point; got {x.dtype}")


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _configs() -> dict:
    """Launch configs by (dtype family, BLOCK_N); all compiled ahead of time in CI.

    fp16/bf16 tiles feed tensor cores; fp32 tiles are twice the bytes and their
    ieee dots run on FMA units, so they are smaller.
    """
    configs = {}
    for block_n in _BLOCK_N_CHOICES:
        # 8 warps: with 4, BLOCK_N = 128 with pos spills on sm_80 / sm_90 and BLOCK_N = 64 sits at ~250 registers
        configs[("16bit", block_n)] = dict(BLOCK_M=64, BLOCK_K=32, num_warps=8, num_stages=3,
                                           DOT_PRECISION="tf32")   # ignored by fp16/bf16 dots
        # 3 stages: at 2, the aligned (DETR-shaped) variant with pos keeps an 8-byte stack on sm_80;
        # BLOCK_N = 64 at 8 warps: at 4, the aligned variant without pos keeps one on sm_90 under Triton 3.9
        # (and BLOCK_N = 128 at 8 spills on sm_80 under 3.8 / 3.9)
        configs[("fp32", block_n)] = dict(BLOCK_M=32, BLOCK_K=16, num_warps=8 if block_n == 64 else 4,
                                          num_stages=3, DOT_PRECISION="ieee")
    return configs


def _column_tiles(embed_dim: int, block_n: int) -> tuple[int, int]:
    """(Q/K tiles, V tiles): [0, 2E) and [2E, 3E) are tiled separately."""
    return triton.cdiv(2 * embed_dim, block_n), triton.cdiv(embed_dim, block_n)


def _block_n(embed_dim: int) -> int:
    """The BLOCK_N computing the fewest padded columns (ties: the larger block)."""
    def padded(block_n):
        return block_n * sum(_column_tiles(embed_dim, block_n))
    return min(reversed(_BLOCK_N_CHOICES), key=padded)


def block_config(dtype: torch.dtype, embed_dim: int) -> dict:
    """Launch config for inputs of `dtype` and embedding width E = `embed_dim`."""
    block_n = _block_n(embed_dim)
    return dict(_configs()[("fp32" if dtype == torch.float32 else "16bit", block_n)], BLOCK_N=block_n)


@triton.jit
def _in_projection_fwd_kernel(
    X_ptr,                      # (M, E), last stride 1
    Pos_ptr,                    # (M, E), last stride 1 (unread when not HAS_POS)
    W_ptr,                      # (3E, E), last stride 1: packed [W_q; W_k; W_v]
    Bias_ptr,                   # (3E,)
    Out_ptr,                    # (M, 3E) out, input dtype: [Q | K | V]
    stride_x_m, stride_pos_m, stride_w_n, stride_out_m,
    num_rows, embed_dim,        # M, E
    HAS_POS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    # program -> (row block, column tile); column tiles of one row block are consecutive (x reuse in L2)
    pid = tl.program_id(0)
    qk_tiles = tl.cdiv(2 * embed_dim, BLOCK_N)
    col_tiles = qk_tiles + tl.cdiv(embed_dim, BLOCK_N)
    pid_m = pid // col_tiles
    pid_n = pid % col_tiles
    is_qk = pid_n < qk_tiles
    # a Q/K tile covers columns [pid_n * BLOCK_N, ...) < 2E; a V tile starts at 2E
    col_start = tl.where(is_qk, pid_n * BLOCK_N, 2 * embed_dim + (pid_n - qk_tiles) * BLOCK_N)
    col_end = tl.where(is_qk, 2 * embed_dim, 3 * embed_dim)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = col_start + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m < num_rows
    col_ok = offs_n < col_end
    rows = offs_m.to(tl.int64)[:, None]
    cols = offs_n.to(tl.int64)

    # main loop: acc = (x [+ pos]) W^T over K = E
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k_start in range(0, embed_dim, BLOCK_K):
        ks = k_start + offs_k
        k_ok = ks < embed_dim
        a_mask = row_ok[:, None] & k_ok[None, :]
        a = tl.load(X_ptr + rows * stride_x_m + ks[None, :], mask=a_mask, other=0.0)
        if HAS_POS:
            # only Q/K programs read pos; V programs mask the load off (and add zeros)
            pos = tl.load(Pos_ptr + rows * stride_pos_m + ks[None, :], mask=a_mask & is_qk, other=0.0)
            a = (a.to(tl.float32) + pos.to(tl.float32)).to(X_ptr.dtype.element_ty)
        w = tl.load(W_ptr + cols[:, None] * stride_w_n + ks[None, :], mask=col_ok[:, None] & k_ok[None, :],
                    other=0.0)
        acc += _dot(a, tl.trans(w), DOT_PRECISION, UPCAST_DOT)

    # epilogue: + bias, store in the input dtype
    bias = tl.load(Bias_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)
    acc = acc + bias[None, :]
    tl.store(Out_ptr + rows * stride_out_m + cols[None, :], acc.to(Out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def in_projection_forward(x, pos, weight, bias):
    """Launch the forward kernel.

    x: (M, E); pos: (M, E) or None; weight: (3E, E); bias: (3E,); one dtype.
    Returns [Q | K | V]: (M, 3E) in x's dtype, Q and K from x + pos, V from x.
    """
    embed_dim = x.shape[-1]
    x = as_rows(x, embed_dim)
    pos = None if pos is None else as_rows(pos, embed_dim)
    weight = unit_last_stride(weight)
    bias = bias.contiguous()
    num_rows = x.shape[0]
    config = block_config(x.dtype, embed_dim)
    out = torch.empty(num_rows, 3 * embed_dim, dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return out
    pos_arg = x if pos is None else pos   # never read when HAS_POS is False
    programs = triton.cdiv(num_rows, config["BLOCK_M"]) * sum(_column_tiles(embed_dim, config["BLOCK_N"]))
    _in_projection_fwd_kernel[(programs,)](
        x, pos_arg, weight, bias, out,
        x.stride(0), pos_arg.stride(0), weight.stride(0), out.stride(0),
        num_rows, embed_dim,
        HAS_POS=pos is not None,
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
        DOT_PRECISION=config["DOT_PRECISION"], UPCAST_DOT=_upcast_dot(x.dtype),
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return out


def in_projection_backward(grad_out, x, pos, weight, needs_x=True, needs_pos=True, needs_weight=True,
                           needs_bias=True):
    """Gradients with torch matmuls (see the module docstring for why no Triton).

    grad_out: (M, 3E); x, pos: (M, E) (pos may be None); weight: (3E, E).
    Returns (dx (M, E), dpos (M, E) or None, dweight (3E, E), dbias (3E,)), each
    None when its needs_* flag is False; all in x's dtype.
    """
    embed_dim = x.shape[-1]
    grad_qk, grad_v = grad_out[:, :2 * embed_dim], grad_out[:, 2 * embed_dim:]
    w_qk, w_v = weight[:2 * embed_dim], weight[2 * embed_dim:]
    dx = dpos = dweight = dbias = None
    if pos is not None and (needs_pos or needs_x):
        dpos = grad_qk @ w_qk
        if needs_x:
            dx = torch.addmm(dpos, grad_v, w_v)
        if not needs_pos:
            dpos = None
    elif needs_x:
        dx = grad_out @ weight
    if needs_weight:
        # the one place x + pos exists in memory: an (M, E) temporary, freed on return
        qk_input = x if pos is None else x + pos
        dweight = torch.cat([grad_qk.t() @ qk_input, grad_v.t() @ x])
    if needs_bias:
        dbias = grad_out.sum(dim=0)
    return dx, dpos, dweight, dbias


def aot_configs() -> list[KernelConfig]:
    """Every kernel variant the launcher can choose: 3 dtypes x HAS_POS {True, False} x BLOCK_N {64, 128}.

    Strides and sizes are typed i32, as the launcher passes them for tensors under
    2**31 elements; UPCAST_DOT is an interpreter-only variant and left out.
    """
    configs = []
    for dtype, dtype_name in TRITON_DTYPE_NAMES.items():
        family = "fp32" if dtype == torch.float32 else "16bit"
        for block_n in _BLOCK_N_CHOICES:
            config = _configs()[(family, block_n)]
            for has_pos in (True, False):
                configs.append(KernelConfig(
                    _in_projection_fwd_kernel, aot_signature(_in_projection_fwd_kernel, dtype_name),
                    dict(HAS_POS=has_pos, BLOCK_M=config["BLOCK_M"], BLOCK_N=block_n, BLOCK_K=config["BLOCK_K"],
                         DOT_PRECISION=config["DOT_PRECISION"], UPCAST_DOT=False),
                    dict(num_warps=config["num_warps"], num_stages=config["num_stages"])))
    return configs


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------

# The forward kernel as a torch.library custom op (`fastdetr::in_projection`), which torch.compile (fullgraph)
# and CUDA graphs hold as one node; its registered autograd is `in_projection_backward` (torch matmuls, traced
# as they are).

@torch.library.custom_op("fastdetr::in_projection", mutates_args=())
def in_projection_op(x: torch.Tensor, pos: torch.Tensor | None, weight: torch.Tensor,
                     bias: torch.Tensor) -> torch.Tensor:
    """(..., 3E) [Q | K | V], contiguous: `in_projection_forward` on x's rows."""
    return in_projection_forward(x, pos, weight, bias).view(*x.shape[:-1], weight.shape[0])


@in_projection_op.register_fake
def _(x, pos, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _in_projection_setup_context(ctx, inputs, output):
    x, pos, weight, bias = inputs
    ctx.save_for_backward(x, pos, weight)


def _in_projection_backward(ctx, grad_out):
    x, pos, weight = ctx.saved_tensors
    embed_dim = x.shape[-1]
    needs_x, needs_pos, needs_weight, needs_bias = ctx.needs_input_grad
    dx, dpos, dweight, dbias = in_projection_backward(
        as_rows(grad_out, 3 * embed_dim), as_rows(x, embed_dim), None if pos is None else as_rows(pos, embed_dim),
        weight, needs_x, needs_pos and pos is not None, needs_weight, needs_bias)
    dx = None if dx is None else dx.view(x.shape)
    dpos = None if dpos is None else dpos.view(x.shape)
    return dx, dpos, dweight, dbias


torch.library.register_autograd("fastdetr::in_projection", _in_projection_backward,
                                setup_context=_in_projection_setup_context)


def in_projection(x, pos, weight, bias):
    """[Q | K | V] of DETR's self-attention: Q, K = (x + pos) W_{q,k}^T + b_{q,k}; V = x W_v^T + b_v.

    x: (..., E); pos: (..., E) like x, or None (then Q, K use x); weight: (3E, E)
    and bias: (3E,), nn.MultiheadAttention's packed in_proj_weight / in_proj_bias;
    one dtype. Returns (..., 3E) in that dtype; `.split(E, dim=-1)` gives q, k, v
    views. Runs the Triton kernel when `fastdetr.backend.use_triton` says so,
    otherwise (and for dtypes other than fp32 / fp16 / bf16) `in_projection_ref`
    (plain PyTorch).
    """
    _check_inputs(x, pos, weight, bias)
    if x.dtype not in DTYPES or not use_triton(x, pos, weight, bias):
        return in_projection_ref(x, pos, weight, bias)
    return torch.ops.fastdetr.in_projection(x, pos, weight, bias)


def in_projection_ref(x, pos, weight, bias):
    """Plain-PyTorch oracle and fallback: two F.linear calls on x + pos and x, math in the inputs' dtype."""
    _check_inputs(x, pos, weight, bias)
    embed_dim = x.shape[-1]
    qk = F.linear(x if pos is None else x + pos, weight[:2 * embed_dim], bias[:2 * embed_dim])
    v = F.linear(x, weight[2 * embed_dim:], bias[2 * embed_dim:])
    return torch.cat([qk, v], dim=-1)
