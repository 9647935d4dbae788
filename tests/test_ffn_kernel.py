"""fastdetr.kernels.ffn: the fused inference FFN (hidden kept on chip) against float64 math.

The kernel runs on the CPU through Triton's interpreter (conftest sets
TRITON_INTERPRET=1). Rows cover DETR's odd and tiny counts (1, 7, 129, and
(S, B) leading dims); d_model 256 (DETR) and odd widths 24, 100 (masked to 64
and 128) and 64; hidden 2048 (DETR, at few rows: the interpreter walks it in
small chunks), and ragged 40 and 130. Each case runs with LayerNorm (post-norm
layers) and without (pre-norm layers), with a residual distinct from x. The
fallbacks (d_model > 256, inputs that need a gradient, float64) are checked
against the same oracle, and the kernel against the reference DETR layers'
FFN. The ahead-of-time compile of `aot_configs()` (no spills, tensor cores) is
done by tests/test_kernel_report.py, not repeated here.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import TOLERANCES, dtype_id, relative_error

from fastdetr.backend import interpreter_enabled, triton_importable
from fastdetr.kernels import ffn as ffn_module
from fastdetr.kernels.common import as_rows, unit_last_stride
from fastdetr.kernels.ffn import aot_configs, ffn_inference, ffn_inference_forward, ffn_inference_ref
from fastdetr.reference.transformer import TransformerEncoderLayer

needs_interpreter = pytest.mark.skipif(
    not (triton_importable() and interpreter_enabled()),
    reason="CPU tensors reach the Triton kernel only under Triton's interpreter (TRITON_INTERPRET=1)",
)


def oracle(x, w1, b1, w2, b2, residual, ln_weight=None, ln_bias=None, eps=1e-5):
    """Float64 math written out here, independent of the module."""
    pre = x @ w1.t() + b1
    z = residual + torch.where(pre > 0, pre, torch.zeros_like(pre)) @ w2.t() + b2
    if ln_weight is None:
        return z
    mean = z.mean(dim=-1, keepdim=True)
    var = ((z - mean) ** 2).mean(dim=-1, keepdim=True)
    return (z - mean) / torch.sqrt(var + eps) * ln_weight + ln_bias


def make_inputs(lead, width, hidden, dtype, generator, layernorm=True):
    """(x, w1, b1, w2, b2, residual, ln_weight, ln_bias), random, never zeros.

    b1 shifts the pre-activations so the ReLU is neither all-on nor all-off; the
    residual is its own tensor (not x), of the order of the FFN's output, so
    that a dropped or doubled term shows; LayerNorm's affine is away from
    (1, 0). Without LayerNorm the last two are None.
    """
    def randn(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale + shift).to(dtype)

    x = randn(*lead, width)
    w1 = randn(hidden, width, scale=width ** -0.5)
    b1 = randn(hidden, scale=0.5)
    w2 = randn(width, hidden, scale=hidden ** -0.5)
    b2 = randn(width, scale=0.1)
    residual = randn(*lead, width)
    if not layernorm:
        return x, w1, b1, w2, b2, residual, None, None
    return x, w1, b1, w2, b2, residual, randn(width, scale=0.2, shift=1.0), randn(width, scale=0.1)


def as_float64(inputs):
    return tuple(None if t is None else t.detach().double() for t in inputs)


def count_kernel_launches(monkeypatch) -> list:
    """Record each call of the launcher (the Triton path) made through `ffn_inference`."""
    calls = []
    launcher = ffn_module.ffn_inference_forward
    monkeypatch.setattr(ffn_module, "ffn_inference_forward", lambda *a, **k: calls.append(1) or launcher(*a, **k))
    return calls


def check_against_oracle(monkeypatch, lead, width, hidden, dtype, layernorm, seed, transposed_x=False):
    generator = torch.Generator().manual_seed(seed)
    inputs = make_inputs(lead, width, hidden, dtype, generator, layernorm)
    if transposed_x:   # x as a view with last stride != 1 (copied by the launcher)
        inputs = (inputs[0].transpose(-1, -2).contiguous().transpose(-1, -2), *inputs[1:])
    calls = count_kernel_launches(monkeypatch)
    out = ffn_inference(*inputs)
    assert calls == [1]   # the kernel ran, not the reference
    assert out.shape == (*lead, width) and out.dtype == dtype
    inputs64 = as_float64(inputs)
    pre = inputs64[0] @ inputs64[1].t() + inputs64[2]
    assert 0.2 < (pre > 0).double().mean().item() < 0.8   # both sides of the ReLU exercised
    assert relative_error(out, oracle(*inputs64)) <= TOLERANCES[dtype][0]


# (leading dims, D, H): rows 1, 7, 129, (S, B) tokens; D 256 (DETR), 24 and 100
# (masked to 64 and 128), 64; H 2048 (DETR, few rows), ragged 40 and 130
FP32_CASES = [
    ((1,), 256, 2048),
    ((33,), 256, 2048),    # three 16-row programs, the last one ragged
    ((7,), 24, 40),
    ((129,), 100, 130),
    ((43, 3), 64, 130),    # (S, B) tokens, 129 rows
    ((3, 2), 256, 130),
]


@needs_interpreter
@pytest.mark.parametrize("layernorm", [True, False], ids=["layernorm", "no_layernorm"])
@pytest.mark.parametrize("lead,width,hidden", FP32_CASES)
def test_fp32_matches_float64(lead, width, hidden, layernorm, monkeypatch):
    check_against_oracle(monkeypatch, lead, width, hidden, torch.float32, layernorm,
                         seed=width * 10000 + hidden + len(lead))


HALF_CASES = [
    (torch.float16, (43, 3), 256, 2048, True),   # DETR's FFN, 129 tokens: three 64-row programs
    (torch.float16, (129,), 256, 130, True),
    (torch.float16, (7,), 100, 2048, False),
    (torch.float16, (5, 2), 24, 40, True),
    (torch.bfloat16, (2, 3), 256, 2048, True),
    (torch.bfloat16, (129,), 64, 130, False),
    (torch.bfloat16, (7,), 100, 40, True),
    (torch.bfloat16, (1,), 24, 130, False),
]


@needs_interpreter
@pytest.mark.parametrize("dtype,lead,width,hidden,layernorm", HALF_CASES, ids=dtype_id)
def test_half_precision_matches_float64(dtype, lead, width, hidden, layernorm, monkeypatch):
    check_against_oracle(monkeypatch, lead, width, hidden, dtype, layernorm, seed=width * 10000 + hidden)


@needs_interpreter
def test_non_unit_stride_x(monkeypatch):
    check_against_oracle(monkeypatch, (7, 2), 64, 40, torch.float32, True, seed=5, transposed_x=True)


@needs_interpreter
def test_post_norm_residual_is_x():
    """Post-norm layers pass x itself as the residual: LayerNorm(x + FFN(x))."""
    generator = torch.Generator().manual_seed(11)
    x, w1, b1, w2, b2, _, ln_weight, ln_bias = make_inputs((7,), 100, 130, torch.float32, generator)
    out = ffn_inference(x, w1, b1, w2, b2, x, ln_weight, ln_bias, eps=1e-6)
    expected = oracle(*as_float64((x, w1, b1, w2, b2, x, ln_weight, ln_bias)), eps=1e-6)
    assert relative_error(out, expected) <= TOLERANCES[torch.float32][0]


@needs_interpreter
@pytest.mark.parametrize("normalize_before", [False, True], ids=["post_norm", "pre_norm"])
def test_matches_the_reference_layer_ffn(normalize_before, monkeypatch):
    """The kernel, fed an eval-mode reference layer's parameters, gives that layer's FFN block.

    The layer's parameters require grad: under torch.no_grad the kernel still runs.
    """
    torch.manual_seed(12)
    layer = TransformerEncoderLayer(64, 4, dim_feedforward=130, normalize_before=normalize_before).eval()
    with torch.no_grad():   # non-trivial LayerNorm affine and biases
        for parameter in (layer.norm2.weight, layer.norm2.bias, layer.linear1.bias, layer.linear2.bias):
            parameter.add_(torch.randn_like(parameter) * 0.2)
    src = torch.randn(9, 2, 64)
    calls = count_kernel_launches(monkeypatch)
    params = (layer.linear1.weight, layer.linear1.bias, layer.linear2.weight, layer.linear2.bias)
    with torch.no_grad():
        if normalize_before:   # src + FFN(norm2(src)): no LayerNorm after
            expected = src + layer._ffn(layer.norm2(src))
            out = ffn_inference(layer.norm2(src), *params, src)
        else:                  # norm2(src + FFN(src))
            expected = layer.norm2(src + layer._ffn(src))
            out = ffn_inference(src, *params, src, layer.norm2.weight, layer.norm2.bias, layer.norm2.eps)
    assert calls == [1]
    assert relative_error(out, expected) <= TOLERANCES[torch.float32][0]


def test_oracle_and_reference_agree_with_torch():
    generator = torch.Generator().manual_seed(2)
    for layernorm in (True, False):
        inputs = make_inputs((7,), 100, 130, torch.float64, generator, layernorm)
        x, w1, b1, w2, b2, residual, ln_weight, ln_bias = inputs
        expected = residual + F.linear(F.relu(F.linear(x, w1, b1)), w2, b2)
        if layernorm:
            expected = F.layer_norm(expected, (100,), ln_weight, ln_bias, 1e-5)
        assert torch.allclose(oracle(*inputs), expected, rtol=1e-12, atol=1e-12)
        assert torch.allclose(ffn_inference_ref(*inputs), expected, rtol=1e-12, atol=1e-12)


@needs_interpreter
@pytest.mark.parametrize("layernorm", [True, False], ids=["layernorm", "no_layernorm"])
def test_nan_propagates_like_the_reference(layernorm):
    """A NaN in x (or a NaN pre-activation) reaches the output row as in torch; it is never hidden by the ReLU."""
    generator = torch.Generator().manual_seed(13)
    inputs = make_inputs((7,), 64, 130, torch.float32, generator, layernorm)
    x = inputs[0].clone()
    x[3, 5] = float("nan")
    b1 = inputs[2].clone()
    b1[0] = float("nan")      # every row's hidden unit 0 is NaN: so is every output
    out = ffn_inference(x, *inputs[1:])
    assert torch.isnan(out[3]).all()
    assert torch.equal(torch.isnan(out), torch.isnan(ffn_inference_ref(x, *inputs[1:])))
    out = ffn_inference(inputs[0], inputs[1], b1, *inputs[3:])
    assert torch.isnan(out).all()
    with pytest.raises(AssertionError, match="NaN"):   # relative_error never passes a NaN
        relative_error(out, oracle(*as_float64(inputs)))


def test_wide_rows_fall_back_to_the_reference(monkeypatch):
    """D > 256 runs plain PyTorch (the kernel is never entered) and is still exact."""
    calls = count_kernel_launches(monkeypatch)
    generator = torch.Generator().manual_seed(3)
    inputs = make_inputs((7,), 320, 40, torch.float32, generator)
    out = ffn_inference(*inputs)
    assert calls == []
    assert relative_error(out, oracle(*as_float64(inputs))) <= TOLERANCES[torch.float32][0]
    with pytest.raises(ValueError, match="reference"):
        ffn_inference_forward(*inputs)


@needs_interpreter
def test_inputs_that_need_grad_fall_back_to_the_reference(monkeypatch):
    """With grad enabled, an input requiring grad takes the reference (autograd works); under no_grad, the kernel."""
    calls = count_kernel_launches(monkeypatch)
    generator = torch.Generator().manual_seed(4)
    inputs = make_inputs((7,), 64, 130, torch.float32, generator)
    x, w1, b1, w2, b2, residual, ln_weight, ln_bias = inputs
    w2 = w2.detach().requires_grad_()
    out = ffn_inference(x, w1, b1, w2, b2, residual, ln_weight, ln_bias)
    assert calls == [] and out.requires_grad
    expected = oracle(*as_float64(inputs))
    assert relative_error(out, expected) <= TOLERANCES[torch.float32][0]
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    (grad_w2,) = torch.autograd.grad(out, w2, grad_out.float())
    w2_64 = w2.detach().double().requires_grad_()
    ref = oracle(*as_float64((x, w1, b1)), w2_64, *as_float64((b2, residual, ln_weight, ln_bias)))
    (expected_grad,) = torch.autograd.grad(ref, w2_64, grad_out)
    assert relative_error(grad_w2, expected_grad) <= TOLERANCES[torch.float32][1]

    with torch.no_grad():
        out = ffn_inference(x, w1, b1, w2, b2, residual, ln_weight, ln_bias)
    assert calls == [1] and not out.requires_grad
    assert relative_error(out, expected) <= TOLERANCES[torch.float32][0]


def test_float64_falls_back_to_the_reference(monkeypatch):
    calls = count_kernel_launches(monkeypatch)
    generator = torch.Generator().manual_seed(14)
    inputs = make_inputs((7,), 64, 40, torch.float64, generator)
    assert torch.allclose(ffn_inference(*inputs), oracle(*inputs), rtol=1e-12, atol=1e-12)
    assert calls == []


def test_empty_rows():
    generator = torch.Generator().manual_seed(15)
    out = ffn_inference(*make_inputs((0, 2), 64, 40, torch.float32, generator))
    assert out.shape == (0, 2, 64)


def test_rows_stay_views_unless_int32_offsets_could_overflow():
    """`as_rows` (the launcher's layout helper, in kernels/common.py): (..., width) -> (M, width) views, copied
    only for a last stride != 1 or, with max_row_offset, a row stride whose int32 in-tile offsets would wrap."""
    x = torch.randn(3, 5, 8)
    assert as_rows(x, 8).data_ptr() == x.data_ptr() and as_rows(x, 8).shape == (15, 8)
    transposed = torch.randn(8, 15).t()
    assert as_rows(transposed, 8).stride() == (8, 1) and torch.equal(as_rows(transposed, 8), transposed)
    assert unit_last_stride(transposed).stride(-1) == 1 and unit_last_stride(x) is x
    storage = torch.arange(2**25 + 8, dtype=torch.uint8)   # 32 MB: a row stride of 2**25 elements
    strided = storage.as_strided((2, 8), (2**25, 1))
    assert as_rows(strided, 8).data_ptr() == strided.data_ptr()
    assert as_rows(strided, 8, max_row_offset=63).data_ptr() == strided.data_ptr()   # 63 * 2**25 < 2**31
    copied = as_rows(strided, 8, max_row_offset=64)
    assert copied.stride() == (8, 1) and torch.equal(copied, strided)


def test_bad_inputs_raise():
    generator = torch.Generator().manual_seed(6)
    x, w1, b1, w2, b2, residual, ln_weight, ln_bias = make_inputs((7,), 64, 40, torch.float32, generator)
    cases = [
        ("x", (x, w1[:, :63], b1, w2, b2, residual, ln_weight, ln_bias)),       # x no longer (..., D)
        ("w1", (x, w1[None], b1, w2, b2, residual, ln_weight, ln_bias)),
        ("w2", (x, w1, b1, w2.t(), b2, residual, ln_weight, ln_bias)),
        ("b1", (x, w1, b1[:39], w2, b2, residual, ln_weight, ln_bias)),
        ("b1", (x, w1, None, w2, b2, residual, ln_weight, ln_bias)),
        ("b2", (x, w1, b1, w2, b2[:63], residual, ln_weight, ln_bias)),
        ("residual", (x, w1, b1, w2, b2, residual[:6], ln_weight, ln_bias)),
        ("ln_weight", (x, w1, b1, w2, b2, residual, ln_weight[:63], ln_bias)),
        ("ln_bias", (x, w1, b1, w2, b2, residual, ln_weight, ln_bias[:63])),
        ("together", (x, w1, b1, w2, b2, residual, ln_weight, None)),
        ("share a dtype", (x, w1, b1, w2.double(), b2, residual, ln_weight, ln_bias)),
        ("share a dtype", (x, w1, b1, w2, b2, residual.half(), ln_weight, ln_bias)),
        ("floating point", tuple(None if t is None else t.int() for t in (x, w1, b1, w2, b2, residual, None, None))),
    ]
    for message, inputs in cases:
        with pytest.raises(ValueError, match=message):
            ffn_inference(*inputs)
        with pytest.raises(ValueError, match=message):
            ffn_inference_ref(*inputs)


def test_aot_configs_cover_every_launch():
    """One config per dtype x BLOCK_D; the 16-bit ones are shaped for wgmma on sm_90."""
    configs = aot_configs()
    assert len(configs) == 9
    assert {(c.signature["X_ptr"], c.constexprs["BLOCK_D"]) for c in configs} == {
        (dtype, block_d) for dtype in ("*fp32", "*fp16", "*bf16") for block_d in (64, 128, 256)}
    for config in configs:
        if config.signature["X_ptr"] != "*fp32":
            assert config.constexprs["BLOCK_M"] % 64 == 0 and config.options["num_warps"] % 4 == 0, config
        else:
            assert config.constexprs["DOT_PRECISION"] == "ieee"

