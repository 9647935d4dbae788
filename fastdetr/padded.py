"""Targets padded to a fixed count per image, with a validity mask: the static-shape step's form of a batch.

The dynamic path hands the criterion B dicts of (n_b,) labels and (n_b, 4)
boxes, so every step's shapes follow its target counts. `PaddedTargets`
holds the same values in tensors whose shapes depend only on the batch size
and a fixed `max_targets` T: labels [B, T], boxes [B, T, 4] and valid [B, T],
each image's n_b targets first and padding after them. The matcher
(`HungarianMatcher.match_padded`) and the criterion (`SetCriterion.forward_padded`)
take this form and run with no data-dependent shape and no host sync, which a
replayed CUDA graph needs.

`pad_targets` builds it on the host (in a DataLoader worker): it checks the
target values there (reading CPU tensors costs no device sync), so a bad label
or box raises `BadTargetError` naming the image before the batch reaches the
device.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from .criterion import BadTargetError, describe_bad_targets

# The box and label of a padding slot: a valid box and class 0, so every gathered value stays finite.
PAD_BOX = 0.5
PAD_LABEL = 0


class PaddedTargets(NamedTuple):
    """B images' targets padded to T slots each; slot t of image b holds a target where valid[b, t].

    labels: [B, T] int64 in [0, num_classes) (PAD_LABEL on padding).
    boxes: [B, T, 4] float32 normalised cxcywh (PAD_BOX on padding).
    valid: [B, T] bool, True on each image's first n_b slots.
    """

    labels: Tensor
    boxes: Tensor
    valid: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PaddedTargets":
        return PaddedTargets(*(tensor.to(device, non_blocking=non_blocking) for tensor in self))

    @property
    def counts(self) -> Tensor:
        """[B] int64: targets per image (a device tensor: reading it syncs)."""
        return self.valid.sum(1)


def max_target_count(targets: Sequence[dict[str, Tensor]]) -> int:
    """The most targets any image of the batch has (a shape: no read)."""
    return max((int(target["labels"].shape[0]) for target in targets), default=0)


def pad_targets(targets: Sequence[dict[str, Tensor]], max_targets: int, num_classes: int) -> PaddedTargets:
    """Pad a batch's targets ("labels" (n,) and "boxes" (n, 4) normalised cxcywh, CPU tensors) to `max_targets`.

    Raises ValueError when an image has more than `max_targets` targets (callers check
    `max_target_count` first and run such a batch on the dynamic path), and BadTargetError
    naming the image when a label lies outside [0, num_classes) or a box is not finite
    with w, h >= 0.
    """
    if max_targets < 1:
        raise ValueError(f"pad_targets: max_targets must be a positive integer, got {max_targets!r}")
    most = max_target_count(targets)
    if most > max_targets:
        worst = max(range(len(targets)), key=lambda b: targets[b]["labels"].shape[0])
        raise ValueError(f"pad_targets: targets[{worst}] has {most} targets, more than max_targets={max_targets}")
    problem = describe_bad_targets(targets, num_classes)
    if problem is not None:
        raise BadTargetError(f"pad_targets: {problem}")
    batch = len(targets)
    labels = torch.full((batch, max_targets), PAD_LABEL, dtype=torch.int64)
    boxes = torch.full((batch, max_targets, 4), PAD_BOX, dtype=torch.float32)
    valid = torch.zeros((batch, max_targets), dtype=torch.bool)
    for b, target in enumerate(targets):
        n = int(target["labels"].shape[0])
        labels[b, :n] = target["labels"]
        boxes[b, :n] = target["boxes"]
        valid[b, :n] = True
    return PaddedTargets(labels, boxes, valid)


def unpad_targets(padded: PaddedTargets) -> list[dict[str, Tensor]]:
    """The B target dicts a `PaddedTargets` holds (reads `valid`: a host sync for device tensors)."""
    counts = padded.valid.sum(1).tolist()
    return [{"labels": padded.labels[b, :n], "boxes": padded.boxes[b, :n]} for b, n in enumerate(counts)]
