"""fastdetr.reference.deformable_attention.ms_deform_attn (grid_sample per level) against the gather oracle.

The oracle (tests/msda_oracle.py) shares no code with the reference: it gathers the four corners of each
sampling point itself, so an agreement in float64 checks the layouts (value's (N, S, M, D), the (x, y) order,
the level stacking) and grid_sample's convention (pixel = loc * W - 0.5, zeros outside) at once.
"""
from __future__ import annotations

import pytest
import torch
from msda_oracle import level_starts, ms_deform_attn_oracle, place_on_pixel_grid, random_msda_inputs

from fastdetr.reference.deformable_attention import check_ms_deform_attn_inputs, ms_deform_attn

DETR_SHAPES = [(8, 10), (4, 5), (2, 3), (1, 1)]   # four levels, strides 8..64 of a small image

CASES = {   # name: (batch, queries, heads, head_dim, shapes, points)
    "detr": (2, 300, 8, 32, DETR_SHAPES, 4),
    "one-level-one-point": (1, 17, 8, 32, [(3, 7)], 1),
    "five-levels-eight-points": (3, 33, 2, 16, [(6, 9), (3, 7), (3, 5), (1, 3), (1, 1)], 8),
    "one-by-one-maps": (3, 9, 4, 16, [(1, 1), (1, 1)], 4),
    "head-dim-128": (1, 65, 2, 128, [(3, 7), (2, 2)], 4),
    "one-query": (1, 1, 8, 32, DETR_SHAPES, 4),
}


def _inputs(case: str, seed: int = 0, dtype: torch.dtype = torch.float64, spread: float = 1.0):
    batch, queries, heads, head_dim, shapes, points = CASES[case]
    generator = torch.Generator().manual_seed(seed)
    return random_msda_inputs(batch, queries, heads, head_dim, shapes, points, dtype, generator, spread=spread)


def _max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert torch.isfinite(actual).all()
    return (actual.double() - expected.double()).abs().max().item()


@pytest.mark.parametrize("case", list(CASES))
def test_reference_matches_the_gather_oracle_in_float64(case):
    inputs = _inputs(case)
    out = ms_deform_attn(*inputs)
    batch, queries, heads, head_dim, _, _ = CASES[case]
    assert out.shape == (batch, queries, heads * head_dim) and out.dtype == torch.float64 and out.is_contiguous()
    assert out.abs().max() > 0.1   # not trivially zero
    assert _max_error(out, ms_deform_attn_oracle(*inputs)) < 1e-12


@pytest.mark.parametrize("case", ["detr", "five-levels-eight-points", "one-by-one-maps"])
def test_pixel_centres_borders_and_far_outside(case):
    """Exact pixel centres and borders (0 and 1 among them), and locations up to 3 maps away."""
    value, shapes, starts, locations, weights = _inputs(case, seed=1, spread=3.0)
    locations, on_centre = place_on_pixel_grid(locations, shapes, torch.Generator().manual_seed(2), fraction=0.5)
    assert on_centre.any() and (locations == 0).any() and (locations == 1).any()
    assert ((locations < -1) | (locations > 2)).any()
    inputs = (value, shapes, starts, locations, weights)
    assert _max_error(ms_deform_attn(*inputs), ms_deform_attn_oracle(*inputs)) < 1e-12


def test_all_points_outside_give_zeros_and_a_one_by_one_map_is_constant():
    value, shapes, starts, locations, weights = _inputs("one-by-one-maps", seed=3)
    # pixel coordinate x <= -1 or >= W: no corner inside
    outside = torch.where(locations < 0.5, locations.clamp(max=0.5) - 1.0, locations.clamp(min=0.5) + 1.0)
    assert torch.equal(ms_deform_attn(value, shapes, starts, outside, weights),
                       torch.zeros(3, 9, 4 * 16, dtype=torch.float64))
    # On a 1 x 1 map, the pixel centre (0.5, 0.5) samples the token exactly.
    centre = torch.full_like(locations, 0.5)
    expected = torch.einsum("nqmlp,nlmd->nqmd", weights, value).reshape(3, 9, 4 * 16)
    assert _max_error(ms_deform_attn(value, shapes, starts, centre, weights), expected) < 1e-12


def test_float32_against_the_float64_oracle():
    inputs = _inputs("detr", seed=4, dtype=torch.float32)
    out = ms_deform_attn(*inputs)
    assert out.dtype == torch.float32
    expected = ms_deform_attn_oracle(*inputs)
    assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-6


def _gradients(function, inputs, grad_out):
    value, shapes, starts, locations, weights = (t.detach().clone() for t in inputs)
    for tensor in (value, locations, weights):
        tensor.requires_grad_(True)
    function(value, shapes, starts, locations, weights).backward(grad_out)
    return value.grad, locations.grad, weights.grad


@pytest.mark.parametrize("case", ["detr", "one-level-one-point", "five-levels-eight-points", "one-by-one-maps",
                                  "head-dim-128"])
def test_gradients_match_the_oracle(case):
    """Autograd through both. Location gradients are compared everywhere except the coordinates on exact pixel
    centres: there x = loc * W - 0.5 is an integer, the bilinear interpolant has a kink (its slope jumps from
    v[i] - v[i-1] to v[i+1] - v[i]), and which one-sided slope comes out depends on whether floor() of
    (2 * loc - 1 + 1) * W / 2 - 0.5 (grid_sample's rounding) and of loc * W - 0.5 (the oracle's) land on the
    same side of i. Pixel borders (x = i - 0.5) are inside a linear piece and are compared. The value and
    weight gradients are continuous everywhere and are compared on all points."""
    value, shapes, starts, locations, weights = _inputs(case, seed=5)
    locations, on_centre = place_on_pixel_grid(locations, shapes, torch.Generator().manual_seed(6))
    inputs = (value, shapes, starts, locations, weights)
    grad_out = torch.randn(ms_deform_attn(*inputs).shape, generator=torch.Generator().manual_seed(7),
                           dtype=torch.float64)
    value_grad, location_grad, weight_grad = _gradients(ms_deform_attn, inputs, grad_out)
    value_expected, location_expected, weight_expected = _gradients(ms_deform_attn_oracle, inputs, grad_out)
    assert value_grad.abs().max() > 0 and location_grad.abs().max() > 0 and weight_grad.abs().max() > 0
    assert _max_error(value_grad, value_expected) < 1e-10
    assert _max_error(weight_grad, weight_expected) < 1e-10
    smooth = ~on_centre
    assert _max_error(location_grad[smooth], location_expected[smooth]) < 1e-10


def test_oracle_location_gradient_agrees_with_finite_differences():
    """The oracle's own location gradient (floor() has zero gradient) against central differences, away from
    the kinks, so the comparison above is not two implementations agreeing on a wrong derivative."""
    value, shapes, starts, locations, weights = _inputs("five-levels-eight-points", seed=8)
    locations = locations[:1, :4].clone().requires_grad_(True)
    value, weights = value[:1], weights[:1, :4]
    ms_deform_attn_oracle(value, shapes, starts, locations, weights).sum().backward()
    step = 1e-6
    difference = torch.zeros_like(locations)
    for index in range(locations.numel()):
        bump = torch.zeros(locations.numel(), dtype=torch.float64)
        bump[index] = step
        bump = bump.view_as(locations)
        up = ms_deform_attn_oracle(value, shapes, starts, locations.detach() + bump, weights).sum()
        down = ms_deform_attn_oracle(value, shapes, starts, locations.detach() - bump, weights).sum()
        difference.view(-1)[index] = (up - down) / (2 * step)
    # a bump of 1e-6 crosses a kink only if a pixel coordinate lies within 1e-6 * W of an integer
    assert _max_error(locations.grad, difference) < 1e-6


def test_level_start_index_of_other_integer_dtypes_and_mixed_float_dtypes():
    value, shapes, starts, locations, weights = _inputs("detr", seed=9)
    expected = ms_deform_attn(value, shapes, starts, locations, weights)
    out = ms_deform_attn(value, shapes.int(), starts.int(), locations.float(), weights.float())
    assert out.dtype == torch.float64
    assert _max_error(out, expected) < 1e-6   # the locations and weights were rounded to float32


def _bad_inputs():
    """(argument named in the message, the five inputs): each one wrong in one way."""
    good = _inputs("five-levels-eight-points", seed=10)
    value, shapes, starts, locations, weights = good

    def replace(index, tensor):
        inputs = list(good)
        inputs[index] = tensor
        return tuple(inputs)

    return {
        "value-3d": ("value", replace(0, value.flatten(2))),
        "value-integers": ("value", replace(0, value.long())),
        "value-tokens": ("value", replace(0, value[:, 1:])),
        "value-heads": ("sampling_locations", replace(0, value[:, :, :1])),
        "value-batch": ("sampling_locations", replace(0, value[:1])),
        "locations-5d": ("sampling_locations", replace(3, locations[..., 0])),
        "locations-xyz": ("sampling_locations", replace(3, torch.cat([locations, locations[..., :1]], -1))),
        "weights-points": ("attention_weights", replace(4, weights[..., 1:])),
        "weights-levels": ("attention_weights", replace(4, weights[:, :, :, 1:])),
        "weights-integers": ("attention_weights", replace(4, weights.long())),
        "shapes-float": ("spatial_shapes", replace(1, shapes.double())),
        "shapes-bool": ("spatial_shapes", replace(1, shapes.bool())),
        "shapes-one-level-short": ("spatial_shapes", replace(1, shapes[1:])),
        "shapes-three-columns": ("spatial_shapes", replace(1, torch.cat([shapes, shapes[:, :1]], 1))),
        "starts-float": ("level_start_index", replace(2, starts.double())),
        "starts-wrong-length": ("level_start_index", replace(2, starts[1:])),
        "starts-mismatch": ("level_start_index", replace(2, starts + torch.tensor([0, 1, 1, 1, 1]))),
        "starts-unstacked": ("level_start_index", replace(2, torch.tensor(level_starts([(1, 1), (1, 3), (3, 5),
                                                                                         (3, 7), (6, 9)])))),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_inputs_raise_value_error_naming_the_argument(case):
    argument, inputs = _bad_inputs()[case]
    with pytest.raises(ValueError, match=argument):
        ms_deform_attn(*inputs)


@pytest.mark.parametrize("shapes", [[(0, 3), (2, 2)], [(-2, -2)], [(2, 2), (4, -1)]])
def test_empty_or_negative_level_sizes_raise(shapes):
    """A product of negative sizes can still add up to value's token count, so the sizes are checked too."""
    tokens = max(sum(h * w for h, w in shapes), 1)
    value = torch.randn(1, tokens, 2, 4, dtype=torch.float64)
    locations = torch.rand(1, 3, 2, len(shapes), 2, 2, dtype=torch.float64)
    weights = torch.rand(1, 3, 2, len(shapes), 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn(value, torch.tensor(shapes), torch.tensor(level_starts(shapes)), locations, weights)


def test_metadata_check_needs_no_values():
    """check_ms_deform_attn_inputs reads shapes and dtypes only: it accepts meta tensors."""
    value, shapes, starts, locations, weights = (t.to("meta") for t in _inputs("detr"))
    check_ms_deform_attn_inputs(value, shapes, starts, locations, weights)
    with pytest.raises(ValueError, match="attention_weights"):
        check_ms_deform_attn_inputs(value, shapes, starts, locations, weights[..., :1])
