"""The reference DETR: structure against the official checkpoint, outputs, masking, no host syncs."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

import fastdetr
from fastdetr.measure.counters import OpCounter
from fastdetr.reference import FrozenBatchNorm2d, PositionEmbeddingLearned, PositionEmbeddingSine, ResNetBody

FIXTURE = Path(__file__).parent / "fixtures" / "detr_r50_state_dict.txt"


def _official_r50_keys() -> tuple[list[tuple[str, tuple[int, ...]]], dict[str, int]]:
    entries, totals = [], {}
    for line in FIXTURE.read_text().splitlines():
        if line.startswith("#"):
            continue
        match = re.match(r"^(\S+) \(([\d, ]*)\)$", line)
        if match:
            shape = tuple(int(d) for d in match.group(2).replace(" ", "").split(",") if d)
            entries.append((match.group(1), shape))
        else:
            words = line.split()
            totals.update({words[i]: int(words[i + 1]) for i in range(0, len(words), 2)})
    return entries, totals


def _small(**overrides) -> fastdetr.DETR:
    torch.manual_seed(0)
    return fastdetr.detr_small(num_classes=5, **overrides)


def test_r50_state_dict_matches_official_keys_shapes_and_order():
    entries, totals = _official_r50_keys()
    assert len(entries) == totals["n_keys"] == 458
    model = fastdetr.detr_resnet50()
    state_dict = model.state_dict()
    assert [(k, tuple(v.shape)) for k, v in state_dict.items()] == entries
    assert sum(v.numel() for v in state_dict.values()) == totals["numel"]
    assert sum(p.numel() for p in model.parameters()) == totals["params"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == totals["trainable"]


def test_official_state_dict_loads_strictly_and_silently(recwarn):
    source = fastdetr.detr_resnet50()
    with torch.no_grad():
        for value in source.state_dict().values():
            value.copy_(torch.randn_like(value))
    official = {"model": source.state_dict()}
    target = fastdetr.detr_resnet50()
    result = target.load_state_dict(official["model"])
    assert not result.missing_keys and not result.unexpected_keys
    assert len(recwarn) == 0
    for key, value in target.state_dict().items():
        assert torch.equal(value, official["model"][key]), key


def test_r50_frozen_parts():
    model = fastdetr.detr_resnet50()
    body = model.backbone[0].body
    assert not any(p.requires_grad for p in body.conv1.parameters())
    assert not any(p.requires_grad for p in body.layer1.parameters())
    assert all(p.requires_grad for p in body.layer2.parameters())
    assert isinstance(body.bn1, FrozenBatchNorm2d) and not list(body.bn1.parameters())
    frozen = fastdetr.detr_resnet50(train_backbone=False)
    assert not any(p.requires_grad for p in frozen.backbone.parameters())
    assert all(p.requires_grad for p in frozen.transformer.parameters())


@pytest.mark.parametrize("name,channels", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048),
                                           ("resnet101", 2048)])
def test_resnet_depths_channels_and_stride(name, channels):
    body = ResNetBody(name).eval()
    assert body.num_channels == channels
    blocks = {"resnet18": 2, "resnet34": 6, "resnet50": 6, "resnet101": 23}[name]
    assert len(body.layer3) == blocks
    with torch.no_grad():
        out = body(torch.randn(1, 3, 67, 97))
    # Each stride-2 stage rounds up: 67 -> 34 -> 17 -> 9 -> 5 -> 3.
    assert out.shape == (1, channels, 3, 4)


def test_dc5_keeps_stride_16():
    body = ResNetBody("resnet50", dilation=True).eval()
    with torch.no_grad():
        out = body(torch.randn(1, 3, 64, 96))
    assert out.shape == (1, 2048, 4, 6)
    assert body.layer4[0].conv2.dilation == (1, 1) and body.layer4[1].conv2.dilation == (2, 2)
    with pytest.raises(ValueError, match="resnet50 or resnet101"):
        fastdetr.DETRConfig(backbone="resnet18", dilation=True)


def test_frozen_batchnorm_matches_batchnorm_eval_and_ignores_num_batches_tracked():
    torch.manual_seed(1)
    bn = torch.nn.BatchNorm2d(16).eval()
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    frozen = FrozenBatchNorm2d(16)
    frozen.load_state_dict(bn.state_dict())  # carries num_batches_tracked: ignored, strict load passes
    x = torch.randn(2, 16, 5, 7)
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset", ["detr_small", "detr_resnet50"])
def test_output_shapes_and_dtypes(preset):
    torch.manual_seed(0)
    model = fastdetr.build_model(preset, num_classes=7).eval()
    images = [torch.randn(3, 70, 90), torch.randn(3, 96, 64)]
    with torch.no_grad():
        out = model(images)
    queries, layers = model.config.num_queries, model.config.dec_layers
    assert out["pred_logits"].shape == (2, queries, 8) and out["pred_logits"].dtype == torch.float32
    assert out["pred_boxes"].shape == (2, queries, 4)
    assert len(out["aux_outputs"]) == layers - 1
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, queries, 8) and aux["pred_boxes"].shape == (2, queries, 4)
    assert torch.isfinite(out["pred_logits"]).all()
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()


def test_no_aux_outputs_when_disabled():
    model = _small(aux_loss=False).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert "aux_outputs" not in out


def test_every_input_form_gives_the_same_result():
    model = _small().eval()
    torch.manual_seed(3)
    images = [torch.randn(3, 64, 80), torch.randn(3, 48, 96)]
    batch = fastdetr.batch_images(images)

    class NestedTensorLike:  # the original DETR's NestedTensor has .tensors and .mask
        def __init__(self, tensors, mask):
            self.tensors, self.mask = tensors, mask

    with torch.no_grad():
        from_list = model(images)["pred_logits"]
        from_pair = model((batch.tensors, batch.mask))["pred_logits"]
        from_nested = model(NestedTensorLike(batch.tensors, batch.mask))["pred_logits"]
        from_single = model(images[:1])["pred_logits"]
        from_tensor = model(images[0][None])["pred_logits"]
    assert batch.tensors.shape == (2, 3, 64, 96)
    assert batch.mask[0, :, 80:].all() and not batch.mask[0, :, :80].any()
    assert batch.mask[1, 48:].all() and not batch.mask[1, :48].any()
    assert torch.equal(from_list, from_pair) and torch.equal(from_list, from_nested)
    torch.testing.assert_close(from_single, from_tensor, rtol=0, atol=0)


def test_transformer_ignores_tokens_at_padded_positions():
    """Changing the transformer's input (features and positions) under the mask leaves predictions unchanged.

    The backbone itself is not padding-invariant (its convolutions see the
    zero padding), as in the original; the transformer is, through the key
    padding masks.
    """
    model = _small().eval()
    torch.manual_seed(4)
    hidden = model.config.hidden_dim
    src = torch.randn(2, hidden, 6, 7)
    pos = torch.randn(2, hidden, 6, 7)
    mask = torch.zeros(2, 6, 7, dtype=torch.bool)
    mask[0, :, 4:] = True
    mask[1, 3:, :] = True
    with torch.no_grad():
        hs, _ = model.transformer(src, mask, model.query_embed.weight, pos)
        noisy_src = torch.where(mask[:, None], torch.randn_like(src) * 100, src)
        noisy_pos = torch.where(mask[:, None], torch.randn_like(pos) * 100, pos)
        hs_noisy, _ = model.transformer(noisy_src, mask, model.query_embed.weight, noisy_pos)
    assert torch.isfinite(hs).all()
    torch.testing.assert_close(hs_noisy, hs, rtol=1e-5, atol=1e-5)
    # Without the mask the same noise does reach the predictions: the test can fail.
    with torch.no_grad():
        unmasked, _ = model.transformer(noisy_src, torch.zeros_like(mask), model.query_embed.weight, noisy_pos)
    assert not torch.allclose(unmasked, hs, rtol=1e-3, atol=1e-3)


def test_sine_position_embedding_formula_and_per_image_extent():
    torch.manual_seed(5)
    embed = PositionEmbeddingSine(8, normalize=True)
    mask = torch.zeros(1, 5, 6, dtype=torch.bool)
    mask[0, :, 4:] = True  # the image is 5 x 4; two padded columns
    pos = embed(torch.empty(1, 1, 5, 6), mask).double()
    assert pos.shape == (1, 16, 5, 6)
    # Independent float64 evaluation on the 5 x 4 valid region.
    scale, eps = 2 * math.pi, 1e-6
    for y in range(5):
        for x in range(4):
            y_n, x_n = (y + 1) / (5 + eps) * scale, (x + 1) / (4 + eps) * scale
            expected = []
            for value in (y_n, x_n):
                for i in range(8):
                    arg = value / 10000 ** (2 * (i // 2) / 8)
                    expected.append(math.sin(arg) if i % 2 == 0 else math.cos(arg))
            torch.testing.assert_close(pos[0, :, y, x], torch.tensor(expected, dtype=torch.float64),
                                       rtol=1e-5, atol=1e-6)
    # The valid region's embedding equals that of the same image unpadded.
    alone = embed(torch.empty(1, 1, 5, 4), torch.zeros(1, 5, 4, dtype=torch.bool))
    torch.testing.assert_close(pos[..., :4].float(), alone)


def test_learned_position_embedding_shape_and_limit():
    embed = PositionEmbeddingLearned(16)
    pos = embed(torch.empty(2, 1, 3, 5), torch.zeros(2, 3, 5, dtype=torch.bool))
    assert pos.shape == (2, 32, 3, 5)
    torch.testing.assert_close(pos[0, :16, 1, 2], embed.col_embed.weight[2])
    torch.testing.assert_close(pos[0, 16:, 1, 2], embed.row_embed.weight[1])
    with pytest.raises(ValueError, match="50 x 50"):
        embed(torch.empty(1, 1, 51, 5), torch.zeros(1, 51, 5, dtype=torch.bool))
    model = _small(position_embedding="learned").eval()
    assert "backbone.1.row_embed.weight" in model.state_dict()


def test_pre_norm_has_encoder_norm_and_runs():
    model = _small(pre_norm=True).eval()
    assert "transformer.encoder.norm.weight" in model.state_dict()
    assert "transformer.encoder.norm.weight" not in _small().state_dict()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert torch.isfinite(out["pred_logits"]).all()


def test_training_step_gradients_reach_every_trainable_parameter():
    model = _small().train()
    torch.manual_seed(6)
    with torch.no_grad():  # move off the initial values (zero biases hide some gradients at init)
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    out = model([torch.randn(3, 64, 72), torch.randn(3, 56, 64)])
    loss = out["pred_logits"].logsumexp(-1).mean() + out["pred_boxes"].sum()
    loss = loss + sum(a["pred_logits"].logsumexp(-1).mean() + a["pred_boxes"].sum() for a in out["aux_outputs"])
    loss.backward()
    for name, param in model.named_parameters():
        assert param.requires_grad, name  # the small preset trains everything
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        if name == "transformer.decoder.layers.0.self_attn.in_proj_weight":
            # The decoder starts from tgt = 0, so the first self-attention's values all equal
            # the value bias: its output does not depend on the attention weights or on the
            # value weights. A zero gradient (up to rounding) is right here, as in the original.
            assert param.grad.abs().max() < 1e-6
            continue
        assert param.grad.abs().sum() > 0, name


def test_forward_and_backward_make_no_host_sync():
    model = _small().train()
    images = [torch.randn(3, 64, 72), torch.randn(3, 56, 64)]
    with OpCounter() as counter:
        out = model(images)
        loss = out["pred_logits"].sum() + out["pred_boxes"].sum()
        loss.backward()
    assert counter.ops > 100  # the counter sees the step
    assert counter.sync_ops == []


def test_host_sync_counter_catches_item():
    with OpCounter() as counter:
        torch.randn(3).sum().item()
        torch.randn(4).nonzero()
    assert counter.sync_ops == ["aten._local_scalar_dense", "aten.nonzero"]


def test_postprocess_hand_computed():
    logits = torch.tensor([[[2.0, 0.0, 1.0], [0.0, 0.0, 5.0]]])  # 2 classes + no-object
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5]]])
    result = fastdetr.PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))
    prob = logits.softmax(-1)
    assert result[0]["labels"].tolist() == [0, 0]
    torch.testing.assert_close(result[0]["scores"], prob[0, :, :2].max(-1).values)
    torch.testing.assert_close(result[0]["boxes"][0], torch.tensor([80.0, 30.0, 120.0, 70.0]))
    torch.testing.assert_close(result[0]["boxes"][1], torch.tensor([0.0, 50.0, 100.0, 100.0]))
    with pytest.raises(ValueError, match="target_sizes"):
        fastdetr.PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([100, 200]))
