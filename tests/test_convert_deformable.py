"""`fastdetr.optimize` on multi-scale deformable attention: Deformable DETR's official `MSDeformAttn` and the
Deformable DETR, RT-DETR and RT-DETRv2 models of Hugging Face transformers.

Each model is built from a small config with random weights (no download), copied, and the copy converted;
both run forward and backward, and outputs and parameter gradients must agree at fp32 tolerances. Under
TRITON_INTERPRET=1 (conftest) the converted modules run the Triton op through the interpreter (the launches
are counted), so the shapes are tiny: d_model 64, 4 heads of 16, 32 x 32 and 64 x 64 images.
"""
from __future__ import annotations

import copy
import logging
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdetr
import fastdetr.nn as fnn
from fastdetr.backend import interpreter_enabled, triton_importable
from fastdetr.nn.hf import FusedRTDetrV2Attention, FusedSamplingCore

FORWARD_TOLERANCE, GRADIENT_TOLERANCE = 1e-5, 1e-4  # fp32, relative (norm-wise)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def kernel_launches(monkeypatch):
    """A list that grows by one per MSDA forward kernel launch, the sampling core's or the fused query side's
    (None when the kernels cannot run on the CPU)."""
    if not (triton_importable() and interpreter_enabled()):
        return None
    import fastdetr.kernels.deformable_attention as kernel

    launches = []
    for name in ("ms_deform_attn_forward", "ms_deform_attn_query_forward", "ms_deform_attn_project_forward"):
        original = getattr(kernel, name)
        monkeypatch.setattr(kernel, name, lambda *args, _f=original: launches.append(1) or _f(*args))
    return launches


def _relative(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-30) -> float:
    assert torch.isfinite(actual).all(), "NaN/inf in the converted model's result"
    return ((actual - expected).norm() / expected.norm().clamp_min(floor)).item()


def _perturb(model: nn.Module, seed: int, scale: float = 0.05) -> None:
    """Move every parameter off its initial value: the official init zeroes the offsets' and attention
    weights' projections (every query would sample the same pattern with equal weights) and the box heads'
    last layers (boxes would not depend on the decoder)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)


def _gradients(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor | None]:
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    grads = torch.autograd.grad(loss, [param for _, param in named], allow_unused=True)
    return {name: grad for (name, _), grad in zip(named, grads)}


def _assert_gradients_match(fused: dict, plain: dict) -> None:
    """Every parameter's gradient within GRADIENT_TOLERANCE of the unconverted model's, relative to the larger
    of its own norm and 1e-3 of the largest one: some are zero in exact arithmetic (key biases before a
    softmax, biases right before a normalisation) and hold only rounding noise."""
    assert fused.keys() == plain.keys()
    largest = max(grad.norm().item() for grad in plain.values() if grad is not None)
    for name, grad in plain.items():
        assert (fused[name] is None) == (grad is None), name
        if grad is not None:
            error = _relative(fused[name], grad, floor=1e-3 * largest)
            assert error < GRADIENT_TOLERANCE, f"{name}: {error:.2e}"


def _assert_converted_in_place(model: nn.Module, convert) -> None:
    """`convert(model)` keeps the Parameter objects, the buffers and the state_dict."""
    parameters = dict(model.named_parameters())
    state = {key: value.clone() for key, value in model.state_dict().items()}
    assert convert(model) is model
    assert {name: id(param) for name, param in model.named_parameters()} == {
        name: id(param) for name, param in parameters.items()}
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[key], state[key]) for key in state)


# ---------------------------------------------------------------------------------------------
# the official MSDeformAttn
# ---------------------------------------------------------------------------------------------

class MSDeformAttn(nn.Module):
    """A stand-in for Deformable DETR's `models/ops/modules/ms_deform_attn.py` (not installable: a CUDA build):
    its attribute names, constructor and forward arguments, written from the paper's definition, with the
    plain-PyTorch sampling (grid_sample per level) in place of the CUDA op."""

    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        self.im2col_step = 64
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes, input_level_start_index,
                input_padding_mask=None):
        batch, queries, _ = query.shape
        tokens = input_flatten.shape[1]
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        head_dim = self.d_model // heads
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(batch, tokens, heads, head_dim)
        offsets = self.sampling_offsets(query).view(batch, queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, queries, heads, levels * points).softmax(-1)
        if reference_points.shape[-1] == 2:   # centres; offsets in pixels of each level
            size = torch.stack([input_spatial_shapes[:, 1], input_spatial_shapes[:, 0]], -1).to(offsets)
            locations = reference_points[:, :, None, :, None, :] + offsets / size[None, None, None, :, None, :]
        else:                                 # boxes; offsets in half sizes, over P
            box = reference_points[:, :, None, :, None, :]
            locations = box[..., :2] + offsets / points * box[..., 2:] * 0.5
        # sample each level at grid 2 * loc - 1 (align_corners=False: [0, 1] spans the map's outer edges)
        sampled = []
        for level, (height, width) in enumerate(input_spatial_shapes.tolist()):
            start = int(input_level_start_index[level])
            level_value = value[:, start:start + height * width].permute(0, 2, 3, 1)        # (N, M, D, H*W)
            level_value = level_value.reshape(batch * heads, head_dim, height, width)
            grid = 2 * locations[:, :, :, level].transpose(1, 2).flatten(0, 1) - 1          # (N*M, Lq, P, 2)
            sampled.append(F.grid_sample(level_value, grid, mode="bilinear", padding_mode="zeros",
                                         align_corners=False))                               # (N*M, D, Lq, P)
        weights = weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
        output = (torch.cat(sampled, -1) * weights).sum(-1).view(batch, heads * head_dim, queries)
        return self.output_proj(output.transpose(1, 2))


def _official_inputs(boxes: bool, seed: int = 1):
    """Two images, 7 queries, three levels of 6x5, 3x3, 1x2 with the second image's last tokens padded."""
    generator = torch.Generator().manual_seed(seed)
    shapes = torch.tensor([[6, 5], [3, 3], [1, 2]])
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    tokens = int(shapes.prod(1).sum())
    query = torch.randn(2, 7, 64, generator=generator)
    flat = torch.randn(2, tokens, 64, generator=generator)
    reference = torch.rand(2, 7, 3, 4 if boxes else 2, generator=generator)
    if boxes:
        reference[..., 2:] = reference[..., 2:] * 0.5 + 0.1
    mask = torch.zeros(2, tokens, dtype=torch.bool)
    mask[1, tokens - 12:] = True
    return [query, reference, flat], shapes, starts, mask


@pytest.mark.parametrize("boxes", [False, True], ids=["points", "boxes"])
def test_official_msdeformattn_converts_in_place_and_matches(boxes, kernel_launches, caplog):
    torch.manual_seed(0)
    model = nn.Sequential(MSDeformAttn(d_model=64, n_levels=3, n_heads=4, n_points=2))
    _perturb(model, seed=2, scale=0.2)
    fused = copy.deepcopy(model)
    with caplog.at_level(logging.INFO, logger="fastdetr.optimize"):
        _assert_converted_in_place(fused, fastdetr.optimize)
    assert type(fused[0]) is fnn.MultiScaleDeformableAttention
    assert "1 MSDeformAttn -> MultiScaleDeformableAttention" in caplog.text

    inputs, shapes, starts, mask = _official_inputs(boxes)

    def run(module):
        arguments = [tensor.clone().requires_grad_() for tensor in inputs]
        out = module[0](*arguments, shapes, starts, mask)
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
        named = [*module.named_parameters(), *zip(("query", "reference_points", "input_flatten"), arguments)]
        return out, dict(zip([name for name, _ in named], torch.autograd.grad(loss, [t for _, t in named])))

    plain, plain_grads = run(model)
    actual, actual_grads = run(fused)
    if kernel_launches is not None:
        assert kernel_launches == [1]
    assert _relative(actual, plain) < FORWARD_TOLERANCE
    _assert_gradients_match(actual_grads, plain_grads)


def test_official_lookalikes_are_left_alone(caplog):
    class OtherForward(MSDeformAttn):   # the attributes, another forward (mmcv's, say)
        def forward(self, query, key=None, value=None, identity=None):
            return query

    class ExtraChild(MSDeformAttn):     # the forward, one more submodule its forward might use
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.value_norm = nn.LayerNorm(self.d_model)

    model = nn.Sequential(OtherForward(64, 2, 4, 2), ExtraChild(64, 2, 4, 2))
    with caplog.at_level(logging.INFO, logger="fastdetr.optimize"):
        fastdetr.optimize(model)
    assert [type(module) for module in model] == [OtherForward, ExtraChild]
    assert caplog.text.count("has sampling_offsets but not the structure") == 2


def test_fastdetr_modules_are_left_as_they_are():
    module = fnn.MultiScaleDeformableAttention(64, 2, 4, 2)
    assert fastdetr.optimize(module) is module and type(module) is fnn.MultiScaleDeformableAttention


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers
# ---------------------------------------------------------------------------------------------

def _transformers():
    return pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[dev]')")


def _backbone_config(transformers):
    """A ResNet of one basic block per stage, 8 to 64 channels: strides 8, 16, 32 at stages 2 to 4."""
    return transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                                     layer_type="basic", out_features=["stage2", "stage3", "stage4"])


def _hf_compare(model: nn.Module, kernel_launches, size: int, pixel_mask: torch.Tensor | None = None,
                expected_kinds: tuple[type, ...] = (FusedSamplingCore,)) -> nn.Module:
    """Convert a copy of `model`; both run forward and backward on the same two size x size images; compare.
    Returns the copy."""
    _perturb(model, seed=3)
    fused = copy.deepcopy(model)
    _assert_converted_in_place(fused, fastdetr.optimize)
    originals = dict(model.named_modules())
    converted = {name: module for name, module in fused.named_modules()
                 if isinstance(module, (FusedSamplingCore, FusedRTDetrV2Attention))}
    assert converted, "nothing converted"
    for name, module in converted.items():
        assert isinstance(module, expected_kinds) and isinstance(module, type(originals[name])), name
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(4))

    def run(network):
        extra = {} if pixel_mask is None else {"pixel_mask": pixel_mask}
        outputs = network(pixel_values=pixels, **extra)
        generator = torch.Generator().manual_seed(5)
        loss = sum((outputs[key] * torch.randn(outputs[key].shape, generator=generator)).sum()
                   for key in ("logits", "pred_boxes"))
        tensors = {key: value.detach() for key, value in outputs.items() if isinstance(value, torch.Tensor)}
        return tensors, _gradients(network, loss)

    plain, plain_grads = run(model)
    before = 0 if kernel_launches is None else len(kernel_launches)
    actual, actual_grads = run(fused)
    if kernel_launches is not None:
        assert len(kernel_launches) - before == len(converted)
    assert actual.keys() == plain.keys() and {"logits", "pred_boxes"} <= plain.keys()
    for key, value in plain.items():
        finite = value.isfinite()  # two-stage proposals outside the image are +inf on both sides
        assert torch.equal(actual[key].isfinite(), finite), key
        assert _relative(actual[key][finite], value[finite], floor=1e-6) < FORWARD_TOLERANCE, key
    _assert_gradients_match(actual_grads, plain_grads)
    return fused


def test_hf_deformable_detr_two_stage_with_padding(kernel_launches):
    """The sampling cores (`.attn`) of the encoder (2-d reference points, a padded image) and the decoder
    (two-stage: 4-d reference boxes) convert; the modules around them are untouched."""
    transformers = _transformers()
    torch.manual_seed(0)
    config = transformers.DeformableDetrConfig(
        backbone_config=_backbone_config(transformers), num_feature_levels=4, d_model=64, encoder_layers=1,
        decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_n_points=2, decoder_n_points=2, num_queries=8, two_stage=True,
        with_box_refine=True, two_stage_num_proposals=8, dropout=0.0)
    model = transformers.DeformableDetrForObjectDetection(config)
    pixel_mask = torch.ones(2, 32, 32, dtype=torch.long)
    pixel_mask[1, :, 20:] = 0     # transformers' pixel mask: 1 on valid pixels
    fused = _hf_compare(model, kernel_launches, 32, pixel_mask)
    attention = fused.model.encoder.layers[0].self_attn
    assert type(attention) is type(model.model.encoder.layers[0].self_attn)
    assert type(attention.attn).__name__ == "FusedMultiScaleDeformableAttention"


def _rt_detr_config(config_class, transformers, **kwargs):
    return config_class(
        backbone_config=_backbone_config(transformers), encoder_in_channels=[16, 32, 64], encoder_hidden_dim=32,
        decoder_in_channels=[32, 32, 32], d_model=64, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64,
        decoder_ffn_dim=64, encoder_attention_heads=4, decoder_attention_heads=4, decoder_n_points=2,
        num_queries=8, num_denoising=0, **kwargs)


def test_hf_rt_detr(kernel_launches):
    transformers = _transformers()
    torch.manual_seed(0)
    model = transformers.RTDetrForObjectDetection(_rt_detr_config(transformers.RTDetrConfig, transformers))
    fused = _hf_compare(model, kernel_launches, 64)
    assert all(isinstance(layer.encoder_attn.attn, FusedSamplingCore) for layer in fused.model.decoder.layers)


def test_hf_rt_detr_v2_with_per_level_point_counts(kernel_launches):
    """The first decoder layer samples 2 points on every level (a view into the op's layout), the second 1, 2
    and 3 on its three levels (padded to 3 with weight-0 points); offset_scale other than its default."""
    transformers = _transformers()
    if not hasattr(transformers, "RTDetrV2ForObjectDetection"):
        pytest.skip(f"transformers {transformers.__version__} has no RT-DETRv2")
    torch.manual_seed(0)
    config = _rt_detr_config(transformers.RTDetrV2Config, transformers, decoder_offset_scale=0.7)
    model = transformers.RTDetrV2ForObjectDetection(config)
    uneven = model.model.decoder.layers[1].encoder_attn
    assert uneven.n_points_list == [2, 2, 2]
    uneven.n_points_list = [1, 2, 3]   # the same 6 points per head, split unevenly among the levels
    uneven.n_points_scale.copy_(torch.tensor([1 / count for count in uneven.n_points_list for _ in range(count)]))
    fused = _hf_compare(model, kernel_launches, 64, expected_kinds=(FusedRTDetrV2Attention,))
    assert [type(layer.encoder_attn).__name__ for layer in fused.model.decoder.layers] == [
        "FusedRTDetrV2MultiscaleDeformableAttention"] * 2


def test_hf_rt_detr_v2_module_with_a_value_mask(kernel_launches):
    """One RT-DETRv2 attention called directly, with what its model never passes: a value mask (transformers'
    polarity, True on valid tokens); per-level counts 3, 1, 2."""
    transformers = _transformers()
    if not hasattr(transformers, "RTDetrV2ForObjectDetection"):
        pytest.skip(f"transformers {transformers.__version__} has no RT-DETRv2")
    torch.manual_seed(0)
    config = _rt_detr_config(transformers.RTDetrV2Config, transformers)
    module = transformers.RTDetrV2ForObjectDetection(config).model.decoder.layers[0].encoder_attn
    module.n_points_list = [3, 1, 2]
    module.n_points_scale.copy_(torch.tensor([1 / count for count in module.n_points_list for _ in range(count)]))
    _perturb(module, seed=6, scale=0.2)
    fused = copy.deepcopy(module)
    _assert_converted_in_place(fused, fastdetr.optimize)
    assert isinstance(fused, FusedRTDetrV2Attention) and isinstance(fused, type(module))

    generator = torch.Generator().manual_seed(7)
    shapes_list = [(4, 4), (2, 2), (1, 1)]
    shapes = torch.tensor(shapes_list)
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    hidden, memory = torch.randn(2, 5, 64, generator=generator), torch.randn(2, 21, 64, generator=generator)
    boxes = torch.cat([torch.rand(2, 5, 1, 2, generator=generator),
                       torch.rand(2, 5, 1, 2, generator=generator) * 0.5 + 0.1], -1)
    valid = torch.ones(2, 21, dtype=torch.bool)
    valid[1, 10:16] = False

    def run(attention):
        inputs = [tensor.clone().requires_grad_() for tensor in (hidden, memory, boxes)]
        out, weights = attention(inputs[0], attention_mask=valid, encoder_hidden_states=inputs[1],
                                 reference_points=inputs[2], spatial_shapes=shapes, spatial_shapes_list=shapes_list,
                                 level_start_index=starts)
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
        named = [*attention.named_parameters(), *zip(("hidden", "memory", "boxes"), inputs)]
        return out, weights, dict(zip([name for name, _ in named], torch.autograd.grad(loss, [t for _, t in named])))

    plain, plain_weights, plain_grads = run(module)
    actual, actual_weights, actual_grads = run(fused)
    if kernel_launches is not None:
        assert kernel_launches == [1]
    assert torch.equal(actual_weights, plain_weights)
    assert _relative(actual, plain) < FORWARD_TOLERANCE
    _assert_gradients_match(actual_grads, plain_grads)
    assert not actual_grads["memory"][1, 10:16].any()   # masked tokens reach no output


def test_hf_rt_detr_v2_discrete_sampling_runs_its_own_forward(kernel_launches):
    transformers = _transformers()
    if not hasattr(transformers, "RTDetrV2ForObjectDetection"):
        pytest.skip(f"transformers {transformers.__version__} has no RT-DETRv2")
    torch.manual_seed(0)
    config = _rt_detr_config(transformers.RTDetrV2Config, transformers, decoder_method="discrete")
    model = transformers.RTDetrV2ForObjectDetection(config).eval()
    _perturb(model, seed=3)
    fused = fastdetr.optimize(copy.deepcopy(model))
    assert all(isinstance(layer.encoder_attn, FusedRTDetrV2Attention) for layer in fused.model.decoder.layers)
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain, actual = model(pixel_values=pixels), fused(pixel_values=pixels)
    assert torch.equal(actual.logits, plain.logits) and torch.equal(actual.pred_boxes, plain.pred_boxes)
    assert not kernel_launches


@pytest.mark.parametrize("version", ["RTDetr", "RTDetrV2"])
def test_hf_converted_models_pickle_and_convert_once(version):
    """A fused class pickles by reference (fastdetr.nn.hf rebuilds it); a second optimize changes nothing; the
    classes subclass transformers' own, so its isinstance-based weight initialisation still reaches them."""
    transformers = _transformers()
    if not hasattr(transformers, f"{version}ForObjectDetection"):
        pytest.skip(f"transformers {transformers.__version__} has no {version}ForObjectDetection")
    torch.manual_seed(0)
    config = _rt_detr_config(getattr(transformers, f"{version}Config"), transformers)
    model = getattr(transformers, f"{version}ForObjectDetection")(config)
    fastdetr.optimize(model)
    classes = [type(module) for module in model.modules()]
    fastdetr.optimize(model)
    assert [type(module) for module in model.modules()] == classes
    restored = pickle.loads(pickle.dumps(model))
    assert [type(module) for module in restored.modules()] == classes
    state = model.state_dict()
    assert all(torch.equal(value, state[key]) for key, value in restored.state_dict().items())
    attention = restored.model.decoder.layers[0].encoder_attn
    assert isinstance(attention, FusedRTDetrV2Attention) or isinstance(attention.attn, FusedSamplingCore)
    attention.sampling_offsets.weight.data.fill_(1.0)
    restored._init_weights(attention)
    assert not attention.sampling_offsets.weight.any()


def test_importing_and_optimizing_fastdetr_does_not_import_transformers():
    code = ("import sys, fastdetr, fastdetr.nn.hf\n"
            "from fastdetr.reference.transformer import TransformerEncoderLayer\n"
            "fastdetr.optimize(TransformerEncoderLayer(64, 2, 96))\n"
            "assert 'transformers' not in sys.modules, 'transformers imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
