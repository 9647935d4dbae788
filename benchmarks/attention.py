"""Attention at DETR-R50 shapes: fastdetr's flash-attention kernel against SDPA and nn.MultiheadAttention.

    python benchmarks/attention.py --out DIR [--cases NAME ...] [--warmup MS] [--rep MS] [--append]

writes DIR/results.csv (the long-format table of benchmarks/common.py) and
DIR/results.md (tables and the issue's targets, drawn from the CSV alone). Needs
a CUDA GPU; without one it prints the cases it skipped, writes nothing and exits 0.

Shapes: DETR-R50's problem (`fastdetr.measure.problem.DETR_R50`: batch 8, d_model
256, 8 heads of 32), bf16. Encoder self-attention over the 25 x 38 = 950 tokens
of an 800 x 1216 input, decoder cross-attention from 100 queries to them. Each
case gives every provider the same (B, S) key padding mask:
- "tail" padding: each image's last keys are padded (whole key blocks, the best
  case for block skipping), at 0 / 25 / 50 % to show the skipping;
- "image" padding, DETR's own: images are padded right and bottom to the batch's
  size, so even images lose a quarter of every row (runs of padded keys shorter
  than a key block, which cannot be skipped) and odd images lose a quarter of
  the rows (a padded tail).

Providers, at two levels:
- the attention core, on q, k, v as the (B, H, L, D) views of (L, B, E)
  projections that nn.MultiheadAttention makes: "fastdetr" (fastdetr.kernels.attention)
  and "sdpa" (F.scaled_dot_product_attention with the mask as a bool attn_mask);
- the module, projections included, same state_dict: "fastdetr.nn.MultiheadAttention",
  "nn.MultiheadAttention" (called as DETR calls it: need_weights left at True, which
  materialises the weights) and "nn.MultiheadAttention(need_weights=False)" (PyTorch's SDPA path).
Modes: "fwd" (eval, no_grad) and "fwd+bwd" (train mode, gradients of inputs and
parameters). Before timing, each case checks that the providers agree (dropout off).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):   # run as `python benchmarks/attention.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    environment,
    markdown_table,
    peak_memory_mib,
    time_ms,
    timed_rows,
    write_results,
)
from fastdetr.measure.problem import DETR_R50 as R50  # noqa: E402

HEAD_DIM = R50.head_dim   # every scale's heads are this wide


@dataclass(frozen=True)
class Scale:
    """Problem sizes: DETR-R50's, or tiny ones for a smoke test through Triton's interpreter."""
    batch: int
    heads: int
    feature_map: tuple[int, int]   # (H, W) of the backbone's stride-32 output; S = H * W keys
    queries: int

    @property
    def d_model(self) -> int:
        return self.heads * HEAD_DIM

    @property
    def tokens(self) -> int:
        return self.feature_map[0] * self.feature_map[1]


DETR_R50 = Scale(batch=R50.batch, heads=R50.heads, feature_map=R50.feature_map, queries=R50.queries)
TINY = Scale(batch=2, heads=2, feature_map=(4, 6), queries=5)


@dataclass(frozen=True)
class Case:
    name: str
    attention: str        # "encoder" (self-attention over the tokens) or "decoder_cross" (queries -> tokens)
    padding: float        # fraction of each image's keys that are padded
    layout: str           # "tail" or "image" (see the module docstring)
    dropout_p: float = 0.0

    def sizes(self, scale: Scale) -> tuple[int, int]:
        """(L, S): query and key counts."""
        return (scale.tokens if self.attention == "encoder" else scale.queries), scale.tokens

    def shape(self, scale: Scale) -> str:
        seq_q, seq_k = self.sizes(scale)
        return (f"B={scale.batch} H={scale.heads} L={seq_q} S={seq_k} D={HEAD_DIM} "
                f"pad={self.padding:.0%}/{self.layout} p={self.dropout_p}")


CASES = (
    Case("encoder_pad0", "encoder", 0.0, "tail"),
    Case("encoder_pad25_tail", "encoder", 0.25, "tail"),
    Case("encoder_pad50_tail", "encoder", 0.50, "tail"),
    Case("encoder_pad25", "encoder", 0.25, "image"),
    Case("decoder_cross_pad25", "decoder_cross", 0.25, "image"),
    Case("encoder_pad25_dropout", "encoder", 0.25, "image", dropout_p=0.1),   # DETR trains with 0.1
)
PADDING_SWEEP = ("encoder_pad0", "encoder_pad25_tail", "encoder_pad50_tail")
KERNEL_PROVIDERS = ("fastdetr", "sdpa")
MODULE_PROVIDERS = ("fastdetr.nn.MultiheadAttention", "nn.MultiheadAttention",
                    "nn.MultiheadAttention(need_weights=False)")
PROVIDERS = KERNEL_PROVIDERS + MODULE_PROVIDERS
MODES = ("fwd", "fwd+bwd")
# The targets on an H100: (mode, provider, baseline, minimum speedup)
TARGETS = (("fwd+bwd", "fastdetr", "sdpa", 1.5),
           ("fwd", "fastdetr.nn.MultiheadAttention", "nn.MultiheadAttention", 2.0))


def key_padding_mask(case: Case, scale: Scale, device) -> torch.Tensor:
    """(B, S) bool, True = padded key, for `case`'s padding fraction and layout."""
    height, width = scale.feature_map
    mask = torch.zeros(scale.batch, height, width, dtype=torch.bool)
    for image in range(scale.batch):
        if case.layout == "tail":
            padded = round(case.padding * height * width)
            mask[image].view(-1)[height * width - padded:] = True
        elif image % 2 == 0:   # "image", even: padded on the right, in every row
            mask[image, :, width - round(case.padding * width):] = True
        else:                  # "image", odd: padded at the bottom
            mask[image, height - round(case.padding * height):, :] = True
    return mask.flatten(1).to(device)


@dataclass
class Bench:
    """One provider on one case: what is timed, and what is reset between calls."""
    forward: Callable[[], torch.Tensor]   # eval, no_grad; returns the output (B, H, L, D) or (L, B, E)
    train_step: Callable[[], object]      # forward + backward, dropout on
    grads: list[torch.Tensor]             # their .grad is cleared before each timed call


def _kernel_benches(case: Case, scale: Scale, device, dtype, mask) -> dict[str, Bench]:
    from fastdetr.kernels.attention import attention

    generator = torch.Generator(device="cpu").manual_seed(0)
    seq_q, seq_k = case.sizes(scale)
    batch, heads, embed = scale.batch, scale.heads, scale.d_model

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    def heads_view(x):   # (L, B, E) -> (B, H, L, D), as nn.MultiheadAttention reshapes its projections
        return x.unflatten(-1, (heads, HEAD_DIM)).permute(1, 2, 0, 3)

    if case.attention == "encoder":   # q and k from one (S, B, 2E) GEMM, v from another
        qk = randn(seq_k, batch, 2 * embed)
        q, k = heads_view(qk[..., :embed]), heads_view(qk[..., embed:])
    else:
        q, k = heads_view(randn(seq_q, batch, embed)), heads_view(randn(seq_k, batch, embed))
    v = heads_view(randn(seq_k, batch, embed))
    grad_out = randn(batch, heads, seq_q, HEAD_DIM)
    attend = ~mask[:, None, None, :]   # SDPA's bool attn_mask: True = take part

    def fastdetr(q, k, v, dropout_p):
        return attention(q, k, v, key_padding_mask=mask, dropout_p=dropout_p)

    def sdpa(q, k, v, dropout_p):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=dropout_p)

    benches = {}
    for name, fn in (("fastdetr", fastdetr), ("sdpa", sdpa)):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]   # same strides as q, k, v

        def forward(fn=fn):
            with torch.no_grad():
                return fn(q, k, v, 0.0)

        def train_step(fn=fn, leaves=leaves):
            # autograd.grad, not backward: no AccumulateGrad copies into the leaves' strides
            return torch.autograd.grad(fn(*leaves, case.dropout_p), leaves, grad_out)

        benches[name] = Bench(forward, train_step, [])
    return benches


def _module_benches(case: Case, scale: Scale, device, dtype, mask) -> dict[str, Bench]:
    import fastdetr.nn as fnn

    torch.manual_seed(0)
    seq_q, seq_k = case.sizes(scale)
    embed = scale.d_model
    fused = fnn.MultiheadAttention(embed, scale.heads, dropout=case.dropout_p)
    with torch.no_grad():   # non-zero biases, as after training
        fused.in_proj_bias.normal_(0, 0.02)
        fused.out_proj.bias.normal_(0, 0.02)
    reference = nn.MultiheadAttention(embed, scale.heads, dropout=case.dropout_p)
    reference.load_state_dict(fused.state_dict())
    fused, reference = fused.to(device, dtype), reference.to(device, dtype)
    generator = torch.Generator(device="cpu").manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    # DETR: encoder q = k = src + pos, v = src; decoder cross q = tgt + query_pos, k = memory + pos, v = memory
    query = randn(seq_q, scale.batch, embed)
    key = query if case.attention == "encoder" else randn(seq_k, scale.batch, embed)
    value = randn(seq_k, scale.batch, embed)
    grad_out = randn(seq_q, scale.batch, embed)
    calls = {
        "fastdetr.nn.MultiheadAttention": (fused, dict(need_weights=False)),
        "nn.MultiheadAttention": (reference, {}),
        "nn.MultiheadAttention(need_weights=False)": (reference, dict(need_weights=False)),
    }
    benches = {}
    for name, (module, kwargs) in calls.items():
        leaves = {id(t): t.detach().requires_grad_() for t in (query, key, value)}   # q is k for self-attention
        q_in, k_in, v_in = (leaves[id(t)] for t in (query, key, value))

        def forward(module=module, kwargs=kwargs):
            module.eval()
            with torch.no_grad():
                return module(query, key, value, key_padding_mask=mask, **kwargs)[0]

        def train_step(module=module, kwargs=kwargs, q_in=q_in, k_in=k_in, v_in=v_in):
            module.train()
            module(q_in, k_in, v_in, key_padding_mask=mask, **kwargs)[0].backward(grad_out)

        benches[name] = Bench(forward, train_step, list(leaves.values()) + list(module.parameters()))
    return benches


def build(case: Case, scale: Scale, device, dtype=torch.bfloat16) -> dict[str, Bench]:
    """Every provider of PROVIDERS on `case`, with fresh random inputs and one shared key padding mask."""
    mask = key_padding_mask(case, scale, device)
    return {**_kernel_benches(case, scale, device, dtype, mask), **_module_benches(case, scale, device, dtype, mask)}


def check_agreement(benches: dict[str, Bench], tolerance: float = 2e-2) -> dict[str, float]:
    """Relative error of each provider's forward (dropout off) against its level's plain-PyTorch one.

    Raises when one exceeds `tolerance` (shared/DESIGN.md's bf16 gradient bound), or
    when fastdetr.nn.MultiheadAttention falls back to PyTorch's forward: a benchmark
    of different results, or of the wrong code, measures nothing.
    """
    errors = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for level, baseline in ((KERNEL_PROVIDERS, "sdpa"), (MODULE_PROVIDERS, "nn.MultiheadAttention")):
            expected = benches[baseline].forward().double()
            for name in level:
                actual = benches[name].forward().double()
                errors[name] = ((actual - expected).norm() / expected.norm()).item()
                if not errors[name] <= tolerance:
                    raise RuntimeError(f"{name} disagrees with {baseline}: relative error {errors[name]:.3g}")
    fallbacks = [str(w.message) for w in caught if str(w.message).startswith("fastdetr.nn.MultiheadAttention")]
    if fallbacks:
        raise RuntimeError(f"the fused module fell back to PyTorch: {fallbacks[0]}")
    return errors


def measure(case: Case, scale: Scale, device, env: dict, dtype=torch.bfloat16,
            timer: Callable = time_ms, memory: Callable | None = peak_memory_mib) -> list[dict]:
    """Rows of the results table for `case`: time (ms) and, with `memory`, peak memory (MiB) per provider and mode."""
    benches = build(case, scale, device, dtype)
    check_agreement(benches)
    return timed_rows(case.name, case.shape(scale), benches, MODES, env, timer, memory)


def summary_markdown(rows: Sequence[dict]) -> str:
    """results.md, drawn from the table's rows alone."""
    if not rows:
        return "# Attention benchmark\n\nNo results.\n"
    last = rows[-1]
    value = {(r["case"], r["provider"], r["mode"], r["metric"]): r for r in rows}   # the latest run wins
    shapes = {r["case"]: r["shape"] for r in rows}
    cases = list(shapes)
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    out = [f"# Attention benchmark\n\n{last['device']}, torch {last['torch']}, triton {last['triton']}, "
           f"commit {last['git_sha']}, {last['timestamp']}. bf16; p50 of triton.testing.do_bench "
           "(p20-p80 in results.csv).\n"]

    def cell(case, provider, mode, metric="time"):
        row = value.get((case, provider, mode, metric))
        return "" if row is None else f"{row['p50']:.3f}" if metric == "time" else f"{row['p50']:.1f}"

    def ratio(case, mode, provider, baseline):
        a, b = value.get((case, provider, mode, "time")), value.get((case, baseline, mode, "time"))
        return None if a is None or b is None or a["p50"] <= 0 else b["p50"] / a["p50"]

    for mode in MODES:
        out.append(f"\n## {mode}: time (ms)\n\n")
        out.append(markdown_table(["case", "shape"] + providers,
                                  [[c, shapes[c]] + [cell(c, p, mode) for p in providers] for c in cases]))
    if any(r["metric"] == "peak_memory" for r in rows):
        for mode in MODES:
            out.append(f"\n## {mode}: peak memory above the inputs (MiB)\n\n")
            out.append(markdown_table(["case"] + providers,
                                      [[c] + [cell(c, p, mode, "peak_memory") for p in providers] for c in cases]))

    out.append(f"\n## Targets (set for an H100; this run: {last['device']})\n\n")
    target_rows = []
    for mode, provider, baseline, minimum in TARGETS:
        for case in cases:
            speedup = ratio(case, mode, provider, baseline)
            if speedup is not None:
                target_rows.append([mode, case, f"{provider} vs {baseline}", f"{speedup:.2f}x", f">= {minimum}x",
                                    "met" if speedup >= minimum else "missed"])
    out.append(markdown_table(["mode", "case", "speedup of", "measured", "target", ""], target_rows))

    sweep = [c for c in PADDING_SWEEP if c in cases]
    if len(sweep) > 1:
        out.append("\n## Padded-block skipping: time relative to 0 % padding (tail padding; "
                   "skipping shows as ~0.75 and ~0.5)\n\n")
        sweep_rows = []
        for provider in ("fastdetr", "sdpa"):
            for mode in MODES:
                base = value.get((sweep[0], provider, mode, "time"))
                if base is not None:
                    sweep_rows.append([provider, mode] + [
                        f"{value[(c, provider, mode, 'time')]['p50'] / base['p50']:.2f}"
                        if (c, provider, mode, "time") in value else "" for c in sweep])
        out.append(markdown_table(["provider", "mode"] + sweep, sweep_rows))
    return "".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for results.csv and results.md")
    parser.add_argument("--cases", nargs="+", choices=[c.name for c in CASES], help="default: all")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    parser.add_argument("--append", action="store_true", help="add to an existing results.csv")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if args.cases is None or c.name in args.cases]

    if not torch.cuda.is_available():
        for case in cases:
            print(f"skipped {case.name} ({case.shape(DETR_R50)}): no CUDA device")
        print(f"no CUDA device: {len(cases)} cases skipped, nothing written to {args.out}")
        return 0

    device = torch.device("cuda")
    env = environment(device)
    rows = []
    for case in cases:
        print(f"{case.name}: {case.shape(DETR_R50)}", flush=True)
        case_rows = measure(case, DETR_R50, device, env,
                            timer=lambda fn, grad_to_none: time_ms(fn, grad_to_none, args.warmup, args.rep))
        for row in case_rows:
            if row["metric"] == "time":
                print(f"  {row['provider']:<42} {row['mode']:<8} {row['p50']:8.3f} ms", flush=True)
        rows += case_rows
    csv_path, md_path = write_results(rows, args.out, summary_markdown, append=args.append)
    print(f"wrote {csv_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
