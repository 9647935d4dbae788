"""ONNX export of a model with `fastdetr.nn.MultiScaleDeformableAttention`, at sizes it was not traced at.

A tiny detector head (`TinyDeformable`): three conv levels (strides 2, 4, 8)
flattened into the value tokens, spatial_shapes from the feature maps' Shape
ops and level_start_index from their cumulative sum, all inside the graph, and
one MSDA over learned queries and reference points. It is traced once at
EXPORT_BATCH x EXPORT_SIZE with torch's TorchScript-based exporter and run in
onnxruntime at other batches and image sizes, with and without a padding mask
input, against the eager PyTorch module on the same tensors (float32, 1e-4
relative). The export runs under TRITON_INTERPRET=1 (conftest), where the
eager module runs the Triton kernel: the graph must still hold the reference
math (GridSample), never the kernel.
"""
from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from torch import Tensor, nn

from fastdetr.nn import MultiScaleDeformableAttention

onnx = pytest.importorskip("onnx", reason="ONNX export tests need the onnx package")
onnxruntime = pytest.importorskip("onnxruntime", reason="ONNX export tests need onnxruntime")

RTOL = 1e-4  # float32, onnxruntime vs PyTorch (relative error ||a - b|| / ||b||)
EXPORT_BATCH = 2
EXPORT_SIZE = (64, 96)
# (batch, height, width) the graph was not traced at: odd sizes give levels of ceil(H / stride) rows
RUN_SIZES = [(3, 80, 48), (1, 64, 96), (2, 37, 53), (1, 128, 40)]
D_MODEL, HEADS, LEVELS, POINTS, QUERIES = 32, 4, 3, 2, 7


class TinyDeformable(nn.Module):
    """images (B, 3, H, W) [, mask (B, H, W) bool, True on padding] -> (B, QUERIES, D_MODEL)."""

    def __init__(self, box_references: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(3, D_MODEL, 3, stride=2, padding=1)
        self.downs = nn.ModuleList(nn.Conv2d(D_MODEL, D_MODEL, 3, stride=2, padding=1) for _ in range(LEVELS - 1))
        self.level_embed = nn.Parameter(torch.randn(LEVELS, D_MODEL))
        self.query_embed = nn.Embedding(QUERIES, D_MODEL)
        # logits of (x, y[, w, h]) in [0, 1]; wide spread so that some points fall outside the maps
        self.reference_logits = nn.Parameter(torch.randn(QUERIES, 4 if box_references else 2) * 2.0)
        self.attention = MultiScaleDeformableAttention(D_MODEL, LEVELS, HEADS, POINTS)
        with torch.no_grad():
            # the official init starts every query on one pattern with equal weights: move off it
            for linear in (self.attention.sampling_offsets, self.attention.attention_weights):
                linear.weight.normal_(0.0, 0.3)

    def forward(self, images: Tensor, mask: Tensor | None = None) -> Tensor:
        features = [self.stem(images)]
        for down in self.downs:
            features.append(down(features[-1].relu()))
        # (L, 2) as (H_l, W_l), from the Shape ops of the feature maps: dynamic in the graph
        spatial_shapes = torch.stack([torch._shape_as_tensor(feature)[-2:] for feature in features])
        sizes = spatial_shapes.prod(1)
        level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
        input_flatten = torch.cat([feature.flatten(2).transpose(1, 2) + embed
                                   for feature, embed in zip(features, self.level_embed.unbind(0))], 1)
        padding_mask = None
        if mask is not None:
            # a 3x3 stride-2 conv with padding 1 keeps ceil(H / 2) rows: the rows ::2 picks
            levels, level_mask = [], mask
            for _ in features:
                level_mask = level_mask[:, ::2, ::2]
                levels.append(level_mask.flatten(1))
            padding_mask = torch.cat(levels, 1)
        batch = images.shape[0]
        query = self.query_embed.weight[None].expand(batch, -1, -1)
        reference_points = self.reference_logits.sigmoid()[None, :, None].expand(batch, -1, LEVELS, -1)
        return self.attention(query, reference_points, input_flatten, spatial_shapes, level_start_index,
                              padding_mask)


def _model(seed: int = 0, box_references: bool = False) -> TinyDeformable:
    torch.manual_seed(seed)
    return TinyDeformable(box_references).eval()


def _mask(batch: int, height: int, width: int, seed: int = 0) -> Tensor:
    """A padding mask of a batch of differently sized images: image i valid on its top-left part."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, height, width, dtype=torch.bool)
    for image in range(batch):
        h = int(torch.randint(height // 2, height + 1, (1,), generator=generator))
        w = int(torch.randint(width // 2, width + 1, (1,), generator=generator))
        mask[image, :h, :w] = False
    return mask


def _export(model: nn.Module, path, opset: int, with_mask: bool) -> list[warnings.WarningMessage]:
    """Trace at EXPORT_BATCH x EXPORT_SIZE with dynamic batch and size; returns the warnings fastdetr raised."""
    images = torch.randn(EXPORT_BATCH, 3, *EXPORT_SIZE)
    inputs, names = (images,), ["images"]
    dynamic_axes = {"images": {0: "batch", 2: "height", 3: "width"}, "output": {0: "batch"}}
    if with_mask:
        inputs, names = (images, _mask(EXPORT_BATCH, *EXPORT_SIZE)), ["images", "mask"]
        dynamic_axes["mask"] = {0: "batch", 1: "height", 2: "width"}
    options = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(model, inputs, str(path), input_names=names, output_names=["output"],
                          opset_version=opset, dynamic_axes=dynamic_axes, do_constant_folding=True, **options)
    onnx.checker.check_model(str(path), full_check=True)
    return [w for w in caught if "fastdetr" in w.filename]


def _relative_error(got: Tensor, expected: Tensor) -> float:
    return ((got.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("opset", [16, 17])
@pytest.mark.parametrize("with_mask", [False, True], ids=["no_mask", "mask"])
def test_msda_exports_with_dynamic_batch_and_size(tmp_path, opset, with_mask):
    model = _model()
    path = tmp_path / "msda.onnx"
    caught = _export(model, path, opset, with_mask)
    # a TracerWarning from fastdetr would mean a size was read on the host and fixed in the graph
    assert not caught, [f"{w.filename}:{w.lineno}: {w.message}" for w in caught]

    graph = onnx.load(str(path)).graph
    ops = {node.op_type for node in graph.node}
    assert "GridSample" in ops, sorted(ops)
    assert all(node.domain in ("", "ai.onnx") for node in graph.node), {n.op_type: n.domain for n in graph.node}
    assert "PythonOp" not in ops and not any("triton" in op.lower() for op in ops), sorted(ops)

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for seed, (batch, height, width) in enumerate(RUN_SIZES):
        images = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))
        mask = _mask(batch, height, width, seed) if with_mask else None
        feeds = {"images": images.numpy()}
        if with_mask:
            feeds["mask"] = mask.numpy()
        (got,) = session.run(["output"], feeds)
        with torch.no_grad():
            expected = model(images, mask)
        got = torch.from_numpy(got)
        assert got.shape == expected.shape == (batch, QUERIES, D_MODEL)
        assert _relative_error(got, expected) <= RTOL, (batch, height, width)


def test_msda_exports_with_box_references(tmp_path):
    """4-d reference points (x, y, w, h): the offsets scale with the boxes, not with the levels' sizes."""
    model = _model(seed=1, box_references=True)
    path = tmp_path / "msda_boxes.onnx"
    assert not _export(model, path, 17, with_mask=True)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch, height, width = 3, 80, 48
    images, mask = torch.randn(batch, 3, height, width), _mask(batch, height, width)
    (got,) = session.run(["output"], {"images": images.numpy(), "mask": mask.numpy()})
    with torch.no_grad():
        expected = model(images, mask)
    assert _relative_error(torch.from_numpy(got), expected) <= RTOL


def test_trace_records_the_reference_with_traced_level_sizes():
    """torch.jit.trace (what the exporter runs) at one size, replayed at another: the level sizes are not constants."""
    model = _model()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # torch.jit.trace's own deprecation notice
        traced = torch.jit.trace(model, (torch.randn(EXPORT_BATCH, 3, *EXPORT_SIZE),), check_trace=False)
    assert "grid_sampler" in str(traced.inlined_graph)
    images = torch.randn(3, 3, 80, 48)
    with torch.no_grad():
        assert _relative_error(traced(images), model(images)) <= RTOL
