"""HungarianMatcher: one-to-one assignment of predictions to targets, with a pluggable solver.

The same cost and result as the original DETR matcher (models/matcher.py):
cost = cost_bbox * L1(cxcywh) - cost_class * softmax probability of the
target class - cost_giou * GIoU(xyxy), solved per image by a minimum-cost
linear assignment; the result is one (pred_idx, tgt_idx) int64 pair of
tensors per image, sorted by pred_idx, min(num_queries, num_targets) long.

How it differs from the original:
- Cost blocks are computed per image, never as the original's
  (B*Q) x (all targets) matrix of which all but the diagonal blocks are thrown
  away (that matrix, not the solver, dominates at DINO's sizes). Targets are
  padded to T_max = the most targets of any image and every image's
  (Q, T_max) block is computed in one batched pass over a (P, Q, T_max)
  tensor; the padding columns are never solved. One batched pass rather than
  a Python loop over images: ~30 ops per call instead of ~30 per image and
  layer (a GPU step is bound by launches), and it is the layout a batched GPU
  solver takes. The values are the same elementwise float32 operations as the
  original's, so the cost entries agree bit for bit.
- `match_layers` matches the final layer and every aux layer in one cost pass
  and one solver call (the original reruns the matcher per decoder layer).
- The solver is chosen by `backend` (the seam for the batched GPU solver): a
  solver takes the padded cost (P, Q, T_max) and the P target counts, and
  returns P (pred_idx, tgt_idx) pairs on the cost's device.
    "scipy": scipy's `linear_sum_assignment` image by image, on the host. Host
        syncs: exactly one device-to-host copy of the padded cost per solver
        call -- one per `forward` and one per `match_layers` (the original
        makes one per decoder layer); none for CPU tensors.
    "triton": the cost blocks by one fused kernel (`fastdetr.kernels.matching_cost`:
        float32 rounding, not bit for bit), then `fastdetr.kernels.assignment`'s
        kernel, every problem of every layer in one launch on the padded cost,
        results left on the device: no
        host sync at all (imported when the matcher is built; a clear error if
        it cannot be). A NaN block cannot raise without a sync: it is recorded
        in `matcher.solver.last_status` and shows up as a NaN loss (see `_triton_solver`).
    "auto": "triton" for CUDA tensors (when Triton imports), "scipy" otherwise,
        decided per call from the logits' device (`fastdetr.nn.functional.matcher_kernels`,
        where fastdetr decides every kernel-or-reference question).
    a callable with the solver signature above (tests inject one).
- The returned indices live on the logits' device (the original returns CPU
  tensors), so the criterion gathers with them without a copy.
- Target checks (`validate_targets`): shapes, dtypes and devices are always
  checked (metadata only, free). Value checks -- label range, degenerate or
  non-finite boxes -- read the tensors on the host, so they are off by
  default: in training, `fastdetr.data` validates every box when it loads it,
  and the GPU hot path stays sync-free. Turn them on for targets of unknown
  origin. A NaN that slips through still never passes silently: scipy rejects
  a cost block with NaN, and this matcher re-raises naming the image.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou_broadcast, validate_boxes
from .nn import functional

if TYPE_CHECKING:
    from .padded import PaddedTargets

# (cost [P, Q, T_max] float32, num_targets: P ints) -> P (pred_idx, tgt_idx) int64 pairs on cost's device
Solver = Callable[[Tensor, Sequence[int]], list[tuple[Tensor, Tensor]]]
Indices = list[tuple[Tensor, Tensor]]

BACKENDS = ("auto", "scipy", "triton")

# Padding for images with fewer than T_max targets: a valid box, so the padded
# cost columns stay finite (they are never solved).
_PAD_BOX = 0.5


def matching_cost_ref(logits: Tensor, boxes: Tensor, target_labels: Tensor, target_boxes: Tensor,
                      weight_class: float = 1, weight_bbox: float = 5, weight_giou: float = 2) -> Tensor:
    """The matching cost of every problem's (query, target) block, in float32: the plain-PyTorch definition.

    logits [P, Q, C+1], boxes [P, Q, 4] normalised cxcywh, P = layers x B
    (problem p is image p % B); target_labels [B, T] and target_boxes [B, T, 4]
    cxcywh, padded to the batch's most targets T. Returns [P, Q, T]:
    weight_bbox * L1 - weight_class * softmax probability of the target class
    - weight_giou * GIoU, the original's terms in the original's order, so the
    entries agree with its matrix bit for bit. What the matcher runs off the
    kernel path, and the oracle `fastdetr.kernels.matching_cost` is tested against.
    """
    repeats = logits.shape[0] // target_labels.shape[0]
    labels = target_labels.long().repeat(repeats, 1)
    targets = target_boxes.float().repeat(repeats, 1, 1)
    logits, boxes = logits.float(), boxes.float()
    prob_class = logits.softmax(-1).gather(2, labels[:, None, :].expand(-1, logits.shape[1], -1))
    l1 = torch.cdist(boxes, targets, p=1)
    giou = generalized_box_iou_broadcast(box_cxcywh_to_xyxy(boxes)[:, :, None, :],
                                         box_cxcywh_to_xyxy(targets)[:, None, :, :])
    return weight_bbox * l1 + weight_class * -prob_class + weight_giou * -giou


def check_targets(targets: Sequence[dict[str, Tensor]], batch_size: int, num_classes: int,
                  device: torch.device | None, validate_values: bool = False) -> None:
    """Check a batch of targets against predictions with `num_classes` + 1 logits on `device`.

    Always (tensor metadata only, no host sync): one dict per image with
    "labels" (n,) of an integer dtype and "boxes" (n, 4) floating point, on
    `device` (any device when it is None). With `validate_values` (reads the values: a host sync on a GPU):
    labels in [0, num_classes) and no non-finite or negative-size cxcywh box.
    Raises ValueError naming the image.
    """
    if len(targets) != batch_size:
        raise ValueError(f"targets: expected {batch_size} dicts (one per image), got {len(targets)}")
    for b, target in enumerate(targets):
        if not isinstance(target, dict) or "labels" not in target or "boxes" not in target:
            raise ValueError(f"targets[{b}]: expected a dict with 'labels' and 'boxes'")
        labels, boxes = target["labels"], target["boxes"]
        if labels.dim() != 1 or labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"targets[{b}]['labels']: expected an (n,) integer tensor, got "
                             f"{labels.dtype} of shape {tuple(labels.shape)}")
        if boxes.dim() != 2 or boxes.shape[1] != 4 or not boxes.is_floating_point():
            raise ValueError(f"targets[{b}]['boxes']: expected an (n, 4) floating point tensor, got "
                             f"{boxes.dtype} of shape {tuple(boxes.shape)}")
        if boxes.shape[0] != labels.shape[0]:
            raise ValueError(f"targets[{b}]: {labels.shape[0]} labels but {boxes.shape[0]} boxes")
        if device is not None and (labels.device != device or boxes.device != device):
            raise ValueError(f"targets[{b}]: labels on {labels.device} and boxes on {boxes.device}, "
                             f"but the predictions are on {device}")
        if validate_values and labels.numel():
            low, high = int(labels.min()), int(labels.max())
            if low < 0 or high >= num_classes:
                raise ValueError(f"targets[{b}]['labels']: labels must lie in [0, {num_classes}) "
                                 f"({num_classes} is no-object), got values in [{low}, {high}]")
        if validate_values:
            validate_boxes(boxes, f"targets[{b}]['boxes']", fmt="cxcywh")


def scipy_solver(cost: Tensor, num_targets: Sequence[int]) -> Indices:
    """scipy's `linear_sum_assignment` on each block cost[p, :, :num_targets[p]].

    cost: [P, Q, T_max]. One device-to-host copy of the whole padded cost (the
    only host sync; none for CPU tensors). Returns P (pred_idx, tgt_idx) int64
    pairs on cost's device, pred_idx ascending. Raises ValueError naming the
    block when one holds NaN or -inf.
    """
    from scipy.optimize import linear_sum_assignment  # here: importing scipy.optimize takes ~1 s

    host = cost.detach().cpu().numpy()
    indices = []
    for p, n in enumerate(num_targets):
        try:
            rows, cols = linear_sum_assignment(host[p, :, :n])
        except ValueError as error:
            raise ValueError(f"HungarianMatcher: the cost block of problem {p} (Q x {n}) is invalid "
                             f"(NaN or -inf: non-finite predictions or targets?): {error}") from error
        indices.append((torch.from_numpy(rows.astype(np.int64)).to(cost.device),
                        torch.from_numpy(cols.astype(np.int64)).to(cost.device)))
    return indices


def _triton_solver(check_invalid: bool | None = None) -> Solver:
    functional.require_assignment_kernel("HungarianMatcher(backend='triton')", "Use backend='scipy' or 'auto'.")

    def solve(cost: Tensor, num_targets: Sequence[int]) -> Indices:
        """Every problem in one launch of the assignment kernel, on the padded cost itself; no host sync.

        The kernel reports a NaN block in its status tensor instead of raising
        (reading it would sync): a failed problem gets the diagonal pairs
        (k, k), always valid indices, and its NaN reaches the loss, which the
        trainer checks (NonFiniteLossError). `solve.last_status` keeps the
        [P] status of the last call. `check_invalid` (HungarianMatcher's
        argument): True reads the status at once and raises ValueError naming
        the problem (a host sync on a GPU: a debug option); None (default)
        does so only for CPU tensors, where it costs no sync; False never.
        Problems wider than the kernel's column block are solved by scipy.
        """
        solved = functional.assignment(cost, num_targets)
        if solved is None:
            return scipy_solver(cost, num_targets)
        indices, status = solved
        solve.last_status = status
        if check_invalid or (check_invalid is None and not cost.is_cuda):
            failed = functional.failed_problems(status)
            if failed:
                raise ValueError(f"HungarianMatcher: the cost block of problem {failed[0]} is invalid "
                                 "(NaN or -inf: non-finite predictions or targets?)")
        return indices

    solve.last_status = None
    return solve


def _auto_solver(check_invalid: bool | None = None) -> Solver:
    """The "triton" solver where `functional.matcher_kernels` says so (CUDA costs; built on first use), else scipy."""
    device_solver: list[Solver] = []

    def solve(cost: Tensor, num_targets: Sequence[int]) -> Indices:
        if not functional.matcher_kernels(cost, "auto"):
            return scipy_solver(cost, num_targets)
        if not device_solver:
            device_solver.append(_triton_solver(check_invalid))
        return device_solver[0](cost, num_targets)

    return solve


def resolve_solver(backend: str | Solver, check_invalid: bool | None = None) -> Solver:
    """The solver for `backend` ("auto", "scipy", "triton" or a solver callable)."""
    if callable(backend):
        return backend
    if backend == "auto":
        return _auto_solver(check_invalid)
    if backend == "scipy":
        return scipy_solver
    if backend == "triton":
        return _triton_solver(check_invalid)
    raise ValueError(f"HungarianMatcher: unknown backend {backend!r}; expected one of {BACKENDS} or a callable")


class HungarianMatcher(nn.Module):
    """Optimal one-to-one matching of the Q predictions of each image to its n targets.

    cost_class, cost_bbox, cost_giou: weights of -softmax probability of the
        target class, L1 distance of cxcywh boxes and -GIoU in the matching cost.
    backend: "auto" | "scipy" | "triton" | a solver callable (module docstring).
    validate_targets: also check target values (a host sync; see module docstring).
    check_invalid: the "triton" backend's NaN check: None checks where it costs no
        sync (CPU tensors), True always (a host sync on a GPU), False never (`_triton_solver`).
    """

    def __init__(self, cost_class: float = 1, cost_bbox: float = 5, cost_giou: float = 2,
                 backend: str | Solver = "auto", validate_targets: bool = False,
                 check_invalid: bool | None = None) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: cost_class, cost_bbox and cost_giou cannot all be 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.backend = backend if isinstance(backend, str) else getattr(backend, "__name__", "custom")
        self.solver = resolve_solver(backend, check_invalid)
        # where the cost blocks come from: `functional.matcher_kernels` (the fused kernel with "triton", and
        # with "auto" for CUDA tensors), else `matching_cost_ref`
        self.fused_cost = backend == "triton"
        self.validate_targets = validate_targets
        self.check_invalid = check_invalid

    def extra_repr(self) -> str:
        return (f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}, "
                f"backend={self.backend!r}")

    @torch.no_grad()
    def forward(self, outputs: dict[str, Any], targets: Sequence[dict[str, Tensor]]) -> Indices:
        """Match one layer's predictions.

        outputs: "pred_logits" [B, Q, C+1], "pred_boxes" [B, Q, 4] normalised cxcywh
            (other keys, such as "aux_outputs", are ignored).
        targets: B dicts, "labels" [n_b] int64 in [0, C), "boxes" [n_b, 4] normalised cxcywh.
        Returns B (pred_idx, tgt_idx) int64 pairs on the logits' device, min(Q, n_b)
        long, sorted by pred_idx.
        """
        return self.match_layers({"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]},
                                 targets)[0]

    @torch.no_grad()
    def match_layers(self, outputs: dict[str, Any], targets: Sequence[dict[str, Tensor]]) -> list[Indices]:
        """Match every decoder layer at once: one cost pass and one solver call for all of them.

        outputs: the model's output, "pred_logits" [B, Q, C+1] and "pred_boxes" [B, Q, 4]
            of the last layer, optionally "aux_outputs", a list of L-1 such dicts.
        Returns L per-layer results (each as `forward` returns), in decoder order:
        aux_outputs[0], ..., aux_outputs[L-2], then the last layer.
        """
        layers = [*outputs.get("aux_outputs", []), outputs]
        logits = [layer["pred_logits"] for layer in layers]
        boxes = [layer["pred_boxes"] for layer in layers]
        shapes = {(tuple(lg.shape), tuple(bx.shape)) for lg, bx in zip(logits, boxes)}
        if len(shapes) > 1:  # layers of different sizes cannot share a batch: match them one by one
            return [self.match_layers(layer, targets)[0] for layer in layers]
        (logits_shape, boxes_shape), = shapes
        if len(logits_shape) != 3 or boxes_shape != (*logits_shape[:2], 4):
            raise ValueError(f"HungarianMatcher: expected pred_logits [B, Q, C+1] and pred_boxes [B, Q, 4], "
                             f"got {list(logits_shape)} and {list(boxes_shape)}")
        batch_size, num_queries, num_logits = logits_shape
        device = logits[0].device
        check_targets(targets, batch_size, num_logits - 1, device, self.validate_targets)
        num_targets = [int(t["labels"].shape[0]) for t in targets]
        num_layers = len(layers)
        if max(num_targets, default=0) == 0:
            empty = torch.empty(0, dtype=torch.int64, device=device)
            return [[(empty, empty) for _ in targets] for _ in layers]

        # [L*B, Q, C+1] and [L*B, Q, 4]: every image of every layer is one problem
        logits = torch.stack(logits).flatten(0, 1).float() if num_layers > 1 else logits[0].float()
        boxes = torch.stack(boxes).flatten(0, 1).float() if num_layers > 1 else boxes[0].float()
        cost = self.cost_blocks(logits, boxes, targets, num_layers)
        flat = self.solver(cost, num_targets * num_layers)
        return [flat[k * batch_size:(k + 1) * batch_size] for k in range(num_layers)]

    def cost_blocks(self, logits: Tensor, boxes: Tensor, targets: Sequence[dict[str, Tensor]],
                    num_layers: int = 1) -> Tensor:
        """The matching cost of every image's block, padded: [P, Q, T_max], P = num_layers * B.

        logits [P, Q, C+1], boxes [P, Q, 4] cxcywh (problem p is image p % B of
        layer p // B); block p's first n_{p % B} columns are its cost, the rest padding.
        """
        tgt_labels = pad_sequence([t["labels"].long() for t in targets], batch_first=True)  # [B, T_max]
        tgt_boxes = pad_sequence([t["boxes"].float() for t in targets], batch_first=True,
                                 padding_value=_PAD_BOX)  # [B, T_max, 4]
        return self.padded_cost(logits, boxes, tgt_labels, tgt_boxes)

    def padded_cost(self, logits: Tensor, boxes: Tensor, target_labels: Tensor, target_boxes: Tensor) -> Tensor:
        """The cost [P, Q, T] of predictions logits [P, Q, C+1] / boxes [P, Q, 4] against padded targets
        target_labels [B, T] / target_boxes [B, T, 4] (problem p is image p % B): the one place a subclass
        changes the cost (`FocalHungarianMatcher`)."""
        if functional.matcher_kernels(logits, self.backend):
            return functional.matching_cost(logits, boxes, target_labels, target_boxes, self.cost_class,
                                            self.cost_bbox, self.cost_giou)
        return matching_cost_ref(logits, boxes, target_labels, target_boxes, self.cost_class, self.cost_bbox,
                                 self.cost_giou)

    @torch.no_grad()
    def match_padded(self, logits: Tensor, boxes: Tensor, targets: "PaddedTargets",
                     check_invalid: bool | None = None) -> Tensor:
        """Match every layer of every image to padded targets, with shapes that never depend on the values.

        logits [L, B, Q, C+1] and boxes [L, B, Q, 4] cxcywh: L layers' predictions stacked.
        targets: a `fastdetr.padded.PaddedTargets` ([B, T] slots, T <= Q, each image's valid
            targets first).
        Returns col_for_row [L, B, Q] int64: the target slot matched to each query, -1 for none.
        The same optimal assignment as `match_layers` (ties aside); with the "triton" solver (and
        "auto" on CUDA) one kernel launch and no host sync; otherwise the solver runs on the host
        (a sync for device tensors), its result scattered into the same [L, B, Q] form.
        check_invalid: the device solver's NaN check (the matcher's `check_invalid` when None);
            False leaves a NaN block to the losses.
        """
        num_layers, batch_size, num_queries, num_logits = logits.shape
        slots = targets.labels.shape[1]
        if boxes.shape != (num_layers, batch_size, num_queries, 4) or targets.labels.shape[0] != batch_size:
            raise ValueError(f"HungarianMatcher.match_padded: expected logits [L, B, Q, C+1], boxes [L, B, Q, 4] and "
                             f"targets of B images, got {list(logits.shape)}, {list(boxes.shape)} and "
                             f"{list(targets.labels.shape)}")
        if slots > num_queries:
            raise ValueError(f"HungarianMatcher.match_padded: {slots} target slots per image but only {num_queries} "
                             "queries; max_targets must be at most num_queries")
        flat_logits, flat_boxes = logits.flatten(0, 1).float(), boxes.flatten(0, 1).float()
        labels, target_boxes = targets.labels.long(), targets.boxes.float()
        cost = self.padded_cost(flat_logits, flat_boxes, labels, target_boxes)
        on_kernels = functional.matcher_kernels(flat_logits, self.backend)  # the device solver
        counts = targets.valid.sum(1).repeat(num_layers)  # [L*B], problem p is image p % B
        check_invalid = self.check_invalid if check_invalid is None else check_invalid
        solved = functional.padded_assignment(cost, counts) if on_kernels else None
        if solved is None:
            return self._host_col_for_row(cost, counts, check_invalid).view(num_layers, batch_size, num_queries)
        col_for_row, status = solved
        if check_invalid or (check_invalid is None and not cost.is_cuda):
            failed = functional.failed_problems(status)
            if failed:
                raise ValueError(f"HungarianMatcher: the cost block of problem {failed[0]} is invalid "
                                 "(NaN or -inf: non-finite predictions or targets?)")
        return col_for_row.view(num_layers, batch_size, num_queries)

    def _host_col_for_row(self, cost: Tensor, counts: Tensor, check_invalid: bool | None) -> Tensor:
        """`match_padded`'s result from this matcher's solver: the counts read on the host (a sync on a GPU).

        With check_invalid False a block holding NaN or inf gets the diagonal, as on the device, and
        is not solved; otherwise the solver raises on it.
        """
        num_problems, num_queries, _ = cost.shape
        num_targets = counts.tolist()
        col_for_row = torch.full((num_problems, num_queries), -1, dtype=torch.int64)
        solved = list(range(num_problems))
        if check_invalid is False:
            finite = torch.isfinite(cost).flatten(1).all(1).tolist()
            solved = [p for p in solved if finite[p]]
            for p in (p for p in range(num_problems) if not finite[p]):
                diagonal = torch.arange(min(num_queries, num_targets[p]))
                col_for_row[p, diagonal] = diagonal
        if solved:
            pairs = self.solver(cost[solved], [num_targets[p] for p in solved])
            for p, (pred_idx, tgt_idx) in zip(solved, pairs):
                col_for_row[p, pred_idx.cpu()] = tgt_idx.cpu()
        return col_for_row.to(cost.device)
