"""benchmarks/convergence.py: the fused model trains step for step like the reference, and the results are written.

The CPU check (tiny DETR, float32, no dropout, 20 steps, fused kernels through
Triton's interpreter) runs once for the module; the tests read its Comparison
and the files it wrote.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import convergence as bench  # noqa: E402
from benchmarks.common import COLUMNS, read_csv  # noqa: E402
from fastdetr.backend import interpreter_enabled, triton_importable  # noqa: E402

needs_interpreter = pytest.mark.skipif(
    not (triton_importable() and interpreter_enabled()),
    reason="the CPU check runs the fused kernels through Triton's interpreter (TRITON_INTERPRET=1)",
)
STEPS = 20
SELF_ATTENTION_LAYERS = 1 + 2   # the check's encoder + decoder layers, one in_projection call each per forward


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    """The CPU check, run once: (Comparison, out dir, in_projection calls, ids of the attention modules called)."""
    import fastdetr.kernels.in_projection as in_projection_module

    original_projection = in_projection_module.in_projection
    original_attention = torch.nn.MultiheadAttention.forward
    projections = [0]
    attention_called: set[int] = set()

    def counted_projection(*args, **kwargs):
        projections[0] += 1
        return original_projection(*args, **kwargs)

    def recorded_attention(self, *args, **kwargs):
        attention_called.add(id(self))
        return original_attention(self, *args, **kwargs)

    out = tmp_path_factory.mktemp("convergence")
    with pytest.MonkeyPatch.context() as patch:
        # The fused layers import in_projection when called, so the patched name is the one they run.
        patch.setattr(in_projection_module, "in_projection", counted_projection)
        patch.setattr(torch.nn.MultiheadAttention, "forward", recorded_attention)
        comparison = bench.cpu_check(out=out / "results", data_dir=out / "data", steps=STEPS)
    return comparison, out / "results", projections[0], attention_called


@needs_interpreter
@pytest.mark.slow  # the 20-step CPU check, twice through the interpreter; make test's GPU-suite dry run runs one step
def test_fused_losses_equal_the_reference_step_by_step(check):
    comparison, *_ = check
    reference, fused = comparison.runs["reference"].losses, comparison.runs["fastdetr"].losses
    assert len(reference) == len(fused) == STEPS
    assert all(math.isfinite(loss) for loss in reference + fused)
    gaps = [abs(f - r) / abs(r) for r, f in zip(reference, fused)]
    print(f"max relative loss gap over {STEPS} steps: {max(gaps):.3e}")
    assert max(gaps) <= bench.CPU_LOSS_BOUND
    assert comparison.max_relative_gap == pytest.approx(max(gaps))
    # the two runs saw the same batches (compare() raises otherwise; the fingerprints say so directly)
    assert comparison.runs["reference"].fingerprints == comparison.runs["fastdetr"].fingerprints


@needs_interpreter
@pytest.mark.slow  # the 20-step CPU check, twice through the interpreter; make test's GPU-suite dry run runs one step
def test_the_loss_decreases(check):
    comparison, *_ = check
    for provider, run in comparison.runs.items():
        losses = run.losses
        steps = torch.arange(len(losses), dtype=torch.float64)
        values = torch.tensor(losses, dtype=torch.float64)
        slope = ((steps - steps.mean()) * (values - values.mean())).sum() / ((steps - steps.mean()) ** 2).sum()
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        assert slope < 0, f"{provider}: least-squares slope {slope:.4f} per step: {losses}"
        assert last < 0.95 * first, f"{provider}: mean of the last 5 steps {last:.3f} vs first 5 {first:.3f}"


@needs_interpreter
@pytest.mark.slow  # the 20-step CPU check, twice through the interpreter; make test's GPU-suite dry run runs one step
def test_the_fused_model_took_the_fused_path(check):
    from fastdetr.nn import TransformerDecoderLayer, TransformerEncoderLayer

    comparison, _, projections, attention_called = check
    fused, reference = comparison.models["fastdetr"], comparison.models["reference"]
    layers = [*fused.transformer.encoder.layers, *fused.transformer.decoder.layers]
    assert len(layers) == SELF_ATTENTION_LAYERS
    assert all(isinstance(layer, (TransformerEncoderLayer, TransformerDecoderLayer)) for layer in layers)
    fused_attention = {id(m) for m in fused.modules() if isinstance(m, torch.nn.MultiheadAttention)}
    reference_attention = {id(m) for m in reference.modules() if isinstance(m, torch.nn.MultiheadAttention)}
    assert fused_attention and not fused_attention & attention_called, "the fused model ran nn.MultiheadAttention"
    assert reference_attention <= attention_called
    assert projections >= STEPS * SELF_ATTENTION_LAYERS
    assert comparison.runs["fastdetr"].attention_calls == 0
    assert comparison.runs["reference"].attention_calls > 0


@needs_interpreter
@pytest.mark.slow  # the 20-step CPU check, twice through the interpreter; make test's GPU-suite dry run runs one step
def test_results_table_summary_and_plot_are_written(check):
    comparison, out, *_ = check
    header = (out / "results.csv").read_text().splitlines()[0]
    assert tuple(header.split(",")) == COLUMNS
    rows = read_csv(out / "results.csv")
    assert {r["provider"] for r in rows} == set(bench.PROVIDERS)
    assert {r["case"] for r in rows} == {bench.CPU_CASE}
    for provider in bench.PROVIDERS:
        mine = {r["metric"]: r for r in rows if r["provider"] == provider and r["metric"] != "loss"}
        assert set(mine) == {"step_time", "train_time", "steps", "ap", "ap50"}
        assert mine["steps"]["p50"] == STEPS and mine["train_time"]["p50"] > 0
        losses = [r for r in rows if r["provider"] == provider and r["metric"] == "loss"]
        assert [r["mode"] for r in losses] == [f"step={n}" for n in range(1, STEPS + 1)]
        assert [r["p50"] for r in losses] == comparison.runs[provider].losses   # full precision round trip
    summary = (out / "results.md").read_text()
    assert bench.CPU_CASE in summary and "| met |" in summary and "missed" not in summary
    png = (out / "loss_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


@needs_interpreter
@pytest.mark.slow  # the 20-step CPU check, twice through the interpreter; make test's GPU-suite dry run runs one step
def test_the_summary_reports_a_missed_target(check):
    _, out, *_ = check
    rows = read_csv(out / "results.csv")
    for row in rows:
        if row["provider"] == "fastdetr" and row["mode"] == "step=7":
            row["p50"] *= 1 + 3 * bench.CPU_LOSS_BOUND
    summary = bench.summary_markdown(rows)
    assert "| missed |" in summary and "at step 7" in summary


def _gpu_rows(ap_reference: float, ap_fused: float) -> list[dict]:
    env = dict(device="test", git_sha="x", torch="x", triton="x", timestamp="x")
    rows = []
    for provider, ap in (("reference", ap_reference), ("fastdetr", ap_fused)):
        for mode, metric, value in (("step=50", "loss", 9.0), ("step=100", "loss", 8.0), ("eval", "ap", ap),
                                    ("eval", "ap50", ap + 0.2), ("train", "steps", 100.0),
                                    ("train", "train_time", 30.0), ("train", "step_time", 300.0)):
            rows.append(dict(case=bench.GPU_CASE, provider=provider, mode=mode, metric=metric, unit="u",
                             shape="s", p50=value, p20=value, p80=value, **env))
    return rows


@pytest.mark.parametrize("ap_fused,verdict", [(0.304, "met"), (0.294, "missed"), (0.31, "missed")])
def test_the_gpu_target_is_half_an_ap_point(ap_fused, verdict):
    summary = bench.summary_markdown(_gpu_rows(0.300, ap_fused))
    assert f"| {verdict} |" in summary
    assert "one per logged window" in summary


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA device")
def test_without_cuda_the_gpu_case_writes_nothing(tmp_path):
    assert bench.main(["--out", str(tmp_path / "out"), "--steps", "5"]) == 0
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argument", [["--steps", "0"], ["--budget-s", "-1"], ["--log-every", "0"]])
def test_bad_arguments_are_rejected(argument, tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--out", str(tmp_path), *argument])


@pytest.mark.parametrize("override", ["dec_layers", "no_such_field=3", "nheads=7"])
def test_bad_model_overrides_are_rejected_before_any_work(override, tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--out", str(tmp_path / "out"), "--override", override])
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA device")
def test_a_model_override_reaches_the_gpu_case(tmp_path, capsys):
    assert bench.main(["--out", str(tmp_path), "--override", "dec_layers=3", "--override", "dropout=0.0"]) == 0
    printed = capsys.readouterr().out
    assert "6+3 layers" in printed and "p=0.0;" in printed


def test_without_pycocotools_the_summary_says_why_there_is_no_ap():
    rows = [r for r in _gpu_rows(0.3, 0.3) if r["metric"] not in ("ap", "ap50")]
    for provider in bench.PROVIDERS:
        rows.append({**rows[0], "provider": provider, "mode": "eval", "metric": "error",
                     "unit": "AP not measured: pycocotools is not installed", "p50": math.nan, "p20": math.nan,
                     "p80": math.nan})
    summary = bench.summary_markdown(rows)
    assert "AP not measured: pycocotools is not installed." in summary
    assert "| n/a | n/a |" in summary and "| not measured |" in summary


def test_the_short_case_reports_its_first_steps_apart():
    env = dict(device="test", git_sha="x", torch="x", triton="x", timestamp="x")
    rows = [dict(case=bench.SHORT_CASE, provider=provider, mode=f"step={step}", metric="loss", unit="loss",
                 shape="s", p50=loss, p20=loss, p80=loss, **env)
            for provider, scale in (("reference", 1.0), ("fastdetr", 1.001))
            for step, loss in ((step, scale * (20 - step / 10)) for step in range(1, 31))]
    summary = bench.summary_markdown(rows)
    assert "Over the first 10 steps" in summary and "1.00e-03" in summary and "No target for this case" in summary


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA device")
def test_without_cuda_the_short_case_writes_nothing(tmp_path, capsys):
    assert bench.main(["--short", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "skipped gpu-bf16-short" in printed and "p=0.0;" in printed and "1000 train" in printed   # no dropout
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        bench.main(["--short", "--cpu-check", "--out", str(tmp_path / "out")])
