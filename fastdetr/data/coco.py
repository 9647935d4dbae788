"""A COCO-format detection dataset with DETR's augmentation, and its batch collation.

Differs from the original DETR's datasets/coco.py: no torchvision or
pycocotools (the json is read directly); masks are not loaded; and bad data
is an error rather than silently clamped or filtered away:

- at construction (cheap, the json only): an annotation whose box is
  malformed, not finite, of zero or negative width/height, or outside its
  image by more than `BOX_TOLERANCE` px, or whose category id or image id is
  not in the file -> `BadAnnotationError` naming the annotation file, the
  annotation id, the image id and file; an image entry whose file_name is
  absolute or leaves the image folder through '..' -> `BadAnnotationError`
  naming the entry's id and file_name (nothing is opened);
- at construction, always (skip_bad does not apply: COCO evaluation indexes
  by id, so repeated ids would mix entries): two images or two annotations
  with the same id -> `BadAnnotationError` naming the repeated ids;
- when an image is loaded: a missing, unreadable or corrupt file, or one whose
  size differs from the json's -> `BadImageError` naming the image path and id.

With `skip_bad=True` each of the others becomes a `BadDataWarning` instead,
and a skip: a bad annotation is dropped (its image stays, with its other
annotations), a bad image entry is dropped with its annotations; an
unreadable image is marked bad and replaced by the next readable image in
index order, so a batch keeps its size. `dataset.skipped` counts both and
`dataset.problems` lists the construction-time messages. The image flags live
in shared memory, so images found bad inside DataLoader worker processes are
counted in the main process too.

Crowd annotations (iscrowd 1) are dropped unchecked, as DETR drops them.
"""
from __future__ import annotations

import json
import math
import os
import posixpath
import warnings
from collections import defaultdict
from pathlib import Path, PurePath
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from fastdetr.data.transforms import DETR_AUGMENT, AugmentConfig, augment_train, augment_val, to_model_input
from fastdetr.nested import ImageBatch, batch_images

BOX_TOLERANCE = 1.0  # px a box may pass the image border (float rounding in real sets); it is clipped


def _inside_folder(file_name: str) -> bool:
    """Whether `file_name` names a file below its folder: relative, non-empty, not leaving it through '..'.

    Lexical (symlinks are not resolved: a linked image folder is the user's choice); subfolders are fine.
    """
    if not file_name or PurePath(file_name).is_absolute() or posixpath.isabs(file_name):
        return False
    normalised = posixpath.normpath(file_name.replace(os.sep, "/"))
    return normalised != "." and normalised != ".." and not normalised.startswith("../")


class BadDataError(ValueError):
    """A dataset file or entry that cannot be used as it is."""


class BadAnnotationError(BadDataError):
    """An annotation (box, category or image reference) that is invalid."""


class BadImageError(BadDataError):
    """An image file that is missing, unreadable, corrupt or not the size the annotations say."""


class BadDataWarning(UserWarning):
    """Issued instead of a BadDataError when a dataset was built with skip_bad=True."""


class CocoDetection(Dataset):
    """Images and boxes of a COCO json, as DETR consumes them.

    `dataset[i]` -> (image, target): image (3, H, W) float32, ImageNet-normalised;
    target:
      boxes     (n, 4) float32, cxcywh normalised by the transformed image's (w, h), in [0, 1]
      labels    (n,) int64, the category ids of the file (a DETR head needs max id + 1 classes,
                `dataset.num_classes`)
      area      (n,) float32, in transformed pixels^2 (the json area scaled by the resize)
      iscrowd   (n,) int64, all 0
      image_id  (1,) int64
      orig_size (2,) int64 [h, w] of the file; size (2,) int64 [h, w] after the transform

    `train` picks DETR's random train augmentation, otherwise the fixed
    validation resize; `augment` holds their sizes (DETR's COCO values by
    default). Augmentation draws from torch's default generator unless `seed`
    is given: then sample i of epoch e (`set_epoch`) always gets the same one.

    `skip_bad` (module docstring): warn about, skip and count bad annotations,
    image entries and image files instead of raising; repeated image or
    annotation ids always raise `BadAnnotationError`.
    """

    def __init__(self, image_dir: str | os.PathLike, annotation_file: str | os.PathLike, train: bool = True,
                 skip_bad: bool = False, augment: AugmentConfig = DETR_AUGMENT, seed: int | None = None):
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        self.train = train
        self.skip_bad = skip_bad
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.problems: list[str] = []
        self._skipped_annotations = 0
        self._skipped_image_entries = 0
        self._read_annotations()
        # One flag per image, set when loading it failed (skip_bad only); shared with worker processes.
        self._bad_image = torch.zeros(len(self.images), dtype=torch.bool).share_memory_()

    # ---- construction: read and check the json -------------------------------------------------

    def _read_annotations(self) -> None:
        try:
            data = json.loads(self.annotation_file.read_text())
            categories, image_entries, annotations = data["categories"], data["images"], data["annotations"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise BadAnnotationError(
                f"{self.annotation_file}: not a readable COCO annotation file "
                f"(needs 'images', 'annotations' and 'categories'): {error!r}"
            ) from error
        self.categories = {int(category["id"]): str(category.get("name", category["id"])) for category in categories}
        self.images: list[dict[str, Any]] = []
        index_of: dict[int, int] = {}
        for entry in image_entries:
            if not all(key in entry for key in ("id", "file_name", "width", "height")):
                self._report(BadAnnotationError(
                    f"{self.annotation_file}: image entry {entry.get('id', '?')} "
                    f"({entry.get('file_name', '?')}) lacks id, file_name, width or height"))
                self._skipped_image_entries += 1
                continue
            if not _inside_folder(str(entry["file_name"])):
                self._report(BadAnnotationError(
                    f"{self.annotation_file}: image entry {entry['id']} has file_name {entry['file_name']!r}, "
                    f"which is not a relative path inside the image folder {self.image_dir} (absolute, empty, "
                    "or leaving it through '..'); refused without opening it"))
                self._skipped_image_entries += 1
                continue
            index_of[int(entry["id"])] = len(self.images)
            self.images.append(dict(id=int(entry["id"]), file_name=str(entry["file_name"]),
                                    width=int(entry["width"]), height=int(entry["height"])))
        files_of: dict[int, list[str]] = defaultdict(list)
        for image in self.images:
            files_of[image["id"]].append(image["file_name"])
        self._raise_if_duplicated("image", files_of)
        images_of: dict[Any, list[str]] = defaultdict(list)
        for annotation in annotations:
            if isinstance(annotation.get("id"), (int, str)):
                images_of[annotation["id"]].append(f"image id {annotation.get('image_id')!r}")
        self._raise_if_duplicated("annotation", images_of)

        per_image: list[list[tuple[int, list[float], int, float]]] = [[] for _ in self.images]
        for annotation in annotations:
            if annotation.get("iscrowd", 0):
                continue
            image_id = annotation.get("image_id")
            image_index = index_of.get(image_id) if isinstance(image_id, int) else None
            problem = self._annotation_problem(annotation, image_index)
            if problem is not None:
                self._report(BadAnnotationError(problem))
                self._skipped_annotations += 1
                continue
            image = self.images[image_index]
            x, y, w, h = (float(v) for v in annotation["bbox"])
            # Within BOX_TOLERANCE of the border: clip to the image.
            x0, y0 = max(x, 0.0), max(y, 0.0)
            x1, y1 = min(x + w, image["width"]), min(y + h, image["height"])
            area = float(annotation.get("area", w * h))
            per_image[image_index].append((int(annotation.get("id", -1)), [x0, y0, x1, y1],
                                           int(annotation["category_id"]), area))

        # Flat arrays plus offsets: compact, and cheap to pickle into worker processes.
        counts = [len(entries) for entries in per_image]
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        flat = [entry for entries in per_image for entry in entries]
        self._annotation_ids = np.array([entry[0] for entry in flat], dtype=np.int64)
        self._boxes = np.array([entry[1] for entry in flat], dtype=np.float32).reshape(-1, 4)
        self._labels = np.array([entry[2] for entry in flat], dtype=np.int64)
        self._areas = np.array([entry[3] for entry in flat], dtype=np.float32)

    def _annotation_problem(self, annotation: dict, image_index: int | None) -> str | None:
        """A message naming the file, annotation and image when `annotation` is unusable, else None."""
        where = f"{self.annotation_file}: annotation id {annotation.get('id', '?')}"
        if image_index is None:
            return f"{where}: image id {annotation.get('image_id')!r} is not in the file's images"
        image = self.images[image_index]
        where += f" (image id {image['id']}, {image['file_name']})"
        category_id = annotation.get("category_id")
        if not isinstance(category_id, int) or category_id not in self.categories:
            return (f"{where}: category id {annotation.get('category_id')!r} is not in the file's "
                    f"categories {sorted(self.categories)}")
        bbox = annotation.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(
                isinstance(v, (int, float)) and math.isfinite(v) for v in bbox):
            return f"{where}: bbox {bbox!r} is not four finite numbers [x, y, w, h]"
        x, y, w, h = bbox
        if w <= 0 or h <= 0:
            return f"{where}: box [x, y, w, h] = {bbox} has zero or negative width or height"
        width, height = image["width"], image["height"]
        if x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > width + BOX_TOLERANCE \
                or y + h > height + BOX_TOLERANCE:
            return f"{where}: box [x, y, w, h] = {bbox} lies outside the {width}x{height} image"
        if x >= width or y >= height or x + w <= 0 or y + h <= 0:
            return f"{where}: box [x, y, w, h] = {bbox} has no part inside the {width}x{height} image"
        return None

    def _raise_if_duplicated(self, kind: str, entries_of: dict[Any, list[str]]) -> None:
        """Raise BadAnnotationError naming each `kind` id with more than one entry (the first 5, then a count).

        entries_of: id -> a description of each entry with that id. Never skipped, even with skip_bad:
        COCO evaluation indexes images and annotations by id, so a repeated id would mix their entries.
        """
        repeated = {key: entries for key, entries in entries_of.items() if len(entries) > 1}
        if not repeated:
            return
        shown = "; ".join(f"{key!r} x{len(entries)} ({', '.join(entries)})"
                          for key, entries in list(repeated.items())[:5])
        more = f"; and {len(repeated) - 5} more" if len(repeated) > 5 else ""
        raise BadAnnotationError(
            f"{self.annotation_file}: {len(repeated)} {kind} id(s) occur more than once: {shown}{more}. "
            f"{kind.capitalize()} ids must be unique (COCO evaluation would mix their entries); "
            "skip_bad does not apply")

    def _report(self, error: BadDataError) -> None:
        if not self.skip_bad:
            raise error
        self.problems.append(str(error))
        warnings.warn(f"skipped: {error}", BadDataWarning, stacklevel=3)

    # ---- skip accounting -----------------------------------------------------------------------

    @property
    def skipped(self) -> dict[str, int]:
        """Counts of what skip_bad=True skipped: bad annotations, and images (bad entries + unreadable files)."""
        return dict(annotations=self._skipped_annotations,
                    images=self._skipped_image_entries + int(self._bad_image.sum()))

    def skip_summary(self) -> str:
        """One line for a training log, e.g. 'skipped 2 bad annotations and 1 bad image (...)'."""
        counts = self.skipped
        return (f"{self.annotation_file}: skipped {counts['annotations']} bad annotation(s) and "
                f"{counts['images']} bad image(s)")

    # ---- loading ---------------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        """Classes a DETR head needs for this file (max category id + 1; no-object comes on top)."""
        return max(self.categories, default=-1) + 1

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation a seeded dataset draws (no effect when seed is None)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def _read_image(self, index: int) -> Image.Image:
        entry = self.images[index]
        path = self.image_dir / entry["file_name"]
        ids = self._annotation_ids[self._offsets[index]:self._offsets[index + 1]].tolist()
        where = f"{path}: image id {entry['id']} (annotation ids {ids})"
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")  # decodes the whole file: corrupt data fails here
        except FileNotFoundError as error:
            raise BadImageError(f"{where}: image file is missing") from error
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise BadImageError(f"{where}: cannot read image: {error}") from error
        if image.size != (entry["width"], entry["height"]):
            raise BadImageError(f"{where}: image is {image.width}x{image.height} but the annotation file "
                                f"says {entry['width']}x{entry['height']}")
        return image

    def _load(self, index: int) -> tuple[Image.Image, int]:
        """The image at `index`, or with skip_bad the next readable one after it; returns (image, its index)."""
        if not self.skip_bad:
            return self._read_image(index), index
        for candidate in [index, *range(index + 1, len(self)), *range(index)]:
            if self._bad_image[candidate]:
                continue
            try:
                return self._read_image(candidate), candidate
            except BadImageError as error:
                self._bad_image[candidate] = True
                warnings.warn(f"skipped: {error}", BadDataWarning, stacklevel=3)
        raise BadDataError(f"{self.annotation_file}: no readable image is left in {self.image_dir}")

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        image, index = self._load(index)
        entry = self.images[index]
        start, end = self._offsets[index], self._offsets[index + 1]
        orig_size = torch.tensor([entry["height"], entry["width"]], dtype=torch.int64)
        target = dict(
            boxes=torch.from_numpy(self._boxes[start:end].copy()),
            labels=torch.from_numpy(self._labels[start:end].copy()),
            area=torch.from_numpy(self._areas[start:end].copy()),
            iscrowd=torch.zeros(end - start, dtype=torch.int64),
            image_id=torch.tensor([entry["id"]], dtype=torch.int64),
            orig_size=orig_size,
            size=orig_size.clone(),
        )
        if self.train:
            generator = None
            if self.seed is not None:
                state = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(2, np.uint64)[0]
                generator = torch.Generator().manual_seed(int(state))
            image, target = augment_train(image, target, self.augment, generator)
        else:
            image, target = augment_val(image, target, self.augment)
        return to_model_input(image, target)


def collate_fn(batch: Sequence[tuple[Tensor, dict[str, Tensor]]]) -> tuple[ImageBatch, list[dict[str, Tensor]]]:
    """[(image (3, H_i, W_i), target), ...] -> (ImageBatch (B, 3, H, W) + mask (B, H, W), [target, ...]).

    Images are padded bottom-right with zeros to the largest H and W; the mask is True on padding.
    """
    images, targets = zip(*batch)
    return batch_images(list(images)), list(targets)
