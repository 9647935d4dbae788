"""`make demo` / `fastdetr demo`: train a small DETR from scratch on generated shapes, evaluate, draw.

What it does, in order, everything under `out_dir` (default out/demo):
1. generates the synthetic "easy" set (`fastdetr.data.synthetic`, 128 px images,
   3 shape classes, 1-3 objects each; 4,000 training and 200 validation images
   from different seeds) unless it is already there;
2. trains `detr_small` at the widths of `DEMO_MODEL` (a ResNet-18 at 24..192
   channels, d_model 96, 2 + 3 layers, 20 queries: DETR's architecture and
   losses, only the sizes shrink) for a fixed number of steps with
   `fastdetr.train`, on the GPU when there is one, else the CPU, evaluating on
   the validation split after every epoch. The work is fixed, not the time: a
   slow machine gets the same model as a fast one, only later. It prints a time
   estimate first, then the measured one; the progress bar shows the ETA;
3. prints pycocotools' 12-number COCO summary of the final model;
4. writes `loss_curve.png` (training loss and validation AP50 against training
   steps) and `predictions.png` (predicted boxes on validation images), next to
   the run's `log.jsonl` and `checkpoint.pth`.

The recipe (shared/DESIGN.md, "The demo on a 2-core CPU"): AdamW at 2e-4 for
every parameter (a from-scratch backbone learns at the transformer's rate),
gradient clipping 0.1, no dropout, trainable BatchNorm, flips as the only
augmentation, images at 96 px (the backbone, most of the step, costs about half
what it does at 128 px), model and images in channels_last; the LR drops
tenfold after 90% of the steps. On a 2-core CPU the number of updates is the
limit: batch 8 learned faster per second than 16 or 4, and data loading in the
main process (no worker) beat one worker competing for the two cores. The
sizes, widths and learning rates tried, and what each reached, are in the
README ("make demo").
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DEMO_STEPS = 7000       # optimizer steps of batch 8 (evaluation, data generation and set-up come on top)
# detr_small's widths shrunk further for the CPU (its architecture and losses unchanged): a ResNet-18 at
# 24/48/96/192 channels and d_model 96 (8 heads of 12), 2.4 M parameters (README: why these).
DEMO_MODEL = {"backbone_width": 24, "hidden_dim": 96}
# Training images per second of the demo's step (data loading included) on one core of a 2-core CPU
# machine of the kind CI uses (README): the printed up-front estimate; two cores or a GPU take less.
DEMO_RATE_IMG_S = 90.0


@dataclass
class DemoConfig:
    """The demo's knobs; the defaults are what `make demo` runs."""

    out_dir: str = "out/demo"
    data_dir: str = "out/data/easy"
    steps: int = DEMO_STEPS
    device: str = "auto"
    num_train: int = 4000
    num_val: int = 200
    batch_size: int = 8
    lr: float = 2e-4
    seed: int = 42
    num_workers: int = 0
    eval_every: int = 1
    progress: bool = True


def train_config(demo: DemoConfig) -> Any:
    """The `fastdetr.train.TrainConfig` the demo trains with."""
    from .train import TrainConfig

    return TrainConfig(
        synthetic="easy", data_dir=demo.data_dir, num_train=demo.num_train, num_val=demo.num_val,
        augment="tiny", model="detr_small", model_overrides=dict(DEMO_MODEL), epochs=1_000_000,
        batch_size=demo.batch_size,
        lr=demo.lr, lr_backbone=demo.lr, weight_decay=1e-4, clip_max_norm=0.1, max_steps=demo.steps,
        lr_drop_fraction=0.9, device=demo.device, seed=demo.seed, channels_last=True,
        output_dir=demo.out_dir, eval_every=demo.eval_every, eval_batch_size=16, log_every=10,
        num_workers=demo.num_workers, progress=demo.progress, resume=None,
    )


class _RateReport:
    """A step hook: after `after` steps, prints the measured speed and the time the remaining steps will take."""

    def __init__(self, total_steps: int, batch_size: int, warmup: int = 10, after: int = 60):
        self.total, self.batch_size, self.warmup, self.after = total_steps, batch_size, warmup, after
        self.start: float | None = None

    def __call__(self, info: Any) -> None:
        if info.step == self.warmup:
            self.start = time.perf_counter()
        elif info.step == self.after and self.start is not None:
            per_step = (time.perf_counter() - self.start) / (self.after - self.warmup)
            minutes = per_step * (self.total - info.step) / 60
            print(f"measured {self.batch_size / per_step:.0f} img/s: training ends in about {minutes:.1f} min "
                  "(evaluations add a few seconds each)", flush=True)


def read_log(log_path: str | os.PathLike) -> list[dict[str, Any]]:
    """The JSON-lines training log as a list of event dicts (the last run's, if the file holds several)."""
    events = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    starts = [i for i, event in enumerate(events) if event["event"] == "config"]
    return events[starts[-1]:] if starts else events


def plot_training(events: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Training loss (left axis) and validation AP50 / AP (right axis) against training steps; saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [e for e in events if e["event"] == "train"]
    evals = [e for e in events if e["event"] == "eval"]
    figure, loss_axis = plt.subplots(figsize=(8, 4.5), dpi=110)
    loss_axis.plot([e["step"] for e in train], [e["loss"] for e in train], color="tab:blue",
                   linewidth=1, label="training loss (weighted sum, all layers)")
    loss_axis.set_xlabel("training steps")
    loss_axis.set_ylabel("training loss", color="tab:blue")
    loss_axis.grid(alpha=0.3)
    if evals:
        ap_axis = loss_axis.twinx()
        steps = [e["step"] for e in evals]
        ap_axis.plot(steps, [e["AP50"] for e in evals], "o-", color="tab:red", label="validation AP50")
        ap_axis.plot(steps, [e["AP"] for e in evals], "s--", color="tab:orange", label="validation AP")
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
    minutes = demo.steps * demo.batch_size / DEMO_RATE_IMG_S / 60
    print(f"fastdetr demo: detr_small from scratch on the synthetic 'easy' set, {demo.steps} steps of batch "
          f"{demo.batch_size} on {device} (data under {demo.data_dir}, results under {demo.out_dir}); about "
          f"{minutes:.0f} min of training on one core of a 2-core CPU ({DEMO_RATE_IMG_S:.0f} img/s), less on "
          "more", flush=True)
    log_path = Path(demo.out_dir) / "log.jsonl"
    if log_path.exists():
        log_path.unlink()  # a fresh run: the plot reads this run's log only
    summary = train(config, step_hook=_RateReport(demo.steps, demo.batch_size))
    stats = summary["eval"]
    out = Path(demo.out_dir)
    curve = plot_training(read_log(summary["log"]), out / "loss_curve.png")
    val_images = Path(demo.data_dir) / "val" / "images"
    predictions = draw_predictions(summary["checkpoint"], val_images, out / "predictions.png", device=device)
    print(f"\ntrained {summary['steps']} steps ({summary['epochs']} epochs) in {summary['train_time_s']:.0f} s "
          f"({summary['steps'] * demo.batch_size / max(summary['train_time_s'], 1e-9):.0f} img/s)")
    if stats is not None:  # train() has printed the full summary; repeat the headline
        print(f"validation ({demo.num_val} images): AP50 = {stats['AP50']:.3f}, AP = {stats['AP']:.3f}")
    print(f"wrote {curve}, {predictions}, {summary['checkpoint']} and {summary['log']}")
    return {**summary, "loss_curve": str(curve), "predictions": str(predictions)}
