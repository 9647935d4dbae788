"""The fused query side of multi-scale deformable attention against float64, forward and backward.

`ms_deform_attn_query` takes the raw sampling offsets and attention logits and
does the softmax over each head's L * P points, the locations (2-d reference
points and 4-d reference boxes) and the sampling in one kernel;
`ms_deform_attn_projected` adds the GEMM in front (recomputed in backward).
Both are held to `fastdetr.reference.deformable_attention.ms_deform_attn_query`
in float64, and through it to the independent gather oracle. Interpreter sizes
(conftest sets TRITON_INTERPRET=1): DETR-like levels with few queries, and odd
shapes (1 and 5 levels, 1 and 8 points, 1 x 1 and 3 x 7 maps, head dims 16 to 256).
"""
from __future__ import annotations

import pytest
import torch
from msda_oracle import DETR_LEVELS, ms_deform_attn_oracle, relative_error

from fastdetr.backend import interpreter_enabled, triton_importable
from fastdetr.kernels import deformable_attention as kernel
from fastdetr.kernels.deformable_attention import ms_deform_attn_projected, ms_deform_attn_query
from fastdetr.reference import deformable_attention as reference

pytestmark = pytest.mark.skipif(not (triton_importable() and interpreter_enabled()),
                                reason="CPU tensors run the kernel only under TRITON_INTERPRET=1")


CASES = [
    # batch, queries, heads, head_dim, shapes, points
    pytest.param(2, 11, 8, 32, DETR_LEVELS, 4, id="detr-4levels-8heads-4points-d32"),
    pytest.param(1, 7, 1, 16, ((3, 7),), 1, id="1level-3x7-1point-d16"),
    pytest.param(3, 5, 2, 24, ((5, 6), (3, 3), (2, 2), (1, 2), (1, 1)), 8, id="5levels-8points-d24"),
    pytest.param(1, 9, 2, 64, ((1, 1), (4, 3)), 2, id="1x1-map-d64"),
    pytest.param(1, 4, 1, 128, ((3, 2),), 2, id="d128"),
]


def make_inputs(batch, queries, heads, head_dim, shapes, points, boxes, dtype=torch.float32, seed=0,
                offset_scale=1.5):
    """Fresh random (value, spatial_shapes, level_start_index, offsets, logits, reference_points); never zeros.

    Offsets ~ N(0, offset_scale) (pixels of each level for points, box units for boxes: a scale of a few
    sends points off the map); logits ~ N(0, 2); reference points uniform in [0, 1], box sizes in [0.05, 0.6].
    """
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    levels = len(shapes)
    value = torch.randn(batch, int(sizes.sum()), heads, head_dim, generator=generator)
    offsets = torch.randn(batch, queries, heads, levels, points, 2, generator=generator) * offset_scale
    logits = torch.randn(batch, queries, heads, levels, points, generator=generator) * 2
    reference_points = torch.rand(batch, queries, levels, 2, generator=generator)
    if boxes:
        box_sizes = 0.05 + 0.55 * torch.rand(batch, queries, levels, 2, generator=generator)
        reference_points = torch.cat([reference_points, box_sizes], -1)
    return tuple(t.to(dtype) if t.dtype.is_floating_point else t
                 for t in (value, spatial_shapes, level_start_index, offsets, logits, reference_points))


def run(op, inputs, grad_out, **kwargs):
    value, shapes, starts, offsets, logits, reference_points = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (value, offsets, logits, reference_points)]
    out = op(leaves[0], shapes, starts, leaves[1], leaves[2], leaves[3], **kwargs)
    return out, torch.autograd.grad(out, leaves, grad_out.to(out.dtype))


def float64(inputs):
    return tuple(t.double() if t.dtype.is_floating_point else t for t in inputs)


NAMES = ("value", "sampling_offsets", "attention_logits", "reference_points")


@pytest.mark.parametrize("boxes", [False, True], ids=["points", "boxes"])
@pytest.mark.parametrize("batch, queries, heads, head_dim, shapes, points", CASES)
def test_fp32_matches_float64_forward_and_gradients(batch, queries, heads, head_dim, shapes, points, boxes):
    inputs = make_inputs(batch, queries, heads, head_dim, shapes, points, boxes, seed=queries + head_dim)
    grad_out = torch.randn(batch, queries, heads * head_dim, generator=torch.Generator().manual_seed(1))
    out, grads = run(ms_deform_attn_query, inputs, grad_out)
    ref, ref_grads = run(reference.ms_deform_attn_query, float64(inputs), grad_out)
    assert out.dtype == torch.float32 and out.shape == (batch, queries, heads * head_dim)
    assert relative_error(out, ref) <= 1e-5
    for name, grad, ref_grad in zip(NAMES, grads, ref_grads):
        assert grad.dtype == torch.float32 and grad.shape == ref_grad.shape, name
        assert relative_error(grad, ref_grad) <= 1e-4, name


def test_the_reference_matches_the_gather_oracle_with_locations_written_out():
    """The float64 reference of the fused op is softmax + locations + the sampling core, here spelled out."""
    value, shapes, starts, offsets, logits, boxes = float64(make_inputs(2, 6, 3, 16, ((5, 4), (2, 3)), 3, True,
                                                                        seed=3))
    weights = logits.flatten(-2).softmax(-1).view_as(logits)
    centre, size = boxes[:, :, None, :, None, :2], boxes[:, :, None, :, None, 2:]
    locations = centre + offsets * size / (2 * 3)
    expected = ms_deform_attn_oracle(value, shapes, starts, locations, weights)
    actual = reference.ms_deform_attn_query(value, shapes, starts, offsets, logits, boxes)
    assert (actual - expected).abs().max().item() < 1e-12


@pytest.mark.parametrize("boxes", [False, True], ids=["points", "boxes"])
def test_far_outside_the_map(boxes):
    """Offsets of tens of pixels (or boxes) put most points off the map: zeros there, gradients still exact."""
    inputs = make_inputs(2, 9, 2, 32, ((4, 6), (2, 3), (1, 1)), 4, boxes, seed=5, offset_scale=20.0)
    grad_out = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(2))
    out, grads = run(ms_deform_attn_query, inputs, grad_out)
    ref, ref_grads = run(reference.ms_deform_attn_query, float64(inputs), grad_out)
    assert relative_error(out, ref) <= 1e-5
    for name, grad, ref_grad in zip(NAMES, grads, ref_grads):
        assert relative_error(grad, ref_grad) <= 1e-4, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_within_twice_the_reference_ops_error(dtype):
    inputs = make_inputs(2, 11, 8, 32, DETR_LEVELS, 4, False, dtype=dtype, seed=9)
    grad_out = torch.randn(2, 11, 256, generator=torch.Generator().manual_seed(3)).to(dtype)
    out, grads = run(ms_deform_attn_query, inputs, grad_out)
    same_dtype, same_dtype_grads = run(reference.ms_deform_attn_query, inputs, grad_out)
    exact, exact_grads = run(reference.ms_deform_attn_query, float64(inputs), grad_out.double())
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    floor = {torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert relative_error(out, exact) <= 2 * relative_error(same_dtype, exact) + floor
    for name, grad, ref_grad, exact_grad in zip(NAMES, grads, same_dtype_grads, exact_grads):
        assert relative_error(grad, exact_grad) <= 2 * relative_error(ref_grad, exact_grad) + floor, name


def test_deterministic_backward_is_bit_identical_and_agrees_with_atomics():
    inputs = make_inputs(2, 9, 2, 32, ((6, 5), (3, 3), (1, 1)), 3, True, seed=11, offset_scale=0.5)
    grad_out = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(4))
    _, first = run(ms_deform_attn_query, inputs, grad_out, deterministic=True)
    _, second = run(ms_deform_attn_query, inputs, grad_out, deterministic=True)
    _, atomic = run(ms_deform_attn_query, inputs, grad_out, deterministic=False)
    for a, b, c in zip(first, second, atomic):
        assert torch.equal(a, b)
        assert relative_error(c, a) <= 1e-6
    torch.use_deterministic_algorithms(True)
    try:
        _, by_flag = run(ms_deform_attn_query, inputs, grad_out)   # deterministic=None follows the flag
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(a, b) for a, b in zip(first, by_flag))


def test_nan_logits_give_nan_outputs_like_the_reference():
    value, shapes, starts, offsets, logits, points = make_inputs(1, 4, 2, 16, ((3, 3),), 2, False, seed=13)
    logits[0, 1, 0, 0, 1] = float("nan")
    out = ms_deform_attn_query(value, shapes, starts, offsets, logits, points).view(1, 4, 2, 16)
    ref = reference.ms_deform_attn_query(value, shapes, starts, offsets, logits, points).view(1, 4, 2, 16)
    assert torch.equal(out.isnan(), ref.isnan()) and out[0, 1, 0].isnan().all()
    assert not out[0, 1, 1].isnan().any()


def test_slices_of_one_gemm_output_are_read_in_place():
    """The module's layout: offsets and logits are views into one (N, Lq, 3 M L P) tensor; no copy is made."""
    value, shapes, starts, offsets, logits, points = make_inputs(2, 5, 2, 16, ((3, 4), (2, 2)), 2, False, seed=17)
    both = torch.cat([offsets.flatten(2), logits.flatten(2)], -1)
    split = offsets[0, 0].numel()
    offsets_view = both[..., :split].view(offsets.shape)
    logits_view = both[..., split:].view(logits.shape)
    seen = []
    original = kernel.ms_deform_attn_query_forward
    kernel.ms_deform_attn_query_forward = lambda *a: seen.append(a[3].data_ptr() == both.data_ptr()) or original(*a)
    try:
        out = ms_deform_attn_query(value, shapes, starts, offsets_view, logits_view, points)
    finally:
        kernel.ms_deform_attn_query_forward = original
    assert seen == [True]
    assert torch.equal(out, ms_deform_attn_query(value, shapes, starts, offsets.contiguous(), logits.contiguous(),
                                                 points))


@pytest.mark.parametrize("boxes", [False, True], ids=["points", "boxes"])
def test_projected_matches_two_linears_then_the_reference(boxes):
    """ms_deform_attn_projected: the GEMM in front, recomputed in backward; every gradient against float64."""
    batch, queries, heads, head_dim, shapes, points = 2, 7, 4, 16, ((5, 6), (3, 3), (1, 1)), 3
    value, shapes_t, starts, _, _, reference_points = make_inputs(batch, queries, heads, head_dim, shapes, points,
                                                                  boxes, seed=19)
    generator = torch.Generator().manual_seed(20)
    channels, samples = 40, heads * len(shapes) * points
    query = torch.randn(batch, queries, channels, generator=generator)
    params = [torch.randn(samples * 2, channels, generator=generator) * 0.3,
              torch.randn(samples * 2, generator=generator),
              torch.randn(samples, channels, generator=generator) * 0.3,
              torch.randn(samples, generator=generator)]
    grad_out = torch.randn(batch, queries, heads * head_dim, generator=generator)

    def forward(value, query, w_off, b_off, w_logit, b_logit, reference_points, fused):
        if fused:
            return ms_deform_attn_projected(value, shapes_t, starts, query, w_off, b_off, w_logit, b_logit,
                                            reference_points)
        offsets = torch.nn.functional.linear(query, w_off, b_off).view(batch, queries, heads, len(shapes), points, 2)
        logits = torch.nn.functional.linear(query, w_logit, b_logit).view(batch, queries, heads, len(shapes), points)
        return reference.ms_deform_attn_query(value, shapes_t, starts, offsets, logits, reference_points)

    results = []
    for fused in (True, False):
        leaves = [t.detach().clone().double().requires_grad_() if not fused else
                  t.detach().clone().requires_grad_() for t in (value, query, *params, reference_points)]
        out = forward(*leaves, fused)
        results.append((out, torch.autograd.grad(out, leaves, grad_out.to(out.dtype))))
    (out, grads), (ref, ref_grads) = results
    assert relative_error(out, ref) <= 1e-5
    names = ("value", "query", "offsets.weight", "offsets.bias", "logits.weight", "logits.bias", "reference_points")
    for name, grad, ref_grad in zip(names, grads, ref_grads):
        assert grad.dtype == torch.float32 and grad.shape == ref_grad.shape, name
        assert relative_error(grad, ref_grad) <= 1e-4, name


def test_projected_saves_no_gemm_output_and_no_locations_or_weights():
    from fastdetr.measure.saved_bytes import saved_tensor_bytes

    value, shapes, starts, _, _, points = make_inputs(2, 6, 2, 16, ((4, 4), (2, 2)), 2, False, seed=23)
    query = torch.randn(2, 6, 32, requires_grad=True)
    samples = 2 * 2 * 2
    weights = [torch.randn(samples * 2, 32, requires_grad=True), torch.randn(samples * 2, requires_grad=True),
               torch.randn(samples, 32, requires_grad=True), torch.randn(samples, requires_grad=True)]
    value.requires_grad_()
    saved = saved_tensor_bytes(ms_deform_attn_projected, value, shapes, starts, query, *weights, points)
    shapes_saved = {tuple(storage.shape) for storage in saved.storages}
    assert saved.activation_bytes == 0, shapes_saved   # value, query, points, the parameters: inputs only


def test_bad_inputs_name_the_argument():
    value, shapes, starts, offsets, logits, points = make_inputs(1, 3, 2, 16, ((3, 3), (1, 1)), 2, False)
    with pytest.raises(ValueError, match="reference_points must be"):
        ms_deform_attn_query(value, shapes, starts, offsets, logits, points[..., :1])
    with pytest.raises(ValueError, match="reference_points .* disagree"):
        ms_deform_attn_query(value, shapes, starts, offsets, logits, points[:, :2])
    with pytest.raises(ValueError, match="attention_logits must be"):
        ms_deform_attn_query(value, shapes, starts, offsets, logits[..., :1], points)
    with pytest.raises(ValueError, match="sampling_offsets must be"):
        ms_deform_attn_query(value, shapes, starts, offsets[..., 0], logits, points)
    big = torch.randn(1, 10, 2, 256)   # the 10 tokens of a 3 x 3 and a 1 x 1 level, head dim 256
    with pytest.raises(ValueError, match="QUERY_SIDE_MAX_HEAD_DIM"):
        ms_deform_attn_query(big, shapes, starts, offsets, logits, points)
    with pytest.raises(ValueError, match="logits_weight"):
        ms_deform_attn_projected(value, shapes, starts, torch.randn(1, 3, 8), torch.randn(16, 8), torch.randn(16),
                                 torch.randn(5, 8), torch.randn(5), points)


def test_empty_queries_and_plain_cpu(monkeypatch):
    value, shapes, starts, offsets, logits, points = make_inputs(1, 0, 2, 16, ((3, 3),), 2, True)
    assert ms_deform_attn_query(value, shapes, starts, offsets, logits, points).shape == (1, 0, 32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="fastdetr.reference.deformable_attention"):
        ms_deform_attn_query(value, shapes, starts, offsets, logits, points)


def _projected_inputs(batch, queries, heads, head_dim, shapes, points, channels, boxes, seed):
    value, spatial_shapes, starts, _, _, reference_points = make_inputs(batch, queries, heads, head_dim, shapes,
                                                                        points, boxes, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    samples = heads * len(shapes) * points
    query = torch.randn(batch, queries, channels, generator=generator)
    params = (torch.randn(samples * 2, channels, generator=generator) * 0.3,
              torch.randn(samples * 2, generator=generator),
              torch.randn(samples, channels, generator=generator) * 0.3,
              torch.randn(samples, generator=generator))
    return value, spatial_shapes, starts, query, params, reference_points


def _two_linears_then_reference(value, shapes, starts, query, params, reference_points, points):
    batch, queries = query.shape[:2]
    heads, levels = value.shape[2], reference_points.shape[2]
    w_off, b_off, w_logit, b_logit = params
    offsets = torch.nn.functional.linear(query, w_off, b_off).view(batch, queries, heads, levels, points, 2)
    logits = torch.nn.functional.linear(query, w_logit, b_logit).view(batch, queries, heads, levels, points)
    return reference.ms_deform_attn_query(value, shapes, starts, offsets, logits, reference_points)


@pytest.mark.parametrize("boxes", [False, True], ids=["points", "boxes"])
@pytest.mark.parametrize("heads, head_dim, shapes, points, channels", [
    pytest.param(8, 32, DETR_LEVELS, 4, 256, id="detr-16-samples-c256"),
    pytest.param(2, 16, ((3, 7),), 1, 24, id="1-sample-c24"),
    pytest.param(3, 64, ((5, 6), (3, 3), (2, 2), (1, 2), (1, 1)), 6, 40, id="30-samples-c40"),
    pytest.param(1, 128, ((2, 3), (1, 1)), 3, 48, id="d128"),
])
def test_inference_with_the_gemm_on_chip_matches_float64(heads, head_dim, shapes, points, channels, boxes,
                                                        monkeypatch):
    """No grad needed: one kernel does the GEMM, the softmax, the locations and the sampling (counted)."""
    value, spatial_shapes, starts, query, params, reference_points = _projected_inputs(
        2, 13, heads, head_dim, shapes, points, channels, boxes, seed=heads + head_dim)
    launches = []
    original = kernel.ms_deform_attn_project_forward
    monkeypatch.setattr(kernel, "ms_deform_attn_project_forward", lambda *a: launches.append(1) or original(*a))
    with torch.no_grad():
        out = ms_deform_attn_projected(value, spatial_shapes, starts, query, *params, reference_points)
    assert launches == [1]
    exact = _two_linears_then_reference(*float64((value, spatial_shapes, starts, query)), float64(params),
                                        reference_points.double(), points)
    assert out.dtype == torch.float32 and relative_error(out, exact) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_inference_with_the_gemm_on_chip_in_half_precision(dtype):
    value, shapes, starts, query, params, reference_points = _projected_inputs(2, 11, 8, 32, DETR_LEVELS, 4, 64,
                                                                                False, seed=29)
    half = [t.to(dtype) for t in (value, query, *params)]
    with torch.no_grad():
        out = ms_deform_attn_projected(half[0], shapes, starts, half[1], *half[2:], reference_points)
    same_dtype = _two_linears_then_reference(half[0], shapes, starts, half[1], half[2:], reference_points, 4)
    exact = _two_linears_then_reference(*float64((value, shapes, starts, query)), float64(params),
                                        reference_points.double(), 4)
    floor = {torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert out.dtype == dtype
    assert relative_error(out, exact) <= 2 * relative_error(same_dtype, exact) + floor


def test_inference_past_the_on_chip_width_runs_the_gemm_then_the_query_kernel(monkeypatch):
    """L * P = 40 > MAX_PROJECT_SAMPLES: the GEMM by torch, then the query-side kernel; same result."""
    assert 5 * 8 > kernel.MAX_PROJECT_SAMPLES
    value, shapes, starts, query, params, reference_points = _projected_inputs(
        1, 6, 2, 16, ((5, 6), (3, 3), (2, 2), (1, 2), (1, 1)), 8, 32, True, seed=31)
    launched = []
    for name in ("ms_deform_attn_project_forward", "ms_deform_attn_query_forward"):
        original = getattr(kernel, name)
        monkeypatch.setattr(kernel, name, lambda *a, _n=name, _f=original: launched.append(_n) or _f(*a))
    with torch.no_grad():
        out = ms_deform_attn_projected(value, shapes, starts, query, *params, reference_points)
    assert launched == ["ms_deform_attn_query_forward"]
    exact = _two_linears_then_reference(*float64((value, shapes, starts, query)), float64(params),
                                        reference_points.double(), 8)
    assert relative_error(out, exact) <= 1e-5


def test_inference_with_the_gemm_on_chip_writes_the_output_only():
    from fastdetr.measure.counters import TritonLaunchCounter, WrittenBytes

    value, shapes, starts, query, params, reference_points = _projected_inputs(2, 9, 2, 16, ((4, 4), (2, 2)), 2,
                                                                                32, False, seed=37)
    with torch.no_grad(), TritonLaunchCounter() as launches, WrittenBytes() as written:
        out = ms_deform_attn_projected(value, shapes, starts, query, *params, reference_points)
    # the output, plus the launcher's int32 copies of the level shapes and starts
    assert written.nbytes == out.numel() * out.element_size() + (shapes.numel() + starts.numel()) * 4
    assert dict(launches.launch_counts) == {"_msda_project_fwd_kernel": 1}
