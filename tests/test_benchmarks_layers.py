"""benchmarks/layers.py: measured on a GPU only; here, that every path of it runs and writes what it says.

The smoke run (tiny shapes through Triton's interpreter) goes through the script
as a user runs it; the torch.compile guard is checked with a compile that fails
on purpose; the no-GPU run must skip cleanly.
"""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdetr.backend import triton_importable

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "layers.py"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks import layers

    return layers


def test_skips_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the script would measure, not skip")
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    for case in ("transformer", "encoder", "decoder"):
        assert f"skipped {case} (B=8 S=950 (25x38, image padding)" in run.stdout
    assert not out.exists()   # no numbers without a GPU


@pytest.mark.skipif(not triton_importable(), reason="the smoke run needs Triton's interpreter")
@pytest.mark.slow  # make test's GPU-suite dry run (tests/test_gpu_suite.py) runs this smoke mode too
def test_smoke_run_writes_the_table(tmp_path, bench):
    """The whole transformer case, reference and fastdetr, both modes, one timed call each: the
    providers agree (measure() checks it, fallback included) and the CSV and summary come out."""
    from benchmarks.common import COLUMNS, read_csv

    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--cases", "transformer",
                          "--providers", "reference", "fastdetr", "--warmup", "0", "--rep", "1"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    assert tuple((out / "results.csv").read_text().splitlines()[0].split(",")) == COLUMNS
    rows = read_csv(out / "results.csv")
    assert {(r["case"], r["provider"], r["mode"], r["metric"]) for r in rows} == {
        ("transformer", provider, mode, "time") for provider in ("reference", "fastdetr")
        for mode in ("fwd", "fwd+bwd")}
    assert len(rows) == 4
    assert all(r["unit"] == "ms" and r["p50"] > 0 and r["device"] == "cpu (Triton interpreter)" for r in rows)
    assert all("B=2 S=15 (3x5, image padding) Q=4 d=64 h=2 ffn=128 2+2 layers float32" in r["shape"] for r in rows)
    summary = (out / "results.md").read_text()
    assert "# Transformer layer benchmark" in summary and "say nothing about speed" in summary
    assert "| transformer | speedup vs reference |" in summary


def test_a_failing_compile_becomes_an_error_row(bench, monkeypatch, tmp_path):
    """torch.compile that raises on the first call: the compiled provider gets an error row with the
    reason, the others are measured. No fastdetr provider here, so nothing runs through the interpreter."""
    from benchmarks.common import read_csv, write_csv

    class BrokenCompile(torch.nn.Module):   # what torch.compile returns: a wrapper sharing the parameters
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **inputs):
            raise RuntimeError("inductor is not available here\nsecond line")

    monkeypatch.setattr(torch, "compile", BrokenCompile)
    env = dict(device="cpu", git_sha="test", torch=torch.__version__, triton="test", timestamp="test")
    calls = []

    def run_once(fn, grad_to_none=None):
        calls.append(fn())
        return 1.0, 1.0, 1.0

    rows = bench.measure("encoder", bench.SMOKE, "cpu", env, torch.float32,
                         providers=("reference", bench.COMPILED), timer=run_once, memory=None)
    errors = [r for r in rows if r["metric"] == "error"]
    assert len(errors) == 1 and errors[0]["provider"] == bench.COMPILED
    assert errors[0]["unit"] == "RuntimeError: inductor is not available here" and math.isnan(errors[0]["p50"])
    assert {(r["provider"], r["mode"]) for r in rows if r["metric"] == "time"} == {("reference", "fwd"),
                                                                                   ("reference", "fwd+bwd")}
    assert len(calls) == 2
    summary = bench.summary_markdown(read_csv(write_csv(rows, tmp_path / "results.csv")))
    assert "## Errors" in summary and "inductor is not available here" in summary


def test_image_padding_mask_pads_what_detr_pads(bench):
    mask = bench.image_padding_mask(bench.DETR_R50, "cpu")
    assert mask.shape == (8, 25, 38)
    assert mask[0, :, -9:].all() and not mask[0, :, :-9].any()    # even images: the right quarter of each row
    assert mask[1, -6:, :].all() and not mask[1, :-6, :].any()    # odd images: the bottom quarter of the rows
    assert not mask.flatten(1).all(dim=1).any()


def test_wall_time_quantiles(bench):
    p50, p20, p80 = bench.wall_time_ms(lambda: None, warmup=0, rep=5)
    assert 0 <= p20 <= p50 <= p80
