"""DETR's transformer layer stack at DETR-R50 shapes: fastdetr's fused layers against the reference, eager and compiled.

    python benchmarks/layers.py --out DIR [--cases NAME ...] [--providers NAME ...]
                                [--warmup MS] [--rep MS] [--append]
    python benchmarks/layers.py --smoke --out DIR [...]

writes DIR/results.csv (the long-format table of benchmarks/common.py) and
DIR/results.md (tables, speedups and targets, drawn from the CSV alone). Needs
a CUDA GPU; without one it prints the cases it skipped, writes nothing and
exits 0. `--smoke` instead runs tiny shapes on the CPU through Triton's
interpreter (float32, wall-clock times from time.perf_counter, no memory), so
CI runs every line of the GPU path; its times say nothing about speed.

Shapes: DETR-R50's problem (`fastdetr.measure.problem.DETR_R50`: batch 8, d_model
256, 8 heads, FFN 2048, 100 queries, S = 25 x 38 = 950 tokens of an 800 x 1216
batch), bf16, dropout 0.1 (also on the attention weights), DETR's image
padding: even images padded on the right over a quarter of every row, odd
images at the bottom over a quarter of the rows; the sine position embedding
DETR computes from that mask.

Cases:
- "transformer": DETR's whole transformer (`fastdetr.reference.transformer.Transformer`):
  6 encoder layers, 6 decoder layers from zero targets, the decoder norm on
  every layer's output (the auxiliary outputs); gradients flow back to the
  projected features and the query embeddings;
- "encoder": the 6 encoder layers alone, (S, B, d) tokens in and out;
- "decoder": the 6 decoder layers and the decoder norm on a given memory (which
  gets a gradient, as from the encoder).

Providers, one set of weights: "reference" (eager PyTorch, nn.MultiheadAttention
called as DETR calls it), "reference+torch.compile" (torch.compile of that
module, default mode; a compile failure becomes an "error" row carrying the
reason in its `unit` column, not a crash) and "fastdetr" (a copy after
`fastdetr.optimize`).

Modes: "fwd" (eval, no_grad: inference) and "fwd+bwd" (train mode with dropout:
forward, then backward of a fixed random gradient; the parameters' .grad is
cleared before each call, as `zero_grad()` does). Metrics: time (ms; p50, p20,
p80) and peak memory (MiB allocated above what was live before the call: the
activations, the output and, in fwd+bwd, the gradients, which are the same for
every provider). Before timing, the providers' eval outputs are compared with a
float32 copy of the reference: each may be off by at most twice the bf16
reference's own error (or the gradient bound of shared/DESIGN.md, whichever is
larger), and the fastdetr provider must not have fallen back to nn.MultiheadAttention.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

if __package__ in (None, ""):   # run as `python benchmarks/layers.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    bench_metrics,
    environment,
    markdown_table,
    peak_memory_mib,
    time_ms,
    write_results,
)
from fastdetr.measure.problem import DETR_R50 as R50  # noqa: E402


@dataclass(frozen=True)
class Scale:
    """Problem sizes: DETR-R50's, or tiny ones for the smoke run through Triton's interpreter."""
    batch: int
    d_model: int
    heads: int
    dim_feedforward: int
    feature_map: tuple[int, int]   # (h, w) of the backbone's stride-32 output; S = h * w tokens
    queries: int
    layers: int                    # encoder layers, and decoder layers

    @property
    def tokens(self) -> int:
        return self.feature_map[0] * self.feature_map[1]


DETR_R50 = Scale(batch=R50.batch, d_model=R50.d_model, heads=R50.heads, dim_feedforward=R50.dim_feedforward,
                 feature_map=R50.feature_map, queries=R50.queries, layers=R50.enc_layers)   # 6 + 6 layers
SMOKE = Scale(batch=2, d_model=64, heads=2, dim_feedforward=128, feature_map=(3, 5), queries=4, layers=2)
DROPOUT = 0.1

CASES = ("transformer", "encoder", "decoder")
PROVIDERS = ("reference", "reference+torch.compile", "fastdetr")
COMPILED = "reference+torch.compile"
MODES = ("fwd", "fwd+bwd")
# The targets on an H100, fwd+bwd: (metric, baseline, bound on fastdetr / baseline)
TIME_TARGETS = (("reference", 2.0), (COMPILED, 1.3))   # speedup of fastdetr at least this
MEMORY_TARGET = ("reference", 0.6)                     # peak memory at most this fraction
# shared/DESIGN.md's gradient bounds: a stack of 12 layers compounds the forward's rounding
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def shape_label(case: str, scale: Scale, dtype: torch.dtype) -> str:
    """The `shape` column: sizes, layers and dtype of `case`."""
    height, width = scale.feature_map
    layers = {"transformer": f"{scale.layers}+{scale.layers} layers", "encoder": f"{scale.layers} encoder layers",
              "decoder": f"{scale.layers} decoder layers"}[case]
    queries = "" if case == "encoder" else f" Q={scale.queries}"
    return (f"B={scale.batch} S={scale.tokens} ({height}x{width}, image padding){queries} d={scale.d_model} "
            f"h={scale.heads} ffn={scale.dim_feedforward} {layers} {str(dtype).removeprefix('torch.')} p={DROPOUT}")


def image_padding_mask(scale: Scale, device) -> Tensor:
    """(B, h, w) bool, True = padding: DETR pads each image right and bottom to the batch's size.

    Even images are narrower (the right quarter of every row padded), odd ones
    shorter (the bottom quarter of the rows padded).
    """
    height, width = scale.feature_map
    mask = torch.zeros(scale.batch, height, width, dtype=torch.bool)
    mask[0::2, :, width - max(1, width // 4):] = True
    mask[1::2, height - max(1, height // 4):, :] = True
    return mask.to(device)


# ---------------------------------------------------------------------------------------------
# What is run: modules, inputs, one Bench per provider
# ---------------------------------------------------------------------------------------------

def build_module(case: str, scale: Scale) -> nn.Module:
    """The reference module of `case` (float32, CPU), with non-zero biases and LayerNorm affines as after training."""
    from fastdetr.reference import transformer as reference

    arguments = dict(d_model=scale.d_model, nhead=scale.heads, dim_feedforward=scale.dim_feedforward,
                     dropout=DROPOUT)
    if case == "transformer":
        module = reference.Transformer(num_encoder_layers=scale.layers, num_decoder_layers=scale.layers,
                                       **arguments)
    elif case == "encoder":
        module = reference.TransformerEncoder(reference.TransformerEncoderLayer(**arguments), scale.layers)
    elif case == "decoder":
        module = reference.TransformerDecoder(reference.TransformerDecoderLayer(**arguments), scale.layers,
                                              nn.LayerNorm(scale.d_model), return_intermediate=True)
    else:
        raise ValueError(f"unknown case {case!r}; expected one of {CASES}")
    with torch.no_grad():
        for param in module.parameters():
            if param.dim() == 1:   # biases start at 0 and LayerNorm weights at 1
                param.add_(torch.randn_like(param) * 0.02)
    return module


def build_inputs(case: str, scale: Scale, device, dtype) -> dict[str, Tensor]:
    """Keyword arguments of `case`'s forward; those that get a gradient in DETR require grad here."""
    from fastdetr.reference.position_encoding import PositionEmbeddingSine

    generator = torch.Generator().manual_seed(1)

    def randn(*size, requires_grad=False):
        return torch.randn(*size, generator=generator).to(device, dtype).requires_grad_(requires_grad)

    batch, d_model = scale.batch, scale.d_model
    mask = image_padding_mask(scale, device)
    features = randn(batch, d_model, *scale.feature_map, requires_grad=case == "transformer")
    pos = PositionEmbeddingSine(d_model // 2, normalize=True)(features, mask).to(dtype)   # (B, d, h, w)
    if case == "transformer":   # DETR's call: projected features, padding mask, query embeddings, positions
        return dict(src=features, mask=mask, query_embed=randn(scale.queries, d_model, requires_grad=True),
                    pos_embed=pos)
    tokens = features.flatten(2).permute(2, 0, 1).contiguous().requires_grad_()   # (S, B, d)
    pos = pos.flatten(2).permute(2, 0, 1).contiguous()
    if case == "encoder":
        return dict(src=tokens, src_key_padding_mask=mask.flatten(1), pos=pos)
    query_pos = randn(scale.queries, d_model).unsqueeze(1).repeat(1, batch, 1).requires_grad_()
    return dict(tgt=torch.zeros_like(query_pos, requires_grad=False), memory=tokens,
                memory_key_padding_mask=mask.flatten(1), pos=pos, query_pos=query_pos)


def _first(output) -> Tensor:
    """The output a loss reads: the decoder's (layers, ...) stack for the whole transformer, else the output."""
    return output[0] if isinstance(output, tuple) else output


@dataclass
class Bench:
    """One provider on one case: what is timed, and what is reset between calls."""
    forward: Callable[[], Tensor]     # eval, no_grad; returns the output a loss reads
    train_step: Callable[[], object]  # train mode, dropout on: forward + backward
    grads: list[Tensor]               # their .grad is cleared before each timed call


def _bench(module: nn.Module, inputs: dict[str, Tensor], grad_out: Tensor) -> Bench:
    def forward():
        module.eval()
        with torch.no_grad():
            return _first(module(**inputs))

    def train_step():
        module.train()
        _first(module(**inputs)).backward(grad_out)

    leaves = [t for t in inputs.values() if t.requires_grad]
    return Bench(forward, train_step, leaves + list(module.parameters()))


def build(case: str, scale: Scale, device, dtype, providers: Sequence[str]) -> tuple[dict[str, Bench], Tensor]:
    """A Bench for each of `providers` on `case` (shared weights and inputs), and the oracle's output: the
    reference module in float32, eval mode, on the same inputs."""
    import fastdetr

    torch.manual_seed(0)
    oracle = build_module(case, scale)
    reference = copy.deepcopy(oracle).to(device, dtype)
    inputs = build_inputs(case, scale, device, dtype)
    with torch.no_grad():
        shape = _first(reference.eval()(**inputs)).shape
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    benches = {}
    for provider in providers:
        if provider == "reference":
            module = reference
        elif provider == COMPILED:
            module = torch.compile(reference)   # shares the reference's parameters; compiles on first call
        elif provider == "fastdetr":
            module = fastdetr.optimize(copy.deepcopy(reference))
        else:
            raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")
        benches[provider] = _bench(module, inputs, grad_out)
    oracle = oracle.to(device).eval()
    with torch.no_grad():
        expected = _first(oracle(**{name: t.detach().float() if t.is_floating_point() else t
                                    for name, t in inputs.items()}))
    return benches, expected


def _relative_error(actual: Tensor, expected: Tensor) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(actual).all():
        return math.inf
    return ((actual - expected).norm() / expected.norm()).item()


def check_agreement(benches: dict[str, Bench], expected: Tensor, dtype: torch.dtype,
                    reference_error: float | None = None) -> dict[str, float]:
    """Relative error of each provider's eval forward against the float32 oracle's output `expected`.

    Bound: max(2 x the reference's own error, TOLERANCE[dtype]); the reference's
    error is measured here when "reference" is among `benches`, else given as
    `reference_error`. Raises when a provider is past it, or when the fastdetr
    provider ran nn.MultiheadAttention's forward (a silent fallback to the
    reference math): a benchmark of different results, or of the wrong code,
    measures nothing.
    """
    from fastdetr.measure.counters import TorchFunctionCounter

    errors = {}
    for name, bench in benches.items():
        if name == "fastdetr":
            with TorchFunctionCounter() as calls:
                actual = bench.forward()
            if calls.ran("multi_head_attention"):
                raise RuntimeError("the fastdetr provider ran nn.MultiheadAttention: its layers fell back "
                                   "to the reference forward")
        else:
            actual = bench.forward()
        errors[name] = _relative_error(actual, expected)
    if reference_error is None:
        reference_error = errors.get("reference", 0.0)
    bound = max(2 * reference_error, TOLERANCE[dtype])
    for name, error in errors.items():
        if not error <= bound:
            raise RuntimeError(f"{name} disagrees with the float32 reference: relative error {error:.3g} "
                               f"> {bound:.3g} (the {str(dtype).removeprefix('torch.')} reference's: "
                               f"{reference_error:.3g})")
    return errors


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------

def wall_time_ms(fn: Callable[[], object], grad_to_none: Sequence[Tensor] | None = None,
                 warmup: int = 1, rep: int = 3) -> tuple[float, float, float]:
    """(p50, p20, p80) wall-clock ms over `rep` calls after `warmup` calls, by time.perf_counter (CPU runs)."""
    times = []
    for index in range(warmup + max(rep, 1)):
        for tensor in grad_to_none or ():
            tensor.grad = None
        start = time.perf_counter()
        fn()
        if index >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    if len(times) == 1:
        return times[0], times[0], times[0]
    cuts = statistics.quantiles(times, n=10, method="inclusive")   # deciles: cuts[1] = p20, cuts[7] = p80
    return statistics.median(times), cuts[1], cuts[7]


def _row(case, provider, mode, metric, unit, shape, values, env) -> dict:
    p50, p20, p80 = values
    return dict(case=case, provider=provider, mode=mode, metric=metric, unit=unit, shape=shape,
                p50=p50, p20=p20, p80=p80, **env)


def _reason(error: BaseException) -> str:
    """One line for the table's `unit` column: the exception's type and the first line of its message."""
    message = str(error).strip()
    return f"{type(error).__name__}: {message.splitlines()[0] if message else ''}"[:300]


def measure(case: str, scale: Scale, device, env: dict, dtype=torch.bfloat16,
            providers: Sequence[str] = PROVIDERS, timer: Callable = time_ms,
            memory: Callable | None = peak_memory_mib) -> list[dict]:
    """Rows of the results table for `case`: time (ms) and, with `memory`, peak memory (MiB), per provider and mode.

    A failure of the compiled provider (at compile time, or in one mode) becomes an
    "error" row with the reason in `unit` and NaN values; any other failure raises.
    """
    shape = shape_label(case, scale, dtype)
    benches, expected = build(case, scale, device, dtype, providers)
    rows = []
    compiled = benches.pop(COMPILED, None)
    errors = check_agreement(benches, expected, dtype)
    if compiled is not None:   # compiled on its first call, here; a failure drops this provider alone
        try:
            check_agreement({COMPILED: compiled}, expected, dtype, reference_error=errors.get("reference"))
            benches[COMPILED] = compiled
        except Exception as error:   # any compile (or compiled-result) failure is reported, not raised
            rows.append(_row(case, COMPILED, "fwd", "error", _reason(error), shape, (math.nan,) * 3, env))

    for provider, bench in benches.items():
        for mode in MODES:
            try:
                metrics = bench_metrics(bench, mode, timer, memory)
            except Exception as error:   # reported for the compiled provider only
                if provider != COMPILED:
                    raise
                rows.append(_row(case, provider, mode, "error", _reason(error), shape, (math.nan,) * 3, env))
                continue
            rows += [_row(case, provider, mode, metric, unit, shape, values, env) for metric, unit, values in metrics]
    return rows


# ---------------------------------------------------------------------------------------------
# The summary
# ---------------------------------------------------------------------------------------------

def summary_markdown(rows: Sequence[dict]) -> str:
    """results.md, drawn from the table's rows alone."""
    if not rows:
        return "# Transformer layer benchmark\n\nNo results.\n"
    last = rows[-1]
    value = {(r["case"], r["provider"], r["mode"], r["metric"]): r for r in rows}   # the latest run wins
    shapes = {r["case"]: r["shape"] for r in rows}
    cases = [c for c in CASES if c in shapes] + [c for c in shapes if c not in CASES]
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    on_cpu = last["device"].startswith("cpu")
    timing = ("wall-clock p50 of time.perf_counter through Triton's interpreter: a smoke run, the times "
              "say nothing about speed" if on_cpu else "p50 of triton.testing.do_bench (p20-p80 in results.csv)")
    out = [f"# Transformer layer benchmark\n\n{last['device']}, torch {last['torch']}, triton {last['triton']}, "
           f"commit {last['git_sha']}, {last['timestamp']}. {timing}.\n\n"
           + "".join(f"- {case}: {shapes[case]}\n" for case in cases)]

    def p50(case, provider, mode, metric):
        row = value.get((case, provider, mode, metric))
        return None if row is None or math.isnan(row["p50"]) else row["p50"]

    def ratio(case, mode, metric, numerator, denominator):
        a, b = p50(case, numerator, mode, metric), p50(case, denominator, mode, metric)
        return None if a is None or b is None or b <= 0 else a / b

    def fmt(number, spec, suffix=""):
        return "" if number is None else format(number, spec) + suffix

    speedup_of = [p for p in ("reference", COMPILED) if p in providers and "fastdetr" in providers]
    for mode in MODES:
        out.append(f"\n## {mode}: time (ms) and fastdetr's speedup\n\n")
        out.append(markdown_table(
            ["case"] + providers + [f"speedup vs {p}" for p in speedup_of],
            [[c] + [fmt(p50(c, p, mode, "time"), ".3f") for p in providers]
             + [fmt(ratio(c, mode, "time", p, "fastdetr"), ".2f", "x") for p in speedup_of]
             for c in cases]))
    if any(r["metric"] == "peak_memory" for r in rows):
        for mode in MODES:
            out.append(f"\n## {mode}: peak memory above what was live before the call (MiB)\n\n")
            out.append(markdown_table(
                ["case"] + providers + ["fastdetr / reference"],
                [[c] + [fmt(p50(c, p, mode, "peak_memory"), ".1f") for p in providers]
                 + [fmt(ratio(c, mode, "peak_memory", "fastdetr", "reference"), ".2f")] for c in cases]))

    out.append(f"\n## Targets, fwd+bwd (set for an H100; this run: {last['device']})\n\n")
    target_rows = []
    for case in cases:
        for baseline, minimum in TIME_TARGETS:
            speedup = ratio(case, "fwd+bwd", "time", baseline, "fastdetr")
            if speedup is not None:
                target_rows.append([case, f"speedup vs {baseline}", f"{speedup:.2f}x", f">= {minimum}x",
                                    "met" if speedup >= minimum else "missed"])
        baseline, maximum = MEMORY_TARGET
        fraction = ratio(case, "fwd+bwd", "peak_memory", "fastdetr", baseline)
        if fraction is not None:
            target_rows.append([case, f"peak memory / {baseline}", f"{fraction:.2f}", f"<= {maximum}",
                                "met" if fraction <= maximum else "missed"])
    out.append(markdown_table(["case", "fastdetr", "measured", "target", ""], target_rows) if target_rows
               else "No fastdetr fwd+bwd measurement with its baseline in this table.\n")

    failures = [r for r in rows if r["metric"] == "error"]
    if failures:
        out.append("\n## Errors (no numbers for these)\n\n")
        out.append(markdown_table(["case", "provider", "mode", "reason"],
                                  [[r["case"], r["provider"], r["mode"], r["unit"]] for r in failures]))
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for results.csv and results.md")
    parser.add_argument("--cases", nargs="+", choices=CASES, help="default: all")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, help="default: all")
    parser.add_argument("--warmup", type=int, help="do_bench warm-up in ms (default 25); with --smoke, calls (1)")
    parser.add_argument("--rep", type=int, help="do_bench repetition time in ms (default 100); with --smoke, calls (3)")
    parser.add_argument("--append", action="store_true", help="add to an existing results.csv")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU through Triton's interpreter, float32; times mean nothing")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if args.cases is None or c in args.cases]
    providers = [p for p in PROVIDERS if args.providers is None or p in args.providers]

    if args.smoke:
        from fastdetr.backend import interpreter_enabled

        if not interpreter_enabled():   # read when a kernel module is first imported, which is later
            os.environ["TRITON_INTERPRET"] = "1"
        scale, device, dtype, memory = SMOKE, torch.device("cpu"), torch.float32, None
        warmup, rep = (1 if args.warmup is None else args.warmup), (3 if args.rep is None else args.rep)

        def timer(fn, grad_to_none):
            return wall_time_ms(fn, grad_to_none, warmup, rep)

        env = {**environment(device), "device": "cpu (Triton interpreter)"}
    elif not torch.cuda.is_available():
        for case in cases:
            print(f"skipped {case} ({shape_label(case, DETR_R50, torch.bfloat16)}): no CUDA device")
        print(f"no CUDA device: {len(cases)} cases skipped, nothing written to {args.out}")
        return 0
    else:
        scale, device, dtype, memory = DETR_R50, torch.device("cuda"), torch.bfloat16, peak_memory_mib
        warmup, rep = (25 if args.warmup is None else args.warmup), (100 if args.rep is None else args.rep)

        def timer(fn, grad_to_none):
            return time_ms(fn, grad_to_none, warmup, rep)

        env = environment(device)

    rows = []
    for case in cases:
        print(f"{case}: {shape_label(case, scale, dtype)}", flush=True)
        case_rows = measure(case, scale, device, env, dtype, providers, timer=timer, memory=memory)
        for row in case_rows:
            if row["metric"] == "time":
                print(f"  {row['provider']:<24} {row['mode']:<8} {row['p50']:10.3f} ms", flush=True)
            elif row["metric"] == "error":
                print(f"  {row['provider']:<24} {row['mode']:<8} error: {row['unit']}", flush=True)
        rows += case_rows
    csv_path, md_path = write_results(rows, args.out, summary_markdown, append=args.append)
    print(f"wrote {csv_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
