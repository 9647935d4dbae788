"""SetCriterion: DETR's set loss (classification, L1 and GIoU on matched pairs), with aux losses.

The same keys and numbers as the original DETR's SetCriterion (models/detr.py)
for the same inputs: "loss_ce", "class_error" (logged), "loss_bbox",
"loss_giou", "cardinality_error" (logged), and for each aux decoder layer i
"loss_ce_i", "loss_bbox_i", "loss_giou_i", "cardinality_error_i".

How it differs from the original:
- No host sync. The original reads the number of boxes with `.item()`; here
  it stays a 0-d tensor on the logits' device (built with `torch.full`,
  all-reduced when torch.distributed is initialised, divided by the world
  size, clamped at 1). Every other count the losses need (targets and matched
  pairs per image) is a tensor shape, known on the host without reading
  values. The only sync left is the solver's: with the scipy backend one
  device-to-host copy of the padded cost blocks per forward (for every layer
  together); none with a device solver.
- All layers are matched in one call (`HungarianMatcher.match_layers`) when the
  matcher has it; any other matcher is called once per layer, as in the original.
- Matched indices are on the logits' device and gathered there: a flat
  (image, query) index per layer instead of the original's per-image
  `torch.full_like` + `torch.cat`, and the matched targets are read from the
  batch's concatenated labels and boxes.
- GIoU of matched pairs is computed pair by pair, not as the diagonal of a
  K x K matrix.
- Only "labels", "boxes" and "cardinality" (no masks); an unknown loss name
  raises ValueError when the criterion is built.
- Target values are checked where they enter (the original fails deep inside
  the loss on a label >= num_classes, and takes a box of negative size or a NaN
  box as given): a label outside [0, num_classes), or a box that is not finite
  or has w < 0 or h < 0, is a `BadTargetError` naming the image (batch index
  and image_id), the value and the allowed range. For CPU tensors it is raised
  at once (reading a CPU tensor is no sync). For device tensors reading would
  sync, so the check is recorded on the device instead: `target_status` (0-d,
  -1 while all is well) marks the first forward since the last check with a
  bad target, whose bad labels and boxes were replaced by valid ones (no-object,
  a centred box) so that nothing asserts and the losses stay finite; the
  trainer reads it where it reads its losses anyway (`raise_if_bad_targets`).
"""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou_broadcast
from .config import DETRConfig
from .matcher import HungarianMatcher, Indices, Solver
from .matcher import check_targets as check_target_shapes

if TYPE_CHECKING:
    from .padded import PaddedTargets

LOSSES = ("labels", "boxes", "cardinality")

# Recorded checks keep the targets of this many recent forwards, to name the bad one when the check is read.
KEPT_TARGET_BATCHES = 256


class BadTargetError(ValueError):
    """A target label outside [0, num_classes), or a box not finite or of negative width/height.

    The message names the image (batch index, image_id), the values and the allowed range. `call`:
    for a recorded check, the index of the bad forward among those since the previous check, else None.
    """

    def __init__(self, message: str, call: int | None = None):
        super().__init__(message)
        self.call = call


def describe_bad_targets(targets: Sequence[dict[str, Tensor]], num_classes: int) -> str | None:
    """What is wrong with the target values, image by image, or None when nothing is (reads them on the host).

    Labels must lie in [0, num_classes) (num_classes is the no-object class, never a target);
    boxes are normalised cxcywh, finite, with w >= 0 and h >= 0. Names at most 3 images and 3
    values per image, then counts.
    """
    problems = []
    for index, target in enumerate(targets):
        labels = target["labels"].detach().cpu().long()
        boxes = target["boxes"].detach().cpu().double()
        bad_labels = ((labels < 0) | (labels >= num_classes)).nonzero().flatten().tolist()
        bad_boxes = (~torch.isfinite(boxes).all(1) | (boxes[:, 2:] < 0).any(1)).nonzero().flatten().tolist()
        if not bad_labels and not bad_boxes:
            continue
        named = [f"label {labels[i].item()} (target {i}) is outside [0, {num_classes})" for i in bad_labels]
        named += [f"box [{', '.join(f'{v:.4g}' for v in boxes[i].tolist())}] (target {i}) is not finite with "
                  "w, h >= 0" for i in bad_boxes]
        more = f" and {len(named) - 3} more" if len(named) > 3 else ""
        image_id = target.get("image_id")
        which = f"targets[{index}]" + (f" (image_id {image_id.reshape(-1)[0].item()})"
                                       if isinstance(image_id, Tensor) and image_id.numel() else "")
        problems.append(f"{which}: {'; '.join(named[:3])}{more}")
    if not problems:
        return None
    more = f"; and {len(problems) - 3} more image(s)" if len(problems) > 3 else ""
    return (f"bad target values in {len(problems)} of {len(targets)} image(s): {'; '.join(problems[:3])}{more} "
            f"(labels must lie in [0, {num_classes}), {num_classes} classes; boxes are normalised cxcywh, "
            "finite, with w >= 0 and h >= 0)")


def num_boxes_tensor(num_targets: int | Tensor, device: torch.device) -> Tensor:
    """Average number of target boxes per process, at least 1, as a 0-d float32 tensor on `device`.

    num_targets: this process's total, an int or a 0-d tensor on `device`. All-reduced (sum) over processes when
    torch.distributed is initialised, then divided by the world size. Tensor
    ops only: no `.item()`, so no host sync.
    """
    if isinstance(num_targets, Tensor):
        num_boxes = num_targets.to(device=device, dtype=torch.float32)
    else:
        num_boxes = torch.full((), float(num_targets), dtype=torch.float32, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(num_boxes)
        num_boxes = num_boxes / torch.distributed.get_world_size()
    return num_boxes.clamp(min=1)


def total_loss(loss_dict: dict[str, Tensor], weight_dict: dict[str, float]) -> Tensor:
    """Sum of loss_dict[k] * weight_dict[k] over the keys in both (logged terms have no weight)."""
    terms = [loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict]
    if not terms:
        raise ValueError(f"total_loss: no key of {sorted(loss_dict)} has a weight in weight_dict")
    return torch.stack(terms).sum()


class _MatchedBatch:
    """Flat gather indices of one layer's matches, on the logits' device.

    query_index: [K] flat index b * Q + pred_idx into the layer's [B * Q] predictions.
    target_index: [K] index into the batch's concatenated targets.
    """

    def __init__(self, indices: Indices, num_targets: Sequence[int], num_queries: int, device: torch.device,
                 offsets_cache: dict[tuple[int, ...], Tensor]):
        counts = tuple(int(pred_idx.shape[0]) for pred_idx, _ in indices)
        self.num_matched = sum(counts)
        if self.num_matched == 0:
            self.query_index = self.target_index = torch.empty(0, dtype=torch.int64, device=device)
            return
        # Per-pair offsets from the match counts, which are shapes (no sync). Layers
        # usually match the same number of pairs per image: build them once per step.
        key = (num_queries, *counts)
        if key not in offsets_cache:
            query_offset, target_offset, start = [], [], 0
            for b, (count, n) in enumerate(zip(counts, num_targets)):
                query_offset += [b * num_queries] * count
                target_offset += [start] * count
                start += n
            offsets_cache[key] = torch.tensor([query_offset, target_offset], dtype=torch.int64).to(device)
        offsets = offsets_cache[key]
        self.query_index = torch.cat([pred_idx for pred_idx, _ in indices]).to(device) + offsets[0]
        self.target_index = torch.cat([tgt_idx for _, tgt_idx in indices]).to(device) + offsets[1]


@torch.no_grad()
def matched_class_error(flat_logits: Tensor, matched_labels: Tensor, matched: _MatchedBatch) -> Tensor:
    """100 - top-1 accuracy (%) of the matched queries, 100 when nothing is matched (the original's class_error).

    flat_logits [B*Q, classes]; matched_labels [K], the matched targets' labels.
    """
    if matched.num_matched == 0:
        return torch.full((), 100.0, device=flat_logits.device)
    correct = flat_logits[matched.query_index].argmax(-1) == matched_labels
    return 100 - correct.float().sum() * (100.0 / matched.num_matched)


def matched_box_losses(pred_boxes: Tensor, target_boxes: Tensor, matched: _MatchedBatch,
                       num_boxes: Tensor) -> dict[str, Tensor]:
    """"loss_bbox" and "loss_giou": L1 and 1 - GIoU of the matched cxcywh pairs, summed and divided by num_boxes.

    pred_boxes [B, Q, 4]; target_boxes [N, 4] (all targets of the batch); num_boxes 0-d.
    """
    src = pred_boxes.flatten(0, 1)[matched.query_index]  # [K, 4]
    tgt = target_boxes[matched.target_index]  # [K, 4]
    loss_bbox = F.l1_loss(src, tgt, reduction="none").sum() / num_boxes
    giou = generalized_box_iou_broadcast(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt))
    return {"loss_bbox": loss_bbox, "loss_giou": (1 - giou).sum() / num_boxes}


class PaddedMatch(NamedTuple):
    """Every layer's predictions stacked and matched to padded targets (`match_padded_layers`)."""

    logits: Tensor        # [L, B, Q, C']
    boxes: Tensor         # [L, B, Q, 4]
    col_for_row: Tensor   # [L, B, Q] each query's target slot, -1 for none
    matched: Tensor       # [L, B, Q] bool
    labels: Tensor        # [L, B, Q] the matched slot's label (slot 0's where unmatched)
    counts: Tensor        # [B] targets per image
    num_boxes: Tensor     # 0-d, `num_boxes_tensor`


def match_padded_layers(matcher: HungarianMatcher, caller: str, layers: Sequence[dict[str, Tensor]],
                        targets: "PaddedTargets") -> PaddedMatch:
    """Stack the layers' "pred_logits" / "pred_boxes" (each [B, Q, ...]) and match them all in one
    `matcher.match_padded` call; no host sync with a device solver. A NaN cost block is left to the losses
    (the trainer checks them), on every device."""
    logits = torch.stack([layer["pred_logits"] for layer in layers])
    boxes = torch.stack([layer["pred_boxes"] for layer in layers])
    num_layers, batch_size = logits.shape[:2]
    if targets.valid.shape[0] != batch_size or targets.labels.device != logits.device:
        raise ValueError(f"{caller}.forward_padded: targets for {targets.valid.shape[0]} images on "
                         f"{targets.labels.device}, predictions for {batch_size} on {logits.device}")
    col_for_row = matcher.match_padded(logits, boxes, targets, check_invalid=False)
    labels = targets.labels.expand(num_layers, *targets.labels.shape).gather(2, col_for_row.clamp(min=0))
    counts = targets.valid.sum(1)
    return PaddedMatch(logits, boxes, col_for_row, col_for_row >= 0, labels, counts,
                       num_boxes_tensor(counts.sum(), logits.device))


def padded_box_losses(boxes: Tensor, target_boxes: Tensor, col_for_row: Tensor, num_boxes: Tensor) -> dict[str, Tensor]:
    """Per layer "loss_bbox" and "loss_giou" [L] of the matched pairs, from a padded matching.

    boxes [L, B, Q, 4] cxcywh; target_boxes [B, T, 4] (the padded slots); col_for_row [L, B, Q] each query's
    slot or -1 (`HungarianMatcher.match_padded`); num_boxes 0-d.
    """
    num_layers, batch_size, num_queries, _ = boxes.shape
    slot = col_for_row.clamp(min=0)[..., None].expand(-1, -1, -1, 4)
    matched_boxes = target_boxes.expand(num_layers, *target_boxes.shape).gather(2, slot)  # [L, B, Q, 4]
    matched = col_for_row >= 0
    l1 = (boxes - matched_boxes).abs().sum(3)
    giou = generalized_box_iou_broadcast(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(matched_boxes))
    return {"loss_bbox": torch.where(matched, l1, 0).sum((1, 2)) / num_boxes,
            "loss_giou": torch.where(matched, 1 - giou, 0).sum((1, 2)) / num_boxes}


@torch.no_grad()
def padded_class_error(logits: Tensor, target_classes: Tensor, matched: Tensor) -> Tensor:
    """100 - top-1 accuracy (%) of the matched queries of one layer: logits [B, Q, C'], target_classes and
    matched [B, Q]; 100 when nothing is matched (`matched_class_error`'s, padded)."""
    correct = (logits.argmax(-1) == target_classes) & matched
    return 100 - correct.sum() * 100.0 / matched.sum().clamp(min=1)


@torch.no_grad()
def padded_cardinality_error(logits: Tensor, counts: Tensor) -> Tensor:
    """Per layer [L]: mean over images of |queries whose top class is not the last one - targets|;
    logits [L, B, Q, C'], counts [B]."""
    predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(2).float()  # [L, B]
    return (predicted - counts.float()).abs().mean(1)


def layer_losses_in_order(per_layer: dict[str, Tensor], class_error: Tensor | None,
                          extra: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """`forward`'s keys in its order from per-layer values (name -> [L]): the last layer's losses
    (class_error after loss_ce), then aux layer 0, 1, ..., then `extra` as given."""
    unbound = {name: values.unbind(0) for name, values in per_layer.items()}
    num_layers = len(next(iter(unbound.values()))) if unbound else 0
    losses: dict[str, Tensor] = {}
    for layer_index in [num_layers - 1, *range(num_layers - 1)] if num_layers else []:
        is_last = layer_index == num_layers - 1
        suffix = "" if is_last else f"_{layer_index}"
        for name, values in unbound.items():
            losses[name + suffix] = values[layer_index]
            if name == "loss_ce" and is_last and class_error is not None:
                losses["class_error"] = class_error
    losses.update(extra or {})
    return losses


class TargetCheck(nn.Module):
    """The target value check of SetCriterion and DeformableSetCriterion (module docstring): at once, or
    recorded on the device and read by `raise_if_bad_targets`.

    A subclass sets `num_classes` and `check_targets` and calls `_init_target_check()`;
    `replacement_label` is the label a bad one becomes on the recorded path (no-object for DETR).
    """

    num_classes: int
    check_targets: bool | None
    replacement_label: int

    def _init_target_check(self) -> None:
        # The recorded check: 0-d int64 on the device, -1 or the index (since the last check) of the first
        # forward with a bad target; None until a forward records one. The recent targets name it.
        self.target_status: Tensor | None = None
        self._forwards_since_check = 0
        self._recent_targets: deque[tuple[int, list[dict[str, Tensor]]]] = deque(maxlen=KEPT_TARGET_BATCHES)

    def _gather_targets(self, targets: Sequence[dict[str, Tensor]], logits: Tensor
                        ) -> tuple[Sequence[dict[str, Tensor]], list[int], Tensor, Tensor]:
        """(targets, per-image counts, every label [N] int64, every box [N, 4]) on the logits' device, shapes
        checked (metadata only: no sync) and values screened (`_screen_targets`)."""
        check_target_shapes(targets, logits.shape[0], self.num_classes, None)
        num_targets = [int(t["labels"].shape[0]) for t in targets]
        labels = torch.cat([t["labels"] for t in targets]).to(device=logits.device, dtype=torch.int64)
        boxes = torch.cat([t["boxes"] for t in targets]).to(logits.device)
        targets, labels, boxes = self._screen_targets(targets, labels, boxes, num_targets)
        return targets, num_targets, labels, boxes

    def _screen_targets(self, targets: Sequence[dict[str, Tensor]], labels: Tensor, boxes: Tensor,
                        num_targets: Sequence[int]) -> tuple[Sequence[dict[str, Tensor]], Tensor, Tensor]:
        """Check the target values: raise at once, or record the check and replace bad values (module docstring).

        labels [N] int64 and boxes [N, 4]: every target of the batch, on the logits' device.
        Returns (targets, labels, boxes): as given when checked at once, else with a bad label
        replaced by `replacement_label` and a bad box by (0.5, 0.5, 0.5, 0.5), all on the device.
        """
        bad_label = (labels < 0) | (labels >= self.num_classes)
        bad_box = ~torch.isfinite(boxes).all(1) | (boxes[:, 2:] < 0).any(1)
        bad = (bad_label | bad_box).any()
        at_once = self.check_targets if self.check_targets is not None else labels.device.type == "cpu"
        if at_once:
            # A CPU tensor is read through numpy (its memory, no op and no sync); elsewhere this is the sync.
            if bool(bad.numpy() if bad.device.type == "cpu" else bad.item()):
                raise BadTargetError(f"{type(self).__name__}: {describe_bad_targets(targets, self.num_classes)}")
            return targets, labels, boxes
        call = self._forwards_since_check
        self._forwards_since_check += 1
        self._recent_targets.append((call, [{key: target[key] for key in ("labels", "boxes", "image_id")
                                             if key in target} for target in targets]))
        if self.target_status is None or self.target_status.device != labels.device:
            self.target_status = torch.full((), -1, dtype=torch.int64, device=labels.device)
        self.target_status = torch.where(bad & (self.target_status < 0), call, self.target_status)
        labels = torch.where(bad_label, self.replacement_label, labels)
        boxes = torch.where(bad_box[:, None], 0.5, boxes)
        targets = [{**target, "labels": image_labels, "boxes": image_boxes} for target, image_labels, image_boxes
                   in zip(targets, labels.split(list(num_targets)), boxes.split(list(num_targets)))]
        return targets, labels, boxes

    def raise_if_bad_targets(self) -> None:
        """Read the recorded target check on the host (one sync on a GPU); raise BadTargetError if it failed.

        The error names the first forward since the previous call that had a bad target
        (`error.call`: its index among them) and, from its kept targets, the images and values.
        Each call starts a new period. Nothing recorded (checks at once, no forward): no read.
        """
        status, forwards, recent = self.target_status, self._forwards_since_check, dict(self._recent_targets)
        self.target_status, self._forwards_since_check = None, 0
        self._recent_targets.clear()
        if status is None:
            return
        first_bad = int(status)
        if first_bad < 0:
            return
        kept = recent.get(first_bad)
        detail = (describe_bad_targets(kept, self.num_classes) if kept is not None else
                  f"its targets are no longer kept (those of the last {KEPT_TARGET_BATCHES} forwards are)")
        raise BadTargetError(f"{type(self).__name__}: forward {first_bad + 1} of the {forwards} since the last check: "
                             f"{detail}", call=first_bad)


class SetCriterion(TargetCheck):
    """DETR's loss: match predictions to targets, then supervise matched pairs and the no-object class.

    num_classes: object classes, without no-object (the logits have num_classes + 1 entries).
    matcher: a HungarianMatcher (or any callable matcher(outputs, targets) -> indices).
    weight_dict: loss name -> weight, used by `total_loss` (kept for the training loop).
    eos_coef: weight of the no-object class in the cross entropy.
    losses: a subset of ("labels", "boxes", "cardinality").
    check_targets: when a bad target value raises `BadTargetError` (module docstring). None: at
        once for CPU tensors, recorded for any other device (`raise_if_bad_targets` reads it);
        True: always at once (a host sync per forward on a GPU: a debug option); False: always
        recorded (the device path, on any device).
    """

    def __init__(self, num_classes: int, matcher: nn.Module, weight_dict: dict[str, float], eos_coef: float,
                 losses: Sequence[str], check_targets: bool | None = None) -> None:
        super().__init__()
        unknown = [loss for loss in losses if loss not in LOSSES]
        if unknown:
            raise ValueError(f"SetCriterion: unknown loss(es) {unknown}; expected a subset of {LOSSES}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.eos_coef = eos_coef
        self.losses = list(losses)
        self.check_targets = check_targets
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)
        self._init_target_check()

    @property
    def replacement_label(self) -> int:
        return self.num_classes   # no-object

    def forward(self, outputs: dict[str, Any], targets: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Losses of the last layer and (with "aux_outputs") of every aux layer.

        outputs: "pred_logits" [B, Q, C+1], "pred_boxes" [B, Q, 4] normalised cxcywh,
            optionally "aux_outputs", a list of L-1 such dicts.
        targets: B dicts, "labels" [n_b] int64 in [0, C), "boxes" [n_b, 4] normalised cxcywh
            (other values: `BadTargetError`, at once or recorded, see `check_targets`).
        Returns a dict of 0-d tensors (module docstring); "class_error" and
        "cardinality_error*" carry no gradient.
        """
        logits = outputs["pred_logits"]
        device = logits.device
        targets, num_targets, target_labels, target_boxes = self._gather_targets(targets, logits)

        aux_outputs = list(outputs.get("aux_outputs", []))
        layers = [*aux_outputs, {k: v for k, v in outputs.items() if k != "aux_outputs"}]
        if hasattr(self.matcher, "match_layers"):
            per_layer = self.matcher.match_layers(outputs, targets)
        else:
            per_layer = [self.matcher(layer, targets) for layer in layers]

        num_boxes = num_boxes_tensor(sum(num_targets), device)
        target_counts = torch.tensor(num_targets, dtype=torch.float32).to(device)

        # the original's key order: the last layer's losses, then aux layer 0, 1, ...
        order = [len(layers) - 1, *range(len(layers) - 1)]
        offsets_cache: dict[tuple[int, ...], Tensor] = {}
        losses: dict[str, Tensor] = {}
        for layer_index in order:
            layer, is_last = layers[layer_index], layer_index == len(layers) - 1
            matched = _MatchedBatch(per_layer[layer_index], num_targets, layer["pred_logits"].shape[1], device,
                                    offsets_cache)
            layer_losses: dict[str, Tensor] = {}
            if "labels" in self.losses:
                layer_losses.update(self.loss_labels(layer["pred_logits"], target_labels, matched, log=is_last))
            if "boxes" in self.losses:
                layer_losses.update(self.loss_boxes(layer["pred_boxes"], target_boxes, matched, num_boxes))
            if "cardinality" in self.losses:
                layer_losses.update(self.loss_cardinality(layer["pred_logits"], target_counts))
            suffix = "" if is_last else f"_{layer_index}"
            losses.update({name + suffix: value for name, value in layer_losses.items()})
        return losses

    def forward_padded(self, outputs: dict[str, Any], targets: "PaddedTargets") -> dict[str, Tensor]:
        """`forward`'s losses, same keys, for targets padded to fixed slots: every layer in one batched computation.

        outputs: as `forward`'s; every layer must have the same [B, Q] shape.
        targets: a `fastdetr.padded.PaddedTargets` on the logits' device ([B, T] slots, T <= Q),
            whose values were checked where they were padded (`pad_targets`): only shapes are checked here.
        No shape depends on a value and nothing is read on the host (with the matcher's device
        solver): the losses of a CUDA-graph step. The numbers equal `forward`'s on the same
        targets (to float32 rounding: sums run in another order), when the matchings agree
        (an optimal matching is unique unless costs tie).
        """
        match = match_padded_layers(self.matcher, "SetCriterion", [*outputs.get("aux_outputs", []), outputs],
                                    targets)
        logits, matched, num_boxes = match.logits, match.matched, match.num_boxes
        per_layer: dict[str, Tensor] = {}  # loss name -> [L]
        if "labels" in self.losses:
            target_classes = torch.where(matched, match.labels, self.num_classes)  # [L, B, Q]
            log_prob = logits.log_softmax(-1).gather(3, target_classes[..., None]).squeeze(3)
            weight = self.empty_weight[target_classes]
            # F.cross_entropy's weighted mean, per layer
            per_layer["loss_ce"] = -(weight * log_prob).sum((1, 2)) / weight.sum((1, 2))
        if "boxes" in self.losses:
            per_layer.update(padded_box_losses(match.boxes, targets.boxes, match.col_for_row, num_boxes))
        class_error = None
        with torch.no_grad():
            if "labels" in self.losses:
                class_error = padded_class_error(logits[-1], target_classes[-1], matched[-1])
            if "cardinality" in self.losses:
                per_layer["cardinality_error"] = padded_cardinality_error(logits, match.counts)
        return layer_losses_in_order(per_layer, class_error)

    def loss_labels(self, logits: Tensor, target_labels: Tensor, matched: _MatchedBatch,
                    log: bool = True) -> dict[str, Tensor]:
        """Weighted cross entropy over C+1 classes; unmatched queries are trained towards no-object.

        logits [B, Q, C+1]; target_labels [N] (all targets of the batch).
        "class_error" (with `log`): 100 - top-1 accuracy (%) of the matched
        queries, 100 when nothing is matched, as the original.
        """
        batch_size, num_queries, _ = logits.shape
        flat_logits = logits.flatten(0, 1)  # [B*Q, C+1]
        matched_labels = target_labels[matched.target_index]
        target_classes = torch.full((batch_size * num_queries,), self.num_classes, dtype=torch.int64,
                                    device=logits.device)
        target_classes[matched.query_index] = matched_labels
        losses = {"loss_ce": F.cross_entropy(flat_logits, target_classes, self.empty_weight)}
        if log:
            losses["class_error"] = matched_class_error(flat_logits, matched_labels, matched)
        return losses

    def loss_boxes(self, pred_boxes: Tensor, target_boxes: Tensor, matched: _MatchedBatch,
                   num_boxes: Tensor) -> dict[str, Tensor]:
        """L1 and 1 - GIoU of the matched (prediction, target) cxcywh pairs, summed and divided by num_boxes.

        pred_boxes [B, Q, 4]; target_boxes [N, 4] (all targets of the batch); num_boxes 0-d.
        """
        return matched_box_losses(pred_boxes, target_boxes, matched, num_boxes)

    @torch.no_grad()
    def loss_cardinality(self, logits: Tensor, target_counts: Tensor) -> dict[str, Tensor]:
        """Mean |number of queries not predicting no-object - number of targets| per image (logged only).

        logits [B, Q, C+1]; target_counts [B] float.
        """
        predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(predicted.float(), target_counts)}


def build_criterion(config: DETRConfig, *, cost_class: float = 1, cost_bbox: float = 5, cost_giou: float = 2,
                    bbox_loss_coef: float = 5, giou_loss_coef: float = 2, eos_coef: float = 0.1,
                    backend: str | Solver = "auto", check_targets: bool | None = None) -> SetCriterion:
    """DETR's criterion for `config` (its num_classes, dec_layers, aux_loss), with DETR's default weights.

    weight_dict: {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2}, and with
    config.aux_loss the same for "_0" ... "_{dec_layers-2}"; no-object
    weight 0.1; losses labels, boxes, cardinality; matcher costs 1 / 5 / 2.
    check_targets: SetCriterion's (None: at once for CPU tensors, recorded on a device).
    """
    matcher = HungarianMatcher(cost_class=cost_class, cost_bbox=cost_bbox, cost_giou=cost_giou, backend=backend)
    base = {"loss_ce": 1.0, "loss_bbox": bbox_loss_coef, "loss_giou": giou_loss_coef}
    weight_dict = dict(base)
    if config.aux_loss:
        weight_dict.update({f"{k}_{i}": v for i in range(config.dec_layers - 1) for k, v in base.items()})
    return SetCriterion(config.num_classes, matcher, weight_dict, eos_coef, list(LOSSES), check_targets)
