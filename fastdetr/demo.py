"""`make demo` / `fastdetr demo`: train a small DETR from scratch on generated shapes, evaluate, draw.

What it does, in order, everything under `out_dir` (default out/demo):
1. generates the synthetic "easy" set (`fastdetr.data.synthetic`, 128 px images,
   3 shape classes, 1-3 objects each; 4,000 training and 200 validation images
   from different seeds) unless it is already there;
2. trains `detr_small` (half-width ResNet-18, d_model 128, 2 + 3 layers, 20
   queries: DETR's architecture and losses, only the sizes shrink) for a fixed
   time budget with `fastdetr.train`, on the GPU when there is one, else the
   CPU, evaluating on the validation split after every epoch;
3. prints pycocotools' 12-number COCO summary of the final model;
4. writes `loss_curve.png` (training loss and validation AP50 against training
   time) and `predictions.png` (predicted boxes on validation images), next to
   the run's `log.jsonl` and `checkpoint.pth`.

The recipe (shared/DESIGN.md, "The demo on a 2-core CPU"): AdamW at 2e-4 for
every parameter (a from-scratch backbone learns at the transformer's rate),
gradient clipping 0.1, no dropout, trainable BatchNorm, light augmentation
(flips and scale jitter, no crops) so that steps stay cheap; the LR drops
tenfold after 80% of the budget. On a 2-core CPU the number of updates is the
limit: batch 8 reached validation AP50 0.60 after 48k training images where
batch 16 had 0.18 and batch 4 was slower still (measured on this set, one seed
each), and data loading in the main process (no worker) ran at 99 img/s against
83 img/s with one worker competing for the two cores.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DEMO_BUDGET_S = 720.0   # training time (evaluation, data generation and set-up come on top)


@dataclass
class DemoConfig:
    """The demo's knobs; the defaults are what `make demo` runs."""

    out_dir: str = "out/demo"
    data_dir: str = "out/data/easy"
    budget_s: float = DEMO_BUDGET_S
    device: str = "auto"
    num_train: int = 4000
    num_val: int = 200
    batch_size: int = 8
    lr: float = 2e-4
    seed: int = 42
    num_workers: int = 0
    eval_every: int = 2
    progress: bool = True


def train_config(demo: DemoConfig) -> Any:
    """The `fastdetr.train.TrainConfig` the demo trains with."""
    from .train import TrainConfig

    return TrainConfig(
        synthetic="easy", data_dir=demo.data_dir, num_train=demo.num_train, num_val=demo.num_val,
        augment="light", model="detr_small", epochs=1000, batch_size=demo.batch_size,
        lr=demo.lr, lr_backbone=demo.lr, weight_decay=1e-4, clip_max_norm=0.1,
        time_budget_s=demo.budget_s, lr_drop_fraction=0.8, device=demo.device, seed=demo.seed,
        output_dir=demo.out_dir, eval_every=demo.eval_every, eval_batch_size=16, log_every=10,
        num_workers=demo.num_workers, progress=demo.progress, resume=None,
    )


def read_log(log_path: str | os.PathLike) -> list[dict[str, Any]]:
    """The JSON-lines training log as a list of event dicts (the last run's, if the file holds several)."""
    events = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    starts = [i for i, event in enumerate(events) if event["event"] == "config"]
    return events[starts[-1]:] if starts else events


def plot_training(events: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Training loss (left axis) and validation AP50 (right axis) against training time; saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [e for e in events if e["event"] == "train"]
    evals = [e for e in events if e["event"] == "eval"]
    # eval events carry the step; map steps to training time through the train events
    time_at_step = {e["step"]: e["train_time_s"] for e in train}
    figure, loss_axis = plt.subplots(figsize=(8, 4.5), dpi=110)
    loss_axis.plot([e["train_time_s"] / 60 for e in train], [e["loss"] for e in train], color="tab:blue",
                   linewidth=1, label="training loss (weighted sum, all layers)")
    loss_axis.set_xlabel("training time (min)")
    loss_axis.set_ylabel("training loss", color="tab:blue")
    loss_axis.grid(alpha=0.3)
    if evals:
        ap_axis = loss_axis.twinx()
        steps = [e["step"] for e in evals]
        times = [time_at_step.get(step, float("nan")) / 60 for step in steps]
        ap_axis.plot(times, [e["AP50"] for e in evals], "o-", color="tab:red", label="validation AP50")
        ap_axis.plot(times, [e["AP"] for e in evals], "s--", color="tab:orange", label="validation AP")
        ap_axis.set_ylabel("COCO AP", color="tab:red")
        ap_axis.set_ylim(0, 1)
        ap_axis.legend(loc="center right")
    loss_axis.legend(loc="upper right")
    loss_axis.set_title("fastdetr demo: detr_small trained from scratch on synthetic shapes")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return Path(path)


def draw_predictions(checkpoint: str | os.PathLike, image_dir: str | os.PathLike, path: str | os.PathLike,
                     num_images: int = 8, threshold: float = 0.5, device: str = "cpu") -> Path:
    """A grid of the first `num_images` validation images with the checkpoint's detections; saved as PNG."""
    from PIL import Image

    from .predict import draw_detections, load_model, predict_image

    model, info = load_model(checkpoint, device=device)
    files = sorted(Path(image_dir).glob("*.png"))[:num_images] or sorted(Path(image_dir).glob("*.jpg"))[:num_images]
    if not files:
        raise FileNotFoundError(f"{image_dir}: no .png or .jpg images to draw predictions on")
    scale, columns = 2.0, 4
    tiles = []
    for file in files:
        with Image.open(file) as opened:
            image = opened.convert("RGB")
        detections = predict_image(model, image, info["augment"], threshold)
        tiles.append(draw_detections(image, detections, info["categories"], scale=scale))
    width, height = max(t.width for t in tiles), max(t.height for t in tiles)
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * width + (columns - 1) * 4, rows * height + (rows - 1) * 4), "white")
    for index, tile in enumerate(tiles):
        sheet.paste(tile, ((index % columns) * (width + 4), (index // columns) * (height + 4)))
    sheet.save(path)
    return Path(path)


def run_demo(demo: DemoConfig) -> dict[str, Any]:
    """Train, evaluate and draw as the module docstring says; returns the training summary plus the PNG paths."""
    from .train import train

    config = train_config(demo)
    device = "cuda" if demo.device == "auto" and torch.cuda.is_available() else demo.device
    device = "cpu" if device == "auto" else device
    print(f"fastdetr demo: detr_small from scratch on the synthetic 'easy' set, {demo.budget_s:.0f} s of "
          f"training on {device} (data under {demo.data_dir}, results under {demo.out_dir})", flush=True)
    log_path = Path(demo.out_dir) / "log.jsonl"
    if log_path.exists():
        log_path.unlink()  # a fresh run: the plot reads this run's log only
    summary = train(config)
    stats = summary["eval"]
    out = Path(demo.out_dir)
    curve = plot_training(read_log(summary["log"]), out / "loss_curve.png")
    val_images = Path(demo.data_dir) / "val" / "images"
    predictions = draw_predictions(summary["checkpoint"], val_images, out / "predictions.png", device=device)
    print(f"\ntrained {summary['steps']} steps ({summary['epochs']} epochs) in {summary['train_time_s']:.0f} s")
    if stats is not None:  # train() has printed the full summary; repeat the headline
        print(f"validation ({demo.num_val} images): AP50 = {stats['AP50']:.3f}, AP = {stats['AP']:.3f}")
    print(f"wrote {curve}, {predictions}, {summary['checkpoint']} and {summary['log']}")
    return {**summary, "loss_curve": str(curve), "predictions": str(predictions)}
