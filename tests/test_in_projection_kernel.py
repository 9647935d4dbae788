"""fastdetr.kernels.in_projection: the fused (x + pos) in-projection against float64 math.

The kernel runs on the CPU through Triton's interpreter (conftest sets
TRITON_INTERPRET=1). Rows cover DETR's odd and tiny counts (1, 7, 100, 129),
E covers d_model 256, 64 and an odd 96 (Q/K and V column tiles masked); pos is
given or None. The ahead-of-time compile of `aot_configs()` runs in
tests/test_kernel_report.py, not here.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import TOLERANCES, dtype_id, relative_error

from fastdetr.kernels import in_projection as module
from fastdetr.kernels.in_projection import aot_configs, block_config, in_projection, in_projection_ref

NAMES = ("x", "pos", "weight", "bias")


def oracle(x, pos, weight, bias):
    """Float64 math written out here, independent of the module."""
    embed_dim = x.shape[-1]
    w_q, w_k, w_v = weight[:embed_dim], weight[embed_dim:2 * embed_dim], weight[2 * embed_dim:]
    b_q, b_k, b_v = bias[:embed_dim], bias[embed_dim:2 * embed_dim], bias[2 * embed_dim:]
    query = x if pos is None else x + pos
    return torch.cat([query @ w_q.t() + b_q, query @ w_k.t() + b_k, x @ w_v.t() + b_v], dim=-1)


def make_inputs(lead, embed_dim, dtype, generator, with_pos=True):
    """Random inputs, never zeros; weight scaled like nn.MultiheadAttention's xavier init."""
    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)

    x = randn(*lead, embed_dim)
    pos = randn(*lead, embed_dim) if with_pos else None
    weight = randn(3 * embed_dim, embed_dim, scale=embed_dim ** -0.5)
    bias = randn(3 * embed_dim, scale=0.1)
    return x, pos, weight, bias


def check_against_oracle(lead, embed_dim, dtype, seed, with_pos=True):
    fwd_tol, grad_tol = TOLERANCES[dtype]
    generator = torch.Generator().manual_seed(seed)
    inputs = tuple(None if t is None else t.detach().requires_grad_()
                   for t in make_inputs(lead, embed_dim, dtype, generator, with_pos))
    out = in_projection(*inputs)
    assert out.shape == (*lead, 3 * embed_dim) and out.dtype == dtype
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(dtype)
    present = [(name, t) for name, t in zip(NAMES, inputs) if t is not None]
    grads = torch.autograd.grad(out, [t for _, t in present], grad_out)

    inputs64 = tuple(None if t is None else t.detach().double().requires_grad_() for t in inputs)
    ref = oracle(*inputs64)
    ref_grads = torch.autograd.grad(ref, [t for t in inputs64 if t is not None], grad_out.double())
    assert relative_error(out, ref) <= fwd_tol
    for (name, tensor), actual, expected in zip(present, grads, ref_grads):
        assert actual.dtype == dtype and actual.shape == tensor.shape, name
        assert relative_error(actual, expected) <= grad_tol, name


# (leading dims, E): rows 1, 7, 100, 129; E 256 (DETR), 64 and 96 (odd: masked column tiles)
FP32_CASES = [
    ((1,), 256),
    ((7,), 64),
    ((100,), 96),
    ((43, 3), 64),     # (S, B) tokens, 129 rows
]


@pytest.mark.parametrize("with_pos", [True, False], ids=["pos", "no_pos"])
@pytest.mark.parametrize("lead,embed_dim", FP32_CASES)
def test_fp32_matches_float64(lead, embed_dim, with_pos):
    check_against_oracle(lead, embed_dim, torch.float32, seed=embed_dim * 1000 + len(lead), with_pos=with_pos)


HALF_CASES = [
    (torch.float16, (129,), 256, True),
    (torch.float16, (7,), 96, False),
    (torch.bfloat16, (100,), 256, True),
    (torch.bfloat16, (1,), 64, True),
    (torch.bfloat16, (129,), 96, False),
]


@pytest.mark.parametrize("dtype,lead,embed_dim,with_pos", HALF_CASES, ids=dtype_id)
def test_half_precision_matches_float64(dtype, lead, embed_dim, with_pos):
    check_against_oracle(lead, embed_dim, dtype, seed=embed_dim * 1000 + lead[0], with_pos=with_pos)


def test_nan_never_passes():
    generator = torch.Generator().manual_seed(11)
    x, pos, weight, bias = make_inputs((7,), 64, torch.float32, generator)
    pos[3, 5] = float("nan")
    out = in_projection(x, pos, weight, bias)
    # pos enters Q and K only: a NaN there must reach those columns of its row, and not V's
    assert torch.isnan(out[3, :128]).all() and not torch.isnan(out[3, 128:]).any()
    with pytest.raises(AssertionError, match="NaN"):
        relative_error(out, oracle(*(t.double() for t in (x, pos, weight, bias))))


def test_matches_multihead_attention():
    """Same packing as nn.MultiheadAttention: its F.linear in-projection, and its whole output."""
    torch.manual_seed(12)
    seq, batch, embed_dim, heads = 7, 2, 64, 8
    mha = torch.nn.MultiheadAttention(embed_dim, heads, dropout=0.0).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_(std=0.1)   # torch inits it to zeros
    x, pos = torch.randn(seq, batch, embed_dim), torch.randn(seq, batch, embed_dim)
    weight, bias = mha.in_proj_weight.detach(), mha.in_proj_bias.detach()
    with torch.no_grad():
        q, k, v = in_projection(x, pos, weight, bias).split(embed_dim, dim=-1)
    w_q, w_k, w_v = weight.chunk(3)
    b_q, b_k, b_v = bias.chunk(3)
    for ours, expected in ((q, F.linear(x + pos, w_q, b_q)), (k, F.linear(x + pos, w_k, b_k)),
                           (v, F.linear(x, w_v, b_v))):
        assert relative_error(ours, expected) <= 1e-5

    # attention over our q, k, v with mha's out_proj equals mha(x + pos, x + pos, x)
    def heads_first(t):   # (S, B, E) -> (B, heads, S, E / heads)
        return t.reshape(seq, batch, heads, embed_dim // heads).permute(1, 2, 0, 3)

    attn = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v))
    ours = mha.out_proj(attn.permute(2, 0, 1, 3).reshape(seq, batch, embed_dim))
    expected, _ = mha(x + pos, x + pos, x, need_weights=False)
    assert relative_error(ours.detach(), expected.detach()) <= 1e-5


def test_reference_agrees_with_oracle():
    generator = torch.Generator().manual_seed(13)
    for with_pos in (True, False):
        inputs = make_inputs((7, 2), 96, torch.float64, generator, with_pos)
        assert torch.allclose(in_projection_ref(*inputs), oracle(*inputs), rtol=1e-12, atol=1e-12)


def test_bad_inputs_raise():
    generator = torch.Generator().manual_seed(14)
    x, pos, weight, bias = make_inputs((7,), 64, torch.float32, generator)
    with pytest.raises(ValueError, match="weight"):
        in_projection(x, pos, weight[:128], bias)
    with pytest.raises(ValueError, match="weight"):
        in_projection(x[:, :32], pos[:, :32], weight, bias)
    with pytest.raises(ValueError, match="bias"):
        in_projection(x, pos, weight, bias[:100])
    with pytest.raises(ValueError, match="bias"):
        in_projection(x, pos, weight, None)
    with pytest.raises(ValueError, match="pos"):
        in_projection(x, pos[:6], weight, bias)
    with pytest.raises(ValueError, match="share a dtype"):
        in_projection(x, pos.half(), weight, bias)
    with pytest.raises(ValueError, match="floating point"):
        in_projection(*(t.to(torch.int32) for t in (x, pos, weight, bias)))


def test_inference_does_not_need_grad():
    generator = torch.Generator().manual_seed(15)
    inputs = make_inputs((7,), 96, torch.float32, generator)
    with torch.no_grad():
        out = in_projection(*inputs)
    assert relative_error(out, oracle(*(t.double() for t in inputs))) <= 1e-5


def test_partial_gradients():
    """Only pos and the weight need grad (a frozen input): the rest come back as None, the others exact."""
    generator = torch.Generator().manual_seed(16)
    x, pos, weight, bias = make_inputs((7,), 64, torch.float32, generator)
    pos.requires_grad_()
    weight.requires_grad_()
    out = in_projection(x, pos, weight, bias)
    grad_out = torch.randn(out.shape, generator=generator)
    dpos, dweight = torch.autograd.grad(out, (pos, weight), grad_out)
    pos64, weight64 = (t.detach().double().requires_grad_() for t in (pos, weight))
    ref = oracle(x.double(), pos64, weight64, bias.double())
    ref_dpos, ref_dweight = torch.autograd.grad(ref, (pos64, weight64), grad_out.double())
    assert relative_error(dpos, ref_dpos) <= 1e-4 and relative_error(dweight, ref_dweight) <= 1e-4


def test_triton_path_runs_under_the_interpreter(monkeypatch):
    """CPU tensors with TRITON_INTERPRET=1 go through the Triton launcher (not the reference)."""
    calls = []
    launcher = module.in_projection_forward
    monkeypatch.setattr(module, "in_projection_forward", lambda *a, **k: calls.append(1) or launcher(*a, **k))
    generator = torch.Generator().manual_seed(17)
    inputs = make_inputs((7,), 64, torch.float32, generator)
    in_projection(*inputs)
    assert calls == [1]


def test_aot_configs_cover_every_launch():
    """Every config `block_config` can pick is in `aot_configs()` (the report compiles those)."""
    configs = aot_configs()
    assert len(configs) == 12
    listed = {(c.signature["X_ptr"], c.constexprs["HAS_POS"], c.constexprs["BLOCK_M"], c.constexprs["BLOCK_N"],
               c.constexprs["BLOCK_K"], c.options["num_warps"], c.options["num_stages"]) for c in configs}
    names = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
    for dtype, name in names.items():
        for embed_dim in (1, 32, 64, 96, 100, 128, 192, 256, 512, 1024):
            config = block_config(dtype, embed_dim)
            for has_pos in (True, False):
                assert (name, has_pos, config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"],
                        config["num_warps"], config["num_stages"]) in listed
