"""fastdetr.kernels.linear_layernorm: the fused linear + residual + LayerNorm against float64 math.

The kernels run on the CPU through Triton's interpreter (conftest sets
TRITON_INTERPRET=1), so K stays small (<= 512). Rows cover DETR's odd and tiny
counts (1, 7, 100, 129), widths d_model 256 and odd ones (96, 40); dropout's
mask is checked by its keep rate and by matching forward and backward; the last test
compiles every kernel variant ahead of time for sm_80 and sm_90 (no GPU needed)
and checks for register spills.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import TOLERANCES, dtype_id, relative_error

from fastdetr.kernels.linear_layernorm import (
    LinearResidualLayerNormFunction,
    aot_configs,
    linear_layernorm_forward,
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
    out = LinearResidualLayerNormFunction.apply(*inputs, 1e-5, dropout_p, seed, rng_offset)
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


def test_every_config_compiles_for_sm80_and_sm90_without_spills():
    """`aot_configs()` is the launchers' whole choice; the report compiles each one and fails on a spill.

    A subprocess: with TRITON_INTERPRET=1 the kernels in this process are
    interpreter objects, which triton.compile does not take.
    """
    configs = aot_configs()
    assert len(configs) == 18
    assert {c.constexprs["BLOCK_N"] for c in configs} == {64, 128, 256}
    assert {c.signature["X_ptr"] for c in configs if "X_ptr" in c.signature} == {"*fp32", "*fp16", "*bf16"}
    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run([sys.executable, "-m", "fastdetr.kernels.report", "--modules",
                          "fastdetr.kernels.linear_layernorm"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "36 compiles, 36 clean" in run.stdout


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
