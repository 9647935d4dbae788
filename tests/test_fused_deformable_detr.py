"""The fused Deformable DETR (`fused=True` / `fastdetr.optimize`) against the reference model it converts.

Whole models (plain, box refinement, two-stage) at tiny widths, perturbed off the official initialisation,
on a batch of two differently sized images (so a padding mask), through Triton's interpreter (conftest
sets TRITON_INTERPRET=1): forward outputs and every parameter's gradient within fp32 tolerances, the
fused kernels counted so a silent fallback to the reference fails the test; inference through the on-chip
FFN; bf16 autocast as close to float64 as the reference under autocast; layers the fused chain does not
take (GELU, head dims the attention kernel does not take) still right; the official layers' structure
converted too.
"""
from __future__ import annotations

import copy
import inspect
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdetr
import fastdetr.nn as fnn
from fastdetr.backend import interpreter_enabled, triton_importable
from fastdetr.models import build_deformable_model
from fastdetr.reference import deformable_detr as reference

pytestmark = pytest.mark.skipif(not (triton_importable() and interpreter_enabled()),
                                reason="needs Triton's interpreter (TRITON_INTERPRET=1, set by conftest)")

FORWARD_TOLERANCE, GRADIENT_TOLERANCE = 1e-5, 1e-4  # fp32, relative (norm-wise)
TINY = dict(hidden_dim=64, nheads=2, enc_layers=1, dec_layers=2, num_queries=7, dim_feedforward=96, enc_n_points=2,
            dec_n_points=2,
            backbone_width=8)
KERNELS = {"fastdetr.kernels.linear_layernorm": ("linear_residual_layernorm",),
           "fastdetr.kernels.in_projection": ("in_projection",),
           "fastdetr.kernels.linear_relu": ("linear_relu_dropout",),
           "fastdetr.kernels.ffn": ("ffn_inference",)}


@pytest.fixture
def launches(monkeypatch):
    """A Counter of the fused chain's kernel calls, by function name."""
    import importlib

    counts = Counter()
    for module_name, names in KERNELS.items():
        module = importlib.import_module(module_name)
        for name in names:
            original = getattr(module, name)

            def counted(*args, _name=name, _original=original, **kwargs):
                counts[_name] += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(module, name, counted)
    return counts


@pytest.fixture
def reference_sampling(monkeypatch):
    """MSDA's sampling in plain PyTorch, its projections and the rest of the chain fused: the interpreted MSDA
    kernels are most of a test's time, and tests/test_nn_deformable_attention.py checks them (the full
    kernel path runs in the plain-variant and inference tests here)."""
    monkeypatch.setattr(fnn.functional, "msda_query_side_fusable", lambda *args: False)
    monkeypatch.setattr(fnn.functional, "msda_kernel_supported", lambda *args: False)


def _model(seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    model = build_deformable_model("deformable_detr_small", num_classes=5, **{**TINY, **overrides})
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():   # off the official init (zero offsets / attention logits / box deltas)
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def _images(seed: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 48, 40, generator=generator), torch.randn(3, 32, 56, generator=generator)]


def _relative(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-30) -> float:
    assert torch.isfinite(actual).all(), "NaN/inf in the fused model's result"
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(floor)).item()


def _loss(outputs: dict) -> torch.Tensor:
    """Every output the criterion reads, weighted so no two cancel."""
    total = (outputs["pred_logits"] * 0.7).sum() + (outputs["pred_boxes"] * 1.3).square().sum()
    for aux in outputs.get("aux_outputs", []):
        total = total + aux["pred_logits"].sum() * 0.3 + aux["pred_boxes"].sum()
    if "enc_outputs" in outputs:
        total = total + outputs["enc_outputs"]["pred_logits"].sum() * 0.1 + outputs["enc_outputs"]["pred_boxes"].sum()
    return total


def _assert_outputs_match(fused: dict, plain: dict, tolerance: float) -> None:
    for key in ("pred_logits", "pred_boxes"):
        error = _relative(fused[key], plain[key])
        assert error < tolerance, f"{key}: {error:.2e}"
    for layer, (a, b) in enumerate(zip(fused.get("aux_outputs", []), plain.get("aux_outputs", []))):
        assert _relative(a["pred_boxes"], b["pred_boxes"]) < tolerance, f"aux {layer}"


def _float64_gradients(plain: nn.Module, images: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """The reference model's gradients in float64: the oracle for gradients whose fp32 value is itself
    ill-conditioned (the extra level's GroupNorm over a 1 x 1 map normalises 2 values per group)."""
    exact = copy.deepcopy(plain).double()
    exact.zero_grad(set_to_none=True)
    _loss(exact([image.double() for image in images])).backward()
    return [param.grad for param in exact.parameters()]


def _assert_gradients_match(fused: nn.Module, plain: nn.Module, images: list[torch.Tensor]) -> None:
    """Every gradient within GRADIENT_TOLERANCE of the reference's, relative to the larger of its norm and 1e-3
    of the largest (some are zero in exact arithmetic, e.g. biases right before a LayerNorm, and hold rounding
    noise); one that is not must be as close to the float64 reference as the fp32 reference is (2x)."""
    pairs = [(name, a.grad, b.grad) for (name, a), (_, b) in zip(fused.named_parameters(), plain.named_parameters())]
    largest = max(g.norm().item() for _, _, g in pairs if g is not None)
    exact = None
    for index, (name, fused_grad, grad) in enumerate(pairs):
        assert (fused_grad is None) == (grad is None), name
        if grad is None:
            continue
        floor = 1e-3 * largest
        error = _relative(fused_grad, grad, floor=floor)
        if error < GRADIENT_TOLERANCE:
            continue
        exact = _float64_gradients(plain, images) if exact is None else exact
        fused_error, reference_error = (_relative(g, exact[index], floor=floor) for g in (fused_grad, grad))
        assert fused_error < max(GRADIENT_TOLERANCE, 2 * reference_error), (
            f"{name}: {error:.2e} from the reference; {fused_error:.2e} from float64, the reference "
            f"{reference_error:.2e}")


VARIANTS = {"plain": {}, "box_refine": {"with_box_refine": True},
            "two_stage": {"with_box_refine": True, "two_stage": True}}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fused_model_trains_like_the_reference(variant, launches, request):
    if variant != "plain":
        request.getfixturevalue("reference_sampling")
    plain = _model(**VARIANTS[variant])
    fused = fastdetr.optimize(copy.deepcopy(plain))
    kinds = Counter(type(module).__name__ for module in fused.modules())
    assert kinds["DeformableTransformerEncoderLayer"] == 1 and kinds["DeformableTransformerDecoderLayer"] == 2
    assert isinstance(fused.transformer.encoder.layers[0], fnn.DeformableTransformerEncoderLayer)
    assert fused.state_dict().keys() == plain.state_dict().keys()
    images = _images()
    expected, actual = plain(images), fused(images)
    _assert_outputs_match(actual, expected, FORWARD_TOLERANCE)
    # per encoder layer: 2 residual + LayerNorm kernels (MSDA output, FFN), 1 GEMM + ReLU; per decoder layer 3 and
    # 1, and the self-attention's Q/K/V projection
    assert launches == {"linear_residual_layernorm": 2 * 1 + 3 * 2, "linear_relu_dropout": 1 + 2, "in_projection": 2}
    _loss(expected).backward()
    _loss(actual).backward()
    _assert_gradients_match(fused, plain, images)


def test_inference_takes_the_on_chip_ffn(launches):
    plain = _model(seed=3).eval()
    fused = fastdetr.optimize(copy.deepcopy(plain), inference=True)
    images = _images(seed=4)
    with torch.no_grad():
        expected, actual = plain(images), fused(images)
    _assert_outputs_match(actual, expected, FORWARD_TOLERANCE)
    assert launches == {"ffn_inference": 1 + 2, "linear_residual_layernorm": 1 + 2 * 2, "in_projection": 2}


def test_head_dims_the_attention_kernel_does_not_take_keep_the_rest_fused(launches, reference_sampling):
    """4 heads of 16: the decoder's self-attention runs nn.MultiheadAttention (as the reference), the MSDA
    epilogues and FFNs stay fused."""
    plain = _model(seed=5, nheads=4)
    fused = fastdetr.optimize(copy.deepcopy(plain))
    images = _images(seed=6)
    expected, actual = plain(images), fused(images)
    _assert_outputs_match(actual, expected, FORWARD_TOLERANCE)
    assert launches == {"linear_residual_layernorm": 2 + 2 * 2, "linear_relu_dropout": 3}
    _loss(expected).backward()
    _loss(actual).backward()
    _assert_gradients_match(fused, plain, images)


def test_layers_the_chain_does_not_take_run_the_reference(launches, reference_sampling):
    plain = _model(seed=7, activation="gelu")
    fused = fastdetr.optimize(copy.deepcopy(plain))
    assert isinstance(fused.transformer.decoder.layers[1], fnn.DeformableTransformerDecoderLayer)
    images = _images(seed=8)
    _assert_outputs_match(fused(images), plain(images), FORWARD_TOLERANCE)
    assert not launches   # GELU: every layer runs the parent's forward (the MSDA kernels still run)


def test_autocast_runs_the_chain_in_bfloat16(launches, reference_sampling):
    """Under bf16 autocast the fused model takes the kernels and lands as close to the float64 result as the
    reference under autocast; gradients reach the float32 parameters."""
    plain = _model(seed=9)
    fused = fastdetr.optimize(copy.deepcopy(plain))
    images = _images(seed=10)
    exact = copy.deepcopy(plain).double()(
        [image.double() for image in images])["pred_boxes"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference_bf16 = plain(images)["pred_boxes"]
        outputs = fused(images)
    assert launches["linear_residual_layernorm"] == 8 and launches["in_projection"] == 2
    error, reference_error = _relative(outputs["pred_boxes"], exact), _relative(reference_bf16, exact)
    assert error <= max(1e-2, 2 * reference_error), (error, reference_error)
    _loss(outputs).float().backward()
    grads = [p.grad for p in fused.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_optimize_twice_is_harmless_and_keeps_parameters():
    model = _model(seed=11)
    params = list(model.parameters())
    fastdetr.optimize(model)
    fastdetr.optimize(model)
    assert list(model.parameters()) == params
    assert type(model.transformer.decoder.layers[0]) is fnn.DeformableTransformerDecoderLayer


def _official_style_encoder_layer(layer: reference.DeformableTransformerEncoderLayer) -> nn.Module:
    """A module of another class with the official encoder layer's attributes and forward (its arguments and
    math), holding `layer`'s submodules: what fastdetr.optimize meets in the official repository."""

    class DeformableTransformerEncoderLayer(nn.Module):   # the official class's name, not fastdetr's class
        def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None):
            src2 = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
            src = self.norm1(src + self.dropout1(src2))
            src2 = self.linear2(self.dropout2(self.activation(self.linear1(src))))
            return self.norm2(src + self.dropout3(src2))

    official = DeformableTransformerEncoderLayer()
    for name, child in layer.named_children():
        setattr(official, name, copy.deepcopy(child))
    official.activation = F.relu
    return official


def test_the_official_layers_structure_converts(launches, reference_sampling):
    model = _model(seed=12)
    layers = model.transformer.encoder.layers
    layers[0] = _official_style_encoder_layer(layers[0])
    assert tuple(inspect.signature(type(layers[0]).forward).parameters)[1:] == (
        "src", "pos", "reference_points", "spatial_shapes", "level_start_index", "padding_mask")
    images = _images(seed=13)
    expected = model(images)
    fastdetr.optimize(model)
    assert isinstance(layers[0], fnn.DeformableTransformerEncoderLayer)
    assert isinstance(layers[0].self_attn, fnn.MultiScaleDeformableAttention)
    _assert_outputs_match(model(images), expected, FORWARD_TOLERANCE)
    assert launches["linear_relu_dropout"] == 3


def test_torch_compile_fullgraph_takes_the_fused_ops():
    """`torch.compile(fullgraph=True)` of the fused model: one graph holding fastdetr's custom ops (no graph
    break on the level sizes or the input checks), the same outputs as eager."""
    model = _model(seed=14).eval()
    fused = fastdetr.optimize(copy.deepcopy(model))
    ops = Counter()

    def backend(graph_module, example_inputs):
        for node in graph_module.graph.nodes:
            if node.op == "call_function" and str(node.target).startswith("fastdetr."):
                ops[str(node.target).split(".")[1]] += 1
        return graph_module

    images = torch.randn(2, 3, 48, 40, generator=torch.Generator().manual_seed(15))
    with torch.no_grad():
        compiled = torch.compile(fused, backend=backend, fullgraph=True)(images)
        expected = model(images)
    assert ops["ffn_inference"] == 3 and ops["linear_layernorm_fwd"] == 5 and ops["attention_fwd"] == 2, ops
    _assert_outputs_match(compiled, expected, FORWARD_TOLERANCE)
