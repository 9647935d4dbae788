"""benchmarks/deformable_attention.py: measured on a GPU only; here, the shapes it states, the smoke run (tiny
shapes through Triton's interpreter) with every provider and mode a CPU runs, the summary's targets, the call
convention of the official op's wrapper, and the runner's routing."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import deformable_attention as msda  # noqa: E402
from benchmarks import run  # noqa: E402
from benchmarks.common import COLUMNS, read_csv  # noqa: E402
from fastdetr.backend import interpreter_enabled  # noqa: E402
from fastdetr.reference.deformable_attention import ms_deform_attn  # noqa: E402

ENV = dict(device="NVIDIA H200", git_sha="abc", torch="2.11", triton="3.6", timestamp="t")


def test_level_shapes_are_the_input_over_each_stride_rounded_up():
    cases = {case.name: case for case in msda.CASES}
    encoder = cases["msda_deformable_detr_encoder"]
    assert encoder.spatial_shapes == ((100, 167), (50, 84), (25, 42), (13, 21))
    assert encoder.num_queries == encoder.tokens == 22223
    assert cases["msda_deformable_detr_decoder"].spatial_shapes == encoder.spatial_shapes
    assert cases["msda_dino_decoder"].num_queries == 900
    rtdetr = cases["msda_rtdetr_decoder"]
    assert rtdetr.spatial_shapes == ((80, 80), (40, 40), (20, 20)) and rtdetr.tokens == 8400
    assert {(c.batch, c.heads, c.points, c.head_dim) for c in msda.CASES} == {(2, 8, 4, 32)}
    assert set(msda.QUICK_CASES) <= set(cases)


def test_inputs_sample_near_their_reference_points():
    case = msda.SMOKE_CASES[0]
    inputs = msda.op_inputs(case, "cpu", "bf16")
    n, lq, m, levels, p = case.batch, case.num_queries, case.heads, case.levels, case.points
    assert inputs.value.shape == (n, case.tokens, m, case.head_dim) and inputs.value.dtype == torch.bfloat16
    assert inputs.locations.shape == (n, lq, m, levels, p, 2) and inputs.locations.dtype == torch.float32
    assert torch.allclose(inputs.weights.float().sum((-2, -1)), torch.ones(n, lq, m), atol=1e-2)
    assert inputs.starts.tolist() == [0, 6] and inputs.shapes.tolist() == [[2, 3], [1, 2]]


def test_skips_without_a_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the script would measure, not skip")
    assert msda.main(["--out", str(tmp_path / "out"), "--quick"]) == 0
    printed = capsys.readouterr().out
    assert all(f"skipped {name} (N=2" in printed for name in msda.QUICK_CASES)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not interpreter_enabled(), reason="the Triton providers need TRITON_INTERPRET=1 on the CPU")
def test_smoke_run_writes_every_cpu_provider_and_mode(tmp_path):
    assert msda.main(["--smoke", "--out", str(tmp_path)]) == 0
    assert tuple((tmp_path / "results.csv").read_text().splitlines()[0].split(",")) == COLUMNS
    rows = read_csv(tmp_path / "results.csv")
    times = {(r["case"], r["provider"], r["mode"]) for r in rows if r["metric"] == "time"}
    on_cpu = [p.name for p in msda.PROVIDERS if p.kind != "cuda-op"]
    assert times == {(c.name, p, m) for c in msda.SMOKE_CASES for p in on_cpu for m in msda.MODES}
    assert all(r["p50"] > 0 for r in rows if r["metric"] == "time")
    unavailable = [r for r in rows if r["metric"] == "unavailable"]
    assert {r["provider"] for r in unavailable} == {"cuda-op-fp32"}
    assert all("CUDA" in r["unit"] for r in unavailable)
    summary = (tmp_path / "results.md").read_text()
    assert all(target.goal in summary for target in msda.TARGETS)
    assert "cuda-op-fp32 not measured" in summary and "peak memory not measured" in summary


def _row(case, provider, mode, metric, p50):
    return dict(case=case, provider=provider, mode=mode, metric=metric, unit="ms" if metric == "time" else "MiB",
                shape="s", p50=p50, p20=p50, p80=p50, **ENV)


def test_summary_of_gpu_rows_gives_the_measured_ratios_against_the_targets():
    case = "msda_deformable_detr_encoder"
    measured = [("grid_sample-bf16", "fwd+bwd", "time", 10.0), ("fastdetr-bf16", "fwd+bwd", "time", 1.0),
                ("grid_sample-fp32", "fwd+bwd", "time", 12.0), ("fastdetr-fp32", "fwd+bwd", "time", 4.0),
                ("cuda-op-fp32", "fwd+bwd", "time", 5.0), ("grid_sample-fp32", "fwd", "peak_memory", 1000.0),
                ("fastdetr-fp32", "fwd", "peak_memory", 50.0)]
    rows = [_row(case, *row) for row in measured]
    summary = msda.summary_markdown(rows)
    assert all(target.goal in summary for target in msda.TARGETS)
    lines = summary.splitlines()

    def line_with(*parts):
        return next(line for line in lines if all(part in line for part in parts))

    assert line_with("fastdetr-bf16 over grid_sample-bf16", "10.00x", ">= 5x").endswith("| met |")
    assert line_with("fastdetr-fp32 over grid_sample-fp32", "3.00x").endswith("| missed |")
    assert line_with("fastdetr-fp32 over cuda-op-fp32", "1.25x", ">= 1x").endswith("| met |")
    assert line_with("peak memory of fastdetr-fp32 / grid_sample-fp32", "0.05x", "<= 0.2x").endswith("| met |")
    assert "not measured" not in summary


def test_the_runner_routes_the_rows_to_this_summary():
    assert "deformable_attention" in {suite.name for suite in run.SUITES} and "deformable_attention" in run.RUNNERS
    rows = [_row(case.name, "fastdetr-fp32", "fwd", "time", 1.0) for case in msda.CASES + msda.SMOKE_CASES]
    assert {run._suite_of(row) for row in rows} == {"deformable_attention"}
    assert "Multi-scale deformable attention benchmark" in run.summary_markdown(rows)


def test_the_official_op_wrapper_passes_arguments_as_deformable_detr_does():
    """A stand-in extension with the official signatures (backed by the reference): the wrapper's forward and
    gradients must be the reference's."""
    def forward(value, shapes, starts, locations, weights, im2col_step):
        assert im2col_step == msda.IM2COL_STEP
        return ms_deform_attn(value, shapes, starts, locations, weights)

    def backward(value, shapes, starts, locations, weights, grad_out, im2col_step):
        leaves = [t.detach().requires_grad_() for t in (value, locations, weights)]
        with torch.enable_grad():   # a backward runs with grad mode off
            out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2])
        return list(torch.autograd.grad(out, leaves, grad_out))

    extension = types.SimpleNamespace(ms_deform_attn_forward=forward, ms_deform_attn_backward=backward)
    inputs = msda.op_inputs(msda.SMOKE_CASES[1], "cpu", "fp32")
    leaves = [t.detach().requires_grad_() for t in (inputs.value, inputs.locations, inputs.weights)]
    wrapped = msda._OfficialMSDA.apply(extension, leaves[0], inputs.shapes, inputs.starts, leaves[1], leaves[2])
    expected = ms_deform_attn(leaves[0], inputs.shapes, inputs.starts, leaves[1], leaves[2])
    assert torch.equal(wrapped, expected)
    for ours, theirs in zip(torch.autograd.grad(wrapped, leaves, inputs.grad_out),
                            torch.autograd.grad(expected, leaves, inputs.grad_out)):
        assert torch.allclose(ours, theirs)
    assert msda.official_extension("cpu")[0] is None
