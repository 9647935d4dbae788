"""fastdetr.data: the synthetic generator, CocoDetection, DETR's augmentation, collate_fn, bad data."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastdetr.data import (
    PRESETS,
    SYNTHETIC_AUGMENT,
    AugmentConfig,
    BadAnnotationError,
    BadDataWarning,
    BadImageError,
    CocoDetection,
    build_synthetic,
    collate_fn,
    make_splits,
)
from fastdetr.data.synthetic import generate
from fastdetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD, crop, hflip, resize, resized_size

TINY = dict(image_size=64, num_classes=5, max_objects=5, min_size=8, max_size=30)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    """Six 64-px images; returns the annotation file (its images are in ./images)."""
    return generate(tmp_path_factory.mktemp("tiny"), 6, seed=3, **TINY)


def _copy_set(annotation_file: Path, destination: Path) -> Path:
    shutil.copytree(annotation_file.parent, destination)
    return destination / annotation_file.name


def _files(split_dir: Path) -> dict[str, bytes]:
    return {path.relative_to(split_dir).as_posix(): path.read_bytes()
            for path in sorted(split_dir.rglob("*")) if path.is_file()}


# ---- synthetic generator ---------------------------------------------------------------------------

def test_generate_is_deterministic(tmp_path):
    first = generate(tmp_path / "a", 5, seed=7, **TINY)
    again = generate(tmp_path / "b", 5, seed=7, workers=2, **TINY)   # two processes write the same files
    other_seed = generate(tmp_path / "c", 5, seed=8, **TINY)
    assert _files(first.parent) == _files(again.parent)
    assert first.read_bytes() == again.read_bytes()
    assert json.loads(first.read_text())["annotations"] != json.loads(other_seed.read_text())["annotations"]
    assert (first.parent / "images/000001.jpg").read_bytes() != (other_seed.parent / "images/000001.jpg").read_bytes()


def test_splits_differ_and_existing_set_is_reused(tmp_path):
    train, val = make_splits(tmp_path, 4, 4, preset="easy", image_format="png")
    assert train.parent.name == "train" and val.parent.name == "val"
    train_images = {p.name: p.read_bytes() for p in (train.parent / "images").iterdir()}
    val_images = {p.name: p.read_bytes() for p in (val.parent / "images").iterdir()}
    assert train_images.keys() == val_images.keys() and all(train_images[k] != val_images[k] for k in train_images)
    stamp = train.stat().st_mtime_ns
    assert make_splits(tmp_path, 4, 4, preset="easy", image_format="png")[0].stat().st_mtime_ns == stamp
    generate(tmp_path, 3, split="train", **PRESETS["easy"])  # other arguments: regenerated
    assert len(json.loads(train.read_text())["images"]) == 3


@pytest.mark.parametrize("preset", ["demo", "easy"])
def test_annotations_are_sane(tmp_path, preset):
    settings = PRESETS[preset]
    data = json.loads(generate(tmp_path, 12, seed=1, **settings).read_text())
    size = settings["image_size"]
    assert [c["id"] for c in data["categories"]] == list(range(1, settings["num_classes"] + 1))
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
    per_image = {image["id"]: 0 for image in data["images"]}
    for annotation in data["annotations"]:
        x, y, w, h = annotation["bbox"]
        assert 0 <= x and 0 <= y and x + w <= size and y + h <= size
        # Shapes are drawn in a min_size..max_size box; a star or triangle covers a bit less of it.
        assert settings["min_size"] // 2 <= min(w, h) and max(w, h) <= settings["max_size"]
        assert 0 < annotation["area"] <= w * h and annotation["iscrowd"] == 0
        assert 1 <= annotation["category_id"] <= settings["num_classes"]
        per_image[annotation["image_id"]] += 1
    assert all(1 <= count <= settings["max_objects"] for count in per_image.values())
    assert max(per_image.values()) > 1
    for image in data["images"]:
        with Image.open(tmp_path / "train/images" / image["file_name"]) as pil:
            assert pil.size == (image["width"], image["height"]) == (size, size)


# ---- CocoDetection output ----------------------------------------------------------------------------

def _unnormalise(image: torch.Tensor) -> torch.Tensor:
    return image * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)


def test_validation_sample_matches_file(tiny_set):
    dataset = CocoDetection(tiny_set.parent / "images", tiny_set, train=False, augment=AugmentConfig(val_size=32))
    data = json.loads(tiny_set.read_text())
    assert len(dataset) == 6 and dataset.num_classes == 6
    image, target = dataset[2]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert target["size"].tolist() == [32, 32] and target["orig_size"].tolist() == [64, 64]
    assert target["image_id"].tolist() == [data["images"][2]["id"]]
    expected = [a for a in data["annotations"] if a["image_id"] == data["images"][2]["id"]]
    boxes = torch.tensor([[(x + w / 2) / 64, (y + h / 2) / 64, w / 64, h / 64] for x, y, w, h in
                          (a["bbox"] for a in expected)])
    torch.testing.assert_close(target["boxes"], boxes)
    assert target["labels"].tolist() == [a["category_id"] for a in expected]
    torch.testing.assert_close(target["area"], torch.tensor([a["area"] / 4 for a in expected]))
    # Normalised with ImageNet statistics: undoing it gives the file's pixels, resized.
    with Image.open(tiny_set.parent / "images" / data["images"][2]["file_name"]) as pil:
        pixels = torch.from_numpy(np.array(pil.convert("RGB").resize((32, 32), Image.BILINEAR))) / 255
    torch.testing.assert_close(_unnormalise(image).permute(1, 2, 0), pixels, atol=1e-5, rtol=0)


def test_train_samples_have_valid_shapes_and_ranges(tiny_set):
    dataset = CocoDetection(tiny_set.parent / "images", tiny_set, train=True, seed=0,
                            augment=AugmentConfig(scales=(48, 64, 80), max_size=100, crop_resize_scales=(48, 64),
                                                  crop_size=(32, 48), val_size=64))
    sizes = set()
    for epoch in range(4):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            image, target = dataset[index]
            n = len(target["labels"])
            assert image.dtype == torch.float32 and image.shape[0] == 3
            assert target["size"].tolist() == list(image.shape[1:])
            # The shorter side is one of the scales unless the longer one hit max_size.
            assert min(image.shape[1:]) in (48, 64, 80) or max(image.shape[1:]) in (99, 100)
            assert target["boxes"].shape == (n, 4) and target["boxes"].dtype == torch.float32
            assert target["labels"].dtype == torch.int64 and target["iscrowd"].tolist() == [0] * n
            assert target["area"].shape == (n,) and bool((target["area"] > 0).all())
            assert bool((target["boxes"] >= 0).all() and (target["boxes"] <= 1).all())
            assert bool((target["boxes"][:, 2:] > 0).all())
            assert -0.1 <= float(_unnormalise(image).min()) and float(_unnormalise(image).max()) <= 1.1
            sizes.add(tuple(image.shape[1:]))
    assert len(sizes) > 1
    # A seeded dataset repeats an epoch's augmentation exactly.
    dataset.set_epoch(2)
    first, again = dataset[1], dataset[1]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1]["boxes"], again[1]["boxes"])


def test_build_synthetic(tmp_path):
    train, val = build_synthetic(tmp_path, num_train=3, num_val=2, preset="easy")
    assert (len(train), len(val)) == (3, 2) and train.train and not val.train
    assert train.augment == SYNTHETIC_AUGMENT and train.num_classes == 4
    image, target = val[0]
    assert image.shape == (3, 128, 128) and 1 <= len(target["boxes"]) <= 3


# ---- transforms on known boxes -----------------------------------------------------------------------

def _target(boxes) -> dict[str, torch.Tensor]:
    boxes = torch.tensor(boxes, dtype=torch.float32)
    return dict(boxes=boxes, labels=torch.arange(1, len(boxes) + 1), iscrowd=torch.zeros(len(boxes), dtype=torch.int64),
                area=(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))


def test_hflip_mirrors_boxes():
    image = Image.new("RGB", (100, 50))
    image.putpixel((10, 20), (255, 0, 0))
    flipped, target = hflip(image, _target([[10, 20, 30, 40], [0, 0, 100, 50]]))
    assert target["boxes"].tolist() == [[70, 20, 90, 40], [0, 0, 100, 50]]
    assert flipped.getpixel((89, 20)) == (255, 0, 0)


def test_resize_scales_boxes_and_respects_max_size():
    assert resized_size(200, 100, 50, None) == (100, 50)
    assert resized_size(100, 300, 80, None) == (80, 240)
    assert resized_size(1000, 100, 800, 1333) == (1330, 133)  # the longer side would be 8000
    assert resized_size(640, 480, 800, 1333) == (1066, 800)
    image, target = resize(Image.new("RGB", (200, 100)), _target([[20, 10, 60, 50]]), 50)
    assert image.size == (100, 50) and target["size"].tolist() == [50, 100]
    assert target["boxes"].tolist() == [[10, 5, 30, 25]] and target["area"].tolist() == [400]


def test_crop_clips_and_drops_boxes():
    boxes = [[10, 10, 30, 30], [60, 50, 90, 70], [0, 0, 5, 5], [35, 5, 45, 80]]
    image, target = crop(Image.new("RGB", (100, 100)), _target(boxes), top=20, left=25, height=40, width=30)
    assert image.size == (30, 40) and target["size"].tolist() == [40, 30]
    # Box 0 keeps its corner 25..30 x 20..30; box 1 lies right of the window (x >= 55) and box 2
    # above-left of it: both dropped; box 3 is cut to the window's height.
    assert target["boxes"].tolist() == [[0, 0, 5, 10], [10, 0, 20, 40]]
    assert target["labels"].tolist() == [1, 4] and target["area"].tolist() == [50, 400]


def test_transformed_boxes_follow_the_pixels(tmp_path):
    """A white square on black, through many random train augmentations: the box stays on the square."""
    pixels = Image.new("RGB", (64, 48))
    pixels.paste((255, 255, 255), (40, 8, 56, 24))
    pixels.save(tmp_path / "square.png")
    data = dict(images=[dict(id=1, file_name="square.png", width=64, height=48)], categories=[dict(id=3, name="sq")],
                annotations=[dict(id=9, image_id=1, category_id=3, bbox=[40, 8, 16, 16], area=256, iscrowd=0)])
    (tmp_path / "a.json").write_text(json.dumps(data))
    dataset = CocoDetection(tmp_path, tmp_path / "a.json", seed=1,
                            augment=AugmentConfig(scales=(48, 64, 96), max_size=128, crop_resize_scales=(48,),
                                                  crop_size=(24, 48), val_size=48))
    for epoch in range(30):
        dataset.set_epoch(epoch)
        image, target = dataset[0]
        white = _unnormalise(image).mean(0) > 0.5
        height, width = white.shape
        if len(target["boxes"]) == 0:
            assert not bool(white.any())
            continue
        cx, cy, w, h = (target["boxes"][0] * torch.tensor([width, height, width, height])).tolist()
        rows, cols = white.any(1).nonzero().flatten(), white.any(0).nonzero().flatten()
        assert abs(cols.min() - (cx - w / 2)) <= 1.5 and abs(cols.max() + 1 - (cx + w / 2)) <= 1.5
        assert abs(rows.min() - (cy - h / 2)) <= 1.5 and abs(rows.max() + 1 - (cy + h / 2)) <= 1.5


# ---- collate_fn ---------------------------------------------------------------------------------------

def test_collate_pads_and_masks():
    small = (torch.randn(3, 4, 6), dict(boxes=torch.rand(2, 4)))
    tall = (torch.randn(3, 7, 5), dict(boxes=torch.rand(0, 4)))
    batch, targets = collate_fn([small, tall])
    assert batch.tensors.shape == (2, 3, 7, 6) and batch.mask.shape == (2, 7, 6)
    assert torch.equal(batch.tensors[0, :, :4, :6], small[0]) and torch.equal(batch.tensors[1, :, :7, :5], tall[0])
    assert not bool(batch.mask[0, :4, :6].any()) and bool(batch.mask[0, 4:].all())
    assert not bool(batch.mask[1, :, :5].any()) and bool(batch.mask[1, :, 5:].all())
    assert float(batch.tensors[0, :, 4:].abs().sum()) == 0 and float(batch.tensors[1, :, :, 5:].abs().sum()) == 0
    assert targets[0] is small[1] and targets[1] is tall[1]


def test_loader_batches_a_generated_set(tiny_set):
    dataset = CocoDetection(tiny_set.parent / "images", tiny_set, train=True, augment=SYNTHETIC_AUGMENT)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate_fn)
    sizes = [len(batch.tensors) for batch, targets in loader]
    assert sizes == [4, 2]


# ---- bad data -------------------------------------------------------------------------------------------

def _break_annotation(annotation_file: Path, change) -> int:
    """Apply `change` to the first annotation of image 2; returns that annotation's id."""
    data = json.loads(annotation_file.read_text())
    annotation = next(a for a in data["annotations"] if a["image_id"] == 2)
    change(annotation)
    annotation_file.write_text(json.dumps(data))
    return annotation["id"]


BAD_ANNOTATIONS = {
    "outside the image": lambda a: a.update(bbox=[50.0, 10.0, 20.0, 10.0]),
    "negative width": lambda a: a.update(bbox=[10.0, 10.0, -5.0, 10.0]),
    "zero height": lambda a: a.update(bbox=[10.0, 10.0, 5.0, 0.0]),
    "unknown category": lambda a: a.update(category_id=42),
    "not finite": lambda a: a.update(bbox=[10.0, float("nan"), 5.0, 5.0]),
}


@pytest.mark.parametrize("problem", sorted(BAD_ANNOTATIONS))
def test_bad_annotation_raises_or_is_skipped(tiny_set, tmp_path, problem):
    annotation_file = _copy_set(tiny_set, tmp_path / "set")
    bad_id = _break_annotation(annotation_file, BAD_ANNOTATIONS[problem])
    with pytest.raises(BadAnnotationError) as raised:
        CocoDetection(annotation_file.parent / "images", annotation_file)
    message = str(raised.value)
    assert str(annotation_file) in message and f"annotation id {bad_id} " in message and "000002.jpg" in message

    with pytest.warns(BadDataWarning, match=f"annotation id {bad_id} "):
        dataset = CocoDetection(annotation_file.parent / "images", annotation_file, train=False, skip_bad=True)
    assert dataset.skipped == dict(annotations=1, images=0)
    assert len(dataset.problems) == 1 and "skipped 1 bad annotation" in dataset.skip_summary()
    data = json.loads(annotation_file.read_text())
    kept = [a for a in data["annotations"] if a["image_id"] == 2 and a["id"] != bad_id]
    assert len(dataset[1][1]["labels"]) == len(kept) and len(dataset) == 6


def test_crowd_annotations_are_dropped(tiny_set, tmp_path):
    annotation_file = _copy_set(tiny_set, tmp_path / "set")
    _break_annotation(annotation_file, lambda a: a.update(iscrowd=1, bbox=[-50, 0, 0, 0]))
    data = json.loads(annotation_file.read_text())
    dataset = CocoDetection(annotation_file.parent / "images", annotation_file, train=False)
    assert len(dataset[1][1]["labels"]) == sum(a["image_id"] == 2 and not a["iscrowd"] for a in data["annotations"])


def _remove(path: Path) -> None:
    path.unlink()


def _corrupt(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])  # a truncated JPEG


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not an image" * 10)


def _wrong_size(path: Path) -> None:
    Image.new("RGB", (10, 20)).save(path, format="JPEG")


@pytest.mark.parametrize("damage", [_remove, _corrupt, _garbage, _wrong_size], ids=lambda f: f.__name__[1:])
def test_bad_image_raises_or_is_skipped(tiny_set, tmp_path, damage):
    annotation_file = _copy_set(tiny_set, tmp_path / "set")
    image_path = annotation_file.parent / "images" / "000002.jpg"
    damage(image_path)
    data = json.loads(annotation_file.read_text())
    annotation_ids = [a["id"] for a in data["annotations"] if a["image_id"] == 2]

    dataset = CocoDetection(annotation_file.parent / "images", annotation_file, train=False)
    dataset[0]
    with pytest.raises(BadImageError) as raised:
        dataset[1]
    message = str(raised.value)
    assert str(image_path) in message and "image id 2 " in message and str(annotation_ids) in message

    dataset = CocoDetection(annotation_file.parent / "images", annotation_file, train=False, skip_bad=True)
    with pytest.warns(BadDataWarning, match="000002.jpg"):
        image, target = dataset[1]
    assert target["image_id"].tolist() == [3]  # replaced by the next readable image
    assert dataset.skipped == dict(annotations=0, images=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known bad: skipped again without a second warning
        assert dataset[1][1]["image_id"].tolist() == [3]
    assert dataset.skipped == dict(annotations=0, images=1) and "1 bad image" in dataset.skip_summary()


def test_skipped_images_are_counted_across_worker_processes(tiny_set, tmp_path):
    annotation_file = _copy_set(tiny_set, tmp_path / "set")
    _garbage(annotation_file.parent / "images" / "000004.jpg")
    dataset = CocoDetection(annotation_file.parent / "images", annotation_file, train=False, skip_bad=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=1, collate_fn=collate_fn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadDataWarning)
        ids = [t["image_id"].item() for _, targets in loader for t in targets]
    assert ids == [1, 2, 3, 5, 5, 6]
    assert dataset.skipped["images"] == 1


def test_unreadable_annotation_file(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(BadAnnotationError, match="broken.json"):
        CocoDetection(tmp_path, tmp_path / "broken.json")


def _edit_json(annotation_file: Path, change) -> dict:
    data = json.loads(annotation_file.read_text())
    change(data)
    annotation_file.write_text(json.dumps(data))
    return data


@pytest.mark.parametrize("skip_bad", [False, True])
def test_repeated_image_ids_always_raise(tiny_set, tmp_path, skip_bad):
    annotation_file = _copy_set(tiny_set, tmp_path / "set")
    _edit_json(annotation_file, lambda data: data["images"][3].update(id=2))  # 000004.jpg gets image 2's id
    with pytest.raises(BadAnnotationError) as raised:
        CocoDetection(annotation_file.parent / "images", annotation_file, skip_bad=skip_bad)
    message = str(raised.value)
    assert str(annotation_file) in message and "1 image id(s) occur more than once: 2 x2 (000002.jpg, 000004.jpg)" \
        in message and "skip_bad does not apply" in message


@pytest.mark.parametrize("skip_bad", [False, True])
def test_repeated_annotation_ids_always_raise_naming_the_first_five_and_a_count(tiny_set, tmp_path, skip_bad):
    annotation_file = _copy_set(tiny_set, tmp_path / "set")

    def repeat(data):  # every odd annotation takes the id of the one before it; one of them is a crowd box
        for previous, annotation in zip(data["annotations"][0::2], data["annotations"][1::2]):
            annotation["id"] = previous["id"]
        data["annotations"][1]["iscrowd"] = 1

    data = _edit_json(annotation_file, repeat)
    repeated = [a["id"] for a in data["annotations"][0::2]][:len(data["annotations"]) // 2]
    assert len(repeated) > 5
    with pytest.raises(BadAnnotationError) as raised:
        CocoDetection(annotation_file.parent / "images", annotation_file, skip_bad=skip_bad)
    message = str(raised.value)
    first = data["annotations"][0]
    assert str(annotation_file) in message
    assert f"{len(repeated)} annotation id(s) occur more than once: {first['id']} x2 (image id {first['image_id']}, " \
        in message
    assert all(f"; {key} x2 (" in message for key in repeated[1:5]) and f"; {repeated[5]} x2" not in message
    assert message.count(" x2 (") == 5 and f"and {len(repeated) - 5} more" in message


ESCAPES = ["../outside.jpg", "../../etc/passwd", "sub/../../outside.jpg", "/etc/passwd", "..", "", "."]


@pytest.mark.parametrize("file_name", ESCAPES)
def test_file_name_leaving_the_image_folder_is_refused_unopened(tiny_set, tmp_path, monkeypatch, file_name):
    annotation_file = _copy_set(tiny_set, tmp_path / "set")
    images = annotation_file.parent / "images"
    shutil.copy(images / "000002.jpg", annotation_file.parent / "outside.jpg")  # a real image, one level up
    _edit_json(annotation_file, lambda data: data["images"][1].update(file_name=file_name))
    opened = []
    original_open = Image.open
    monkeypatch.setattr(Image, "open", lambda path, *a, **k: opened.append(Path(path)) or original_open(path, *a, **k))
    with pytest.raises(BadAnnotationError) as raised:
        CocoDetection(images, annotation_file)
    message = str(raised.value)
    assert str(annotation_file) in message and f"image entry 2 has file_name {file_name!r}" in message
    assert "not a relative path inside the image folder" in message

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = CocoDetection(images, annotation_file, train=False, skip_bad=True, augment=SYNTHETIC_AUGMENT)
    assert all(issubclass(warning.category, BadDataWarning) for warning in caught)
    assert f"image entry 2 has file_name {file_name!r}" in str(caught[0].message)
    assert len(dataset) == 5 and dataset.skipped["images"] == 1
    assert dataset.skipped["annotations"] > 0  # image 2's annotations lost their image
    assert [int(dataset[i][1]["image_id"]) for i in range(len(dataset))] == [1, 3, 4, 5, 6]
    assert all(path.parent == images for path in opened) and len(opened) == 5


def test_file_names_in_subfolders_stay_allowed(tiny_set, tmp_path):
    annotation_file = _copy_set(tiny_set, tmp_path / "set")
    images = annotation_file.parent / "images"
    (images / "sub" / "deeper").mkdir(parents=True)
    (images / "000002.jpg").rename(images / "sub" / "deeper" / "000002.jpg")

    def move(data):
        data["images"][1]["file_name"] = "sub/deeper/000002.jpg"
        data["images"][2]["file_name"] = "sub/../000003.jpg"  # leaves sub, not the image folder
        data["images"][3]["file_name"] = "./000004.jpg"

    _edit_json(annotation_file, move)
    dataset = CocoDetection(images, annotation_file, train=False, augment=SYNTHETIC_AUGMENT)
    expected = CocoDetection(tiny_set.parent / "images", tiny_set, train=False, augment=SYNTHETIC_AUGMENT)
    for index in (1, 2, 3):
        torch.testing.assert_close(dataset[index][0], expected[index][0], rtol=0, atol=0)
