"""fastdetr.DeformableDETR: the official Deformable DETR's state_dict, forward and backward, on the CPU.

The key fixtures tests/fixtures/deformable_detr_r50_keys_<variant>.txt were written by
tests/fixtures/deformable_detr_official.py from the official model classes (fundamentalvision/Deformable-DETR);
that script also compares outputs and gradients with the official code (run by hand: it needs a checkout).
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import fastdetr
from fastdetr.deformable_config import DeformableDETRConfig
from fastdetr.reference.deformable_detr import DeformableTransformer, MSDeformAttn
from fastdetr.reference.position_encoding import PositionEmbeddingSine

FIXTURES = Path(__file__).parent / "fixtures"
VARIANTS = {"plain": {}, "box_refine": {"with_box_refine": True},
            "two_stage": {"with_box_refine": True, "two_stage": True}}


def _keys(model: torch.nn.Module) -> list[str]:
    return [f"{name} {tuple(tensor.shape)}" for name, tensor in model.state_dict().items()]


def _fixture(name: str) -> list[str]:
    return [line for line in (FIXTURES / name).read_text().splitlines() if line and not line.startswith("#")]


def _images(generator: torch.Generator) -> list[torch.Tensor]:
    """Two images of different sizes: the second is padded in both directions."""
    return [torch.randn(3, 128, 128, generator=generator), torch.randn(3, 96, 112, generator=generator)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_keys_and_shapes_are_the_officials(variant):
    model = fastdetr.deformable_detr_resnet50(**VARIANTS[variant])
    expected = _fixture(f"deformable_detr_r50_keys_{variant}.txt")
    assert _keys(model) == expected
    # the backbone's keys against the DETR-R50 checkpoint's (read off another source: torchvision's ResNet)
    detr_backbone = [line for line in _fixture("detr_r50_state_dict.txt") if line.startswith("backbone.")]
    assert [line for line in expected if line.startswith("backbone.")] == detr_backbone
    # a state_dict with these keys loads strictly (shared heads repeat their keys, as in the checkpoints)
    model.load_state_dict(model.state_dict(), strict=True)


def test_resnet50_forward_has_the_officials_output_shapes():
    torch.manual_seed(0)
    model = fastdetr.deformable_detr_resnet50().eval()
    with torch.no_grad():
        out = model([torch.randn(3, 64, 64), torch.randn(3, 48, 56)])
    assert out["pred_logits"].shape == (2, 300, 91)    # focal loss: no "no object" class
    assert out["pred_boxes"].shape == (2, 300, 4)
    assert len(out["aux_outputs"]) == 5


def _tokens(height: int, width: int, levels: int = 4) -> int:
    """Value tokens of a padded batch: C3-C5 (strides 8, 16, 32, each a ceil of the last) then stride-2 convs."""
    total, size = 0, (height, width)
    size = tuple(math.ceil(s / 8) for s in size)
    for _ in range(levels):
        total += size[0] * size[1]
        size = tuple(math.ceil(s / 2) for s in size)
    return total


@pytest.mark.parametrize("variant", VARIANTS)
def test_small_forward_shapes_and_backward(variant):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    model = fastdetr.deformable_detr_small(num_classes=7, **VARIANTS[variant])
    config = model.config
    out = model(_images(generator))
    queries = config.num_queries
    assert out["pred_logits"].shape == (2, queries, 7)
    assert out["pred_boxes"].shape == (2, queries, 4)
    assert len(out["aux_outputs"]) == config.dec_layers - 1
    heads = [out, *out["aux_outputs"]]
    if config.two_stage:
        tokens = _tokens(128, 128)
        assert out["enc_outputs"]["pred_logits"].shape == (2, tokens, 7)
        assert out["enc_outputs"]["pred_boxes"].shape == (2, tokens, 4)
        heads.append(out["enc_outputs"])
    else:
        assert "enc_outputs" not in out
    for head in heads[:-1] if config.two_stage else heads:
        assert torch.isfinite(head["pred_logits"]).all()
        assert ((head["pred_boxes"] > 0) & (head["pred_boxes"] < 1)).all()

    weights = torch.Generator().manual_seed(2)
    loss = sum((head[key] * torch.randn(head[key].shape, generator=weights)).nan_to_num(posinf=0.0).sum()
               for head in heads for key in ("pred_logits", "pred_boxes"))
    loss.backward()
    trainable = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    assert trainable
    missing = [name for name, param in trainable if param.grad is None]
    assert not missing
    bad = [name for name, param in trainable if not torch.isfinite(param.grad).all()]
    assert not bad


def test_small_preset_is_small_and_trains_every_layer():
    model = fastdetr.deformable_detr_small()
    assert sum(param.numel() for param in model.parameters()) < 6e6
    assert all(param.requires_grad for param in model.parameters())
    assert not any(isinstance(module, fastdetr.reference.FrozenBatchNorm2d) for module in model.modules())


def test_resnet50_freezes_the_stem_as_the_official():
    model = fastdetr.deformable_detr_resnet50()
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    assert frozen and all(name.startswith(("backbone.0.body.conv1", "backbone.0.body.layer1")) for name in frozen)


@pytest.mark.parametrize("variant", VARIANTS)
def test_heads_start_as_the_officials(variant):
    model = fastdetr.deformable_detr_small(num_classes=5, **VARIANTS[variant])
    expected_logit = -math.log(0.99 / 0.01)
    for head in model.class_embed:
        torch.testing.assert_close(head.bias, torch.full((5,), expected_logit))
    size_bias = 0.0 if model.config.two_stage else -2.0
    first = model.bbox_embed[0].layers[-1]
    assert (first.weight == 0).all() and (first.bias[:2] == 0).all() and (first.bias[2:] == size_bias).all()
    shared = not model.config.with_box_refine
    assert (len({id(head) for head in model.bbox_embed}) == 1) == shared
    decoder = model.transformer.decoder
    assert (decoder.bbox_embed is model.bbox_embed) == model.config.with_box_refine
    assert (decoder.class_embed is model.class_embed) == model.config.two_stage
    assert len(model.class_embed) == model.config.dec_layers + model.config.two_stage


def test_sine_embedding_is_normalised_over_pixel_centres():
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    mask[:, :, 3:] = True   # 3 valid columns
    pos = PositionEmbeddingSine(8, normalize=True, offset=-0.5)(torch.zeros(1, 1, 3, 4), mask)
    # feature 8 + 0 is sin(x) (x first frequency 1): x = (column + 0.5) / 3 * 2 pi
    expected = torch.sin(torch.tensor([0.5, 1.5, 2.5]) / (3 + 1e-6) * 2 * math.pi)
    torch.testing.assert_close(pos[0, 8, 0, :3], expected)
    detr = PositionEmbeddingSine(8, normalize=True)(torch.zeros(1, 1, 3, 4), mask)
    torch.testing.assert_close(detr[0, 8, 0, :3], torch.sin(torch.tensor([1.0, 2.0, 3.0]) / (3 + 1e-6) * 2 * math.pi))


@pytest.mark.parametrize("two_stage", [False, True])
def test_transformer_ignores_what_lies_under_the_padding(two_stage):
    """The values are zeroed on padding and the proposals there are never valid: changing the padded tokens'
    features and positions leaves every output unchanged."""
    torch.manual_seed(0)
    d_model, levels, queries = 64, 3, 20
    transformer = DeformableTransformer(d_model=d_model, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
                                        dim_feedforward=96, dropout=0.0, num_feature_levels=levels,
                                        two_stage=two_stage, two_stage_num_proposals=queries).eval()
    if two_stage:
        heads = torch.nn.ModuleList(torch.nn.Linear(d_model, 3) for _ in range(3))
        boxes = torch.nn.ModuleList(fastdetr.MLP(d_model, d_model, 4, 3) for _ in range(3))
        transformer.decoder.class_embed, transformer.decoder.bbox_embed = heads, boxes
    generator = torch.Generator().manual_seed(3)
    sizes, valid = [(12, 10), (6, 5), (3, 3)], [(9, 7), (5, 4), (3, 2)]
    srcs, masks, pos = [], [], []
    for (height, width), (valid_h, valid_w) in zip(sizes, valid):
        srcs.append(torch.randn(2, d_model, height, width, generator=generator))
        pos.append(torch.randn(2, d_model, height, width, generator=generator))
        mask = torch.zeros(2, height, width, dtype=torch.bool)
        mask[1, valid_h:, :] = True
        mask[1, :, valid_w:] = True
        masks.append(mask)
    query_embed = None if two_stage else torch.randn(queries, 2 * d_model, generator=generator)
    changed_srcs = [src.masked_fill(mask[:, None], 0.0) + 5 * mask[:, None] for src, mask in zip(srcs, masks)]
    changed_pos = [p.masked_fill(mask[:, None], -3.0) for p, mask in zip(pos, masks)]
    with torch.no_grad():
        first = transformer(srcs, masks, pos, query_embed)
        second = transformer(changed_srcs, masks, changed_pos, query_embed)
    for a, b in zip(first[:3], second[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if two_stage:   # the encoder's own scores, on valid tokens
        keep = ~torch.cat([mask.flatten(1) for mask in masks], 1)
        torch.testing.assert_close(first[3][keep], second[3][keep], rtol=1e-5, atol=1e-5)


def test_optimize_turns_every_msda_into_the_fused_module(monkeypatch):
    """The conversion and the module's plain-PyTorch path; its kernels are tested in their own files (run here
    through the interpreter they would take minutes)."""
    from fastdetr.nn import MultiScaleDeformableAttention

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(0)
    model = fastdetr.deformable_detr_small(num_classes=3, enc_layers=1, dec_layers=2, num_queries=10).eval()
    images = [torch.randn(3, 64, 64), torch.randn(3, 48, 40)]
    keys = _keys(model)
    with torch.no_grad():
        expected = model(images)
    count = sum(isinstance(module, MSDeformAttn) for module in model.modules())
    fastdetr.optimize(model)
    assert sum(isinstance(module, MultiScaleDeformableAttention) for module in model.modules()) == count == 3
    assert _keys(model) == keys
    with torch.no_grad():
        got = model(images)
    torch.testing.assert_close(got["pred_logits"], expected["pred_logits"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["pred_boxes"], expected["pred_boxes"], rtol=1e-4, atol=1e-4)


def test_config_rejects_what_the_official_cannot_build():
    with pytest.raises(ValueError, match="two_stage needs with_box_refine"):
        DeformableDETRConfig(two_stage=True)
    with pytest.raises(ValueError, match="num_feature_levels"):
        DeformableDETRConfig(num_feature_levels=2)
    with pytest.raises(ValueError, match="GroupNorm"):
        DeformableDETRConfig(hidden_dim=48, nheads=8)
    with pytest.raises(TypeError, match="unknown DeformableDETRConfig field"):
        fastdetr.deformable_detr_small(hidden=3)


@pytest.mark.parametrize("levels", [1, 5])
def test_other_level_counts_build_and_run(levels):
    torch.manual_seed(0)
    model = fastdetr.deformable_detr_small(num_classes=2, num_feature_levels=levels, enc_layers=1, dec_layers=1,
                                           num_queries=8)
    assert len(model.input_proj) == levels and model.transformer.level_embed.shape == (levels, 128)
    out = model([torch.randn(3, 64, 96)])
    assert out["pred_boxes"].shape == (1, 8, 4)


def test_level_sizes_are_read_from_the_host_not_the_device():
    """The forward's level sizes come from the feature maps' shapes: the (L, 2) tensor is made once per sizes
    and device and carries them, so reading them never copies from the device (a meta tensor cannot be read:
    any read would fail here)."""
    from fastdetr.reference.deformable_detr import _level_sizes, _spatial_shapes

    maps = [torch.empty(2, 8, 5, 7, device="meta"), torch.empty(2, 8, 3, 4, device="meta")]
    shapes = _spatial_shapes(maps, torch.device("meta"))
    assert shapes.device.type == "meta" and shapes.shape == (2, 2) and shapes.dtype == torch.int64
    assert _level_sizes(shapes) == [(5, 7), (3, 4)]
    assert _spatial_shapes([torch.empty(1, 3, 5, 7), torch.empty(1, 3, 3, 4)], torch.device("meta")) is shapes
    plain = torch.tensor([[6, 2], [1, 1]])    # a tensor made elsewhere: read from its values
    assert _level_sizes(plain) == [(6, 2), (1, 1)]


def _architecture(config) -> dict:
    """A config's fields but the training-only ones a state_dict cannot tell (dropout, what is frozen)."""
    return {k: v for k, v in config.to_dict().items() if k not in ("dropout", "freeze_stem", "train_backbone")}


@pytest.mark.parametrize("variant", ["plain", "box_refine", "two_stage"])
def test_an_official_checkpoint_file_loads_without_a_model(variant, tmp_path):
    """The official training script's file ({"model", "optimizer", "lr_scheduler", "epoch", "args"}, args an
    argparse Namespace) read with weights_only: the model is built from its keys and shapes alone."""
    import argparse

    options = {"plain": {}, "box_refine": {"with_box_refine": True},
               "two_stage": {"with_box_refine": True, "two_stage": True}}[variant]
    torch.manual_seed(0)
    model = fastdetr.deformable_detr_small(num_classes=7, num_queries=12, dec_n_points=2, **options).eval()
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "optimizer": {"state": {}, "param_groups": []},
                "lr_scheduler": {"last_epoch": 49}, "epoch": 49,
                "args": argparse.Namespace(lr=2e-4, with_box_refine=bool(options), dataset_file="coco")}, path)
    loaded = fastdetr.load_checkpoint(path).eval()
    assert isinstance(loaded, fastdetr.DeformableDETR)
    assert _architecture(loaded.config) == _architecture(model.config.replace(
        num_queries=300 if variant == "two_stage" else model.config.num_queries))
    image = torch.randn(3, 160, 128)   # 426 tokens over the 4 levels: two-stage takes the top 300
    if variant == "two_stage":   # the file cannot say how many proposals the run took: the official 300
        loaded.transformer.two_stage_num_proposals = model.transformer.two_stage_num_proposals
    with torch.no_grad():
        torch.testing.assert_close(loaded([image])["pred_boxes"], model([image])["pred_boxes"], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"two-stage takes the top 300 of the encoder's tokens, but the levels' "
                                         r"maps \(12x10, 6x5, 3x3, 2x2\) hold 163; use larger images"):
        fastdetr.deformable_detr_small(two_stage=True, with_box_refine=True, num_queries=300)([torch.randn(3, 96, 80)])


def test_resnet50_keys_give_the_official_config():
    from fastdetr.checkpoint import infer_config

    for options in ({}, {"with_box_refine": True}, {"with_box_refine": True, "two_stage": True}):
        model = fastdetr.deformable_detr_resnet50(**options)
        assert infer_config(model.state_dict()) == model.config, options
