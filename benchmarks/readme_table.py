"""The README's performance table, generated from the newest committed GPU results.

    python benchmarks/readme_table.py [--check]

Finds the newest `benchmarks/results/<date>-<gpu>/results.csv` written by
benchmarks/run.py on a GPU (folders whose rows name a CUDA device; CPU-only
folders are skipped), and rewrites the README between the markers
`<!-- perf-table:begin -->` and `<!-- perf-table:end -->`: the device, the
date and commit, and fastdetr's speedups from that table. With no GPU result
committed the section says so. `--check` exits 1 when the README is not what
this would write (`make test` runs it, so the table cannot go stale).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):   # run as `python benchmarks/readme_table.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import markdown_table, read_csv  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- perf-table:begin -->", "<!-- perf-table:end -->"
# (case, mode, fastdetr provider, baseline provider) rows of the table, when present in the results
COMPARISONS = (
    ("detr_r50", "train_step", "fastdetr-bf16", "reference-bf16"),
    ("detr_r50", "train_step", "fastdetr-bf16", "reference-bf16+compile"),
    ("detr_r50", "inference", "fastdetr-bf16", "reference-bf16"),
    ("transformer", "fwd+bwd", "fastdetr", "reference"),
    ("transformer", "fwd+bwd", "fastdetr", "reference+torch.compile"),
    ("encoder_pad25", "fwd+bwd", "fastdetr", "sdpa"),
    ("deformable_detr_r50", "train_step", "fastdetr-bf16", "reference-bf16"),
    ("deformable_detr_r50", "train_step", "fastdetr-fp32", "reference-fp32"),
    ("deformable_detr_r50", "inference", "fastdetr-bf16", "reference-bf16"),
    ("msda_deformable_detr_encoder", "fwd+bwd", "fastdetr-bf16", "grid_sample-bf16"),
    ("msda_deformable_detr_encoder", "fwd+bwd", "fastdetr-fp32", "cuda-op-fp32"),
    ("detr", "step", "fastdetr-triton", "original"),
    ("dino", "step", "fastdetr-triton", "original"),
)


def newest_gpu_results(results_root: Path) -> tuple[Path, list[dict]] | None:
    """(folder, rows) of the newest results.csv whose rows were measured on a CUDA device, or None."""
    candidates = []
    for csv_path in results_root.glob("*/results.csv"):
        rows = read_csv(csv_path)
        if rows and not rows[0]["device"].startswith("cpu"):
            candidates.append((max(r["timestamp"] for r in rows), csv_path.parent, rows))
    if not candidates:
        return None
    _, folder, rows = max(candidates, key=lambda item: item[0])
    return folder, rows


def render(results_root: Path) -> str:
    found = newest_gpu_results(results_root)
    if found is None:
        return ("No GPU result is committed yet: this table is generated from the newest "
                "`benchmarks/results/<date>-<gpu>/results.csv` that `benchmarks/gpu_suite.sh` writes.\n")
    folder, rows = found
    time = {(r["case"], r["mode"], r["provider"]): r["p50"] for r in rows if r["metric"] == "time"}
    lines = []
    for case, mode, provider, baseline in COMPARISONS:
        if (case, mode, provider) in time and (case, mode, baseline) in time:
            ours, theirs = time[(case, mode, provider)], time[(case, mode, baseline)]
            lines.append([case, mode, f"{baseline}: {theirs:.2f} ms", f"{provider}: {ours:.2f} ms",
                          f"{theirs / ours:.2f}x"])
    last = rows[-1]
    header = (f"Measured on **{last['device']}** ({last['timestamp'][:10]}, commit {last['git_sha']}, "
              f"torch {last['torch']}, triton {last['triton']}); all of it in "
              f"`{folder.relative_to(REPO) if folder.is_relative_to(REPO) else folder}/results.md`.\n\n")
    return header + markdown_table(["case", "mode", "baseline", "fastdetr", "speedup"], lines)


def rewrite(readme: str, table: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise ValueError(f"README: the markers {BEGIN} and {END} are missing")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table}{END}{tail}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the README's table is stale")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    current = args.readme.read_text()
    updated = rewrite(current, render(args.results))
    if args.check:
        if updated != current:
            print(f"{args.readme}: the performance table is stale; run python benchmarks/readme_table.py")
            return 1
        return 0
    args.readme.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
