"""What every fastdetr benchmark shares: timing, the environment stamp, and the long-format results table.

One row per measurement (case, provider, mode, metric) in `results.csv`, with the
machine and versions on every row, so tables from several runs and several
benchmarks concatenate, and every plot or summary is drawn from the table alone
(Liger-Kernel's benchmark layout). Nothing here touches a GPU at import.
"""
from __future__ import annotations

import csv
import datetime
import os
import subprocess
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

COLUMNS = ("case", "provider", "mode", "metric", "unit", "shape", "p50", "p20", "p80",
           "device", "git_sha", "torch", "triton", "timestamp")
QUANTILES = (0.5, 0.2, 0.8)   # the order do_bench returns them in: p50, p20, p80


def git_sha(repo: Path | None = None) -> str:
    """Short commit of the repository holding this file, "+dirty" when tracked files differ.

    Outside git (a copy of the tree without .git, as a lent GPU machine gets) it is
    $FASTDETR_GIT_SHA when set (the commit the copy was made from), else "unknown".
    """
    repo = repo or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=repo, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("FASTDETR_GIT_SHA") or "unknown"
    return sha + ("+dirty" if dirty else "")


def environment(device: torch.device | str = "cuda") -> dict:
    """The columns that say where and with what a row was measured (device, git_sha, torch, triton, timestamp)."""
    import triton

    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return dict(device=name, git_sha=git_sha(), torch=torch.__version__, triton=triton.__version__,
                timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def time_ms(fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor] | None = None,
            warmup: int = 25, rep: int = 100) -> tuple[float, float, float]:
    """(p50, p20, p80) milliseconds of `fn` on the current CUDA device, by triton.testing.do_bench.

    warmup / rep are milliseconds of GPU time. `grad_to_none` tensors get .grad = None
    before each call, so a backward pass never accumulates into old gradients.
    """
    import triton.testing

    p50, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                                            quantiles=list(QUANTILES))
    return p50, p20, p80


def peak_memory_mib(fn: Callable[[], object]) -> float:
    """MiB that one call of `fn` allocates on the current CUDA device above what was live before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def bench_metrics(bench, mode: str, timer: Callable = time_ms,
                  memory: Callable | None = peak_memory_mib) -> list[tuple[str, str, tuple]]:
    """[(metric, unit, (p50, p20, p80))] of one provider's mode: time (ms) and, with `memory`, peak memory (MiB).

    bench: an object with `forward()` and `train_step()` callables and `grads`, the tensors whose .grad is
    cleared between timed calls. Mode "fwd" times forward, any other train_step.
    """
    fn = bench.forward if mode == "fwd" else bench.train_step
    metrics = [("time", "ms", timer(fn, grad_to_none=None if mode == "fwd" else bench.grads))]
    if memory is not None:
        for tensor in bench.grads:
            tensor.grad = None
        peak = memory(fn)
        metrics.append(("peak_memory", "MiB", (peak, peak, peak)))
    return metrics


def timed_rows(case: str, shape: str, benches: dict, modes: Sequence[str], env: dict,
               timer: Callable = time_ms, memory: Callable | None = peak_memory_mib) -> list[dict]:
    """Results-table rows of every (provider, mode) of `benches` (provider -> bench): `bench_metrics`."""
    rows = []
    for provider, bench in benches.items():
        for mode in modes:
            for metric, unit, (p50, p20, p80) in bench_metrics(bench, mode, timer, memory):
                rows.append(dict(case=case, provider=provider, mode=mode, metric=metric, unit=unit, shape=shape,
                                 p50=p50, p20=p20, p80=p80, **env))
    return rows


def write_csv(rows: Iterable[dict], path: Path, append: bool = False) -> Path:
    """Write `rows` (dicts with every key of COLUMNS, and no other) to `path` as CSV.

    append=True adds to an existing table (its header must be COLUMNS) instead of replacing it.
    """
    rows = list(rows)
    for row in rows:
        if set(row) != set(COLUMNS):
            raise ValueError(f"results row has columns {sorted(row)}; expected {list(COLUMNS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    exists = append and path.exists() and path.stat().st_size > 0
    if exists:
        with path.open(newline="") as existing:
            header = next(csv.reader(existing), None)
        if tuple(header or ()) != COLUMNS:
            raise ValueError(f"{path}: header {header} is not {list(COLUMNS)}; cannot append")
    with path.open("a" if exists else "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        if not exists:
            writer.writeheader()
        writer.writerows(rows)
    return path


def write_results(rows: Iterable[dict], out: Path, summary_markdown: Callable[[list[dict]], str],
                  append: bool = False) -> tuple[Path, Path]:
    """out/results.csv (`write_csv`) and out/results.md, drawn from the whole CSV by `summary_markdown`; both paths."""
    csv_path = write_csv(rows, Path(out) / "results.csv", append=append)
    md_path = Path(out) / "results.md"
    md_path.write_text(summary_markdown(read_csv(csv_path)))
    return csv_path, md_path


def read_csv(path: Path) -> list[dict]:
    """The rows of a results table, p50/p20/p80 as floats."""
    with Path(path).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key in ("p50", "p20", "p80"):
            row[key] = float(row[key])
    return rows


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
