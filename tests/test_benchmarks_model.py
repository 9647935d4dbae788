"""benchmarks/model.py on the CPU: a tiny detr_small through Triton's interpreter runs every mode of two providers."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import model as bench  # noqa: E402
from benchmarks.common import environment  # noqa: E402
from fastdetr.backend import interpreter_enabled  # noqa: E402


def _wall(fn, warmup=0, rep=0):
    start = time.perf_counter()
    fn()
    elapsed = (time.perf_counter() - start) * 1e3
    return elapsed, elapsed, elapsed


@pytest.mark.skipif(not interpreter_enabled(), reason="the fused provider needs TRITON_INTERPRET=1 on the CPU")
@pytest.mark.slow  # make test's GPU-suite dry run (tests/test_gpu_suite.py) runs this smoke mode too
def test_smoke_rows_and_summary():
    rows = bench.measure(2, "cpu", environment("cpu"), providers=("reference-fp32", "fastdetr-bf16"),
                         timer=_wall, memory=None, scale=bench.SMOKE)
    metrics = {(r["provider"], r["mode"], r["metric"]) for r in rows}
    for provider in ("reference-fp32", "fastdetr-bf16"):
        for mode in bench.MODES:
            assert {(provider, mode, "time"), (provider, mode, "tflops")} <= metrics
    assert all(r["p50"] > 0 for r in rows)
    summary = bench.summary_markdown(rows)
    assert "fastdetr-bf16 vs reference-fp32" in summary


def test_without_a_gpu_it_skips(capsys, tmp_path):
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is present: the real run would start")
    assert bench.main(["--out", str(tmp_path)]) == 0
    assert "no CUDA device" in capsys.readouterr().out and not any(tmp_path.iterdir())


@pytest.mark.skipif(not interpreter_enabled(), reason="the fused provider needs TRITON_INTERPRET=1 on the CPU")
def test_transformers_finetune_smoke_rows_and_summary():
    pytest.importorskip("transformers", reason="transformers is a dev dependency")
    rows = bench.measure_transformers(2, "cpu", environment("cpu"), timer=_wall, memory=None, scale=bench.HF_SMOKE)
    assert {(r["case"], r["provider"], r["mode"], r["metric"]) for r in rows} == {
        (bench.HF_CASE, provider, bench.HF_MODE, "time") for provider in bench.HF_PROVIDERS}
    assert all(r["p50"] > 0 for r in rows)
    summary = bench.summary_markdown(rows)
    assert "transformers DETR-R50 fine-tuning step" in summary
    assert "at least 1.5x the faster transformers provider's training step" in summary
    assert "peak memory not measured" in summary
