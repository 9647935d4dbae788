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
Case "transformers_detr_r50_finetune" (when transformers imports): transformers'
`DetrForObjectDetection` (DETR-R50 with transformers' own ResNet-50, random
weights, 91 labels) fine-tuning step at batch 4 under bf16 autocast: forward
with labels (transformers' own loss and matcher), backward, gradient clipping
at 0.1, AdamW; images of four sizes from DETR's augmentation scales, padded
(pixel_mask). Providers "transformers-eager-bf16" (attn_implementation="eager"),
"transformers-sdpa-bf16" (transformers' default) and
"transformers+fastdetr-bf16" (the default model after `fastdetr.optimize`).
Targets (stated, not asserted): at least 1.5x the faster of the two
transformers providers, at most 0.6x its peak memory.
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
    hf_section = transformers_summary(rows)
    rows = [r for r in rows if r["case"] != HF_CASE]
    if not rows:
        return "# DETR-R50 benchmark\n\nNo results.\n" + hf_section
    return _detr_summary(rows) + hf_section


def _detr_summary(rows: Sequence[dict]) -> str:
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


# ---- transformers' DETR fine-tuning step ------------------------------------------------------

HF_CASE = "transformers_detr_r50_finetune"
HF_PROVIDERS = ("transformers-eager-bf16", "transformers-sdpa-bf16", "transformers+fastdetr-bf16")
HF_MODE = "finetune_step"
HF_BATCH = 4
HF_IMAGE_SIZES = ((800, 1216), (736, 1088), (672, 1024), (608, 896))   # from DETR's augmentation scales
HF_SPEEDUP_TARGET, HF_MEMORY_TARGET = 1.5, 0.6


@dataclass(frozen=True)
class HFScale:
    """transformers' DetrConfig fields (and ResNetConfig's) and the images: DETR-R50, or tiny for a smoke run."""
    config: tuple[tuple[str, object], ...]
    resnet: tuple[tuple[str, object], ...]
    image_sizes: tuple[tuple[int, int], ...]


HF_R50 = HFScale((("num_labels", R50.num_classes),), (), HF_IMAGE_SIZES)
HF_SMOKE = HFScale((("num_labels", 4), ("d_model", 64), ("encoder_layers", 1), ("decoder_layers", 1),
                    ("encoder_attention_heads", 2), ("decoder_attention_heads", 2), ("encoder_ffn_dim", 96),
                    ("decoder_ffn_dim", 96), ("num_queries", 6)),
                   (("depths", [1, 1, 1, 1]), ("hidden_sizes", [8, 16, 32, 64]), ("embedding_size", 8)),
                   ((64, 96), (80, 64)))


def _hf_batches(batch: int, device, image_sizes, num_labels: int, count: int = 3) -> list[dict]:
    """`count` padded batches in transformers' format: pixel_values, pixel_mask (1 = valid), labels."""
    generator = torch.Generator().manual_seed(0)
    height, width = max(h for h, _ in image_sizes), max(w for _, w in image_sizes)
    batches = []
    for index in range(count):
        pixel_values = torch.zeros(batch, 3, height, width)
        pixel_mask = torch.zeros(batch, height, width, dtype=torch.long)
        labels = []
        for i in range(batch):
            h, w = image_sizes[(index + i) % len(image_sizes)]
            pixel_values[i, :, :h, :w] = torch.randn(3, h, w, generator=generator)
            pixel_mask[i, :h, :w] = 1
            n = int(torch.randint(1, 31, (), generator=generator))
            boxes = torch.cat([torch.rand(n, 2, generator=generator) * 0.6 + 0.2,
                               torch.rand(n, 2, generator=generator) * 0.3 + 0.05], 1)
            labels.append({"class_labels": torch.randint(0, num_labels, (n,), generator=generator).to(device),
                           "boxes": boxes.to(device)})
        batches.append(dict(pixel_values=pixel_values.to(device), pixel_mask=pixel_mask.to(device), labels=labels))
    return batches


def build_transformers(batch: int, device, providers: Sequence[str] = HF_PROVIDERS,
                       scale: HFScale = HF_R50) -> dict[str, Callable[[], object]]:
    """{provider: one fine-tuning step on the next batch of the rotation}."""
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

    import fastdetr

    settings = dict(use_timm_backbone=False, backbone=None, use_pretrained_backbone=False,
                    backbone_config=ResNetConfig(out_features=["stage4"], **dict(scale.resnet)), **dict(scale.config))
    labels = dict(scale.config).get("num_labels", R50.num_classes)
    batches = _hf_batches(batch, device, scale.image_sizes, labels)
    device_type = torch.device(device).type
    steps = {}
    for name in providers:
        torch.manual_seed(0)
        extra = {"attn_implementation": "eager"} if "eager" in name else {}
        model = DetrForObjectDetection(DetrConfig(**settings, **extra)).to(device).train()
        if "fastdetr" in name:
            fastdetr.optimize(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
        rotation = itertools.cycle(batches)

        def step(model=model, optimizer=optimizer, rotation=rotation):
            inputs = next(rotation)
            with torch.autocast(device_type, dtype=torch.bfloat16):
                loss = model(**inputs).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            optimizer.step()
            return loss

        steps[name] = step
    return steps


def measure_transformers(batch: int, device, env: dict, warmup: int = 25, rep: int = 100,
                         providers: Sequence[str] = HF_PROVIDERS, timer: Callable = time_ms,
                         memory: Callable | None = peak_memory_mib, scale: HFScale = HF_R50) -> list[dict]:
    """Rows of the transformers fine-tuning case: time (ms) and peak memory (MiB) per provider."""
    sizes = " / ".join(f"{h}x{w}" for h, w in scale.image_sizes)
    shape = f"transformers DetrForObjectDetection B={batch} images {sizes}"
    rows = []
    for name, step in build_transformers(batch, device, providers, scale).items():
        step()   # compile / autotune outside the timed region
        rows.append(dict(_row(name, HF_MODE, "time", "ms", shape, timer(step, warmup=warmup, rep=rep), env),
                         case=HF_CASE))
        if memory is not None:
            peak = memory(step)
            rows.append(dict(_row(name, HF_MODE, "peak_memory", "MiB", shape, (peak, peak, peak), env),
                             case=HF_CASE))
    return rows


def transformers_summary(rows: Sequence[dict]) -> str:
    """The fine-tuning case's section: times, peak memory, and the targets against the faster transformers
    provider."""
    value = {(r["provider"], r["metric"]): r["p50"] for r in rows if r["case"] == HF_CASE}
    if not value:
        return ""
    providers = [p for p in HF_PROVIDERS if (p, "time") in value]
    out = ["\n## transformers DETR-R50 fine-tuning step (bf16, batch 4)\n\n",
           markdown_table(["metric"] + providers, [
               [metric] + [f"{value[(p, metric)]:.1f}" if (p, metric) in value else "" for p in providers]
               for metric in ("time", "peak_memory")])]
    fused = "transformers+fastdetr-bf16"
    baselines = [p for p in HF_PROVIDERS[:2] if (p, "time") in value]
    goals = [f"at least {HF_SPEEDUP_TARGET}x the faster transformers provider's training step",
             f"at most {HF_MEMORY_TARGET}x its peak memory"]
    lines = []
    if (fused, "time") in value and baselines:
        fastest = min(baselines, key=lambda p: value[(p, "time")])
        speedup = value[(fastest, "time")] / value[(fused, "time")]
        lines.append([goals[0], f"{speedup:.2f}x vs {fastest}",
                      "met" if speedup >= HF_SPEEDUP_TARGET else "not met"])
        if (fused, "peak_memory") in value and (fastest, "peak_memory") in value:
            ratio = value[(fused, "peak_memory")] / value[(fastest, "peak_memory")]
            lines.append([goals[1], f"{ratio:.2f}x", "met" if ratio <= HF_MEMORY_TARGET else "not met"])
        else:
            lines.append([goals[1], "peak memory not measured", ""])
    out.append("\n" + markdown_table(["target", "measured", ""], lines))
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
    try:
        import transformers  # noqa: F401
    except ImportError:
        print(f"skipped {HF_CASE}: transformers is not installed")
    else:
        rows += measure_transformers(HF_BATCH, device, environment(device), args.warmup, args.rep)
    for row in rows:
        print(f"  {row['provider']:<24} {row['mode']:<11} {row['metric']:<12} {row['p50']:10.2f} {row['unit']}")
    csv_path, md_path = write_results(rows, args.out, summary_markdown, append=args.append)
    print(f"wrote {csv_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
