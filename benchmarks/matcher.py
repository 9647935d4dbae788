"""A training step's Hungarian matching: the original DETR loop against fastdetr's matcher backends.

    python benchmarks/matcher.py --out DIR [--cases detr dino] [--device cuda|cpu] [--reps N] [--append]

writes DIR/results.csv (the long-format table of benchmarks/common.py) and
DIR/results.md (drawn from the CSV alone). Runs on a GPU (every provider) or
on the CPU (no "fastdetr-triton": through Triton's interpreter it would time
the interpreter); `--smoke` runs tiny shapes on the CPU through the
interpreter, every provider, for the tests.

One measurement = matching every decoder layer of one step (the final layer
and the aux layers), from the model's outputs to the (pred_idx, tgt_idx)
pairs. Providers:
- "original": the original DETR matcher, written out here: per layer, the
  (B*Q) x (all targets) cost matrix on the device, `.cpu()` (a full host sync),
  then scipy's `linear_sum_assignment` on each image's block -- once per layer;
- "fastdetr-scipy": `HungarianMatcher(backend="scipy").match_layers`: per-image
  blocks of every layer in one pass, one host copy, scipy per block;
- "fastdetr-triton": `HungarianMatcher(backend="triton", check_invalid=False)`:
  fused cost kernel + batched assignment kernel, no host sync (the result stays
  on the device; the timer synchronises after the call);
- "scipy-only": scipy on precomputed host blocks, the solver's share alone.
Cases: "detr" (6 layers x batch 8 x 100 queries, 92 logits, 1..30 targets per
image) and "dino" (7 layers x batch 16 x 900 queries, 10..100 targets), targets
drawn once per case with a fixed seed. Time: wall clock per call (synchronised
on a GPU), p50/p20/p80 over --reps calls after 3 warm-up calls. Before timing,
each case checks that every provider finds assignments of the same total cost.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

if __package__ in (None, ""):   # run as `python benchmarks/matcher.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, markdown_table, write_results  # noqa: E402
from fastdetr import box_ops  # noqa: E402
from fastdetr.matcher import HungarianMatcher  # noqa: E402

PROVIDERS = ("original", "fastdetr-scipy", "fastdetr-triton", "scipy-only")
# (provider, baseline, minimum speedup), set for an H100 by issue 7
TARGETS = {"detr": ("fastdetr-triton", "original", 10.0), "dino": ("fastdetr-triton", "original", 20.0)}
WEIGHTS = dict(cost_class=1.0, cost_bbox=5.0, cost_giou=2.0)


@dataclass(frozen=True)
class Case:
    name: str
    layers: int
    batch: int
    queries: int
    logits: int          # classes + no-object
    min_targets: int
    max_targets: int

    @property
    def shape(self) -> str:
        return (f"{self.layers} layers x B {self.batch} x Q {self.queries}, {self.logits} logits, "
                f"{self.min_targets}..{self.max_targets} targets")


CASES = (Case("detr", 6, 8, 100, 92, 1, 30), Case("dino", 7, 16, 900, 92, 10, 100))
SMOKE = (Case("smoke", 2, 2, 12, 6, 0, 4),)


def make_inputs(case: Case, device) -> tuple[dict, list[dict]]:
    """The model's outputs (final layer + aux_outputs) and targets of one step, fixed by the case's seed."""
    generator = torch.Generator().manual_seed(sum(map(ord, case.name)))

    def boxes(*lead):
        centre = torch.rand(*lead, 2, generator=generator) * 0.6 + 0.2
        size = torch.rand(*lead, 2, generator=generator) * 0.3 + 0.05
        return torch.cat([centre, size], -1).to(device)

    layers = [{"pred_logits": (torch.randn(case.batch, case.queries, case.logits, generator=generator) * 2).to(device),
               "pred_boxes": boxes(case.batch, case.queries)} for _ in range(case.layers)]
    sizes = torch.randint(case.min_targets, case.max_targets + 1, (case.batch,), generator=generator).tolist()
    targets = [{"labels": torch.randint(0, case.logits - 1, (n,), generator=generator).to(device),
                "boxes": boxes(n)} for n in sizes]
    return {**layers[-1], "aux_outputs": layers[:-1]}, targets


@torch.no_grad()
def original_match(outputs: dict, targets: list[dict]) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """The original DETR matcher's algorithm, once per decoder layer (aux layers first, like match_layers)."""
    results = []
    sizes = [len(t["boxes"]) for t in targets]
    tgt_ids = torch.cat([t["labels"] for t in targets])
    tgt_bbox = torch.cat([t["boxes"] for t in targets])
    for layer in [*outputs["aux_outputs"], outputs]:
        batch, queries = layer["pred_logits"].shape[:2]
        out_prob = layer["pred_logits"].flatten(0, 1).softmax(-1)
        out_bbox = layer["pred_boxes"].flatten(0, 1)
        cost_class = -out_prob[:, tgt_ids]
        cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
        cost_giou = -box_ops.generalized_box_iou(box_ops.box_cxcywh_to_xyxy(out_bbox),
                                                 box_ops.box_cxcywh_to_xyxy(tgt_bbox))
        cost = WEIGHTS["cost_bbox"] * cost_bbox + WEIGHTS["cost_class"] * cost_class + WEIGHTS["cost_giou"] * cost_giou
        cost = cost.view(batch, queries, -1).cpu()
        results.append([linear_sum_assignment(block[i]) for i, block in enumerate(cost.split(sizes, -1))])
    return results


def host_blocks(outputs: dict, targets: list[dict]) -> list[list[np.ndarray]]:
    """Every layer's per-image cost blocks as host arrays (what "scipy-only" solves)."""
    cost = HungarianMatcher(**WEIGHTS).cost_blocks
    layers = [*outputs["aux_outputs"], outputs]
    sizes = [len(t["boxes"]) for t in targets]
    blocks = []
    for layer in layers:
        padded = cost(layer["pred_logits"].float(), layer["pred_boxes"].float(), targets).cpu().numpy()
        blocks.append([padded[b, :, :n] for b, n in enumerate(sizes)])
    return blocks


def providers(case: Case, device, with_triton: bool) -> dict[str, Callable[[], object]]:
    outputs, targets = make_inputs(case, device)
    scipy_matcher = HungarianMatcher(**WEIGHTS, backend="scipy")
    calls = {
        "original": lambda: original_match(outputs, targets),
        "fastdetr-scipy": lambda: scipy_matcher.match_layers(outputs, targets),
    }
    if with_triton:
        triton_matcher = HungarianMatcher(**WEIGHTS, backend="triton", check_invalid=False)
        calls["fastdetr-triton"] = lambda: triton_matcher.match_layers(outputs, targets)
    blocks = host_blocks(outputs, targets)
    calls["scipy-only"] = lambda: [[linear_sum_assignment(block) for block in layer] for layer in blocks]
    calls["_blocks"] = lambda: blocks   # not timed: the costs for the agreement check
    return calls


def _total(blocks: list[list[np.ndarray]], result) -> float:
    total = 0.0
    for layer_blocks, layer in zip(blocks, result):
        for block, (rows, cols) in zip(layer_blocks, layer):
            rows = rows.cpu().numpy() if isinstance(rows, torch.Tensor) else rows
            cols = cols.cpu().numpy() if isinstance(cols, torch.Tensor) else cols
            total += float(block[rows, cols].astype(np.float64).sum())
    return total


def check_agreement(calls: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Every provider's total cost over all layers and images; raises when one is not optimal."""
    blocks = calls["_blocks"]()
    totals = {name: _total(blocks, fn()) for name, fn in calls.items() if not name.startswith("_")}
    best = min(totals.values())
    for name, total in totals.items():
        if total - best > 1e-3 * max(1.0, abs(best)):
            raise RuntimeError(f"{name} found total cost {total:.6f}, others {best:.6f}: not optimal")
    return totals


def wall_ms(fn: Callable[[], object], device, reps: int, warmup: int = 3) -> tuple[float, float, float]:
    """(p50, p20, p80) wall-clock milliseconds of `fn`, synchronised on a GPU."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    quantiles = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return statistics.median(times), quantiles[1], quantiles[7]


def measure(case: Case, device, env: dict, reps: int, with_triton: bool) -> list[dict]:
    calls = providers(case, device, with_triton)
    check_agreement(calls)
    rows = []
    for name, fn in calls.items():
        if name.startswith("_"):
            continue
        p50, p20, p80 = wall_ms(fn, device, reps)
        rows.append(dict(case=case.name, provider=name, mode="step", metric="time", unit="ms", shape=case.shape,
                         p50=p50, p20=p20, p80=p80, **env))
    return rows


def summary_markdown(rows: Sequence[dict]) -> str:
    """results.md, drawn from the table's rows alone."""
    if not rows:
        return "# Matcher benchmark\n\nNo results.\n"
    last = rows[-1]
    value = {(r["case"], r["provider"]): r for r in rows}   # the latest run wins
    shapes = {r["case"]: r["shape"] for r in rows}
    names = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    out = [f"# Matcher benchmark: every decoder layer of one training step\n\n{last['device']}, "
           f"torch {last['torch']}, triton {last['triton']}, commit {last['git_sha']}, {last['timestamp']}. "
           "Wall-clock p50 per step in ms (p20-p80 in results.csv); scipy-only runs on the host.\n\n"]
    def ms(case, provider):
        if (case, provider) not in value:
            return ""
        p50 = value[(case, provider)]["p50"]
        return f"{p50:.0f}" if p50 >= 100 else f"{p50:.2f}" if p50 >= 1 else f"{p50:.3f}"

    out.append(markdown_table(["case", "shape"] + names, [[case, shapes[case]] + [ms(case, p) for p in names]
                                                          for case in shapes]))
    out.append(f"\n## Targets (set for an H100; this run: {last['device']})\n\n")
    target_rows = []
    for case in shapes:
        provider, baseline, minimum = TARGETS.get(case, (None, None, None))
        if (case, provider) in value and (case, baseline) in value:
            speedup = value[(case, baseline)]["p50"] / value[(case, provider)]["p50"]
            target_rows.append([case, f"{provider} vs {baseline}", f"{speedup:.1f}x", f">= {minimum:g}x",
                                "met" if speedup >= minimum else "missed"])
    out.append(markdown_table(["case", "speedup of", "measured", "target", ""], target_rows) if target_rows
               else "No targeted case with fastdetr-triton in this run (it is timed on a GPU).\n")
    return "".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for results.csv and results.md")
    parser.add_argument("--cases", nargs="+", choices=[c.name for c in CASES], help="default: all")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    parser.add_argument("--reps", type=int, default=20, help="timed calls per provider")
    parser.add_argument("--append", action="store_true", help="add to an existing results.csv")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU, every provider (the triton one through TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    if args.smoke:
        cases, device, with_triton = SMOKE, "cpu", True
    else:
        cases = [c for c in CASES if args.cases is None or c.name in args.cases]
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        with_triton = device == "cuda"
    env = environment(device)
    rows = []
    for case in cases:
        print(f"{case.name}: {case.shape} on {env['device']}", flush=True)
        case_rows = measure(case, device, env, args.reps, with_triton)
        for row in case_rows:
            print(f"  {row['provider']:<16} {row['p50']:10.2f} ms", flush=True)
        rows += case_rows
    csv_path, md_path = write_results(rows, args.out, summary_markdown, append=args.append)
    print(f"wrote {csv_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
