"""fastdetr.kernels.linear_layernorm: the fused linear + residual (+ LayerNorm) ops against float64 math.

The kernels run on the CPU through Triton's interpreter (conftest sets
TRITON_INTERPRET=1), so K stays small (<= 512). Rows cover DETR's odd and tiny
counts (1, 7, 100, 129), widths d_model 256 and odd ones (96, 40); dropout's
mask is checked by its keep rate and by matching forward and backward. The
post-norm op (linear_residual_layernorm) and the pre-norm ones (linear_residual,
linear_residual_and_layernorm) share the kernels. tests/test_kernel_report.py
compiles every variant ahead of time for sm_80 and sm_90.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import TOLERANCES, dtype_id, relative_error

from fastdetr.kernels.common import fixed_dropout_key
from fastdetr.kernels.linear_layernorm import (
    LinearResidualFunction,
    LinearResidualLayerNormFunction,
    aot_configs,
    linear_layernorm_forward,
    linear_residual,
    linear_residual_and_layernorm,
    linear_residual_layernorm,
    linear_residual_layernorm_ref,
)

NAMES = ("x", "weight", "bias", "residual", "ln_weight", "ln_bias")


def oracle(x, weight, bias, residual, ln_weight, ln_bias, eps=1e-5):
    """Float64 math written out here, independent of the module."""
    z = residual + x @ weight.t() + bias
    mean = z.mean(dim=-1, keepdim=True)
    var = ((z - mean) ** 2).mean(dim=-1, keepdim=True)
    return (z - mean) / torch.sqrt(var + eps) * ln_weight + ln_bias


def make_inputs(lead, inner, width, dtype, generator):
    """Random inputs, never zeros; LayerNorm's affine away from (1, 0) so its gradients are exercised."""
    def randn(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale + shift).to(dtype)

    x = randn(*lead, inner)
    weight = randn(width, inner, scale=inner ** -0.5)
    bias = randn(width, scale=0.1)
    residual = randn(*lead, width)
    ln_weight = randn(width, scale=0.2, shift=1.0)
    ln_bias = randn(width, scale=0.1)
    return x, weight, bias, residual, ln_weight, ln_bias


def check_against_oracle(lead, inner, width, dtype, seed, transposed_x=False):
    fwd_tol, grad_tol = TOLERANCES[dtype]
    generator = torch.Generator().manual_seed(seed)
    inputs = make_inputs(lead, inner, width, dtype, generator)
    if transposed_x:   # x as a view with last stride != 1 (copied by the launcher)
        x = inputs[0]
        inputs = (x.transpose(-1, -2).contiguous().transpose(-1, -2), *inputs[1:])
    inputs = tuple(t.detach().requires_grad_() for t in inputs)
    out = linear_residual_layernorm(*inputs)
    assert out.shape == (*lead, width) and out.dtype == dtype
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad(out, inputs, grad_out)

    inputs64 = tuple(t.detach().double().requires_grad_() for t in inputs)
    ref = oracle(*inputs64)
    ref_grads = torch.autograd.grad(ref, inputs64, grad_out.double())
    assert relative_error(out, ref) <= fwd_tol
    for name, actual, expected, tensor in zip(NAMES, grads, ref_grads, inputs):
        assert actual.dtype == dtype and actual.shape == tensor.shape, name
        assert relative_error(actual, expected) <= grad_tol, name


# (leading dims, K, N): rows 1, 7, 100, 129; K 256, 64, 512 (the interpreter's
# limit for linear2's 2048); N 256 (DETR), 96 and 40 (masked to 128 and 64).
FP32_CASES = [
    ((1,), 256, 256),
    ((7,), 64, 96),
    ((100,), 512, 256),
    ((129,), 256, 96),
    ((43, 3), 64, 40),     # (S, B) tokens, 129 rows
]


@pytest.mark.parametrize("lead,inner,width", FP32_CASES)
def test_fp32_matches_float64(lead, inner, width):
    check_against_oracle(lead, inner, width, torch.float32, seed=inner * 1000 + width)


HALF_CASES = [
    (torch.float16, (129,), 512, 256),
    (torch.float16, (7,), 64, 96),
    (torch.bfloat16, (100,), 256, 256),
    (torch.bfloat16, (1,), 512, 96),
]


@pytest.mark.parametrize("dtype,lead,inner,width", HALF_CASES, ids=dtype_id)
def test_half_precision_matches_float64(dtype, lead, inner, width):
    check_against_oracle(lead, inner, width, dtype, seed=inner * 1000 + width)


def test_non_unit_stride_x():
    check_against_oracle((7, 2), 64, 96, torch.float32, seed=5, transposed_x=True)


def test_oracle_agrees_with_torch():
    generator = torch.Generator().manual_seed(2)
    inputs = make_inputs((7,), 64, 96, torch.float64, generator)
    x, weight, bias, residual, ln_weight, ln_bias = inputs
    expected = F.layer_norm(residual + F.linear(x, weight, bias), (96,), ln_weight, ln_bias, 1e-5)
    assert torch.allclose(oracle(*inputs), expected, rtol=1e-12, atol=1e-12)
    assert torch.allclose(linear_residual_layernorm_ref(*inputs), expected, rtol=1e-12, atol=1e-12)


def test_wide_rows_fall_back_to_the_reference(monkeypatch):
    """N > 256 runs plain PyTorch (the kernel is never entered) and is still exact."""
    def fail(*args, **kwargs):
        raise AssertionError("the Triton path ran for N > 256")

    monkeypatch.setattr(LinearResidualLayerNormFunction, "apply", fail)
    generator = torch.Generator().manual_seed(3)
    inputs = tuple(t.requires_grad_() for t in make_inputs((7,), 64, 320, torch.float32, generator))
    out = linear_residual_layernorm(*inputs)
    inputs64 = tuple(t.detach().double().requires_grad_() for t in inputs)
    ref = oracle(*inputs64)
    assert relative_error(out, ref) <= 1e-5
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    grads = torch.autograd.grad(out, inputs, grad_out.float())
    for name, actual, expected in zip(NAMES, grads, torch.autograd.grad(ref, inputs64, grad_out)):
        assert relative_error(actual, expected) <= 1e-4, name


def test_inference_does_not_need_grad():
    generator = torch.Generator().manual_seed(4)
    inputs = make_inputs((7,), 64, 96, torch.float32, generator)
    with torch.no_grad():
        out = linear_residual_layernorm(*inputs)
    assert relative_error(out, oracle(*(t.double() for t in inputs))) <= 1e-5


def test_bad_inputs_raise():
    generator = torch.Generator().manual_seed(6)
    inputs = make_inputs((7,), 64, 96, torch.float32, generator)
    with pytest.raises(ValueError, match="dropout_p"):
        linear_residual_layernorm(*inputs, dropout_p=1.0)
    x, weight, bias, residual, ln_weight, ln_bias = inputs
    with pytest.raises(ValueError, match="residual"):
        linear_residual_layernorm(x, weight, bias, residual[:, :95], ln_weight, ln_bias)
    with pytest.raises(ValueError, match="share a dtype"):
        linear_residual_layernorm(x, weight, bias, residual.double(), ln_weight, ln_bias)
    with pytest.raises(ValueError, match="bias"):
        linear_residual_layernorm(x, weight, None, residual, ln_weight, ln_bias)


def recover_keep_mask(x, weight, bias, residual, ln_weight, ln_bias, dropout_p, seed, rng_offset):
    """The forward kernel's keep mask: z - residual is 0 exactly where (x W^T + b) was dropped.

    Read off in fp32 whatever the inputs' dtype (a bf16 z could round a small kept
    term away); the mask depends on (row, column, seed, offset) only.
    """
    x, weight, bias, residual, ln_weight, ln_bias = (
        t.float() for t in (x, weight, bias, residual, ln_weight, ln_bias))
    _, z, _, _ = linear_layernorm_forward(x, weight, bias, residual, ln_weight, ln_bias, 1e-5, True,
                                          dropout_p, seed, rng_offset)
    return (z.double() - residual.double()) != 0


def test_dropout_keep_rate_and_seeds():
    generator = torch.Generator().manual_seed(8)
    inputs = make_inputs((129,), 64, 256, torch.float32, generator)
    keep = recover_keep_mask(*inputs, 0.3, seed=11, rng_offset=5)
    assert abs(keep.double().mean().item() - 0.7) < 0.02
    # rows and columns both enter the counter: no repeated row or column patterns
    assert not torch.equal(keep[0], keep[1]) and not torch.equal(keep[:, 0], keep[:, 1])
    assert not torch.equal(keep, recover_keep_mask(*inputs, 0.3, seed=12, rng_offset=5))
    assert not torch.equal(keep, recover_keep_mask(*inputs, 0.3, seed=11, rng_offset=6))
    assert torch.equal(keep, recover_keep_mask(*inputs, 0.3, seed=11, rng_offset=5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_dropout_backward_uses_the_forward_mask(dtype):
    """Forward and every gradient match float64 math with the forward kernel's mask."""
    fwd_tol, grad_tol = TOLERANCES[dtype]
    dropout_p, seed, rng_offset = 0.25, 123, 7
    generator = torch.Generator().manual_seed(9)
    inputs = tuple(t.requires_grad_() for t in make_inputs((100,), 64, 96, dtype, generator))
    keep = recover_keep_mask(*(t.detach() for t in inputs), dropout_p, seed, rng_offset)
    assert 0.6 < keep.double().mean().item() < 0.9
    out = LinearResidualLayerNormFunction.apply(*inputs, 1e-5, dropout_p, fixed_dropout_key(seed, rng_offset, "cpu"))
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad(out, inputs, grad_out)

    x, weight, bias, residual, ln_weight, ln_bias = (t.detach().double().requires_grad_() for t in inputs)
    inputs64 = (x, weight, bias, residual, ln_weight, ln_bias)
    z = residual + (x @ weight.t() + bias) * keep / (1.0 - dropout_p)
    ref = F.layer_norm(z, (96,), ln_weight, ln_bias, 1e-5)
    assert relative_error(out, ref) <= fwd_tol
    for name, actual, expected in zip(NAMES, grads, torch.autograd.grad(ref, inputs64, grad_out.double())):
        assert relative_error(actual, expected) <= grad_tol, name


def test_dropout_follows_torch_manual_seed():
    generator = torch.Generator().manual_seed(10)
    inputs = make_inputs((7,), 64, 96, torch.float32, generator)
    torch.manual_seed(0)
    first = linear_residual_layernorm(*inputs, dropout_p=0.5)
    torch.manual_seed(0)
    assert torch.equal(first, linear_residual_layernorm(*inputs, dropout_p=0.5))
    assert not torch.equal(first, linear_residual_layernorm(*inputs, dropout_p=0.5))
    assert not torch.isnan(first).any()


def test_aot_configs_cover_every_launch_variant():
    """`aot_configs()` is the launchers' whole choice (tests/test_kernel_report.py compiles each one):
    3 dtypes x 3 BLOCK_N x (4 forward variants + the backward)."""
    configs = aot_configs()
    assert len(configs) == 45
    assert {c.constexprs["BLOCK_N"] for c in configs} == {64, 128, 256}
    assert {c.signature["X_ptr"] for c in configs if "X_ptr" in c.signature} == {"*fp32", "*fp16", "*bf16"}
    forward = [c.constexprs for c in configs if "APPLY_NORM" in c.constexprs]
    assert {(c["APPLY_NORM"], c["DROPOUT"]) for c in forward} == {(a, d) for a in (True, False) for d in (True, False)}


# ---- pre-norm: z = residual + dropout(x W^T + b), optionally with LayerNorm(z) -------------------

PRENORM_CASES = [
    (torch.float32, (1,), 256, 256, True),
    (torch.float32, (43, 3), 64, 40, True),
    (torch.float32, (129,), 512, 96, False),
    (torch.float32, (7,), 64, 256, False),
    (torch.bfloat16, (100,), 256, 256, True),
    (torch.float16, (7,), 64, 96, False),
]


@pytest.mark.parametrize("dtype,lead,inner,width,norm", PRENORM_CASES, ids=dtype_id)
def test_prenorm_ops_match_float64(dtype, lead, inner, width, norm):
    """Both outputs and every gradient (random upstream gradients for z and for LayerNorm(z))."""
    fwd_tol, grad_tol = TOLERANCES[dtype]
    generator = torch.Generator().manual_seed(inner + width)
    inputs = tuple(t.requires_grad_() for t in make_inputs(lead, inner, width, dtype, generator))
    x, weight, bias, residual, ln_weight, ln_bias = inputs
    used = inputs if norm else inputs[:4]
    outs = linear_residual_and_layernorm(*inputs) if norm else (linear_residual(x, weight, bias, residual),)
    grad_outs = [torch.randn(out.shape, generator=generator, dtype=torch.float64) for out in outs]
    grads = torch.autograd.grad(outs, used, [g.to(dtype) for g in grad_outs])

    inputs64 = tuple(t.detach().double().requires_grad_() for t in used)
    z = inputs64[3] + inputs64[0] @ inputs64[1].t() + inputs64[2]
    refs = (z, F.layer_norm(z, (width,), inputs64[4], inputs64[5], 1e-5)) if norm else (z,)
    ref_grads = torch.autograd.grad(refs, inputs64, grad_outs)
    for out, ref in zip(outs, refs):
        assert out.shape == (*lead, width) and out.dtype == dtype
        assert relative_error(out, ref) <= fwd_tol
    for name, actual, expected, tensor in zip(NAMES, grads, ref_grads, used):
        assert actual.dtype == dtype and actual.shape == tensor.shape, name
        assert relative_error(actual, expected) <= grad_tol, name


@pytest.mark.parametrize("norm", [True, False], ids=["with-norm", "residual-only"])
def test_prenorm_dropout_backward_uses_the_forward_mask(norm):
    dropout_p, seed, rng_offset = 0.25, 321, 3
    generator = torch.Generator().manual_seed(12)
    inputs = tuple(t.requires_grad_() for t in make_inputs((100,), 64, 96, torch.float32, generator))
    keep = recover_keep_mask(*(t.detach() for t in inputs), dropout_p, seed, rng_offset)
    assert 0.6 < keep.double().mean().item() < 0.9
    x, weight, bias, residual, ln_weight, ln_bias = inputs
    norm_args = (ln_weight, ln_bias) if norm else (None, None)
    outs = LinearResidualFunction.apply(x, weight, bias, residual, *norm_args, 1e-5, dropout_p,
                                        fixed_dropout_key(seed, rng_offset, "cpu"))
    outs = outs if norm else (outs,)
    used = inputs if norm else inputs[:4]
    grad_outs = [torch.randn(out.shape, generator=generator, dtype=torch.float64) for out in outs]
    grads = torch.autograd.grad(outs, used, [g.float() for g in grad_outs])

    inputs64 = tuple(t.detach().double().requires_grad_() for t in used)
    z = inputs64[3] + (inputs64[0] @ inputs64[1].t() + inputs64[2]) * keep / (1.0 - dropout_p)
    refs = (z, F.layer_norm(z, (96,), inputs64[4], inputs64[5], 1e-5)) if norm else (z,)
    for out, ref in zip(outs, refs):
        assert relative_error(out, ref) <= 1e-5
    for name, actual, expected in zip(NAMES, grads, torch.autograd.grad(refs, inputs64, grad_outs)):
        assert relative_error(actual, expected) <= 1e-4, name


def test_prenorm_ops_fall_back_for_wide_rows_and_check_inputs(monkeypatch):
    monkeypatch.setattr(LinearResidualFunction, "apply", lambda *a: pytest.fail("the Triton path ran for N > 256"))
    generator = torch.Generator().manual_seed(13)
    x, weight, bias, residual, ln_weight, ln_bias = make_inputs((7,), 64, 320, torch.float32, generator)
    z, y = linear_residual_and_layernorm(x, weight, bias, residual, ln_weight, ln_bias)
    z64 = residual.double() + x.double() @ weight.double().t() + bias.double()
    assert relative_error(z, z64) <= 1e-5
    assert relative_error(y, F.layer_norm(z64, (320,), ln_weight.double(), ln_bias.double())) <= 1e-5
    assert relative_error(linear_residual(x, weight, bias, residual), z64) <= 1e-5
    with pytest.raises(ValueError, match="linear_residual: residual"):
        linear_residual(x, weight, bias, residual[:, :5])
    with pytest.raises(ValueError, match="linear_residual_and_layernorm: ln_weight must be a tensor"):
        linear_residual_and_layernorm(x, weight, bias, residual, None, ln_bias)


def test_triton_path_runs_under_the_interpreter(monkeypatch):
    """CPU tensors with TRITON_INTERPRET=1 go through both launchers (not the reference)."""
    from fastdetr.kernels import linear_layernorm as module

    calls = []
    for name in ("linear_layernorm_forward", "linear_layernorm_backward"):
        launcher = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=launcher, _n=name, **k: calls.append(_n) or _f(*a, **k))
    generator = torch.Generator().manual_seed(7)
    inputs = tuple(t.requires_grad_() for t in make_inputs((7,), 64, 96, torch.float32, generator))
    linear_residual_layernorm(*inputs).sum().backward()
    assert calls == ["linear_layernorm_forward", "linear_layernorm_backward"]
