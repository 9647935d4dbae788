"""DETR vs Deformable DETR on the synthetic "easy" set: validation AP50 against steps and CPU seconds.

Each run trains one model from scratch with `fastdetr.train.train` for the same process CPU budget, on
the same data in the same order (the sampler and the augmentation draw from the seed), with the same
seed, batch size, optimizer and LR settings. Unlike `benchmarks/convergence.py` (reference vs fused
DETR, the same model twice), the two models here differ; what is matched and what is not is `MODELS`.

How a run is measured, with a step hook (`_Meter`) rather than the trainer's own stopping rules:
- training CPU time is the sum of `time.process_time()` deltas between consecutive step hooks (one
  optimizer step plus its data loading, logging and, once per epoch, the checkpoint write), from the
  end of the first step on; evaluations are timed separately and left out;
- every `eval_every_steps` steps, and at the step where the budget is spent, the hook evaluates the
  model on the validation split (`fastdetr.evaluate`, pycocotools) under a forked RNG, so evaluating
  never changes the training;
- when the budget is spent the hook raises `_BudgetSpent`, which ends `train` (the trainer's budget,
  `time_budget_s`, is wall time, and its schedule would differ between the models).
The LR is constant (no drop): a drop placed at a fraction of each run's steps would fall at different
steps for the two models and confound the per-step comparison.

Each run is one process with `threads` torch threads (default 1); `jobs` runs go side by side (default 2,
one per core of a 2-core machine). With one thread per process, CPU time is the time the step takes on
one core, whatever else the machine runs; wall time is recorded but stretches with contention.

Writes out/results.csv (one row per evaluation: model, seed, step, cpu_s, wall_s, AP50, AP, loss, then
where it ran), out/results.md (`summary_markdown`) and the plot (`plot`, drawn from the CSV alone).
Usage: python benchmarks/family_convergence.py --out DIR [--cpu-budget-s S] [--seeds 0,1]
       [--eval-every-steps N] [--quick] [--plot PATH] [--plot-only]
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):   # run as `python benchmarks/family_convergence.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import git_sha, markdown_table  # noqa: E402

# The demo's detr_small (fastdetr.demo.DEMO_MODEL: ResNet-18 at 24..192 channels, trainable BatchNorm,
# d_model 96, 8 heads, 2 + 3 layers, FFN 512, no dropout) and Deformable DETR at the same sizes and
# with the same 20 queries. What still differs is the architecture: 4 feature levels (C3-C5 of the
# backbone plus a stride-2 conv, each through a 1x1 conv + GroupNorm) and multi-scale deformable
# attention (4 points per head and level) instead of C5 only and full attention; sigmoid focal loss
# and its matching cost (class weight 2) instead of softmax CE with a no-object class (weight 1,
# eos 0.1); top-100 (query, class) detections instead of one per query; the sampling offsets and
# reference points at 0.1x the LR (the official's third parameter group).
# "deformable_detr_small_1level" is an ablation: the same Deformable DETR on C5 alone.
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "detr_small": ("detr_small", {"backbone_width": 24, "hidden_dim": 96, "num_queries": 20}),
    "deformable_detr_small": ("deformable_detr_small", {"backbone_width": 24, "hidden_dim": 96, "num_queries": 20}),
    "deformable_detr_small_1level": ("deformable_detr_small", {"backbone_width": 24, "hidden_dim": 96,
                                                               "num_queries": 20, "num_feature_levels": 1}),
}
COLUMNS = ("model", "seed", "step", "cpu_s", "wall_s", "AP50", "AP", "loss", "eval_cpu_s", "threads",
           "batch_size", "git_sha", "torch", "timestamp")


@dataclass
class StudyConfig:
    """One study: every (seed, model) run trains for `cpu_budget_s` process CPU seconds."""

    out_dir: str
    data_dir: str = "out/data/easy"
    num_train: int = 4000
    num_val: int = 200
    models: tuple[str, ...] = ("detr_small", "deformable_detr_small")
    seeds: tuple[int, ...] = (0, 1)
    cpu_budget_s: float = 480.0
    eval_every_steps: int = 250
    batch_size: int = 8
    lr: float = 2e-4            # every parameter group (the demo's recipe); Deformable's offsets get 0.1x of it
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    threads: int = 1            # torch threads per run
    jobs: int = 2               # runs side by side, each in its own process
    log_every: int = 10


def train_config(study: StudyConfig, model: str, seed: int) -> Any:
    """The TrainConfig of one run: the demo's (fastdetr.demo.train_config) with the study's model and settings."""
    from fastdetr.demo import DemoConfig
    from fastdetr.demo import train_config as demo_train_config

    preset, overrides = MODELS[model]
    demo = DemoConfig(out_dir=str(Path(study.out_dir) / "runs" / f"{model}_seed{seed}"), data_dir=study.data_dir,
                      num_train=study.num_train, num_val=study.num_val, batch_size=study.batch_size, lr=study.lr,
                      seed=seed, num_workers=0, eval_every=0, progress=False)
    # max_steps only as an upper bound (the hook stops the run); lr_drop_fraction 1: the drop never comes.
    return dataclasses.replace(
        demo_train_config(demo), model=preset, model_overrides=dict(overrides), lr=study.lr, lr_backbone=study.lr,
        weight_decay=study.weight_decay, clip_max_norm=study.clip_max_norm, lr_drop=0, max_steps=10**9,
        lr_drop_fraction=1.0, num_threads=study.threads, log_every=min(study.log_every, study.eval_every_steps),
        device="cpu")


class _BudgetSpent(Exception):
    """Raised by `_Meter` to end `train` once the CPU budget is spent."""


class _Meter:
    """The step hook of one run: accrues training CPU/wall time, evaluates every N steps, stops at the budget."""

    def __init__(self, study: StudyConfig, val_set: Any):
        self.study, self.val_set = study, val_set
        self.cpu = self.wall = self.eval_cpu = 0.0
        self.last_cpu: float | None = None
        self.last_wall = 0.0
        self.evals: list[dict[str, float]] = []

    def __call__(self, info: Any) -> None:
        import torch

        from fastdetr.evaluate import evaluate

        cpu, wall = time.process_time(), time.perf_counter()
        if self.last_cpu is None:  # the clock starts at the end of the first step
            self.last_cpu, self.last_wall = cpu, wall
            return
        self.cpu += cpu - self.last_cpu
        self.wall += wall - self.last_wall
        spent = self.cpu >= self.study.cpu_budget_s
        if spent or info.step % self.study.eval_every_steps == 0:
            with torch.random.fork_rng():
                stats = evaluate(info.model, self.val_set, batch_size=16, device="cpu", num_workers=0)
            self.eval_cpu += time.process_time() - cpu
            self.evals.append({"step": info.step, "cpu_s": self.cpu, "wall_s": self.wall, "AP50": stats["AP50"],
                               "AP": stats["AP"], "eval_cpu_s": time.process_time() - cpu})
        self.last_cpu, self.last_wall = time.process_time(), time.perf_counter()
        if spent:
            raise _BudgetSpent


def _mean_losses(log_path: Path, steps: Sequence[int]) -> list[float]:
    """Per evaluation step, the mean logged training loss of the log points since the previous one.

    Where there is none (the budget spent between two log points) the latest earlier log point's; NaN before the first.
    """
    train = [json.loads(line) for line in log_path.read_text().splitlines() if '"event": "train"' in line]
    means, previous = [], 0
    for step in steps:
        window = [entry["loss"] for entry in train if previous < entry["step"] <= step]
        earlier = [entry["loss"] for entry in train if entry["step"] <= step][-1:]
        means.append(statistics.fmean(window) if window else (earlier[0] if earlier else math.nan))
        previous = step
    return means


def run_one(study: StudyConfig, model: str, seed: int) -> list[dict[str, Any]]:
    """Train `model` with `seed` for the CPU budget; returns its results rows (also in out/runs/<run>.csv)."""
    import torch

    from fastdetr.data import CocoDetection
    from fastdetr.train import AUGMENTS, train

    config = train_config(study, model, seed)
    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "log.jsonl").unlink(missing_ok=True)
    torch.set_num_threads(study.threads)  # the trainer sets it too; the validation set is built before it runs
    val_root = Path(study.data_dir) / "val"
    val_set = CocoDetection(str(val_root / "images"), str(val_root / "annotations.json"), train=False,
                            augment=AUGMENTS[config.augment])
    meter = _Meter(study, val_set)
    try:
        train(config, step_hook=meter)
    except _BudgetSpent:
        pass
    env = dict(threads=study.threads, batch_size=study.batch_size, git_sha=git_sha(), torch=torch.__version__,
               timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    losses = _mean_losses(run_dir / "log.jsonl", [entry["step"] for entry in meter.evals])
    rows = [dict(model=model, seed=seed, **entry, loss=loss, **env) for entry, loss in zip(meter.evals, losses)]
    write_csv(rows, run_dir.parent / f"{model}_seed{seed}.csv")
    print(f"{model} seed {seed}: {rows[-1]['step']} steps in {rows[-1]['cpu_s']:.0f} CPU-s "
          f"({rows[-1]['wall_s']:.0f} s wall), AP50 {rows[-1]['AP50']:.3f}", flush=True)
    return rows


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: (f"{value:.6g}" if isinstance(value, float) else value)
                             for key, value in row.items()})
    return path


def read_results(path: Path) -> list[dict[str, Any]]:
    """results.csv's rows, numbers as numbers."""
    with Path(path).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key in ("seed", "step", "threads", "batch_size"):
            row[key] = int(row[key])
        for key in ("cpu_s", "wall_s", "AP50", "AP", "loss", "eval_cpu_s"):
            row[key] = float(row[key])
    return rows


def _runs(rows: Sequence[dict[str, Any]]) -> dict[str, dict[int, list[dict[str, Any]]]]:
    """model -> seed -> its rows by step, models in MODELS order."""
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for row in sorted(rows, key=lambda r: (list(MODELS).index(r["model"]), r["seed"], r["step"])):
        runs.setdefault(row["model"], {}).setdefault(row["seed"], []).append(row)
    return runs


def _at(run: Sequence[dict[str, Any]], key: str, x: float) -> float:
    """AP50 of a run at `key` (step or cpu_s) = x, linearly interpolated between evaluations (NaN outside them)."""
    points = [(row[key], row["AP50"]) for row in run]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return points[0][1] if points and x == points[0][0] else math.nan


def _cell(values: Sequence[float], digits: int = 3) -> str:
    """'mean (seed values)'."""
    if any(math.isnan(v) for v in values):
        return "-"
    each = ", ".join(f"{v:.{digits}f}" for v in values)
    return f"{statistics.fmean(values):.{digits}f} ({each})" if len(values) > 1 else f"{values[0]:.{digits}f}"


def summary_markdown(rows: Sequence[dict[str, Any]], params: dict[str, int] | None = None) -> str:
    """results.md: end-of-budget figures, AP50 at matched steps and at matched CPU seconds (means over seeds)."""
    runs = _runs(rows)
    models = list(runs)
    seeds = sorted({seed for by_seed in runs.values() for seed in by_seed})
    first = rows[0]
    lines = [f"# Family convergence: {' vs '.join(models)}\n",
             f"Seeds {', '.join(map(str, seeds))}; batch {first['batch_size']}; {first['threads']} torch thread(s) "
             f"per run; git {first['git_sha']}, torch {first['torch']}. Cells: mean over seeds (per-seed values).\n",
             "## End of the CPU budget\n"]
    table = []
    for model in models:
        ends = [by_step[-1] for by_step in runs[model].values()]
        rate = [end["step"] / end["cpu_s"] for end in ends]
        table.append([model, f"{params[model] / 1e6:.3f} M" if params and model in params else "-",
                      _cell([e["cpu_s"] for e in ends], 0), _cell([float(e["step"]) for e in ends], 0),
                      _cell(rate, 2), _cell([r * first["batch_size"] for r in rate], 1),
                      _cell([e["AP50"] for e in ends]), _cell([e["AP"] for e in ends]),
                      _cell([sum(r["eval_cpu_s"] for r in run) / len(run) for run in runs[model].values()], 1)])
    lines.append(markdown_table(["model", "parameters", "training CPU s", "steps", "steps / CPU-s",
                                 "images / CPU-s", "AP50", "AP", "CPU s per evaluation"], table))
    # the steps every run evaluated at (the last row of a run, where its budget ran out, is rarely one)
    common = sorted(set.intersection(*({row["step"] for row in run} for m in models for run in runs[m].values())))
    lines.append("## AP50 at matched steps\n")
    lines.append(markdown_table(["step", *models], [[step, *(_cell([_at(run, "step", step)
                                                                    for run in runs[m].values()]) for m in models)]
                                                    for step in common]))
    budget = min(row["cpu_s"] for by_seed in runs.values() for run in by_seed.values() for row in run[-1:])
    lines.append("## AP50 at matched training CPU seconds (interpolated between evaluations)\n")
    marks = [budget * f for f in (0.25, 0.5, 0.75, 1.0)]
    lines.append(markdown_table(["CPU s", *models], [[f"{mark:.4g}", *(_cell([_at(run, "cpu_s", mark)
                                                                              for run in runs[m].values()])
                                                                       for m in models)] for mark in marks]))
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """AP50 against steps (left) and against training CPU seconds (right); one line per (model, seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"detr_small": "tab:blue", "deformable_detr_small": "tab:red", "deformable_detr_small_1level": "tab:gray"}
    styles = ["-", "--", ":", "-."]
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110, sharey=True)
    for model, by_seed in _runs(rows).items():
        for index, (seed, run) in enumerate(by_seed.items()):
            for axis, key in zip(axes, ("step", "cpu_s")):
                axis.plot([row[key] for row in run], [row["AP50"] for row in run], styles[index % len(styles)],
                          marker="o", markersize=3, color=colors.get(model), label=f"{model}, seed {seed}")
    axes[0].set_xlabel("training steps (batch 8)")
    axes[1].set_xlabel("training CPU seconds (one thread; evaluation excluded)")
    axes[0].set_ylabel("validation AP50")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.set_ylim(0, 1)
    axes[1].legend(loc="upper left", fontsize=8)
    figure.suptitle("DETR vs Deformable DETR from scratch on the synthetic 'easy' set, same CPU budget")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def parameter_counts(models: Sequence[str], num_classes: int = 4) -> dict[str, int]:
    """Parameters of each study model (4 classes: the easy set's 3 shapes, ids from 1)."""
    from fastdetr.models import build_deformable_model, build_model
    from fastdetr.train import model_family

    counts = {}
    for model in models:
        preset, overrides = MODELS[model]
        build = build_deformable_model if model_family(preset) == "deformable_detr" else build_model
        counts[model] = sum(p.numel() for p in build(preset, num_classes=num_classes, **overrides).parameters())
    return counts


def run_study(study: StudyConfig, plot_path: Path) -> tuple[Path, Path, Path]:
    """Every (seed, model) run, then results.csv, results.md and the plot; returns their paths."""
    from fastdetr.data import make_splits

    out = Path(study.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    make_splits(study.data_dir, study.num_train, study.num_val, preset="easy", seed=0)  # once, before the runs
    (out / "study.json").write_text(json.dumps(dataclasses.asdict(study), indent=1))
    jobs = [(model, seed) for seed in study.seeds for model in study.models]
    start = time.perf_counter()
    if study.jobs > 1:
        import multiprocessing

        with ProcessPoolExecutor(study.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(run_one, study, model, seed) for model, seed in jobs]
            rows = [row for future in futures for row in future.result()]
    else:
        rows = [row for model, seed in jobs for row in run_one(study, model, seed)]
    print(f"study: {len(jobs)} runs in {time.perf_counter() - start:.0f} s wall", flush=True)
    return write_outputs(rows, out, plot_path)


def write_outputs(rows: Sequence[dict[str, Any]], out: Path, plot_path: Path) -> tuple[Path, Path, Path]:
    csv_path = write_csv(rows, out / "results.csv")
    rows = read_results(csv_path)  # the summary and the plot are drawn from the table alone
    md_path = out / "results.md"
    md_path.write_text(summary_markdown(rows, parameter_counts(list(_runs(rows)))))
    return csv_path, md_path, plot(rows, plot_path)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (results.csv, results.md, runs/)")
    parser.add_argument("--cpu-budget-s", type=float, default=None, help="training CPU seconds per run (480)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (0,1)")
    parser.add_argument("--eval-every-steps", type=int, default=None, help="steps between evaluations (250)")
    parser.add_argument("--models", default=None, help=f"comma-separated, of {list(MODELS)}")
    parser.add_argument("--jobs", type=int, default=None, help="runs side by side (2; 1: in this process)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (1)")
    parser.add_argument("--data-dir", default=None, help="synthetic easy set (out/data/easy; generated if absent)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: 48 training / 8 validation images, 2 CPU-s per run, eval every 5 steps")
    parser.add_argument("--plot", default=None, help="plot path (default OUT/convergence_deformable.png)")
    parser.add_argument("--plot-only", action="store_true", help="redraw results.md and the plot from OUT/results.csv")
    args = parser.parse_args(argv)
    out = Path(args.out)
    plot_path = Path(args.plot) if args.plot else out / "convergence_deformable.png"
    if args.plot_only:
        paths = write_outputs(read_results(out / "results.csv"), out, plot_path)
        print("wrote " + ", ".join(map(str, paths)))
        return
    study = StudyConfig(out_dir=str(out), threads=args.threads)
    if args.quick:
        study = dataclasses.replace(study, data_dir=str(out / "data"), num_train=48, num_val=8, cpu_budget_s=2.0,
                                    eval_every_steps=5, jobs=1)
    changes = {"cpu_budget_s": args.cpu_budget_s, "eval_every_steps": args.eval_every_steps, "jobs": args.jobs,
               "data_dir": args.data_dir,
               "seeds": tuple(int(s) for s in args.seeds.split(",")) if args.seeds else None,
               "models": tuple(args.models.split(",")) if args.models else None}
    study = dataclasses.replace(study, **{key: value for key, value in changes.items() if value is not None})
    unknown = sorted(set(study.models) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {unknown}; expected some of {list(MODELS)}")
    paths = run_study(study, plot_path)
    print("wrote " + ", ".join(map(str, paths)))


if __name__ == "__main__":
    main()
