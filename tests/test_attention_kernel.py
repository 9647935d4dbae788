"""fastdetr.kernels.attention: the flash-attention kernels against float64 math.

The kernels run on the CPU through Triton's interpreter (conftest sets
TRITON_INTERPRET=1), so sizes stay small: B = H = 2 with DETR's odd and tiny
sequence lengths. Near the end, benchmarks/attention.py is run on the CPU (it skips)
and its cases on tiny shapes through the interpreter; the last test checks the
kernel variants that tests/test_kernel_report.py compiles ahead of time.
"""
from __future__ import annotations

import functools
import math
import subprocess
import sys
from pathlib import Path

import kernel_checks
import pytest
import torch
from kernel_checks import TOLERANCES, dtype_id
from torch.utils._python_dispatch import TorchDispatchMode

from fastdetr.kernels.attention import (
    KeyBlockTable,
    _check_inputs,
    aot_configs,
    attention,
    attention_backward,
    attention_forward,
    attention_ref,
    block_config,
    key_block_table,
    kv_block_table,
)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, the norm floored at 1: with one valid key the exact dq, dk are 0."""
    return kernel_checks.relative_error(actual, expected, norm_floor=1.0)


def oracle(q, k, v, key_padding_mask=None, scale=None, keep=None, dropout_p=0.0):
    """Float64 attention written out here, independent of the module: fully padded rows give 0."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q @ k.transpose(-2, -1) * scale
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).clamp_min(-1e300).detach()   # -inf rows: exp(-inf) = 0
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(denom == 0, torch.ones_like(denom), denom)
    if keep is not None:
        probs = probs * keep / (1.0 - dropout_p)
    return probs @ v


def make_qkv(batch, heads, seq_q, seq_k, head_dim, dtype, layout, generator):
    """q (B, H, L, D), k, v (B, H, S, D) with fresh random values.

    layout "mha": views of (L, B, H*D) and one packed (S, B, 2*H*D) buffer, as
    nn.MultiheadAttention slices them (non-contiguous, last stride 1);
    "contiguous": plain (B, H, *, D); "transposed": last stride != 1 (copied by the launcher).
    """
    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    if layout == "mha":
        q = randn(seq_q, batch, heads * head_dim).view(seq_q, batch, heads, head_dim).permute(1, 2, 0, 3)
        kv = randn(seq_k, batch, 2 * heads * head_dim).view(seq_k, batch, 2, heads, head_dim)
        k, v = kv[:, :, 0].permute(1, 2, 0, 3), kv[:, :, 1].permute(1, 2, 0, 3)
        assert not k.is_contiguous() and k.stride(-1) == 1
    elif layout == "contiguous":
        q = randn(batch, heads, seq_q, head_dim)
        k, v = randn(batch, heads, seq_k, head_dim), randn(batch, heads, seq_k, head_dim)
    elif layout == "transposed":
        q = randn(batch, heads, head_dim, seq_q).transpose(-1, -2)
        k = randn(batch, heads, head_dim, seq_k).transpose(-1, -2)
        v = randn(batch, heads, head_dim, seq_k).transpose(-1, -2)
    else:
        raise ValueError(layout)
    return q, k, v


def make_mask(kind, batch, seq_k, generator):
    """(B, S) bool key padding masks; batches differ so per-batch skip lists differ.

    "half": batch 0 pads its last half, batch 1 a random ~half (scattered, inside blocks);
    "all_but_one": batch 0 pads every key but a random one, batch 1 its first half.
    """
    if kind == "none":
        return None
    mask = torch.zeros(batch, seq_k, dtype=torch.bool)
    if kind == "half":
        mask[0, seq_k - seq_k // 2:] = True
        mask[1] = torch.rand(seq_k, generator=generator) < 0.5
        mask[1, torch.randint(seq_k, (1,), generator=generator)] = False
    elif kind == "all_but_one":
        mask[0] = True
        mask[0, torch.randint(seq_k, (1,), generator=generator)] = False
        mask[1, : seq_k // 2] = True
    else:
        raise ValueError(kind)
    return mask


def check_against_oracle(q, k, v, mask, dtype, generator, dropout_p=0.0, **launch):
    """Forward and dq/dk/dv through `attention` (or the launchers with `launch`) vs the float64 oracle."""
    fwd_tol, grad_tol = TOLERANCES[dtype]
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, mask)
    assert out.shape == q.shape and out.dtype == dtype
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = oracle(q64, k64, v64, mask)
    ref_dq, ref_dk, ref_dv = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
    assert relative_error(out, ref) <= fwd_tol
    for name, actual, expected in (("dq", dq, ref_dq), ("dk", dk, ref_dk), ("dv", dv, ref_dv)):
        assert actual.dtype == dtype
        assert relative_error(actual, expected) <= grad_tol, name


# (L, S, D, mask, layout, H): every L and S in {1, 7, 100, 129, 257} and both D,
# each mask kind with several shapes, without crossing all of them (B = 2; one
# head for 257 x 257, the interpreter's slowest case).
FP32_CASES = [
    (1, 1, 32, "none", "contiguous", 2),
    (7, 7, 64, "half", "mha", 2),
    (100, 100, 32, "none", "mha", 2),             # decoder self-attention
    (100, 257, 32, "half", "mha", 2),             # cross-attention over padded memory
    (129, 129, 64, "all_but_one", "mha", 2),
    (257, 257, 32, "half", "mha", 1),             # encoder self-attention
    (7, 129, 32, "all_but_one", "contiguous", 2),
    (257, 7, 64, "none", "mha", 2),
    (1, 100, 64, "half", "mha", 2),
    (129, 1, 32, "none", "transposed", 2),
    (100, 7, 64, "all_but_one", "transposed", 2),
]


@pytest.mark.parametrize("seq_q,seq_k,head_dim,mask_kind,layout,heads", FP32_CASES)
def test_fp32_matches_float64(seq_q, seq_k, head_dim, mask_kind, layout, heads):
    generator = torch.Generator().manual_seed(seq_q * 1000 + seq_k + head_dim)
    q, k, v = make_qkv(2, heads, seq_q, seq_k, head_dim, torch.float32, layout, generator)
    check_against_oracle(q, k, v, make_mask(mask_kind, 2, seq_k, generator), torch.float32, generator)


# (dtype, L, S, D, mask, layout): both 16-bit dtypes x both D x every mask kind,
# once each, on odd sizes and all three layouts. Their tiles (64-wide forward and
# dQ key blocks) differ from fp32's, so they are a separate set of variants. bf16
# runs with UPCAST_DOT under the interpreter (its own bf16 tl.dot is wrong).
HALF_CASES = [
    (torch.float16, 1, 257, 32, "half", "mha"),
    (torch.float16, 129, 7, 32, "none", "contiguous"),
    (torch.float16, 100, 100, 32, "all_but_one", "mha"),
    (torch.float16, 7, 129, 64, "none", "mha"),
    (torch.float16, 257, 100, 64, "half", "transposed"),
    (torch.float16, 129, 257, 64, "all_but_one", "mha"),
    (torch.bfloat16, 257, 1, 32, "none", "mha"),
    (torch.bfloat16, 100, 257, 32, "half", "mha"),              # cross-attention over padded memory
    (torch.bfloat16, 7, 100, 32, "all_but_one", "transposed"),
    (torch.bfloat16, 129, 129, 64, "none", "mha"),
    (torch.bfloat16, 1, 7, 64, "half", "contiguous"),
    (torch.bfloat16, 257, 129, 64, "all_but_one", "mha"),
]


@pytest.mark.parametrize("dtype,seq_q,seq_k,head_dim,mask_kind,layout", HALF_CASES, ids=dtype_id)
def test_half_precision_matches_float64(dtype, seq_q, seq_k, head_dim, mask_kind, layout):
    generator = torch.Generator().manual_seed(seq_q * 1000 + seq_k + head_dim)
    q, k, v = make_qkv(2, 2, seq_q, seq_k, head_dim, dtype, layout, generator)
    check_against_oracle(q, k, v, make_mask(mask_kind, 2, seq_k, generator), dtype, generator)


def test_oracle_agrees_with_torch_sdpa():
    """The float64 oracle is right where PyTorch is defined (no fully padded rows)."""
    generator = torch.Generator().manual_seed(1)
    q, k, v = make_qkv(2, 2, 7, 100, 32, torch.float64, "contiguous", generator)
    mask = make_mask("half", 2, 100, generator)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=~mask[:, None, None, :])
    assert torch.allclose(oracle(q, k, v, mask), expected, rtol=1e-12, atol=1e-12)


def test_attention_ref_matches_oracle_and_is_the_fallback(monkeypatch):
    generator = torch.Generator().manual_seed(2)
    q, k, v = make_qkv(2, 2, 7, 129, 64, torch.float64, "mha", generator)
    mask = make_mask("half", 2, 129, generator)
    mask[0] = True   # a fully padded batch: zeros, not NaN
    expected = oracle(q, k, v, mask)
    assert torch.allclose(attention_ref(q, k, v, mask), expected, rtol=1e-12, atol=1e-12)
    monkeypatch.setenv("TRITON_INTERPRET", "0")   # CPU tensors without the interpreter -> plain PyTorch
    assert torch.equal(attention(q, k, v, mask), attention_ref(q, k, v, mask))


@pytest.mark.parametrize("dtype,dropout_p", [
    (torch.float32, 0.0), (torch.float32, 0.3), (torch.float16, 0.0), (torch.bfloat16, 0.3),
], ids=dtype_id)
def test_fully_padded_rows_give_zeros_and_zero_grads(dtype, dropout_p):
    generator = torch.Generator().manual_seed(3)
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 2, 100, 129, 32, dtype, "contiguous", generator))
    mask = make_mask("half", 2, 129, generator)
    mask[0] = True
    out = attention(q, k, v, mask, dropout_p=dropout_p)
    grad_out = torch.randn(out.shape, generator=generator).to(dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    for tensor in (out, dq, dk, dv):
        assert torch.isfinite(tensor).all()
        assert torch.equal(tensor[0], torch.zeros_like(tensor[0]))
    assert out[1].abs().sum() > 0 and dq[1].abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------

def recover_keep_mask(batch, heads, seq_q, seq_k, head_dim, dropout_p, seed, rng_offset):
    """The forward kernel's own keep mask (B, H, L, S), read off its output.

    With v one-hot over a chunk of `head_dim` keys, out[l, j] = P[l, key j] * keep / (1 - p),
    and P > 0 for random scores, so the nonzero outputs are exactly the kept weights.
    """
    generator = torch.Generator().manual_seed(11)
    q = torch.randn(batch, heads, seq_q, head_dim, generator=generator)
    k = torch.randn(batch, heads, seq_k, head_dim, generator=generator)
    keep = torch.empty(batch, heads, seq_q, seq_k, dtype=torch.bool)
    for start in range(0, seq_k, head_dim):
        width = min(head_dim, seq_k - start)
        v = torch.zeros(batch, heads, seq_k, head_dim)
        v[:, :, start:start + width, :width] = torch.eye(width)
        out, _, _ = attention_forward(q, k, v, None, dropout_p, None, seed, rng_offset)
        keep[..., start:start + width] = out[..., :width] != 0
        # the kept weights are the softmax weights scaled by 1 / (1 - p)
        probs = torch.softmax(q.double() @ k.double().transpose(-2, -1) * head_dim ** -0.5, dim=-1)
        expected = probs[..., start:start + width] * keep[..., start:start + width] / (1.0 - dropout_p)
        assert torch.allclose(out[..., :width].double(), expected, rtol=1e-5, atol=1e-7)
    return keep


@functools.lru_cache(maxsize=None)
def cached_keep_mask(*args) -> torch.Tensor:
    """`recover_keep_mask`, computed once per argument set (the slow part of the dropout tests); read only."""
    return recover_keep_mask(*args)


def test_dropout_keep_rate_and_seeds():
    batch, heads, seq_q, seq_k, dropout_p = 2, 2, 129, 64, 0.25
    keep = recover_keep_mask(batch, heads, seq_q, seq_k, 64, dropout_p, seed=1234, rng_offset=5)
    n = keep.numel()
    sigma = math.sqrt(dropout_p * (1 - dropout_p) / n)
    assert abs(keep.float().mean().item() - (1 - dropout_p)) <= 3 * sigma
    # no structure along any axis: every (b, h) slice and every key column keeps about 1 - p
    per_head = keep.float().mean(dim=(2, 3))
    assert (per_head - (1 - dropout_p)).abs().max() <= 4 * math.sqrt(dropout_p * (1 - dropout_p) / (n / 4))
    # same seed -> same mask; another seed or offset -> another mask
    assert torch.equal(keep, recover_keep_mask(batch, heads, seq_q, seq_k, 64, dropout_p, 1234, 5))
    for seed, rng_offset in ((1235, 5), (1234, 6)):
        other = recover_keep_mask(batch, heads, seq_q, seq_k, 64, dropout_p, seed, rng_offset)
        assert (other != keep).float().mean() > 0.2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_dropout_backward_uses_the_forward_mask(dtype):
    """Forward and gradients equal the float64 oracle's evaluated with the mask recovered from the
    (fp32) forward kernel. The mask depends on the element only, not on the tiles: bf16 runs other
    block sizes and must draw the same mask."""
    batch, heads, seq_q, seq_k, head_dim, dropout_p = 2, 2, 100, 129, 32, 0.2
    seed, rng_offset = 99, 7
    keep = cached_keep_mask(batch, heads, seq_q, seq_k, head_dim, dropout_p, seed, rng_offset)
    generator = torch.Generator().manual_seed(5)
    q, k, v = make_qkv(batch, heads, seq_q, seq_k, head_dim, dtype, "mha", generator)
    mask = make_mask("half", batch, seq_k, generator)
    out, lse, table = attention_forward(q, k, v, mask, dropout_p, None, seed, rng_offset)
    grad_out = torch.randn(out.shape, generator=generator).to(dtype)
    dq, dk, dv = attention_backward(grad_out, q, k, v, out, lse, mask, table, dropout_p, None, seed, rng_offset)

    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = oracle(q64, k64, v64, mask, keep=keep, dropout_p=dropout_p)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
    fwd_tol, grad_tol = TOLERANCES[dtype]
    assert relative_error(out, ref) <= fwd_tol
    for name, actual, expected in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads):
        assert relative_error(actual, expected) <= grad_tol, name


def test_attention_dropout_follows_torch_manual_seed():
    generator = torch.Generator().manual_seed(6)
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 2, 7, 100, 32, torch.float32, "mha", generator))
    mask = make_mask("half", 2, 100, generator)
    torch.manual_seed(42)
    first = attention(q, k, v, mask, dropout_p=0.1)
    torch.manual_seed(42)
    again = attention(q, k, v, mask, dropout_p=0.1)
    torch.manual_seed(43)
    other = attention(q, k, v, mask, dropout_p=0.1)
    assert torch.equal(first, again) and not torch.equal(first, other)
    no_dropout = attention(q, k, v, mask, dropout_p=0.0)
    assert relative_error(no_dropout, oracle(q, k, v, mask)) <= 1e-5
    grads = torch.autograd.grad(first, (q, k, v), torch.ones_like(first))
    assert all(torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------------------------------------
# Padded key blocks: skipped, never loaded
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_fully_padded_key_blocks_are_skipped(dtype):
    """The kernels count the blocks each program visits; fully padded key blocks are not among them.

    Both block-size families: fp32's, and the 16-bit one (64-key blocks) that DETR runs in bf16.
    """
    batch, heads, seq_q, seq_k, head_dim = 2, 2, 65, 257, 32
    generator = torch.Generator().manual_seed(8)
    q, k, v = make_qkv(batch, heads, seq_q, seq_k, head_dim, dtype, "mha", generator)
    mask = torch.zeros(batch, seq_k, dtype=torch.bool)
    mask[0, 64:192] = True     # whole blocks for every block size used (16, 32, 64)
    mask[0, 200] = True        # and one key in a block that stays
    mask[1, 180:] = True       # a padded tail, ~30% of the keys

    def blocks_with_a_key(block_n):
        return [sum(not mask[b, i:i + block_n].all() for i in range(0, seq_k, block_n)) for b in range(batch)]

    fwd_visits = torch.full((batch, heads, seq_q), -1, dtype=torch.int32)
    out, lse, table = attention_forward(q, k, v, mask, block_visits=fwd_visits)
    fwd_n = block_config("fwd", dtype)["BLOCK_N"]
    for b, expected in enumerate(blocks_with_a_key(fwd_n)):
        assert (fwd_visits[b] == expected).all()
    assert fwd_visits[0, 0, 0] < triton_cdiv(seq_k, fwd_n) and fwd_visits[1, 0, 0] < triton_cdiv(seq_k, fwd_n)

    grad_out = torch.randn(out.shape, generator=generator).to(dtype)
    dq_visits = torch.full((batch, heads, seq_q), -1, dtype=torch.int32)
    dkv_visits = torch.full((batch, heads, seq_k), -1, dtype=torch.int32)
    dq, dk, dv = attention_backward(grad_out, q, k, v, out, lse, mask, table,
                                    dq_block_visits=dq_visits, dkv_block_visits=dkv_visits)
    dq_n = block_config("dq", dtype)["BLOCK_N"]
    for b, expected in enumerate(blocks_with_a_key(dq_n)):
        assert (dq_visits[b] == expected).all()
    dkdv = block_config("dkdv", dtype)
    for b in range(batch):
        for start in range(0, seq_k, dkdv["BLOCK_N"]):
            block_mask = mask[b, start:start + dkdv["BLOCK_N"]]
            expected = 0 if block_mask.all() else triton_cdiv(seq_q, dkdv["BLOCK_M"])
            assert (dkv_visits[b, :, start:start + dkdv["BLOCK_N"]] == expected).all()
    # and the result is still right
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = oracle(q64, k64, v64, mask)
    fwd_tol, grad_tol = TOLERANCES[dtype]
    assert relative_error(out, ref) <= fwd_tol
    for actual, expected in zip((dq, dk, dv), torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())):
        assert relative_error(actual, expected) <= grad_tol


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def test_padded_keys_are_never_read():
    """NaN in padded keys and values (whole blocks and single keys) never reaches outputs or gradients."""
    generator = torch.Generator().manual_seed(9)
    q, k, v = make_qkv(2, 2, 100, 257, 64, torch.float32, "contiguous", generator)
    mask = make_mask("half", 2, 257, generator)
    k_nan = k.masked_fill(mask[:, None, :, None], float("nan")).requires_grad_()
    v_nan = v.masked_fill(mask[:, None, :, None], float("inf")).requires_grad_()
    q = q.requires_grad_()
    out = attention(q, k_nan, v_nan, mask, dropout_p=0.0)
    grad_out = torch.randn(out.shape, generator=generator)
    dq, dk, dv = torch.autograd.grad(out, (q, k_nan, v_nan), grad_out)
    assert all(torch.isfinite(t).all() for t in (out, dq, dk, dv))
    assert relative_error(out, oracle(q, k, v, mask)) <= 1e-5
    padded = mask[:, None, :, None].expand_as(dk)
    assert (dk[padded] == 0).all() and (dv[padded] == 0).all()


class _NoHostSync(TorchDispatchMode):
    """Fails on any op that copies a tensor's value to the host (.item(), bool(tensor), .tolist())."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            raise AssertionError(f"host read: {func}")
        return func(*args, **(kwargs or {}))


def test_checks_and_skip_list_read_no_values():
    generator = torch.Generator().manual_seed(10)
    q, k, v = make_qkv(2, 2, 7, 129, 32, torch.float32, "mha", generator)
    mask = make_mask("all_but_one", 2, 129, generator)
    with _NoHostSync():
        _check_inputs(q, k, v, mask, 0.1)
        index, count = kv_block_table(mask, 32)
        table = key_block_table(mask, torch.float32)
    # batch 0: one block holds the only valid key; batch 1: the first half is padded
    assert count.tolist() == [1, 129 // 32 + 1 - 2]
    valid_block = int(torch.nonzero(~mask[0])[0, 0]) // 32
    assert index[0, 0].item() == valid_block
    assert index[1, :3].tolist() == [2, 3, 4]
    assert table.block_n == 32 and torch.equal(table.index, index) and torch.equal(table.count, count)


@pytest.mark.parametrize("make_args, message", [
    (lambda q, k, v, m: (q[:1], k, v, m), "mismatched"),
    (lambda q, k, v, m: (q, k[:, :1], v[:, :1], m), "mismatched"),
    (lambda q, k, v, m: (q, k, v[:, :, :3], m), "mismatched"),
    (lambda q, k, v, m: (q[..., :16], k[..., :16], v[..., :16], m), "head dim 16"),
    (lambda q, k, v, m: (q, k, v, m[:, :5]), r"key_padding_mask must be \(B, S\)"),
    (lambda q, k, v, m: (q, k, v, m.float()), "must be bool"),
    (lambda q, k, v, m: (q.double(), k, v, m), "share a dtype"),
    (lambda q, k, v, m: (q[0], k[0], v[0], m), "expects q"),
])
def test_bad_inputs_raise_value_errors(make_args, message):
    generator = torch.Generator().manual_seed(12)
    q, k, v = make_qkv(2, 2, 7, 9, 32, torch.float32, "contiguous", generator)
    mask = make_mask("half", 2, 9, generator)
    with pytest.raises(ValueError, match=message):
        attention(*make_args(q, k, v, mask))


@pytest.mark.parametrize("dropout_p", [1.0, -0.1, 1.5])
def test_bad_dropout_raises(dropout_p):
    q = torch.randn(1, 1, 3, 32)
    with pytest.raises(ValueError, match="dropout_p"):
        attention(q, q, q, dropout_p=dropout_p)


# ---------------------------------------------------------------------------------------------
# benchmarks/attention.py: measured on a GPU only; here, that it runs and measures what it says
# ---------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_script_reports_skips_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the script would measure, not skip")
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "attention.py"), "--out", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    for name in ("encoder_pad0", "encoder_pad25_tail", "encoder_pad50_tail", "encoder_pad25",
                 "decoder_cross_pad25", "encoder_pad25_dropout"):
        assert f"skipped {name} (B=8 H=8 " in run.stdout
    assert not out.exists()   # no numbers without a GPU


def test_benchmark_cases_through_the_interpreter(monkeypatch, tmp_path):
    """The benchmark's inputs, masks and provider calls on tiny shapes: every provider runs in both
    modes, the providers agree (measure() checks it), and the table and summary come out. The timer
    is a stand-in that runs the call once: interpreter times would mean nothing."""
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks import attention as bench
    from benchmarks.common import COLUMNS, read_csv, write_csv

    for case in bench.CASES:   # the DETR-R50 masks pad what the case says
        mask = bench.key_padding_mask(case, bench.DETR_R50, "cpu")
        assert mask.shape == (8, 950) and abs(mask.float().mean().item() - case.padding) < 0.02
        assert not mask.all(dim=1).any()

    calls = []

    def run_once(fn, grad_to_none=None):
        for tensor in grad_to_none or ():
            tensor.grad = None
        calls.append(fn())
        return 1.0, 1.0, 1.0

    env = dict(device="cpu (interpreter)", git_sha="test", torch=torch.__version__, triton="test",
               timestamp="test")
    cases = [c for c in bench.CASES if c.name in ("encoder_pad25_dropout", "decoder_cross_pad25")]
    rows = []
    for case in cases:
        rows += bench.measure(case, bench.TINY, "cpu", env, timer=run_once, memory=None)
    assert len(rows) == len(calls) == len(cases) * len(bench.PROVIDERS) * len(bench.MODES)
    assert {(r["provider"], r["mode"]) for r in rows} == {(p, m) for p in bench.PROVIDERS for m in bench.MODES}
    path = write_csv(rows, tmp_path / "results.csv")
    assert tuple(path.read_text().splitlines()[0].split(",")) == COLUMNS
    summary = bench.summary_markdown(read_csv(path))
    assert "## Targets (set for an H100" in summary and "fastdetr vs sdpa" in summary


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation for real GPUs
# ---------------------------------------------------------------------------------------------

def test_aot_configs_cover_every_launch_variant():
    """`aot_configs()` is the launchers' whole choice; tests/test_kernel_report.py compiles each one
    for sm_80 and sm_90 and fails on a compile error or a spill."""
    configs = aot_configs()
    assert len(configs) == 18
    assert {c.constexprs["HEAD_DIM"] for c in configs} == {32, 64}
    assert {c.signature["Q_ptr"] for c in configs} == {"*fp32", "*fp16", "*bf16"}


def count_table_builds(monkeypatch) -> list:
    """Each call of `kv_block_table` (every table the module builds goes through it) appends its block_n."""
    import fastdetr.kernels.attention as module

    builds = []
    original = module.kv_block_table
    monkeypatch.setattr(module, "kv_block_table",
                        lambda mask, block_n: builds.append(block_n) or original(mask, block_n))
    return builds


def table_case(dtype=torch.float32):
    """q, k, v (2, 2, 9, 32) and a mask whose batches keep different key blocks: batch 1 keeps only block 0."""
    generator = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(2, 2, 9, 32, generator=generator).to(dtype) for _ in range(3))
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 5:] = True
    return q, k, v, mask


def test_forward_and_dq_kernels_share_key_blocks():
    """One KeyBlockTable serves forward and backward only because their BLOCK_N agree."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert block_config("fwd", dtype)["BLOCK_N"] == block_config("dq", dtype)["BLOCK_N"]
        table = key_block_table(torch.zeros(1, 3, dtype=torch.bool), dtype)
        assert table.block_n == block_config("fwd", dtype)["BLOCK_N"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_a_passed_block_table_is_used_not_rebuilt(dtype, monkeypatch):
    """Twelve attentions (forward and backward) over one mask with the caller's table build nothing more,
    and give exactly what building the table in each call gives."""
    builds = count_table_builds(monkeypatch)
    q, k, v, mask = table_case(dtype)
    table = key_block_table(mask, dtype)
    assert isinstance(table, KeyBlockTable) and builds == [table.block_n]
    assert table.index.shape == (2, triton_cdiv(9, table.block_n)) and table.count.tolist() == [1, 1]

    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    expected = attention(qg, kg, vg, mask)   # builds its own table: one more build
    expected_grads = torch.autograd.grad(expected, (qg, kg, vg), torch.ones_like(expected))
    assert len(builds) == 2
    for _ in range(12):
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        out = attention(qg, kg, vg, mask, kv_table=table)
        grads = torch.autograd.grad(out, (qg, kg, vg), torch.ones_like(out))
        assert torch.equal(out, expected)
        assert all(torch.equal(g, e) for g, e in zip(grads, expected_grads))
    assert len(builds) == 2


def test_the_kernels_read_the_passed_table():
    """A table saying batch 0 has no valid key block makes batch 0's output zeros: the kernel followed it."""
    q, k, v, mask = table_case()
    table = key_block_table(mask, q.dtype)
    doctored = table._replace(count=torch.tensor([0, 1], dtype=torch.int32))
    out = attention(q, k, v, mask, kv_table=doctored)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(out[1], attention(q, k, v, mask, kv_table=table)[1])
    assert out[1].abs().sum() > 0


def test_a_table_for_other_key_blocks_is_rebuilt(monkeypatch):
    """A table of another block_n (another dtype's) is not read: the call builds one for its own blocks.

    Read as this kernel's table, it would send batch 0 to its fully padded first block only (zeros)."""
    generator = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(2, 2, 9, 32, generator=generator) for _ in range(3))
    block_n = block_config("fwd", q.dtype)["BLOCK_N"]
    k, v = (torch.randn(2, 2, 2 * block_n, 32, generator=generator) for _ in range(2))
    mask = torch.zeros(2, 2 * block_n, dtype=torch.bool)
    mask[0, :block_n] = True   # batch 0: only the second block of this kernel has valid keys
    other_n = 2 * block_n
    wrong = KeyBlockTable(*kv_block_table(mask, other_n), other_n)
    assert wrong.index[0, 0] == 0 and wrong.count[0] == 1
    builds = count_table_builds(monkeypatch)
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    out = attention(qg, kg, vg, mask, kv_table=wrong)
    assert builds == [block_n]
    grads = torch.autograd.grad(out, (qg, kg, vg), torch.ones_like(out))
    assert builds == [block_n]   # backward reuses forward's rebuilt table
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = attention_ref(q64, k64, v64, mask)
    assert relative_error(out, ref) <= 1e-5
    for actual, expected in zip(grads, torch.autograd.grad(ref, (q64, k64, v64), torch.ones_like(ref))):
        assert relative_error(actual, expected) <= 1e-4


def test_without_a_table_each_call_builds_one(monkeypatch):
    """No cache: every call over the same (unchanged) mask builds its table once, shared by its backward,
    and a mask changed in place between calls is seen."""
    q, k, v, mask = table_case()
    builds = count_table_builds(monkeypatch)
    for calls in range(1, 4):
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        out = attention(qg, kg, vg, mask)
        torch.autograd.grad(out, (qg, kg, vg), torch.ones_like(out))
        assert len(builds) == calls
    mask[0, 7:] = True   # in place
    changed = attention(q, k, v, mask)
    assert len(builds) == 4
    assert relative_error(changed, attention_ref(q.double(), k.double(), v.double(), mask)) <= 1e-5


def test_a_table_of_another_mask_shape_raises():
    q, k, v, mask = table_case()
    other = key_block_table(torch.zeros(3, 9, dtype=torch.bool), q.dtype)
    with pytest.raises(ValueError, match="kv_table does not fit"):
        attention(q, k, v, mask, kv_table=other)
