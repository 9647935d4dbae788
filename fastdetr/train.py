"""Training DETR: `train(TrainConfig(...))`, also `fastdetr train` and `torchrun ... -m fastdetr train`.

What a run does (the original DETR's recipe, main.py/engine.py, rewritten):
- AdamW, two parameter groups: `model.backbone`'s trainable parameters at
  `lr_backbone`, everything else at `lr`; weight decay on both; gradient
  norm clipped at `clip_max_norm` (`fastdetr.optim`: fused AdamW, foreach clipping); the LR
  multiplied by `lr_gamma` after `lr_drop` epochs (or, with `max_steps` or a time budget, see below).
- A Deformable DETR preset (`fastdetr.deformable_config.DEFORMABLE_PRESETS`) trains with its own
  criterion (focal loss, `build_deformable_criterion`) and the official Deformable DETR's recipe
  (fundamentalvision/Deformable-DETR main.py): a third parameter group, the sampling offsets and
  reference points (`LINEAR_PROJ_NAMES`) at `lr * LINEAR_PROJ_LR_MULT`, and its defaults (`RECIPES`)
  for every recipe field left at None. Static shapes work for both families (the padded step, eagerly);
  CUDA graphs are DETR-only so far.
- Mixed precision on CUDA (bf16 autocast, or fp16 autocast with a GradScaler);
  fp32 on the CPU. The criterion always runs in fp32.
- No host sync per step: each step's losses go into a small device buffer
  (`log_every` rows); every `log_every` steps the buffer is read once (and
  all-reduced across processes), logged, and checked: a non-finite loss stops
  the run with `NonFiniteLossError` naming the step, epoch, batch and image ids.
- A checkpoint at the end of every epoch (`output_dir/checkpoint.pth`,
  written atomically) holding everything needed to continue exactly: model,
  optimizer, LR schedule, GradScaler, epoch and step counters, the RNG states
  of every process (torch CPU and CUDA, numpy, python). The data order needs no
  saved position: the sampler shuffles with seed + epoch and the dataset draws
  sample i's augmentation from (seed, epoch, i). So `resume` restarts the
  interrupted epoch from its beginning and the run ends with the same weights,
  bit for bit, as an uninterrupted one (same machine, same process count and
  thread settings; GPU kernels may add their own non-determinism).
- COCO evaluation (pycocotools' COCOeval, 12 numbers) on the validation set every
  `eval_every` epochs and at the end, on rank 0 only; it runs under a forked RNG,
  so evaluating or not never changes the training.
- A JSON-lines log (`output_dir/log.jsonl`): "config", "train" (every
  `log_every` steps: losses, lr, images/s), "epoch", "eval", "resume", "end".
- Multi-process: under torchrun (WORLD_SIZE > 1) the run uses DDP (nccl on
  CUDA, gloo on the CPU) and a DistributedSampler; logged losses are averaged
  over processes; only rank 0 writes files and prints. When one process
  fails, every other one stops too, within seconds rather than at a
  collective's timeout: with `PeerFailedError`, or where a collective cannot
  be left, by ending its process; both name the failed rank and its error.

Step count (`max_steps`): training stops after this many optimizer steps
(`epochs` is then only an upper bound) and the LR drops once, after
`lr_drop_fraction` of them. The work is fixed, not the time, so the run is the
same on any machine; the progress bar spans the whole run and shows its ETA.
The final checkpoint counts the partial epoch as done.

Time budget (`time_budget_s`): training stops at the first log point after
this much training time (evaluation, data generation and start-up do not
count), and `epochs` is only an upper bound. The LR schedule is then defined
on the budget instead of on epochs: the drop happens at the first log point
after `lr_drop_fraction` of the budget. A budgeted run depends on the machine's
speed, so it is not bit-reproducible; its final checkpoint is written where it
stopped and counts the partial epoch as done.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .backend import usable_cpus
from .checkpoint import check_state_dict, load_training_state, save_training_state
from .criterion import BadTargetError, build_criterion, total_loss
from .data import DETR_AUGMENT, SYNTHETIC_AUGMENT, AugmentConfig, CocoDetection, collate_fn, make_splits
from .deformable_config import DEFORMABLE_PRESETS
from .deformable_criterion import build_deformable_criterion
from .evaluate import autocast_context, evaluate, format_summary
from .models import build_deformable_model, build_model
from .optim import adamw, clip_grad_norm
from .padded import PaddedTargets
from .static import SizeBuckets, StaticBatch, StaticCollate, StaticStep, float_outputs

# For short runs on the 128-px synthetic set: flips and mild scale jitter, no crops; the
# longer side is capped at 144 px so batches stay small.
LIGHT_AUGMENT = AugmentConfig(scales=(112, 128, 144), max_size=144, crop_resize_scales=(112, 128),
                              crop_size=(96, 128), val_size=128, crop_prob=0.0)
# The CPU demo's: flips only, at three quarters of the size (96 px), so the backbone costs about half
# as much per image. One size for every image: a batch is padded to its largest image, so per-image
# scale jitter would cost the largest scale's price on nearly every batch.
TINY_AUGMENT = AugmentConfig(scales=(96,), max_size=96, crop_resize_scales=(96,), crop_size=(96, 96),
                             val_size=96, crop_prob=0.0)
AUGMENTS = {"detr": DETR_AUGMENT, "synthetic": SYNTHETIC_AUGMENT, "light": LIGHT_AUGMENT, "tiny": TINY_AUGMENT}

# Losses logged (and checked for non-finite values) every log_every steps; "loss" is the weighted total.
LOGGED = ("loss", "loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error")

# Each model family's training recipe: what a TrainConfig field left at None becomes (`recipe`).
# DETR's main.py defaults; Deformable DETR's main.py defaults (50 epochs, LR drop after 40).
RECIPES: dict[str, dict[str, Any]] = {
    "detr": dict(epochs=300, lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4, clip_max_norm=0.1, lr_drop=200),
    "deformable_detr": dict(epochs=50, lr=2e-4, lr_backbone=2e-5, weight_decay=1e-4, clip_max_norm=0.1, lr_drop=40),
}
# Deformable DETR: parameters whose name contains one of these train at lr * LINEAR_PROJ_LR_MULT
# (the official lr_linear_proj_names and lr_linear_proj_mult).
LINEAR_PROJ_NAMES = ("sampling_offsets", "reference_points")
LINEAR_PROJ_LR_MULT = 0.1


# `fastdetr train -h` for the recipe fields, whose default None means the model's recipe
_RECIPE_HELP = {"help": "(default: the model's recipe, fastdetr.train.RECIPES: DETR "
                        + ", ".join(f"{k} {v}" for k, v in RECIPES["detr"].items()) + "; Deformable DETR "
                        + ", ".join(f"{k} {v}" for k, v in RECIPES["deformable_detr"].items()) + ")"}


def model_family(model: str) -> str:
    """"deformable_detr" for a preset of fastdetr.deformable_config.DEFORMABLE_PRESETS, else "detr"."""
    return "deformable_detr" if model in DEFORMABLE_PRESETS else "detr"


def recipe(model: str) -> dict[str, Any]:
    """The training recipe (RECIPES) of the preset `model`'s family: epochs, lr, lr_backbone, ..."""
    return dict(RECIPES[model_family(model)])


@dataclass
class TrainConfig:
    """Everything a training run needs. Paths are strings; sizes in images, times in seconds."""

    # data: a COCO-format set, or a generated synthetic one (`synthetic` = "demo" | "easy")
    train_images: str | None = None
    train_annotations: str | None = None
    val_images: str | None = None          # no validation set: no evaluation
    val_annotations: str | None = None
    synthetic: str | None = None           # generate (or reuse) this preset under data_dir; overrides the paths
    data_dir: str = "out/data/synthetic"
    num_train: int = 4000
    num_val: int = 200
    augment: str = "auto"                  # "detr" | "synthetic" | "light"; auto: synthetic sets "synthetic"
    skip_bad: bool = False                 # bad images/annotations: warn, skip and count (logged), not raise
    # model: a preset of fastdetr.config.PRESETS or fastdetr.deformable_config.DEFORMABLE_PRESETS;
    # num_classes comes from the data
    model: str = "detr_small"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # optimisation. None: the model family's recipe (RECIPES; set in __post_init__, so a made config
    # holds numbers): DETR's 300 epochs, lr 1e-4, lr_backbone 1e-5, weight_decay 1e-4, clip 0.1,
    # lr_drop 200; Deformable DETR's 50 epochs, lr 2e-4, lr_backbone 2e-5, lr_drop 40, the rest the same.
    epochs: int | None = field(default=None, metadata=_RECIPE_HELP)
    batch_size: int = 2                    # per process
    lr: float | None = field(default=None, metadata=_RECIPE_HELP)
    lr_backbone: float | None = field(default=None, metadata=_RECIPE_HELP)
    weight_decay: float | None = field(default=None, metadata=_RECIPE_HELP)
    clip_max_norm: float | None = field(default=None, metadata=_RECIPE_HELP)   # 0 disables clipping
    lr_drop: int | None = field(default=None, metadata=_RECIPE_HELP)   # epochs before the LR drop (no time budget)
    lr_gamma: float = 0.1
    max_steps: int | None = None           # stop after this many optimizer steps (module docstring)
    time_budget_s: float | None = None     # stop after this much training time (module docstring)
    lr_drop_fraction: float = 2 / 3        # with max_steps or a time budget: drop the LR at this fraction of it
    # runtime
    device: str = "auto"                   # "auto" (CUDA when available), "cpu", "cuda", "cuda:1"
    amp: str = "auto"                      # "auto" (bf16 on CUDA when supported, else fp16), "bf16", "fp16", "off"
    num_workers: int = 2
    num_threads: int | None = None         # CPU threads per process; None: usable cores / processes on this node
    seed: int = 42
    matcher_backend: str = "auto"
    channels_last: bool = False            # model and images in channels_last memory format (faster convolutions)
    # static shapes (fastdetr.static): batches padded to size buckets, targets to max_targets slots
    static_shapes: bool = False            # the padded step, eagerly (what a CPU runs)
    cuda_graph: bool = False               # the padded step captured per bucket as CUDA graphs (implies static_shapes)
    max_targets: int | None = None         # target slots per image; None: the model's num_queries
    bucket_step: int | None = None         # bucket side step in px (a multiple of 32); None: fastdetr.static's
    output_dir: str = "out/train"
    resume: str | None = None              # a checkpoint path, or "auto": output_dir/checkpoint.pth if present
    eval_every: int = 1                    # epochs; 0: only at the end
    eval_batch_size: int = 8
    log_every: int = 20                    # steps between log points (host reads of the losses)
    progress: bool = True                  # tqdm bar on rank 0

    def __post_init__(self) -> None:
        for name, value in recipe(self.model).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.synthetic is None and not (self.train_images and self.train_annotations):
            raise ValueError("TrainConfig: give train_images and train_annotations, or synthetic='demo'/'easy'")
        if self.augment != "auto" and self.augment not in AUGMENTS:
            raise ValueError(f"TrainConfig.augment: unknown {self.augment!r}; expected 'auto' or one of "
                             f"{sorted(AUGMENTS)}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):  # anything else would silently mean the CPU
            raise ValueError(f"TrainConfig.device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ValueError(f"TrainConfig.amp: expected auto, bf16, fp16 or off, got {self.amp!r}")
        for name in ("epochs", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}: expected a positive integer, got {getattr(self, name)!r}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ValueError(f"TrainConfig.time_budget_s: expected a positive number, got {self.time_budget_s!r}")
        # Each value must pass its comparison, so NaN (which passes none) is rejected too.
        ranges = {"lr": (lambda v: v > 0, "a positive number"),
                  "lr_backbone": (lambda v: v >= 0, "a number >= 0 (0 leaves the backbone's weights unchanged)"),
                  "weight_decay": (lambda v: v >= 0, "a number >= 0"),
                  "clip_max_norm": (lambda v: v >= 0, "a number >= 0 (0 disables clipping)"),
                  "lr_drop": (lambda v: v >= 0, "an integer >= 0 (0: no epoch-based drop)"),
                  "lr_gamma": (lambda v: v > 0, "a positive number"),
                  "lr_drop_fraction": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
                  "eval_every": (lambda v: v >= 0, "an integer >= 0 (0: evaluate only at the end)"),
                  "eval_batch_size": (lambda v: v >= 1, "a positive integer"),
                  "num_workers": (lambda v: v >= 0, "an integer >= 0 (0 loads in the main process)"),
                  "num_threads": (lambda v: v is None or v >= 1, "None or a positive integer")}
        if self.synthetic is not None:
            ranges.update(num_train=(lambda v: v >= 1, "a positive integer (synthetic images to generate)"),
                          num_val=(lambda v: v >= 1, "a positive integer (synthetic images to generate)"))
        for name, (valid, expected) in ranges.items():
            if not valid(getattr(self, name)):
                raise ValueError(f"TrainConfig.{name}: expected {expected}, got {getattr(self, name)!r}")
        if self.max_steps is not None and (isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int)
                                           or self.max_steps < 1):
            raise ValueError(f"TrainConfig.max_steps: expected a positive integer, got {self.max_steps!r}")
        if self.cuda_graph:
            self.static_shapes = True
        if self.cuda_graph and model_family(self.model) == "deformable_detr":
            raise ValueError(f"TrainConfig.cuda_graph: not supported yet for Deformable DETR (model {self.model!r}): "
                             "its capture has never run on a GPU; use static_shapes (the padded step, eagerly) or "
                             "the dynamic path")
        if self.max_targets is not None and (isinstance(self.max_targets, bool) or not isinstance(self.max_targets, int)
                                             or self.max_targets < 1):
            raise ValueError(f"TrainConfig.max_targets: expected None or a positive integer, got {self.max_targets!r}")
        if self.bucket_step is not None and (isinstance(self.bucket_step, bool) or not isinstance(self.bucket_step, int)
                                             or self.bucket_step < 32 or self.bucket_step % 32):
            raise ValueError(f"TrainConfig.bucket_step: expected None or a positive multiple of 32 (pixels), got "
                             f"{self.bucket_step!r}")
        if self.max_steps is not None and self.time_budget_s is not None:
            raise ValueError("TrainConfig: give max_steps or time_budget_s, not both (each defines the LR schedule)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class NonFiniteLossError(FloatingPointError):
    """A training loss became NaN or infinite; the message names the step, epoch, batch and images."""


@dataclass
class StepInfo:
    """Passed to `train(..., step_hook=)` after every optimizer step (for monitoring and tests)."""

    epoch: int          # 0-based
    batch_index: int    # 0-based, within the epoch
    step: int           # optimizer steps done so far in the run, this one included
    model: nn.Module    # the unwrapped model


class StepLR:
    """lr of each group = its base lr * gamma ** drops; `drops` is set by the loop (epoch- or time-based).

    Its state is plain numbers, so checkpoints stay loadable with weights_only=True.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, gamma: float):
        self.optimizer = optimizer
        self.gamma = gamma
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self.drops = 0

    def set_drops(self, drops: int) -> None:
        self.drops = drops
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            if isinstance(group["lr"], Tensor):  # a capturable optimizer's (fastdetr.static.make_capturable)
                group["lr"].fill_(base * self.gamma ** drops)
            else:
                group["lr"] = base * self.gamma ** drops

    def state_dict(self) -> dict[str, Any]:
        return {"gamma": self.gamma, "base_lrs": list(self.base_lrs), "drops": self.drops}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gamma, self.base_lrs = state["gamma"], list(state["base_lrs"])
        self.set_drops(int(state["drops"]))


# ---- processes, devices, randomness ----------------------------------------------------------------


@dataclass
class _Runtime:
    rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    amp: str | None          # "bf16", "fp16" or None (fp32)
    owns_process_group: bool

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_runtime(config: TrainConfig) -> _Runtime:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    wants_cuda = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
    if wants_cuda and not torch.cuda.is_available():
        raise RuntimeError(f"TrainConfig.device={config.device!r} but CUDA is not available")
    if wants_cuda:
        index = local_rank if world_size > 1 or ":" not in config.device else int(config.device.split(":")[1])
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    owns = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    amp = None
    if device.type == "cuda" and config.amp != "off":
        amp = config.amp if config.amp != "auto" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    return _Runtime(rank, world_size, local_world, device, amp, owns)


class PeerFailedError(RuntimeError):
    """Another process of a multi-process run failed, so this one stopped too; names that rank and its error."""


# How often each process asks the store whether another one failed: a host-side TCP round trip, no device work.
FAILURE_POLL_S = 0.5
# How long a process that learnt of a peer's failure lets its own training stop on its own (a collective
# erroring out) before it ends the process: a gloo collective waits for a failed peer as long as that
# peer's process lives, and a rank may be busy for minutes (rank 0 evaluating).
PEER_FAILURE_GRACE_S = 10.0
_runs = itertools.count()  # train() calls of this process: the same sequence on every rank of a process group


class _FailureWatch:
    """Makes every process of a multi-process run stop when one of them fails, at no cost per step.

    Without it, the other processes wait in their next collective for the failed one: with NCCL until
    the collective times out, with gloo until the failed process exits (never, if its caller keeps it
    alive). The failed process writes its error into the process group's store (`report`); a daemon
    thread in every process polls the store. Seeing a peer's error there, it aborts an NCCL process
    group (its pending collectives then fail, and `train` raises PeerFailedError), and if `train` is
    still running PEER_FAILURE_GRACE_S later, prints the error and ends the process with status 1.
    """

    def __init__(self, rank: int, backend: str):
        self.rank, self.backend = rank, backend
        self.key = f"fastdetr/train{next(_runs)}/failed"
        self.store = dist.distributed_c10d._get_default_store()
        self.peer_failure: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="fastdetr-failure-watch", daemon=True)
        self._thread.start()

    def failure(self) -> str | None:
        """The first failure reported in this run ("rank R: Error: message"), or None (also when the store is gone)."""
        try:
            return self._read()
        except Exception:  # the store lived in a process that has ended (rank 0 without torchrun)
            return None

    def _read(self) -> str | None:
        return self.store.get(self.key).decode(errors="replace") if self.store.check([self.key]) else None

    def report(self, error: BaseException) -> None:
        """Tell the other processes that this one failed with `error`; the first report of a run wins."""
        try:
            if self.store.add(f"{self.key}/reports", 1) == 1:
                self.store.set(self.key, f"rank {self.rank}: {type(error).__name__}: {error}")
        except Exception:  # no store left: the peers' collectives see this process end
            pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * FAILURE_POLL_S)  # a daemon: one stuck on a vanished store ends with the process

    def _watch(self) -> None:
        while not self._stop.wait(FAILURE_POLL_S):
            try:
                message = self._read()
            except Exception:  # the store's process has ended (at the end of a run, or failed: its peers see that)
                return
            if message is None:
                continue
            if message.startswith(f"rank {self.rank}:"):
                return
            self.peer_failure = message
            if self.backend == "nccl":
                dist.group.WORLD.abort()
            if not self._stop.wait(PEER_FAILURE_GRACE_S):
                print(f"[rank {self.rank}] stopping this process: another process failed: {message}",
                      file=sys.stderr, flush=True)
                os._exit(1)
            return


def _rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states as tensors and plain containers (weights_only-loadable)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss_next": py_state[2]},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss_next"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- data ------------------------------------------------------------------------------------------


def _datasets(config: TrainConfig, runtime: _Runtime) -> tuple[CocoDetection, CocoDetection | None, AugmentConfig]:
    train_images, train_annotations = config.train_images, config.train_annotations
    val_images, val_annotations = config.val_images, config.val_annotations
    if config.synthetic is not None:
        if runtime.main:  # one writer; the others wait and then reuse the finished set
            make_splits(config.data_dir, config.num_train, config.num_val, preset=config.synthetic, seed=0)
        if runtime.distributed:
            dist.barrier()
        train_file, val_file = make_splits(config.data_dir, config.num_train, config.num_val,
                                           preset=config.synthetic, seed=0)
        train_images, train_annotations = str(train_file.parent / "images"), str(train_file)
        val_images, val_annotations = str(val_file.parent / "images"), str(val_file)
    name = config.augment if config.augment != "auto" else ("synthetic" if config.synthetic else "detr")
    augment = AUGMENTS[name]
    train_set = CocoDetection(train_images, train_annotations, train=True, augment=augment, seed=config.seed,
                              skip_bad=config.skip_bad)
    val_set = None
    if val_images and val_annotations:
        val_set = CocoDetection(val_images, val_annotations, train=False, augment=augment, skip_bad=config.skip_bad)
    return train_set, val_set, augment


def _to_device(targets: list[dict[str, Tensor]], device: torch.device) -> list[dict[str, Tensor]]:
    return [{key: value.to(device, non_blocking=True) for key, value in target.items()} for target in targets]


# ---- the loop ----------------------------------------------------------------------------------------


class _LossWindow:
    """Per-step losses of the last `size` steps, kept on the device; read on the host once per window."""

    def __init__(self, size: int, device: torch.device):
        self.values = torch.zeros(size, len(LOGGED), dtype=torch.float32, device=device)
        self.where: list[tuple[int, int, int, list[int]]] = []  # (step, epoch, batch, image ids) per row
        self.images = 0
        self.start_time = time.perf_counter()

    def add(self, losses: Tensor, step: int, epoch: int, batch_index: int, image_ids: list[int]) -> None:
        self.values[len(self.where)].copy_(losses, non_blocking=True)
        self.where.append((step, epoch, batch_index, image_ids))
        self.images += len(image_ids)

    def __len__(self) -> int:
        return len(self.where)

    def reset(self) -> None:
        self.where.clear()
        self.images = 0
        self.start_time = time.perf_counter()


def train(config: TrainConfig, step_hook: Callable[[StepInfo], None] | None = None) -> dict[str, Any]:
    """Train a DETR as `config` says; returns a summary (rank 0's view, the same keys on every rank).

    Returns {"epochs": epochs completed, "steps": optimizer steps, "train_time_s": training time
    (resumed runs include the earlier time), "stopped": "epochs" | "max_steps" | "time_budget", "eval": the last
    COCO stats dict or None, "checkpoint": path, "log": path}.
    Raises NonFiniteLossError when a loss becomes NaN or infinite. With several processes, when one
    fails the others stop too (`_FailureWatch`), raising PeerFailedError naming its rank and error.
    """
    runtime = _setup_runtime(config)
    watch = _FailureWatch(runtime.rank, dist.get_backend()) if runtime.distributed else None
    failed = False
    try:
        return _TrainingRun(config, runtime, step_hook).run()
    except BaseException as error:
        failed = True
        if watch is None:
            raise
        first = watch.peer_failure or watch.failure()
        if first is not None and not first.startswith(f"rank {runtime.rank}:"):
            raise PeerFailedError(f"rank {runtime.rank} stopped because another process failed first: "
                                  f"{first}") from error
        watch.report(error)
        raise
    finally:
        if watch is not None:
            watch.close()
        if runtime.owns_process_group:
            try:
                if failed and dist.get_backend() == "nccl":
                    dist.group.WORLD.abort()  # destroying waits for pending NCCL work, which may never complete
                dist.destroy_process_group()
            except Exception:
                if not failed:  # after a failure, the error that stopped the run is the one to see
                    raise


class _TrainingRun:
    """One `train` call on one process: the state its steps share, and the steps.

    `run` drives them: `start` (resume, or log the config), the loader, then `train_epochs`: each
    `train_epoch` runs `train_step`s, and at every log point `flush`; after each epoch `save` (and
    `run_eval`, every eval_every epochs); then the final evaluation and the summary.
    """

    # made by `_build_loader`, after resuming
    ddp_model: nn.Module
    sampler: torch.utils.data.DistributedSampler
    loader: torch.utils.data.DataLoader
    window: _LossWindow
    epoch_start: float  # perf_counter at the start of the current epoch

    def __init__(self, config: TrainConfig, runtime: _Runtime, step_hook: Callable[[StepInfo], None] | None):
        """Set-up: threads, output folder, data, model, criterion, optimizer; nothing read or trained yet."""
        self.config, self.runtime, self.step_hook = config, runtime, step_hook
        self.device = device = runtime.device
        if device.type == "cpu":
            threads = config.num_threads or max(1, usable_cpus() // runtime.local_world_size)
            torch.set_num_threads(threads)
        output_dir = Path(config.output_dir)
        self.checkpoint_path, self.log_path = output_dir / "checkpoint.pth", output_dir / "log.jsonl"
        if runtime.main:
            output_dir.mkdir(parents=True, exist_ok=True)
        self.train_set, self.val_set, self.augment = _datasets(config, runtime)
        _seed_everything(config.seed)  # the same initial weights on every process (DDP also broadcasts them)
        # num_classes = max category id + 1 for both: DETR adds its no-object class on top, Deformable
        # DETR's focal head has exactly these outputs, so every label (a category id) lies in [0, num_classes).
        self.deformable = model_family(config.model) == "deformable_detr"
        build, build_loss = ((build_deformable_model, build_deformable_criterion) if self.deformable
                             else (build_model, build_criterion))
        model = build(config.model, num_classes=self.train_set.num_classes, **config.model_overrides)
        self.memory_format = torch.channels_last if config.channels_last else torch.preserve_format
        self.model = model.to(device).to(memory_format=self.memory_format)
        self.criterion = build_loss(self.model.config, backend=config.matcher_backend).to(device)
        self.weight_dict = self.criterion.weight_dict
        self.collate: Callable = collate_fn
        self.static_step: StaticStep | None = None
        self.dynamic_batches = 0  # with static shapes: batches that fit no bucket, run on the dynamic path
        if config.static_shapes:
            num_queries = self.model.config.num_queries
            max_targets = config.max_targets or num_queries
            if max_targets > num_queries:
                raise ValueError(f"TrainConfig.max_targets={max_targets} exceeds the model's num_queries={num_queries}")
            self.collate = StaticCollate(SizeBuckets.for_augment(self.augment, config.bucket_step), max_targets,
                                         self.train_set.num_classes)
        _seed_everything(config.seed + runtime.rank)  # per-process streams for dropout and workers
        self._build_optimizer()
        self.start_epoch, self.step, self.train_time, self.last_eval = 0, 0, 0.0, None
        self.budget, self.max_steps = config.time_budget_s, config.max_steps
        # With max_steps the LR drops after this many steps: the schedule is the same on any machine.
        self.drop_step = None if self.max_steps is None else max(1, round(config.lr_drop_fraction * self.max_steps))
        self.stopped = "epochs"
        self.run_bar: Any = None  # with max_steps, one tqdm bar for the whole run
        self.bar: Any = None      # the bar being drawn: the run's, or the current epoch's

    def _build_optimizer(self) -> None:
        """AdamW over the trainable parameters: [rest at lr, backbone at lr_backbone], and for Deformable DETR
        a third group, the names containing one of LINEAR_PROJ_NAMES, at lr * LINEAR_PROJ_LR_MULT (the official's
        group order)."""
        config, named = self.config, [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        backbone = [p for name, p in named if name.startswith("backbone.")]
        linear_proj_names = LINEAR_PROJ_NAMES if self.deformable else ()
        linear_proj = [p for name, p in named if not name.startswith("backbone.")
                       and any(key in name for key in linear_proj_names)]
        rest = [p for name, p in named if not name.startswith("backbone.")
                and not any(key in name for key in linear_proj_names)]
        groups = [{"params": rest, "lr": config.lr}, {"params": backbone, "lr": config.lr_backbone}]
        if self.deformable:
            groups.append({"params": linear_proj, "lr": config.lr * LINEAR_PROJ_LR_MULT})
        self.optimizer = adamw(groups, lr=config.lr, weight_decay=config.weight_decay, device=self.device)
        self.trainable = rest + backbone + linear_proj
        self.scheduler = StepLR(self.optimizer, config.lr_gamma)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.runtime.amp == "fp16")

    def _build_loader(self) -> None:
        """The DDP wrapper, the sampler, the loader and the loss window."""
        config, runtime, device = self.config, self.runtime, self.device
        self.ddp_model = self.model
        if runtime.distributed:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.sampler = torch.utils.data.DistributedSampler(self.train_set, num_replicas=runtime.world_size,
                                                           rank=runtime.rank, shuffle=True, seed=config.seed)
        self.loader = torch.utils.data.DataLoader(self.train_set, batch_size=config.batch_size, sampler=self.sampler,
                                                  drop_last=True, num_workers=config.num_workers,
                                                  collate_fn=self.collate, pin_memory=device.type == "cuda")
        if len(self.loader) == 0:
            raise ValueError(f"{config.train_annotations or config.data_dir}: {len(self.train_set)} training images "
                             f"give no full batch of {config.batch_size} per process ({runtime.world_size} "
                             f"process(es))")
        self.window = _LossWindow(config.log_every, device)
        if config.static_shapes:
            self.static_step = StaticStep(self.ddp_model, self.criterion, self.optimizer, self.trainable,
                                          config.clip_max_norm, runtime.amp, LOGGED, scaler=self.scaler,
                                          cuda_graph=config.cuda_graph, memory_format=self.memory_format)

    # ---- output ----

    def log(self, event: str, **values: Any) -> None:
        """A line of output_dir/log.jsonl (rank 0 only)."""
        if self.runtime.main:
            with open(self.log_path, "a") as file:
                file.write(json.dumps({"event": event, **values}) + "\n")

    def say(self, message: str) -> None:
        """A message for the person running it (rank 0 only): on stderr beside the progress bar, else stdout."""
        if self.runtime.main:
            print(message, file=sys.stderr if self.config.progress else sys.stdout, flush=True)

    # ---- the run ----

    def run(self) -> dict[str, Any]:
        """Train, evaluate at the end, save; returns `train`'s summary."""
        self.start()
        self._build_loader()
        if self.max_steps is not None and self.config.progress and self.runtime.main:
            from tqdm import tqdm

            # One bar for the whole run, so its ETA is the run's.
            self.run_bar = tqdm(total=self.max_steps, initial=min(self.step, self.max_steps), desc="steps",
                                dynamic_ncols=True, file=sys.stderr)
        epoch = self.train_epochs()
        if self.run_bar is not None:
            self.run_bar.close()
        final = self.run_eval(epoch)
        if final is not None:
            self.last_eval = final
            self.save(epoch + 1)  # the checkpoint also carries the final evaluation
        summary = {"epochs": epoch + 1, "steps": self.step, "train_time_s": self.train_time, "stopped": self.stopped,
                   "eval": self.last_eval, "checkpoint": str(self.checkpoint_path), "log": str(self.log_path)}
        self.log("end", **{key: value for key, value in summary.items() if key != "eval"})
        return summary

    def start(self) -> None:
        """Resume from config.resume ("auto": output_dir's checkpoint, if there is one), or log a new run's config."""
        resume_path = self.config.resume
        if resume_path == "auto":
            resume_path = str(self.checkpoint_path) if self.checkpoint_path.is_file() else None
        if resume_path is not None:
            self.resume(resume_path)
            return
        config, runtime = self.config, self.runtime
        self.log("config", config=config.to_dict(), world_size=runtime.world_size, device=str(self.device),
                 amp=runtime.amp, num_classes=self.train_set.num_classes, train_images=len(self.train_set),
                 model_config=self.model.config.to_dict())

    def resume(self, path: str) -> None:
        """Continue from a training checkpoint: weights, optimizer, LR schedule, scaler, counters, RNG states."""
        state = load_training_state(path, map_location="cpu")
        check_state_dict(self.model, state["model"], path)
        self.model.load_state_dict(state["model"])
        built = [group.get("capturable", False) for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        # A CUDA-graph run saves device learning rates and capturable groups: back to this run's optimizer
        # (with cuda_graph, StaticStep makes it capturable again).
        for group, capturable in zip(self.optimizer.param_groups, built):
            group["capturable"] = capturable
            if isinstance(group["lr"], Tensor):
                group["lr"] = float(group["lr"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.step = int(state["epoch"]), int(state["step"])
        self.train_time, self.last_eval = float(state["train_time_s"]), state.get("eval")
        rng, runtime = state["rng"], self.runtime
        if len(rng) == runtime.world_size:
            _set_rng_state(rng[runtime.rank], self.device)
        else:
            self.say(f"resume: the checkpoint has RNG states for {len(rng)} process(es), this run has "
                     f"{runtime.world_size}; reseeding (the continuation will not be bit-exact)")
            _seed_everything(self.config.seed + runtime.rank + 1000 * self.start_epoch)
        self.say(f"resumed from {path}: {self.start_epoch} epoch(s), {self.step} step(s) done")
        self.log("resume", checkpoint=path, epoch=self.start_epoch, step=self.step)

    def train_epochs(self) -> int:
        """The epochs from start_epoch on, each followed by its checkpoint (and evaluation, every eval_every).

        Returns the last epoch counted as done; sets `stopped`.
        """
        config, budget, max_steps = self.config, self.budget, self.max_steps
        if (budget is not None and self.train_time >= budget) or (max_steps is not None and self.step >= max_steps):
            # A finished budgeted run, resumed: nothing to train; its last epoch (counted as done) is start_epoch - 1.
            self.stopped = "time_budget" if budget is not None else "max_steps"
            return self.start_epoch - 1
        for epoch in range(self.start_epoch, config.epochs):
            stop = self.train_epoch(epoch)
            is_last = stop or epoch == config.epochs - 1
            if not is_last and config.eval_every > 0 and (epoch + 1) % config.eval_every == 0:
                self.last_eval = self.run_eval(epoch) or self.last_eval
            self.save(epoch + 1)
            if stop:
                if budget is not None:
                    self.stopped = "time_budget"
                    self.say(f"time budget of {budget:.0f} s spent after {self.step} steps (epoch {epoch})")
                else:
                    self.stopped = "max_steps"
                    self.say(f"{self.step} steps done (epoch {epoch}, {self.train_time:.0f} s of training)")
                return epoch
        return config.epochs - 1

    def train_epoch(self, epoch: int) -> bool:
        """One epoch, or its part up to max_steps or the time budget; True when the run stops after it."""
        config = self.config
        self.sampler.set_epoch(epoch)
        self.train_set.set_epoch(epoch)
        if self.budget is None and self.max_steps is None and config.lr_drop > 0:
            self.scheduler.set_drops(epoch // config.lr_drop)
        self.ddp_model.train()
        self.criterion.train()
        self.bar, batches = self.run_bar, self.loader
        if self.run_bar is None and config.progress and self.runtime.main:
            from tqdm import tqdm

            self.bar = batches = tqdm(self.loader, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
                                      file=sys.stderr)
        self.epoch_start = time.perf_counter()
        stop = False
        for batch_index, batch in enumerate(batches):
            padded = None
            if isinstance(batch, StaticBatch):
                padded = batch.padded
                if padded is None:
                    self._count_dynamic(batch, epoch, batch_index)
            stop = self.train_step(epoch, batch_index, batch[0], batch[1], padded)
            if stop:
                break
        if self.bar is not None and self.bar is not self.run_bar:
            self.bar.close()
        self.train_time += time.perf_counter() - self.epoch_start
        skipped = self.train_set.skipped if config.skip_bad else {}
        self.log("epoch", epoch=epoch, step=self.step, train_time_s=round(self.train_time, 2),
                 lr=self._lr(), **({"skipped": skipped} if skipped else {}))
        if any(skipped.values()):
            self.say(self.train_set.skip_summary())
        return stop

    def _count_dynamic(self, batch: StaticBatch, epoch: int, batch_index: int) -> None:
        self.dynamic_batches += 1
        if self.dynamic_batches == 1:
            self.say(f"static shapes: batch {batch_index} of epoch {epoch} runs on the dynamic path ({batch.reason}); "
                     "such batches are counted in the log (dynamic_batches)")

    def train_step(self, epoch: int, batch_index: int, images: Tensor, targets: list[dict[str, Tensor]],
                   padded: PaddedTargets | None = None) -> bool:
        """One optimizer step, then the log point / LR drop / stop checks; True when the run stops here.

        padded: the batch's targets padded to fixed slots: the static-shape step (`StaticStep`) runs it.
        """
        image_ids = [int(target["image_id"][0]) for target in targets]  # CPU tensors: no sync
        if padded is not None:
            return self._record_step(self.static_step(images, padded), epoch, batch_index, image_ids)
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        targets = _to_device(targets, self.device)
        with autocast_context(self.device, self.runtime.amp):
            outputs = self.ddp_model(images)
        outputs = float_outputs(outputs)
        loss_dict = self._losses(outputs, targets, epoch, batch_index, image_ids)
        loss = total_loss(loss_dict, self.weight_dict)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.config.clip_max_norm > 0:
            self.scaler.unscale_(self.optimizer)
            clip_grad_norm(self.trainable, self.config.clip_max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        logged = torch.stack([loss.detach(), *(loss_dict[name].detach() for name in LOGGED[1:])])
        return self._record_step(logged, epoch, batch_index, image_ids)

    def _record_step(self, logged: Tensor, epoch: int, batch_index: int, image_ids: list[int]) -> bool:
        """Count the step, keep its logged losses (a device copy), then the log point / LR drop / stop checks."""
        self.step += 1
        self.window.add(logged, self.step, epoch, batch_index, image_ids)
        if self.step_hook is not None:
            self.step_hook(StepInfo(epoch, batch_index, self.step, self.model))
        if self.run_bar is not None:
            self.run_bar.update(1)
        return self._after_step(epoch, batch_index)

    def _losses(self, outputs: dict[str, Any], targets: list[dict[str, Tensor]], epoch: int, batch_index: int,
                image_ids: list[int]) -> dict[str, Tensor]:
        try:
            return self.criterion(outputs, targets)
        except ValueError as error:
            # NaN predictions mostly surface here, not in the loss: the scipy matcher rejects
            # their cost blocks. Same report as a non-finite loss (the check syncs, but only here).
            if _all_finite(outputs):
                raise
            self._raise_if_non_finite(self.window.values[:len(self.window)].cpu())  # a loss went first?
            raise NonFiniteLossError(
                f"non-finite model outputs at step {self.step + 1} (epoch {epoch}, batch {batch_index} of "
                f"{len(self.loader)}; image ids on rank {self.runtime.rank}: {image_ids}); the matcher cannot "
                f"assign them. Training stopped; the last good checkpoint is {self._last_good()}") from error

    def _after_step(self, epoch: int, batch_index: int) -> bool:
        steps_done = self.max_steps is not None and self.step >= self.max_steps
        if len(self.window) == self.config.log_every or batch_index == len(self.loader) - 1 or steps_done:
            over_budget, past_drop = self.flush(epoch)
            if past_drop and self.scheduler.drops == 0:
                self._drop_lr(epoch)
            if over_budget:
                return True
        if self.drop_step is not None and self.step == self.drop_step and self.scheduler.drops == 0:
            self._drop_lr(epoch)
        return steps_done

    def _lr(self) -> float:
        """The first group's learning rate, from the schedule (a capturable optimizer's is a device tensor)."""
        lr = self.optimizer.param_groups[0]["lr"]
        if not isinstance(lr, Tensor):
            return lr
        return self.scheduler.base_lrs[0] * self.scheduler.gamma ** self.scheduler.drops

    def _drop_lr(self, epoch: int) -> None:
        self.scheduler.set_drops(1)
        self.log("lr_drop", epoch=epoch, step=self.step, lr=self._lr())

    # ---- log points ----

    def flush(self, epoch: int) -> tuple[bool, bool]:
        """Read the window once: check targets and losses, log, and agree on stopping / dropping the LR.

        Returns (over the time budget, past its LR drop point), the same on every process.
        """
        runtime, window, budget = self.runtime, self.window, self.budget
        rows = len(window)
        trained = self.train_time + (time.perf_counter() - self.epoch_start)
        over_budget = budget is not None and trained >= budget
        past_drop = budget is not None and trained >= self.config.lr_drop_fraction * budget
        flags = torch.tensor([float(over_budget), float(past_drop)], device=self.device)
        values = window.values[:rows]
        if runtime.distributed:
            values = values.clone()
            dist.all_reduce(values)
            values /= runtime.world_size
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        host = values.cpu()
        flags = flags.cpu().tolist()
        self._raise_if_bad_targets(rows)
        self._raise_if_non_finite(host)
        means = host.mean(0).tolist()
        seconds = time.perf_counter() - window.start_time
        rate = window.images * runtime.world_size / max(seconds, 1e-9)
        entry = {name: round(value, 5) for name, value in zip(LOGGED, means)}
        static = {}
        if self.static_step is not None:
            static = {"static": {**self.static_step.counters(), "dynamic_batches": self.dynamic_batches}}
        self.log("train", epoch=epoch, step=self.step, batch=window.where[-1][2],
                 lr=self._lr(), images_per_s=round(rate, 2),
                 train_time_s=round(self.train_time + time.perf_counter() - self.epoch_start, 2), **entry, **static)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{means[0]:.3f}", img_s=f"{rate:.1f}", refresh=False)
        window.reset()
        return flags[0] > 0, flags[1] > 0

    def _raise_if_bad_targets(self, rows: int) -> None:
        try:  # the criterion's target check, recorded on the device; the device has caught up by now
            self.criterion.raise_if_bad_targets()
        except BadTargetError as error:  # its forwards since the last check are this window's rows
            bad_step, bad_epoch, batch_index, image_ids = self.window.where[min(error.call, rows - 1)]
            raise BadTargetError(
                f"bad targets at step {bad_step} (epoch {bad_epoch}, batch {batch_index} of {len(self.loader)}; "
                f"image ids on rank {self.runtime.rank}: {image_ids}): {error}. Training stopped; the last good "
                f"checkpoint is {self._last_good()}", call=error.call) from error

    def _raise_if_non_finite(self, host: Tensor) -> None:
        """host: the window's first rows, read to the CPU; a non-finite one stops the run, the earliest named."""
        bad = (~torch.isfinite(host)).any(1).nonzero().flatten().tolist()
        if bad:
            row = bad[0]
            bad_step, bad_epoch, batch_index, image_ids = self.window.where[row]
            named = ", ".join(f"{name}={value:.4g}" for name, value in zip(LOGGED, host[row].tolist()))
            raise NonFiniteLossError(
                f"non-finite loss at step {bad_step} (epoch {bad_epoch}, batch {batch_index} of {len(self.loader)}; "
                f"image ids on rank {self.runtime.rank}: {image_ids}): {named}. Training stopped; the last good "
                f"checkpoint is {self._last_good()}")

    def _last_good(self) -> str:
        return str(self.checkpoint_path) if self.checkpoint_path.is_file() else "none (first epoch)"

    # ---- evaluation and checkpoints ----

    def run_eval(self, epoch: int) -> dict[str, float] | None:
        """COCO stats on the validation set, or None without one; rank 0 evaluates, every rank gets its result."""
        stats = None
        if self.val_set is not None and self.runtime.main:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                stats = evaluate(self.model, self.val_set, batch_size=self.config.eval_batch_size, device=self.device,
                                 num_workers=self.config.num_workers, amp=self.runtime.amp)
            self.say(f"COCO evaluation after epoch {epoch} ({len(self.val_set)} images):\n{format_summary(stats)}")
            self.log("eval", epoch=epoch, step=self.step, **stats)
        if self.runtime.distributed:
            # Every rank needs rank 0's result: the caller decides on it whether to save, and saving
            # is a collective (the RNG states are gathered).
            shared = [stats]
            dist.broadcast_object_list(shared, src=0)
            stats = shared[0]
        return stats

    def save(self, epoch_done: int) -> None:
        """output_dir/checkpoint.pth after `epoch_done` epochs; a collective (every rank's RNG state goes in)."""
        runtime = self.runtime
        rng = [_rng_state(self.device)]
        if runtime.distributed:
            rng = [None] * runtime.world_size
            dist.all_gather_object(rng, _rng_state(self.device))
        if runtime.main:
            save_training_state(
                self.checkpoint_path, self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                scaler=self.scaler, epoch=epoch_done, step=self.step, train_time_s=self.train_time, rng=rng,
                eval_stats=self.last_eval, world_size=runtime.world_size, categories=dict(self.train_set.categories),
                val_transform={"val_size": self.augment.val_size, "max_size": self.augment.max_size},
                train_config=self.config.to_dict())


def _all_finite(outputs: dict[str, Any]) -> bool:
    tensors = [value for value in outputs.values() if isinstance(value, Tensor)]
    tensors += [value for aux in outputs.get("aux_outputs", []) for value in aux.values()]
    return all(bool(torch.isfinite(value).all()) for value in tensors)
