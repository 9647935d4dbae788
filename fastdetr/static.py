"""The static-shape training step: size buckets, padded batches, and the step a CUDA graph captures and replays.

A DETR batch changes shape every step: images are padded to the batch's
largest height and width, and every image has its own number of targets. A
CUDA graph replays fixed shapes only. So, with `fastdetr train --static-shapes true`:

- Size buckets (`SizeBuckets`): a batch's padded height and width are each
  rounded up to a multiple of `step` pixels, up to `max_side`; a batch with a
  larger side fits no bucket. With DETR's COCO augmentation and the default
  step (`default_step`: a twelfth of the longest side, rounded up to 32 px: 128
  px for COCO's 1333) there are at most 11 x 11 buckets (30-38 seen at batch
  2-8), and the padding they add costs what `fastdetr buckets` reports (the
  README quotes it: about 12-14% more pixels than padding each batch to its
  largest image).
- Targets: padded to `max_targets` slots per image with a validity mask
  (`fastdetr.padded`); matcher and criterion take that form
  (`SetCriterion.forward_padded`: every decoder layer's losses in one batched
  computation, no data-dependent shape, no host sync with the device solver).
- `StaticCollate` pads in the DataLoader's workers and says, per batch, whether
  it fits: an image with more than `max_targets` targets, or a side over
  `max_side`, sends the batch down the dynamic (eager) path, and the trainer
  counts those batches in its log.
- `StaticStep` runs forward, matcher, losses, backward, gradient clipping
  (foreach, on the device) and AdamW. Eagerly (on a CPU: the path CI tests),
  or with `cuda_graph=True` captured once per bucket after `warmup` eager steps
  of that bucket, all graphs in one memory pool, then replayed: the optimizer is
  capturable with a device learning rate, and each step's logged losses are a
  row of a device tensor that the trainer copies out (no sync). Gradients are
  set to None before each backward, as on the dynamic path, so the backward
  writes them rather than adding into old ones; under graphs each graph's live
  in its pool. The graphs share the pool safely because they never run at
  once and everything one replay leaves behind (its logged row) is copied out
  before the next replay.

What a captured step cannot do: fp16 with a GradScaler (its inf check reads
the host), several processes (DDP's reducer is not captured here), and a host
solver (scipy); `StaticStep` refuses those with a clear error.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from .criterion import SetCriterion, total_loss
from .data.transforms import AugmentConfig, train_output_size
from .nested import ImageBatch, batch_images
from .optim import clip_grad_norm
from .padded import PaddedTargets, max_target_count, pad_targets

# COCO train2017's image sizes, approximately: nearly every image has a 640-px longer side; this is the
# mix of shapes written down here (width, height, share), not read from the annotations. The padding
# report takes the real sizes from an annotations file instead (`--annotations`).
COCO_IMAGE_SIZES: tuple[tuple[int, int, float], ...] = (
    (640, 480, 0.42), (640, 427, 0.25), (480, 640, 0.12), (427, 640, 0.07), (640, 360, 0.05), (640, 640, 0.03),
    (500, 375, 0.03), (640, 512, 0.03))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def default_step(augment: AugmentConfig) -> int:
    """The bucket step for `augment`: a twelfth of its longest training side, rounded up to 32 px."""
    return _round_up(max(1, math.ceil(_longest_side(augment) / 12)), 32)


def _longest_side(augment: AugmentConfig) -> int:
    """The longest side `augment` gives a training image (its longer-side cap, else 2x the largest scale)."""
    return augment.max_size if augment.max_size is not None else 2 * max(augment.scales)


@dataclass(frozen=True)
class SizeBuckets:
    """A batch padded to (H, W) goes to the bucket (H, W) rounded up to multiples of `step`, when both fit max_side.

    step: pixels, a positive multiple of 32 (the backbone's stride, so every bucket's feature
        map has whole cells). max_side: the largest bucket side (rounded up to `step`).
    """

    step: int
    max_side: int

    def __post_init__(self) -> None:
        if self.step < 32 or self.step % 32:
            raise ValueError(f"SizeBuckets: step must be a positive multiple of 32 pixels, got {self.step!r}")
        if self.max_side < 1:
            raise ValueError(f"SizeBuckets: max_side must be positive, got {self.max_side!r}")
        object.__setattr__(self, "max_side", _round_up(self.max_side, self.step))

    @classmethod
    def for_augment(cls, augment: AugmentConfig, step: int | None = None) -> "SizeBuckets":
        """Buckets for batches of `augment`'s training images: up to its longest side, `default_step` by default."""
        return cls(step or default_step(augment), _longest_side(augment))

    def bucket(self, height: int, width: int) -> tuple[int, int] | None:
        """The (H, W) bucket of a batch padded to height x width, or None when a side exceeds max_side."""
        bucket = (_round_up(height, self.step), _round_up(width, self.step))
        return bucket if max(bucket) <= self.max_side else None

    def sizes(self) -> list[tuple[int, int]]:
        """Every bucket, smallest first."""
        sides = range(self.step, self.max_side + 1, self.step)
        return [(height, width) for height in sides for width in sides]


# ---- the padded batch ----------------------------------------------------------------------------------


class StaticBatch(NamedTuple):
    """What `StaticCollate` gives per batch.

    images: padded to the bucket (or, for a batch on the dynamic path, to its largest image).
    targets: the B target dicts as `collate_fn` gives them (image ids, sizes, ...).
    padded: the targets padded to max_targets slots, or None for a batch on the dynamic path.
    bucket: (H, W) or None; reason: why a batch takes the dynamic path ("" when it does not).
    """

    images: ImageBatch
    targets: list[dict[str, Tensor]]
    padded: PaddedTargets | None
    bucket: tuple[int, int] | None
    reason: str


@dataclass(frozen=True)
class StaticCollate:
    """A DataLoader collate_fn: pads images to their bucket and targets to max_targets slots (in the workers)."""

    buckets: SizeBuckets
    max_targets: int
    num_classes: int

    def __call__(self, batch: Sequence[tuple[Tensor, dict[str, Tensor]]]) -> StaticBatch:
        images, targets = (list(items) for items in zip(*batch))
        height = max(image.shape[1] for image in images)
        width = max(image.shape[2] for image in images)
        bucket = self.buckets.bucket(height, width)
        most = max_target_count(targets)
        reason = ""
        if bucket is None:
            reason = f"size {height}x{width} exceeds the largest bucket side {self.buckets.max_side}"
        elif most > self.max_targets:
            reason = f"an image has {most} targets, more than max_targets={self.max_targets}"
        if reason:
            return StaticBatch(batch_images(images), targets, None, None, reason)
        padded = pad_targets(targets, self.max_targets, self.num_classes)
        return StaticBatch(batch_images(images, bucket), targets, padded, bucket, "")


# ---- the step ----------------------------------------------------------------------------------------


def float_outputs(outputs: dict[str, Any]) -> dict[str, Any]:
    """Model outputs in fp32 (the criterion's softmax, L1 and GIoU run in fp32 under mixed precision)."""
    converted = {key: value.float() for key, value in outputs.items() if isinstance(value, Tensor)}
    if "aux_outputs" in outputs:
        converted["aux_outputs"] = [{key: value.float() for key, value in aux.items()}
                                    for aux in outputs["aux_outputs"]]
    if "enc_outputs" in outputs:  # a two-stage Deformable DETR's encoder proposals
        converted["enc_outputs"] = {key: value.float() for key, value in outputs["enc_outputs"].items()}
    return converted


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Put an AdamW in the form a CUDA graph can replay: capturable, its learning rates 0-d device tensors.

    Call before its first step or after loading its state (`load_state_dict` brings back floats).
    A learning rate change is then `lr.fill_(value)`, which the replayed graph sees.
    """
    for group in optimizer.param_groups:
        group["capturable"] = True
        if not isinstance(group["lr"], Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)


class StaticStep:
    """One training step on a padded batch: forward, padded losses, backward, clipping, optimizer step.

    model: the (possibly DDP-wrapped) model; criterion: a SetCriterion; optimizer: its AdamW;
    trainable: the parameters to clip; clip_max_norm: 0 disables clipping; amp: "bf16", "fp16" or
    None; logged: the loss names of the returned row ("loss" is the weighted total).
    scaler: a GradScaler for fp16 (eager only). cuda_graph: capture one graph per bucket after
    `warmup` eager steps of it (module docstring).

    `__call__(images, padded)` returns a [len(logged)] float32 device tensor. With graphs it is
    the graph's own output, overwritten by the next replay: copy it before the next step.
    Counters: `eager_steps`, `replays`, `captures` (per bucket in `graph_buckets`).
    """

    def __init__(self, model: nn.Module, criterion: SetCriterion, optimizer: torch.optim.Optimizer,
                 trainable: Sequence[Tensor], clip_max_norm: float, amp: str | None, logged: Sequence[str],
                 scaler: torch.amp.GradScaler | None = None, cuda_graph: bool = False, warmup: int = 3,
                 memory_format: torch.memory_format = torch.preserve_format):
        self.model, self.criterion, self.optimizer = model, criterion, optimizer
        self.trainable, self.clip_max_norm, self.amp = list(trainable), clip_max_norm, amp
        self.logged, self.scaler, self.cuda_graph = list(logged), scaler, cuda_graph
        self.warmup, self.memory_format = warmup, memory_format
        self.eager_steps = self.replays = self.captures = 0
        self.seen: Counter[tuple[int, ...]] = Counter()
        self.graphs: dict[tuple[int, ...], tuple[Any, tuple[Tensor, ...], Tensor]] = {}
        self.pool: Any = None
        if cuda_graph:
            self._check_capturable()

    def _check_capturable(self) -> None:
        device = next(iter(self.trainable)).device
        problems = []
        if device.type != "cuda":
            problems.append(f"the model is on {device}, and CUDA graphs need a CUDA device")
        if self.amp == "fp16":
            problems.append("fp16's GradScaler reads its inf check on the host: use bf16 or fp32")
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            problems.append("several processes (DDP) are not captured: use --static-shapes without --cuda-graph")
        matcher = self.criterion.matcher
        if getattr(matcher, "backend", None) not in ("auto", "triton"):
            problems.append(f"the matcher's {getattr(matcher, 'backend', type(matcher).__name__)!r} solver runs on "
                            "the host: use matcher_backend 'auto' or 'triton'")
        if problems:
            raise ValueError("StaticStep(cuda_graph=True): " + "; ".join(problems))
        make_capturable(self.optimizer, device)

    def __call__(self, images: ImageBatch, padded: PaddedTargets) -> Tensor:
        inputs = (images.tensors, images.mask, *padded)
        key = tuple(inputs[0].shape) + tuple(padded.labels.shape)
        if key in self.graphs:
            graph, static_inputs, logged = self.graphs[key]
            for static, value in zip(static_inputs, inputs):
                static.copy_(value, non_blocking=True)
            graph.replay()
            self.replays += 1
            return logged
        device = next(iter(self.trainable)).device
        inputs = tuple(value.to(device, non_blocking=True) for value in inputs)
        self.seen[key] += 1
        if self.cuda_graph and self.seen[key] > self.warmup:
            return self._capture(key, inputs)
        self.eager_steps += 1
        if self.cuda_graph:  # warm-up on a side stream, as graph capture asks (lazy inits see the capture's stream)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                logged = self.step(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            return logged
        return self.step(*inputs)

    @property
    def graph_buckets(self) -> list[tuple[int, ...]]:
        return sorted(self.graphs)

    def _capture(self, key: tuple[int, ...], inputs: tuple[Tensor, ...]) -> Tensor:
        """Capture the step on copies of `inputs` (its static inputs), then replay it once: the step of this batch."""
        static_inputs = tuple(value.clone() for value in inputs)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logged = self.step(*static_inputs)
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[key] = (graph, static_inputs, logged)
        self.captures += 1
        graph.replay()
        self.replays += 1
        return logged

    def step(self, images: Tensor, mask: Tensor, labels: Tensor, boxes: Tensor, valid: Tensor) -> Tensor:
        """The step itself on device tensors; returns the logged row. Every op's shape follows the inputs' shapes."""
        images = images.contiguous(memory_format=self.memory_format)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast(images.device):
            outputs = self.model(ImageBatch(images, mask))
        loss_dict = self.criterion.forward_padded(float_outputs(outputs), PaddedTargets(labels, boxes, valid))
        loss = total_loss(loss_dict, self.criterion.weight_dict)
        if self.scaler is not None and self.scaler.is_enabled():
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            if self.clip_max_norm > 0:
                clip_grad_norm(self.trainable, self.clip_max_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if self.clip_max_norm > 0:
                clip_grad_norm(self.trainable, self.clip_max_norm)
            self.optimizer.step()
        return torch.stack([loss.detach(), *(loss_dict[name].detach() for name in self.logged[1:])])

    def _autocast(self, device: torch.device):
        # no weight-cast cache under graphs: cached casts would outlive the capture that made them
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda" and self.amp is not None,
                              cache_enabled=not self.cuda_graph)

    def counters(self) -> dict[str, int]:
        return {"eager_steps": self.eager_steps, "replays": self.replays, "graphs": self.captures}


# ---- the padding report ----------------------------------------------------------------------------------


def padding_report(augment: AugmentConfig, batch_size: int, step: int | None = None,
                   image_sizes: Sequence[tuple[int, int, float]] = COCO_IMAGE_SIZES, batches: int = 4000,
                   seed: int = 0) -> dict[str, Any]:
    """What bucketing costs: `batches` random batches of training images drawn from `image_sizes`.

    image_sizes: (width, height, share) rows. Returns the step, max_side, the buckets used and
    possible, the share of batches fitting no bucket, and the padded pixels per image pixel:
    `dynamic_pixels` (batches padded to their largest image, today's path) and `static_pixels`
    (padded to the bucket); `extra_cost` = static / dynamic - 1, the compute the buckets add.
    """
    buckets = SizeBuckets.for_augment(augment, step)
    generator = torch.Generator().manual_seed(seed)
    shares = torch.tensor([share for _, _, share in image_sizes], dtype=torch.float64)
    picks = torch.multinomial(shares, batches * batch_size, replacement=True, generator=generator).tolist()
    image_area = dynamic = static = 0.0
    used: Counter[tuple[int, int]] = Counter()
    unfit = 0
    for b in range(batches):
        sizes = [train_output_size(*image_sizes[k][:2], augment, generator)
                 for k in picks[b * batch_size:(b + 1) * batch_size]]
        height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
        bucket = buckets.bucket(height, width)
        image_area += sum(h * w for h, w in sizes)
        dynamic += batch_size * height * width
        if bucket is None:
            unfit += 1
            static += batch_size * height * width
            continue
        used[bucket] += 1
        static += batch_size * bucket[0] * bucket[1]
    return {"batch_size": batch_size, "step": buckets.step, "max_side": buckets.max_side,
            "buckets_possible": len(buckets.sizes()), "buckets_used": len(used), "unfit_share": unfit / batches,
            "dynamic_pixels": dynamic / image_area, "static_pixels": static / image_area,
            "extra_cost": static / dynamic - 1}


def annotation_sizes(path: str) -> list[tuple[int, int, float]]:
    """(width, height, share) of the images of a COCO annotations file: `padding_report`'s `image_sizes`."""
    with open(path) as file:
        images = json.load(file)["images"]
    counts = Counter((int(image["width"]), int(image["height"])) for image in images)
    return [(width, height, count / len(images)) for (width, height), count in counts.items()]


def format_padding_report(rows: Sequence[dict[str, Any]]) -> str:
    """`padding_report` rows as a markdown table (what `fastdetr buckets` prints)."""
    lines = ["| batch | step px | buckets used / possible | fit no bucket | padded px per image px, dynamic | "
             "static | extra cost |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['batch_size']} | {row['step']} | {row['buckets_used']} / {row['buckets_possible']} | "
                     f"{row['unfit_share']:.1%} | {row['dynamic_pixels']:.3f} | {row['static_pixels']:.3f} | "
                     f"{row['extra_cost']:.1%} |")
    return "\n".join(lines) + "\n"
