"""Detection data: a COCO-format dataset with DETR's augmentation, and a synthetic set to train on.

    from fastdetr.data import build_synthetic, collate_fn
    train_set, val_set = build_synthetic("data/shapes", num_train=4000, num_val=200)
    loader = DataLoader(train_set, batch_size=16, shuffle=True, collate_fn=collate_fn)
"""
from __future__ import annotations

import os

from fastdetr.data.coco import (
    BadAnnotationError,
    BadDataError,
    BadDataWarning,
    BadImageError,
    CocoDetection,
    collate_fn,
)
from fastdetr.data.synthetic import PRESETS, make_splits
from fastdetr.data.transforms import DETR_AUGMENT, SYNTHETIC_AUGMENT, AugmentConfig

__all__ = [
    "AugmentConfig",
    "BadAnnotationError",
    "BadDataError",
    "BadDataWarning",
    "BadImageError",
    "CocoDetection",
    "DETR_AUGMENT",
    "PRESETS",
    "SYNTHETIC_AUGMENT",
    "build_synthetic",
    "collate_fn",
    "make_splits",
]


def build_synthetic(root: str | os.PathLike, num_train: int = 4000, num_val: int = 200, preset: str = "demo",
                    seed: int = 0, augment: AugmentConfig = SYNTHETIC_AUGMENT, skip_bad: bool = False,
                    augment_seed: int | None = None, **overrides) -> tuple[CocoDetection, CocoDetection]:
    """Generate (or reuse) the synthetic train/val splits under `root` and return their datasets.

    `preset` ("demo": 5 classes, 1-5 objects of 12-60 px on 128 px; "easy": 3
    classes, 1-3 objects of 20-60 px, less noise) and `overrides` go to
    `synthetic.make_splits`; `augment` (small scales for 128 px images by
    default), `skip_bad` and `augment_seed` (the datasets' `seed`) to `CocoDetection`.
    """
    train_file, val_file = make_splits(root, num_train, num_val, preset=preset, seed=seed, **overrides)
    train = CocoDetection(train_file.parent / "images", train_file, train=True, skip_bad=skip_bad,
                          augment=augment, seed=augment_seed)
    val = CocoDetection(val_file.parent / "images", val_file, train=False, skip_bad=skip_bad, augment=augment)
    return train, val
