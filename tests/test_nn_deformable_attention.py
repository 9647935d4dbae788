"""fastdetr.nn.MultiScaleDeformableAttention against Deformable DETR's MSDeformAttn and the gather oracle.

The official module (fundamentalvision/Deformable-DETR, models/ops/modules/ms_deform_attn.py) needs its CUDA
extension, so it is not run here: its parameter names, shapes and initial values are written out by hand below,
and the forward is recomputed in float64 from the module's own Linear layers and tests/msda_oracle.py.
"""
from __future__ import annotations

import math

import pytest
import torch
from msda_oracle import level_starts, ms_deform_attn_oracle

import fastdetr.nn as fnn
from fastdetr.reference.deformable_attention import ms_deform_attn

DETR_SHAPES = [(8, 10), (4, 5), (2, 3), (1, 1)]

CASES = {   # name: (d_model, n_heads, n_points, shapes, batch, queries)
    "detr": (256, 8, 4, DETR_SHAPES, 2, 50),
    "one-level-one-point": (48, 3, 1, [(3, 7)], 3, 7),          # head dim 16
    "five-levels-eight-points": (64, 2, 8, [(6, 9), (3, 7), (3, 5), (1, 3), (1, 1)], 1, 33),
    "head-dim-128": (256, 2, 4, [(3, 7), (1, 1)], 2, 9),
}


def _module(d_model: int, n_heads: int, n_points: int, levels: int, seed: int = 0, randomize: bool = True):
    """A float64 module; randomize: every parameter non-trivial (the official init zeroes most of them)."""
    torch.manual_seed(seed)
    module = fnn.MultiScaleDeformableAttention(d_model, levels, n_heads, n_points).double()
    if randomize:
        with torch.no_grad():
            for parameter_name, parameter in module.named_parameters():
                if parameter_name == "sampling_offsets.bias":
                    parameter.add_(torch.randn_like(parameter) * 0.5)
                elif parameter_name == "sampling_offsets.weight":
                    parameter.normal_(0, 1 / math.sqrt(d_model))   # offsets of about a pixel
                else:
                    parameter.normal_(0, 1 / math.sqrt(parameter.shape[-1]))
    return module


def _inputs(case: str, boxes: bool, padded: bool, seed: int = 1):
    """(query, reference_points, input_flatten, input_spatial_shapes, input_level_start_index, input_padding_mask)."""
    d_model, _, _, shapes, batch, queries = CASES[case]
    generator = torch.Generator().manual_seed(seed)
    tokens = sum(h * w for h, w in shapes)
    query = torch.randn(batch, queries, d_model, generator=generator, dtype=torch.float64)
    flat = torch.randn(batch, tokens, d_model, generator=generator, dtype=torch.float64)
    centres = torch.rand(batch, queries, 1, 2, generator=generator, dtype=torch.float64).expand(-1, -1, len(shapes), 2)
    if boxes:
        sizes = 0.05 + 0.5 * torch.rand(batch, queries, 1, 2, generator=generator, dtype=torch.float64)
        reference_points = torch.cat([centres, sizes.expand(-1, -1, len(shapes), 2)], -1)
    else:
        reference_points = centres.clone()
    mask = None
    if padded:   # the last image is padded on the right: the last column of every level (1 x 1 levels stay valid)
        mask = torch.zeros(batch, tokens, dtype=torch.bool)
        for (height, width), start in zip(shapes, level_starts(shapes)):
            if width > 1:
                mask[-1, start:start + height * width].view(height, width)[:, -1] = True
    return (query, reference_points, flat, torch.tensor(shapes), torch.tensor(level_starts(shapes)), mask)


def _expected(module, query, reference_points, flat, spatial_shapes, level_start_index, mask):
    """The module's forward rewritten from its definition, with the gather oracle as the sampling core."""
    batch, queries, _ = query.shape
    heads, levels, points = module.n_heads, module.n_levels, module.n_points
    value = module.value_proj(flat)
    if mask is not None:
        value = value * (~mask).unsqueeze(-1)
    value = value.reshape(batch, flat.shape[1], heads, module.d_model // heads)
    offsets = module.sampling_offsets(query).reshape(batch, queries, heads, levels, points, 2)
    logits = module.attention_weights(query).reshape(batch, queries, heads, levels * points)
    weights = (logits - logits.amax(-1, keepdim=True)).exp()
    weights = (weights / weights.sum(-1, keepdim=True)).reshape(batch, queries, heads, levels, points)
    per_level = []
    for level, (height, width) in enumerate(spatial_shapes.tolist()):
        x = reference_points[:, :, level, 0].view(batch, queries, 1, 1)
        y = reference_points[:, :, level, 1].view(batch, queries, 1, 1)
        dx, dy = offsets[:, :, :, level, :, 0], offsets[:, :, :, level, :, 1]   # (N, Lq, M, P)
        if reference_points.shape[-1] == 2:                 # offsets in pixels of this level
            per_level.append(torch.stack([x + dx / width, y + dy / height], -1))
        else:                                               # offsets in units of half the box over P
            w = reference_points[:, :, level, 2].view(batch, queries, 1, 1)
            h = reference_points[:, :, level, 3].view(batch, queries, 1, 1)
            per_level.append(torch.stack([x + dx * w / (2 * points), y + dy * h / (2 * points)], -1))
    locations = torch.stack(per_level, 3)                   # (N, Lq, M, L, P, 2)
    return module.output_proj(ms_deform_attn_oracle(value, spatial_shapes, level_start_index, locations, weights))


def _max_error(actual, expected) -> float:
    assert torch.isfinite(actual).all()
    return (actual.double() - expected.double()).abs().max().item()


# ---------------------------------------------------------------------------------------------
# Parameters and initialisation
# ---------------------------------------------------------------------------------------------

def test_state_dict_keys_and_shapes_are_the_official_modules():
    """MSDeformAttn(256, 4, 8, 4): four Linear layers, in this order, 8 * 4 * 4 * 2 = 256 offsets per query."""
    expected = [
        ("sampling_offsets.weight", (256, 256)), ("sampling_offsets.bias", (256,)),
        ("attention_weights.weight", (128, 256)), ("attention_weights.bias", (128,)),
        ("value_proj.weight", (256, 256)), ("value_proj.bias", (256,)),
        ("output_proj.weight", (256, 256)), ("output_proj.bias", (256,)),
    ]
    module = fnn.MultiScaleDeformableAttention()
    assert [(key, tuple(value.shape)) for key, value in module.state_dict().items()] == expected
    assert (module.d_model, module.n_levels, module.n_heads, module.n_points) == (256, 4, 8, 4)
    # An official checkpoint's tensors load strictly.
    module.load_state_dict({key: torch.randn(shape) for key, shape in expected})


def test_state_dict_shapes_of_another_configuration():
    module = fnn.MultiScaleDeformableAttention(d_model=64, n_levels=3, n_heads=2, n_points=5)
    assert {key: tuple(value.shape) for key, value in module.state_dict().items()} == {
        "sampling_offsets.weight": (60, 64), "sampling_offsets.bias": (60,),   # 2 heads * 3 levels * 5 points * 2
        "attention_weights.weight": (30, 64), "attention_weights.bias": (30,),
        "value_proj.weight": (64, 64), "value_proj.bias": (64,),
        "output_proj.weight": (64, 64), "output_proj.bias": (64,),
    }


def test_initial_values_are_the_official_ones():
    torch.manual_seed(0)
    module = fnn.MultiScaleDeformableAttention()
    # head m points towards angle 2 pi m / 8, scaled onto the unit square; point p at p + 1 times that
    directions = torch.tensor([[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]],
                              dtype=torch.float32)
    expected = directions.view(8, 1, 1, 2) * torch.arange(1, 5, dtype=torch.float32).view(1, 1, 4, 1)
    expected = expected.expand(8, 4, 4, 2).reshape(-1)     # (head, level, point, xy) flattened, as the official
    bias = module.sampling_offsets.bias.detach()
    assert torch.allclose(bias, expected, atol=1e-6)       # cos(pi / 2) is 4e-8 in float32, not 0
    assert torch.equal(bias.view(8, 4, 4, 2)[1, 2, 3], torch.tensor([4.0, 4.0]))
    assert not module.sampling_offsets.weight.any()
    assert not module.attention_weights.weight.any() and not module.attention_weights.bias.any()
    for projection in (module.value_proj, module.output_proj):
        assert not projection.bias.any()
        bound = math.sqrt(6 / (256 + 256))                 # xavier_uniform_
        weight = projection.weight.detach()
        assert weight.abs().max() <= bound and weight.abs().max() > 0.95 * bound
        assert abs(weight.std().item() - bound / math.sqrt(3)) < 0.02 * bound
    assert not torch.equal(module.value_proj.weight, module.output_proj.weight)


def test_initial_pattern_for_three_heads_is_the_normalised_circle():
    module = fnn.MultiScaleDeformableAttention(d_model=48, n_levels=2, n_heads=3, n_points=2)
    angles = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3], dtype=torch.float64)
    circle = torch.stack([angles.cos(), angles.sin()], -1)
    square = circle / circle.abs().amax(-1, keepdim=True)  # (1, 0), (-0.577, 1), (-0.577, -1)
    expected = square.view(3, 1, 1, 2) * torch.tensor([1.0, 2.0], dtype=torch.float64).view(1, 1, 2, 1)
    actual = module.sampling_offsets.bias.detach().double().view(3, 2, 2, 2)
    assert torch.allclose(actual, expected.expand(3, 2, 2, 2), atol=1e-6)


def test_at_initialisation_the_core_sees_the_pattern_and_uniform_weights(monkeypatch):
    """With the official init every query samples its reference point plus the pattern, in pixels of each level,
    with weights 1 / (L * P); the spy also checks that `_core` is the one call into the sampling core."""
    module = fnn.MultiScaleDeformableAttention().double()
    calls = []

    def spy(value, shapes, starts, locations, weights):
        calls.append((value, shapes, starts, locations, weights))
        return ms_deform_attn(value, shapes, starts, locations, weights)

    monkeypatch.setattr(module, "_core", spy)
    query, reference_points, flat, shapes, starts, _ = _inputs("detr", boxes=False, padded=False)
    module(query, reference_points, flat, shapes, starts)
    (value, core_shapes, core_starts, locations, weights), = calls
    assert value.shape == (2, 107, 8, 32) and locations.shape == (2, 50, 8, 4, 4, 2)
    assert core_shapes is shapes and core_starts is starts
    assert torch.allclose(weights, torch.full_like(weights, 1 / 16))
    pattern = module.sampling_offsets.bias.detach().view(8, 4, 4, 2)
    expected = reference_points[:, :, None, :, None, :] + pattern / shapes.flip(-1).double()[:, None, :]
    assert _max_error(locations, expected) < 1e-12


def test_d_model_must_divide_into_heads():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        fnn.MultiScaleDeformableAttention(d_model=100, n_heads=8)


def test_head_dims_that_are_not_powers_of_two_are_accepted_without_a_warning():
    fnn.MultiScaleDeformableAttention(d_model=48, n_heads=2)   # the suite turns fastdetr warnings into errors


# ---------------------------------------------------------------------------------------------
# Forward and backward
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("boxes", [False, True], ids=["points", "boxes"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_the_float64_definition(case, boxes, padded):
    d_model, heads, points, shapes, batch, queries = CASES[case]
    module = _module(d_model, heads, points, len(shapes))
    inputs = _inputs(case, boxes, padded)
    out = module(*inputs)
    assert out.shape == (batch, queries, d_model) and out.dtype == torch.float64
    assert _max_error(out, _expected(module, *inputs)) < 1e-10


def test_forward_with_the_official_initialisation_matches_the_definition():
    module = _module(256, 8, 4, 4, randomize=False)
    inputs = _inputs("detr", boxes=True, padded=True)
    assert _max_error(module(*inputs), _expected(module, *inputs)) < 1e-10


def test_float32_module_against_the_float64_definition():
    module = _module(256, 8, 4, 4)
    inputs = _inputs("detr", boxes=False, padded=True)
    expected = _expected(module, *inputs)
    out = module.float()(*(t.float() if t is not None and t.is_floating_point() else t for t in inputs))
    assert out.dtype == torch.float32
    assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-5


@pytest.mark.parametrize("boxes", [False, True], ids=["points", "boxes"])
def test_padded_tokens_do_not_affect_the_output(boxes):
    module = _module(256, 8, 4, 4)
    query, reference_points, flat, shapes, starts, mask = _inputs("detr", boxes, padded=True)
    out = module(query, reference_points, flat, shapes, starts, mask)
    noisy = flat.clone()
    noisy[mask] = 1e4 * torch.randn(int(mask.sum()), flat.shape[-1], dtype=torch.float64)
    assert torch.equal(module(query, reference_points, noisy, shapes, starts, mask), out)
    # without the mask the same change does reach the output (the test is not vacuous)
    assert not torch.allclose(module(query, reference_points, noisy, shapes, starts), module(
        query, reference_points, flat, shapes, starts))


def test_a_fully_padded_image_gets_the_output_projections_bias():
    module = _module(64, 2, 8, 5)
    query, reference_points, flat, shapes, starts, _ = _inputs("five-levels-eight-points", boxes=False, padded=False)
    mask = torch.ones(1, flat.shape[1], dtype=torch.bool)
    out = module(query, reference_points, flat, shapes, starts, mask)
    assert torch.allclose(out, module.output_proj.bias.detach().expand_as(out), rtol=0, atol=1e-12)


@pytest.mark.parametrize("boxes", [False, True], ids=["points", "boxes"])
def test_gradients_reach_every_parameter_and_match_the_definition(boxes):
    """Autograd through the module and through the float64 definition; the random locations are nowhere near
    a pixel centre, where the location gradient would be one-sided (tests/test_deformable_reference.py)."""
    module = _module(64, 2, 8, 5)
    query, reference_points, flat, shapes, starts, mask = _inputs("five-levels-eight-points", boxes, padded=True)
    leaves = [tensor.clone().requires_grad_(True) for tensor in (query, reference_points, flat)]
    grad_out = torch.randn(1, 33, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def gradients(forward):
        module.zero_grad(set_to_none=True)
        inputs = [leaf.detach().clone().requires_grad_(True) for leaf in leaves]
        forward(module, inputs[0], inputs[1], inputs[2], shapes, starts, mask).backward(grad_out)
        named = {name: parameter.grad for name, parameter in module.named_parameters()}
        named.update(query=inputs[0].grad, reference_points=inputs[1].grad, input_flatten=inputs[2].grad)
        return named

    actual = gradients(lambda m, *args: m(*args))
    expected = gradients(_expected)
    assert list(actual)[:8] == [name for name, _ in module.named_parameters()]
    for name, grad in actual.items():
        assert grad is not None and grad.abs().max() > 0, name
        assert _max_error(grad, expected[name]) < 1e-9, name


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------

def _bad_calls():
    """(pattern the message must match, the six forward arguments): each wrong in one way."""
    query, reference_points, flat, shapes, starts, mask = _inputs("detr", boxes=False, padded=True)
    return {
        "query-channels": ("query must be", (query[..., :-1], reference_points, flat, shapes, starts, mask)),
        "query-2d": ("query must be", (query[0], reference_points, flat, shapes, starts, mask)),
        "flatten-channels": ("input_flatten must be", (query, reference_points, flat[..., 1:], shapes, starts, mask)),
        "flatten-batch": ("input_flatten must be", (query, reference_points, flat[:1], shapes, starts, mask)),
        "flatten-tokens": ("input_flatten has 106 tokens, input_spatial_shapes .* hold 107",
                           (query, reference_points, flat[:, 1:], shapes, starts, None)),
        "reference-xyz": ("reference_points must be .* 2 or 4",
                          (query, torch.cat([reference_points, reference_points[..., :1]], -1), flat, shapes, starts,
                           mask)),
        "reference-levels": ("reference_points must be", (query, reference_points[:, :, 1:], flat, shapes, starts,
                                                          mask)),
        "reference-queries": ("reference_points must be", (query, reference_points[:, 1:], flat, shapes, starts,
                                                           mask)),
        "shapes-levels": ("input_spatial_shapes must be", (query, reference_points, flat, shapes[1:], starts, mask)),
        "shapes-float": ("input_spatial_shapes must be integers",
                         (query, reference_points, flat, shapes.double(), starts, mask)),
        "starts-length": ("input_level_start_index must be", (query, reference_points, flat, shapes, starts[1:],
                                                              mask)),
        "starts-values": ("level_start_index", (query, reference_points, flat, shapes, starts.flip(0), mask)),
        "mask-float": ("input_padding_mask must be bool", (query, reference_points, flat, shapes, starts,
                                                           mask.double())),
        "mask-tokens": ("input_padding_mask must be", (query, reference_points, flat, shapes, starts, mask[:, 1:])),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_inputs_raise_value_error_with_a_clear_message(case):
    module = _module(256, 8, 4, 4)
    pattern, arguments = _bad_calls()[case]
    with pytest.raises(ValueError, match=pattern):
        module(*arguments)


FUSIONS = {   # name: (fuse_query_side, fuse_value_side, the launchers that must run once each)
    "query-and-value-sides": (True, True, ("ms_deform_attn_query_forward", "linear_relu_forward")),
    "sampling-core-only": (False, False, ("ms_deform_attn_forward",)),
}
LAUNCHERS = ("ms_deform_attn_query_forward", "ms_deform_attn_project_forward", "ms_deform_attn_forward",
             "linear_relu_forward")


def _count_launchers(monkeypatch) -> list[str]:
    import fastdetr.kernels.deformable_attention as msda_kernels
    import fastdetr.kernels.linear_relu as linear_kernels

    launches = []
    for owner in (msda_kernels, linear_kernels):
        for name in LAUNCHERS:
            if hasattr(owner, name):
                original = getattr(owner, name)
                monkeypatch.setattr(owner, name, lambda *a, _n=name, _f=original, **k: launches.append(_n) or
                                    _f(*a, **k))
    return launches


@pytest.mark.parametrize("fusion", list(FUSIONS))
@pytest.mark.parametrize("boxes", [False, True], ids=["points", "boxes"])
def test_the_kernel_path_matches_the_reference_path_forward_and_backward(boxes, fusion, monkeypatch):
    """float32 under the interpreter runs the Triton kernels (counted); the same module on the reference path
    agrees, and so does the float64 definition."""
    from fastdetr.backend import interpreter_enabled

    if not interpreter_enabled():
        pytest.skip("the kernel path on the CPU needs TRITON_INTERPRET=1")
    query_side, value_side, expected_launches = FUSIONS[fusion]
    module = _module(256, 2, 4, 2).float()
    module.fuse_query_side, module.fuse_value_side = query_side, value_side
    query, reference_points, flat, shapes, starts, mask = _inputs("head-dim-128", boxes=boxes, padded=True)
    inputs = [t.float().requires_grad_() for t in (query, reference_points, flat)]
    launches = _count_launchers(monkeypatch)

    def run():
        out = module(inputs[0], inputs[1], inputs[2], shapes, starts, mask)
        grads = torch.autograd.grad(out.square().sum(), [*inputs, *module.parameters()])
        return out, grads

    fused, fused_grads = run()
    assert sorted(launches) == sorted(expected_launches)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    plain, plain_grads = run()
    assert len(launches) == len(expected_launches)
    assert ((fused - plain).norm() / plain.norm()).item() < 1e-5
    for fused_grad, plain_grad in zip(fused_grads, plain_grads):
        assert not torch.isnan(fused_grad).any()
        assert ((fused_grad - plain_grad).norm() / plain_grad.norm().clamp_min(1e-30)).item() < 1e-4
    exact = _expected(module.double(), query, reference_points, flat, shapes, starts, mask)
    assert ((fused.double() - exact).norm() / exact.norm()).item() < 1e-5


@pytest.mark.parametrize("case", ["detr", "five-levels-eight-points", "one-level-one-point"])
def test_the_fused_module_matches_the_float64_definition_on_other_shapes(case):
    from fastdetr.backend import interpreter_enabled

    if not interpreter_enabled():
        pytest.skip("the kernel path on the CPU needs TRITON_INTERPRET=1")
    d_model, heads, points, shapes, _, _ = CASES[case]
    module = _module(d_model, heads, points, len(shapes), seed=3)
    query, reference_points, flat, spatial_shapes, starts, mask = _inputs(case, boxes=True, padded=True, seed=4)
    exact = _expected(module, query, reference_points, flat, spatial_shapes, starts, mask)
    fused = module.float()(query.float(), reference_points.float(), flat.float(), spatial_shapes, starts, mask)
    assert ((fused.double() - exact).norm() / exact.norm()).item() < 1e-5


def test_head_dims_past_the_query_sides_limit_run_the_sampling_core_alone(monkeypatch):
    """Head dim 256: beyond QUERY_SIDE_MAX_HEAD_DIM, within the sampling kernel's MAX_HEAD_DIM."""
    from fastdetr.backend import interpreter_enabled

    if not interpreter_enabled():
        pytest.skip("the kernel path on the CPU needs TRITON_INTERPRET=1")
    module = _module(256, 1, 2, 2).float()
    query, reference_points, flat, shapes, starts, mask = _inputs("head-dim-128", boxes=False, padded=True)
    launches = _count_launchers(monkeypatch)
    out = module(query.float(), reference_points.float(), flat.float(), shapes, starts, mask)
    assert sorted(launches) == ["linear_relu_forward", "ms_deform_attn_forward"]
    exact = _expected(module.double(), query, reference_points, flat, shapes, starts, mask)
    assert ((out.double() - exact).norm() / exact.norm()).item() < 1e-5


def test_bf16_autocast_fused_path_is_within_bf16_tolerance_of_the_definition():
    """Under autocast the GEMMs run in bf16 (the value projection's fill included) and the kernel reads them."""
    from fastdetr.backend import interpreter_enabled

    if not interpreter_enabled():
        pytest.skip("the kernel path on the CPU needs TRITON_INTERPRET=1")
    module = _module(64, 2, 3, 5, seed=5)
    query, reference_points, flat, shapes, starts, mask = _inputs("five-levels-eight-points", boxes=False,
                                                                  padded=True, seed=6)
    exact = _expected(module, query, reference_points, flat, shapes, starts, mask)
    module = module.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = module(query.float(), reference_points.float(), flat.float(), shapes, starts, mask)
    assert fused.dtype == torch.bfloat16
    assert ((fused.double() - exact).norm() / exact.norm()).item() < 2e-2


def test_fused_inference_writes_neither_locations_nor_weights(monkeypatch):
    """No-grad forward of the fused module: no tensor of the locations', the weights' or the offsets+logits
    GEMM's size is ever written (the GEMM runs on chip); the unfused path writes all three kinds."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastdetr.backend import interpreter_enabled
    from fastdetr.measure.counters import TritonLaunchCounter

    if not interpreter_enabled():
        pytest.skip("the kernel path on the CPU needs TRITON_INTERPRET=1")

    class Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numels = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view and isinstance(out, torch.Tensor):
                self.numels.append(out.numel())
            return out

    module = _module(64, 2, 3, 5).float()
    query, reference_points, flat, shapes, starts, mask = _inputs("five-levels-eight-points", boxes=True,
                                                                  padded=True)
    batch, queries = query.shape[:2]
    samples = batch * queries * 2 * 5 * 3
    for fused in (True, False):
        module.fuse_query_side = module.fuse_value_side = fused
        with torch.no_grad(), TritonLaunchCounter(), Sizes() as sizes:
            module(query.float(), reference_points.float(), flat.float(), shapes, starts, mask)
        written = set(sizes.numels)
        if fused:
            assert not written & {samples, samples * 2, samples * 3}
        else:
            assert {samples, samples * 2} <= written


def test_the_kernel_path_saves_fewer_activation_bytes_than_the_reference(monkeypatch):
    """grid_sample per level saves reshaped value copies and the sampled values; the op alone saves its inputs
    (value, locations, weights); the fused module saves neither locations nor weights nor the GEMM's output."""
    from fastdetr.backend import interpreter_enabled
    from fastdetr.measure.saved_bytes import saved_tensor_bytes
    from fastdetr.nn import functional

    if not interpreter_enabled():
        pytest.skip("the kernel path on the CPU needs TRITON_INTERPRET=1")
    module = _module(256, 2, 4, 2).float()
    query, reference_points, flat, shapes, starts, mask = _inputs("head-dim-128", boxes=False, padded=True)
    inputs = dict(query=query.float().requires_grad_(), reference_points=reference_points.float(),
                  input_flatten=flat.float().requires_grad_(), input_spatial_shapes=shapes,
                  input_level_start_index=starts, input_padding_mask=mask)
    fused = saved_tensor_bytes(module, **inputs)
    module.fuse_query_side = module.fuse_value_side = False
    op = saved_tensor_bytes(module, **inputs)
    monkeypatch.setattr(functional, "msda_kernel_supported", lambda *args: False)
    plain = saved_tensor_bytes(module, **inputs)
    assert 0 < fused.activation_bytes < op.activation_bytes < plain.activation_bytes
