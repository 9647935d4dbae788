"""Box conversions, IoU and generalised IoU.

Boxes are (..., 4) tensors, either (cx, cy, w, h) or (x0, y0, x1, y1).

Unlike the original DETR's util/box_ops.py, `generalized_box_iou` does not
assert that its boxes are valid: each such assert reads a GPU tensor on the
host, and the matcher and loss call it once per decoder layer (24 host syncs
per training step in the original). Boxes are checked where they enter the
library -- data loading and `validate_boxes` -- and predicted boxes are valid
by construction (sigmoid outputs converted from cxcywh). The public
`checked_generalized_box_iou` validates first, for callers with boxes of
unknown origin.
"""
from __future__ import annotations

import torch
from torch import Tensor


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) centre/size boxes -> (..., 4) corner boxes."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(..., 4) corner boxes -> (..., 4) centre/size boxes."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """(..., 4) xyxy boxes -> (...) areas."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU of (N, 4) and (M, 4) xyxy boxes.

    Returns (iou, union), both (N, M).
    """
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / union, union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalised IoU (Rezatofighi et al., 2019) of (N, 4) and (M, 4) xyxy boxes -> (N, M).

    No validity check (see the module docstring): degenerate boxes give
    meaningless values, not an error. Use `checked_generalized_box_iou` or
    `validate_boxes` on boxes of unknown origin.
    """
    return generalized_box_iou_broadcast(boxes1[:, None, :], boxes2[None, :, :])


def generalized_box_iou_broadcast(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Elementwise generalised IoU of broadcastable (..., 4) xyxy boxes -> (...) GIoU.

    Pairwise per image: `generalized_box_iou_broadcast(a[:, :, None], b[:, None])`
    with a (P, N, 4), b (P, M, 4) gives (P, N, M) (the matching cost's blocks);
    matched pairs: two (K, 4) tensors give (K,) (the loss). No validity check
    and no host sync, like `generalized_box_iou`, which is this on (N, 1, 4)
    and (1, M, 4).
    """
    area1, area2 = box_area(boxes1), box_area(boxes2)
    top_left = torch.max(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.min(boxes1[..., 2:], boxes2[..., 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1 + area2 - inter
    iou = inter / union
    top_left = torch.min(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.max(boxes1[..., 2:], boxes2[..., 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing


def validate_boxes(boxes: Tensor, name: str = "boxes", fmt: str = "xyxy") -> None:
    """Raise ValueError naming every degenerate box in `boxes` (N, 4).

    A box is degenerate when a coordinate is not finite or it has negative
    width or height (x1 < x0 or y1 < y0 for xyxy; w < 0 or h < 0 for cxcywh).
    This reads the tensor on the host: call it where boxes enter, never in a
    GPU hot path.
    """
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name}: expected an (N, 4) tensor, got shape {tuple(boxes.shape)}")
    if fmt not in ("xyxy", "cxcywh"):
        raise ValueError(f"{name}: unknown box format {fmt!r}; expected 'xyxy' or 'cxcywh'")
    if not boxes.is_floating_point():
        raise ValueError(f"{name}: boxes must be floating point, got {boxes.dtype}")
    if fmt == "xyxy":
        width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    else:
        width, height = boxes[:, 2], boxes[:, 3]
    bad = ~torch.isfinite(boxes).all(dim=1) | (width < 0) | (height < 0)
    if bool(bad.any()):
        index = bad.nonzero().flatten().tolist()
        shown = ", ".join(f"{i}: {boxes[i].tolist()}" for i in index[:5])
        more = f" (and {len(index) - 5} more)" if len(index) > 5 else ""
        raise ValueError(
            f"{name}: {len(index)} degenerate {fmt} box(es) (non-finite, or negative width/height) "
            f"at index {shown}{more}"
        )


def checked_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """`generalized_box_iou` after `validate_boxes` on both inputs (syncs with the GPU)."""
    validate_boxes(boxes1, "boxes1")
    validate_boxes(boxes2, "boxes2")
    return generalized_box_iou(boxes1, boxes2)
