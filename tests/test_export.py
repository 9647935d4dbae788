"""ONNX export: onnxruntime against PyTorch at batches and image sizes the graph was not traced at.

Every graph here is traced at one batch and size (EXPORT_BATCH, EXPORT_SIZE)
and run at others, unpadded and as padded batches of differently sized images
with their mask, and must match the PyTorch model on the same tensors to 1e-4
relative (float32). Also: post-processing, a fused model, DETR-R50, the
errors for what cannot export, and `fastdetr export`.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fastdetr
from fastdetr.cli import main
from fastdetr.export import (
    MIN_OPSET,
    InferenceGraph,
    compare_onnx,
    downsample_mask,
    export_onnx,
    max_opset,
    reference_layers,
    run_onnx,
)
from fastdetr.nested import batch_images
from fastdetr.nn import MultiheadAttention as FusedMultiheadAttention
from fastdetr.nn import TransformerDecoderLayer as FusedDecoderLayer
from fastdetr.nn import TransformerEncoderLayer as FusedEncoderLayer

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

RTOL = 1e-4  # float32, onnxruntime vs PyTorch (relative error ||a - b|| / ||b||)
EXPORT_SIZE = (96, 128)
EXPORT_BATCH = 2
# detr_small shrunk so that an export and a run take a fraction of a second; head dim 32 as the fused path needs.
TINY = dict(num_queries=6, enc_layers=1, dec_layers=2, hidden_dim=64, dim_feedforward=128, nheads=2)


def _tiny_model(seed: int = 0, **overrides) -> fastdetr.DETR:
    torch.manual_seed(seed)
    return fastdetr.detr_small(num_classes=5, **{**TINY, **overrides}).eval()


def _padded(sizes: list[tuple[int, int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A padded batch of random images of these (H, W): (images, mask, orig_sizes)."""
    generator = torch.Generator().manual_seed(seed)
    images, mask = batch_images([torch.randn(3, h, w, generator=generator) for h, w in sizes])
    return images, mask, torch.tensor(sizes, dtype=torch.int64)


def _assert_close(errors: dict[str, float]) -> None:
    assert errors and all(error <= RTOL for error in errors.values()), errors


def _session(path):
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def tiny():
    return _tiny_model()


@pytest.fixture(scope="module")
def graphs(tiny, tmp_path_factory):
    """The tiny model exported without and with a mask input: {name: (path, session)}."""
    root = tmp_path_factory.mktemp("onnx")
    plain = export_onnx(tiny, root / "plain.onnx", image_size=EXPORT_SIZE, batch_size=EXPORT_BATCH)
    masked = export_onnx(tiny, root / "masked.onnx", with_mask=True, image_size=EXPORT_SIZE,
                         batch_size=EXPORT_BATCH)
    return {"plain": (plain, _session(plain)), "masked": (masked, _session(masked))}


@pytest.mark.parametrize("batch, size", [(1, (80, 112)), (3, (150, 97)), (EXPORT_BATCH, (257, 33))])
def test_unpadded_batches_at_other_sizes(tiny, graphs, batch, size):
    images = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(batch))
    _assert_close(compare_onnx(tiny, graphs["plain"][1], images))
    # The mask input given all False is the same computation.
    _assert_close(compare_onnx(tiny, graphs["masked"][1], images, torch.zeros(batch, *size, dtype=torch.bool)))


@pytest.mark.parametrize("sizes", [
    [(150, 97)],                              # batch 1, no padding, through the mask input
    [(150, 97), (120, 140), (33, 47)],        # batch 3, every image padded in some direction
    [(64, 200), (200, 64)],                   # the export batch, other sizes
])
def test_padded_batches_with_mask(tiny, graphs, sizes):
    images, mask, _ = _padded(sizes, seed=len(sizes))
    _assert_close(compare_onnx(tiny, graphs["masked"][1], images, mask))


def test_graph_is_valid_and_its_axes_are_symbolic(graphs):
    for path, session in graphs.values():
        onnx.checker.check_model(str(path), full_check=True)
        images = session.get_inputs()[0]
        assert images.name == "images" and images.type == "tensor(float)"
        assert images.shape == ["batch", 3, "height", "width"]
        assert [node.name for node in session.get_outputs()] == ["pred_logits", "pred_boxes"]
        logits, boxes = session.get_outputs()
        queries = TINY["num_queries"]
        assert logits.shape == ["batch", queries, 5 + 1] and boxes.shape == ["batch", queries, 4]
    mask = graphs["masked"][1].get_inputs()[1]
    assert (mask.name, mask.type, mask.shape) == ("mask", "tensor(bool)", ["batch", "height", "width"])


def test_mask_downsampling_is_pytorch_nearest():
    # F.interpolate(nearest) and ONNX Resize disagree by a row at e.g. 28 -> 2; the gather must not.
    generator = torch.Generator().manual_seed(0)
    for height in [1, 2, 7, 28, 49, 97, 100, 333, 800, 1333]:
        mask = torch.rand(2, height, 5, generator=generator) > 0.5
        for small in sorted({1, 2, 3, 4, 7, (height + 31) // 32, (height + 15) // 16, height} - {0}):
            if small > height:
                continue
            expected = F.interpolate(mask[None].float(), size=(small, 5)).to(torch.bool)[0]
            assert torch.equal(downsample_mask(mask, (small, 5)), expected), (height, small)


def test_traced_wrapper_equals_the_model_in_eager_mode(tiny):
    images, mask, _ = _padded([(97, 131), (64, 80)])
    with torch.no_grad():
        expected = tiny((images, mask))
        logits, boxes = InferenceGraph(tiny, with_mask=True, with_postprocess=False)(images, mask)
    torch.testing.assert_close(logits, expected["pred_logits"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(boxes, expected["pred_boxes"], rtol=1e-6, atol=1e-6)


def test_postprocess_outputs_match_postprocess(tiny, tmp_path):
    path = export_onnx(tiny, tmp_path / "post.onnx", with_postprocess=True, with_mask=True,
                       image_size=EXPORT_SIZE, batch_size=EXPORT_BATCH)
    session = _session(path)
    assert [node.name for node in session.get_inputs()] == ["images", "mask", "orig_sizes"]
    assert [node.name for node in session.get_outputs()] == ["pred_logits", "pred_boxes", "scores", "labels",
                                                             "boxes"]
    images, mask, orig_sizes = _padded([(111, 77), (90, 120), (40, 40)])
    orig_sizes = orig_sizes * 5  # the originals were larger than the network input
    errors = compare_onnx(tiny, session, images, mask, orig_sizes)
    assert set(errors) == {"pred_logits", "pred_boxes", "scores", "labels", "boxes"}
    assert errors.pop("labels") == 0.0
    _assert_close(errors)
    outputs = run_onnx(session, images, mask, orig_sizes)
    assert outputs["labels"].dtype == torch.int64 and outputs["boxes"].shape == (3, TINY["num_queries"], 4)


def test_fused_model_exports_its_reference_math_and_is_restored(tiny, tmp_path):
    fused = fastdetr.optimize(copy.deepcopy(tiny))
    attention = FusedMultiheadAttention.convert(fused.transformer.decoder.layers[0].multihead_attn)
    fused.train()
    fused.backbone.eval()  # a mixed state, which the export must give back as it was
    modes = [module.training for module in fused.modules()]
    path = export_onnx(fused, tmp_path / "fused.onnx", with_mask=True, image_size=EXPORT_SIZE,
                       batch_size=EXPORT_BATCH)
    assert type(fused.transformer.encoder.layers[0]) is FusedEncoderLayer
    assert all(type(layer) is FusedDecoderLayer for layer in fused.transformer.decoder.layers)
    assert type(attention) is FusedMultiheadAttention
    assert [module.training for module in fused.modules()] == modes
    # The fused model has the reference model's weights; compare with the reference (no interpreter run).
    images, mask, _ = _padded([(150, 97), (120, 140), (33, 47)])
    _assert_close(compare_onnx(tiny, path, images, mask))


def test_layers_and_modes_come_back_when_the_export_fails(tiny, tmp_path, monkeypatch):
    fused = fastdetr.optimize(copy.deepcopy(tiny)).train()

    def failing_export(*args, **kwargs):
        assert type(fused.transformer.encoder.layers[0]) is not FusedEncoderLayer  # swapped while tracing
        assert not fused.training
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(torch.onnx, "export", failing_export)
    with pytest.raises(RuntimeError, match="exporter failed"):
        export_onnx(fused, tmp_path / "never.onnx", image_size=EXPORT_SIZE)
    assert type(fused.transformer.encoder.layers[0]) is FusedEncoderLayer
    assert all(module.training for module in fused.modules())
    with pytest.raises(KeyError), reference_layers(fused):
        raise KeyError("inside the block")
    assert type(fused.transformer.decoder.layers[1]) is FusedDecoderLayer


def test_learned_position_embedding_and_pre_norm_export(tmp_path):
    model = _tiny_model(seed=1, position_embedding="learned", pre_norm=True, activation="gelu")
    path = export_onnx(model, tmp_path / "variant.onnx", with_mask=True, image_size=EXPORT_SIZE,
                       batch_size=EXPORT_BATCH)
    images, mask, _ = _padded([(200, 150), (90, 160), (100, 100)])
    _assert_close(compare_onnx(model, path, images, mask))


@pytest.mark.parametrize("opset", [MIN_OPSET, 13, max_opset()])
def test_opsets(tiny, tmp_path, opset):
    path = export_onnx(tiny, tmp_path / f"opset{opset}.onnx", opset=opset, with_mask=True,
                       image_size=EXPORT_SIZE, batch_size=EXPORT_BATCH)
    assert onnx.load(str(path)).opset_import[0].version == opset
    images, mask, _ = _padded([(70, 150), (150, 70), (33, 33)])
    _assert_close(compare_onnx(tiny, path, images, mask))


def test_static_export_has_fixed_shapes(tiny, tmp_path):
    path = export_onnx(tiny, tmp_path / "static.onnx", dynamic=False, image_size=(64, 96), batch_size=3)
    assert _session(path).get_inputs()[0].shape == [3, 3, 64, 96]
    _assert_close(compare_onnx(tiny, path, torch.randn(3, 3, 64, 96)))


@pytest.mark.slow  # a ResNet-50 traced and run at three sizes; the tiny model's tests cover the same sizes and masks
def test_detr_resnet50_runs_at_sizes_and_batches_it_was_not_exported_at(tmp_path):
    # Full DETR-R50 (41.5 M parameters, 6 + 6 layers, 100 queries), traced at a small size to keep this cheap.
    torch.manual_seed(0)
    model = fastdetr.detr_resnet50(num_classes=91).eval()
    path = export_onnx(model, tmp_path / "r50.onnx", with_mask=True, image_size=(64, 96), batch_size=2)
    session = _session(path)
    _assert_close(compare_onnx(model, session, torch.randn(1, 3, 160, 120), torch.zeros(1, 160, 120,
                                                                                        dtype=torch.bool)))
    images, mask, _ = _padded([(128, 160), (97, 131), (64, 64)])
    _assert_close(compare_onnx(model, session, images, mask))


def test_what_cannot_export_raises_clearly(tiny, tmp_path):
    path = tmp_path / "bad.onnx"
    for opset in (MIN_OPSET - 1, max_opset() + 1, "17"):
        with pytest.raises(ValueError, match=f"opset {opset!r} is not supported"):
            export_onnx(tiny, path, opset=opset)
    with pytest.raises(ValueError, match="float32.*model.float"):
        export_onnx(copy.deepcopy(tiny).half(), path)
    with pytest.raises(TypeError, match="expected a fastdetr.DETR"):
        export_onnx(torch.nn.Linear(3, 3), path)
    with pytest.raises(ValueError, match="image_size"):
        export_onnx(tiny, path, image_size=(0, 64))
    with pytest.raises(ValueError, match="batch_size"):
        export_onnx(tiny, path, batch_size=0)
    assert not path.exists()


def test_running_a_graph_with_the_wrong_inputs_says_which(tiny, graphs):
    images, mask, _ = _padded([(64, 64)])
    with pytest.raises(ValueError, match="mask was given"):
        run_onnx(graphs["plain"][1], images, mask)
    with pytest.raises(ValueError, match="mask was not given"):
        run_onnx(graphs["masked"][1], images)


def test_cli_export_end_to_end(tiny, tmp_path, capsys):
    checkpoint = fastdetr.save_checkpoint(tmp_path / "tiny.pth", tiny)
    out = tmp_path / "out" / "tiny.onnx"
    code = main(["export", "--checkpoint", str(checkpoint), "--onnx", str(out), "--mask", "--postprocess",
                 "--size", "96", "128", "--verify"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "batch, height and width dynamic" in printed and "orig_sizes" in printed
    assert "onnxruntime vs PyTorch, padded batch of 3" in printed
    onnx.checker.check_model(str(out), full_check=True)
    images, mask, orig_sizes = _padded([(140, 100), (77, 190)])
    errors = compare_onnx(fastdetr.load_checkpoint(checkpoint).eval(), out, images, mask, orig_sizes)
    assert errors.pop("labels") == 0.0
    _assert_close(errors)


def test_cli_export_errors(tiny, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tmp_path / "missing.pth"), "--onnx", str(tmp_path / "x.onnx")]) == 1
    assert "fastdetr export: FileNotFoundError" in capsys.readouterr().err
    checkpoint = fastdetr.save_checkpoint(tmp_path / "tiny.pth", tiny)
    assert main(["export", "--checkpoint", str(checkpoint), "--onnx", str(tmp_path / "x.onnx"), "--opset", "9"]) == 1
    assert "opset 9 is not supported" in capsys.readouterr().err
