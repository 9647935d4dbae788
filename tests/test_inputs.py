"""Bad inputs to the model and config get clear errors that name the problem."""
from __future__ import annotations

import pytest
import torch

import fastdetr


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return fastdetr.detr_small(num_classes=3).eval()


@pytest.mark.parametrize("samples,error,message", [
    ([], ValueError, "empty image list"),
    ([torch.randn(1, 32, 32)], ValueError, "3 channels"),
    ([torch.randn(3, 32, 32), torch.randn(4, 32, 32)], ValueError, "image 1: expected 3 channels"),
    ([torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8)], ValueError, "floating point"),
    ([torch.randn(3, 32, 32), torch.randn(3, 32, 32, dtype=torch.float64)], ValueError, "image 1: dtype"),
    ([torch.randn(32, 32)], ValueError, r"\(3, H, W\)"),
    ([torch.randn(3, 0, 32)], ValueError, "empty image"),
    (torch.randn(2, 1, 32, 32), ValueError, "3 channels"),
    (torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), ValueError, "floating point"),
    (torch.randn(3, 32, 32), ValueError, "single"),
    (torch.randn(0, 3, 32, 32), ValueError, "empty batch"),
    ((torch.randn(2, 3, 32, 32), torch.zeros(2, 32, 31, dtype=torch.bool)), ValueError, "mask: expected shape"),
    ((torch.randn(2, 3, 32, 32), torch.zeros(1, 32, 32, dtype=torch.bool)), ValueError, "mask: expected shape"),
    ((torch.randn(2, 3, 32, 32), torch.zeros(2, 32, 32)), ValueError, "bool"),
    ("image.jpg", TypeError, "samples must be"),
    ([torch.randn(3, 32, 32), "x"], TypeError, "image 1: expected a torch.Tensor"),
])
def test_bad_inputs_raise_clear_errors(model, samples, error, message):
    with pytest.raises(error, match=message):
        model(samples)


def test_config_errors_name_the_field():
    with pytest.raises(TypeError, match="num_clases"):
        fastdetr.detr_resnet50(num_clases=3)
    with pytest.raises(ValueError, match="divisible by nheads"):
        fastdetr.DETRConfig(hidden_dim=250, nheads=8)
    with pytest.raises(ValueError, match="backbone"):
        fastdetr.DETRConfig(backbone="resnet152")
    with pytest.raises(ValueError, match="dropout"):
        fastdetr.DETRConfig(dropout=1.0)
    with pytest.raises(ValueError, match="num_queries"):
        fastdetr.DETRConfig(num_queries=0)
    with pytest.raises(ValueError, match="unknown preset"):
        fastdetr.build_model("detr_resnet152")


def test_presets():
    assert set(fastdetr.PRESETS) == {"detr_resnet50", "detr_resnet101", "detr_resnet50_dc5",
                                     "detr_resnet101_dc5", "detr_small"}
    assert fastdetr.PRESETS["detr_resnet101"].backbone == "resnet101"
    assert fastdetr.PRESETS["detr_resnet101_dc5"].dilation
    small = fastdetr.detr_small(num_classes=5)
    assert isinstance(small, fastdetr.DETR)
    params = sum(p.numel() for p in small.parameters())
    assert 3.5e6 < params < 4.5e6  # the 4.1 M-parameter model of shared/DESIGN.md
    assert all(p.requires_grad for p in small.parameters())
    assert fastdetr.DETRConfig.from_dict(small.config.to_dict()) == small.config


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_images_in_another_dtype_than_the_weights_name_both(model, dtype):
    images = torch.randn(2, 3, 32, 32).to(dtype)
    for samples in (images, list(images), (images, torch.zeros(2, 32, 32, dtype=torch.bool))):
        with pytest.raises(TypeError, match=rf"images are {dtype} but the model's weights are torch.float32: "
                                            rf"convert the images \(images.to\(torch.float32\)\)"):
            model(samples)


def test_mixed_dtypes_are_fine_under_autocast_and_add_no_host_sync(model):
    from fastdetr.measure.counters import OpCounter

    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        from_float = model(images)
        from_bfloat = model(images.bfloat16())
    assert from_float["pred_logits"].dtype == torch.bfloat16
    torch.testing.assert_close(from_bfloat["pred_boxes"].float(), from_float["pred_boxes"].float(),
                               rtol=2e-2, atol=2e-2)
    # a model converted to the images' dtype takes them
    double = fastdetr.detr_small(num_classes=3).eval().to(torch.float64)
    with torch.no_grad(), OpCounter() as counter:
        assert double(images.double())["pred_logits"].dtype == torch.float64
    assert counter.sync_ops == []
