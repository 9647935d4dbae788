"""Box conversions, IoU and GIoU against hand-computed values; validation names bad boxes."""
from __future__ import annotations

import pytest
import torch

from fastdetr import box_ops
from fastdetr.measure.counters import OpCounter


def test_conversions_round_trip_and_hand_values():
    cxcywh = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.2, 0.2]])
    xyxy = box_ops.box_cxcywh_to_xyxy(cxcywh)
    torch.testing.assert_close(xyxy, torch.tensor([[0.4, 0.3, 0.6, 0.7], [0.0, 0.8, 0.2, 1.0]]))
    torch.manual_seed(0)
    random = torch.rand(5, 7, 4, dtype=torch.float64)
    torch.testing.assert_close(box_ops.box_xyxy_to_cxcywh(box_ops.box_cxcywh_to_xyxy(random)), random)


def test_iou_and_giou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [4.0, 0.0, 5.0, 1.0]])
    iou, union = box_ops.box_iou(a, b)
    torch.testing.assert_close(iou, torch.tensor([[1 / 7, 1.0, 0.0]]))
    torch.testing.assert_close(union, torch.tensor([[7.0, 4.0, 5.0]]))
    giou = box_ops.generalized_box_iou(a, b)
    # enclosing boxes: 3x3 = 9, 2x2 = 4, 5x2 = 10
    torch.testing.assert_close(giou, torch.tensor([[1 / 7 - 2 / 9, 1.0, 0.0 - 5 / 10]]))
    assert box_ops.box_area(b).tolist() == [4.0, 4.0, 1.0]


def test_giou_makes_no_host_sync():
    boxes = box_ops.box_cxcywh_to_xyxy(torch.rand(10, 4) * 0.5 + 0.25)
    with OpCounter() as counter:
        box_ops.generalized_box_iou(boxes, boxes)
    assert counter.sync_ops == []


def test_validate_boxes_names_the_bad_ones():
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.4, 0.9], [0.0, 0.0, float("nan"), 1.0]])
    with pytest.raises(ValueError, match=r"gt_boxes: 2 degenerate xyxy box\(es\).*index 1: .*2: "):
        box_ops.validate_boxes(boxes, "gt_boxes")
    with pytest.raises(ValueError, match="index 0"):
        box_ops.validate_boxes(torch.tensor([[0.5, 0.5, -0.1, 0.2]]), fmt="cxcywh")
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        box_ops.validate_boxes(torch.rand(3, 5))
    box_ops.validate_boxes(boxes[:1])  # valid boxes pass
    with pytest.raises(ValueError, match="boxes2"):
        box_ops.checked_generalized_box_iou(boxes[:1], boxes)
