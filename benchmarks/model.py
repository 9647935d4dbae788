"""Whole-model cases: DETR-R50 inference and the full training step, reference against fastdetr.

    python benchmarks/model.py --out DIR [--batch N] [--warmup MS] [--rep MS] [--append]

writes DIR/results.csv (benchmarks/common.py's long format) and DIR/results.md.
Needs a CUDA GPU; without one it lists the cases it skipped and writes nothing.

Model: DETR-R50's problem (`fastdetr.measure.problem.DETR_R50`):
`fastdetr.detr_resnet50(num_classes=91)` with random weights (the timings do
not depend on the values), images of 800 x 1216 and 768 x 1152 in one batch
(DETR's padding mask), 100 queries, d_model 256, batch 8. Providers:
- "reference-fp32": the plain-PyTorch model, eager, float32;
- "reference-bf16": the same under bf16 autocast;
- "reference-bf16+compile": `torch.compile` of the model under bf16 autocast
  (a compile failure becomes an "error" row, with the reason in `unit`);
- "fastdetr-bf16": `fastdetr.optimize(model)` under bf16 autocast, and the
  criterion's matcher on the GPU (`backend="auto"`).
Modes: "inference" (eval, no_grad: backbone, transformer, heads, PostProcess)
and "train_step" (train mode: forward, SetCriterion with aux losses,
backward, gradient clipping at 0.1, AdamW step). Inputs rotate over three
batches of different images, so no call sees the previous call's data in
cache. Time by triton.testing.do_bench (CUDA events; it also flushes L2
between calls); peak memory above what was live before the call; FLOP/s from
the reference's FLOP count (torch.utils.flop_counter on the eager model).
"""
from __future__ import annotations

import argparse
import copy
import itertools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):   # run as `python benchmarks/model.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, markdown_table, peak_memory_mib, time_ms, write_results  # noqa: E402
from fastdetr.measure.problem import DETR_R50 as R50  # noqa: E402

PROVIDERS = ("reference-fp32", "reference-bf16", "reference-bf16+compile", "fastdetr-bf16")
MODES = ("inference", "train_step")
IMAGE_SIZES = (R50.image_size, (768, 1152))   # the padded batch's size, and a smaller image padded to it
SPEEDUPS = (("fastdetr-bf16", "reference-bf16"), ("fastdetr-bf16", "reference-bf16+compile"),
            ("fastdetr-bf16", "reference-fp32"))   # reported, with no target of their own (issue 6's are per layer)


@dataclass(frozen=True)
class Scale:
    """The model and the images: DETR-R50's, or a tiny detr_small for a smoke run through the interpreter."""
    builder: str                   # a preset of fastdetr.config.PRESETS
    overrides: tuple[tuple[str, object], ...]
    image_sizes: tuple[tuple[int, int], ...]


DETR_R50 = Scale(R50.preset, (), IMAGE_SIZES)
SMOKE = Scale("detr_small", (("hidden_dim", 64), ("nheads", 2), ("dim_feedforward", 128), ("enc_layers", 1),
                             ("dec_layers", 2), ("num_queries", 6)), ((64, 96), (80, 64)))


@dataclass
class Step:
    """One provider's callables: `inference()` and `train_step()`, each on the next batch of the rotation."""
    inference: Callable[[], object]
    train_step: Callable[[], object]


def make_batches(batch: int, device, count: int = 3, image_sizes=IMAGE_SIZES) -> list[tuple[list, list[dict]]]:
    """`count` batches of `batch` images (sizes alternating over image_sizes) with 1..30 random targets each."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        images = [torch.randn(3, *image_sizes[i % len(image_sizes)], generator=generator).to(device)
                  for i in range(batch)]
        targets = []
        for _ in range(batch):
            n = int(torch.randint(1, 31, (), generator=generator))
            centre = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
            size = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
            targets.append({"labels": torch.randint(0, R50.num_classes, (n,), generator=generator).to(device),
                            "boxes": torch.cat([centre, size], 1).to(device)})
        batches.append((images, targets))
    return batches


def _provider(model, criterion, batches, autocast: bool) -> Step:
    import fastdetr

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    postprocess = fastdetr.PostProcess()
    sizes = torch.tensor([list(image.shape[-2:]) for image in batches[0][0]], device=batches[0][0][0].device)
    rotation = itertools.cycle(batches)
    device_type = batches[0][0][0].device.type

    def context():
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast)

    @torch.no_grad()
    def inference():
        images, _ = next(rotation)
        model.eval()
        with context():
            return postprocess(model(images), sizes)

    def train_step():
        images, targets = next(rotation)
        model.train()
        with context():
            losses = criterion(model(images), targets)
            loss = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        return loss

    return Step(inference, train_step)


def build(batch: int, device, providers: Sequence[str] = PROVIDERS,
          scale: Scale = DETR_R50) -> tuple[dict[str, Step], list]:
    import fastdetr
    from fastdetr.config import DETRConfig
    from fastdetr.criterion import build_criterion

    torch.manual_seed(0)
    base = fastdetr.build_model(scale.builder, num_classes=R50.num_classes, **dict(scale.overrides)).to(device)
    batches = make_batches(batch, device, image_sizes=scale.image_sizes)
    steps = {}
    for name in providers:
        model = copy.deepcopy(base)
        backend = "auto" if name.startswith("fastdetr") else "scipy"
        criterion = build_criterion(DETRConfig(num_classes=R50.num_classes, dec_layers=base.config.dec_layers),
                                    backend=backend).to(device)
        if name.startswith("fastdetr"):
            fastdetr.optimize(model)
        if name.endswith("+compile"):
            model = torch.compile(model)
        steps[name] = _provider(model, criterion, batches, autocast=not name.endswith("fp32"))
    return steps, batches


def flop_counts(batch: int, device, scale: Scale = DETR_R50) -> dict[str, float]:
    """FLOPs of one inference pass and one forward+backward of the reference, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    steps, _ = build(batch, device, ("reference-fp32",), scale)
    step = steps["reference-fp32"]
    counts = {}
    for mode, fn in (("inference", step.inference), ("train_step", step.train_step)):
        with FlopCounterMode(display=False) as counter:
            fn()
        counts[mode] = float(counter.get_total_flops())
    return counts


def _row(provider, mode, metric, unit, shape, values, env) -> dict:
    p50, p20, p80 = values
    return dict(case="detr_r50", provider=provider, mode=mode, metric=metric, unit=unit, shape=shape,
                p50=p50, p20=p20, p80=p80, **env)


def measure(batch: int, device, env: dict, warmup: int = 25, rep: int = 100,
            providers: Sequence[str] = PROVIDERS, timer: Callable = time_ms,
            memory: Callable | None = peak_memory_mib, scale: Scale = DETR_R50) -> list[dict]:
    """Rows: time (ms), peak memory (MiB) and achieved TFLOP/s per provider and mode."""
    sizes = " / ".join(f"{h}x{w}" for h, w in scale.image_sizes)
    shape = f"{scale.builder} B={batch} images {sizes}"
    flops = flop_counts(batch, device, scale)
    steps, _ = build(batch, device, providers, scale)
    rows = []
    for name, step in steps.items():
        for mode in MODES:
            fn = getattr(step, mode)
            try:
                fn()   # compile / autotune outside the timed region
                p50, p20, p80 = timer(fn, warmup=warmup, rep=rep)
            except Exception as error:   # torch.compile may fail on this model: a row, not a crash
                if not name.endswith("+compile"):
                    raise
                message = str(error).splitlines()[0][:160] if str(error) else ""
                reason = f"{type(error).__name__}: {message}"
                rows.append(_row(name, mode, "error", reason, shape, (float("nan"),) * 3, env))
                continue
            rows.append(_row(name, mode, "time", "ms", shape, (p50, p20, p80), env))
            rows.append(_row(name, mode, "tflops", "TFLOP/s", shape,
                             tuple(flops[mode] / (t * 1e-3) / 1e12 for t in (p50, p80, p20)), env))
            if memory is not None:
                peak = memory(fn)
                rows.append(_row(name, mode, "peak_memory", "MiB", shape, (peak, peak, peak), env))
    return rows


def summary_markdown(rows: Sequence[dict]) -> str:
    if not rows:
        return "# DETR-R50 benchmark\n\nNo results.\n"
    last = rows[-1]
    value = {(r["provider"], r["mode"], r["metric"]): r for r in rows}
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    out = [f"# DETR-R50: inference and training step\n\n{last['device']}, torch {last['torch']}, "
           f"triton {last['triton']}, commit {last['git_sha']}, {last['timestamp']}; {last['shape']}.\n\n"]
    for metric, unit, fmt in (("time", "ms", "{:.1f}"), ("tflops", "TFLOP/s", "{:.1f}"),
                              ("peak_memory", "MiB", "{:.0f}")):
        out.append(f"\n## {metric} ({unit}, p50)\n\n")
        out.append(markdown_table(["mode"] + providers, [
            [mode] + [fmt.format(value[(p, mode, metric)]["p50"]) if (p, mode, metric) in value
                      else ("error" if (p, mode, "error") in value else "") for p in providers]
            for mode in MODES]))
    errors = [r for r in rows if r["metric"] == "error"]
    if errors:
        out.append("\n## Errors\n\n" + "".join(f"- {r['provider']} {r['mode']}: {r['unit']}\n" for r in errors))
    out.append("\n## Speedups (p50 time of the baseline / of fastdetr)\n\n")
    speedup_rows = []
    for mode in MODES:
        for provider, baseline in SPEEDUPS:
            a, b = value.get((provider, mode, "time")), value.get((baseline, mode, "time"))
            if a and b:
                speedup_rows.append([mode, f"{provider} vs {baseline}", f"{b['p50'] / a['p50']:.2f}x"])
    out.append(markdown_table(["mode", "speedup of", "measured"], speedup_rows))
    return "".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=R50.batch)
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    parser.add_argument("--append", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"skipped detr_r50 (B={args.batch}, {len(PROVIDERS)} providers x {MODES}): no CUDA device")
        return 0
    device = torch.device("cuda")
    rows = measure(args.batch, device, environment(device), args.warmup, args.rep)
    for row in rows:
        print(f"  {row['provider']:<24} {row['mode']:<11} {row['metric']:<12} {row['p50']:10.2f} {row['unit']}")
    csv_path, md_path = write_results(rows, args.out, summary_markdown, append=args.append)
    print(f"wrote {csv_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
