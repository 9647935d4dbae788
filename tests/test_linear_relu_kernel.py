"""fastdetr.kernels.linear_relu: the fused linear + ReLU + dropout against float64 math.

The kernels run on the CPU through Triton's interpreter (conftest sets
TRITON_INTERPRET=1), so shapes stay small enough for it: rows 1, 7, 100, 129;
K 64 and 256 (DETR's d_model); N 96, 512, 1000 (a ragged last tile) and
DETR's FFN width 2048. Dropout's mask is checked by its keep rate and by
matching forward and backward. The ahead-of-time compile of `aot_configs()` is
done by tests/test_kernel_report.py, not repeated here.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import TOLERANCES, dtype_id, relative_error

from fastdetr.kernels.common import fixed_dropout_key
from fastdetr.kernels.linear_relu import (
    aot_configs,
    linear_masked_rows,
    linear_masked_rows_ref,
    linear_relu_dropout,
    linear_relu_dropout_ref,
    linear_relu_forward,
)

NAMES = ("x", "weight", "bias")


def oracle(x, weight, bias, keep=None, dropout_p=0.0):
    """Float64 math written out here, independent of the module; keep: the dropout mask (True = kept)."""
    pre = x @ weight.t() + bias
    h = torch.where(pre > 0, pre, torch.zeros_like(pre))
    if keep is not None:
        h = h * keep / (1.0 - dropout_p)
    return h


def make_inputs(lead, inner, width, dtype, generator):
    """Random inputs, never zeros; the bias shifts some columns so the ReLU is neither all-on nor all-off."""
    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)

    return randn(*lead, inner), randn(width, inner, scale=inner ** -0.5), randn(width, scale=0.5)


def check_against_oracle(lead, inner, width, dtype, seed, transposed_x=False):
    fwd_tol, grad_tol = TOLERANCES[dtype]
    generator = torch.Generator().manual_seed(seed)
    inputs = make_inputs(lead, inner, width, dtype, generator)
    if transposed_x:   # x as a view with last stride != 1 (copied by the launcher)
        inputs = (inputs[0].transpose(-1, -2).contiguous().transpose(-1, -2), *inputs[1:])
    inputs = tuple(t.detach().requires_grad_() for t in inputs)
    out = linear_relu_dropout(*inputs)
    assert out.shape == (*lead, width) and out.dtype == dtype
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad(out, inputs, grad_out)

    inputs64 = tuple(t.detach().double().requires_grad_() for t in inputs)
    ref = oracle(*inputs64)
    ref_grads = torch.autograd.grad(ref, inputs64, grad_out.double())
    assert 0.2 < (ref > 0).double().mean().item() < 0.8   # both sides of the ReLU exercised
    assert relative_error(out, ref) <= fwd_tol
    for name, actual, expected, tensor in zip(NAMES, grads, ref_grads, inputs):
        assert actual.dtype == dtype and actual.shape == tensor.shape, name
        assert relative_error(actual, expected) <= grad_tol, name


# (leading dims, K, N): rows 1, 7, 100, 129; K 256 (d_model) and 64; N 96, 512, 1000
FP32_CASES = [
    ((1,), 256, 512),
    ((7,), 64, 96),
    ((100,), 256, 1000),
    ((129,), 64, 512),
    ((43, 3), 64, 96),     # (S, B) tokens, 129 rows
    ((129,), 256, 2048),   # DETR's linear1
]


@pytest.mark.parametrize("lead,inner,width", FP32_CASES)
def test_fp32_matches_float64(lead, inner, width):
    check_against_oracle(lead, inner, width, torch.float32, seed=inner * 1000 + width)


HALF_CASES = [
    (torch.float16, (129,), 256, 512),
    (torch.float16, (7,), 64, 96),
    (torch.bfloat16, (100,), 256, 1000),
    (torch.bfloat16, (1,), 64, 96),
    (torch.bfloat16, (129,), 256, 2048),
]


@pytest.mark.parametrize("dtype,lead,inner,width", HALF_CASES, ids=dtype_id)
def test_half_precision_matches_float64(dtype, lead, inner, width):
    check_against_oracle(lead, inner, width, dtype, seed=inner * 1000 + width)


def test_non_unit_stride_x():
    check_against_oracle((7, 2), 64, 96, torch.float32, seed=5, transposed_x=True)


def test_oracle_agrees_with_torch():
    generator = torch.Generator().manual_seed(2)
    inputs = make_inputs((7,), 64, 96, torch.float64, generator)
    expected = F.relu(F.linear(*inputs))
    assert torch.allclose(oracle(*inputs), expected, rtol=1e-12, atol=1e-12)
    assert torch.allclose(linear_relu_dropout_ref(*inputs), expected, rtol=1e-12, atol=1e-12)


def test_inference_does_not_need_grad():
    generator = torch.Generator().manual_seed(4)
    inputs = make_inputs((7,), 64, 96, torch.float32, generator)
    with torch.no_grad():
        out = linear_relu_dropout(*inputs)
    assert relative_error(out, oracle(*(t.double() for t in inputs))) <= 1e-5


def test_bad_inputs_raise():
    generator = torch.Generator().manual_seed(6)
    x, weight, bias = make_inputs((7,), 64, 96, torch.float32, generator)
    with pytest.raises(ValueError, match="dropout_p"):
        linear_relu_dropout(x, weight, bias, dropout_p=1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        linear_relu_dropout(x, weight, bias, dropout_p=-0.1)
    with pytest.raises(ValueError, match="K=64"):
        linear_relu_dropout(x[:, :63], weight, bias)
    with pytest.raises(ValueError, match="weight must be"):
        linear_relu_dropout(x, weight[0], bias)
    with pytest.raises(ValueError, match="bias must be"):
        linear_relu_dropout(x, weight, bias[:95])
    with pytest.raises(ValueError, match="bias must be a tensor"):
        linear_relu_dropout(x, weight, None)
    with pytest.raises(ValueError, match="share a dtype"):
        linear_relu_dropout(x, weight.half(), bias)
    with pytest.raises(ValueError, match="floating point"):
        linear_relu_dropout(x.int(), weight.int(), bias.int())


def recover_keep_mask(x, weight, bias, dropout_p, seed, rng_offset):
    """The forward kernel's keep mask, read off with an all-positive pre-activation.

    The mask depends on (row, column, seed, offset) only, so a huge bias (every
    ReLU open) makes h != 0 exactly where the element was kept.
    """
    h = linear_relu_forward(x.float(), weight.float(), torch.full_like(bias.float(), 100.0), dropout_p, seed,
                            rng_offset)
    return h != 0


def test_dropout_keep_rate_and_seeds():
    generator = torch.Generator().manual_seed(8)
    inputs = make_inputs((129,), 64, 512, torch.float32, generator)
    keep = recover_keep_mask(*inputs, 0.3, seed=11, rng_offset=5)
    assert abs(keep.double().mean().item() - 0.7) < 0.01
    # rows and columns both enter the counter: no repeated row or column patterns
    assert not torch.equal(keep[0], keep[1]) and not torch.equal(keep[:, 0], keep[:, 1])
    assert not torch.equal(keep, recover_keep_mask(*inputs, 0.3, seed=12, rng_offset=5))
    assert not torch.equal(keep, recover_keep_mask(*inputs, 0.3, seed=11, rng_offset=6))
    assert torch.equal(keep, recover_keep_mask(*inputs, 0.3, seed=11, rng_offset=5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_dropout_backward_uses_the_forward_mask(dtype):
    """Forward and every gradient match float64 math with the forward kernel's own mask."""
    fwd_tol, grad_tol = TOLERANCES[dtype]
    dropout_p, seed, rng_offset = 0.25, 123, 7
    generator = torch.Generator().manual_seed(9)
    inputs = tuple(t.requires_grad_() for t in make_inputs((100,), 64, 160, dtype, generator))
    keep = recover_keep_mask(*(t.detach() for t in inputs), dropout_p, seed, rng_offset)
    assert 0.65 < keep.double().mean().item() < 0.85
    out = torch.ops.fastdetr.linear_relu_fwd(*inputs, dropout_p, fixed_dropout_key(seed, rng_offset, "cpu"), True,
                                             None)   # the custom op
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad(out, inputs, grad_out)

    inputs64 = tuple(t.detach().double().requires_grad_() for t in inputs)
    ref = oracle(*inputs64, keep=keep, dropout_p=dropout_p)
    assert relative_error(out, ref) <= fwd_tol
    for name, actual, expected in zip(NAMES, grads, torch.autograd.grad(ref, inputs64, grad_out.double())):
        assert relative_error(actual, expected) <= grad_tol, name


def test_dropout_follows_torch_manual_seed():
    generator = torch.Generator().manual_seed(10)
    inputs = make_inputs((7,), 64, 96, torch.float32, generator)
    torch.manual_seed(0)
    first = linear_relu_dropout(*inputs, dropout_p=0.5)
    torch.manual_seed(0)
    assert torch.equal(first, linear_relu_dropout(*inputs, dropout_p=0.5))
    assert not torch.equal(first, linear_relu_dropout(*inputs, dropout_p=0.5))
    assert not torch.isnan(first).any()


def test_nan_input_is_not_hidden():
    """A NaN in x reaches the output (ReLU's max must not swallow it), and the check above would catch it."""
    generator = torch.Generator().manual_seed(12)
    x, weight, bias = make_inputs((7,), 64, 96, torch.float32, generator)
    x[3, 5] = float("nan")
    out = linear_relu_dropout(x, weight, bias)
    assert torch.isnan(out[3]).any() and not torch.isnan(out[torch.arange(7) != 3]).any()
    with pytest.raises(AssertionError, match="NaN"):
        relative_error(out, oracle(*(t.double() for t in (x, weight, bias))))


def test_aot_configs_cover_every_launch():
    """The launchers choose one config per (kernel, dtype); the report compiles exactly these."""
    configs = aot_configs()
    assert len(configs) == 9   # per dtype: the forward with ReLU + dropout and with the row mask; the backward
    assert {(c.constexprs.get("RELU"), c.constexprs.get("ROW_MASK")) for c in configs} == {
        (True, False), (False, True), (None, None)}
    kernels = {getattr(c.kernel, "__name__", None) or c.kernel.fn.__name__ for c in configs}
    assert kernels == {"_linear_relu_fwd_kernel", "_linear_relu_bwd_kernel"}
    assert {c.signature["X_ptr"] for c in configs if "X_ptr" in c.signature} == {"*fp32", "*fp16", "*bf16"}


def test_triton_path_runs_under_the_interpreter(monkeypatch):
    """CPU tensors with TRITON_INTERPRET=1 go through both launchers (not the reference)."""
    from fastdetr.kernels import linear_relu as module

    calls = []
    for name in ("linear_relu_forward", "linear_relu_backward"):
        launcher = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=launcher, _n=name, **k: calls.append(_n) or _f(*a, **k))
    generator = torch.Generator().manual_seed(7)
    inputs = tuple(t.requires_grad_() for t in make_inputs((7,), 64, 96, torch.float32, generator))
    linear_relu_dropout(*inputs).sum().backward()
    assert calls == ["linear_relu_forward", "linear_relu_backward"]


# ---------------------------------------------------------------------------------------------
# linear_masked_rows: MSDA's value projection with the padding fill in the epilogue
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("lead,inner,width", [((2, 37), 64, 64), ((1, 129), 256, 256), ((3, 5), 48, 96)])
def test_masked_rows_match_float64(lead, inner, width, dtype):
    fwd_tol, grad_tol = TOLERANCES[dtype]
    generator = torch.Generator().manual_seed(inner + width)
    inputs = tuple(t.requires_grad_() for t in make_inputs(lead, inner, width, dtype, generator))
    row_mask = torch.rand(lead, generator=generator) < 0.3
    out = linear_masked_rows(*inputs, row_mask)
    assert out.shape == (*lead, width) and out.dtype == dtype
    assert (out[row_mask] == 0).all() and (out[~row_mask] != 0).any()
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad(out, inputs, grad_out)
    inputs64 = tuple(t.detach().double().requires_grad_() for t in inputs)
    ref = (inputs64[0] @ inputs64[1].t() + inputs64[2]) * (~row_mask)[..., None]
    ref_grads = torch.autograd.grad(ref, inputs64, grad_out.double())
    assert relative_error(out, ref) <= fwd_tol
    for name, grad, ref_grad in zip(NAMES, grads, ref_grads):
        assert relative_error(grad, ref_grad) <= grad_tol, name


def test_masked_rows_run_the_kernel_and_fill_nan_rows_with_zeros(monkeypatch):
    """A masked row is 0 even where the GEMM gives NaN (masked_fill's semantics); unmasked NaN stays NaN."""
    from fastdetr.kernels import linear_relu as module

    calls = []
    launcher = module.linear_relu_forward
    monkeypatch.setattr(module, "linear_relu_forward", lambda *a, **k: calls.append(k) or launcher(*a, **k))
    generator = torch.Generator().manual_seed(8)
    x, weight, bias = make_inputs((2, 6), 32, 40, torch.float32, generator)
    x[0, 1, 3] = float("nan")
    x[1, 2, 5] = float("nan")
    row_mask = torch.zeros(2, 6, dtype=torch.bool)
    row_mask[0, 1] = True
    out = linear_masked_rows(x, weight, bias, row_mask)
    assert len(calls) == 1 and calls[0]["row_mask"] is not None and calls[0]["relu"] is False
    assert torch.equal(out, linear_masked_rows_ref(x, weight, bias, row_mask)) or \
        torch.equal(out.isnan(), linear_masked_rows_ref(x, weight, bias, row_mask).isnan())
    assert (out[0, 1] == 0).all() and out[1, 2].isnan().all()


def test_masked_rows_bad_mask():
    x, weight, bias = make_inputs((2, 6), 32, 40, torch.float32, torch.Generator().manual_seed(9))
    with pytest.raises(ValueError, match="linear_masked_rows: row_mask must be bool"):
        linear_masked_rows(x, weight, bias, torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="linear_masked_rows: row_mask must be bool"):
        linear_masked_rows(x, weight, bias, torch.zeros(2, 6))
    with pytest.raises(ValueError, match="linear_masked_rows: bias"):
        linear_masked_rows(x, weight, None, torch.zeros(2, 6, dtype=torch.bool))
