"""One runner for every fastdetr benchmark: kernels, layers, the whole model, the matcher, CPU proxies.

    python benchmarks/run.py --out DIR [--quick | --smoke] [--suites NAME ...] [--append] [--list]
    python benchmarks/run.py --out DIR --headline   (a few lines drawn from DIR/results.csv)
    fastdetr bench --out DIR [--quick] ...          (the same, from a source checkout)

writes DIR/results.csv (benchmarks/common.py's long format: one row per
measurement, the machine and versions on every row), DIR/results.md (every
suite's tables, drawn from the CSV), DIR/headline.txt (`headline`: a few
lines for a terminal) and DIR/plots/*.png (one bar chart per case and mode
measured in this run, drawn from the CSV). On a machine without a GPU it runs what
means something there (the matcher's CPU part; the CPU proxies) and lists the
GPU suites it skipped.

Suites (each is also a script of its own in benchmarks/):
- ceiling (GPU): the ceilings measured in the same run -- a bf16 8192^3 matmul
  (TFLOP/s) and a 1 GiB device copy (GB/s, read + write) -- against which
  the model's achieved TFLOP/s is reported as a fraction;
- ops (GPU): benchmarks/ops.py, each GEMM-epilogue kernel (in-projection,
  linear+ReLU, linear+residual+LayerNorm, inference FFN, matcher cost) vs its
  eager reference and torch.compile of it;
- attention (GPU): benchmarks/attention.py, the flash-attention kernel vs SDPA
  vs nn.MultiheadAttention;
- deformable_attention (GPU): benchmarks/deformable_attention.py, the multi-scale
  deformable attention op (fp32, bf16, deterministic) and module vs grid_sample and,
  where it imports, the official CUDA op, at Deformable-DETR, RT-DETR and DINO shapes;
- layers (GPU): benchmarks/layers.py, encoder/decoder/transformer, reference
  eager vs torch.compile vs fastdetr;
- model (GPU): benchmarks/model.py, DETR-R50 inference and training step (fixed sizes; DETR's augmentation
  sizes with static shapes and CUDA graphs), and Deformable-DETR-R50 inference at 800x1333 (batch 1) and
  training step (batch 2), reference vs fused;
- matcher (GPU, and its CPU part anywhere): benchmarks/matcher.py;
- proxies (CPU, through Triton's interpreter): benchmarks/proxies.py, ATen ops,
  Triton launches, host syncs and bytes saved for backward of one training
  step, reference vs fused (fastdetr.measure.proxies), DETR-R50 and Deformable-DETR-R50 (its quick
  shape at both levels: the full one takes hours through the interpreter).
Timing: triton.testing.do_bench (CUDA events, warm-up, median with 20/80
quantiles, L2 flushed between calls) for the GPU suites; the model rotates
three input batches; the matcher times wall clock (its original loop syncs).
--quick: fewer cases and shorter timing, and no torch.compile providers (their
compiles alone take minutes), for a first look; benchmarks/gpu_suite.sh runs it.
--smoke: every chosen suite, GPU ones included, at tiny shapes on the CPU
through Triton's interpreter, one timed call each: the suite's dry run, which
checks that the code runs; its times mean nothing.
Each suite's rows are added to results.csv as soon as it ends; a suite that
raises is reported and the next one runs (exit status 1).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):   # run as `python benchmarks/run.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, markdown_table, read_csv, time_ms, write_csv  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Suite:
    name: str
    needs_gpu: bool
    describe: str


SUITES = (
    Suite("ceiling", True, "bf16 matmul TFLOP/s and device copy GB/s, measured in the same run"),
    Suite("ops", True, "each GEMM-epilogue kernel vs its eager and torch.compile reference (benchmarks/ops.py)"),
    Suite("attention", True, "flash-attention kernel vs SDPA vs nn.MultiheadAttention (benchmarks/attention.py)"),
    Suite("deformable_attention", True, "multi-scale deformable attention op and module vs grid_sample vs the "
          "CUDA op (benchmarks/deformable_attention.py)"),
    Suite("layers", True, "encoder/decoder/transformer: reference vs torch.compile vs fastdetr (benchmarks/layers.py)"),
    Suite("model", True, "DETR-R50 and Deformable-DETR-R50 inference and training step (benchmarks/model.py)"),
    Suite("matcher", False, "a step's matching: original loop vs fastdetr backends (benchmarks/matcher.py)"),
    Suite("proxies", False, "CPU proxies: ops, launches, syncs, saved bytes, reference vs fused "
          "(benchmarks/proxies.py)"),
)


# ---- suites: each returns rows of the results table ------------------------------------------
# `level` is "full", "quick" (--quick: fewer cases, shorter timing, no torch.compile providers, whose
# compiles alone take minutes) or "smoke" (--smoke: tiny shapes on the CPU through Triton's interpreter,
# one timed call each; the times mean nothing, the run checks that every suite's code runs).

QUICK_WARMUP_REP = (10, 30)   # do_bench milliseconds: warm-up, repetition
FULL_WARMUP_REP = (25, 100)


def _cuda_timer(level: str, rep_ms: tuple[int, int] | None = None) -> Callable:
    warmup, rep = rep_ms or (QUICK_WARMUP_REP if level == "quick" else FULL_WARMUP_REP)
    return lambda fn, grad_to_none=None: time_ms(fn, grad_to_none, warmup, rep)


def _smoke_timer(fn, grad_to_none=None, warmup=0, rep=1):
    from benchmarks.layers import wall_time_ms

    return wall_time_ms(fn, grad_to_none, warmup=0, rep=1)


def run_ceiling(env: dict, level: str) -> list[dict]:
    smoke = level == "smoke"
    n, copy_bytes = (128, 2**20) if smoke else (8192, 2**30)
    device, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.bfloat16)
    timer = _smoke_timer if smoke else _cuda_timer(level, (25, 50 if level == "quick" else 200))
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    p50, p20, p80 = timer(lambda: a @ b)
    flops = 2.0 * n ** 3
    rows = [dict(case="ceiling", provider="torch.matmul", mode="fp32" if smoke else "bf16", metric="tflops",
                 unit="TFLOP/s", shape=f"{n}x{n}x{n}", p50=flops / p50 / 1e9, p20=flops / p80 / 1e9,
                 p80=flops / p20 / 1e9, **env)]
    source = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    p50, p20, p80 = timer(lambda: target.copy_(source))
    moved = 2.0 * source.numel()   # read + write
    rows.append(dict(case="ceiling", provider="Tensor.copy_", mode="device", metric="bandwidth", unit="GB/s",
                     shape="1 MiB" if smoke else "1 GiB", p50=moved / p50 / 1e6, p20=moved / p80 / 1e6,
                     p80=moved / p20 / 1e6, **env))
    return rows


def run_ops(env: dict, level: str) -> list[dict]:
    from benchmarks import ops

    if level == "smoke":
        return ops.measure(ops.SMOKE, "cpu", env, torch.float32, timer=_smoke_timer, providers=("fastdetr", "eager"))
    providers = ("fastdetr", "eager") if level == "quick" else ops.PROVIDERS
    return ops.measure(ops.DETR_R50, torch.device("cuda"), env, timer=_cuda_timer(level), providers=providers)


def run_attention(env: dict, level: str) -> list[dict]:
    from benchmarks import attention

    quick_cases = ("encoder_pad25",) if level == "smoke" else ("encoder_pad25", "decoder_cross_pad25")
    cases = [c for c in attention.CASES if level == "full" or c.name in quick_cases]
    rows = []
    for case in cases:
        if level == "smoke":
            rows += attention.measure(case, attention.TINY, "cpu", env, torch.float32, timer=_smoke_timer,
                                      memory=None)
        else:
            rows += attention.measure(case, attention.DETR_R50, torch.device("cuda"), env, timer=_cuda_timer(level))
    return rows


def run_deformable_attention(env: dict, level: str) -> list[dict]:
    from benchmarks import deformable_attention as msda

    rows = []
    if level == "smoke":
        for case in msda.SMOKE_CASES:
            rows += msda.measure(case, "cpu", env, timer=_smoke_timer, memory=None)
        return rows
    for case in msda.CASES:
        if level == "full" or case.name in msda.QUICK_CASES:
            rows += msda.measure(case, torch.device("cuda"), env, timer=_cuda_timer(level))
    return rows


def run_layers(env: dict, level: str) -> list[dict]:
    from benchmarks import layers

    if level == "smoke":
        one_layer = dataclasses.replace(layers.SMOKE, layers=1)   # the interpreter's time grows with the depth
        return layers.measure("transformer", one_layer, torch.device("cpu"), env, torch.float32,
                              ("reference", "fastdetr"), timer=_smoke_timer, memory=None)
    cases = ("transformer",) if level == "quick" else layers.CASES
    providers = ("reference", "fastdetr") if level == "quick" else layers.PROVIDERS
    rows = []
    for case in cases:
        rows += layers.measure(case, layers.DETR_R50, torch.device("cuda"), env, providers=providers,
                               timer=_cuda_timer(level))
    return rows


def run_model(env: dict, level: str) -> list[dict]:
    from benchmarks import model
    from fastdetr.measure.problem import DETR_R50

    if level == "smoke":
        one_layer = dataclasses.replace(model.SMOKE, overrides=(*model.SMOKE.overrides, ("dec_layers", 1)))
        rows = model.measure(2, "cpu", env, providers=("reference-fp32", "fastdetr-bf16"), timer=_smoke_timer,
                             memory=None, scale=one_layer)
        return rows + model.measure_deformable("cpu", env, providers=("reference-fp32", "fastdetr-bf16"),
                                               timer=_smoke_timer, memory=None, scale=model.DEFORMABLE_SMOKE)
    # a training step takes milliseconds, not microseconds: a longer repetition gives do_bench a few samples
    warmup, rep = (25, 250) if level == "quick" else (25, 1000)
    providers = ("reference-fp32", "reference-bf16", "fastdetr-bf16") if level == "quick" else model.PROVIDERS
    batch = 2 if level == "quick" else DETR_R50.batch
    rows = model.measure(batch, torch.device("cuda"), env, warmup, rep, providers=providers)
    if level == "full" and importlib.util.find_spec("transformers") is not None:
        rows += model.measure_transformers(model.HF_BATCH, torch.device("cuda"), env, warmup, rep)
    # The static-shape case (issue 17) without its torch.compile providers: they compile once per size bucket
    # and batch size, tens of minutes (`python benchmarks/model.py --case static` runs them). Estimated, not
    # measured: --quick (batch 2) adds 10-30 s, most of it the graphs' eager warm-up steps and captures and
    # the Triton JIT at new shapes; full (batches 2, 4, 8) about 60-120 s.
    quick = level == "quick"
    static_providers = ("reference-bf16", *(() if quick else ("fastdetr-bf16",)), "fastdetr-bf16+graph")
    rows += model.measure_static(torch.device("cuda"), env, 25, 250 if quick else 500,
                                 providers=static_providers,
                                 train_batches=(2,) if quick else model.STATIC_TRAIN_BATCHES)
    # Deformable-DETR-R50 (issue 18), last: inference at batch 1, the training step at batch 2. Estimated, not
    # measured: --quick adds 40-60 s, most of it the Triton JIT of the fused kernels at its shapes and the
    # reference's grid_sample training steps in fp32 and bf16.
    deformable_providers = model.DEFORMABLE_PROVIDERS if level == "full" else tuple(
        p for p in model.DEFORMABLE_PROVIDERS if not p.endswith("+compile"))
    rows += model.measure_deformable(torch.device("cuda"), env, warmup, rep, providers=deformable_providers)
    return rows


def run_matcher(env: dict, level: str) -> list[dict]:
    from benchmarks import matcher

    if level == "smoke":
        cases, device, reps, with_triton = matcher.SMOKE, "cpu", 1, True
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        cases = [c for c in matcher.CASES if level == "full" or c.name == "detr"]
        reps, with_triton = (20 if level == "full" else 5), device == "cuda"
    rows = []
    for case in cases:
        rows += matcher.measure(case, device, env, reps=reps, with_triton=with_triton)
    return rows


def run_proxies(env: dict, level: str) -> list[dict]:
    """benchmarks/proxies.py through Triton's interpreter, in a process of its own (the interpreter is chosen
    when a kernel module is imported, and this process may have imported them for a GPU)."""
    from benchmarks.proxies import SHAPES

    rows = []
    for shape in SHAPES["full" if level == "full" else "quick"]:   # a process and a timeout per model
        script = ("import json, sys; from benchmarks.proxies import proxy_rows; "
                  f"from fastdetr.measure.proxies import {shape}; "
                  f"json.dump(proxy_rows(json.loads(sys.argv[1]), shape={shape}), sys.stdout)")
        cpu_env = {**env, "device": "cpu (Triton interpreter)"}
        proc = subprocess.run([sys.executable, "-c", script, json.dumps(cpu_env)], capture_output=True, text=True,
                              env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=REPO, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"the proxies suite failed at {shape}:\n{proc.stderr[-3000:]}")
        rows += json.loads(proc.stdout.strip().splitlines()[-1])
    return rows


RUNNERS: dict[str, Callable[[dict, str], list[dict]]] = {
    "ceiling": run_ceiling, "ops": run_ops, "attention": run_attention,
    "deformable_attention": run_deformable_attention, "layers": run_layers, "model": run_model,
    "matcher": run_matcher, "proxies": run_proxies,
}


# ---- the report: results.md and plots, from the CSV alone --------------------------------------

def _suite_of(row: dict) -> str:
    case = row["case"]
    if case == "ceiling":
        return "ceiling"
    if case in ("detr_r50", "detr_r50_static", "transformers_detr_r50_finetune", "deformable_detr_r50"):
        return "model"
    if case.startswith("msda_"):
        return "deformable_attention"
    if case in ("detr", "dino", "smoke"):
        return "matcher"
    if "proxies" in case:
        return "proxies"
    if case in ("transformer", "encoder", "decoder"):
        return "layers"
    if case in ("in_projection", "linear_relu", "linear_residual_layernorm", "ffn_inference", "matching_cost"):
        return "ops"
    return "attention"


def summary_markdown(rows: Sequence[dict], skipped: Sequence[str] = ()) -> str:
    from benchmarks import attention, deformable_attention, layers, matcher, model, ops

    if not rows:
        return "# fastdetr benchmarks\n\nNo results.\n"
    last = rows[-1]
    out = [f"# fastdetr benchmarks\n\n{last['device']}, torch {last['torch']}, triton {last['triton']}, "
           f"commit {last['git_sha']}, {last['timestamp']}. Every table below is drawn from results.csv.\n"]
    if skipped:
        out.append("\nSkipped (no GPU): " + ", ".join(skipped) + ".\n")
    by_suite: dict[str, list[dict]] = {}
    for row in rows:
        by_suite.setdefault(_suite_of(row), []).append(row)
    ceiling = {r["metric"]: r for r in by_suite.get("ceiling", [])}
    if ceiling:
        out.append("\n# Ceilings\n\n" + markdown_table(
            ["measure", "p50", "unit"], [[r["provider"], f"{r['p50']:.1f}", r["unit"]] for r in ceiling.values()]))
    summaries = {"ops": ops.summary_markdown, "attention": attention.summary_markdown,
                 "deformable_attention": deformable_attention.summary_markdown, "layers": layers.summary_markdown,
                 "model": model.summary_markdown, "matcher": matcher.summary_markdown}
    for suite, summarise in summaries.items():
        if suite in by_suite:
            out.append("\n" + summarise(by_suite[suite]))
    if "model" in by_suite and "tflops" in ceiling:
        peak = ceiling["tflops"]["p50"]
        fractions = [[r["provider"], r["mode"], f"{r['p50']:.1f}", f"{r['p50'] / peak:.1%}"]
                     for r in by_suite["model"] if r["metric"] == "tflops"]
        out.append("\n## DETR-R50: fraction of the bf16 matmul ceiling\n\n"
                   + markdown_table(["provider", "mode", "TFLOP/s", "of ceiling"], fractions))
    if "proxies" in by_suite:
        out.append("\n# CPU proxies of one training step (through Triton's interpreter)\n\n" + markdown_table(
            ["case", "provider", "metric", "value", "unit"],
            [[r["case"], r["provider"], r["metric"], f"{r['p50']:.0f}", r["unit"]] for r in by_suite["proxies"]]))
    return "".join(out)


def plot(rows: Sequence[dict], folder: Path) -> list[Path]:
    """One horizontal bar chart of p50 time per (case, mode), providers as bars with p20-p80 whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        if row["metric"] == "time":
            groups.setdefault((row["case"], row["mode"]), []).append(row)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for (case, mode), group in groups.items():
        latest = {r["provider"]: r for r in group}   # the latest run of each provider
        names = list(latest)
        p50 = [latest[n]["p50"] for n in names]
        low = [max(0.0, latest[n]["p50"] - latest[n]["p20"]) for n in names]
        high = [max(0.0, latest[n]["p80"] - latest[n]["p50"]) for n in names]
        figure, axis = plt.subplots(figsize=(7, 0.5 * len(names) + 1.2))
        axis.barh(names, p50, xerr=[low, high], color="#4c72b0")
        axis.set_xlabel("ms (p50, p20-p80)")
        axis.set_title(f"{case} - {mode} ({group[-1]['device']})", fontsize=10)
        axis.invert_yaxis()
        figure.tight_layout()
        path = folder / f"{case}_{mode}.png".replace("/", "_").replace("+", "_")
        figure.savefig(path, dpi=100)
        plt.close(figure)
        paths.append(path)
    return paths


def headline(rows: Sequence[dict]) -> str:
    """A few lines for a terminal: per (case, mode) every provider's p50 time and the fastest fastdetr
    provider's speedup over the fastest other one; the ceilings; any error rows. Later rows win."""
    if not rows:
        return "no benchmark rows\n"
    times: dict[tuple[str, str], dict[str, float]] = {}
    other = {}
    for row in rows:
        if row["metric"] == "time":
            times.setdefault((row["case"], row["mode"]), {})[row["provider"]] = row["p50"]
        elif row["case"] == "ceiling" or row["metric"] == "error":
            other[(row["case"], row["provider"], row["mode"], row["metric"])] = row
    lines = [f"{rows[-1]['device']}, torch {rows[-1]['torch']}, triton {rows[-1]['triton']}, "
             f"commit {rows[-1]['git_sha']}"]
    for (case, provider, mode, metric), row in other.items():
        value = row["unit"] if metric == "error" else f"{row['p50']:.1f} {row['unit']}"
        lines.append(f"{case:<24} {mode:<10} {provider}: {'error ' if metric == 'error' else ''}{value}")
    for (case, mode), providers in times.items():
        cells = ", ".join(f"{name} {p50:.4g}" for name, p50 in providers.items())
        fused = {name: p50 for name, p50 in providers.items() if name.startswith("fastdetr")}
        others = {name: p50 for name, p50 in providers.items() if not name.startswith("fastdetr")}
        speedup = ""
        if fused and others:
            best_other = min(others, key=others.get)
            speedup = f"  => x{others[best_other] / min(fused.values()):.2f} vs {best_other}"
        lines.append(f"{case:<24} {mode:<10} ms: {cells}{speedup}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for results.csv, results.md and plots/")
    level = parser.add_mutually_exclusive_group()
    level.add_argument("--quick", action="store_true",
                       help="fewer cases, shorter timing, no torch.compile providers")
    level.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU through Triton's interpreter, "
                       "every suite, one timed call each: checks that the code runs; the times mean nothing")
    parser.add_argument("--suites", nargs="+", choices=[s.name for s in SUITES], help="default: all")
    parser.add_argument("--append", action="store_true", help="add to an existing results.csv")
    parser.add_argument("--list", action="store_true", help="list the suites and exit")
    parser.add_argument("--headline", action="store_true",
                        help="print a few lines drawn from --out's results.csv (no measuring) and exit")
    args = parser.parse_args(argv)
    if args.list:
        for suite in SUITES:
            print(f"{suite.name:<20} {'GPU' if suite.needs_gpu else 'any':<4} {suite.describe}")
        return 0
    if args.out is None:
        parser.error("--out is required")
    if args.headline:
        csv_path = args.out / "results.csv"
        print(headline(read_csv(csv_path)) if csv_path.exists() else f"no {csv_path}", end="")
        return 0
    level = "smoke" if args.smoke else "quick" if args.quick else "full"
    if args.smoke and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        os.environ["TRITON_INTERPRET"] = "1"   # read when a kernel module is first imported, which is later
    has_gpu = torch.cuda.is_available() and not args.smoke
    chosen = [s for s in SUITES if args.suites is None or s.name in args.suites]
    skipped = [s.name for s in chosen if s.needs_gpu and not has_gpu and not args.smoke]
    for name in skipped:
        print(f"skipped {name}: needs a CUDA GPU")
    env = environment("cuda" if has_gpu else "cpu")
    if args.smoke:
        env = {**env, "device": "cpu (Triton interpreter)"}
    csv_path, append, failed, measured = args.out / "results.csv", args.append, [], set()
    for suite in chosen:
        if suite.name in skipped:
            continue
        print(f"== {suite.name}: {suite.describe}", flush=True)
        try:
            suite_rows = RUNNERS[suite.name](env, level)
        except Exception:   # the next suite still runs; the exit status says one failed
            traceback.print_exc()
            print(f"suite {suite.name} FAILED", flush=True)
            failed.append(suite.name)
            continue
        for row in suite_rows:
            print(f"  {row['case']:<22} {row['provider']:<38} {row['mode']:<11} {row['metric']:<12} "
                  f"{row['p50']:12.3f} {row['unit']}", flush=True)
        write_csv(suite_rows, csv_path, append=append)   # each suite's rows land as soon as it ends
        append = True
        measured |= {(row["case"], row["mode"]) for row in suite_rows}
    if not append or not csv_path.exists():   # no rows at all: still a table, header only
        write_csv([], csv_path, append=append)
    table = read_csv(csv_path)
    (args.out / "results.md").write_text(summary_markdown(table, skipped))
    (args.out / "headline.txt").write_text(headline(table))
    # this run's charts only: an --append run leaves the others' as they were drawn
    plots = plot([row for row in table if (row["case"], row["mode"]) in measured], args.out / "plots")
    print(f"wrote {csv_path}, {args.out / 'results.md'}, headline.txt and {len(plots)} plots")
    if failed:
        print(f"failed suites: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
