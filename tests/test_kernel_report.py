"""The ahead-of-time compile report: every kernel configuration compiles for sm_80 / sm_90 without spills."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


def _report(*args: str, tmp_path: Path) -> tuple[int, str, list[dict]]:
    out = tmp_path / "report.json"
    env = dict(os.environ, PYTHONPATH=str(FIXTURES))
    proc = subprocess.run([sys.executable, "-m", "fastdetr.kernels.report", "--json", str(out), *args],
                          capture_output=True, text=True, env=env, timeout=900)
    rows = json.loads(out.read_text()) if out.exists() else []
    return proc.returncode, proc.stdout + proc.stderr, rows


def test_every_kernel_config_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    code, output, rows = _report(tmp_path=tmp_path)
    assert code == 0, output
    modules = {"attention", "assignment", "linear_layernorm", "linear_relu", "in_projection"}
    assert {row["module"] for row in rows} == modules
    assert {row["target"] for row in rows} == {"sm_80", "sm_90"}
    for row in rows:
        assert row["ok"] and row["spill_bytes"] == 0 and row["registers"] <= 255, row
    # half-precision attention uses tensor cores: wgmma on sm_90, mma on sm_80
    attention = [r for r in rows if r["module"] == "attention" and r["config"].startswith(("fp16", "bf16"))]
    assert attention and all(r["tensor_cores"] in ("mma", "wgmma") for r in attention)


def test_a_spilling_kernel_fails_the_report(tmp_path):
    code, output, rows = _report("--modules", "spilling_kernel", "--targets", "80", tmp_path=tmp_path)
    if rows and rows[0]["spill_bytes"] is None:
        pytest.skip("the Triton wheel has no cuobjdump: spills cannot be read")
    assert code == 1, output
    assert "SPILL" in output and rows[0]["spill_bytes"] > 0
