"""COCO box evaluation of a DETR model: PostProcess outputs -> COCO results -> pycocotools' COCOeval.

    stats = evaluate(model, val_set)            # {"AP": ..., "AP50": ..., ..., "ARl": ...}
    print(format_summary(stats))                # the standard 12-line COCO summary

Every query of every image becomes one detection (as the original DETR
evaluates: no score threshold, its Q <= 100 detections fill COCOeval's
maxDets=100). Boxes are scaled to each image's ORIGINAL size (the target's
`orig_size`, not the resized `size`) and written as COCO [x, y, w, h] in
pixels; the category id is the predicted label, which is the file's own
category id (the head has max id + 1 classes). Detections of a label that is
not a category of the file (e.g. id 0 of a 1-based file) are dropped: COCOeval
would ignore them anyway. A Deformable DETR's detections are its official
PostProcess's instead: the 100 best (query, class) sigmoid scores per image
(`postprocess_for`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .reference.deformable_detr import DeformableDETR
from .reference.deformable_detr import PostProcess as DeformablePostProcess
from .reference.detr import PostProcess

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

# The rows of COCOeval.summarize(), in STAT_NAMES order: (metric, IoU range, area, maxDets).
_SUMMARY_ROWS = (
    ("Average Precision", "0.50:0.95", "all", 100), ("Average Precision", "0.50", "all", 100),
    ("Average Precision", "0.75", "all", 100), ("Average Precision", "0.50:0.95", "small", 100),
    ("Average Precision", "0.50:0.95", "medium", 100), ("Average Precision", "0.50:0.95", "large", 100),
    ("Average Recall", "0.50:0.95", "all", 1), ("Average Recall", "0.50:0.95", "all", 10),
    ("Average Recall", "0.50:0.95", "all", 100), ("Average Recall", "0.50:0.95", "small", 100),
    ("Average Recall", "0.50:0.95", "medium", 100), ("Average Recall", "0.50:0.95", "large", 100),
)


def format_summary(stats: dict[str, float]) -> str:
    """The 12-line summary COCOeval.summarize() prints, built from a stats dict."""
    lines = []
    for name, (metric, iou, area, max_dets) in zip(STAT_NAMES, _SUMMARY_ROWS):
        short = "(AP)" if metric.endswith("Precision") else "(AR)"
        lines.append(f" {metric:<18} {short} @[ IoU={iou:<9} | area={area:>6s} | maxDets={max_dets:>3d} ] "
                     f"= {stats[name]:0.3f}")
    return "\n".join(lines)


def coco_results(detections: Sequence[dict[str, Tensor]], image_ids: Iterable[int],
                 category_ids: Iterable[int] | None = None) -> list[dict[str, Any]]:
    """PostProcess output -> COCO result entries.

    detections: one dict per image, "scores" (Q,), "labels" (Q,) int64, "boxes" (Q, 4) xyxy in the
        pixels of the original image (PostProcess called with each image's orig_size).
    image_ids: the COCO image id of each entry of `detections`.
    category_ids: the file's category ids; labels outside them are dropped (None keeps all).
    Returns [{"image_id", "category_id", "bbox": [x, y, w, h] (pixels), "score"}, ...].
    """
    allowed = None if category_ids is None else set(int(c) for c in category_ids)
    results = []
    for detection, image_id in zip(detections, image_ids):
        boxes = detection["boxes"].detach().float().cpu()
        xywh = torch.cat((boxes[:, :2], boxes[:, 2:] - boxes[:, :2]), dim=1).tolist()
        for score, label, box in zip(detection["scores"].tolist(), detection["labels"].tolist(), xywh):
            if allowed is not None and label not in allowed:
                continue
            results.append({"image_id": int(image_id), "category_id": int(label), "bbox": box, "score": score})
    return results


def load_coco(annotation_file: str | os.PathLike):
    """pycocotools' COCO for `annotation_file`, without its progress prints."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(annotation_file))


def coco_evaluate(coco_gt: Any, results: list[dict[str, Any]],
                  image_ids: Iterable[int] | None = None) -> dict[str, float]:
    """Run COCOeval (bbox) on `results` against `coco_gt` (a pycocotools COCO or an annotation file path).

    image_ids restricts the evaluation to those images (default: every image of the file).
    Returns the 12 summary numbers as {"AP", "AP50", ..., "ARl"}; all 0 when there are no results
    (pycocotools cannot load an empty result list).
    """
    from pycocotools.cocoeval import COCOeval

    if not hasattr(coco_gt, "loadRes"):
        coco_gt = load_coco(coco_gt)
    if not results:
        return {name: 0.0 for name in STAT_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes([dict(entry) for entry in results])  # loadRes adds keys: pass copies
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(set(int(i) for i in image_ids))
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats)}


def postprocess_for(model: nn.Module) -> nn.Module:
    """The PostProcess of `model`'s family: Deformable DETR's (top-100 sigmoid scores) or DETR's (one per query)."""
    return DeformablePostProcess() if isinstance(model, DeformableDETR) else PostProcess()


def autocast_context(device: torch.device, amp: str | None):
    """torch.autocast for `amp` ("bf16" / "fp16") on CUDA; a no-op context otherwise (fp32)."""
    if device.type == "cuda" and amp in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
    return contextlib.nullcontext()


@torch.no_grad()
def predict_dataset(model: nn.Module, dataset: Dataset, batch_size: int = 8, device: torch.device | str = "cpu",
                    num_workers: int = 0, amp: str | None = None) -> tuple[list[dict[str, Tensor]], list[int]]:
    """Run `model` over a CocoDetection-like `dataset` (validation transform).

    Returns (detections, image_ids): per image, PostProcess's dict with boxes in
    original-image pixels (on the CPU), and its COCO image id. The model is put
    in eval mode and restored to its previous mode afterwards.
    """
    from .data import collate_fn

    device = torch.device(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_fn)
    was_training = model.training
    model.eval()
    postprocess = postprocess_for(model)
    detections: list[dict[str, Tensor]] = []
    image_ids: list[int] = []
    try:
        for images, targets in loader:
            with autocast_context(device, amp):
                outputs = model(images.to(device, non_blocking=True))
            outputs = {key: outputs[key].float() for key in ("pred_logits", "pred_boxes")}
            orig_sizes = torch.stack([target["orig_size"] for target in targets]).to(device)
            for detection in postprocess(outputs, orig_sizes):
                detections.append({key: value.cpu() for key, value in detection.items()})
            image_ids.extend(int(target["image_id"]) for target in targets)
    finally:
        model.train(was_training)
    return detections, image_ids


def evaluate(model: nn.Module, dataset: Any, batch_size: int = 8, device: torch.device | str = "cpu",
             num_workers: int = 0, amp: str | None = None) -> dict[str, float]:
    """COCO bbox evaluation of `model` on a `fastdetr.data.CocoDetection` (built with train=False).

    Returns {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"},
    each in [0, 1] (-1 where COCOeval has no ground truth of that kind, e.g. no small objects).
    """
    detections, image_ids = predict_dataset(model, dataset, batch_size, device, num_workers, amp)
    coco_gt = load_coco(dataset.annotation_file)
    results = coco_results(detections, image_ids, coco_gt.getCatIds())
    return coco_evaluate(coco_gt, results, image_ids)


def evaluate_checkpoint(checkpoint: str | os.PathLike, image_dir: str | os.PathLike,
                        annotation_file: str | os.PathLike, batch_size: int = 8, device: str = "cpu",
                        num_workers: int = 0, val_size: int | None = None,
                        max_size: int | None = None) -> dict[str, float]:
    """`fastdetr eval`: load a checkpoint (its config and validation resize) and evaluate it on a COCO set.

    val_size / max_size override the checkpoint's validation resize (shorter side / longer side at
    most, in pixels; DETR's 800 / 1333 when the checkpoint stores none).
    """
    from .data import CocoDetection
    from .predict import load_model

    model, info = load_model(checkpoint, device=device)
    augment = info["augment"]
    if val_size is not None:
        augment = dataclasses.replace(augment, val_size=val_size)
    if max_size is not None:
        augment = dataclasses.replace(augment, max_size=max_size)
    dataset = CocoDetection(image_dir, annotation_file, train=False, augment=augment)
    return evaluate(model, dataset, batch_size=batch_size, device=device, num_workers=num_workers)
