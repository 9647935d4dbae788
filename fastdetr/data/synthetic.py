"""A synthetic COCO-format detection set: coloured shapes on textured backgrounds.

Everything runs with no download: `generate` writes images plus a COCO
`annotations.json` into a folder, deterministically (the same arguments give
byte-identical files). The class of an object is its shape only; its colour is
random (but always far from the background under it), so a detector has to
learn shape, not colour. Objects lie fully inside the image and may overlap a
little (at most `MAX_OVERLAP` of the smaller of two boxes), so none is hidden.

Layout written by `generate(root, ..., split="train")`::

    root/train/images/000001.jpg ...
    root/train/annotations.json     # images, annotations, categories, info

Category ids are 1..num_classes (COCO style, 0 unused), so a DETR head for
this set has `num_classes + 1` classes before no-object (max id + 1, as the
original DETR counts COCO's 91). Boxes are COCO [x, y, w, h] in pixels: the
exact extent of the drawn shape. `area` is the shape's pixel count.
"""
from __future__ import annotations

import json
import math
import os
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "ring", "star")

# Settings of the two named sets (see shared/DESIGN.md, "The demo on a 2-core CPU").
PRESETS: dict[str, dict] = {
    "demo": dict(image_size=128, num_classes=5, max_objects=5, min_size=12, max_size=60,
                 noise=10.0, texture=1.0),
    "easy": dict(image_size=128, num_classes=3, max_objects=3, min_size=20, max_size=60,
                 noise=4.0, texture=0.4),
}

MAX_OVERLAP = 0.35       # largest intersection / smaller box area between two objects
MIN_COLOUR_DISTANCE = 110.0  # RGB distance between an object and the mean background under it
_PLACEMENT_TRIES = 30


def _background(rng: np.random.Generator, size: int, noise: float, texture: float) -> np.ndarray:
    """(size, size, 3) float32 in 0..255 before clipping: linear gradient + smooth texture."""
    start, end = rng.uniform(0, 255, (2, 3))
    angle = rng.uniform(0, 2 * math.pi)
    coords = np.arange(size, dtype=np.float32) / max(size - 1, 1)
    ramp = math.cos(angle) * coords[None, :] + math.sin(angle) * coords[:, None]
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    image = start + ramp[..., None] * (end - start)
    if texture > 0:
        cells = int(rng.choice([4, 8, 16]))
        coarse = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float32)
        image = image + 0.35 * texture * (smooth - 127.5)
    return image.astype(np.float32)


def _draw_shape(shape: str, size: int, box: tuple[int, int, int, int], rng: np.random.Generator) -> Image.Image:
    """An 'L' mask (size x size) with `shape` drawn (255) inside box = (x0, y0, x1, y1), inclusive."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = box
    w, h = x1 - x0 + 1, y1 - y0 + 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "square":
        draw.rectangle(box, fill=255)
    elif shape == "triangle":
        corners = [(x0, y1), (x1, y1), (cx, y0)]  # pointing up, then turned by k * 90 degrees
        turns = int(rng.integers(4))
        for _ in range(turns):
            corners = [(cx - (y - cy) * w / h, cy + (x - cx) * h / w) for x, y in corners]
        draw.polygon(corners, fill=255)
    elif shape == "cross":
        arm_x, arm_y = max(2, round(0.34 * w)), max(2, round(0.34 * h))
        draw.rectangle((x0, round(cy - arm_y / 2), x1, round(cy + arm_y / 2) - 1), fill=255)
        draw.rectangle((round(cx - arm_x / 2), y0, round(cx + arm_x / 2) - 1, y1), fill=255)
    elif shape == "ring":
        draw.ellipse(box, outline=255, width=max(2, round(0.18 * min(w, h))))
    elif shape == "star":
        phase = rng.uniform(0, 2 * math.pi / 5)
        points = []
        for k in range(10):
            radius = 1.0 if k % 2 == 0 else 0.45
            theta = phase + k * math.pi / 5
            points.append((cx + radius * (w - 1) / 2 * math.cos(theta), cy + radius * (h - 1) / 2 * math.sin(theta)))
        draw.polygon(points, fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    return mask


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection / smaller area of two inclusive (x0, y0, x1, y1) boxes."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0] + 1) * (a[3] - a[1] + 1), (b[2] - b[0] + 1) * (b[3] - b[1] + 1))
    return iw * ih / smaller


def _object_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random RGB colour at least MIN_COLOUR_DISTANCE from `under` (3,), else its complement."""
    for _ in range(20):
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - under) >= MIN_COLOUR_DISTANCE:
            return colour
    return 255.0 - under


def render_image(rng: np.random.Generator, image_size: int, num_classes: int, max_objects: int,
                 min_size: int, max_size: int, noise: float, texture: float):
    """Draw one image. Returns (uint8 (H, W, 3) array, list of (category_id, [x, y, w, h], area))."""
    size = image_size
    pixels = _background(rng, size, noise, texture)
    placed: list[tuple[int, int, int, int]] = []
    objects = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _ in range(_PLACEMENT_TRIES):
            extent = rng.uniform(min_size, max_size)
            aspect = math.exp(rng.uniform(-0.2, 0.2))  # w / h within ~0.82..1.22
            w = int(np.clip(round(extent * math.sqrt(aspect)), min_size, min(max_size, size)))
            h = int(np.clip(round(extent / math.sqrt(aspect)), min_size, min(max_size, size)))
            x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            box = (x0, y0, x0 + w - 1, y0 + h - 1)
            if all(_overlap(box, other) <= MAX_OVERLAP for other in placed):
                break
        else:
            continue  # no room left for this object
        label = int(rng.integers(num_classes))
        mask = _draw_shape(SHAPES[label], size, box, rng)
        inside = np.asarray(mask) > 0
        colour = _object_colour(rng, pixels[y0:y0 + h, x0:x0 + w].reshape(-1, 3).mean(axis=0))
        pixels[inside] = colour
        left, top, right, bottom = mask.getbbox()
        placed.append(box)
        objects.append((label + 1, [left, top, right - left, bottom - top], int(inside.sum())))
    if noise > 0:
        pixels += rng.normal(0.0, noise, pixels.shape).astype(np.float32)
    return np.clip(pixels + 0.5, 0, 255).astype(np.uint8), objects


def generate(root: str | os.PathLike, num_images: int, image_size: int = 128, num_classes: int = 5,
             max_objects: int = 5, min_size: int = 12, max_size: int = 60, seed: int = 0,
             split: str = "train", noise: float = 10.0, texture: float = 1.0, image_format: str = "jpg",
             overwrite: bool = False, workers: int | None = None) -> Path:
    """Write `num_images` images of `image_size` px and their COCO annotations under root/split/.

    Each image holds 1..max_objects shapes of `num_classes` kinds (the first
    entries of SHAPES), with sides of min_size..max_size px; `noise` is the
    per-pixel noise std and `texture` the strength of the smooth background
    texture, both in 0..255 units. Image i is drawn from the seed sequence
    (seed, crc32(split), i), so splits differ even with one seed. An existing
    set made with the same arguments is reused unless `overwrite`. JPEGs are
    written at quality 95 without chroma subsampling. `workers` processes draw
    and write the images (default: one per CPU, for sets of 200 images or more);
    the files do not depend on it. Returns the path of root/split/annotations.json.
    """
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be in 1..{len(SHAPES)}, got {num_classes}")
    if not 1 <= min_size <= max_size <= image_size:
        raise ValueError(f"need 1 <= min_size <= max_size <= image_size, got {min_size}, {max_size}, {image_size}")
    if max_objects < 1 or num_images < 0:
        raise ValueError(f"need max_objects >= 1 and num_images >= 0, got {max_objects}, {num_images}")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    settings = dict(num_images=num_images, image_size=image_size, num_classes=num_classes,
                    max_objects=max_objects, min_size=min_size, max_size=max_size, seed=seed,
                    split=split, noise=float(noise), texture=float(texture), image_format=image_format)
    split_dir = Path(root) / split
    image_dir = split_dir / "images"
    annotation_file = split_dir / "annotations.json"
    if not overwrite and _is_complete(annotation_file, image_dir, settings):
        return annotation_file

    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    draw = dict(seed=seed, split_key=zlib.crc32(split.encode()), image_size=image_size, num_classes=num_classes,
                max_objects=max_objects, min_size=min_size, max_size=max_size, noise=noise, texture=texture,
                image_dir=str(image_dir), image_format=image_format)
    for index, objects in enumerate(_write_images(num_images, draw, workers)):
        image_id = index + 1
        file_name = f"{image_id:06d}.{image_format}"
        images.append(dict(id=image_id, file_name=file_name, width=image_size, height=image_size))
        for category_id, bbox, area in objects:
            annotations.append(dict(id=len(annotations) + 1, image_id=image_id, category_id=category_id,
                                    bbox=[float(v) for v in bbox], area=float(area), iscrowd=0))
    categories = [dict(id=k + 1, name=SHAPES[k], supercategory="shape") for k in range(num_classes)]
    data = dict(info=dict(description="fastdetr synthetic shapes", generator=settings),
                images=images, annotations=annotations, categories=categories)
    # Written last and atomically: a complete annotation file means a complete set.
    partial = annotation_file.with_suffix(".json.partial")
    partial.write_text(json.dumps(data))
    os.replace(partial, annotation_file)
    return annotation_file


def _write_range(start: int, stop: int, draw: dict) -> list[list]:
    """Draw and write images start..stop-1; their objects, in order."""
    image_dir = Path(draw["image_dir"])
    out = []
    for index in range(start, stop):
        rng = np.random.default_rng([draw["seed"], draw["split_key"], index])
        pixels, objects = render_image(rng, draw["image_size"], draw["num_classes"], draw["max_objects"],
                                       draw["min_size"], draw["max_size"], draw["noise"], draw["texture"])
        path = image_dir / f"{index + 1:06d}.{draw['image_format']}"
        if draw["image_format"] == "jpg":
            Image.fromarray(pixels).save(path, quality=95, subsampling=0)
        else:
            Image.fromarray(pixels).save(path, compress_level=1)
        out.append(objects)
    return out


def _write_images(num_images: int, draw: dict, workers: int | None) -> list[list]:
    """Every image's objects, in index order; drawn in `workers` processes (each image has its own RNG)."""
    if workers is None:
        from fastdetr.backend import usable_cpus

        workers = usable_cpus() if num_images >= 200 else 1
    workers = max(1, min(workers, num_images))
    if workers == 1:
        return _write_range(0, num_images, draw)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    bounds = [num_images * k // workers for k in range(workers + 1)]
    # fork where the platform has it (no re-import); each worker writes its own files
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        parts = pool.map(_write_range, bounds[:-1], bounds[1:], [draw] * workers)
        return [objects for part in parts for objects in part]


def _is_complete(annotation_file: Path, image_dir: Path, settings: dict) -> bool:
    if not annotation_file.is_file():
        return False
    try:
        data = json.loads(annotation_file.read_text())
    except (OSError, ValueError):
        return False
    if data.get("info", {}).get("generator") != settings:
        return False
    return all((image_dir / image["file_name"]).is_file() for image in data["images"])


def make_splits(root: str | os.PathLike, num_train: int, num_val: int, preset: str = "demo", seed: int = 0,
                **overrides) -> tuple[Path, Path]:
    """Generate root/train and root/val from a preset ("demo" or "easy"); `overrides` replace its settings.

    Returns the two annotation files (train, val). The splits come from
    different seed sequences (the split name is part of each image's seed).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    settings = {**PRESETS[preset], **overrides}
    train = generate(root, num_train, seed=seed, split="train", **settings)
    val = generate(root, num_val, seed=seed, split="val", **settings)
    return train, val
