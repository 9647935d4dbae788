"""Training convergence: the reference DETR and its fused copy trained side by side from one seed on one data stream.

    python benchmarks/convergence.py --out DIR [--short] [--budget-s S] [--steps N] [--log-every N]
                                     [--override NAME=VALUE ...] [--num-workers N] [--data-dir DIR] [--append]
    TRITON_INTERPRET=1 python benchmarks/convergence.py --cpu-check --out DIR

writes DIR/results.csv (the long-format table of benchmarks/common.py),
DIR/results.md (final numbers, gaps and targets) and DIR/loss_curves.png (the
two loss curves overlaid, and their relative gap), both drawn from the CSV
alone. Without --cpu-check it needs a CUDA GPU; without one it says so, writes
nothing and exits 0.

What is compared: one model is built, deep-copied, and the copy converted by
`fastdetr.optimize` (same weights, same Parameter values); each is then trained
by the same loop (`train_run`), starting from the same torch seed, on the same
batches: a seeded shuffle and fastdetr's seeded per-sample augmentation, the
image ids and pixel sums of every batch checked equal between the two runs.
The recipe is the demo's (`fastdetr.demo.train_config`: AdamW at the demo's LR
for every parameter, its weight decay, gradient clipping and 10x LR drop at 80%
of the run) on the synthetic "easy" set; the loss is DETR's weighted total
(CE + 5 L1 + 2 GIoU over the final and every aux layer) in fp32. Both models
use the matcher backend "auto" (the fused matcher on CUDA, scipy on the CPU),
so the comparison isolates the transformer layers. A fused model that calls
nn.MultiheadAttention (a silent fallback to the reference path) is an error.

Cases:
- "gpu-bf16" (default; CUDA): detr_small's from-scratch backbone (half-width
  ResNet-18, trainable BatchNorm) under DETR-R50's transformer (d_model 256,
  8 heads, FFN 2048, 6 + 6 layers, 100 queries, dropout 0.1), bf16 autocast,
  batch 8 of 112-144 px images (16-25 tokens each); --override NAME=VALUE
  changes a model setting (e.g. --override dec_layers=3). Both models take the same
  number of steps: --steps when given, else as many as the reference fits into
  --budget-s (default 300 s); the fused model then repeats that count (its own
  budget is only a guard, 2 x --budget-s). Dropout masks differ (the fused
  kernels draw their own), so only the statistics can agree: the target is
  |AP gap| <= 0.5 AP point, where AP is COCO's AP@[.5:.95] on the 200
  validation images. Run-to-run noise of a short from-scratch training is part
  of that gap.
- "gpu-bf16-short" (--short; CUDA; benchmarks/gpu_suite.sh runs it): the same
  model and recipe with dropout 0, so that the two runs differ only by bf16
  rounding and the per-step losses can be compared; every step logged, 1,000
  training images (under out/data/convergence-short), --budget-s 60 by
  default (the fused run repeats the reference's step count). results.md
  gives the largest per-step loss gap over the first 10 steps and over the
  run, the final losses and their gap; no target (a first look).
- "cpu-check-fp32" (--cpu-check; the test runs it through `cpu_check`): a tiny
  model (d_model 64, 2 heads so head dim 32, FFN 128, 1 + 2 layers, 5
  queries, backbone width 8, dropout 0) in float32 on 96 px images, 20 steps
  of batch 2, the fused kernels run by Triton's interpreter. With dropout off
  and fp32 the two runs must agree step by step: target max |relative loss
  gap| <= 1e-4 (shared/DESIGN.md's gradient bound).

Rows of results.csv (provider "reference" or "fastdetr"; `shape` describes the
case's model and data, the same on each of its rows):
- metric "loss", unit "loss", mode "step=N": the training loss of the log
  window ending at optimizer step N (1-based; --log-every steps per window,
  1 in the CPU check): p50 the window's median, p20/p80 its quantiles;
- metric "step_time", unit "ms", mode "train": p50/p20/p80 over the log
  windows of wall-clock ms per step (the first window, which holds kernel
  compilation and warm-up, is left out when there are others);
- metric "train_time", unit "s", mode "train": wall-clock training time, all steps;
- metric "steps", unit "steps", mode "train": optimizer steps taken;
- metrics "ap" and "ap50", unit "fraction", mode "eval": COCO AP@[.5:.95] and
  AP@.5 after training, in 0..1 (results.md shows AP points, x100). Without
  pycocotools (the lent GPU machines have none) there is no evaluation: one
  row of metric "error", mode "eval", NaN values, the reason in `unit`; the
  losses are still compared.
For these single numbers p50 = p20 = p80.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import math
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if __package__ in (None, ""):   # run as `python benchmarks/convergence.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, markdown_table, read_csv, write_csv  # noqa: E402

if TYPE_CHECKING:
    from fastdetr.data import AugmentConfig

PROVIDERS = ("reference", "fastdetr")
GPU_CASE, SHORT_CASE, CPU_CASE = "gpu-bf16", "gpu-bf16-short", "cpu-check-fp32"
CPU_LOSS_BOUND = 1e-4     # max |relative loss gap| per step, fp32 without dropout
GPU_AP_BOUND = 0.5        # max |AP gap| in AP points (x100), bf16 with dropout
DEFAULT_BUDGET_S = 300.0  # per model, GPU case
SHORT_BUDGET_S = 60.0     # per model, short GPU case
EARLY_STEPS = 10          # the short case reports the loss gap over its first steps apart


@dataclass(frozen=True)
class Setup:
    """Everything one case trains with (gpu_setup, cpu_check_setup); optimiser and data fields come from the demo."""

    case: str
    model: dict                   # DETRConfig overrides of the detr_small preset
    data: dict                    # fastdetr.data.synthetic.make_splits arguments (preset and overrides)
    data_dir: str
    num_train: int
    num_val: int
    augment: AugmentConfig        # train and validation resize sizes
    batch_size: int
    lr: float
    lr_backbone: float
    weight_decay: float
    clip_max_norm: float
    lr_drop_fraction: float       # the LR drops 10x (lr_gamma) after this fraction of the steps / budget
    lr_gamma: float
    device: str
    amp: str | None               # "bf16" or None (fp32)
    log_every: int
    num_workers: int
    seed: int
    eval_batch_size: int = 16

    @property
    def shape(self) -> str:
        """The `shape` column: model and data sizes, precision. Raises on an invalid model override."""
        from fastdetr.config import preset

        m = preset("detr_small", **self.model)
        return (f"detr_small ({m.backbone} width {m.backbone_width}), d={m.hidden_dim} h={m.nheads} "
                f"ffn={m.dim_feedforward} {m.enc_layers}+{m.dec_layers} layers Q={m.num_queries} "
                f"p={m.dropout}; synthetic {self.data['preset']} {self.data.get('image_size', 128)} px, "
                f"{self.num_train} train / {self.num_val} val images, batch {self.batch_size}; "
                f"{self.amp or 'fp32'}")


def _recipe() -> dict:
    """The demo's optimiser and data recipe (fastdetr.demo), the fields Setup takes from it."""
    from fastdetr.demo import DemoConfig, train_config
    from fastdetr.train import AUGMENTS

    demo = DemoConfig()
    config = train_config(demo)
    return dict(data_dir=config.data_dir, num_train=config.num_train, num_val=config.num_val,
                augment=AUGMENTS[config.augment], batch_size=config.batch_size, lr=config.lr,
                lr_backbone=config.lr_backbone, weight_decay=config.weight_decay,
                clip_max_norm=config.clip_max_norm, lr_drop_fraction=config.lr_drop_fraction,
                lr_gamma=config.lr_gamma, seed=config.seed, synthetic=config.synthetic)


def gpu_setup(data_dir: str | None = None, log_every: int = 50, num_workers: int = 8,
              overrides: dict | None = None) -> Setup:
    """The GPU case: DETR-R50's transformer on the demo's backbone and data, bf16 (module docstring).

    overrides: DETRConfig fields that replace the case's model settings (e.g. fewer layers).
    """
    recipe = _recipe()
    model = dict(hidden_dim=256, nheads=8, dim_feedforward=2048, enc_layers=6, dec_layers=6, num_queries=100,
                 dropout=0.1) | (overrides or {})
    return Setup(case=GPU_CASE, model=model, data=dict(preset=recipe.pop("synthetic")),
                 **{**recipe, "data_dir": data_dir or recipe["data_dir"]}, device="cuda", amp="bf16",
                 log_every=log_every, num_workers=num_workers)


def short_setup(data_dir: str | None = None, num_workers: int = 8, overrides: dict | None = None) -> Setup:
    """The short GPU case: the GPU case's model and recipe without dropout, every step logged, 1,000
    training images in a folder of their own (the demo's set stays as it is) (module docstring)."""
    setup = gpu_setup(data_dir or "out/data/convergence-short", log_every=1, num_workers=num_workers,
                      overrides={"dropout": 0.0, **(overrides or {})})
    return replace(setup, case=SHORT_CASE, num_train=1000, num_val=100)


def cpu_check_setup(data_dir: str, steps: int = 20) -> Setup:
    """The CPU check: a tiny fp32 model without dropout through the interpreter (module docstring)."""
    from fastdetr.data import AugmentConfig

    recipe = _recipe()
    recipe.pop("synthetic")
    # Scales 64..96 px give 2x2..3x3 feature maps, so batches mix image sizes and the attention sees
    # padded keys; 8 images recycled over 20 steps let the loss fall within the few steps.
    augment = AugmentConfig(scales=(64, 80, 96), max_size=96, crop_resize_scales=(64,), crop_size=(48, 64),
                            val_size=96, crop_prob=0.0)
    model = dict(backbone_width=8, hidden_dim=64, nheads=2, dim_feedforward=128, enc_layers=1, dec_layers=2,
                 num_queries=5, dropout=0.0)
    data = dict(preset="easy", image_size=96, min_size=16, max_size=48)
    return Setup(case=CPU_CASE, model=model, data=data,
                 **{**recipe, "data_dir": data_dir, "num_train": 8, "num_val": 4, "batch_size": 2,
                    "augment": augment}, device="cpu", amp=None, log_every=1, num_workers=0, eval_batch_size=4)


# ---------------------------------------------------------------------------------------------
# Data, models, one training run
# ---------------------------------------------------------------------------------------------

def datasets(setup: Setup):
    """(train, val) CocoDetection of the synthetic set, generated under setup.data_dir unless already there."""
    from fastdetr.data import CocoDetection, make_splits

    arguments = dict(setup.data)
    preset = arguments.pop("preset")
    train_file, val_file = make_splits(setup.data_dir, setup.num_train, setup.num_val, preset=preset, seed=0,
                                       **arguments)
    train = CocoDetection(train_file.parent / "images", train_file, train=True, augment=setup.augment,
                          seed=setup.seed)
    val = CocoDetection(val_file.parent / "images", val_file, train=False, augment=setup.augment)
    return train, val


def build_pair(setup: Setup, num_classes: int) -> dict[str, nn.Module]:
    """{"reference": model, "fastdetr": its deep copy after fastdetr.optimize}: identical weights."""
    import fastdetr
    from fastdetr.nn import TransformerDecoderLayer, TransformerEncoderLayer

    torch.manual_seed(setup.seed)
    reference = fastdetr.detr_small(num_classes=num_classes, **setup.model)
    fused = fastdetr.optimize(copy.deepcopy(reference))
    layers = [*fused.transformer.encoder.layers, *fused.transformer.decoder.layers]
    if not all(isinstance(layer, (TransformerEncoderLayer, TransformerDecoderLayer)) for layer in layers):
        raise RuntimeError("fastdetr.optimize left some transformer layers unconverted: "
                           f"{sorted({type(layer).__name__ for layer in layers})}")
    return {"reference": reference.to(setup.device), "fastdetr": fused.to(setup.device)}


def batches(train_set, setup: Setup) -> Iterator[tuple]:
    """(ImageBatch, targets) forever, epoch after epoch; the same stream on every call.

    The shuffle draws from a generator seeded here, the augmentation of sample i in
    epoch e from (seed, e, i) (CocoDetection), so worker count and timing change nothing.
    Workers are not persistent: they must see each epoch's set_epoch.
    """
    from fastdetr.data import collate_fn

    generator = torch.Generator().manual_seed(setup.seed)
    epoch = 0
    while True:
        train_set.set_epoch(epoch)
        yield from torch.utils.data.DataLoader(
            train_set, batch_size=setup.batch_size, shuffle=True, drop_last=True, generator=generator,
            num_workers=setup.num_workers, collate_fn=collate_fn, pin_memory=setup.device == "cuda")
        epoch += 1


@dataclass
class Run:
    """One provider's training run. Losses are per optimizer step; windows per log window."""

    provider: str
    steps: int = 0
    train_time_s: float = 0.0
    stopped: str = "steps"                          # "steps" or "budget"
    lr_drop_step: int | None = None                 # first step trained at the dropped LR
    losses: list[float] = field(default_factory=list)
    windows: list[tuple[int, float, float, float, float]] = field(default_factory=list)  # step, p50, p20, p80, ms/step
    fingerprints: list[tuple[tuple[int, ...], float]] = field(default_factory=list)       # image ids, pixel sum
    attention_calls: int = 0                        # nn.MultiheadAttention.forward calls, training and evaluation
    stats: dict[str, float] | None = None           # COCO evaluation after training
    eval_skipped: str | None = None                 # why there is no evaluation (stats stays None)


@contextlib.contextmanager
def _count_attention_calls(model: nn.Module) -> Iterator[list[int]]:
    """A one-element counter of nn.MultiheadAttention calls in `model` while the block runs (forward pre-hooks).

    The fused layers read the attention modules' parameters without calling them, so a
    fused model that counts anything fell back to the reference path somewhere.
    """
    counter = [0]

    def count(module, args):
        counter[0] += 1

    handles = [module.register_forward_pre_hook(count) for module in model.modules()
               if isinstance(module, nn.MultiheadAttention)]
    try:
        yield counter
    finally:
        for handle in handles:
            handle.remove()


def _quantiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(p50, p20, p80) of `values`; a single value stands for all three."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    cuts = statistics.quantiles(values, n=10, method="inclusive")
    return statistics.median(values), cuts[1], cuts[7]


def check_fused_path(model: nn.Module, train_set, setup: Setup) -> None:
    """Raise now, not after a long run, when `model`'s layers would fall back to nn.MultiheadAttention.

    One forward and backward of a deep copy (the model itself, its BatchNorm statistics
    included, stays untouched) on the first batch, under the run's autocast; on a GPU
    this also compiles the kernels before the timed run.
    """
    from fastdetr.evaluate import autocast_context

    probe = copy.deepcopy(model).train()
    with contextlib.closing(batches(train_set, setup)) as stream:   # closing shuts down the loader's workers
        images, _ = next(stream)
    device = torch.device(setup.device)
    with _count_attention_calls(probe) as calls, autocast_context(device, setup.amp):
        outputs = probe(images.to(device))
    (outputs["pred_logits"].float().sum() + outputs["pred_boxes"].float().sum()).backward()
    if calls[0]:
        raise RuntimeError(f"the fastdetr model called nn.MultiheadAttention {calls[0]} times in one forward: "
                           f"its layers fall back to the reference path on {setup.device} with "
                           f"{setup.amp or 'fp32'} (unsupported head dim, dtype or device?)")


def train_run(provider: str, model: nn.Module, train_set, setup: Setup, max_steps: int | None,
              budget_s: float | None, lr_drop_step: int | None = None) -> Run:
    """Train `model` in place with the demo's recipe until `max_steps` or `budget_s` seconds; returns the Run.

    lr_drop_step: the step from which the LR is multiplied by lr_gamma; None: after
    lr_drop_fraction of max_steps, or without max_steps of budget_s (the step it
    happened at is recorded, so a second run can repeat it).
    """
    from fastdetr.criterion import build_criterion, total_loss
    from fastdetr.evaluate import autocast_context
    from fastdetr.static import float_outputs as _to_float  # the trainer's own helpers: the two loops cannot drift
    from fastdetr.train import _to_device

    if max_steps is None and budget_s is None:
        raise ValueError("train_run: give max_steps, budget_s or both")
    device = torch.device(setup.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if lr_drop_step is None and max_steps is not None:
        lr_drop_step = max(1, round(setup.lr_drop_fraction * max_steps))
    torch.manual_seed(setup.seed)   # the dropout draws of both runs start from one state
    criterion = build_criterion(model.config).to(device)
    backbone = [p for name, p in model.named_parameters() if name.startswith("backbone.") and p.requires_grad]
    rest = [p for name, p in model.named_parameters() if not name.startswith("backbone.") and p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": rest, "lr": setup.lr}, {"params": backbone, "lr": setup.lr_backbone}],
                                  lr=setup.lr, weight_decay=setup.weight_decay)
    run = Run(provider)
    pending: list[Tensor] = []   # this window's per-step losses, on the device: read once per window

    def flush(now: float, window_start: float) -> None:
        values = torch.stack(pending).float().cpu().tolist()   # the window's one host sync
        if not all(math.isfinite(value) for value in values):
            bad = run.steps - len(values) + 1 + next(i for i, v in enumerate(values) if not math.isfinite(v))
            raise FloatingPointError(f"{provider}: non-finite training loss at step {bad} of the {setup.case} run "
                                     f"(losses of the window: {values})")
        run.losses.extend(values)
        ms_per_step = (now - window_start) * 1e3 / len(values)
        run.windows.append((run.steps, *_quantiles(values), ms_per_step))
        pending.clear()

    model.train()
    criterion.train()
    with contextlib.closing(batches(train_set, setup)) as stream, _count_attention_calls(model) as attention_calls:
        sync()
        start = window_start = time.perf_counter()
        while max_steps is None or run.steps < max_steps:
            elapsed = time.perf_counter() - start
            if budget_s is not None and elapsed >= budget_s:
                run.stopped = "budget"
                break
            if lr_drop_step is None and elapsed >= setup.lr_drop_fraction * budget_s:
                lr_drop_step = run.steps + 1
            if run.steps + 1 == lr_drop_step:
                for group in optimizer.param_groups:
                    group["lr"] *= setup.lr_gamma
            images, targets = next(stream)
            run.fingerprints.append((tuple(int(t["image_id"][0]) for t in targets), float(images.tensors.sum())))
            images = images.to(device, non_blocking=True)
            targets = _to_device(targets, device)
            with autocast_context(device, setup.amp):
                outputs = model(images)
            loss = total_loss(criterion(_to_float(outputs), targets), criterion.weight_dict)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if setup.clip_max_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), setup.clip_max_norm)
            optimizer.step()
            run.steps += 1
            pending.append(loss.detach())
            if len(pending) == setup.log_every:
                sync()
                now = time.perf_counter()
                flush(now, window_start)
                window_start = now
        if pending:
            sync()
            flush(time.perf_counter(), window_start)
        run.train_time_s = time.perf_counter() - start
    run.lr_drop_step = lr_drop_step if lr_drop_step is not None and lr_drop_step <= run.steps else None
    run.attention_calls = attention_calls[0]
    return run


def evaluation_unavailable() -> str | None:
    """Why COCO evaluation cannot run here (pycocotools missing, as on the lent GPU machines), or None."""
    import importlib.util

    return None if importlib.util.find_spec("pycocotools") else "pycocotools is not installed"


def evaluate_run(run: Run, model: nn.Module, val_set, setup: Setup) -> None:
    """COCO evaluation of the trained model into run.stats (AP, AP50, ...), in eval mode; without pycocotools,
    only the reason, in run.eval_skipped: the losses are still compared."""
    from fastdetr.evaluate import evaluate

    run.eval_skipped = evaluation_unavailable()
    if run.eval_skipped:
        return
    with _count_attention_calls(model) as counter:
        run.stats = evaluate(model, val_set, batch_size=setup.eval_batch_size, device=setup.device,
                             num_workers=min(setup.num_workers, 4), amp=setup.amp)
    run.attention_calls += counter[0]


def first_difference(a: Run, b: Run) -> int | None:
    """The first step (1-based) at which the two runs saw different batches, or None."""
    for step, (mine, theirs) in enumerate(zip(a.fingerprints, b.fingerprints), start=1):
        if mine != theirs:
            return step
    return None


def relative_gaps(reference: Sequence[float], fused: Sequence[float]) -> list[float]:
    """|fused - reference| / |reference| per step, over the steps both have."""
    return [abs(f - r) / max(abs(r), 1e-30) for r, f in zip(reference, fused)]


@dataclass
class Comparison:
    """Both runs of one case, their trained models, and the checks' headline numbers."""

    setup: Setup
    runs: dict[str, Run]
    models: dict[str, nn.Module]
    max_relative_gap: float     # per step, over the steps both took
    seconds: float              # everything: data, both trainings, both evaluations


def _ap_text(run: Run) -> str:
    return f"AP {run.stats['AP']:.4f}" if run.stats is not None else f"AP not measured ({run.eval_skipped})"


def compare(setup: Setup, max_steps: int | None, budget_s: float | None) -> Comparison:
    """Train and evaluate both providers as the module docstring says; raises when the check itself is broken."""
    begin = time.perf_counter()
    print(f"{setup.case}: {setup.shape}", flush=True)
    train_set, val_set = datasets(setup)
    models = build_pair(setup, train_set.num_classes)
    check_fused_path(models["fastdetr"], train_set, setup)
    runs: dict[str, Run] = {}
    reference = train_run("reference", models["reference"], train_set, setup, max_steps, budget_s)
    evaluate_run(reference, models["reference"], val_set, setup)
    runs["reference"] = reference
    print(f"  reference: {reference.steps} steps in {reference.train_time_s:.1f} s, final loss "
          f"{reference.losses[-1]:.4f}, {_ap_text(reference)}", flush=True)
    # the reference's LR drop step, or one past its last step when it never dropped
    drop = reference.lr_drop_step or reference.steps + 1
    fused = train_run("fastdetr", models["fastdetr"], train_set, setup, reference.steps,
                      None if budget_s is None else 2 * budget_s, lr_drop_step=drop)
    evaluate_run(fused, models["fastdetr"], val_set, setup)
    runs["fastdetr"] = fused
    print(f"  fastdetr:  {fused.steps} steps in {fused.train_time_s:.1f} s, final loss {fused.losses[-1]:.4f}, "
          f"{_ap_text(fused)}", flush=True)
    if fused.attention_calls:
        raise RuntimeError(f"the fastdetr model called nn.MultiheadAttention {fused.attention_calls} times: its "
                           f"layers fell back to the reference path (unsupported head dim, dtype or device?), so "
                           f"this run compares the reference with itself")
    if not reference.attention_calls:
        raise RuntimeError("the reference model never called nn.MultiheadAttention: the call counter is broken")
    step = first_difference(reference, fused)
    if step is not None:
        raise RuntimeError(f"the two runs saw different batches from step {step} on: "
                           f"{reference.fingerprints[step - 1]} vs {fused.fingerprints[step - 1]}")
    if fused.steps != reference.steps:
        print(f"  warning: fastdetr stopped after {fused.steps} of the reference's {reference.steps} steps "
              f"(its guard budget); gaps are over the common steps", flush=True)
    gaps = relative_gaps(reference.losses, fused.losses)
    return Comparison(setup, runs, models, max(gaps), time.perf_counter() - begin)


def cpu_check(out: Path | None = None, data_dir: Path | str | None = None, steps: int = 20) -> Comparison:
    """The CPU case (module docstring): returns the Comparison; with `out`, also writes the CSV, md and PNG.

    Needs TRITON_INTERPRET=1 (set before any fastdetr kernel is imported): otherwise
    CPU tensors take the plain-PyTorch path and nothing fused would be checked.
    """
    from fastdetr.backend import interpreter_enabled, triton_importable

    if not (triton_importable() and interpreter_enabled()):
        raise RuntimeError("the CPU check runs the fused kernels through Triton's interpreter: install triton "
                           "and set TRITON_INTERPRET=1 before fastdetr's kernels are imported")
    if data_dir is None:
        data_dir = Path(out) / "data" if out is not None else Path("out/data/convergence-check")
    setup = cpu_check_setup(str(data_dir), steps)
    threads = torch.get_num_threads()
    # The tensors are tiny: one thread is as fast as two, and two spin-wait for seconds whenever
    # another process holds a core (measured: 14 s for the whole check with one, 39 s with two).
    torch.set_num_threads(1)
    try:
        comparison = compare(setup, max_steps=steps, budget_s=None)
    finally:
        torch.set_num_threads(threads)
    if out is not None:
        env = {**environment("cpu"), "device": "cpu (Triton interpreter)"}
        write_results(comparison, env, Path(out))
    return comparison


# ---------------------------------------------------------------------------------------------
# The table, its summary and its plot
# ---------------------------------------------------------------------------------------------

def result_rows(comparison: Comparison, env: dict) -> list[dict]:
    """The long-format rows of one comparison (module docstring)."""
    setup = comparison.setup
    rows = []

    def row(provider, mode, metric, unit, p50, p20=None, p80=None):
        rows.append(dict(case=setup.case, provider=provider, mode=mode, metric=metric, unit=unit, shape=setup.shape,
                         p50=p50, p20=p50 if p20 is None else p20, p80=p50 if p80 is None else p80, **env))

    for provider in PROVIDERS:
        run = comparison.runs[provider]
        for step, p50, p20, p80, _ in run.windows:
            row(provider, f"step={step}", "loss", "loss", p50, p20, p80)
        timed = [window[4] for window in run.windows]
        timed = timed[1:] if len(timed) > 1 else timed   # the first window holds compilation and warm-up
        row(provider, "train", "step_time", "ms", *_quantiles(timed))
        row(provider, "train", "train_time", "s", run.train_time_s)
        row(provider, "train", "steps", "steps", float(run.steps))
        if run.stats is None:   # the reason in the unit column, as the benchmarks write error rows
            row(provider, "eval", "error", f"AP not measured: {run.eval_skipped}", math.nan)
        else:
            row(provider, "eval", "ap", "fraction", run.stats["AP"])
            row(provider, "eval", "ap50", "fraction", run.stats["AP50"])
    return rows


def _loss_curves(rows: Sequence[dict]) -> dict[tuple[str, str], list[tuple[int, float, float, float]]]:
    """{(case, provider): [(step, p50, p20, p80), ...] sorted by step}; a later row of a step wins."""
    curves: dict[tuple[str, str], dict[int, tuple[float, float, float]]] = {}
    for r in rows:
        if r["metric"] == "loss" and r["mode"].startswith("step="):
            curves.setdefault((r["case"], r["provider"]), {})[int(r["mode"][5:])] = (r["p50"], r["p20"], r["p80"])
    return {key: [(step, *points[step]) for step in sorted(points)] for key, points in curves.items()}


def _final_loss(curve: list[tuple[int, float, float, float]]) -> float:
    """Mean window median over the last tenth of the logged windows (at least one)."""
    tail = curve[-max(1, len(curve) // 10):]
    return sum(point[1] for point in tail) / len(tail)


def _points(fraction: float, sign: str = "") -> str:
    """A 0..1 AP as AP points (x100), "n/a" when not measured (NaN)."""
    return "n/a" if math.isnan(fraction) else f"{100 * fraction:{sign}.2f}"


def summary_markdown(rows: Sequence[dict]) -> str:
    """results.md, drawn from the table's rows alone: per case the two runs, their gaps and the case's target."""
    if not rows:
        return "# Convergence\n\nNo results.\n"
    last = rows[-1]
    value = {(r["case"], r["provider"], r["metric"]): r["p50"] for r in rows if not r["mode"].startswith("step=")}
    curves = _loss_curves(rows)
    cases = list(dict.fromkeys(r["case"] for r in rows))
    shapes = {r["case"]: r["shape"] for r in rows}
    out = [f"# Convergence: reference vs fastdetr, one seed, one data stream\n\n{last['device']}, "
           f"torch {last['torch']}, triton {last['triton']}, commit {last['git_sha']}, {last['timestamp']}. "
           "Loss: DETR's weighted total over all decoder layers; final loss = mean of the last tenth of the "
           "logged windows; AP in points (COCO AP x 100); gaps are fastdetr - reference.\n"]
    for case in cases:
        out.append(f"\n## {case}\n\n{shapes[case]}\n\n")
        table = []
        for provider in PROVIDERS:
            curve = curves.get((case, provider))
            if curve is None:
                continue
            get = {metric: value.get((case, provider, metric), math.nan)
                   for metric in ("steps", "train_time", "step_time", "ap", "ap50")}
            table.append([provider, f"{get['steps']:.0f}", f"{get['train_time']:.1f}", f"{get['step_time']:.1f}",
                          f"{_final_loss(curve):.4f}", _points(get["ap"]), _points(get["ap50"])])
        both = all((case, p) in curves for p in PROVIDERS)
        if both:
            ref_curve, fused_curve = curves[(case, "reference")], curves[(case, "fastdetr")]
            ref_final, fused_final = _final_loss(ref_curve), _final_loss(fused_curve)
            ap_gap = 100 * (value.get((case, "fastdetr", "ap"), math.nan) - value.get((case, "reference", "ap"),
                                                                                       math.nan))
            ap50_gap = 100 * (value.get((case, "fastdetr", "ap50"), math.nan)
                              - value.get((case, "reference", "ap50"), math.nan))
            table.append(["gap", "", "", "", f"{(fused_final - ref_final) / abs(ref_final):+.2e} (relative)",
                          _points(ap_gap / 100, "+"), _points(ap50_gap / 100, "+")])
        out.append(markdown_table(["provider", "steps", "train time (s)", "ms/step (p50)", "final loss", "AP",
                                   "AP50"], table))
        for reason in dict.fromkeys(r["unit"] for r in rows if r["case"] == case and r["metric"] == "error"):
            out.append(f"\n{reason}.\n")
        if not both:
            out.append("\nOnly one provider in this table: no gap.\n")
            continue
        ref_points = {step: p50 for step, p50, _, _ in ref_curve}
        common = [(step, p50, ref_points[step]) for step, p50, _, _ in fused_curve if step in ref_points]
        gaps = [(abs(f - r) / max(abs(r), 1e-30), step) for step, f, r in common]
        worst, worst_step = max(gaps)
        per = "step" if all(b - a == 1 for (a, *_), (b, *_) in zip(common, common[1:])) else "logged window"
        out.append(f"\nLargest |relative loss gap| over the {len(common)} logged points (one per {per}): "
                   f"{worst:.2e}, at step {worst_step}.\n\n")
        early = [gap for gap, step in gaps if step <= EARLY_STEPS]
        if case == SHORT_CASE and early:
            out.append(f"Over the first {min(EARLY_STEPS, len(early))} steps (the runs start from the same weights "
                       f"and see the same batches; without dropout only bf16 rounding differs): {max(early):.2e}.\n\n")
        if case == CPU_CASE:
            measured, bound, what = worst, CPU_LOSS_BOUND, "max relative loss gap per step (fp32, no dropout)"
            cells = [what, f"{measured:.2e}", f"<= {bound:g}"]
        elif case == GPU_CASE:
            measured, bound, what = abs(ap_gap), GPU_AP_BOUND, "AP gap in points, absolute (bf16, dropout)"
            cells = [what, f"{measured:.2f}", f"<= {bound:g}"]
        else:
            out.append("No target for this case.\n")
            continue
        verdict = "not measured" if math.isnan(measured) else "met" if measured <= bound else "missed"
        out.append(markdown_table(["target", "measured", "bound", ""], [[*cells, verdict]]))
    return "".join(out)


def plot_loss_curves(rows: Sequence[dict], path: Path) -> Path:
    """loss_curves.png from the table's rows: per case, the two loss curves overlaid, and their relative gap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = _loss_curves(rows)
    cases = list(dict.fromkeys(case for case, _ in curves))
    if not cases:
        raise ValueError("no loss rows to plot")
    figure, axes = plt.subplots(len(cases), 2, figsize=(12, 4.2 * len(cases)), dpi=100, squeeze=False,
                                gridspec_kw=dict(width_ratios=(3, 2)))
    colours = {"reference": "tab:blue", "fastdetr": "tab:orange"}
    for (loss_axis, gap_axis), case in zip(axes, cases):
        for provider, style in zip(PROVIDERS, ("-", "--")):
            curve = curves.get((case, provider))
            if curve is None:
                continue
            steps = [point[0] for point in curve]
            loss_axis.plot(steps, [point[1] for point in curve], style, color=colours[provider], linewidth=1.2,
                           label=provider)
            if any(point[2] != point[3] for point in curve):   # windows of several steps: their p20-p80 band
                loss_axis.fill_between(steps, [p[2] for p in curve], [p[3] for p in curve], color=colours[provider],
                                       alpha=0.15, linewidth=0)
        loss_axis.set_title(f"{case}: training loss")
        loss_axis.set_xlabel("optimizer step")
        loss_axis.set_ylabel("loss (weighted total)")
        loss_axis.grid(alpha=0.3)
        loss_axis.legend()
        if all((case, p) in curves for p in PROVIDERS):
            reference = dict((point[0], point[1]) for point in curves[(case, "reference")])
            common = [(s, p50) for s, p50, _, _ in curves[(case, "fastdetr")] if s in reference]
            gap_axis.plot([s for s, _ in common], [(f - reference[s]) / abs(reference[s]) for s, f in common],
                          color="tab:red", linewidth=1)
            if case == CPU_CASE:
                gap_axis.axhspan(-CPU_LOSS_BOUND, CPU_LOSS_BOUND, color="tab:green", alpha=0.12,
                                 label=f"bound +-{CPU_LOSS_BOUND:g}")
                gap_axis.legend()
            gap_axis.axhline(0, color="black", linewidth=0.6)
        gap_axis.set_title("(fastdetr - reference) / reference")
        gap_axis.set_xlabel("optimizer step")
        gap_axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return Path(path)


def write_results(comparison: Comparison, env: dict, out: Path, append: bool = False) -> tuple[Path, Path, Path]:
    """results.csv (rows added with `append`), then results.md and loss_curves.png drawn from the CSV."""
    csv_path = write_csv(result_rows(comparison, env), out / "results.csv", append=append)
    rows = read_csv(csv_path)
    md_path = out / "results.md"
    md_path.write_text(summary_markdown(rows))
    png_path = plot_loss_curves(rows, out / "loss_curves.png")
    return csv_path, md_path, png_path


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for results.csv, results.md, loss_curves.png")
    parser.add_argument("--budget-s", type=float, help=f"training seconds for the reference model (GPU cases; "
                        f"default {DEFAULT_BUDGET_S:g}, {SHORT_BUDGET_S:g} with --short, unless --steps is given); "
                        "the fused model takes as many steps")
    parser.add_argument("--steps", type=int, help="optimizer steps per model (default: what fits --budget-s on "
                        "the GPU; 20 with --cpu-check)")
    parser.add_argument("--log-every", type=int, help="steps per logged loss window (GPU case; default 50, "
                        "1 with --short)")
    parser.add_argument("--num-workers", type=int, default=8, help="data loader processes (GPU case)")
    parser.add_argument("--override", action="append", default=[], metavar="NAME=VALUE",
                        help="a DETRConfig field of the GPU case's model, e.g. dec_layers=3 (repeatable)")
    parser.add_argument("--data-dir", help="synthetic set folder (default: the demo's out/data/easy on the GPU, "
                        "out/data/convergence-short with --short, out/data/convergence-check for --cpu-check)")
    parser.add_argument("--append", action="store_true", help="add to an existing results.csv")
    case = parser.add_mutually_exclusive_group()
    case.add_argument("--cpu-check", action="store_true",
                      help="the tiny fp32 equality check on the CPU through Triton's interpreter")
    case.add_argument("--short", action="store_true", help=f"the short GPU case ({SHORT_CASE}): no dropout, every "
                      f"step logged, {SHORT_BUDGET_S:g} s per model unless --budget-s / --steps say otherwise")
    args = parser.parse_args(argv)
    for name in ("steps", "log_every"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")
    if args.budget_s is not None and args.budget_s <= 0:
        parser.error("--budget-s must be positive")
    overrides = {}
    for text in args.override:
        name, equals, raw = text.partition("=")
        if not equals or not name:
            parser.error(f"--override {text!r}: expected NAME=VALUE, e.g. dec_layers=3")
        try:
            overrides[name] = ast.literal_eval(raw)   # 3 -> int, 0.1 -> float, True -> bool
        except (ValueError, SyntaxError):
            overrides[name] = raw                     # a bare word, e.g. backbone=resnet34
    if args.cpu_check:
        if overrides:
            parser.error("--override changes the GPU case's model; the CPU check's is fixed")
        import os

        from fastdetr.backend import interpreter_enabled

        if not interpreter_enabled():   # read when a kernel module is first imported, which is later
            os.environ["TRITON_INTERPRET"] = "1"
        comparison = cpu_check(data_dir=args.data_dir or "out/data/convergence-check", steps=args.steps or 20)
        env = {**environment("cpu"), "device": "cpu (Triton interpreter)"}
    else:
        if args.short:
            setup = short_setup(args.data_dir, num_workers=args.num_workers, overrides=overrides)
            setup = replace(setup, log_every=args.log_every or setup.log_every)
        else:
            setup = gpu_setup(args.data_dir, log_every=args.log_every or 50, num_workers=args.num_workers,
                              overrides=overrides)
        try:
            shape = setup.shape   # builds the model's config: a bad override fails here, before any work
        except (TypeError, ValueError) as error:
            parser.error(f"--override: {error}")
        if not torch.cuda.is_available():
            print(f"no CUDA device: skipped {setup.case} ({shape}); nothing written to {args.out} "
                  f"(--cpu-check runs the CPU equality check)")
            return 0
        default_budget = SHORT_BUDGET_S if args.short else DEFAULT_BUDGET_S
        budget = args.budget_s if args.budget_s is not None or args.steps is not None else default_budget
        limits = [f"{args.steps} steps"] * (args.steps is not None) + [f"{budget:g} s"] * (budget is not None)
        print(f"reference: at most {' and '.join(limits)}; fastdetr: the reference's step count", flush=True)
        comparison = compare(setup, max_steps=args.steps, budget_s=budget)
        env = environment("cuda")
    csv_path, md_path, png_path = write_results(comparison, env, args.out, append=args.append)
    print(f"wrote {csv_path}, {md_path} and {png_path}")
    print(headline(comparison))
    return 0


def headline(comparison: Comparison) -> str:
    """One line: steps, final losses and their gap, the largest per-step loss gaps, the AP gap or why none."""
    reference, fused = comparison.runs["reference"], comparison.runs["fastdetr"]
    ref_final, fused_final = _final_loss(reference.windows), _final_loss(fused.windows)
    gaps = relative_gaps(reference.losses, fused.losses)
    if reference.stats is not None and fused.stats is not None:
        ap = f"AP gap {100 * (fused.stats['AP'] - reference.stats['AP']):+.2f} points"
    else:
        ap = f"AP not measured ({reference.eval_skipped or fused.eval_skipped})"
    return (f"{comparison.setup.case}: {reference.steps} steps; final loss reference {ref_final:.4f}, fastdetr "
            f"{fused_final:.4f} ({(fused_final - ref_final) / abs(ref_final):+.2e} relative); max relative loss "
            f"gap per step {max(gaps):.2e} (first {min(EARLY_STEPS, len(gaps))} steps: "
            f"{max(gaps[:EARLY_STEPS]):.2e}); {ap}; {comparison.seconds:.1f} s in all")


if __name__ == "__main__":
    sys.exit(main())
