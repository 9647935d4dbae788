"""ONNX export of a whole Deformable DETR (`fastdetr.export_onnx`), run at sizes it was not traced at.

deformable_detr_small (plain, and two-stage with box refinement) is traced once at
EXPORT_BATCH x EXPORT_SIZE and run in onnxruntime at other batches and image sizes, with a
padding mask and the post-processing (top-100 of queries x classes), against the eager model and
`fastdetr.DeformablePostProcess` on the same tensors: relative error <= 1e-4 in float32, as
tests/test_export.py (measured: ~1e-7 on the raw outputs, ~1e-6 on the scores).
"""
from __future__ import annotations

import pytest
import torch

import fastdetr
from fastdetr.export import compare_onnx, export_onnx, run_onnx

onnx = pytest.importorskip("onnx", reason="ONNX export tests need the onnx package")
onnxruntime = pytest.importorskip("onnxruntime", reason="ONNX export tests need onnxruntime")

RTOL = 1e-4  # float32, onnxruntime vs PyTorch (relative error ||a - b|| / ||b||)
EXPORT_BATCH, EXPORT_SIZE = 2, (160, 224)
# (batch, height, width) the graph was not traced at; odd sizes give levels of ceil(H / stride) rows
RUN_SIZES = [(3, 193, 131), (1, 96, 288)]
NUM_CLASSES = 7
VARIANTS = {"plain": {}, "two_stage": {"with_box_refine": True, "two_stage": True}}


def _model(variant: str) -> fastdetr.DeformableDETR:
    torch.manual_seed(0)
    return fastdetr.deformable_detr_small(num_classes=NUM_CLASSES, **VARIANTS[variant]).eval()


def _mask(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A padding mask of a batch of differently sized images: image i valid on its top-left part."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, height, width, dtype=torch.bool)
    for image in range(batch):
        h = int(torch.randint(height // 2, height + 1, (1,), generator=generator))
        w = int(torch.randint(width // 2, width + 1, (1,), generator=generator))
        mask[image, :h, :w] = False
    return mask


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_deformable_detr_exports_with_dynamic_batch_and_size(tmp_path, variant):
    model = _model(variant)
    path = export_onnx(model, tmp_path / "deformable.onnx", with_mask=True, with_postprocess=True,
                       image_size=EXPORT_SIZE, batch_size=EXPORT_BATCH)
    graph = onnx.load(str(path)).graph
    assert "GridSample" in {node.op_type for node in graph.node}
    assert [value.name for value in graph.input] == ["images", "mask", "orig_sizes"]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for seed, (batch, height, width) in enumerate(RUN_SIZES):
        images = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))
        orig_sizes = torch.tensor([[height - 3 * image, width - 5 * image] for image in range(batch)])
        errors = compare_onnx(model, session, images, _mask(batch, height, width, seed), orig_sizes)
        assert set(errors) == {"pred_logits", "pred_boxes", "scores", "labels", "boxes"}
        assert errors.pop("labels") == 0.0, (batch, height, width)
        assert max(errors.values()) <= RTOL, (batch, height, width, errors)


def test_deformable_detr_exports_without_mask(tmp_path):
    """Images alone: every pixel valid; outputs (B, Q, C) sigmoid logits and (B, Q, 4), Q written into the graph."""
    model = _model("plain")
    path = export_onnx(model, tmp_path / "deformable.onnx", image_size=EXPORT_SIZE, batch_size=EXPORT_BATCH)
    outputs = {value.name: value for value in onnx.load(str(path)).graph.output}
    assert list(outputs) == ["pred_logits", "pred_boxes"]
    assert outputs["pred_logits"].type.tensor_type.shape.dim[1].dim_value == model.num_queries
    batch, height, width = 3, 129, 257
    images = torch.randn(batch, 3, height, width)
    got = run_onnx(path, images)
    assert got["pred_logits"].shape == (batch, model.num_queries, NUM_CLASSES)
    assert max(compare_onnx(model, path, images).values()) <= RTOL


def test_deformable_detr_needs_opset_16(tmp_path):
    with pytest.raises(ValueError, match="GridSample"):
        export_onnx(_model("plain"), tmp_path / "deformable.onnx", opset=15)


def test_a_fused_deformable_detr_exports_its_reference_math(tmp_path):
    """`fastdetr.optimize`'d layers (whose kernels a trace cannot record) export as their reference classes and
    are fused again afterwards; the graph equals the unconverted model's in onnxruntime."""
    import copy

    model = _model("plain")
    fused = fastdetr.optimize(copy.deepcopy(model))
    path = export_onnx(fused, tmp_path / "fused.onnx", with_mask=True, image_size=EXPORT_SIZE,
                       batch_size=EXPORT_BATCH)
    assert type(fused.transformer.encoder.layers[0]) is fastdetr.nn.DeformableTransformerEncoderLayer
    assert type(fused.transformer.decoder.layers[0]) is fastdetr.nn.DeformableTransformerDecoderLayer
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch, height, width = RUN_SIZES[0]
    images = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(5))
    errors = compare_onnx(model, session, images, _mask(batch, height, width, 5))
    assert max(errors.values()) <= RTOL, errors
