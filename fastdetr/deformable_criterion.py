"""Deformable DETR's set loss: sigmoid focal classification, L1 and GIoU on matched pairs, aux and encoder losses.

The same keys and numbers as fundamentalvision/Deformable-DETR's SetCriterion and HungarianMatcher
(models/deformable_detr.py, models/matcher.py) for the same inputs: "loss_ce", "class_error" (logged),
"loss_bbox", "loss_giou", "cardinality_error" (logged); for each aux decoder layer i the same with
suffix "_i" (no class_error); for two-stage the encoder proposals' with suffix "_enc", matched and
supervised as one class (every target label 0). The logits have num_classes entries, no no-object
class: unmatched queries are trained towards all-zero one-hot targets.

How it differs from the official, as fastdetr's SetCriterion differs from DETR's:
- No host sync: num_boxes is a 0-d tensor (all-reduced when distributed, clamped at 1); every other
  count is a shape. The only sync left is the scipy solver's copy of the cost: one for all decoder
  layers together (`match_layers`) and one for the encoder proposals (a different number of
  queries, so a separate problem batch); none with a device solver.
- The matching cost is computed per image block (`focal_matching_cost_ref`), the solver is
  HungarianMatcher's (scipy, the Triton assignment kernel, auto). The fused cost kernel computes
  the softmax form only, so this matcher's cost always runs in PyTorch.
- The one-hot targets are built over num_classes directly (the official builds num_classes + 1
  columns and drops the last): the same values.
- "cardinality_error" is the official's, carried over from DETR unchanged: it counts the queries whose
  top class is not the last class (num_classes - 1), although there is no no-object class here.
  Logged only, kept for comparable logs.
- `build_deformable_criterion`'s weight_dict is the official's; it also weights the "_enc" losses
  for a two-stage model without aux loss (the official then computes them with no weight).
- Target values are checked as fastdetr's SetCriterion checks them (`fastdetr.criterion`'s docstring): a
  label outside [0, num_classes) (the official fails in its one-hot scatter) or a box not finite or of
  negative size is a `BadTargetError` naming the image, at once for CPU tensors, recorded on the device
  otherwise (a bad label then becomes class 0, a bad box a centred one, until the trainer reads the check).
- `forward_padded`: the losses for targets padded to fixed slots (static shapes, CUDA graphs), every decoder
  layer in one batched computation and one matcher call, no host sync with a device solver.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou_broadcast
from .criterion import (
    PaddedMatch,
    TargetCheck,
    _MatchedBatch,
    layer_losses_in_order,
    match_padded_layers,
    matched_box_losses,
    matched_class_error,
    num_boxes_tensor,
    padded_box_losses,
    padded_cardinality_error,
    padded_class_error,
)
from .deformable_config import DeformableDETRConfig
from .matcher import HungarianMatcher, Indices, Solver, check_targets

if TYPE_CHECKING:
    from .padded import PaddedTargets

LOSSES = ("labels", "boxes", "cardinality")
FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = FOCAL_ALPHA,
                       gamma: float = FOCAL_GAMMA) -> Tensor:
    """RetinaNet's focal loss of every element, unreduced: alpha_t * (1 - p_t)^gamma * BCE(logits, targets).

    logits and targets (0/1) of one shape; alpha < 0 turns the alpha weighting off. Returns that shape.
    """
    prob = logits.sigmoid()
    ce_loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def focal_matching_cost_ref(logits: Tensor, boxes: Tensor, target_labels: Tensor, target_boxes: Tensor,
                            weight_class: float = 2, weight_bbox: float = 5, weight_giou: float = 2,
                            alpha: float = FOCAL_ALPHA, gamma: float = FOCAL_GAMMA) -> Tensor:
    """The focal matching cost of every problem's (query, target) block, in float32.

    logits [P, Q, C] sigmoid logits, boxes [P, Q, 4] normalised cxcywh, P = layers x B (problem p is
    image p % B); target_labels [B, T], target_boxes [B, T, 4] cxcywh, padded to the batch's most
    targets T. Returns [P, Q, T]: weight_bbox * L1 + weight_class * (pos - neg) - weight_giou * GIoU,
    with p the target class's probability, pos = alpha (1-p)^gamma (-log(p + 1e-8)) and
    neg = (1-alpha) p^gamma (-log(1-p + 1e-8)): the official's terms in its order, elementwise.
    """
    repeats = logits.shape[0] // target_labels.shape[0]
    labels = target_labels.long().repeat(repeats, 1)
    targets = target_boxes.float().repeat(repeats, 1, 1)
    boxes = boxes.float()
    # the target classes' probabilities first: [P, Q, T] rather than the [P, Q, C] of every class
    prob = logits.float().sigmoid().gather(2, labels[:, None, :].expand(-1, logits.shape[1], -1))
    neg = (1 - alpha) * (prob ** gamma) * (-(1 - prob + 1e-8).log())
    pos = alpha * ((1 - prob) ** gamma) * (-(prob + 1e-8).log())
    l1 = torch.cdist(boxes, targets, p=1)
    giou = generalized_box_iou_broadcast(box_cxcywh_to_xyxy(boxes)[:, :, None, :],
                                         box_cxcywh_to_xyxy(targets)[:, None, :, :])
    return weight_bbox * l1 + weight_class * (pos - neg) + weight_giou * -giou


class FocalHungarianMatcher(HungarianMatcher):
    """HungarianMatcher with Deformable DETR's focal class cost, for logits [B, Q, C] without no-object.

    cost_class, cost_bbox, cost_giou: weights of the focal class cost, the cxcywh L1 distance and -GIoU
        (the official defaults 2 / 5 / 2). focal_alpha, focal_gamma: the cost's focal parameters.
    backend: the solver only ("auto" | "scipy" | "triton" | a solver callable, as HungarianMatcher's);
        the cost always runs in PyTorch (`focal_matching_cost_ref`).
    validate_targets: also check target values, labels in [0, C) (a host sync).
    `match_layers` / `forward` as HungarianMatcher's: every layer in one cost pass and one solver call.
    """

    def __init__(self, cost_class: float = 2, cost_bbox: float = 5, cost_giou: float = 2,
                 focal_alpha: float = FOCAL_ALPHA, focal_gamma: float = FOCAL_GAMMA,
                 backend: str | Solver = "auto", validate_targets: bool = False,
                 check_invalid: bool | None = None) -> None:
        # the parent checks values against C - 1 classes (its logits carry no-object): checked here instead
        super().__init__(cost_class, cost_bbox, cost_giou, backend, validate_targets=False,
                         check_invalid=check_invalid)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.validate_focal_targets = validate_targets
        self.fused_cost = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, focal_alpha={self.focal_alpha}, focal_gamma={self.focal_gamma}"

    @torch.no_grad()
    def match_layers(self, outputs: dict[str, Any], targets: Sequence[dict[str, Tensor]]) -> list[Indices]:
        """HungarianMatcher.match_layers for logits [B, Q, C] (labels in [0, C)); "enc_outputs" is ignored."""
        if self.validate_focal_targets:
            logits = outputs["pred_logits"]
            check_targets(targets, logits.shape[0], logits.shape[-1], logits.device, validate_values=True)
        return super().match_layers(outputs, targets)

    def padded_cost(self, logits: Tensor, boxes: Tensor, target_labels: Tensor, target_boxes: Tensor) -> Tensor:
        """The focal matching cost [P, Q, T] against padded targets (`HungarianMatcher.padded_cost`), in PyTorch."""
        return focal_matching_cost_ref(logits, boxes, target_labels, target_boxes, self.cost_class, self.cost_bbox,
                                       self.cost_giou, self.focal_alpha, self.focal_gamma)


class DeformableSetCriterion(TargetCheck):
    """Deformable DETR's loss: focal classification over num_classes sigmoids, L1 and GIoU on matched pairs.

    num_classes: object classes (the logits have num_classes entries, no no-object class).
    matcher: a FocalHungarianMatcher (or any callable matcher(outputs, targets) -> indices).
    weight_dict: loss name -> weight, for `fastdetr.criterion.total_loss`.
    losses: a subset of ("labels", "boxes", "cardinality").
    focal_alpha, focal_gamma: the focal loss's (official 0.25 and 2).
    check_targets: when a bad target value raises `BadTargetError`, as SetCriterion's (None: at once for CPU
        tensors, recorded on a device and read by `raise_if_bad_targets`).
    """

    replacement_label = 0   # the recorded check's stand-in for a bad label (there is no no-object class)

    def __init__(self, num_classes: int, matcher: nn.Module, weight_dict: dict[str, float],
                 losses: Sequence[str] = LOSSES, focal_alpha: float = FOCAL_ALPHA,
                 focal_gamma: float = FOCAL_GAMMA, check_targets: bool | None = None) -> None:
        super().__init__()
        unknown = [loss for loss in losses if loss not in LOSSES]
        if unknown:
            raise ValueError(f"DeformableSetCriterion: unknown loss(es) {unknown}; expected a subset of {LOSSES}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.losses = list(losses)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.check_targets = check_targets
        self._init_target_check()

    def forward(self, outputs: dict[str, Any], targets: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Losses of the last layer, every aux layer ("aux_outputs") and the encoder proposals ("enc_outputs").

        outputs: "pred_logits" [B, Q, C], "pred_boxes" [B, Q, 4] normalised cxcywh, optionally
            "aux_outputs" (L-1 such dicts) and "enc_outputs" (one, [B, S, C] and [B, S, 4]).
        targets: B dicts, "labels" [n_b] int64 in [0, C), "boxes" [n_b, 4] normalised cxcywh.
        Returns 0-d tensors in the official's key order (last layer, aux 0, 1, ..., enc);
        "class_error" and "cardinality_error*" carry no gradient.
        """
        logits = outputs["pred_logits"]
        device = logits.device
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"DeformableSetCriterion: pred_logits has {logits.shape[-1]} classes, "
                             f"expected num_classes = {self.num_classes}")
        targets, num_targets, target_labels, target_boxes = self._gather_targets(targets, logits)

        aux_outputs = list(outputs.get("aux_outputs", []))
        last = {k: v for k, v in outputs.items() if k not in ("aux_outputs", "enc_outputs")}
        layers = [*aux_outputs, last]
        if hasattr(self.matcher, "match_layers"):
            per_layer = self.matcher.match_layers({**last, "aux_outputs": aux_outputs}, targets)
        else:
            per_layer = [self.matcher(layer, targets) for layer in layers]

        num_boxes = num_boxes_tensor(sum(num_targets), device)
        target_counts = torch.tensor(num_targets, dtype=torch.float32).to(device)
        offsets_cache: dict[tuple[int, ...], Tensor] = {}
        losses: dict[str, Tensor] = {}
        for layer_index in [len(layers) - 1, *range(len(layers) - 1)]:
            is_last = layer_index == len(layers) - 1
            suffix = "" if is_last else f"_{layer_index}"
            losses.update(self._layer_losses(layers[layer_index], per_layer[layer_index], target_labels,
                                             target_boxes, num_targets, target_counts, num_boxes, offsets_cache,
                                             is_last, suffix))
        if "enc_outputs" in outputs:
            # the proposals are scored class-agnostically: matched and supervised as class 0
            enc = outputs["enc_outputs"]
            binary = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            enc_indices = self.matcher(enc, binary)
            losses.update(self._layer_losses(enc, enc_indices, torch.zeros_like(target_labels), target_boxes,
                                             num_targets, target_counts, num_boxes, offsets_cache, False, "_enc"))
        return losses

    def forward_padded(self, outputs: dict[str, Any], targets: "PaddedTargets") -> dict[str, Tensor]:
        """`forward`'s losses, same keys and order, for targets padded to fixed slots
        (`fastdetr.padded.PaddedTargets` on the logits' device, values checked where they were padded): every
        decoder layer matched in one `match_padded` call and its losses computed in one batched pass, the
        encoder proposals in one more. No shape depends on a value; no host sync with a device solver.
        Equal to `forward` on the same targets to float32 rounding when the matchings agree."""
        last = {k: v for k, v in outputs.items() if k not in ("aux_outputs", "enc_outputs")}
        match = match_padded_layers(self.matcher, type(self).__name__, [*outputs.get("aux_outputs", []), last],
                                    targets)
        per_layer, class_error = self._padded_losses(match, targets, log=True)
        extra: dict[str, Tensor] = {}
        if "enc_outputs" in outputs:
            binary = type(targets)(torch.zeros_like(targets.labels), targets.boxes, targets.valid)
            enc = match_padded_layers(self.matcher, type(self).__name__, [outputs["enc_outputs"]], binary)
            enc_losses, _ = self._padded_losses(enc, binary, log=False)
            extra = {name + "_enc": values[0] for name, values in enc_losses.items()}
        return layer_losses_in_order(per_layer, class_error, extra)

    def _padded_losses(self, match: PaddedMatch, targets: "PaddedTargets",
                       log: bool) -> tuple[dict[str, Tensor], Tensor | None]:
        """Per-layer losses ([L] each) of a padded matching, and the last layer's class_error (with `log`)."""
        logits, matched, num_boxes = match.logits, match.matched, match.num_boxes
        per_layer: dict[str, Tensor] = {}
        class_error = None
        if "labels" in self.losses:
            # a comparison, not F.one_hot (which reads the labels' range on the host for CPU tensors)
            classes = torch.arange(logits.shape[-1], device=logits.device)
            onehot = ((match.labels[..., None] == classes) & matched[..., None]).to(logits.dtype)
            focal = sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma)
            per_layer["loss_ce"] = focal.sum((1, 2, 3)) / num_boxes   # the official's mean over Q, sum, * Q
            if log:
                class_error = padded_class_error(logits[-1], match.labels[-1], matched[-1])
        if "boxes" in self.losses:
            per_layer.update(padded_box_losses(match.boxes, targets.boxes, match.col_for_row, num_boxes))
        if "cardinality" in self.losses:
            per_layer["cardinality_error"] = padded_cardinality_error(logits, match.counts)
        return per_layer, class_error

    def _layer_losses(self, layer: dict[str, Tensor], indices: Indices, target_labels: Tensor, target_boxes: Tensor,
                      num_targets: Sequence[int], target_counts: Tensor, num_boxes: Tensor,
                      offsets_cache: dict[tuple[int, ...], Tensor], log: bool, suffix: str) -> dict[str, Tensor]:
        matched = _MatchedBatch(indices, num_targets, layer["pred_logits"].shape[1], layer["pred_logits"].device,
                                offsets_cache)
        layer_losses: dict[str, Tensor] = {}
        if "labels" in self.losses:
            layer_losses.update(self.loss_labels(layer["pred_logits"], target_labels, matched, num_boxes, log=log))
        if "boxes" in self.losses:
            layer_losses.update(self.loss_boxes(layer["pred_boxes"], target_boxes, matched, num_boxes))
        if "cardinality" in self.losses:
            layer_losses.update(self.loss_cardinality(layer["pred_logits"], target_counts))
        return {name + suffix: value for name, value in layer_losses.items()}

    def loss_labels(self, logits: Tensor, target_labels: Tensor, matched: _MatchedBatch, num_boxes: Tensor,
                    log: bool = True) -> dict[str, Tensor]:
        """Sigmoid focal loss on one-hot targets (all zero for unmatched queries), summed, divided by num_boxes.

        logits [B, Q, C]; target_labels [N] (all targets of the batch). The official's reduction:
        mean over queries, sum, / num_boxes, * Q. "class_error" (with `log`): 100 - top-1 accuracy (%)
        of the matched queries, 100 when nothing is matched.
        """
        batch_size, num_queries, num_classes = logits.shape
        matched_labels = target_labels[matched.target_index]
        onehot = torch.zeros((batch_size * num_queries, num_classes), dtype=logits.dtype, device=logits.device)
        onehot[matched.query_index, matched_labels] = 1
        focal = sigmoid_focal_loss(logits, onehot.view(batch_size, num_queries, num_classes), self.focal_alpha,
                                   self.focal_gamma)
        losses = {"loss_ce": focal.mean(1).sum() / num_boxes * num_queries}
        if log:
            losses["class_error"] = matched_class_error(logits.flatten(0, 1), matched_labels, matched)
        return losses

    def loss_boxes(self, pred_boxes: Tensor, target_boxes: Tensor, matched: _MatchedBatch,
                   num_boxes: Tensor) -> dict[str, Tensor]:
        """L1 and 1 - GIoU of the matched cxcywh pairs, summed and divided by num_boxes (DETR's)."""
        return matched_box_losses(pred_boxes, target_boxes, matched, num_boxes)

    @torch.no_grad()
    def loss_cardinality(self, logits: Tensor, target_counts: Tensor) -> dict[str, Tensor]:
        """Mean |queries whose top class is not the last one - targets| per image, as the official (logged only).

        logits [B, Q, C]; target_counts [B] float. See the module docstring on its meaning.
        """
        predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(predicted.float(), target_counts)}


def build_deformable_criterion(config: DeformableDETRConfig, *, cost_class: float = 2, cost_bbox: float = 5,
                               cost_giou: float = 2, cls_loss_coef: float = 2, bbox_loss_coef: float = 5,
                               giou_loss_coef: float = 2, focal_alpha: float = FOCAL_ALPHA,
                               backend: str | Solver = "auto", check_targets: bool | None = None
                               ) -> DeformableSetCriterion:
    """Deformable DETR's criterion for `config` (num_classes, dec_layers, aux_loss, two_stage), official defaults.

    weight_dict: {"loss_ce": 2, "loss_bbox": 5, "loss_giou": 2}; with config.aux_loss the same for
    "_0" ... "_{dec_layers-2}" and "_enc" (as the official, also without two-stage); for two-stage
    always "_enc". Matcher costs 2 / 5 / 2 (focal class cost), losses labels, boxes, cardinality.
    check_targets: DeformableSetCriterion's.
    """
    matcher = FocalHungarianMatcher(cost_class=cost_class, cost_bbox=cost_bbox, cost_giou=cost_giou,
                                    focal_alpha=focal_alpha, backend=backend)
    base = {"loss_ce": cls_loss_coef, "loss_bbox": bbox_loss_coef, "loss_giou": giou_loss_coef}
    weight_dict = dict(base)
    suffixes = [f"_{i}" for i in range(config.dec_layers - 1)] if config.aux_loss else []
    if config.aux_loss or config.two_stage:
        suffixes.append("_enc")
    weight_dict.update({k + suffix: v for suffix in suffixes for k, v in base.items()})
    return DeformableSetCriterion(config.num_classes, matcher, weight_dict, LOSSES, focal_alpha,
                                  check_targets=check_targets)
