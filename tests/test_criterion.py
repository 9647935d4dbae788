"""SetCriterion: hand-computed losses, empty targets, aux layers, gradients, and no host sync."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_matcher import random_batch, reference_cost

from fastdetr import box_ops
from fastdetr.config import DETRConfig, preset
from fastdetr.criterion import LOSSES, BadTargetError, SetCriterion, build_criterion, num_boxes_tensor, total_loss
from fastdetr.matcher import HungarianMatcher, resolve_solver
from fastdetr.measure.counters import OpCounter

LAST_KEYS = ["loss_ce", "class_error", "loss_bbox", "loss_giou", "cardinality_error"]
AUX_KEYS = ["loss_ce", "loss_bbox", "loss_giou", "cardinality_error"]


def criterion(num_classes: int, backend="scipy") -> SetCriterion:
    return SetCriterion(num_classes, HungarianMatcher(1, 5, 2, backend=backend), {}, 0.1, list(LOSSES))


def with_layers(seed: int, num_layers: int, batch_size: int, num_queries: int, num_classes: int, sizes: list[int]):
    layers = [random_batch(seed + k, batch_size, num_queries, num_classes, sizes=sizes)[0] for k in range(num_layers)]
    _, targets = random_batch(seed + 1000, batch_size, num_queries, num_classes, sizes=sizes)
    for layer in layers:
        for value in layer.values():
            value.requires_grad_()
    return {**layers[-1], "aux_outputs": layers[:-1]}, layers, targets


def test_hand_computed_one_image_two_queries_one_target():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]]], requires_grad=True)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]]], requires_grad=True)
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.55, 0.5, 0.2, 0.2]])}]
    losses = criterion(2)({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert list(losses) == LAST_KEYS
    # query 0 is matched (class 0, weight 1); query 1 is trained towards no-object (class 2, weight 0.1)
    nll_matched = math.log(math.exp(2) + math.exp(0) + math.exp(-1)) - 2
    nll_empty = math.log(math.exp(0) + math.exp(1) + math.exp(0.5)) - 0.5
    expected_ce = (1.0 * nll_matched + 0.1 * nll_empty) / 1.1
    # boxes: xyxy [0.4, 0.4, 0.6, 0.6] vs [0.45, 0.4, 0.65, 0.6]: intersection 0.15 * 0.2 = 0.03,
    # union 0.04 + 0.04 - 0.03 = 0.05, IoU 0.6, enclosing box 0.25 * 0.2 = 0.05 = union: GIoU 0.6
    expected = {"loss_ce": expected_ce, "class_error": 0.0, "loss_bbox": 0.05, "loss_giou": 0.4,
                "cardinality_error": 1.0}  # two queries predict an object, one target
    for key, value in expected.items():
        assert losses[key].item() == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert not losses["class_error"].requires_grad and not losses["cardinality_error"].requires_grad
    total_loss(losses, {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2}).backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(boxes.grad).all()
    assert boxes.grad[0, 1].abs().sum() == 0  # the unmatched query's box gets no gradient
    # d(loss_bbox)/d(cx of query 0) = 5 * sign(0.5 - 0.55) plus the GIoU term; at least not zero
    assert boxes.grad[0, 0, 0] != 0


def test_empty_targets():
    generator = torch.Generator().manual_seed(21)
    logits = (torch.randn(2, 5, 4, generator=generator) * 2).requires_grad_()
    boxes = box_ops.box_xyxy_to_cxcywh(torch.tensor([0.1, 0.1, 0.4, 0.5])).expand(2, 5, 4).clone().requires_grad_()
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)} for _ in range(2)]
    losses = criterion(3)({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0
    # every query is trained towards no-object; all weights equal, so the weighted mean is the plain mean
    expected_ce = -F.log_softmax(logits.detach(), -1)[..., 3].mean()
    torch.testing.assert_close(losses["loss_ce"], expected_ce)
    assert losses["class_error"].item() == 100.0  # as the original: nothing matched counts as all wrong
    expected_cardinality = (logits.detach().argmax(-1) != 3).sum(1).float().mean()
    torch.testing.assert_close(losses["cardinality_error"], expected_cardinality)
    total = total_loss(losses, {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2})
    assert torch.isfinite(total)
    total.backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(boxes.grad).all()


@pytest.mark.parametrize("seed", range(3))
def test_one_target_against_a_direct_computation(seed):
    outputs, targets = random_batch(200 + seed, batch_size=1, num_queries=7, num_classes=5, sizes=[1])
    losses = criterion(5)(outputs, targets)
    logits, boxes = outputs["pred_logits"][0], outputs["pred_boxes"][0]
    label, target_box = targets[0]["labels"][0], targets[0]["boxes"][0]
    query = int(reference_cost(logits, boxes, targets[0]["labels"], targets[0]["boxes"])[:, 0].argmin())
    log_prob = F.log_softmax(logits, -1)
    nll = -log_prob[:, 5].clone()  # no-object for every query ...
    weights = torch.full((7,), 0.1)
    nll[query], weights[query] = -log_prob[query, label], 1.0  # ... but the matched one
    torch.testing.assert_close(losses["loss_ce"], (weights * nll).sum() / weights.sum())
    torch.testing.assert_close(losses["loss_bbox"], (boxes[query] - target_box).abs().sum())
    giou = box_ops.generalized_box_iou(box_ops.box_cxcywh_to_xyxy(boxes[query:query + 1]),
                                       box_ops.box_cxcywh_to_xyxy(target_box[None]))[0, 0]
    torch.testing.assert_close(losses["loss_giou"], 1 - giou)
    correct = float(logits[query].argmax() == label)
    assert losses["class_error"].item() == 100.0 - 100.0 * correct


def test_aux_losses_equal_each_layer_run_alone():
    outputs, layers, targets = with_layers(300, num_layers=4, batch_size=3, num_queries=12, num_classes=6,
                                           sizes=[3, 0, 5])
    crit = criterion(6)
    losses = crit(outputs, targets)
    assert list(losses) == LAST_KEYS + [f"{k}_{i}" for i in range(3) for k in AUX_KEYS]
    for i, layer in enumerate(layers):
        alone = crit(layer, targets)
        suffix = "" if i == len(layers) - 1 else f"_{i}"
        for key in AUX_KEYS:
            torch.testing.assert_close(losses[key + suffix], alone[key], rtol=0, atol=0)
    torch.testing.assert_close(losses["class_error"], crit(layers[-1], targets)["class_error"])


def test_gradients_are_finite_and_reach_every_layer():
    outputs, layers, targets = with_layers(400, num_layers=3, batch_size=2, num_queries=10, num_classes=4,
                                           sizes=[4, 1])
    crit = build_criterion(DETRConfig(num_classes=4, dec_layers=3))
    losses = crit(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    total_loss(losses, crit.weight_dict).backward()
    for layer in layers:
        for value in layer.values():
            assert torch.isfinite(value.grad).all() and value.grad.abs().sum() > 0


def test_forward_makes_no_host_sync_on_cpu_with_scipy():
    """On CPU tensors the scipy backend's cost copy is not a copy: nothing in the forward reads a value."""
    outputs, _, targets = with_layers(500, num_layers=6, batch_size=2, num_queries=100, num_classes=91,
                                      sizes=[7, 0])
    crit = build_criterion(DETRConfig())
    with OpCounter() as counter:
        losses = crit(outputs, targets)
    assert counter.sync_ops == []
    assert losses["loss_bbox"].requires_grad


def zero_sync_solver(cost, num_targets):
    """A stand-in device solver through the seam: a fixed valid assignment, computed without reading values."""
    k = [min(cost.shape[1], n) for n in num_targets]
    return [(torch.arange(n, device=cost.device), torch.arange(n, device=cost.device).flip(0)) for n in k]


def test_forward_is_sync_free_on_a_device_with_a_device_solver():
    """On the meta device (no data at all) any .item(), bool() or device-to-host copy would fail or be counted."""
    device = "meta"
    generator = torch.Generator().manual_seed(600)
    layers = [{"pred_logits": torch.randn(2, 9, 5, generator=generator).to(device).requires_grad_(),
               "pred_boxes": torch.rand(2, 9, 4, generator=generator).to(device).requires_grad_()}
              for _ in range(3)]
    outputs = {**layers[-1], "aux_outputs": layers[:-1]}
    targets = [{"labels": torch.tensor([1, 0, 3], device=device), "boxes": torch.rand(3, 4).to(device)},
               {"labels": torch.zeros(0, dtype=torch.int64, device=device), "boxes": torch.zeros(0, 4).to(device)}]
    crit = build_criterion(DETRConfig(num_classes=4, dec_layers=3), backend=zero_sync_solver).to(device)
    with OpCounter() as counter:
        losses = crit(outputs, targets)
        total = total_loss(losses, crit.weight_dict)
    assert counter.sync_ops == []
    assert total.device.type == "meta" and losses["loss_giou_1"].shape == ()
    # the same solver on real CPU tensors gives the losses of that fixed assignment, finite
    real = [{k: v.detach().to("cpu") for k, v in random_batch(601, 2, 9, 4, sizes=[3, 0])[0].items()}]
    _, real_targets = random_batch(602, 2, 9, 4, sizes=[3, 0])
    fixed = build_criterion(DETRConfig(num_classes=4, aux_loss=False), backend=zero_sync_solver)(real[0],
                                                                                                   real_targets)
    expected_bbox = (real[0]["pred_boxes"][0, :3] - real_targets[0]["boxes"].flip(0)).abs().sum() / 3
    torch.testing.assert_close(fixed["loss_bbox"], expected_bbox)


def test_num_boxes_is_a_tensor_averaged_over_processes(monkeypatch):
    with OpCounter() as counter:
        value = num_boxes_tensor(7, torch.device("cpu"))
    assert counter.sync_ops == [] and isinstance(value, torch.Tensor) and value.shape == ()
    assert value.item() == 7.0
    assert num_boxes_tensor(0, torch.device("cpu")).item() == 1.0  # clamped at 1
    # two processes, the other one holding 5 targets: (3 + 5) / 2 = 4
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor: tensor.add_(5))
    assert num_boxes_tensor(3, torch.device("cpu")).item() == 4.0
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor: tensor.add_(0))
    assert num_boxes_tensor(0, torch.device("cpu")).item() == 1.0


def test_build_criterion_defaults():
    crit = build_criterion(DETRConfig())
    assert crit.weight_dict == {f"{k}{s}": w for s in ["", *(f"_{i}" for i in range(5))]
                                for k, w in {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2}.items()}
    assert (crit.matcher.cost_class, crit.matcher.cost_bbox, crit.matcher.cost_giou) == (1, 5, 2)
    assert crit.losses == ["labels", "boxes", "cardinality"] and crit.num_classes == 91
    assert crit.empty_weight.shape == (92,) and crit.empty_weight[-1].item() == pytest.approx(0.1)
    assert crit.empty_weight[:-1].eq(1).all() and "empty_weight" in dict(crit.named_buffers())
    assert len(build_criterion(preset("detr_small")).weight_dict) == 3 * 3
    assert len(build_criterion(DETRConfig(aux_loss=False)).weight_dict) == 3


def test_total_loss_and_bad_arguments():
    losses = {"loss_ce": torch.tensor(2.0), "loss_bbox": torch.tensor(0.5), "class_error": torch.tensor(50.0)}
    assert total_loss(losses, {"loss_ce": 1, "loss_bbox": 5}).item() == pytest.approx(4.5)
    with pytest.raises(ValueError, match="no key"):
        total_loss(losses, {"loss_giou": 2})
    with pytest.raises(ValueError, match="unknown loss"):
        SetCriterion(3, HungarianMatcher(), {}, 0.1, ["labels", "masks"])


def test_nan_predictions_are_rejected_by_the_matcher():
    outputs, targets = random_batch(700, batch_size=2, num_queries=6, num_classes=3, sizes=[2, 1])
    outputs["pred_boxes"][1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="problem 1"):
        criterion(3)(outputs, targets)


def test_forward_with_the_triton_backend_is_sync_free_and_equals_scipy():
    """The whole criterion forward with the batched assignment kernel (as a GPU runs it: no status check)
    dispatches no host-syncing op, and its losses equal the scipy backend's."""
    pytest.importorskip("triton", reason="the triton backend needs Triton")
    if not (torch.cuda.is_available() or __import__("fastdetr.backend").backend.interpreter_enabled()):
        pytest.skip("no GPU and TRITON_INTERPRET is off: the kernel cannot run")
    outputs, _, targets = with_layers(510, num_layers=6, batch_size=3, num_queries=100, num_classes=91,
                                      sizes=[7, 0, 25])
    crit = build_criterion(DETRConfig(), backend="scipy")
    crit_triton = build_criterion(DETRConfig(), backend="triton")
    crit_triton.matcher.solver = resolve_solver("triton", check_invalid=False)
    with OpCounter() as counter:
        losses = crit_triton(outputs, targets)
    assert counter.sync_ops == []
    expected = crit(outputs, targets)
    assert losses.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.allclose(losses[name], value, rtol=1e-6, atol=1e-7), name


# ---- bad target values ---------------------------------------------------------------------------------

def batch_with_image_ids(seed: int, num_classes: int = 5):
    """Three images (4, 0 and 6 targets) with image ids 11, 12, 13 and their predictions."""
    outputs, targets = random_batch(seed, batch_size=3, num_queries=9, num_classes=num_classes, sizes=[4, 0, 6])
    for image_id, target in zip((11, 12, 13), targets):
        target["image_id"] = torch.tensor([image_id])
    return outputs, targets


@pytest.mark.parametrize("bad_label", [5, 8, -1])
def test_a_label_out_of_range_raises_naming_the_image_value_and_range(bad_label):
    outputs, targets = batch_with_image_ids(800)
    targets[2]["labels"][3] = bad_label
    with pytest.raises(BadTargetError) as raised:
        criterion(5)(outputs, targets)
    message = str(raised.value)
    assert isinstance(raised.value, ValueError) and raised.value.call is None
    assert f"targets[2] (image_id 13): label {bad_label} (target 3) is outside [0, 5)" in message
    assert "bad target values in 1 of 3 image(s)" in message and "targets[0]" not in message


@pytest.mark.parametrize("bad_box", [[0.5, 0.5, -0.1, 0.2], [0.5, 0.5, 0.2, -1e-3], [0.5, math.nan, 0.2, 0.2],
                                     [math.inf, 0.5, 0.2, 0.2]])
def test_a_box_of_negative_size_or_not_finite_raises_naming_it(bad_box):
    outputs, targets = batch_with_image_ids(801)
    targets[0]["boxes"][1] = torch.tensor(bad_box)
    targets[2]["labels"][0] = 7  # a second image with a problem, named too
    with pytest.raises(BadTargetError) as raised:
        criterion(5)(outputs, targets)
    message = str(raised.value)
    shown = ", ".join(f"{v:.4g}" for v in bad_box)
    assert f"targets[0] (image_id 11): box [{shown}] (target 1) is not finite with w, h >= 0" in message
    assert "targets[2] (image_id 13): label 7 (target 0)" in message and "2 of 3 image(s)" in message


def test_many_bad_values_are_named_up_to_three_per_image_then_counted():
    outputs, targets = batch_with_image_ids(802)
    targets[2]["labels"][:] = torch.tensor([9, 10, 11, 12, 13, 14])
    with pytest.raises(BadTargetError, match=r"label 11 \(target 2\) is outside \[0, 5\) and 3 more \("):
        criterion(5)(outputs, targets)
    without_ids = [{"labels": t["labels"], "boxes": t["boxes"]} for t in targets]  # no image_id: the index only
    with pytest.raises(BadTargetError, match=r"image\(s\): targets\[2\]: label 9 \(target 0\)"):
        criterion(5)(outputs, without_ids)


def test_recorded_check_makes_no_host_sync_keeps_losses_finite_and_raises_when_read():
    """The GPU path (check_targets=False) on CPU tensors: nothing read in the forward; the first bad
    forward since the last check is named when `raise_if_bad_targets` reads the status."""
    crit = SetCriterion(5, HungarianMatcher(1, 5, 2, backend="scipy"), {}, 0.1, list(LOSSES), check_targets=False)
    good_outputs, good = batch_with_image_ids(803)
    expected = criterion(5)(good_outputs, good)
    bad_outputs, bad = batch_with_image_ids(804)
    bad[0]["labels"][2] = 5
    bad[2]["boxes"][4] = torch.tensor([0.3, math.nan, 0.1, 0.1])
    later_outputs, later = batch_with_image_ids(805)
    later[0]["labels"][0] = -3
    with OpCounter() as counter:
        losses = [crit(good_outputs, good), crit(bad_outputs, bad), crit(later_outputs, later)]
    assert counter.sync_ops == []
    for name, value in expected.items():  # good targets: the same losses as the check at once
        torch.testing.assert_close(losses[0][name], value, rtol=0, atol=0)
    assert all(torch.isfinite(value).all() for step in losses for value in step.values())
    assert crit.target_status.item() == 1  # the second forward (index 1) was the first bad one
    assert bad[0]["labels"][2].item() == 5  # the caller's targets are left as they were
    with pytest.raises(BadTargetError) as raised:
        crit.raise_if_bad_targets()
    message = str(raised.value)
    assert raised.value.call == 1 and "forward 2 of the 3 since the last check" in message
    assert "targets[0] (image_id 11): label 5 (target 2) is outside [0, 5)" in message
    assert "targets[2] (image_id 13): box [0.3, nan, 0.1, 0.1] (target 4)" in message and "label -3" not in message
    crit.raise_if_bad_targets()  # a new period: nothing recorded
    crit(good_outputs, good)
    crit.raise_if_bad_targets()
    assert crit.target_status is None


def test_checks_at_once_or_recorded_by_device_and_flag(monkeypatch):
    outputs, targets = batch_with_image_ids(806)
    targets[1]["labels"] = torch.tensor([5])
    targets[1]["boxes"] = torch.tensor([[0.5, 0.5, 0.1, 0.1]])
    with pytest.raises(BadTargetError):  # None: CPU tensors are checked at once
        build_criterion(DETRConfig(num_classes=5, aux_loss=False))(outputs, targets)
    with pytest.raises(BadTargetError):  # True: at once on any device
        build_criterion(DETRConfig(num_classes=5, aux_loss=False), check_targets=True)(outputs, targets)
    recorded = build_criterion(DETRConfig(num_classes=5, aux_loss=False), check_targets=False)
    recorded(outputs, targets)
    with pytest.raises(BadTargetError, match=r"targets\[1\] \(image_id 12\): label 5"):
        recorded.raise_if_bad_targets()
    # more bad forwards than are kept: still raised, without the values
    monkeypatch.setattr("fastdetr.criterion.KEPT_TARGET_BATCHES", 2)
    few = SetCriterion(5, HungarianMatcher(backend="scipy"), {}, 0.1, list(LOSSES), check_targets=False)
    few(outputs, targets)
    _, good = batch_with_image_ids(807)
    for _ in range(2):
        few(outputs, good)
    with pytest.raises(BadTargetError, match="forward 1 of the 3 since the last check: its targets are no longer kept"):
        few.raise_if_bad_targets()
