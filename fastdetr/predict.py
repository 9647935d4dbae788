"""Detection on image files with a trained checkpoint: JSON detections and annotated PNGs.

    model, info = load_model("out/demo/checkpoint.pth")
    detections = predict_image(model, Image.open("shapes.jpg"), info["augment"], threshold=0.5)
    draw_detections(image, detections, info["categories"]).save("shapes.png")

Preprocessing is DETR's validation transform (`fastdetr.data.transforms`):
the shorter side resized to `val_size` (longer side at most `max_size`),
ImageNet normalisation. fastdetr's training checkpoints store that resize and
the category names; other checkpoints (the official DETR files) get DETR's
800 / 1333 and numeric class names.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from .checkpoint import (
    CheckpointError,
    check_state_dict,
    config_from_dict,
    extract_state_dict,
    infer_config,
    model_from_config,
)
from .data.transforms import DETR_AUGMENT, AugmentConfig, augment_val, to_model_input
from .evaluate import postprocess_for
from .reference.deformable_detr import DeformableDETR
from .reference.detr import DETR

# Distinct box colours, cycled by category id.
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40), (128, 0, 0))


def load_model(checkpoint: str | os.PathLike, device: torch.device | str = "cpu"
               ) -> tuple[DETR | DeformableDETR, dict[str, Any]]:
    """Build and load the model of a checkpoint (eval mode, on `device`): a DETR, or a DeformableDETR where
    the checkpoint's stored config is one (`fastdetr.checkpoint.config_from_dict`).

    Returns (model, info) with info = {"config": DETRConfig or DeformableDETRConfig, "categories": {category id: name}
    (empty when the checkpoint stores none), "augment": AugmentConfig whose val_size / max_size are
    the checkpoint's validation resize}. The file is read with weights_only=True.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint: {error}") from error
    state_dict = extract_state_dict(data, str(path))
    stored = data.get("config") if isinstance(data, dict) else None
    config = config_from_dict(stored) if isinstance(stored, dict) else infer_config(state_dict, str(path))
    model = model_from_config(config)
    check_state_dict(model, state_dict, str(path))
    model.load_state_dict(state_dict, strict=False)  # check_state_dict was the strict check
    categories = {int(k): str(v) for k, v in (data.get("categories") or {}).items()} if isinstance(data, dict) else {}
    val_transform = data.get("val_transform") if isinstance(data, dict) else None
    augment = dataclasses.replace(DETR_AUGMENT, **val_transform) if isinstance(val_transform, dict) else DETR_AUGMENT
    return model.to(device).eval(), {"config": config, "categories": categories, "augment": augment}


def preprocess(image: Image.Image, augment: AugmentConfig = DETR_AUGMENT) -> torch.Tensor:
    """PIL image -> (3, H', W') float32: DETR's validation resize and ImageNet normalisation."""
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "area": torch.zeros(0),
             "iscrowd": torch.zeros(0, dtype=torch.int64),
             "size": torch.tensor([image.height, image.width], dtype=torch.int64)}
    resized, target = augment_val(image.convert("RGB"), empty, augment)
    return to_model_input(resized, target)[0]


@torch.no_grad()
def predict_image(model: nn.Module, image: Image.Image, augment: AugmentConfig = DETR_AUGMENT,
                  threshold: float = 0.5) -> list[dict[str, Any]]:
    """Detections on one PIL image, best first: [{"category_id", "score", "box": [x0, y0, x1, y1]}, ...].

    Boxes are in the pixels of `image` (not of the resized model input), clipped to it (DETR's
    boxes may cross the border; `evaluate` keeps them unclipped, as the original does); only
    queries whose best real-class probability is at least `threshold` are kept (a Deformable DETR: of its
    100 best (query, class) sigmoid scores, those at least `threshold`).
    """
    device = next(model.parameters()).device
    pixels = preprocess(image, augment).to(device)
    outputs = model([pixels])
    size = torch.tensor([[image.height, image.width]], device=device)
    result = postprocess_for(model)({key: outputs[key].float() for key in ("pred_logits", "pred_boxes")}, size)[0]
    result["boxes"][:, 0::2] = result["boxes"][:, 0::2].clamp(0, image.width)
    result["boxes"][:, 1::2] = result["boxes"][:, 1::2].clamp(0, image.height)
    order = result["scores"].argsort(descending=True).tolist()
    scores, labels, boxes = (result[key].cpu().tolist() for key in ("scores", "labels", "boxes"))
    return [{"category_id": int(labels[i]), "score": float(scores[i]), "box": [float(v) for v in boxes[i]]}
            for i in order if scores[i] >= threshold]


def draw_detections(image: Image.Image, detections: Sequence[dict[str, Any]],
                    categories: dict[int, str] | None = None, scale: float = 1.0) -> Image.Image:
    """A copy of `image` (enlarged by `scale`) with each detection's box and "name score" label drawn."""
    canvas = image.convert("RGB")
    if scale != 1.0:
        canvas = canvas.resize((round(canvas.width * scale), round(canvas.height * scale)), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for detection in detections:
        category_id = detection["category_id"]
        colour = PALETTE[category_id % len(PALETTE)]
        x0, y0, x1, y1 = (v * scale for v in detection["box"])
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=2)
        name = (categories or {}).get(category_id, str(category_id))
        text = f"{name} {detection['score']:.2f}"
        left, top, right, bottom = draw.textbbox((x0, y0), text, font=font)
        top_y = max(y0 - (bottom - top) - 2, 0)
        draw.rectangle((x0, top_y, x0 + right - left + 2, top_y + bottom - top + 2), fill=colour)
        draw.text((x0 + 1, top_y), text, fill=(255, 255, 255), font=font)
    return canvas


def output_names(image_paths: Sequence[str | os.PathLike]) -> list[str]:
    """A distinct output name (no extension) for each image path, the same for the same list.

    The stem ("a/img.jpg" -> "img") where no other input has it; among inputs that share one,
    the file name ("img.jpg", "img.png"), then as many parent folders as tell them apart, joined
    by "__" ("a__img", "b__img"; folders of the absolute path). Names are compared ignoring
    case (case-insensitive file systems). A path given twice gets "-2", "-3", ... on its repeats.
    """
    paths = [Path(os.path.normpath(Path(path).absolute())) for path in image_paths]
    folders = [[part for part in path.parent.parts if part != path.anchor] for path in paths]

    def candidate(index: int, level: int) -> str:
        # level 0: stem, 1: file name, 2: parent__stem, 3: parent__file name, 4: grandparent__parent__stem, ...
        depth, full = divmod(level, 2)
        path = paths[index]
        return "__".join([*folders[index][len(folders[index]) - depth:], path.name if full else path.stem])

    levels = [0] * len(paths)
    while True:
        names = [candidate(index, level) for index, level in enumerate(levels)]
        holders: dict[str, list[int]] = {}
        for index, name in enumerate(names):
            holders.setdefault(name.casefold(), []).append(index)
        # a name held by different files: those go one level longer (a repeated path cannot be told apart)
        clashing = [index for group in holders.values() if len({paths[i] for i in group}) > 1 for index in group
                    if levels[index] < 2 * len(folders[index]) + 1]
        if not clashing:
            break
        for index in clashing:
            levels[index] += 1
    taken: set[str] = set()
    unique = []
    for name in names:  # only the same file given more than once is left to number
        numbered, count = name, 1
        while numbered.casefold() in taken:
            count += 1
            numbered = f"{name}-{count}"
        taken.add(numbered.casefold())
        unique.append(numbered)
    return unique


def predict_files(image_paths: Sequence[str | os.PathLike], checkpoint: str | os.PathLike, threshold: float = 0.5,
                  out_dir: str | os.PathLike = "out/predict", device: torch.device | str = "cpu"
                  ) -> list[dict[str, Any]]:
    """`fastdetr predict`: for each image write out_dir/<name>.json and out_dir/<name>.png.

    <name> is the image's stem, or where inputs share a stem a longer name that tells them apart
    (`output_names`), so no output overwrites another. The JSON holds {"image": path, "width",
    "height", "threshold", "detections": [{"category_id", "category", "score", "box": [x0, y0, x1,
    y1] in pixels, clipped to the image}, ...]}. Returns those dicts, one per image.
    """
    model, info = load_model(checkpoint, device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    for image_path, name in zip(image_paths, output_names(image_paths)):
        image_path = Path(image_path)
        try:
            with Image.open(image_path) as opened:
                image = opened.convert("RGB")
        except (OSError, ValueError) as error:
            raise ValueError(f"{image_path}: cannot read image: {error}") from error
        detections = predict_image(model, image, info["augment"], threshold)
        for detection in detections:
            detection["category"] = info["categories"].get(detection["category_id"], str(detection["category_id"]))
        report = {"image": str(image_path), "width": image.width, "height": image.height,
                  "threshold": threshold, "detections": detections}
        (out / f"{name}.json").write_text(json.dumps(report, indent=1))
        draw_detections(image, detections, info["categories"]).save(out / f"{name}.png")
        reports.append(report)
    return reports
