"""fastdetr.kernels.deformable_attention against the plain-PyTorch op in float64, forward and backward.

Through Triton's interpreter on the CPU (conftest sets TRITON_INTERPRET=1), so
sizes stay small: DETR-like level structure (4 levels down to 1 x 1, 8 heads,
4 points, head dim 32) with few queries, and odd shapes (1 and 5 levels, 1 and
8 points, 1 x 1 and 3 x 7 maps, head dims 16, 24, 64, 128, 256), locations far
outside [0, 1], exact pixel centres and borders. The reference itself is held
to an independent gather-based float64 oracle in tests/test_deformable_reference.py.
"""
from __future__ import annotations

import pytest
import torch
from msda_oracle import DETR_LEVELS, ms_deform_attn_oracle, random_msda_inputs, relative_error

from fastdetr.backend import interpreter_enabled, triton_importable
from fastdetr.kernels import deformable_attention as kernel
from fastdetr.kernels.deformable_attention import MAX_HEAD_DIM, aot_configs, ms_deform_attn
from fastdetr.reference.deformable_attention import ms_deform_attn as reference

pytestmark = pytest.mark.skipif(not (triton_importable() and interpreter_enabled()),
                                reason="CPU tensors run the kernel only under TRITON_INTERPRET=1")



def make_inputs(batch, queries, heads, head_dim, shapes, points, dtype=torch.float32, seed=0, spread=0.2,
                exact=False):
    """Fresh random (value, spatial_shapes, level_start_index, locations, weights); never zeros.

    spread: locations are drawn from [-spread, 1 + spread] (outside the map: zero corners).
    exact: a third of the locations sit on exact pixel centres, a third on pixel borders.
    """
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    levels = len(shapes)
    value = torch.randn(batch, int(sizes.sum()), heads, head_dim, generator=generator)
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=generator) * (1 + 2 * spread) - spread
    if exact:
        size = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)[:, None, :]   # (L, 1, 2) = (W, H)
        pixel = torch.floor(torch.rand(locations.shape, generator=generator) * size)
        centres, borders = (pixel + 0.5) / size, pixel / size
        pick = torch.randint(0, 3, locations.shape[:-1], generator=generator)[..., None]
        locations = torch.where(pick == 0, centres, torch.where(pick == 1, borders, locations))
    weights = torch.rand(batch, queries, heads, levels, points, generator=generator) + 0.05
    return (value.to(dtype), spatial_shapes, level_start_index, locations.to(dtype), weights.to(dtype))


def run(op, inputs, grad_out, **kwargs):
    value, shapes, starts, locations, weights = inputs
    value, locations, weights = (t.detach().clone().requires_grad_() for t in (value, locations, weights))
    out = op(value, shapes, starts, locations, weights, **kwargs)
    grads = torch.autograd.grad(out, (value, locations, weights), grad_out.to(out.dtype))
    return out, grads


def float64(inputs):
    value, shapes, starts, locations, weights = inputs
    return value.double(), shapes, starts, locations.double(), weights.double()


CASES = [
    # batch, queries, heads, head_dim, shapes, points
    pytest.param(2, 11, 8, 32, DETR_LEVELS, 4, id="detr-4levels-8heads-4points-d32"),
    pytest.param(1, 7, 1, 16, ((3, 7),), 1, id="1level-3x7-1point-d16"),
    pytest.param(3, 5, 2, 24, ((5, 6), (3, 3), (2, 2), (1, 2), (1, 1)), 8, id="5levels-8points-d24"),
    pytest.param(1, 9, 2, 64, ((1, 1), (4, 3)), 2, id="1x1-map-d64"),
    pytest.param(1, 4, 1, 128, ((2, 5),), 3, id="d128"),
    pytest.param(1, 3, 1, 256, ((3, 2),), 2, id="d256"),
]


@pytest.mark.parametrize("batch, queries, heads, head_dim, shapes, points", CASES)
def test_fp32_matches_float64_forward_and_gradients(batch, queries, heads, head_dim, shapes, points):
    inputs = make_inputs(batch, queries, heads, head_dim, shapes, points, seed=queries + head_dim)
    grad_out = torch.randn(batch, queries, heads * head_dim, generator=torch.Generator().manual_seed(1))
    out, grads = run(ms_deform_attn, inputs, grad_out)
    ref, ref_grads = run(reference, float64(inputs), grad_out)
    assert out.dtype == torch.float32 and out.shape == (batch, queries, heads * head_dim)
    assert relative_error(out, ref) <= 1e-5
    for name, grad, ref_grad in zip(("value", "sampling_locations", "attention_weights"), grads, ref_grads):
        assert grad.dtype == torch.float32
        assert relative_error(grad, ref_grad) <= 1e-4, name


def test_matches_the_independent_gather_oracle_on_an_untuned_shape():
    """Not grid_sample: tests/msda_oracle.py gathers the four corners itself, in float64."""
    generator = torch.Generator().manual_seed(21)
    inputs = random_msda_inputs(2, 19, 4, 40, [(7, 9), (4, 5), (2, 2)], 3, torch.float32, generator, spread=1.5)
    grad_out = torch.randn(2, 19, 160, generator=generator)
    out, grads = run(ms_deform_attn, inputs, grad_out)
    exact, exact_grads = run(ms_deform_attn_oracle, float64(inputs), grad_out.double())
    assert relative_error(out, exact) <= 1e-5
    for grad, exact_grad in zip(grads, exact_grads):
        assert relative_error(grad, exact_grad) <= 1e-4


@pytest.mark.parametrize("spread, exact", [(3.0, False), (0.0, True)], ids=["far-outside", "centres-and-borders"])
def test_locations_far_outside_and_on_pixel_centres_and_borders(spread, exact):
    inputs = make_inputs(2, 13, 2, 32, ((4, 6), (2, 3), (1, 1)), 4, seed=5, spread=spread, exact=exact)
    grad_out = torch.randn(2, 13, 64, generator=torch.Generator().manual_seed(2))
    out, grads = run(ms_deform_attn, inputs, grad_out)
    ref, ref_grads = run(reference, float64(inputs), grad_out)
    assert relative_error(out, ref) <= 1e-5
    grad_value, grad_locations, grad_weights = grads
    ref_value, ref_locations, ref_weights = ref_grads
    assert relative_error(grad_value, ref_value) <= 1e-4
    assert relative_error(grad_weights, ref_weights) <= 1e-4
    # The location gradient jumps where a pixel coordinate crosses an integer (the bilinear cell changes).
    # On an exact centre or border, float32 and float64 round x = loc * W - 0.5 to either side of it, so
    # they take different one-sided derivatives: compare away from integers, and require finite values there.
    _, shapes, _, locations, _ = inputs
    size = torch.tensor([[w, h] for h, w in shapes.tolist()], dtype=torch.float64)[:, None, :]
    pixel = locations.double() * size - 0.5
    smooth = ((pixel - pixel.round()).abs() > 1e-4).all(-1, keepdim=True).expand_as(pixel)
    assert torch.isfinite(grad_locations).all()
    if exact:
        assert (~smooth).any() and smooth.any()
    assert relative_error(grad_locations[smooth], ref_locations[smooth]) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_within_twice_the_reference_ops_error(dtype):
    """The kernel's error against float64 is at most about twice the reference op's own error in that dtype."""
    inputs = make_inputs(2, 11, 8, 32, DETR_LEVELS, 4, dtype=dtype, seed=9)
    grad_out = torch.randn(2, 11, 256, generator=torch.Generator().manual_seed(3)).to(dtype)
    out, grads = run(ms_deform_attn, inputs, grad_out)
    same_dtype, same_dtype_grads = run(reference, inputs, grad_out)
    exact, exact_grads = run(reference, float64(inputs), grad_out.double())
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    floor = {torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert relative_error(out, exact) <= 2 * relative_error(same_dtype, exact) + floor
    for grad, ref_grad, exact_grad in zip(grads, same_dtype_grads, exact_grads):
        assert relative_error(grad, exact_grad) <= 2 * relative_error(ref_grad, exact_grad) + floor


def test_deterministic_backward_is_bit_identical_and_agrees_with_atomics(monkeypatch):
    inputs = make_inputs(2, 9, 2, 32, ((6, 5), (3, 3), (1, 1)), 3, seed=11)
    grad_out = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(4))
    _, first = run(ms_deform_attn, inputs, grad_out, deterministic=True)
    _, second = run(ms_deform_attn, inputs, grad_out, deterministic=True)
    _, atomic = run(ms_deform_attn, inputs, grad_out, deterministic=False)
    for a, b, c in zip(first, second, atomic):
        assert torch.equal(a, b)
        assert relative_error(a, c) <= 1e-6
    # deterministic=None follows torch.use_deterministic_algorithms at backward time
    gathers = []
    original = kernel._gather_value_grad
    monkeypatch.setattr(kernel, "_gather_value_grad", lambda *a: gathers.append(1) or original(*a))
    run(ms_deform_attn, inputs, grad_out)
    assert not gathers
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _, deterministic = run(ms_deform_attn, inputs, grad_out)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert gathers == [1]
    assert all(torch.equal(a, b) for a, b in zip(first, deterministic))


def test_strided_inputs_are_read_as_they_are():
    value, shapes, starts, locations, weights = make_inputs(2, 6, 2, 32, ((3, 4), (2, 2)), 2, seed=13)
    # value as a (N, S, M, D) view of (N, M, S, D) storage (last stride 1), weights as a transposed copy's view
    value_view = value.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    weights_view = weights.transpose(1, 2).contiguous().transpose(1, 2)
    value_strided = torch.randn(*value.shape, 2).select(-1, 0).copy_(value)   # last stride 2: copied once
    for v, w in ((value_view, weights_view), (value_strided, weights)):
        assert not v.is_contiguous()
        out = ms_deform_attn(v, shapes, starts, locations, w)
        assert relative_error(out, reference(value.double(), shapes, starts, locations.double(),
                                             weights.double())) <= 1e-5


def test_empty_queries_and_bad_inputs():
    value, shapes, starts, locations, weights = make_inputs(1, 3, 2, 16, ((2, 2),), 2, seed=14)
    empty = ms_deform_attn(value, shapes, starts, locations[:, :0], weights[:, :0])
    assert empty.shape == (1, 0, 32)
    with pytest.raises(ValueError, match="attention_weights must be"):
        ms_deform_attn(value, shapes, starts, locations, weights[..., :1])
    with pytest.raises(ValueError, match="spatial_shapes must be integers"):
        ms_deform_attn(value, shapes.float(), starts, locations, weights)
    with pytest.raises(ValueError, match="value must be one of"):
        ms_deform_attn(value.double(), shapes, starts, locations, weights)
    wide = torch.randn(1, 4, 1, MAX_HEAD_DIM + 1)
    with pytest.raises(ValueError, match="exceeds MAX_HEAD_DIM"):
        ms_deform_attn(wide, shapes, starts, locations[:, :, :1], weights[:, :, :1])


def test_plain_cpu_says_which_op_to_use(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="fastdetr.reference.deformable_attention"):
        ms_deform_attn(*make_inputs(1, 2, 1, 16, ((2, 2),), 1))


def test_aot_configs_cover_every_launch_variant():
    """tests/test_kernel_report.py compiles each for sm_80 and sm_90 and fails on a spill."""
    configs = aot_configs()
    # per dtype and BLOCK_D: forward, 2 backwards, gather; up to BLOCK_D 128 the query side's forward and
    # 2 backwards, x 2 (points, boxes); the on-chip-GEMM forward (BLOCK_D 16 slices), x 2 sample widths x 2
    assert len(configs) == 3 * (5 * 4 + 4 * 2 * 3 + 2 * 2)
    project = [c for c in configs if "SAMPLES_BLOCK" in c.constexprs]
    assert {(c.constexprs["BLOCK_D"], c.constexprs["SAMPLES_BLOCK"], c.constexprs["BOX"]) for c in project} == {
        (16, s, b) for s in (16, 32) for b in (False, True)}
    assert max(c.constexprs["SAMPLES_BLOCK"] for c in project) == kernel.MAX_PROJECT_SAMPLES
    assert {c.constexprs["BLOCK_D"] for c in configs} == {16, 32, 64, 128, 256}
    assert {c.constexprs.get("DETERMINISTIC") for c in configs} == {None, False, True}
    query_side = [c for c in configs if "BOX" in c.constexprs and "SAMPLES_BLOCK" not in c.constexprs]
    assert {(c.constexprs["BOX"], c.constexprs.get("DETERMINISTIC")) for c in query_side} == {
        (False, None), (True, None), (False, False), (False, True), (True, False), (True, True)}
    assert max(c.constexprs["BLOCK_D"] for c in query_side) == kernel.QUERY_SIDE_MAX_HEAD_DIM
