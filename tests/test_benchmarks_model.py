"""benchmarks/model.py on the CPU: a tiny detr_small through Triton's interpreter runs every mode of two providers."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

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


# ---- the static-shape case (detr_r50_static) ------------------------------------------------------------


@pytest.mark.skipif(not interpreter_enabled(), reason="the fused provider needs TRITON_INTERPRET=1 on the CPU")
def test_static_smoke_rows_and_summary():
    """Both eager providers time every mode; the graph provider is an error row on a CPU, not a crash."""
    providers = ("reference-bf16", "fastdetr-bf16", "fastdetr-bf16+graph")
    rows = bench.measure_static("cpu", environment("cpu"), providers=providers, train_batches=(2,), timer=_wall,
                                scale=bench.STATIC_SMOKE)
    assert {r["case"] for r in rows} == {bench.STATIC_CASE}
    found = {(r["provider"], r["mode"]): r for r in rows}
    assert set(found) == {(p, m) for p in providers for m in ("train_step_b2", "inference_b1")}
    for provider in providers[:2]:
        for mode in ("train_step_b2", "inference_b1"):
            assert found[(provider, mode)]["metric"] == "time" and found[(provider, mode)]["p50"] > 0
    for mode in ("train_step_b2", "inference_b1"):
        graph = found[("fastdetr-bf16+graph", mode)]
        assert graph["metric"] == "error" and "needs CUDA" in graph["unit"]
    assert "train_step B=2" in found[("reference-bf16", "train_step_b2")]["shape"]
    assert "inference B=1" in found[("reference-bf16", "inference_b1")]["shape"]
    summary = bench.summary_markdown(rows)
    assert "DETR-R50 at DETR's augmentation sizes" in summary and "its times are not GPU times" in summary
    assert "| train_step_b2 |" in summary and "fastdetr-bf16+graph train_step_b2: needs CUDA" in summary
    assert "training step at batch 8: at least 1.5x reference-bf16 | not measured" in summary
    assert "training step at batch 2: at least 1.3x reference-bf16+compile | not measured" in summary
    assert "fastdetr-bf16 vs reference-bf16" in summary


@pytest.mark.skipif(not interpreter_enabled(), reason="the fused provider needs TRITON_INTERPRET=1 on the CPU")
@pytest.mark.slow  # dynamo traces the fused model through the interpreter's kernels (~25 s on 2 cores)
def test_static_compile_provider_runs_the_static_step():
    """fastdetr-bf16+compile: StaticStep on bucketed batches with the compiled model (dynamo's eager backend
    here: the tracing without Inductor's C++ compile)."""
    rows = bench.measure_static("cpu", environment("cpu"), providers=("fastdetr-bf16+compile",), train_batches=(2,),
                                timer=_wall, scale=bench.STATIC_SMOKE, compile_options={"backend": "eager"})
    assert {(r["mode"], r["metric"]) for r in rows} == {("train_step_b2", "time"), ("inference_b1", "time")}
    assert all(r["p50"] > 0 for r in rows)


def test_static_batches_hold_both_forms():
    """Dynamic: padded to the largest image; static: to its bucket (multiples of the step); targets in slots."""
    from fastdetr.static import default_step

    step = default_step(bench.SMOKE_AUGMENT)
    batches = bench.static_batches("train_step", 3, bench.STATIC_SMOKE, num_classes=5, max_targets=6, pin=False)
    assert len(batches) == bench.STATIC_SMOKE.rotation
    for batch in batches:
        heights, widths = batch.sizes.unbind(1)
        assert batch.dynamic.tensors.shape == (3, 3, int(heights.max()), int(widths.max()))
        height, width = batch.static.tensors.shape[-2:]
        assert height % step == 0 and width % step == 0 and height >= heights.max() and width >= widths.max()
        assert batch.padded.labels.shape == (3, 6) and len(batch.targets) == 3
        assert batch.padded.valid.sum(1).tolist() == [len(t["labels"]) for t in batch.targets]
    inference = bench.static_batches("inference", 1, bench.STATIC_SMOKE, num_classes=5, max_targets=6, pin=False)
    for batch in inference:   # eval resize: the shorter side is val_size, the bucket a multiple of 32 px
        assert min(batch.sizes[0].tolist()) == bench.SMOKE_AUGMENT.val_size
        assert all(side % bench.INFERENCE_BUCKET_STEP == 0 for side in batch.static.tensors.shape[-2:])


class _FakeGraphStep:
    """Counts like StaticStep(cuda_graph=True): a key's call after GRAPH_WARMUP eager ones captures it."""

    def __init__(self):
        self.seen, self.captures = {}, 0

    def __call__(self, batch):
        self.seen[batch] = self.seen.get(batch, 0) + 1
        self.captures += self.seen[batch] == bench.GRAPH_WARMUP + 1


def _timed_six_times(fn, warmup=0, rep=0):
    for _ in range(6):
        fn()
    return 1.0, 1.0, 1.0


def test_priming_captures_every_bucket_before_the_timed_calls():
    batches = ["bucket a", "bucket b", "bucket a"]   # a bucket seen twice per round, one once
    step = _FakeGraphStep()
    provider = bench.StaticProvider(torch.nn.Identity(), step, step, lambda: step.captures)
    row = bench._time_static("fastdetr-bf16+graph", provider, "train_step", 2, batches, _timed_six_times, 0, 0,
                             bench.STATIC_SMOKE, environment("cpu"))
    assert row["metric"] == "time" and step.captures == 2
    # primed as torch.compile's providers are (two rounds), bucket b is captured in the timed calls: an error row
    step = _FakeGraphStep()
    provider = bench.StaticProvider(torch.nn.Identity(), step, step, lambda: step.captures)
    row = bench._time_static("fastdetr-bf16+compile", provider, "train_step", 2, batches, _timed_six_times, 0, 0,
                             bench.STATIC_SMOKE, environment("cpu"))
    assert row["metric"] == "error" and "captured inside the timed calls" in row["unit"]


def test_static_summary_states_the_goals_against_the_rows():
    """The goals' lines from rows shaped as a GPU run writes them (made-up times, a made-up device name)."""
    env = dict(environment("cpu"), device="made-up device")
    times = {("reference-bf16", "train_step", 2): 100.0, ("fastdetr-bf16+graph", "train_step", 2): 40.0,
             ("fastdetr-bf16", "train_step", 2): 80.0, ("reference-bf16+compile", "train_step", 2): 60.0,
             ("reference-bf16", "train_step", 8): 300.0, ("fastdetr-bf16+graph", "train_step", 8): 250.0,
             ("reference-bf16", "inference", 1): 30.0}
    rows = [bench._static_row(p, kind, b, "time", "ms", bench.STATIC_R50, (t, t, t), env)
            for (p, kind, b), t in times.items()]
    rows.append(bench._static_row("fastdetr-bf16+graph", "inference", 1, "error", "RuntimeError: capture failed",
                                  bench.STATIC_R50, (float("nan"),) * 3, env))
    summary = bench.summary_markdown(rows)
    assert "training step at batch 2: at least 2.0x reference-bf16 | 2.50x (fastdetr-bf16+graph) | met" in summary
    assert "training step at batch 8: at least 1.5x reference-bf16 | 1.20x (fastdetr-bf16+graph) | not met" in summary
    assert "training step at batch 2: at least 1.3x reference-bf16+compile | 1.50x (fastdetr-bf16+graph) | met" \
        in summary
    assert "training step at batch 8: at least 1.3x reference-bf16+compile | not measured" in summary
    assert "inference at batch 1: at least 2.0x reference-bf16 | not measured" in summary
    assert "fastdetr-bf16+graph inference_b1: RuntimeError: capture failed" in summary
    assert "| inference_b1 | 30.0 |" in summary and "# DETR-R50: inference and training step" not in summary


def test_static_case_without_a_gpu_it_skips(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the real run would start")
    assert bench.main(["--out", str(tmp_path), "--case", "all"]) == 0
    out = capsys.readouterr().out
    assert "skipped detr_r50 " in out and f"skipped {bench.STATIC_CASE}" in out and not any(tmp_path.iterdir())
    assert f"skipped {bench.DEFORMABLE_CASE} (inference at B=1, training at B=2, 5 providers)" in out


def test_help_lists_the_cases():
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "model.py"
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--case {detr_r50,static,deformable,all}" in proc.stdout and "--static-providers" in proc.stdout
    assert "--deformable-providers" in proc.stdout


def test_run_model_measures_the_static_case_without_compiles(monkeypatch):
    """benchmarks/run.py's model suite: --quick at batch 2 with graphs vs eager, full at 2, 4, 8."""
    from benchmarks import run

    calls = []
    monkeypatch.setattr(bench, "measure", lambda *args, **kwargs: [])
    monkeypatch.setattr(bench, "measure_transformers", lambda *args, **kwargs: [])
    monkeypatch.setattr(bench, "measure_static", lambda *args, **kwargs: calls.append(kwargs) or [])
    deformable = []
    monkeypatch.setattr(bench, "measure_deformable", lambda *args, **kwargs: deformable.append(kwargs) or [])
    for level in ("quick", "full"):
        assert run.run_model(environment("cpu"), level) == []
    quick, full = calls
    # Deformable-DETR-R50: every reference and fused provider, torch.compile's only in the full run
    assert deformable[0]["providers"] == ("reference-fp32", "reference-bf16", "fastdetr-fp32", "fastdetr-bf16")
    assert deformable[1]["providers"] == bench.DEFORMABLE_PROVIDERS
    assert quick["train_batches"] == (2,) and full["train_batches"] == bench.STATIC_TRAIN_BATCHES
    assert "fastdetr-bf16+graph" in quick["providers"] and "reference-bf16" in quick["providers"]
    assert not any(p.endswith("+compile") for p in quick["providers"] + full["providers"])


def test_static_case_rows_go_to_the_model_section():
    from benchmarks import run

    assert run._suite_of({"case": bench.STATIC_CASE}) == "model"
