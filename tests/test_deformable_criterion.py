"""Deformable DETR's focal matcher, set criterion and PostProcess.

Equivalence with the official code (fundamentalvision/Deformable-DETR) is checked by hand with
tests/fixtures/deformable_criterion_official.py; these tests need only fastdetr, scipy and (for the
triton solver) Triton.
"""
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from fastdetr.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from fastdetr.criterion import total_loss
from fastdetr.deformable_config import DeformableDETRConfig
from fastdetr.deformable_criterion import (
    FocalHungarianMatcher,
    build_deformable_criterion,
    focal_matching_cost_ref,
    sigmoid_focal_loss,
)
from fastdetr.matcher import resolve_solver
from fastdetr.measure.counters import OpCounter
from fastdetr.reference.deformable_detr import PostProcess

LAYER_LOSSES = ["loss_ce", "loss_bbox", "loss_giou", "cardinality_error"]


def random_boxes(generator, *shape, dtype=torch.float32):
    centres = torch.rand(*shape, 2, generator=generator, dtype=dtype) * 0.8 + 0.1
    sizes = torch.rand(*shape, 2, generator=generator, dtype=dtype) * 0.4 + 0.02
    return torch.cat([centres, sizes], -1)


def random_layer(generator, batch_size, num_queries, num_classes):
    return {"pred_logits": (torch.randn(batch_size, num_queries, num_classes, generator=generator) * 2 - 1
                            ).requires_grad_(),
            "pred_boxes": random_boxes(generator, batch_size, num_queries).requires_grad_()}


def random_case(seed, sizes, num_queries=11, num_classes=5, num_layers=3, num_proposals=0):
    """Outputs with num_layers - 1 aux layers (and encoder proposals when num_proposals) and targets."""
    generator = torch.Generator().manual_seed(seed)
    outputs = random_layer(generator, len(sizes), num_queries, num_classes)
    if num_layers > 1:
        outputs["aux_outputs"] = [random_layer(generator, len(sizes), num_queries, num_classes)
                                  for _ in range(num_layers - 1)]
    if num_proposals:
        outputs["enc_outputs"] = random_layer(generator, len(sizes), num_proposals, num_classes)
    targets = [{"labels": torch.randint(0, num_classes, (n,), generator=generator),
                "boxes": random_boxes(generator, n)} for n in sizes]
    return outputs, targets


def config(**changes):
    return DeformableDETRConfig(**{"num_classes": 5, "dec_layers": 3, **changes})


# ---- the focal loss and the matching cost ------------------------------------------------------------

def test_sigmoid_focal_loss_matches_the_direct_formula_in_float64():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 17, 7, generator=generator, dtype=torch.float64) * 3
    targets = (torch.rand(3, 17, 7, generator=generator) < 0.3).double()
    prob = 1 / (1 + torch.exp(-logits))
    positive = -0.25 * (1 - prob) ** 2 * torch.log(prob)
    negative = -0.75 * prob ** 2 * torch.log(1 - prob)
    expected = torch.where(targets == 1, positive, negative)
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets), expected, rtol=1e-12, atol=1e-14)


def test_focal_matching_cost_matches_a_direct_per_pair_computation():
    generator = torch.Generator().manual_seed(1)
    num_layers, batch_size, num_queries, num_classes = 2, 2, 9, 6
    logits = torch.randn(num_layers * batch_size, num_queries, num_classes, generator=generator) * 2
    boxes = random_boxes(generator, num_layers * batch_size, num_queries)
    labels = torch.randint(0, num_classes, (batch_size, 4), generator=generator)
    target_boxes = random_boxes(generator, batch_size, 4)
    cost = focal_matching_cost_ref(logits, boxes, labels, target_boxes)
    assert cost.shape == (num_layers * batch_size, num_queries, 4)
    expected = torch.empty_like(cost, dtype=torch.float64)
    for p in range(num_layers * batch_size):
        b = p % batch_size
        giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes[p].double()), box_cxcywh_to_xyxy(target_boxes[b].double()))
        for q in range(num_queries):
            for t in range(4):
                prob = 1 / (1 + math.exp(-float(logits[p, q, labels[b, t]])))
                pos = 0.25 * (1 - prob) ** 2 * -math.log(prob + 1e-8)
                neg = 0.75 * prob ** 2 * -math.log(1 - prob + 1e-8)
                l1 = float((boxes[p, q].double() - target_boxes[b, t].double()).abs().sum())
                expected[p, q, t] = 5 * l1 + 2 * (pos - neg) - 2 * float(giou[q, t])
    torch.testing.assert_close(cost.double(), expected, rtol=1e-5, atol=1e-5)


def test_the_matching_is_optimal_and_all_layers_match_at_once():
    outputs, targets = random_case(2, sizes=[4, 0, 11, 1], num_queries=9, num_layers=3)
    matcher = FocalHungarianMatcher(backend="scipy")
    per_layer = matcher.match_layers(outputs, targets)
    layers = [*outputs["aux_outputs"], outputs]
    assert len(per_layer) == 3
    for layer, indices in zip(layers, per_layer):
        assert [(a.tolist(), b.tolist()) for a, b in matcher(layer, targets)] == \
               [(a.tolist(), b.tolist()) for a, b in indices]
        for (pred_idx, tgt_idx), target, logits, boxes in zip(indices, targets, layer["pred_logits"],
                                                              layer["pred_boxes"]):
            n = target["labels"].shape[0]
            assert pred_idx.shape[0] == tgt_idx.shape[0] == min(9, n)
            if n == 0:
                continue
            cost = focal_matching_cost_ref(logits.detach()[None], boxes.detach()[None], target["labels"][None],
                                           target["boxes"][None])[0].double().numpy()
            rows, cols = linear_sum_assignment(cost)
            assert cost[pred_idx.numpy(), tgt_idx.numpy()].sum() == pytest.approx(cost[rows, cols].sum(), rel=1e-9)
            assert np.all(np.diff(pred_idx.numpy()) > 0)


def test_validate_targets_accepts_the_last_class_and_rejects_labels_beyond():
    outputs, targets = random_case(3, sizes=[2, 3], num_layers=1)
    targets[0]["labels"][0] = 4  # the last of 5 classes: valid without a no-object class
    matcher = FocalHungarianMatcher(backend="scipy", validate_targets=True)
    matcher(outputs, targets)
    targets[1]["labels"][1] = 5
    with pytest.raises(ValueError, match="labels must lie in"):
        matcher(outputs, targets)


def test_match_padded_uses_the_focal_cost():
    """Padded targets (the static-shape step's form) give match_layers' matching with the focal cost."""
    from fastdetr.padded import pad_targets

    outputs, targets = random_case(5, sizes=[4, 0, 7], num_queries=9, num_layers=2)
    matcher = FocalHungarianMatcher(backend="scipy")
    expected = matcher.match_layers(outputs, targets)
    layers = [*outputs["aux_outputs"], outputs]
    logits = torch.stack([layer["pred_logits"] for layer in layers])
    boxes = torch.stack([layer["pred_boxes"] for layer in layers])
    col_for_row = matcher.match_padded(logits, boxes, pad_targets(targets, 9, logits.shape[-1]))
    for layer, indices in enumerate(expected):
        for image, (pred_idx, tgt_idx) in enumerate(indices):
            row = col_for_row[layer, image]
            assert torch.equal((row >= 0).nonzero().flatten(), pred_idx) and torch.equal(row[pred_idx], tgt_idx)


# ---- the criterion ------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["plain", "aux", "two_stage"])
def test_keys_and_weight_dict(variant):
    options = {"plain": {"aux_loss": False}, "aux": {}, "two_stage": {"with_box_refine": True, "two_stage": True}}
    cfg = config(**options[variant])
    criterion = build_deformable_criterion(cfg, backend="scipy")
    outputs, targets = random_case(4, sizes=[3, 2], num_layers=3 if cfg.aux_loss else 1,
                                   num_proposals=40 if cfg.two_stage else 0)
    losses = criterion(outputs, targets)
    suffixes = [f"_{i}" for i in range(2)] if cfg.aux_loss else []
    suffixes += ["_enc"] if cfg.two_stage else []
    expected = ["loss_ce", "class_error", "loss_bbox", "loss_giou", "cardinality_error"]
    expected += [name + suffix for suffix in suffixes for name in LAYER_LOSSES]
    assert list(losses) == expected
    base = {"loss_ce": 2, "loss_bbox": 5, "loss_giou": 2}
    weight_suffixes = ["", *([f"_{i}" for i in range(2)] + ["_enc"] if cfg.aux_loss or cfg.two_stage else [])]
    assert criterion.weight_dict == {name + suffix: value for suffix in weight_suffixes
                                     for name, value in base.items()}
    assert all(torch.isfinite(value) and value.dim() == 0 for value in losses.values())


def test_gradients_are_finite_and_reach_every_output():
    outputs, targets = random_case(5, sizes=[6, 0, 3], num_layers=3, num_proposals=30)
    criterion = build_deformable_criterion(config(with_box_refine=True, two_stage=True), backend="scipy")
    total_loss(criterion(outputs, targets), criterion.weight_dict).backward()
    last = {key: outputs[key] for key in ("pred_logits", "pred_boxes")}
    leaves = [last, *outputs["aux_outputs"], outputs["enc_outputs"]]
    for layer in leaves:
        for value in layer.values():
            assert value.grad is not None and torch.isfinite(value.grad).all()
            assert value.grad.abs().sum() > 0


def test_loss_ce_is_the_focal_sum_over_num_boxes_and_the_encoder_is_class_agnostic():
    outputs, targets = random_case(6, sizes=[3, 4], num_layers=1, num_proposals=25)
    criterion = build_deformable_criterion(config(aux_loss=False, with_box_refine=True, two_stage=True),
                                           backend="scipy")
    losses = criterion(outputs, targets)
    matcher = criterion.matcher
    for layer, labels_of, key in ((outputs, lambda t: t["labels"], "loss_ce"),
                                  (outputs["enc_outputs"], lambda t: torch.zeros_like(t["labels"]), "loss_ce_enc")):
        binary = [{**t, "labels": labels_of(t)} for t in targets]
        onehot = torch.zeros_like(layer["pred_logits"])
        for b, ((pred_idx, tgt_idx), target) in enumerate(zip(matcher(layer, binary), binary)):
            onehot[b, pred_idx, target["labels"][tgt_idx]] = 1
        expected = sigmoid_focal_loss(layer["pred_logits"].double(), onehot.double()).sum() / 7
        assert float(losses[key]) == pytest.approx(float(expected), rel=1e-5)


def test_empty_targets_and_num_boxes_clamped_at_one():
    criterion = build_deformable_criterion(config(), backend="scipy")
    outputs, targets = random_case(7, sizes=[0, 5], num_layers=3)
    losses = criterion(outputs, targets)
    assert all(torch.isfinite(value) for value in losses.values())
    outputs, targets = random_case(8, sizes=[0, 0], num_layers=3)
    losses = criterion(outputs, targets)
    assert float(losses["loss_bbox"]) == 0 and float(losses["loss_giou_1"]) == 0
    assert float(losses["class_error"]) == 100
    # no boxes: every query is a negative, and num_boxes is clamped to 1 (not 0)
    expected = sigmoid_focal_loss(outputs["pred_logits"], torch.zeros_like(outputs["pred_logits"])).sum()
    assert float(losses["loss_ce"]) == pytest.approx(float(expected), rel=1e-5)
    total_loss(losses, criterion.weight_dict).backward()
    assert torch.isfinite(outputs["pred_logits"].grad).all() and outputs["pred_logits"].grad.abs().sum() > 0


def test_the_criterion_itself_makes_no_host_sync():
    """With a solver that syncs nothing (a device solver), neither does the criterion."""
    outputs, targets = random_case(9, sizes=[2, 3], num_layers=3)
    criterion = build_deformable_criterion(config(), backend=lambda cost, counts: [
        (torch.arange(min(cost.shape[1], n)), torch.arange(min(cost.shape[1], n))) for n in counts])
    with OpCounter() as counter:
        criterion(outputs, targets)
    assert counter.sync_ops == []


def test_scipy_and_triton_solvers_give_the_same_losses():
    pytest.importorskip("triton", reason="the triton solver needs Triton")
    if not (torch.cuda.is_available() or __import__("fastdetr.backend").backend.interpreter_enabled()):
        pytest.skip("no GPU and TRITON_INTERPRET is off: the assignment kernel cannot run")
    outputs, targets = random_case(10, sizes=[4, 0, 6], num_queries=12, num_layers=2, num_proposals=20)
    cfg = config(dec_layers=2, with_box_refine=True, two_stage=True)
    expected = build_deformable_criterion(cfg, backend="scipy")(outputs, targets)
    criterion = build_deformable_criterion(cfg, backend="triton")
    criterion.matcher.solver = resolve_solver("triton", check_invalid=False)  # as on a GPU: no status read
    with OpCounter() as counter:
        losses = criterion(outputs, targets)
    assert counter.sync_ops == []
    assert losses.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(losses[name], value, rtol=1e-6, atol=1e-7, msg=name)


# ---- PostProcess ------------------------------------------------------------------------------------

def test_postprocess_selects_the_top_scores_over_queries_and_classes():
    generator = torch.Generator().manual_seed(11)
    logits = torch.randn(2, 40, 7, generator=generator)
    boxes = random_boxes(generator, 2, 40)
    sizes = torch.tensor([[480, 640], [300, 200]])
    results = PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    assert len(results) == 2
    for b, result in enumerate(results):
        assert result["scores"].shape == result["labels"].shape == (100,) and result["boxes"].shape == (100, 4)
        assert torch.all(result["scores"][:-1] >= result["scores"][1:])
        expected = logits[b].sigmoid().flatten().sort(descending=True).values[:100]
        torch.testing.assert_close(result["scores"], expected)
        height, width = sizes[b].tolist()
        for score, label, box in zip(result["scores"][:10], result["labels"][:10], result["boxes"][:10]):
            query = int((logits[b, :, label].sigmoid() == score).nonzero()[0])
            scale = torch.tensor([width, height, width, height], dtype=torch.float32)
            torch.testing.assert_close(box, box_cxcywh_to_xyxy(boxes[b, query]) * scale)
    few = PostProcess()({"pred_logits": logits[:, :5, :3], "pred_boxes": boxes[:, :5]}, sizes)
    assert few[0]["scores"].shape == (15,)
    with pytest.raises(ValueError, match="target_sizes"):
        PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, sizes[:1])


# ---- padded targets (static shapes) -------------------------------------------------------------------

PADDED_LAYOUTS = {"mixed": [4, 0, 6], "one_each": [1, 1], "empty_batch": [0, 0], "full": [7, 3]}


@pytest.mark.parametrize("two_stage", [False, True])
@pytest.mark.parametrize("layout", sorted(PADDED_LAYOUTS))
def test_forward_padded_equals_forward(layout, two_stage):
    """Every layer batched, one matcher call (and one for the proposals): the same keys in the same order,
    values to 1e-6 and gradients to 1e-5 of the per-image path's."""
    from fastdetr.padded import pad_targets

    sizes = PADDED_LAYOUTS[layout]
    outputs, targets = random_case(20 + len(layout), sizes=sizes, num_queries=11, num_layers=3,
                                   num_proposals=24 if two_stage else 0)
    criterion = build_deformable_criterion(config(with_box_refine=two_stage, two_stage=two_stage), backend="scipy")
    expected = criterion(outputs, targets)
    padded = criterion.forward_padded(outputs, pad_targets(targets, 7, 5))
    assert list(padded) == list(expected)
    for name, value in expected.items():
        torch.testing.assert_close(padded[name], value, rtol=1e-6, atol=1e-6, msg=name)
    leaves = [outputs["pred_logits"], outputs["pred_boxes"], *outputs["aux_outputs"][0].values(),
              *(outputs["enc_outputs"].values() if two_stage else [])]
    grads = torch.autograd.grad(total_loss(expected, criterion.weight_dict), leaves, retain_graph=True)
    padded_grads = torch.autograd.grad(total_loss(padded, criterion.weight_dict), leaves)
    for index, (grad, padded_grad) in enumerate(zip(grads, padded_grads)):
        assert torch.isfinite(padded_grad).all()
        torch.testing.assert_close(padded_grad, grad, rtol=1e-5, atol=1e-6, msg=f"leaf {index}")


def test_forward_padded_itself_makes_no_host_sync():
    """On the meta device (no data: any .item(), bool() or device-to-host copy fails or is counted), with a
    matcher whose match_padded is tensor ops only (the assignment kernel's no-sync launch is tested with DETR's
    matcher): the losses, encoder proposals included, read nothing."""
    from fastdetr.padded import pad_targets

    outputs, targets = random_case(31, sizes=[3, 0, 5], num_queries=10, num_layers=2, num_proposals=16)
    criterion = build_deformable_criterion(config(dec_layers=2, with_box_refine=True, two_stage=True),
                                           backend="scipy")

    def first_queries(logits, boxes, padded, check_invalid):   # query q takes slot q where that slot is valid
        slots = torch.arange(logits.shape[2], device=logits.device).expand(logits.shape[:3])
        width = padded.valid.shape[1]
        valid = torch.nn.functional.pad(padded.valid, (0, logits.shape[2] - width))[None].expand_as(slots)
        return torch.where(valid, slots, -1)

    criterion.matcher.match_padded = first_queries
    meta = {key: value.detach().to("meta").requires_grad_() for key, value in outputs.items()
            if key not in ("aux_outputs", "enc_outputs")}
    meta["aux_outputs"] = [{k: v.detach().to("meta") for k, v in aux.items()} for aux in outputs["aux_outputs"]]
    meta["enc_outputs"] = {k: v.detach().to("meta") for k, v in outputs["enc_outputs"].items()}
    padded = pad_targets(targets, 6, 5)
    padded = type(padded)(*(tensor.to("meta") for tensor in padded))
    with OpCounter() as counter:
        losses = criterion.forward_padded(meta, padded)
        total = total_loss(losses, criterion.weight_dict)
    assert counter.sync_ops == []
    assert total.device.type == "meta" and "loss_giou_enc" in losses and losses["loss_ce_0"].shape == ()


def test_forward_padded_with_the_assignment_kernel():
    pytest.importorskip("triton", reason="the triton solver needs Triton")
    if not (torch.cuda.is_available() or __import__("fastdetr.backend").backend.interpreter_enabled()):
        pytest.skip("no GPU and TRITON_INTERPRET is off: the assignment kernel cannot run")
    from fastdetr.padded import pad_targets

    outputs, targets = random_case(30, sizes=[3, 0, 5], num_queries=10, num_layers=2, num_proposals=16)
    cfg = config(dec_layers=2, with_box_refine=True, two_stage=True)
    expected = build_deformable_criterion(cfg, backend="scipy")(outputs, targets)
    criterion = build_deformable_criterion(cfg, backend="triton")
    losses = criterion.forward_padded(outputs, pad_targets(targets, 6, 5))
    assert list(losses) == list(expected)
    for name, value in expected.items():
        torch.testing.assert_close(losses[name], value, rtol=1e-6, atol=1e-6, msg=name)


# ---- bad target values ----------------------------------------------------------------------------------

def _with_image_ids(seed):
    outputs, targets = random_case(seed, sizes=[4, 0, 6], num_layers=2, num_proposals=15)
    for image_id, target in zip((11, 12, 13), targets):
        target["image_id"] = torch.tensor([image_id])
    return outputs, targets


@pytest.mark.parametrize("bad", ["label 5", "label -1", "nan box", "negative width"])
def test_a_bad_target_raises_naming_the_image(bad):
    from fastdetr.criterion import BadTargetError

    outputs, targets = _with_image_ids(40)
    if bad.startswith("label"):
        targets[2]["labels"][3] = int(bad.split()[1])
    else:
        targets[0]["boxes"][1] = torch.tensor([0.5, math.nan, 0.2, 0.2] if bad == "nan box" else [0.5, 0.5, -0.1, 0.2])
    criterion = build_deformable_criterion(config(dec_layers=2, with_box_refine=True, two_stage=True),
                                           backend="scipy")
    with pytest.raises(BadTargetError) as raised:
        criterion(outputs, targets)
    message = str(raised.value)
    assert message.startswith("DeformableSetCriterion: bad target values in 1 of 3 image(s)")
    named = "targets[2] (image_id 13): label" if bad.startswith("label") else "targets[0] (image_id 11): box"
    assert named in message


def test_the_recorded_check_keeps_losses_finite_and_raises_when_read():
    from fastdetr.criterion import BadTargetError

    criterion = build_deformable_criterion(config(dec_layers=2, with_box_refine=True, two_stage=True),
                                           backend="scipy", check_targets=False)
    good_outputs, good = _with_image_ids(41)
    bad_outputs, bad = _with_image_ids(42)
    bad[2]["labels"][0] = 9
    with OpCounter() as counter:
        losses = [criterion(good_outputs, good), criterion(bad_outputs, bad)]
    assert counter.sync_ops == []
    assert all(torch.isfinite(value).all() for step in losses for value in step.values())
    with pytest.raises(BadTargetError) as raised:
        criterion.raise_if_bad_targets()
    assert raised.value.call == 1 and "forward 2 of the 2 since the last check" in str(raised.value)
    assert "targets[2] (image_id 13): label 9 (target 0) is outside [0, 5)" in str(raised.value)
    criterion.raise_if_bad_targets()   # a new period: nothing recorded
