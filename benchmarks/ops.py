"""Each fused GEMM-epilogue kernel against its PyTorch alternatives, at DETR-R50 shapes.

    python benchmarks/ops.py --out DIR [--ops NAME ...] [--warmup MS] [--rep MS] [--append]

writes DIR/results.csv (benchmarks/common.py's long format) and DIR/results.md.
Needs a CUDA GPU (without one it lists the skipped cases and writes nothing);
`--smoke` runs tiny shapes on the CPU through Triton's interpreter.

Ops at DETR-R50's problem (`fastdetr.measure.problem.DETR_R50`), bf16; rows = tokens x batch = 950 x 8
for the encoder's, 100 x 8 for the matcher's queries:
- in_projection: [Q|K] = (x + pos) W_qk^T + b, V = x W_v^T + b (d 256 -> 768);
- linear_relu: dropout(relu(x W1^T + b1)) (256 -> 2048, dropout 0.1 in fwd+bwd);
- linear_residual_layernorm: LayerNorm(residual + dropout(x W2^T + b2)) (2048 -> 256);
- ffn_inference: the whole FFN with the hidden on chip (inference only);
- matching_cost: the matcher's cost blocks (6 layers x 8 images x 100 queries x 30 targets, 92 logits).
Providers: "fastdetr" (the kernel), "eager" (the op's plain-PyTorch reference,
`*_ref` in its kernel file) and "torch.compile" (torch.compile of that
reference; a compile failure becomes an "error" row). Modes: "fwd" (no grad)
and, for ops with a backward, "fwd+bwd". Metrics: time (do_bench), and
TFLOP/s from the op's matmul FLOPs (2 M N K per GEMM; the elementwise work is
not counted).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):   # run as `python benchmarks/ops.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, markdown_table, time_ms, write_results  # noqa: E402
from fastdetr.measure.problem import DETR_R50 as R50  # noqa: E402

PROVIDERS = ("fastdetr", "eager", "torch.compile")
MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Sizes:
    rows: int            # tokens x batch
    d_model: int
    hidden: int
    problems: int        # matcher: layers x images
    queries: int
    targets: int
    logits: int


# the matcher's problems: one per decoder layer (aux outputs included) and image; 30 targets per image at most
DETR_R50 = Sizes(rows=R50.tokens * R50.batch, d_model=R50.d_model, hidden=R50.dim_feedforward,
                 problems=R50.dec_layers * R50.batch, queries=R50.queries, targets=30, logits=R50.logits)
SMOKE = Sizes(rows=37, d_model=64, hidden=128, problems=4, queries=7, targets=3, logits=6)


@dataclass
class Op:
    name: str
    fused: Callable[..., torch.Tensor]
    reference: Callable[..., torch.Tensor]
    inputs: list[torch.Tensor]       # the ones that take gradients come first
    kwargs: dict
    flops: float                     # matmul FLOPs of one forward
    backward: bool                   # has a gradient (fwd+bwd is timed)


def build_ops(sizes: Sizes, device, dtype) -> list[Op]:
    from fastdetr.kernels import ffn, in_projection, linear_layernorm, linear_relu, matching_cost
    from fastdetr.matcher import matching_cost_ref

    generator = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device, dtype)

    m, d, h = sizes.rows, sizes.d_model, sizes.hidden
    x, pos, residual = randn(m, d), randn(m, d), randn(m, d)
    w_in, b_in = randn(3 * d, d, scale=d ** -0.5), randn(3 * d, scale=0.1)
    w1, b1 = randn(h, d, scale=d ** -0.5), randn(h, scale=0.1)
    w2, b2 = randn(d, h, scale=h ** -0.5), randn(d, scale=0.1)
    hidden = randn(m, h).relu()
    gamma, beta = randn(d, scale=0.1) + 1, randn(d, scale=0.1)
    logits = randn(sizes.problems, sizes.queries, sizes.logits).float()
    boxes = (torch.rand(sizes.problems, sizes.queries, 4, generator=generator) * 0.4 + 0.2).to(device)
    images = sizes.problems // 6 if sizes.problems % 6 == 0 else sizes.problems
    labels = torch.randint(0, sizes.logits - 1, (images, sizes.targets), generator=generator).to(device)
    target_boxes = (torch.rand(images, sizes.targets, 4, generator=generator) * 0.4 + 0.2).to(device)
    return [
        Op("in_projection", in_projection.in_projection, in_projection.in_projection_ref,
           [x, pos, w_in, b_in], {}, 2.0 * m * d * 3 * d, True),
        Op("linear_relu", linear_relu.linear_relu_dropout, linear_relu.linear_relu_dropout_ref,
           [x, w1, b1], {"dropout_p": 0.1}, 2.0 * m * d * h, True),
        Op("linear_residual_layernorm", linear_layernorm.linear_residual_layernorm,
           linear_layernorm.linear_residual_layernorm_ref, [hidden, w2, b2, residual, gamma, beta],
           {"dropout_p": 0.1}, 2.0 * m * h * d, True),
        Op("ffn_inference", ffn.ffn_inference, ffn.ffn_inference_ref, [x, w1, b1, w2, b2, x, gamma, beta], {},
           4.0 * m * d * h, False),
        Op("matching_cost", matching_cost.matching_cost, matching_cost_ref,
           [logits, boxes, labels, target_boxes], {}, 0.0, False),
    ]


def _callables(op: Op, provider: str) -> dict[str, Callable[[], object]]:
    """The timed calls of `op` for `provider`: {"fwd": ..., "fwd+bwd": ...}."""
    fn = {"fastdetr": op.fused, "eager": op.reference}.get(provider)
    if fn is None:
        fn = torch.compile(op.reference)
    grads = [t.detach().requires_grad_() if t.is_floating_point() else t for t in op.inputs]

    @torch.no_grad()
    def forward():
        return fn(*op.inputs, **{**op.kwargs, **({"dropout_p": 0.0} if "dropout_p" in op.kwargs else {})})

    calls = {"fwd": forward}
    if op.backward:
        def train():
            out = fn(*grads, **op.kwargs)
            out.backward(torch.ones_like(out))
        calls["fwd+bwd"] = train
    return calls


def measure(sizes: Sizes, device, env: dict, dtype=torch.bfloat16, ops: Sequence[str] | None = None,
            timer: Callable = time_ms, providers: Sequence[str] = PROVIDERS) -> list[dict]:
    rows = []
    for op in build_ops(sizes, device, dtype):
        if ops is not None and op.name not in ops:
            continue
        shape = f"M={sizes.rows} d={sizes.d_model} hidden={sizes.hidden} {str(dtype).removeprefix('torch.')}"
        for provider in providers:
            try:
                calls = _callables(op, provider)
                for call in calls.values():
                    call()   # compile / warm up outside the timed region
            except Exception as error:   # torch.compile may fail: a row, not a crash
                if provider != "torch.compile":
                    raise
                rows.append(dict(case=op.name, provider=provider, mode="fwd", metric="error",
                                 unit=f"{type(error).__name__}: {str(error)[:120]}", shape=shape,
                                 p50=float("nan"), p20=float("nan"), p80=float("nan"), **env))
                continue
            for mode, call in calls.items():
                p50, p20, p80 = timer(call)
                rows.append(dict(case=op.name, provider=provider, mode=mode, metric="time", unit="ms", shape=shape,
                                 p50=p50, p20=p20, p80=p80, **env))
                if op.flops and mode == "fwd":
                    rows.append(dict(case=op.name, provider=provider, mode=mode, metric="tflops", unit="TFLOP/s",
                                     shape=shape, p50=op.flops / p50 / 1e9, p20=op.flops / p80 / 1e9,
                                     p80=op.flops / p20 / 1e9, **env))
    return rows


def summary_markdown(rows: Sequence[dict]) -> str:
    if not rows:
        return "# Kernel ops benchmark\n\nNo results.\n"
    last = rows[-1]
    value = {(r["case"], r["provider"], r["mode"], r["metric"]): r["p50"] for r in rows}
    cases = list(dict.fromkeys(r["case"] for r in rows))
    out = [f"# Kernel ops vs PyTorch\n\n{last['device']}, torch {last['torch']}, triton {last['triton']}, "
           f"commit {last['git_sha']}; p50 ms (speedup of fastdetr over eager / torch.compile).\n\n"]
    table = []
    for case in cases:
        for mode in MODES:
            if (case, "fastdetr", mode, "time") not in value:
                continue
            ours = value[(case, "fastdetr", mode, "time")]
            cells = [case, mode, f"{ours:.3f}"]
            for baseline in ("eager", "torch.compile"):
                theirs = value.get((case, baseline, mode, "time"))
                cells.append("" if theirs is None else f"{theirs:.3f} ({theirs / ours:.2f}x)")
            table.append(cells)
    out.append(markdown_table(["op", "mode", "fastdetr", "eager", "torch.compile"], table))
    return "".join(out)


def _wall(fn, warmup=1, rep=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[len(times) // 2], times[0], times[-1]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ops", nargs="+", help="default: all")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    parser.add_argument("--append", action="store_true")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU through the interpreter (no torch.compile provider)")
    args = parser.parse_args(argv)
    if args.smoke:
        rows = measure(SMOKE, "cpu", {**environment("cpu"), "device": "cpu (Triton interpreter)"}, torch.float32,
                       args.ops, timer=_wall, providers=("fastdetr", "eager"))
    elif not torch.cuda.is_available():
        print("skipped ops (in_projection, linear_relu, linear_residual_layernorm, ffn_inference, matching_cost): "
              "no CUDA device")
        return 0
    else:
        rows = measure(DETR_R50, torch.device("cuda"), environment("cuda"), torch.bfloat16, args.ops,
                       timer=lambda fn: time_ms(fn, warmup=args.warmup, rep=args.rep))
    csv_path, md_path = write_results(rows, args.out, summary_markdown, append=args.append)
    print(f"wrote {csv_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
