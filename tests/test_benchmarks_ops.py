"""benchmarks/ops.py: the smoke run (tiny shapes through the interpreter) times every op and mode."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import ops  # noqa: E402
from benchmarks.common import read_csv  # noqa: E402
from fastdetr.backend import interpreter_enabled  # noqa: E402


@pytest.mark.skipif(not interpreter_enabled(), reason="the fused provider needs TRITON_INTERPRET=1 on the CPU")
@pytest.mark.slow  # make test's GPU-suite dry run (tests/test_gpu_suite.py) runs this smoke mode too
def test_smoke_run(tmp_path):
    assert ops.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "results.csv")
    times = {(r["case"], r["provider"], r["mode"]) for r in rows if r["metric"] == "time"}
    for op in ("in_projection", "linear_relu", "linear_residual_layernorm"):
        assert {(op, p, m) for p in ("fastdetr", "eager") for m in ops.MODES} <= times
    assert ("ffn_inference", "fastdetr", "fwd") in times and ("matching_cost", "eager", "fwd") in times
    assert all(r["p50"] > 0 for r in rows)
    assert "linear_relu" in (tmp_path / "results.md").read_text()
