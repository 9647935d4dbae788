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


GEMM_KERNELS = ("_linear_layernorm_fwd_kernel", "_linear_relu_fwd_kernel", "_in_projection_fwd_kernel",
                "_ffn_fwd_kernel")


# One ahead-of-time compile of every configuration, in parts: make test compiles what DETR's own tensors get
# on Hopper (sm_90, aligned: the JIT's divisibility hints), the slow set the rest (CI runs both). With Triton's
# cache empty, as on a fresh machine, a compile takes ~0.5 s of CPU: ~100 per part and alignment.
@pytest.mark.parametrize("target, alignments", [
    ("90", ("aligned",)),
    pytest.param("90", ("generic",), marks=pytest.mark.slow),
    pytest.param("80", ("generic", "aligned"), marks=pytest.mark.slow),
])
def test_every_kernel_config_compiles_without_spills(tmp_path, target, alignments):
    code, output, rows = _report("--targets", target, "--alignments", *alignments, tmp_path=tmp_path)
    assert code == 0, output
    modules = {"attention", "assignment", "linear_layernorm", "linear_relu", "in_projection", "ffn", "matching_cost",
               "deformable_attention"}
    assert {row["module"] for row in rows} == modules
    assert {row["target"] for row in rows} == {f"sm_{target}"}
    # "generic": what an odd shape compiles to; "aligned": what DETR's aligned tensors get
    assert {row["alignment"] for row in rows} == set(alignments)
    for row in rows:
        assert row["ok"] and row["spill_bytes"] == 0 and row["registers"] <= 255, row
    # half-precision attention uses tensor cores: wgmma on sm_90, mma on sm_80
    attention = [r for r in rows if r["module"] == "attention" and r["config"].startswith(("fp16", "bf16"))]
    assert attention and all(r["tensor_cores"] in ("mma", "wgmma") for r in attention)
    # the 16-bit GEMM kernels run on tensor cores; on sm_90 as wgmma, except linear_layernorm's
    # dropout and residual-only forward variants, which spill at wgmma's BLOCK_M = 64 and run mma.sync
    gemms = [r for r in rows if r["kernel"] in GEMM_KERNELS and r["config"].startswith(("fp16", "bf16"))]
    assert {r["kernel"] for r in gemms} == set(GEMM_KERNELS)
    for row in gemms:
        mma_variant = row["kernel"] == "_linear_layernorm_fwd_kernel" and (
            "DROPOUT=True" in row["config"] or "APPLY_NORM=False" in row["config"])
        expected = "wgmma" if row["target"] == "sm_90" and not mma_variant else "mma"
        assert row["tensor_cores"] == expected, row


def test_a_spilling_kernel_fails_the_report(tmp_path):
    code, output, rows = _report("--modules", "spilling_kernel", "--targets", "80", tmp_path=tmp_path)
    if rows and rows[0]["spill_bytes"] is None:
        pytest.skip("the Triton wheel has no cuobjdump: spills cannot be read")
    assert code == 1, output
    assert "SPILL" in output and rows[0]["spill_bytes"] > 0
