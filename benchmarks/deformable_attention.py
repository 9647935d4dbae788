"""Multi-scale deformable attention (MSDA) at Deformable-DETR, RT-DETR and DINO shapes: fastdetr's Triton op
against grid_sample and the official CUDA op.

    python benchmarks/deformable_attention.py --out DIR [--cases NAME ...] [--quick] [--warmup MS] [--rep MS]
                                              [--append]
    python benchmarks/deformable_attention.py --smoke --out DIR

writes DIR/results.csv (the long-format table of benchmarks/common.py) and
DIR/results.md (tables and the issue's targets, drawn from the CSV alone). Needs
a CUDA GPU; without one it prints the cases it skipped, writes nothing and exits
0. `--smoke` runs tiny shapes on the CPU through Triton's interpreter (wall-clock
times of one call, no memory): it checks that the code runs; its times mean nothing.

Cases, each at batch 2, 8 heads of 32 channels (d_model 256), 4 points per head
and level; the levels' (H, W) are the input size over each stride, rounded up
(`level_shapes`, the one place they are computed):
- msda_deformable_detr_encoder: an 800 x 1333 input, strides 8/16/32/64 (4
  levels), one query per value token (the encoder's self-attention);
- msda_deformable_detr_decoder: 300 queries on that value;
- msda_rtdetr_decoder: a 640 x 640 input, strides 8/16/32 (3 levels), 300 queries;
- msda_dino_decoder: 900 queries on Deformable-DETR's value.
Sampling locations lie a few pixels (normal, `OFFSET_PIXELS` per axis) around a
reference point per query -- the encoder's own pixel centre, a random point for a
decoder's query -- as a model's do: how local the samples are decides the cache
hits, so uniform random locations would time a case no model has.

Providers (the dtype ends the name):
- "grid_sample-fp32" / "-bf16": `fastdetr.reference.deformable_attention.ms_deform_attn`
  (F.grid_sample per level; in bf16 it samples at bf16-rounded positions, since
  grid_sample takes its grid in the input's dtype; its host read of the level
  shapes is timed with it, as in Deformable DETR's PyTorch path);
- "fastdetr-fp32" / "-bf16": `fastdetr.kernels.deformable_attention.ms_deform_attn`;
- "fastdetr-deterministic-fp32": the same op with deterministic=True (the
  sort-and-gather value gradient; its forward is the op's);
- "fastdetr-module-fp32" / "-bf16": the whole `fastdetr.nn.MultiScaleDeformableAttention`
  as it runs by default: value projection with the padding fill in its epilogue,
  offsets and logits from one GEMM, softmax and locations inside the query-side
  kernel, output projection; on query and input_flatten (the last image padded
  on its last eighth of tokens), gradients of both and of the parameters in fwd+bwd;
- "module-gemm-off-chip-bf16": the fused module with `fuse_query_gemm` off: in
  fwd (inference) the offsets+logits GEMM runs by torch and the query-side kernel
  reads its output, instead of the GEMM inside the kernel (fwd+bwd is the same
  path as the fused module's: training always runs the GEMM by torch);
- "module-unfused-fp32" / "-bf16": the same module with `fuse_query_side` and
  `fuse_value_side` off (separate projections, softmax, location arithmetic and
  masked_fill around the sampling op): what the two fusions buy;
- "module-grid_sample-bf16": that unfused module with the grid_sample core (the
  plain-PyTorch module, as RT-DETR-style code runs it);
- "cuda-op-fp32": the official `MultiScaleDeformableAttention` CUDA extension
  (Deformable DETR's models/ops), called as its MSDeformAttnFunction calls it,
  when it imports on the machine; otherwise each case gets an "unavailable" row
  whose `unit` says why, and the summary lists it in its notes.
bf16 means value and attention weights (and, for the module, its parameters and
inputs) in bf16; sampling locations stay fp32 as a bf16 model computes them (fp32
reference points plus bf16 offsets promote to fp32).
Modes: "fwd" (no_grad) and "fwd+bwd" (forward, then the gradients of value,
locations and weights, or of the module's inputs and parameters, for a fixed
random output gradient). Metrics: time (ms; p50, p20, p80 of triton.testing.do_bench)
and, on a GPU, peak memory (MiB allocated above what was live before the call).
Before timing, each op provider's forward is compared with a float64 grid_sample
on the same inputs (shared/DESIGN.md's forward tolerance of its dtype; the
grid_sample providers are the baseline, not checked), and the module must take the kernel.

Targets (stated, not asserted; the summary gives the measured ratios): fwd+bwd
at least 5x the grid_sample path of the same dtype; at least the CUDA op's speed
in fp32; peak memory at most 0.2x grid_sample's in the same dtype.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

if __package__ in (None, ""):   # run as `python benchmarks/deformable_attention.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    environment,
    markdown_table,
    peak_memory_mib,
    time_ms,
    timed_rows,
    write_results,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# shared/DESIGN.md's forward tolerances (relative error against float64)
FORWARD_TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2}
OFFSET_PIXELS = 2.0     # std of a sample's offset from its reference point, in pixels of its level
IM2COL_STEP = 64        # Deformable DETR's MSDeformAttn default (the official op's batching knob)
MODES = ("fwd", "fwd+bwd")


def level_shapes(image_size: tuple[int, int], strides: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """(H_l, W_l) of each level: the input size over the level's stride, rounded up (every stride-2 layer of
    a ResNet, and the extra stride-2 convolution of the last level, round up)."""
    height, width = image_size
    return tuple((-(-height // stride), -(-width // stride)) for stride in strides)


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    image_size: tuple[int, int]    # (H, W) pixels of the padded batch
    strides: tuple[int, ...]       # each level's stride
    queries: int | None            # None: the encoder, one query per value token
    reference: str = "point"       # the module's reference_points: "point" (x, y) or "box" (x, y, w, h)
    heads: int = 8
    points: int = 4
    head_dim: int = 32

    @property
    def spatial_shapes(self) -> tuple[tuple[int, int], ...]:
        return level_shapes(self.image_size, self.strides)

    @property
    def tokens(self) -> int:
        """S, value tokens per image: the levels' H * W summed."""
        return sum(height * width for height, width in self.spatial_shapes)

    @property
    def levels(self) -> int:
        return len(self.strides)

    @property
    def d_model(self) -> int:
        return self.heads * self.head_dim

    @property
    def num_queries(self) -> int:
        return self.tokens if self.queries is None else self.queries

    def shape(self) -> str:
        maps = "+".join(f"{height}x{width}" for height, width in self.spatial_shapes)
        return (f"N={self.batch} Lq={self.num_queries} S={self.tokens} ({maps}) M={self.heads} D={self.head_dim} "
                f"L={self.levels} P={self.points}")


DEFORMABLE_DETR = dict(batch=2, image_size=(800, 1333), strides=(8, 16, 32, 64))
CASES = (
    Case("msda_deformable_detr_encoder", **DEFORMABLE_DETR, queries=None),
    Case("msda_deformable_detr_decoder", **DEFORMABLE_DETR, queries=300),
    Case("msda_rtdetr_decoder", batch=2, image_size=(640, 640), strides=(8, 16, 32), queries=300, reference="box"),
    Case("msda_dino_decoder", **DEFORMABLE_DETR, queries=900, reference="box"),
)
# --quick (benchmarks/gpu_suite.sh): the largest value and query count, and the 3-level decoder
QUICK_CASES = ("msda_deformable_detr_encoder", "msda_rtdetr_decoder")
# --smoke: a few value tokens (a 1 x 2 level among them) through the interpreter, encoder and box decoder
SMOKE_CASES = (
    Case("msda_smoke_encoder", batch=2, image_size=(16, 24), strides=(8, 16), queries=None, heads=2, points=2,
         head_dim=8),
    Case("msda_smoke_decoder", batch=2, image_size=(16, 24), strides=(8, 16), queries=5, reference="box",
         heads=2, points=2, head_dim=8),
)


@dataclass(frozen=True)
class Provider:
    kind: str      # "grid_sample", "fastdetr", "fastdetr-deterministic", a MODULE_KINDS key, "cuda-op"
    dtype: str     # a key of DTYPES

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.dtype}"


PROVIDERS = (
    Provider("grid_sample", "fp32"), Provider("grid_sample", "bf16"),
    Provider("fastdetr", "fp32"), Provider("fastdetr", "bf16"),
    Provider("fastdetr-deterministic", "fp32"),
    Provider("fastdetr-module", "fp32"), Provider("fastdetr-module", "bf16"),
    Provider("module-gemm-off-chip", "bf16"),
    Provider("module-unfused", "fp32"), Provider("module-unfused", "bf16"),
    Provider("module-grid_sample", "bf16"),
    Provider("cuda-op", "fp32"),
)
MODULE_KINDS = {   # kind: (fuse_query_side and fuse_value_side, fuse_query_gemm, the sampling core)
    "fastdetr-module": (True, True, "kernel"),
    "module-gemm-off-chip": (True, False, "kernel"),
    "module-unfused": (False, False, "kernel"),
    "module-grid_sample": (False, False, "grid_sample"),
}
OP_KINDS = ("grid_sample", "fastdetr", "fastdetr-deterministic", "cuda-op")   # the sampling core alone


@dataclass(frozen=True)
class Target:
    goal: str                    # in words, for the summary
    metric: str                  # "time": baseline / provider >= bound; "peak_memory": provider / baseline <= bound
    modes: tuple[str, ...]
    provider: str                # provider kinds
    baseline: str
    dtypes: tuple[str, ...]
    bound: float


# The goals (stated, not asserted)
TARGETS = (
    Target("fwd+bwd at least 5x the grid_sample path, same dtype", "time", ("fwd+bwd",), "fastdetr", "grid_sample",
           ("fp32", "bf16"), 5.0),
    Target("at least the official CUDA op's speed, fp32", "time", MODES, "fastdetr", "cuda-op", ("fp32",), 1.0),
    Target("peak memory at most 0.2x grid_sample's, same dtype", "peak_memory", MODES, "fastdetr", "grid_sample",
           ("fp32", "bf16"), 0.2),
    # what the fusions around the op buy (a goal of ours: the fused module no slower than its parts)
    Target("fused query and value sides at least as fast as the module with them unfused", "time", MODES,
           "fastdetr-module", "module-unfused", ("fp32", "bf16"), 1.0),
    Target("inference: the GEMM on chip at least as fast as the GEMM by torch", "time", ("fwd",),
           "fastdetr-module", "module-gemm-off-chip", ("bf16",), 1.0),
)


# ---- inputs ------------------------------------------------------------------------------------

@dataclass
class OpInputs:
    """The op's arguments for one case and dtype: value (N, S, M, D), spatial_shapes (L, 2) int64,
    level_start_index (L,) int64, sampling_locations (N, Lq, M, L, P, 2) fp32, attention_weights (N, Lq, M, L, P),
    grad_out (N, Lq, M * D); the reference points of the module (N, Lq, 2 or 4)."""
    value: torch.Tensor
    shapes: torch.Tensor
    starts: torch.Tensor
    locations: torch.Tensor
    weights: torch.Tensor
    grad_out: torch.Tensor
    references: torch.Tensor


def _reference_points(case: Case, generator: torch.Generator) -> torch.Tensor:
    """(N, Lq, 2) as (x, y) in [0, 1]: the encoder's pixel centres (level by level, as its tokens are stacked),
    or a random point per decoder query; (N, Lq, 4) with a box's (w, h) appended for reference="box"."""
    if case.queries is None:
        centres = []
        for height, width in case.spatial_shapes:
            y, x = torch.meshgrid((torch.arange(height) + 0.5) / height, (torch.arange(width) + 0.5) / width,
                                  indexing="ij")
            centres.append(torch.stack([x.flatten(), y.flatten()], -1))
        points = torch.cat(centres).expand(case.batch, -1, -1).clone()
    else:
        points = torch.rand(case.batch, case.queries, 2, generator=generator) * 0.9 + 0.05
    if case.reference == "box":
        sizes = torch.rand(case.batch, case.num_queries, 2, generator=generator) * 0.25 + 0.05
        points = torch.cat([points, sizes], -1)
    return points


def op_inputs(case: Case, device, dtype: str, seed: int = 0) -> OpInputs:
    """Random inputs for `case` (the same for every dtype: one seed, then rounded), locations around reference
    points (module docstring), softmax-normalised weights."""
    generator = torch.Generator().manual_seed(seed)
    batch, queries, heads, levels, points = case.batch, case.num_queries, case.heads, case.levels, case.points
    shapes = torch.tensor(case.spatial_shapes, dtype=torch.int64)
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), shapes.prod(-1).cumsum(0)[:-1]])
    references = _reference_points(case, generator)
    pixels = shapes.flip(-1).to(torch.float32)                                       # (L, 2) as (W, H)
    offsets = torch.randn(batch, queries, heads, levels, points, 2, generator=generator) * OFFSET_PIXELS
    locations = references[:, :, None, None, None, :2] + offsets / pixels[:, None, :]
    weights = torch.randn(batch, queries, heads, levels * points, generator=generator).softmax(-1)
    value = torch.randn(batch, case.tokens, heads, case.head_dim, generator=generator)
    grad_out = torch.randn(batch, queries, heads * case.head_dim, generator=generator)
    cast = DTYPES[dtype]
    return OpInputs(value.to(device, cast), shapes.to(device), starts.to(device), locations.to(device),
                    weights.view(batch, queries, heads, levels, points).to(device, cast), grad_out.to(device, cast),
                    references.to(device))


# ---- the official CUDA op ----------------------------------------------------------------------

class _OfficialMSDA(torch.autograd.Function):
    """The official extension as Deformable DETR's MSDeformAttnFunction (models/ops/functions) calls it."""

    @staticmethod
    def forward(ctx, extension, value, shapes, starts, locations, weights):
        ctx.extension = extension
        ctx.save_for_backward(value, shapes, starts, locations, weights)
        return extension.ms_deform_attn_forward(value, shapes, starts, locations, weights, IM2COL_STEP)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        value, shapes, starts, locations, weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = ctx.extension.ms_deform_attn_backward(
            value, shapes, starts, locations, weights, grad_out.contiguous(), IM2COL_STEP)
        return None, grad_value, None, None, grad_locations, grad_weights


def official_extension(device) -> tuple[object | None, str]:
    """(the `MultiScaleDeformableAttention` extension module, "") when it imports and `device` is CUDA, else
    (None, why not)."""
    if torch.device(device).type != "cuda":
        return None, "the official op runs on CUDA tensors only"
    try:
        import MultiScaleDeformableAttention as extension
    except Exception as error:   # ImportError, or an extension built for another torch / CUDA
        first_line = (str(error).splitlines() or [""])[0]
        return None, f"{type(error).__name__}: {first_line[:120]}"
    return extension, ""


# ---- what is timed -----------------------------------------------------------------------------

@dataclass
class Bench:
    forward: Callable[[], torch.Tensor]   # no_grad; returns the output (N, Lq, M * D) or (N, Lq, d_model)
    train_step: Callable[[], object]      # forward + backward
    grads: list[torch.Tensor]             # their .grad is cleared before each timed call


def _op_bench(op: Callable, inputs: OpInputs) -> Bench:
    leaves = [t.detach().requires_grad_() for t in (inputs.value, inputs.locations, inputs.weights)]

    def forward():
        with torch.no_grad():
            return op(inputs.value, inputs.shapes, inputs.starts, inputs.locations, inputs.weights)

    def train_step():
        value, locations, weights = leaves
        # autograd.grad, not backward: no AccumulateGrad into the leaves
        return torch.autograd.grad(op(value, inputs.shapes, inputs.starts, locations, weights), leaves,
                                   inputs.grad_out)

    return Bench(forward, train_step, [])


def _module_bench(case: Case, inputs: OpInputs, dtype: str, device, kind: str = "fastdetr-module") -> Bench:
    import fastdetr.nn as fnn
    from fastdetr.reference.deformable_attention import ms_deform_attn as reference

    torch.manual_seed(0)
    module = fnn.MultiScaleDeformableAttention(case.d_model, case.levels, case.heads, case.points)
    with torch.no_grad():   # per-query offsets and weights, as after training (the official init zeroes them)
        module.sampling_offsets.weight.normal_(0, 0.02)
        module.attention_weights.weight.normal_(0, 0.02)
    module = module.to(device, DTYPES[dtype])
    fused_sides, module.fuse_query_gemm, core = MODULE_KINDS[kind]
    module.fuse_query_side = module.fuse_value_side = fused_sides
    if core == "grid_sample":
        module._core = reference                       # an instance attribute: the module calls it with 5 tensors
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(case.batch, case.num_queries, case.d_model, generator=generator).to(device, DTYPES[dtype])
    flatten = torch.randn(case.batch, case.tokens, case.d_model, generator=generator).to(device, DTYPES[dtype])
    grad_out = torch.randn(case.batch, case.num_queries, case.d_model, generator=generator).to(device, DTYPES[dtype])
    # (N, Lq, L, 2 or 4): the same point (or box) on every level, as with valid ratios of 1
    references = inputs.references[:, :, None, :].expand(-1, -1, case.levels, -1).contiguous()
    leaves = [query.detach().requires_grad_(), flatten.detach().requires_grad_()]
    # the last image padded on its last eighth of tokens: the value projection's fill has work to do
    padding = torch.zeros(case.batch, case.tokens, dtype=torch.bool)
    padding[-1, case.tokens - case.tokens // 8:] = True
    padding = padding.to(device)

    def forward():
        module.eval()
        with torch.no_grad():
            return module(query, references, flatten, inputs.shapes, inputs.starts, padding)

    def train_step():
        module.train()
        module(leaves[0], references, leaves[1], inputs.shapes, inputs.starts, padding).backward(grad_out)

    return Bench(forward, train_step, leaves + list(module.parameters()))


def build(case: Case, device, providers: Sequence[Provider] = PROVIDERS,
          ) -> tuple[dict[str, Bench], dict[str, OpInputs], dict[str, str]]:
    """({provider name: Bench}, {dtype: OpInputs}, {provider name: why it is unavailable}) for `case`."""
    from fastdetr.kernels.deformable_attention import ms_deform_attn as kernel
    from fastdetr.reference.deformable_attention import ms_deform_attn as reference

    inputs = {dtype: op_inputs(case, device, dtype) for dtype in dict.fromkeys(p.dtype for p in providers)}
    benches, unavailable = {}, {}
    for provider in providers:
        given = inputs[provider.dtype]
        if provider.kind == "grid_sample":
            benches[provider.name] = _op_bench(reference, given)
        elif provider.kind == "fastdetr":
            benches[provider.name] = _op_bench(kernel, given)
        elif provider.kind == "fastdetr-deterministic":
            benches[provider.name] = _op_bench(lambda *args: kernel(*args, deterministic=True), given)
        elif provider.kind in MODULE_KINDS:
            benches[provider.name] = _module_bench(case, given, provider.dtype, device, provider.kind)
        elif provider.kind == "cuda-op":
            extension, why = official_extension(device)
            if extension is None:
                unavailable[provider.name] = why
                continue
            benches[provider.name] = _op_bench(
                lambda *args, extension=extension: _OfficialMSDA.apply(extension, *args), given)
        else:
            raise ValueError(f"unknown provider kind {provider.kind!r}")
    return benches, inputs, unavailable


def check_agreement(benches: dict[str, Bench], inputs: dict[str, OpInputs],
                    providers: Sequence[Provider] = PROVIDERS) -> dict[str, float]:
    """Relative error of each fastdetr and cuda-op provider's forward against a float64 grid_sample on the same
    inputs; raises past FORWARD_TOLERANCE of its dtype, or when the module would not take the kernel: a benchmark
    of different results, or of the wrong code, measures nothing."""
    from fastdetr.nn import functional
    from fastdetr.reference.deformable_attention import ms_deform_attn as reference

    errors, expected = {}, {}
    for provider in providers:
        if provider.name not in benches or provider.kind == "grid_sample":
            continue
        given = inputs[provider.dtype]
        if provider.kind in MODULE_KINDS:
            if provider.kind != "module-grid_sample" and \
                    not functional.msda_kernel_supported(given.value, given.locations, given.weights):
                raise RuntimeError(f"{provider.name} would run grid_sample, not the kernel, on "
                                   f"{given.value.device} {given.value.dtype}")
            continue
        if provider.dtype not in expected:
            expected[provider.dtype] = reference(given.value.double(), given.shapes, given.starts,
                                                 given.locations.double(), given.weights.double())
        truth = expected[provider.dtype]
        actual = benches[provider.name].forward().double()
        errors[provider.name] = ((actual - truth).norm() / truth.norm()).item()
        if not errors[provider.name] <= FORWARD_TOLERANCE[provider.dtype]:
            raise RuntimeError(f"{provider.name} disagrees with float64 grid_sample: relative error "
                               f"{errors[provider.name]:.3g} (tolerance {FORWARD_TOLERANCE[provider.dtype]})")
    return errors


def measure(case: Case, device, env: dict, providers: Sequence[Provider] = PROVIDERS, timer: Callable = time_ms,
            memory: Callable | None = peak_memory_mib) -> list[dict]:
    """Rows of the results table for `case`: time (ms) and, with `memory`, peak memory (MiB) per provider and
    mode; an "unavailable" row (NaN values, the reason in `unit`) for a provider that cannot run here."""
    benches, inputs, unavailable = build(case, device, providers)
    check_agreement(benches, inputs, providers)
    shape = case.shape()
    nan = float("nan")
    rows = [dict(case=case.name, provider=name, mode="fwd", metric="unavailable", unit=why, shape=shape,
                 p50=nan, p20=nan, p80=nan, **env) for name, why in unavailable.items()]
    return rows + timed_rows(case.name, shape, benches, MODES, env, timer, memory)


# ---- the summary -------------------------------------------------------------------------------

def summary_markdown(rows: Sequence[dict]) -> str:
    """results.md, drawn from the table's rows alone: times, peak memory, the targets with measured ratios, notes."""
    if not rows:
        return "# Multi-scale deformable attention benchmark\n\nNo results.\n"
    last = rows[-1]
    value = {(r["case"], r["provider"], r["mode"], r["metric"]): r["p50"] for r in rows}   # the latest run wins
    shapes = {r["case"]: r["shape"] for r in rows}
    cases = list(shapes)
    names = [p.name for p in PROVIDERS]
    measured = [n for n in names if any(r["provider"] == n and r["metric"] == "time" for r in rows)]
    out = [f"# Multi-scale deformable attention benchmark\n\n{last['device']}, torch {last['torch']}, "
           f"triton {last['triton']}, commit {last['git_sha']}, {last['timestamp']}. p50 of "
           "triton.testing.do_bench (p20-p80 in results.csv); bf16: value and weights in bf16, locations fp32.\n"]

    def cell(case, provider, mode, metric):
        found = value.get((case, provider, mode, metric))
        return "" if found is None else f"{found:.3f}" if metric == "time" else f"{found:.1f}"

    has_memory = any(r["metric"] == "peak_memory" for r in rows)
    for metric, title in (("time", "time (ms)"), ("peak_memory", "peak memory above the inputs (MiB)")):
        if metric == "peak_memory" and not has_memory:
            continue
        for mode in MODES:
            out.append(f"\n## {mode}: {title}\n\n")
            out.append(markdown_table(["case", "shape"] + measured,
                                      [[c, shapes[c]] + [cell(c, p, mode, metric) for p in measured] for c in cases]))

    out.append(f"\n## Targets (stated goals, not asserted; this run: {last['device']})\n\n")
    out += [f"- {target.goal}\n" for target in TARGETS]
    target_rows = []
    for target in TARGETS:
        for case in cases:
            for dtype in target.dtypes:
                ours, theirs = f"{target.provider}-{dtype}", f"{target.baseline}-{dtype}"
                for mode in target.modes:
                    a, b = value.get((case, ours, mode, target.metric)), value.get((case, theirs, mode, target.metric))
                    if a is None or b is None or not (a > 0 and b > 0):
                        continue
                    if target.metric == "time":
                        ratio, met, wanted = b / a, b / a >= target.bound, f">= {target.bound:g}x"
                        what = f"speedup of {ours} over {theirs}"
                    else:
                        ratio, met, wanted = a / b, a / b <= target.bound, f"<= {target.bound:g}x"
                        what = f"peak memory of {ours} / {theirs}"
                    target_rows.append([mode, case, what, f"{ratio:.2f}x", wanted, "met" if met else "missed"])
    if target_rows:
        out.append("\n" + markdown_table(["mode", "case", "ratio", "measured", "target", ""], target_rows))

    notes = {f"{r['provider']} not measured: {r['unit']}" for r in rows if r["metric"] == "unavailable"}
    if not has_memory:
        notes.add("peak memory not measured (a CPU run: CUDA's allocator statistics only)")
    if notes:
        out.append("\nNotes:\n\n" + "".join(f"- {note}\n" for note in sorted(notes)))
    return "".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for results.csv and results.md")
    parser.add_argument("--cases", nargs="+", choices=[c.name for c in CASES], help="default: all")
    level = parser.add_mutually_exclusive_group()
    level.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_CASES)}")
    level.add_argument("--smoke", action="store_true",
                       help="tiny shapes on the CPU through Triton's interpreter: checks that the code runs")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    parser.add_argument("--append", action="store_true", help="add to an existing results.csv")
    args = parser.parse_args(argv)
    if args.smoke:
        from benchmarks.layers import wall_time_ms
        from fastdetr.backend import interpreter_enabled

        if not interpreter_enabled():
            parser.error("--smoke runs the kernels through Triton's interpreter: set TRITON_INTERPRET=1")
        env = {**environment("cpu"), "device": "cpu (Triton interpreter)"}
        rows = []
        for case in SMOKE_CASES:
            rows += measure(case, "cpu", env, timer=lambda fn, grad_to_none: wall_time_ms(fn, grad_to_none, 0, 1),
                            memory=None)
    else:
        cases = [c for c in CASES if (args.cases is None or c.name in args.cases)
                 and (not args.quick or c.name in QUICK_CASES)]
        if not torch.cuda.is_available():
            for case in cases:
                print(f"skipped {case.name} ({case.shape()}): no CUDA device")
            print(f"no CUDA device: {len(cases)} cases skipped, nothing written to {args.out}")
            return 0
        device = torch.device("cuda")
        env = environment(device)
        rows = []
        for case in cases:
            print(f"{case.name}: {case.shape()}", flush=True)
            rows += measure(case, device, env,
                            timer=lambda fn, grad_to_none: time_ms(fn, grad_to_none, args.warmup, args.rep))
    for row in rows:
        print(f"  {row['case']:<30} {row['provider']:<28} {row['mode']:<8} {row['metric']:<12} "
              f"{row['p50']:10.3f} {row['unit']}", flush=True)
    csv_path, md_path = write_results(rows, args.out, summary_markdown, append=args.append)
    print(f"wrote {csv_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
