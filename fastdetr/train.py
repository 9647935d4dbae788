"""Training DETR: `train(TrainConfig(...))`, also `fastdetr train` and `torchrun ... -m fastdetr train`.

What a run does (the original DETR's recipe, main.py/engine.py, rewritten):
- AdamW, two parameter groups: `model.backbone`'s trainable parameters at
  `lr_backbone`, everything else at `lr`; weight decay on both; gradient
  norm clipped at `clip_max_norm` (`fastdetr.optim`: fused AdamW, foreach clipping); the LR
  multiplied by `lr_gamma` after `lr_drop` epochs (or, with `max_steps` or a time budget, see below).
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
from .checkpoint import atomic_save, check_state_dict, extract_state_dict
from .criterion import BadTargetError, build_criterion, total_loss
from .data import DETR_AUGMENT, SYNTHETIC_AUGMENT, AugmentConfig, CocoDetection, collate_fn, make_splits
from .evaluate import autocast_context, evaluate, format_summary
from .models import build_model
from .optim import adamw, clip_grad_norm

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
    # model: a preset of fastdetr.config.PRESETS; num_classes comes from the data
    model: str = "detr_small"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # optimisation (DETR's defaults)
    epochs: int = 300
    batch_size: int = 2                    # per process
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1             # 0 disables clipping
    lr_drop: int = 200                     # epochs before the LR drop (without a time budget)
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
    output_dir: str = "out/train"
    resume: str | None = None              # a checkpoint path, or "auto": output_dir/checkpoint.pth if present
    eval_every: int = 1                    # epochs; 0: only at the end
    eval_batch_size: int = 8
    log_every: int = 20                    # steps between log points (host reads of the losses)
    progress: bool = True                  # tqdm bar on rank 0

    def __post_init__(self) -> None:
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
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.drops = 0

    def set_drops(self, drops: int) -> None:
        self.drops = drops
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
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
        return _train(config, runtime, step_hook)
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


def _train(config: TrainConfig, runtime: _Runtime, step_hook: Callable[[StepInfo], None] | None) -> dict[str, Any]:
    device = runtime.device
    if device.type == "cpu":
        threads = config.num_threads or max(1, usable_cpus() // runtime.local_world_size)
        torch.set_num_threads(threads)
    output_dir = Path(config.output_dir)
    checkpoint_path = output_dir / "checkpoint.pth"
    log_path = output_dir / "log.jsonl"
    if runtime.main:
        output_dir.mkdir(parents=True, exist_ok=True)

    def log(event: str, **values: Any) -> None:
        if runtime.main:
            with open(log_path, "a") as file:
                file.write(json.dumps({"event": event, **values}) + "\n")

    def say(message: str) -> None:
        if runtime.main:
            print(message, file=sys.stderr if config.progress else sys.stdout, flush=True)

    train_set, val_set, augment = _datasets(config, runtime)
    _seed_everything(config.seed)  # the same initial weights on every process (DDP also broadcasts them)
    model = build_model(config.model, num_classes=train_set.num_classes, **config.model_overrides).to(device)
    memory_format = torch.channels_last if config.channels_last else torch.preserve_format
    model = model.to(memory_format=memory_format)
    criterion = build_criterion(model.config, backend=config.matcher_backend).to(device)
    _seed_everything(config.seed + runtime.rank)  # per-process streams for dropout and workers

    backbone = [p for name, p in model.named_parameters() if name.startswith("backbone.") and p.requires_grad]
    rest = [p for name, p in model.named_parameters() if not name.startswith("backbone.") and p.requires_grad]
    optimizer = adamw([{"params": rest, "lr": config.lr}, {"params": backbone, "lr": config.lr_backbone}],
                      lr=config.lr, weight_decay=config.weight_decay, device=device)
    trainable = rest + backbone
    scheduler = StepLR(optimizer, config.lr_gamma)
    scaler = torch.amp.GradScaler("cuda", enabled=runtime.amp == "fp16")

    start_epoch, step, train_time, last_eval = 0, 0, 0.0, None
    resume_path = config.resume
    if resume_path == "auto":
        resume_path = str(checkpoint_path) if checkpoint_path.is_file() else None
    if resume_path is not None:
        state = torch.load(resume_path, map_location="cpu", weights_only=True)
        state_dict = extract_state_dict(state, resume_path)
        check_state_dict(model, state_dict, resume_path)
        model.load_state_dict(state_dict)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, step, train_time = int(state["epoch"]), int(state["step"]), float(state["train_time_s"])
        last_eval = state.get("eval")
        rng = state["rng"]
        if len(rng) == runtime.world_size:
            _set_rng_state(rng[runtime.rank], device)
        else:
            say(f"resume: the checkpoint has RNG states for {len(rng)} process(es), this run has "
                f"{runtime.world_size}; reseeding (the continuation will not be bit-exact)")
            _seed_everything(config.seed + runtime.rank + 1000 * start_epoch)
        say(f"resumed from {resume_path}: {start_epoch} epoch(s), {step} step(s) done")
        log("resume", checkpoint=resume_path, epoch=start_epoch, step=step)
    else:
        log("config", config=config.to_dict(), world_size=runtime.world_size, device=str(device),
            amp=runtime.amp, num_classes=train_set.num_classes, train_images=len(train_set),
            model_config=model.config.to_dict())

    ddp_model = model
    if runtime.distributed:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=runtime.world_size, rank=runtime.rank,
                                                  shuffle=True, seed=config.seed)
    loader = torch.utils.data.DataLoader(train_set, batch_size=config.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=config.num_workers, collate_fn=collate_fn,
                                         pin_memory=device.type == "cuda")
    if len(loader) == 0:
        raise ValueError(f"{config.train_annotations or config.data_dir}: {len(train_set)} training images give no "
                         f"full batch of {config.batch_size} per process ({runtime.world_size} process(es))")
    weight_dict = criterion.weight_dict
    window = _LossWindow(config.log_every, device)
    budget = config.time_budget_s
    stopped = "epochs"
    extra = {"categories": dict(train_set.categories),
             "val_transform": {"val_size": augment.val_size, "max_size": augment.max_size},
             "train_config": config.to_dict()}

    def run_eval(epoch: int) -> dict[str, float] | None:
        stats = None
        if val_set is not None and runtime.main:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                stats = evaluate(model, val_set, batch_size=config.eval_batch_size, device=device,
                                 num_workers=config.num_workers, amp=runtime.amp)
            say(f"COCO evaluation after epoch {epoch} ({len(val_set)} images):\n{format_summary(stats)}")
            log("eval", epoch=epoch, step=step, **stats)
        if runtime.distributed:
            # Every rank needs rank 0's result: the caller decides on it whether to save, and saving
            # is a collective (the RNG states are gathered).
            shared = [stats]
            dist.broadcast_object_list(shared, src=0)
            stats = shared[0]
        return stats

    def save(epoch_done: int) -> None:
        rng = [_rng_state(device)]
        if runtime.distributed:
            rng = [None] * runtime.world_size
            dist.all_gather_object(rng, _rng_state(device))
        if runtime.main:
            atomic_save({"model": model.state_dict(), "config": model.config.to_dict(), "format_version": 1,
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "scaler": scaler.state_dict(), "epoch": epoch_done, "step": step,
                         "train_time_s": train_time, "rng": rng, "eval": last_eval,
                         "world_size": runtime.world_size, **extra}, checkpoint_path)

    def last_good() -> str:
        return str(checkpoint_path) if checkpoint_path.is_file() else "none (first epoch)"

    def raise_if_non_finite(host: Tensor, lengths: int) -> None:
        """host: the window's first rows, read to the CPU; a non-finite one stops the run, the earliest named."""
        bad = (~torch.isfinite(host)).any(1).nonzero().flatten().tolist()
        if bad:
            row = bad[0]
            bad_step, bad_epoch, batch_index, image_ids = window.where[row]
            named = ", ".join(f"{name}={value:.4g}" for name, value in zip(LOGGED, host[row].tolist()))
            raise NonFiniteLossError(
                f"non-finite loss at step {bad_step} (epoch {bad_epoch}, batch {batch_index} of {lengths}; "
                f"image ids on rank {runtime.rank}: {image_ids}): {named}. Training stopped; the last good "
                f"checkpoint is {last_good()}")

    def flush(epoch: int, lengths: int) -> tuple[bool, bool]:
        """Read the window once: log, check for non-finite losses, and agree on stopping / dropping the LR."""
        nonlocal train_time
        rows = len(window)
        over_budget = budget is not None and train_time + (time.perf_counter() - epoch_start) >= budget
        past_drop = budget is not None and train_time + (time.perf_counter() - epoch_start) \
            >= config.lr_drop_fraction * budget
        flags = torch.tensor([float(over_budget), float(past_drop)], device=device)
        values = window.values[:rows]
        if runtime.distributed:
            values = values.clone()
            dist.all_reduce(values)
            values /= runtime.world_size
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        host = values.cpu()
        flags = flags.cpu().tolist()
        try:  # the criterion's target check, recorded on the device; the device has caught up by now
            criterion.raise_if_bad_targets()
        except BadTargetError as error:  # its forwards since the last check are this window's rows
            bad_step, bad_epoch, batch_index, image_ids = window.where[min(error.call, rows - 1)]
            raise BadTargetError(
                f"bad targets at step {bad_step} (epoch {bad_epoch}, batch {batch_index} of {lengths}; image ids on "
                f"rank {runtime.rank}: {image_ids}): {error}. Training stopped; the last good checkpoint is "
                f"{last_good()}", call=error.call) from error
        raise_if_non_finite(host, lengths)
        means = host.mean(0).tolist()
        seconds = time.perf_counter() - window.start_time
        rate = window.images * runtime.world_size / max(seconds, 1e-9)
        entry = {name: round(value, 5) for name, value in zip(LOGGED, means)}
        log("train", epoch=epoch, step=step, batch=window.where[-1][2], lr=optimizer.param_groups[0]["lr"],
            images_per_s=round(rate, 2), train_time_s=round(train_time + time.perf_counter() - epoch_start, 2),
            **entry)
        if bar is not None:
            bar.set_postfix(loss=f"{means[0]:.3f}", img_s=f"{rate:.1f}", refresh=False)
        window.reset()
        return flags[0] > 0, flags[1] > 0

    max_steps = config.max_steps
    # With max_steps the LR drops after this many steps: the schedule is the same on any machine.
    drop_step = None if max_steps is None else max(1, round(config.lr_drop_fraction * max_steps))
    run_bar = None
    if max_steps is not None and config.progress and runtime.main:
        from tqdm import tqdm

        # One bar for the whole run, so its ETA is the run's.
        run_bar = tqdm(total=max_steps, initial=min(step, max_steps), desc="steps", dynamic_ncols=True,
                       file=sys.stderr)
    epoch = start_epoch
    if (budget is not None and train_time >= budget) or (max_steps is not None and step >= max_steps):
        # A finished budgeted run, resumed: nothing to train; its last epoch (counted as done) is start_epoch - 1.
        epoch = start_epoch - 1
        stopped = "time_budget" if budget is not None else "max_steps"
    else:
        for epoch in range(start_epoch, config.epochs):
            sampler.set_epoch(epoch)
            train_set.set_epoch(epoch)
            if budget is None and max_steps is None and config.lr_drop > 0:
                scheduler.set_drops(epoch // config.lr_drop)
            ddp_model.train()
            criterion.train()
            bar = run_bar
            batches: Any = loader
            if run_bar is None and config.progress and runtime.main:
                from tqdm import tqdm

                bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True, file=sys.stderr)
                batches = bar
            epoch_start = time.perf_counter()
            stop = False
            for batch_index, (images, targets) in enumerate(batches):
                image_ids = [int(target["image_id"][0]) for target in targets]  # CPU tensors: no sync
                images = images.to(device, non_blocking=True, memory_format=memory_format)
                targets = _to_device(targets, device)
                with autocast_context(device, runtime.amp):
                    outputs = ddp_model(images)
                outputs = _to_float(outputs)
                try:
                    loss_dict = criterion(outputs, targets)
                except ValueError as error:
                    # NaN predictions mostly surface here, not in the loss: the scipy matcher rejects
                    # their cost blocks. Same report as a non-finite loss (the check syncs, but only here).
                    if _all_finite(outputs):
                        raise
                    raise_if_non_finite(window.values[:len(window)].cpu(), len(loader))  # a loss went first?
                    raise NonFiniteLossError(
                        f"non-finite model outputs at step {step + 1} (epoch {epoch}, batch {batch_index} of "
                        f"{len(loader)}; image ids on rank {runtime.rank}: {image_ids}); the matcher cannot "
                        f"assign them. Training stopped; the last good checkpoint is {last_good()}") from error
                loss = total_loss(loss_dict, weight_dict)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if config.clip_max_norm > 0:
                    scaler.unscale_(optimizer)
                    clip_grad_norm(trainable, config.clip_max_norm)
                scaler.step(optimizer)
                scaler.update()
                step += 1
                logged = torch.stack([loss.detach(), *(loss_dict[name].detach() for name in LOGGED[1:])])
                window.add(logged, step, epoch, batch_index, image_ids)
                if step_hook is not None:
                    step_hook(StepInfo(epoch, batch_index, step, model))
                if run_bar is not None:
                    run_bar.update(1)
                steps_done = max_steps is not None and step >= max_steps
                if len(window) == config.log_every or batch_index == len(loader) - 1 or steps_done:
                    over_budget, past_drop = flush(epoch, len(loader))
                    if past_drop and scheduler.drops == 0:
                        scheduler.set_drops(1)
                        log("lr_drop", epoch=epoch, step=step, lr=optimizer.param_groups[0]["lr"])
                    if over_budget:
                        stop = True
                        break
                if drop_step is not None and step == drop_step and scheduler.drops == 0:
                    scheduler.set_drops(1)
                    log("lr_drop", epoch=epoch, step=step, lr=optimizer.param_groups[0]["lr"])
                if steps_done:
                    stop = True
                    break
            if bar is not None and bar is not run_bar:
                bar.close()
            train_time += time.perf_counter() - epoch_start
            skipped = train_set.skipped if config.skip_bad else {}
            log("epoch", epoch=epoch, step=step, train_time_s=round(train_time, 2), lr=optimizer.param_groups[0]["lr"],
                **({"skipped": skipped} if skipped else {}))
            if any(skipped.values()):
                say(train_set.skip_summary())
            is_last = stop or epoch == config.epochs - 1
            if not is_last and config.eval_every > 0 and (epoch + 1) % config.eval_every == 0:
                last_eval = run_eval(epoch) or last_eval
            save(epoch + 1)
            if stop:
                if budget is not None:
                    stopped = "time_budget"
                    say(f"time budget of {budget:.0f} s spent after {step} steps (epoch {epoch})")
                else:
                    stopped = "max_steps"
                    say(f"{step} steps done (epoch {epoch}, {train_time:.0f} s of training)")
                break
        else:
            epoch = config.epochs - 1
    if run_bar is not None:
        run_bar.close()
    final = run_eval(epoch)
    if final is not None:
        last_eval = final
        save(epoch + 1)  # the checkpoint also carries the final evaluation
    summary = {"epochs": epoch + 1, "steps": step, "train_time_s": train_time, "stopped": stopped,
               "eval": last_eval, "checkpoint": str(checkpoint_path), "log": str(log_path)}
    log("end", **{key: value for key, value in summary.items() if key != "eval"})
    return summary


def _all_finite(outputs: dict[str, Any]) -> bool:
    tensors = [value for value in outputs.values() if isinstance(value, Tensor)]
    tensors += [value for aux in outputs.get("aux_outputs", []) for value in aux.values()]
    return all(bool(torch.isfinite(value).all()) for value in tensors)


def _to_float(outputs: dict[str, Any]) -> dict[str, Any]:
    """Model outputs in fp32 (the criterion's softmax, L1 and GIoU run in fp32 under mixed precision)."""
    converted = {key: value.float() for key, value in outputs.items() if isinstance(value, Tensor)}
    if "aux_outputs" in outputs:
        converted["aux_outputs"] = [{key: value.float() for key, value in aux.items()}
                                    for aux in outputs["aux_outputs"]]
    return converted
