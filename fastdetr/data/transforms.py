"""DETR's detection augmentation, on a PIL image and a target of pixel xyxy boxes.

The policy is the original DETR's (datasets/coco.py, make_coco_transforms),
written here from its description; only the sizes are parameters
(`AugmentConfig`), so a small synthetic set can use small scales:

- train: horizontal flip (p 0.5), then with p 0.5 a random resize of the
  shorter side to one of `scales` (longer side at most `max_size`), otherwise
  a resize to one of `crop_resize_scales`, a random crop with sides in
  `crop_size` and then the random resize to `scales`;
- validation: shorter side to `val_size`, longer side at most `max_size`.

A target holds `boxes` (n, 4) float32 pixel xyxy, `labels`, `area`,
`iscrowd` (n,) and `size` (2,) int64 [h, w]. Every transform returns a new
target. Randomness comes from a `torch.Generator` (None: torch's default one,
which DataLoader seeds per worker).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fastdetr.box_ops import box_xyxy_to_cxcywh, validate_boxes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Target = dict[str, Tensor]


@dataclass(frozen=True)
class AugmentConfig:
    """Sizes of DETR's augmentation, in pixels. The defaults are the original DETR's (COCO)."""

    scales: tuple[int, ...] = tuple(range(480, 801, 32))   # train: shorter side, one at random
    max_size: int | None = 1333                            # longer side at most (train and val)
    crop_resize_scales: tuple[int, ...] = (400, 500, 600)   # shorter side before the random crop
    crop_size: tuple[int, int] = (384, 600)                 # crop height and width, each in min..max
    val_size: int = 800                                     # validation: shorter side
    flip_prob: float = 0.5
    crop_prob: float = 0.5                                  # chance of the resize-crop-resize branch


DETR_AUGMENT = AugmentConfig()

# For the 128-px synthetic set: DETR's policy scaled by about 128 / 800 on the
# crop side, with train scales 96..160 around the native 128 and val at 128.
SYNTHETIC_AUGMENT = AugmentConfig(
    scales=(96, 112, 128, 144, 160), max_size=213, crop_resize_scales=(96, 112, 128),
    crop_size=(80, 128), val_size=128,
)


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [low, high], both inclusive."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def _rand(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def _choice(options: tuple[int, ...], generator: torch.Generator | None) -> int:
    return options[_randint(0, len(options) - 1, generator)]


def hflip(image: Image.Image, target: Target) -> tuple[Image.Image, Target]:
    """Mirror left-right: a box [x0, y0, x1, y1] becomes [W - x1, y0, W - x0, y1]."""
    width = image.width
    boxes = target["boxes"]
    flipped = torch.stack((width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]), dim=1)
    return image.transpose(Image.FLIP_LEFT_RIGHT), {**target, "boxes": flipped}


def resized_size(width: int, height: int, size: int, max_size: int | None) -> tuple[int, int]:
    """(new_width, new_height) with the shorter side `size`, shrunk so the longer is <= max_size."""
    short, long = min(width, height), max(width, height)
    if max_size is not None and long * size / short > max_size:
        size = int(round(max_size * short / long))
    if width < height:
        return size, int(size * height / width)
    return int(size * width / height), size


def resize(image: Image.Image, target: Target, size: int, max_size: int | None = None
           ) -> tuple[Image.Image, Target]:
    """Bilinear resize of the shorter side to `size` (see `resized_size`); boxes and areas follow."""
    new_width, new_height = resized_size(image.width, image.height, size, max_size)
    scale_x, scale_y = new_width / image.width, new_height / image.height
    boxes = target["boxes"] * torch.tensor([scale_x, scale_y, scale_x, scale_y], dtype=torch.float32)
    resized = {**target, "boxes": boxes, "area": target["area"] * (scale_x * scale_y),
               "size": torch.tensor([new_height, new_width], dtype=torch.int64)}
    return image.resize((new_width, new_height), Image.BILINEAR), resized


def crop(image: Image.Image, target: Target, top: int, left: int, height: int, width: int
         ) -> tuple[Image.Image, Target]:
    """Cut the (top, left, height, width) window; boxes are clipped to it, boxes left empty are dropped.

    `area` becomes the clipped box area, as in the original DETR.
    """
    boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
    boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([width, height, width, height], dtype=torch.float32))
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes = boxes[keep]
    cropped = {**target, "boxes": boxes, "labels": target["labels"][keep], "iscrowd": target["iscrowd"][keep],
               "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
               "size": torch.tensor([height, width], dtype=torch.int64)}
    return image.crop((left, top, left + width, top + height)), cropped


def random_size_crop(image: Image.Image, target: Target, min_size: int, max_size: int,
                     generator: torch.Generator | None = None) -> tuple[Image.Image, Target]:
    """Crop a window with height and width each uniform in min_size..max_size (capped by the image)."""
    height = _randint(min(min_size, image.height), min(image.height, max_size), generator)
    width = _randint(min(min_size, image.width), min(image.width, max_size), generator)
    top = _randint(0, image.height - height, generator)
    left = _randint(0, image.width - width, generator)
    return crop(image, target, top, left, height, width)


def augment_train(image: Image.Image, target: Target, config: AugmentConfig,
                  generator: torch.Generator | None = None) -> tuple[Image.Image, Target]:
    """DETR's training augmentation (see the module docstring)."""
    if _rand(generator) < config.flip_prob:
        image, target = hflip(image, target)
    if _rand(generator) < config.crop_prob:
        image, target = resize(image, target, _choice(config.crop_resize_scales, generator))
        image, target = random_size_crop(image, target, *config.crop_size, generator=generator)
    return resize(image, target, _choice(config.scales, generator), config.max_size)


def train_output_size(width: int, height: int, config: AugmentConfig,
                      generator: torch.Generator | None = None) -> tuple[int, int]:
    """(height, width) of `augment_train`'s output for a width x height image, without an image.

    Draws the same random numbers in the same order as `augment_train`, so with equal
    generator states the two agree (a test holds them together): what the size-bucket
    policy's padding report samples.
    """
    _rand(generator)  # the flip
    if _rand(generator) < config.crop_prob:
        width, height = resized_size(width, height, _choice(config.crop_resize_scales, generator), None)
        min_size, max_size = config.crop_size
        crop_height = _randint(min(min_size, height), min(height, max_size), generator)
        crop_width = _randint(min(min_size, width), min(width, max_size), generator)
        _randint(0, height - crop_height, generator)
        _randint(0, width - crop_width, generator)
        width, height = crop_width, crop_height
    width, height = resized_size(width, height, _choice(config.scales, generator), config.max_size)
    return height, width


def augment_val(image: Image.Image, target: Target, config: AugmentConfig) -> tuple[Image.Image, Target]:
    """DETR's validation resize (deterministic)."""
    return resize(image, target, config.val_size, config.max_size)


def to_model_input(image: Image.Image, target: Target) -> tuple[Tensor, Target]:
    """PIL RGB image -> (3, H, W) float32 normalised with ImageNet mean/std; boxes -> cxcywh in [0, 1].

    Boxes are divided by the final image's (w, h, w, h).
    """
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = (pixels - mean) / std
    height, width = pixels.shape[1:]
    boxes = box_xyxy_to_cxcywh(target["boxes"]) / torch.tensor([width, height, width, height], dtype=torch.float32)
    validate_boxes(boxes, "transformed boxes", fmt="cxcywh")
    return pixels, {**target, "boxes": boxes.clamp(0, 1)}
