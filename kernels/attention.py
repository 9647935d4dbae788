"""Flash attention for DETR: key padding mask, attention dropout, padded key blocks skipped.

What is fused: softmax(q k^T * scale, keys masked) -> dropout -> @ v, forward and
backward, without ever holding an L x S matrix in memory (flash-attention style:
online softmax in fp32, the log-sum-exp of each query row saved for backward).
The reference is `attention_ref` at the bottom of this file (plain PyTorch, the
same math `torch.nn.MultiheadAttention` does, except for fully padded rows).

How it differs from the flash-attention Triton kernels it learns from:
- A per-batch boolean key padding mask (B, S), True = ignore the key. Key blocks
  whose keys are all padded are skipped: a per-batch list of the key blocks that
  hold any valid key (valid blocks first) and their count, a `KeyBlockTable`, is
  built with torch ops and no host sync; the forward and dQ kernels loop over that
  list only (`_load_kv_block`), and a dK/dV program whose key block is fully
  padded writes zeros and loops over nothing. A caller running several attentions
  over one mask builds the table once (`key_block_table(mask, dtype)`) and passes
  it as `kv_table`; without one, each call builds its own, and forward's serves
  backward. Nothing is cached in this module. Padded keys inside a visited block
  are never loaded (masked loads), so whatever they hold (even NaN) cannot leak
  into the result.
- A query row whose keys are all padded gets zeros and zero gradients (PyTorch's
  softmax returns NaN there).
- Dropout on the attention probabilities with Philox, counter = (key index, query
  index, batch * heads + head, offset) and key = seed; seed and offset are a
  (2,) int32 device tensor the kernels read (`common.dropout_key`, drawn by the
  device's generator: no sync, new masks at each CUDA-graph replay or compiled
  call). Backward regenerates the same mask from the same counters and tensor.
- The output and the gradients are allocated as views of (L, B, H, D) storage,
  the layout `nn.MultiheadAttention` reshapes to and from, so no copy is needed
  on either side of the kernel.

Limits, as constants other modules import: head dim in `HEAD_DIMS` (32 or 64;
DETR's 256 / 8 heads is 32); q, k, v of one dtype in `DTYPES` (fp32, fp16 or
bf16; others run `attention_ref`), all math in fp32; B * H <= `MAX_BATCH_HEADS`
(65535, grid axis 1); the last dimension must have stride 1 (anything else is
copied once). One block config per kernel and dtype (`_configs()`), whatever L
and S are: DETR's sizes (1 to ~1300) are all served by them with masked tails,
and every extra config would add to the set CI compiles ahead of time
(`aot_configs()`, 18 variants). Block sizes were picked for no register spills
on sm_80 / sm_90, not tuned on a GPU.
Dropout draws one Philox call per score (10 rounds): correct and simple, but
the costliest part of a training step's attention at D = 32.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastdetr.backend import use_triton
from fastdetr.kernels.common import (
    TRITON_DTYPE_NAMES,
    KernelConfig,
    _attention_dropout_keep,
    _dot,
    _upcast_dot,
    aot_signature,
    dropout_key,
    launch_key,
    unit_last_stride,
    unused_dropout_key,
)

# limits (module docstring)
HEAD_DIMS = (32, 64)
MAX_BATCH_HEADS = 65535   # B * H programs on grid axis 1
DTYPES = tuple(TRITON_DTYPE_NAMES)
_LOG2E = 1.4426950408889634


def _check_inputs(q, k, v, key_padding_mask, dropout_p) -> None:
    """Shape, dtype and range checks that read metadata only (never a tensor's values)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects q (B, H, L, D), k and v (B, H, S, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape != v.shape or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: mismatched B/H/S/D: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if q.shape[3] not in HEAD_DIMS:
        raise ValueError(f"attention: head dim {q.shape[3]} (q {tuple(q.shape)}) is not supported; "
                         f"supported: {HEAD_DIMS}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if key_padding_mask is not None:
        batch, seq_k = k.shape[0], k.shape[2]
        if tuple(key_padding_mask.shape) != (batch, seq_k):
            raise ValueError(f"attention: key_padding_mask must be (B, S) = ({batch}, {seq_k}); "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(f"attention: key_padding_mask must be bool (True = ignore the key); "
                             f"got {key_padding_mask.dtype}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1); got {dropout_p}")


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _configs() -> dict:
    """Launch configs by (kernel, dtype family): a small fixed set, all compiled ahead of time in CI.

    Sized so that no variant spills registers on sm_80 / sm_90 (checked by the
    AOT test). The forward and dQ kernels share BLOCK_N (the key block), so the
    skip list built in forward serves backward. The backward kernels hold more
    live tiles (two fp32 accumulators, transposed score tiles, the dropout
    counters) and take smaller ones; 64-wide dK/dV tiles spilled on sm_80 at D = 64.
    fp32 tiles are twice the bytes and its dots run in true fp32 ("ieee", not tf32,
    for the 1e-5 tolerance), so they are smaller again. Checked with Triton 3.6 and
    3.9 (`make report-triton-latest`): at D = 64 the 16-bit dQ kernel spilled at 4
    warps on sm_90 under 3.9, the fp32 one at BLOCK_M = 32 on sm_80 under 3.8 and 3.9.
    """
    half = dict(num_warps=4, num_stages=2, DOT_PRECISION="tf32")   # tf32 is ignored for fp16/bf16 dots
    full = dict(num_warps=4, num_stages=2, DOT_PRECISION="ieee")
    configs = {
        ("fwd", "16bit"): dict(BLOCK_M=64, BLOCK_N=64, **half),
        ("dq", "16bit"): dict(half, BLOCK_M=32, BLOCK_N=64, num_warps=8),
        ("dkdv", "16bit"): dict(BLOCK_M=32, BLOCK_N=32, **half),
        ("fwd", "fp32"): dict(BLOCK_M=32, BLOCK_N=32, **full),
        ("dq", "fp32"): dict(BLOCK_M=16, BLOCK_N=32, **full),
        ("dkdv", "fp32"): dict(BLOCK_M=16, BLOCK_N=32, **full),
    }
    for family in ("16bit", "fp32"):   # one KeyBlockTable serves both kernels (`key_block_table`)
        assert configs[("fwd", family)]["BLOCK_N"] == configs[("dq", family)]["BLOCK_N"], family
    return configs


def block_config(kernel: str, dtype: torch.dtype) -> dict:
    """Launch config of `kernel` ("fwd", "dq" or "dkdv") for inputs of `dtype`.

    Returns BLOCK_M (queries), BLOCK_N (keys), num_warps, num_stages,
    DOT_PRECISION. L and S do not enter: DETR's sizes (1 to ~1300) are served by
    the same tiles with masked tails, and each extra choice would double the set
    CI compiles ahead of time.
    """
    return _configs()[(kernel, "fp32" if dtype == torch.float32 else "16bit")]


@triton.jit
def _load_kv_block(it, masked, k_base_ptr, v_base_ptr, stride_k_s, stride_v_s,
                   key_padding_mask_ptr, kv_block_index_ptr, b64, seq_len_k, num_kv_blocks,
                   HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """The it-th key block a forward / dQ program visits: (offs_n, key_ok, k, v).

    With a mask (`masked`), entry `it` of the batch's skip list (the blocks with
    a valid key first), else key block `it` itself. k_base_ptr, v_base_ptr: this
    (batch, head)'s (S, D) slices of k and v; b64: the batch index, int64.
    Returns offs_n (BLOCK_N,) key indices, key_ok (BLOCK_N,) bool (in range and
    not padded), k and v (BLOCK_N, HEAD_DIM) in the input dtype. Padded keys are
    never loaded (their rows read as 0): whatever they hold cannot reach a result.
    """
    block = tl.where(masked, tl.load(kv_block_index_ptr + b64 * num_kv_blocks + it, mask=masked, other=0), it)
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_in = offs_n < seq_len_k
    padded = tl.load(key_padding_mask_ptr + b64 * seq_len_k + offs_n, mask=key_in & masked, other=0)
    key_ok = key_in & (padded == 0)
    k = tl.load(k_base_ptr + offs_n.to(tl.int64)[:, None] * stride_k_s + offs_d[None, :],
                mask=key_ok[:, None], other=0.0)
    v = tl.load(v_base_ptr + offs_n.to(tl.int64)[:, None] * stride_v_s + offs_d[None, :],
                mask=key_ok[:, None], other=0.0)
    return offs_n, key_ok, k, v


# Masking and dropout are runtime arguments, not constexprs: the masked variant
# costs one predicated load per key block when off, the dropout branch is uniform
# per program, and four times fewer variants keep the ahead-of-time set small.
# `has_mask` is not specialised (a value of 1 would otherwise compile a variant of its own).

@triton.jit(do_not_specialize=["has_mask"])
def _attention_fwd_kernel(
    Q_ptr, K_ptr, V_ptr,                      # (B, H, L, D), (B, H, S, D), (B, H, S, D); last stride 1
    Out_ptr,                                  # (B, H, L, D) in q's dtype; last stride 1
    LSE_ptr,                                  # (B, H, L) fp32 log2-sum-exp2 of the scaled scores
    key_padding_mask_ptr,                     # (B, S) uint8, 1 = ignore the key (read if has_mask)
    kv_block_index_ptr, kv_block_count_ptr,   # (B, num_kv_blocks), (B,) int32: blocks with a valid key
    block_visits_ptr,                         # (B, H, L) int32, key blocks visited (COUNT_VISITS)
    stride_q_b, stride_q_h, stride_q_l,
    stride_k_b, stride_k_h, stride_k_s,
    stride_v_b, stride_v_h, stride_v_s,
    stride_o_b, stride_o_h, stride_o_l,
    num_heads, seq_len_q, seq_len_k, num_kv_blocks,
    has_mask,                                 # 0 / 1
    qk_scale,                                 # softmax scale * log2(e)
    dropout_p, DropoutKey_ptr,              # dropout off when dropout_p == 0
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    COUNT_VISITS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    b64 = batch.to(tl.int64)
    h64 = head.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_len_q
    masked = has_mask != 0
    seed = tl.load(DropoutKey_ptr)            # the dropout key, read once (allocated, unused, without dropout)
    rng_offset = tl.load(DropoutKey_ptr + 1)

    q = tl.load(Q_ptr + b64 * stride_q_b + h64 * stride_q_h + offs_m.to(tl.int64)[:, None] * stride_q_l
                + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    k_base = K_ptr + b64 * stride_k_b + h64 * stride_k_h
    v_base = V_ptr + b64 * stride_v_b + h64 * stride_v_h

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)   # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)                  # running sum of exp2, before dropout
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)       # running sum of kept p * v

    # only the key blocks that hold a valid key (all of them without a mask)
    num_iters = num_kv_blocks
    if masked:
        num_iters = tl.load(kv_block_count_ptr + batch)
    for it in range(0, num_iters):
        # padded keys are never loaded: whatever they hold cannot reach the output
        offs_n, key_ok, k, v = _load_kv_block(it, masked, k_base, v_base, stride_k_s, stride_v_s,
                                              key_padding_mask_ptr, kv_block_index_ptr, b64, seq_len_k,
                                              num_kv_blocks, HEAD_DIM, BLOCK_N)
        scores = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT) * qk_scale
        scores = tl.where(key_ok[None, :], scores, float("-inf"))
        # online softmax; a row that has seen only masked keys keeps max -inf, so
        # exponentiate against 0 there instead (exp2(-inf) = 0, never -inf - -inf)
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(scores - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if dropout_p > 0.0:
            query_ids = offs_m[:, None] + tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
            key_ids = offs_n[None, :] + tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
            keep = _attention_dropout_keep(seed, rng_offset, pid_bh, query_ids, key_ids, dropout_p)
            p = tl.where(keep, p, 0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, UPCAST_DOT)
        m_i = m_new

    # epilogue: normalise, 1 / (1 - p) of dropout folded in; fully padded rows -> 0
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc * ((1.0 / (1.0 - dropout_p)) / l_safe)[:, None]
    tl.store(Out_ptr + b64 * stride_o_b + h64 * stride_o_h + offs_m.to(tl.int64)[:, None] * stride_o_l
             + offs_d[None, :], out.to(Out_ptr.dtype.element_ty), mask=row_ok[:, None])
    # lse = +inf on fully padded rows makes exp2(score - lse) = 0 in backward
    lse = tl.where(l_i == 0.0, float("inf"), m_i + tl.math.log2(l_safe))
    row_index = pid_bh.to(tl.int64) * seq_len_q + offs_m
    tl.store(LSE_ptr + row_index, lse, mask=row_ok)
    if COUNT_VISITS:
        tl.store(block_visits_ptr + row_index, tl.zeros([BLOCK_M], tl.int32) + num_iters, mask=row_ok)


@triton.jit(do_not_specialize=["has_mask"])
def _attention_bwd_dq_kernel(
    Q_ptr, K_ptr, V_ptr, Out_ptr, dOut_ptr,   # (B, H, L, D), (B, H, S, D) x 2, (B, H, L, D) x 2
    dQ_ptr,                                   # (B, H, L, D) in q's dtype
    LSE_ptr,                                  # (B, H, L) fp32, from forward
    Delta_ptr,                                # (B, H, L) fp32, written here: rowsum(dO * O)
    key_padding_mask_ptr,                     # (B, S) uint8 (read if has_mask)
    kv_block_index_ptr, kv_block_count_ptr,   # (B, num_kv_blocks), (B,) int32, as in forward
    block_visits_ptr,                         # (B, H, L) int32 (COUNT_VISITS)
    stride_q_b, stride_q_h, stride_q_l,
    stride_k_b, stride_k_h, stride_k_s,
    stride_v_b, stride_v_h, stride_v_s,
    stride_o_b, stride_o_h, stride_o_l,
    stride_do_b, stride_do_h, stride_do_l,
    stride_dq_b, stride_dq_h, stride_dq_l,
    num_heads, seq_len_q, seq_len_k, num_kv_blocks,
    has_mask,
    sm_scale, qk_scale,                       # softmax scale, and it times log2(e)
    dropout_p, DropoutKey_ptr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    COUNT_VISITS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    b64 = batch.to(tl.int64)
    h64 = head.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_len_q
    rows = offs_m.to(tl.int64)[:, None]
    masked = has_mask != 0

    q = tl.load(Q_ptr + b64 * stride_q_b + h64 * stride_q_h + rows * stride_q_l + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(dOut_ptr + b64 * stride_do_b + h64 * stride_do_h + rows * stride_do_l + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    o = tl.load(Out_ptr + b64 * stride_o_b + h64 * stride_o_h + rows * stride_o_l + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    k_base = K_ptr + b64 * stride_k_b + h64 * stride_k_h
    v_base = V_ptr + b64 * stride_v_b + h64 * stride_v_h

    # preprocess, fused: delta = rowsum(dO * O) of this query block, kept for the dK/dV kernel
    row_index = pid_bh.to(tl.int64) * seq_len_q + offs_m
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(Delta_ptr + row_index, delta, mask=row_ok)
    lse = tl.load(LSE_ptr + row_index, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    num_iters = num_kv_blocks
    if masked:
        num_iters = tl.load(kv_block_count_ptr + batch)
    for it in range(0, num_iters):
        offs_n, key_ok, k, v = _load_kv_block(it, masked, k_base, v_base, stride_k_s, stride_v_s,
                                              key_padding_mask_ptr, kv_block_index_ptr, b64, seq_len_k,
                                              num_kv_blocks, HEAD_DIM, BLOCK_N)
        scores = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT) * qk_scale
        scores = tl.where(key_ok[None, :] & row_ok[:, None], scores, float("-inf"))
        p = tl.math.exp2(scores - lse[:, None])
        # dP = dO V^T through the dropout mask; dS = P * (dP - delta)
        dp = _dot(do, tl.trans(v), DOT_PRECISION, UPCAST_DOT)
        if dropout_p > 0.0:
            query_ids = offs_m[:, None] + tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
            key_ids = offs_n[None, :] + tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
            keep = _attention_dropout_keep(tl.load(DropoutKey_ptr), tl.load(DropoutKey_ptr + 1), pid_bh, query_ids,
                                           key_ids, dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, DOT_PRECISION, UPCAST_DOT)

    # epilogue
    dq = dq * sm_scale
    tl.store(dQ_ptr + b64 * stride_dq_b + h64 * stride_dq_h + rows * stride_dq_l + offs_d[None, :],
             dq.to(dQ_ptr.dtype.element_ty), mask=row_ok[:, None])
    if COUNT_VISITS:
        tl.store(block_visits_ptr + row_index, tl.zeros([BLOCK_M], tl.int32) + num_iters, mask=row_ok)


@triton.jit(do_not_specialize=["has_mask"])
def _attention_bwd_dkdv_kernel(
    Q_ptr, K_ptr, V_ptr, dOut_ptr,            # (B, H, L, D), (B, H, S, D) x 2, (B, H, L, D)
    dK_ptr, dV_ptr,                           # (B, H, S, D) in k's dtype
    LSE_ptr, Delta_ptr,                       # (B, H, L) fp32, from forward and the dQ kernel
    key_padding_mask_ptr,                     # (B, S) uint8 (read if has_mask)
    block_visits_ptr,                         # (B, H, S) int32, query blocks visited (COUNT_VISITS)
    stride_q_b, stride_q_h, stride_q_l,
    stride_k_b, stride_k_h, stride_k_s,
    stride_v_b, stride_v_h, stride_v_s,
    stride_do_b, stride_do_h, stride_do_l,
    stride_dk_b, stride_dk_h, stride_dk_s,
    stride_dv_b, stride_dv_h, stride_dv_s,
    num_heads, seq_len_q, seq_len_k,
    has_mask,
    sm_scale, qk_scale,
    dropout_p, DropoutKey_ptr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    COUNT_VISITS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    # one program per (key block, batch * head), on transposed tiles (keys x queries)
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    b64 = batch.to(tl.int64)
    h64 = head.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    cols = offs_n.to(tl.int64)[:, None]
    masked = has_mask != 0

    key_in = offs_n < seq_len_k
    padded = tl.load(key_padding_mask_ptr + b64 * seq_len_k + offs_n, mask=key_in & masked, other=0)
    key_ok = key_in & (padded == 0)
    k = tl.load(K_ptr + b64 * stride_k_b + h64 * stride_k_h + cols * stride_k_s + offs_d[None, :],
                mask=key_ok[:, None], other=0.0)
    v = tl.load(V_ptr + b64 * stride_v_b + h64 * stride_v_h + cols * stride_v_s + offs_d[None, :],
                mask=key_ok[:, None], other=0.0)
    q_base = Q_ptr + b64 * stride_q_b + h64 * stride_q_h
    do_base = dOut_ptr + b64 * stride_do_b + h64 * stride_do_h

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    # a fully padded key block loops over no query block and stores zeros
    num_iters = tl.cdiv(seq_len_q, BLOCK_M) * tl.max(key_ok.to(tl.int32), 0)
    for it in range(0, num_iters):
        offs_m = it * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < seq_len_q
        rows = offs_m.to(tl.int64)[:, None]
        q = tl.load(q_base + rows * stride_q_l + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(do_base + rows * stride_do_l + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        row_index = pid_bh.to(tl.int64) * seq_len_q + offs_m
        lse = tl.load(LSE_ptr + row_index, mask=row_ok, other=0.0)
        delta = tl.load(Delta_ptr + row_index, mask=row_ok, other=0.0)

        scores_t = _dot(k, tl.trans(q), DOT_PRECISION, UPCAST_DOT) * qk_scale
        scores_t = tl.where(key_ok[:, None] & row_ok[None, :], scores_t, float("-inf"))
        p_t = tl.math.exp2(scores_t - lse[None, :])
        dp_t = _dot(v, tl.trans(do), DOT_PRECISION, UPCAST_DOT)
        p_dropped = p_t
        if dropout_p > 0.0:
            query_ids = offs_m[None, :] + tl.zeros([BLOCK_N, BLOCK_M], tl.int32)
            key_ids = offs_n[:, None] + tl.zeros([BLOCK_N, BLOCK_M], tl.int32)
            keep = _attention_dropout_keep(tl.load(DropoutKey_ptr), tl.load(DropoutKey_ptr + 1), pid_bh, query_ids,
                                           key_ids, dropout_p)
            inv_keep = 1.0 / (1.0 - dropout_p)
            p_dropped = tl.where(keep, p_t * inv_keep, 0.0)
            dp_t = tl.where(keep, dp_t * inv_keep, 0.0)
        dv += _dot(p_dropped.to(do.dtype), do, DOT_PRECISION, UPCAST_DOT)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q, DOT_PRECISION, UPCAST_DOT)

    # epilogue
    dk = dk * sm_scale
    tl.store(dK_ptr + b64 * stride_dk_b + h64 * stride_dk_h + cols * stride_dk_s + offs_d[None, :],
             dk.to(dK_ptr.dtype.element_ty), mask=key_in[:, None])
    tl.store(dV_ptr + b64 * stride_dv_b + h64 * stride_dv_h + cols * stride_dv_s + offs_d[None, :],
             dv.to(dV_ptr.dtype.element_ty), mask=key_in[:, None])
    if COUNT_VISITS:
        tl.store(block_visits_ptr + pid_bh.to(tl.int64) * seq_len_k + offs_n,
                 tl.zeros([BLOCK_N], tl.int32) + num_iters, mask=key_in)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _mha_layout_empty(batch: int, heads: int, seq: int, head_dim: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised (B, H, seq, D) view of (seq, B, H, D) storage, the layout MHA reshapes from."""
    return torch.empty(seq, batch, heads, head_dim, dtype=like.dtype, device=like.device).permute(1, 2, 0, 3)


def kv_block_table(key_padding_mask: torch.Tensor, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per batch, the key blocks that hold at least one valid key.

    key_padding_mask: (B, S) bool, True = padded. Returns (index, count): index
    (B, cdiv(S, block_n)) int32 with the valid blocks first, in key order; count
    (B,) int32. Built with torch ops only: no host sync.
    """
    batch, seq_k = key_padding_mask.shape
    num_blocks = triton.cdiv(seq_k, block_n)
    valid = torch.nn.functional.pad(~key_padding_mask, (0, num_blocks * block_n - seq_k), value=False)
    block_has_key = valid.view(batch, num_blocks, block_n).any(dim=2)
    count = block_has_key.sum(dim=1, dtype=torch.int32)
    # a stable sort on "is empty" puts the valid blocks first and keeps them in key order
    index = torch.sort((~block_has_key).to(torch.uint8), dim=1, stable=True).indices.to(torch.int32)
    return index.contiguous(), count


class KeyBlockTable(NamedTuple):
    """A mask's skip list for key blocks of `block_n` keys, as the forward and dQ kernels read it.

    Built by `key_block_table` (index and count are `kv_block_table`'s); a
    caller that runs several attentions over one mask (DETR: 6 encoder
    self-attentions, 6 decoder cross-attentions) builds it once and passes it to
    each as `kv_table`.
    """
    index: torch.Tensor     # (B, cdiv(S, block_n)) int32: the blocks with a valid key first, in key order
    count: torch.Tensor     # (B,) int32: how many blocks have a valid key
    block_n: int            # keys per block


def key_block_table(key_padding_mask: torch.Tensor, dtype: torch.dtype) -> KeyBlockTable:
    """The skip list of `key_padding_mask` ((B, S) bool, True = padded) for attention over `dtype` inputs.

    For the key blocks (BLOCK_N) of the forward and dQ kernels at that dtype,
    which share them (`_configs()`). Torch ops only, no host sync. Pass it as
    `attention(..., kv_table=)` to every attention over this mask and dtype;
    it goes stale if the mask is modified in place.
    """
    block_n = block_config("fwd", dtype)["BLOCK_N"]
    return KeyBlockTable(*kv_block_table(key_padding_mask, block_n), block_n)


def _table_for(key_padding_mask, kv_table, block_n) -> KeyBlockTable:
    """`kv_table` when it is for key blocks of `block_n` keys, else a table built now.

    A given table's shapes are checked against the mask (metadata only): the
    kernels would read past a table built for another batch or length.
    """
    if kv_table is None or kv_table.block_n != block_n:
        return KeyBlockTable(*kv_block_table(key_padding_mask, block_n), block_n)
    batch, seq_k = key_padding_mask.shape
    index, count = kv_table.index, kv_table.count
    expected = (batch, triton.cdiv(seq_k, block_n))
    if (tuple(index.shape) != expected or tuple(count.shape) != (batch,) or index.dtype != torch.int32
            or count.dtype != torch.int32 or index.device != key_padding_mask.device
            or count.device != key_padding_mask.device):
        raise ValueError(f"attention: kv_table does not fit key_padding_mask {tuple(key_padding_mask.shape)}: "
                         f"expected int32 index {expected} and count ({batch},) on {key_padding_mask.device}; "
                         f"got index {tuple(index.shape)} {index.dtype} on {index.device}, count "
                         f"{tuple(count.shape)} {count.dtype}")
    return KeyBlockTable(index.contiguous(), count.contiguous(), block_n)


def _mask_args(key_padding_mask, kv_table, block_n, like):
    """(mask as uint8, table, placeholder) kernel arguments; table: a KeyBlockTable for `block_n`, or None.

    `kv_table` is used when it is for `block_n`, else one is built. Pointers a
    launch does not read (no mask, no visit count) get a one-element int32
    placeholder, so the pointer types always match `aot_configs()`.
    """
    placeholder = torch.empty(1, dtype=torch.int32, device=like.device)
    if key_padding_mask is None:
        return placeholder.view(torch.uint8), None, placeholder
    table = _table_for(key_padding_mask, kv_table, block_n)
    return key_padding_mask.contiguous().view(torch.uint8), table, placeholder


def attention_forward(q, k, v, key_padding_mask=None, dropout_p=0.0, scale=None, seed=0, rng_offset=0,
                      block_visits=None, kv_table=None, dropout_key=None):
    """Launch the forward kernel.

    q: (B, H, L, D), k and v: (B, H, S, D), any strides; key_padding_mask: (B, S)
    bool or None; seed, rng_offset: ints in [0, 2**31) keying the dropout RNG, or dropout_key: the (2,) int32
    device tensor of them (`fastdetr.kernels.common.dropout_key`), which wins.
    block_visits: optional (B, H, L) int32 tensor, filled with the number of key
    blocks the program of each query row visited (a test instrument).
    kv_table: the mask's KeyBlockTable (`key_block_table`), used when it is for
    this kernel's key blocks, else (or when None) built here; unused without a mask.
    Returns (out (B, H, L, D) in q's dtype, lse (B, H, L) fp32 in log2 units,
    the KeyBlockTable used, or None without a mask, for backward).
    """
    _check_inputs(q, k, v, key_padding_mask, dropout_p)
    q, k, v = unit_last_stride(q), unit_last_stride(k), unit_last_stride(v)
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    if batch * heads > MAX_BATCH_HEADS:
        raise ValueError(f"attention: B * H = {batch * heads} exceeds the kernel's grid limit {MAX_BATCH_HEADS} "
                         f"(q {tuple(q.shape)})")
    scale = head_dim ** -0.5 if scale is None else float(scale)
    config = block_config("fwd", q.dtype)
    out = _mha_layout_empty(batch, heads, seq_q, head_dim, q)
    lse = torch.empty(batch, heads, seq_q, dtype=torch.float32, device=q.device)
    if seq_q == 0 or seq_k == 0:
        return out.zero_(), lse.fill_(float("inf")), None

    mask_u8, table, placeholder = _mask_args(key_padding_mask, kv_table, config["BLOCK_N"], q)
    key = launch_key(dropout_key, seed, rng_offset, q.device)
    grid = (triton.cdiv(seq_q, config["BLOCK_M"]), batch * heads)
    _attention_fwd_kernel[grid](
        q, k, v, out, lse,
        mask_u8, *(table[:2] if table is not None else (placeholder, placeholder)),
        block_visits if block_visits is not None else placeholder,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        heads, seq_q, seq_k, triton.cdiv(seq_k, config["BLOCK_N"]),
        int(key_padding_mask is not None),
        scale * _LOG2E,
        float(dropout_p), key,
        HEAD_DIM=head_dim, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
        COUNT_VISITS=block_visits is not None, DOT_PRECISION=config["DOT_PRECISION"],
        UPCAST_DOT=_upcast_dot(q.dtype), num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return out, lse, table


def attention_backward(grad_out, q, k, v, out, lse, key_padding_mask=None, kv_table=None, dropout_p=0.0,
                       scale=None, seed=0, rng_offset=0, dq_block_visits=None, dkv_block_visits=None,
                       dropout_key=None):
    """Launch the backward kernels: dQ (with delta = rowsum(dO * O) fused in), then dK/dV.

    Two kernels rather than one with atomics: the dK/dV kernel owns a key block
    and the dQ kernel a query block, so every gradient is written once, in its
    dtype, deterministically, with no fp32 dQ buffer to zero and convert; the
    price is computing q k^T a second time. Delta is computed by the dQ kernel
    (which loads dO anyway) and read by the dK/dV kernel launched after it: one
    launch fewer than a separate preprocess kernel.

    grad_out, q, out: (B, H, L, D); k, v: (B, H, S, D); lse: (B, H, L) from
    forward; kv_table: forward's KeyBlockTable, used when it is for the dQ
    kernel's key blocks (it always is: forward and dQ share BLOCK_N), else (or
    when None) built here; a plain (index, count) pair is taken as forward's.
    dq_block_visits (B, H, L) / dkv_block_visits (B, H, S): optional int32 test
    instruments (key blocks per dQ program / query blocks per dK/dV program).
    Returns (dq, dk, dv) in the inputs' dtype.
    """
    grad_out, q, k, v, out = (unit_last_stride(t) for t in (grad_out, q, k, v, out))
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    scale = head_dim ** -0.5 if scale is None else float(scale)
    dq_config, dkdv_config = block_config("dq", q.dtype), block_config("dkdv", q.dtype)
    dq = _mha_layout_empty(batch, heads, seq_q, head_dim, q)
    dk = _mha_layout_empty(batch, heads, seq_k, head_dim, k)
    dv = _mha_layout_empty(batch, heads, seq_k, head_dim, v)
    if seq_q == 0 or seq_k == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()

    if kv_table is not None and not isinstance(kv_table, KeyBlockTable):
        kv_table = KeyBlockTable(*kv_table, block_config("fwd", q.dtype)["BLOCK_N"])
    mask_u8, table, placeholder = _mask_args(key_padding_mask, kv_table, dq_config["BLOCK_N"], q)
    delta = torch.empty(batch, heads, seq_q, dtype=torch.float32, device=q.device)
    key = launch_key(dropout_key, seed, rng_offset, q.device)
    has_mask = int(key_padding_mask is not None)
    _attention_bwd_dq_kernel[(triton.cdiv(seq_q, dq_config["BLOCK_M"]), batch * heads)](
        q, k, v, out, grad_out, dq, lse, delta,
        mask_u8, *(table[:2] if table is not None else (placeholder, placeholder)),
        dq_block_visits if dq_block_visits is not None else placeholder,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        heads, seq_q, seq_k, triton.cdiv(seq_k, dq_config["BLOCK_N"]),
        has_mask,
        scale, scale * _LOG2E,
        float(dropout_p), key,
        HEAD_DIM=head_dim, BLOCK_M=dq_config["BLOCK_M"], BLOCK_N=dq_config["BLOCK_N"],
        COUNT_VISITS=dq_block_visits is not None, DOT_PRECISION=dq_config["DOT_PRECISION"],
        UPCAST_DOT=_upcast_dot(q.dtype), num_warps=dq_config["num_warps"], num_stages=dq_config["num_stages"],
    )
    _attention_bwd_dkdv_kernel[(triton.cdiv(seq_k, dkdv_config["BLOCK_N"]), batch * heads)](
        q, k, v, grad_out, dk, dv, lse, delta,
        mask_u8,
        dkv_block_visits if dkv_block_visits is not None else placeholder,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        heads, seq_q, seq_k,
        has_mask,
        scale, scale * _LOG2E,
        float(dropout_p), key,
        HEAD_DIM=head_dim, BLOCK_M=dkdv_config["BLOCK_M"], BLOCK_N=dkdv_config["BLOCK_N"],
        COUNT_VISITS=dkv_block_visits is not None, DOT_PRECISION=dkdv_config["DOT_PRECISION"],
        UPCAST_DOT=_upcast_dot(q.dtype), num_warps=dkdv_config["num_warps"], num_stages=dkdv_config["num_stages"],
    )
    return dq, dk, dv


_KERNELS = {"fwd": "_attention_fwd_kernel", "dq": "_attention_bwd_dq_kernel",
            "dkdv": "_attention_bwd_dkdv_kernel"}
_POINTER_TYPES = {"LSE_ptr": "*fp32", "Delta_ptr": "*fp32", "kv_block_index_ptr": "*i32",
                  "kv_block_count_ptr": "*i32", "block_visits_ptr": "*i32", "key_padding_mask_ptr": "*u8"}
_FLOAT_ARGS = {"qk_scale", "sm_scale", "dropout_p"}


def aot_configs() -> list[KernelConfig]:
    """Every kernel variant the launchers can choose: 3 kernels x 3 dtypes x head dims {32, 64}.

    (Masking and dropout are runtime arguments; the COUNT_VISITS test instrument
    is left out.) Strides and sizes are typed i32, as the launchers pass them for
    tensors under 2**31 elements.
    """
    configs = []
    for kernel_name, kernel_attr in _KERNELS.items():
        kernel = globals()[kernel_attr]
        for dtype, dtype_name in TRITON_DTYPE_NAMES.items():
            config = block_config(kernel_name, dtype)
            for head_dim in HEAD_DIMS:
                constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
                                  COUNT_VISITS=False, DOT_PRECISION=config["DOT_PRECISION"],
                                  UPCAST_DOT=False)
                options = dict(num_warps=config["num_warps"], num_stages=config["num_stages"])
                signature = aot_signature(kernel, dtype_name, _POINTER_TYPES, _FLOAT_ARGS)
                configs.append(KernelConfig(kernel, signature, constexprs, options))
    return configs


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------

# The kernels as torch.library custom ops in the `fastdetr` namespace, so torch.compile (fullgraph) and CUDA
# graphs hold them as single nodes: a fake implementation gives the outputs' shapes, dtypes and strides, and
# the forward op's registered autograd calls the backward op. The mask's block table travels as its two
# tensors and block_n; scale, dropout and its Philox key as plain numbers.

@torch.library.custom_op("fastdetr::attention_fwd", mutates_args=())
def attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
                     block_index: torch.Tensor | None, block_count: torch.Tensor | None, block_n: int,
                     dropout_p: float, scale: float, dropout_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, L, D) as a view of (L, B, H, D) storage, lse (B, H, L) fp32): `attention_forward`."""
    table = None if block_index is None else KeyBlockTable(block_index, block_count, block_n)
    out, lse, _ = attention_forward(q, k, v, key_padding_mask, dropout_p, scale, kv_table=table,
                                    dropout_key=dropout_key)
    return out, lse


@attention_fwd_op.register_fake
def _(q, k, v, key_padding_mask, block_index, block_count, block_n, dropout_p, scale, dropout_key):
    batch, heads, seq_q, head_dim = q.shape
    return (_mha_layout_empty(batch, heads, seq_q, head_dim, q),
            q.new_empty((batch, heads, seq_q), dtype=torch.float32))


@torch.library.custom_op("fastdetr::attention_bwd", mutates_args=())
def attention_bwd_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                     lse: torch.Tensor, key_padding_mask: torch.Tensor | None, block_index: torch.Tensor | None,
                     block_count: torch.Tensor | None, block_n: int, dropout_p: float, scale: float,
                     dropout_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), each a (B, H, seq, D) view of (seq, B, H, D) storage: `attention_backward`."""
    table = None if block_index is None else KeyBlockTable(block_index, block_count, block_n)
    return attention_backward(grad_out, q, k, v, out, lse, key_padding_mask, table, dropout_p, scale,
                              dropout_key=dropout_key)


@attention_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, key_padding_mask, block_index, block_count, block_n, dropout_p, scale,
      dropout_key):
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    return (_mha_layout_empty(batch, heads, seq_q, head_dim, q), _mha_layout_empty(batch, heads, seq_k, head_dim, k),
            _mha_layout_empty(batch, heads, seq_k, head_dim, v))


def _attention_setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, block_index, block_count, block_n, dropout_p, scale, key = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, block_index, block_count, key)
    ctx.numbers = (block_n, dropout_p, scale)


def _attention_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_padding_mask, block_index, block_count, key = ctx.saved_tensors
    dq, dk, dv = torch.ops.fastdetr.attention_bwd(grad_out, q, k, v, out, lse, key_padding_mask, block_index,
                                                  block_count, *ctx.numbers, key)
    return dq, dk, dv, None, None, None, None, None, None, None


torch.library.register_autograd("fastdetr::attention_fwd", _attention_backward, setup_context=_attention_setup_context)


def attention(q, k, v, key_padding_mask=None, dropout_p=0.0, scale=None, kv_table=None):
    """Scaled dot-product attention with a key padding mask and attention dropout.

    q: (B, H, L, D); k, v: (B, H, S, D); any strides (views of the (L, B, H, D)
    storage `nn.MultiheadAttention` uses are read in place); D in {32, 64}.
    key_padding_mask: (B, S) bool, True = ignore that key, or None.
    dropout_p: probability of zeroing an attention weight (kept weights are scaled
    by 1 / (1 - dropout_p)); its key is drawn on q's device (`common.dropout_key`), no host sync.
    scale: multiplies q k^T; default 1 / sqrt(D).
    kv_table: optional KeyBlockTable of key_padding_mask, `key_block_table(mask,
    q.dtype)`, built once by a caller that runs several attentions over one mask;
    used when it is for the kernels' key blocks, else (or when None) this call
    builds its own. The caller keeps it in step with the mask (rebuild after an
    in-place change). Unused without a mask or on the plain-PyTorch path.
    Returns (B, H, L, D) in q's dtype (on the Triton path a view of (L, B, H, D)
    storage). A query row whose keys are all padded returns zeros and passes zero
    gradients, where PyTorch's softmax would return NaN.
    Runs the Triton kernels when `fastdetr.backend.use_triton` says so and the
    dtype is one of DTYPES, else `attention_ref`.
    """
    _check_inputs(q, k, v, key_padding_mask, dropout_p)
    if q.dtype not in DTYPES or not use_triton(q, k, v, key_padding_mask):
        return attention_ref(q, k, v, key_padding_mask, dropout_p, scale)
    key = dropout_key(q.device) if dropout_p > 0.0 else unused_dropout_key(q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    table = (None if key_padding_mask is None
             else _table_for(key_padding_mask, kv_table, block_config("fwd", q.dtype)["BLOCK_N"]))
    out, _ = torch.ops.fastdetr.attention_fwd(q, k, v, key_padding_mask, *(table or (None, None, 0)),
                                              float(dropout_p), scale, key)
    return out


def attention_ref(q, k, v, key_padding_mask=None, dropout_p=0.0, scale=None, dropout_keep=None):
    """Plain-PyTorch attention, the oracle and the fallback; math in the inputs' dtype.

    Same arguments and result as `attention` (fully padded rows -> zeros). With
    dropout_p > 0 the keep mask is `dropout_keep` ((B, H, L, S) bool, True = keep)
    when given, else drawn by torch's dropout.
    """
    _check_inputs(q, k, v, key_padding_mask, dropout_p)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    probs_zero = None
    if key_padding_mask is not None:
        # all keys padded: softmax of all -inf is NaN (also in its gradient); such
        # rows skip the fill and get zeroed after the softmax instead
        probs_zero = key_padding_mask.all(dim=1)
        fill = key_padding_mask & ~probs_zero[:, None]
        scores = scores.masked_fill(fill[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if probs_zero is not None:
        probs = probs.masked_fill(probs_zero[:, None, None, None], 0.0)
    if dropout_p > 0.0:
        if dropout_keep is None:
            probs = torch.nn.functional.dropout(probs, dropout_p, training=True)
        else:
            probs = probs * dropout_keep / (1.0 - dropout_p)
    return torch.matmul(probs, v)
