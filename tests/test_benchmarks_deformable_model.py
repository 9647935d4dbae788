"""benchmarks/model.py's Deformable-DETR-R50 case (issue 18) on the CPU: a tiny deformable_detr_small through
Triton's interpreter runs both modes of the reference and fused providers, and the fused outputs agree."""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import model as bench  # noqa: E402
from benchmarks.common import environment  # noqa: E402
from fastdetr.backend import interpreter_enabled  # noqa: E402

needs_interpreter = pytest.mark.skipif(not interpreter_enabled(),
                                       reason="the fused providers need TRITON_INTERPRET=1 on the CPU")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is as fast, and two spin-wait whenever another process holds a core (as
    tests/conftest.py does for pytest-xdist's workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _wall(fn, warmup=0, rep=0):
    start = time.perf_counter()
    fn()
    elapsed = (time.perf_counter() - start) * 1e3
    return elapsed, elapsed, elapsed


def _measure(providers):
    rows = bench.measure_deformable("cpu", environment("cpu"), providers=providers, timer=_wall, memory=None,
                                    scale=bench.DEFORMABLE_SMOKE)
    assert {r["case"] for r in rows} == {bench.DEFORMABLE_CASE}
    times = {(r["provider"], r["mode"]): r for r in rows if r["metric"] == "time"}
    assert set(times) == {(p, m) for p in providers for m in bench.MODES}
    assert all(math.isfinite(r["p50"]) and r["p50"] > 0 for r in times.values())
    for provider in providers:   # each mode at its own batch and images
        assert "B=1 images 24x40" in times[(provider, "inference")]["shape"]
        assert "B=2 images 24x40 / 16x32" in times[(provider, "train_step")]["shape"]
    errors = {r["provider"]: r for r in rows if r["metric"] == "rel_error"}
    assert set(errors) == set(providers) - {"reference-fp32"}
    assert all(r["mode"] == "inference" and r["unit"] == "vs reference-fp32" for r in errors.values())
    return rows, {p: r["p50"] for p, r in errors.items()}


@needs_interpreter
def test_fp32_providers_time_both_modes_and_agree():
    """fastdetr-fp32 against reference-fp32 at the same precision: the outputs within the fp32 tolerance."""
    rows, errors = _measure(("reference-fp32", "fastdetr-fp32"))
    assert 0 <= errors["fastdetr-fp32"] <= bench.DEFORMABLE_FP32_TOLERANCE
    summary = bench.summary_markdown(rows)
    assert "## Deformable-DETR-R50: inference and training step" in summary
    assert "its times are not GPU times" in summary
    assert "- inference: deformable_detr_small B=1 images 24x40" in summary
    assert "| fastdetr-fp32 |" in summary and "| yes |" in summary
    for mode in bench.MODES:
        assert f"| {mode} | fastdetr-fp32 vs reference-fp32 |" in summary
    assert "# DETR-R50: inference and training step" not in summary   # no DETR rows, no DETR section


@needs_interpreter
def test_bf16_providers_time_both_modes_and_agree():
    """Under bf16 autocast the fused model's error against reference-fp32 is at most twice the reference's own."""
    rows, errors = _measure(("reference-fp32", "reference-bf16", "fastdetr-bf16"))
    assert 0 < errors["reference-bf16"] and errors["fastdetr-bf16"] <= 2 * errors["reference-bf16"]
    summary = bench.summary_markdown(rows)
    for mode in bench.MODES:
        assert f"| {mode} | fastdetr-bf16 vs reference-bf16 |" in summary
        assert f"| {mode} | fastdetr-bf16 vs reference-fp32 |" in summary


def test_summary_states_the_speedups_from_the_rows():
    """Rows shaped as a GPU run writes them (made-up times and errors, a made-up device name)."""
    env = dict(environment("cpu"), device="made-up device")
    scale = bench.DEFORMABLE_R50
    times = {("reference-fp32", "inference"): 60.0, ("fastdetr-fp32", "inference"): 30.0,
             ("reference-bf16", "train_step"): 300.0, ("fastdetr-bf16", "train_step"): 120.0,
             ("reference-fp32", "train_step"): 480.0}
    rows = [bench._deformable_row(p, mode, "time", "ms", scale, (t, t, t), env) for (p, mode), t in times.items()]
    rows += [bench._deformable_row(p, "inference", "rel_error", "vs reference-fp32", scale, (e, e, e), env)
             for p, e in (("reference-bf16", 4e-3), ("fastdetr-fp32", 3e-6), ("fastdetr-bf16", 1e-2))]
    rows.append(bench._deformable_row("reference-bf16+compile", "train_step", "error", "RuntimeError: no", scale,
                                      (math.nan,) * 3, env))
    summary = bench.summary_markdown(rows)
    assert "made-up device" in summary and "not GPU times" not in summary
    assert "- inference: deformable_detr_resnet50 B=1 images 800x1333" in summary
    assert "- train_step: deformable_detr_resnet50 B=2 images 800x1333 / 768x1152" in summary
    assert "| inference | fastdetr-fp32 vs reference-fp32 | 2.00x |" in summary
    assert "| train_step | fastdetr-bf16 vs reference-bf16 | 2.50x |" in summary
    assert "| train_step | fastdetr-bf16 vs reference-fp32 | 4.00x |" in summary
    assert "| fastdetr-fp32 | 3.00e-06 | yes |" in summary
    assert "| fastdetr-bf16 | 1.00e-02 | no: above 2x reference-bf16's |" in summary
    assert "- reference-bf16+compile train_step: RuntimeError: no" in summary


def test_rows_go_to_the_model_suite_and_the_readme_table():
    from benchmarks import readme_table, run

    assert run._suite_of({"case": bench.DEFORMABLE_CASE}) == "model"
    assert any(case == bench.DEFORMABLE_CASE for case, *_ in readme_table.COMPARISONS)
