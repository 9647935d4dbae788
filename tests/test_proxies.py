"""fastdetr.measure.proxies: one training step's launches, host syncs and saved bytes, reference vs fused, with bounds.

The counts are exact and deterministic (the same every run, and the same at
other image sizes and query counts: checked below for the reference), so the
bounds sit just above what was measured: a change that adds a few kernels, a
host sync or a saved activation breaks them. The measured numbers are written
next to each bound; they come from

    TRITON_INTERPRET=1 .venv/bin/fastdetr proxies --quick --verbose

(QUICK_STEP: DETR-R50 widths, 2 encoder + 2 decoder layers, 20 queries, batch
2 of 64x96 and 96x64 images; torch 2.13 CPU, Triton 3.6 interpreter). Each
further encoder + decoder layer pair adds the same counts (linear from two
layers on: 361 launches in the reference, 274 fused), so DETR-R50's 6 + 6
layers add 4 pairs to these: 2695 / 2169 / 2123 / 1328 launches (reference-scipy,
fastdetr-scipy, fastdetr-triton, fastdetr-static-triton; the static step's
criterion and backward grow less per layer, its losses being batched), measured
with `fastdetr proxies` (about 5 minutes per configuration on 2 busy cores). The
step counted is a steady one: FrozenBatchNorm2d's folded statistics, which a
fresh model's first forward computes (5 ops for each of ResNet-50's 53), are
cached beforehand (the reference's forward is then the original's x * scale + shift, 2 ops each; the fused
models' one addcmul, which fastdetr.optimize sets).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from fastdetr.backend import interpreter_enabled, triton_importable
from fastdetr.cli import main
from fastdetr.measure.counters import OpCounter, TritonLaunchCounter
from fastdetr.measure.proxies import (
    CONFIGURATIONS,
    DEFORMABLE_QUICK_STEP,
    DEFORMABLE_R50_STEP,
    QUICK_STEP,
    STEPS,
    format_table,
    step_proxies,
)

REPO = Path(__file__).resolve().parents[1]

needs_interpreter = pytest.mark.skipif(
    not (triton_importable() and interpreter_enabled()),
    reason="the fused kernels run on a CPU only through Triton's interpreter (TRITON_INTERPRET=1)",
)

if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def _scale_kernel(x_ptr,            # (N,) float32, scaled in place
                      N, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < N
        tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=inside) * 2.0, mask=inside)


def _launch_scale(x: torch.Tensor) -> None:
    _scale_kernel[(triton.cdiv(x.numel(), 64),)](x, x.numel(), BLOCK=64)


# ---------------------------------------------------------------------------------------------
# TritonLaunchCounter
# ---------------------------------------------------------------------------------------------

@needs_interpreter
def test_launch_counter_counts_interpreted_launches_by_name_in_its_block_only():
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run
    x = torch.ones(100)
    _launch_scale(x)                                 # outside: not counted
    with TritonLaunchCounter() as outer:
        _launch_scale(x)
        with TritonLaunchCounter() as inner:
            _launch_scale(x)
        _launch_scale(x)
    _launch_scale(x)                                 # after exit: not counted
    assert torch.equal(x, torch.full((100,), 32.0))  # five launches ran, each once (grid of 2 programs)
    assert inner.launch_counts == {"_scale_kernel": 1} and inner.launches == 1
    assert outer.launch_counts == {"_scale_kernel": 3} and outer.launches == 3
    assert InterpretedFunction.run is original


@needs_interpreter
def test_launch_counter_hides_the_interpreters_argument_copies_from_op_counters():
    x = torch.ones(100)
    with OpCounter() as hidden, TritonLaunchCounter():
        _launch_scale(x)
    with OpCounter() as shown, TritonLaunchCounter(hide_interpreter_ops=False):
        _launch_scale(x)
    assert hidden.ops == 0                               # a compiled launch dispatches no ATen op
    assert shown.op_counts["aten.copy_"] >= 1            # the interpreter copies the result back


def test_launch_counter_counts_compiled_launches_through_the_launch_hook():
    """A compiled kernel's launcher calls triton.knobs.runtime.launch_enter_hook with its metadata;
    called by hand here, as a launcher on a GPU calls it."""
    triton = pytest.importorskip("triton")
    knobs = getattr(triton, "knobs", None)
    if not hasattr(getattr(getattr(knobs, "runtime", None), "launch_enter_hook", None), "add"):
        pytest.skip(f"Triton {triton.__version__} has no launch hook chain (Triton >= 3.5)")
    from triton.compiler.compiler import LazyDict

    hook = knobs.runtime.launch_enter_hook
    before = list(hook.calls)
    with TritonLaunchCounter() as counter:
        hook(LazyDict({"name": "_gemm_kernel"}))
        hook(LazyDict({"name": "_gemm_kernel"}))
        hook(LazyDict({"name": "_softmax_kernel"}))
    hook(LazyDict({"name": "_gemm_kernel"}))
    assert counter.launch_counts == {"_gemm_kernel": 2, "_softmax_kernel": 1}
    assert hook.calls == before


# ---------------------------------------------------------------------------------------------
# One training step: reference vs fused
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def measured():
    """step_proxies of every configuration at QUICK_STEP, by name ("reference-scipy", "fastdetr-scipy",
    "fastdetr-triton"); about 30 s through the interpreter on a 2-core CPU."""
    if not (triton_importable() and interpreter_enabled()):
        pytest.skip("the fused kernels run on a CPU only through Triton's interpreter (TRITON_INTERPRET=1)")
    results = [step_proxies(fused, matcher, QUICK_STEP, static=static) for _, fused, matcher, static in CONFIGURATIONS]
    return {result.name: result for result in results}


@pytest.mark.slow  # one DETR-R50-widths step per configuration through the interpreter (module docstring)
def test_reference_counts_do_not_depend_on_image_size_or_queries():
    """Why a small step stands for DETR-R50's: counts depend on the layers only (sizes change saved bytes)."""
    base = step_proxies(False, "scipy", QUICK_STEP)
    for shape in (dataclasses.replace(QUICK_STEP, image_sizes=((160, 224), (224, 160))),
                  dataclasses.replace(QUICK_STEP, num_queries=100)):
        other = step_proxies(False, "scipy", shape)
        assert (other.aten_ops, other.launches, other.host_syncs, other.phase_launches) == \
               (base.aten_ops, base.launches, base.host_syncs, base.phase_launches)
        assert other.saved_activation_bytes > base.saved_activation_bytes


@pytest.mark.slow  # one DETR-R50-widths step per configuration through the interpreter (module docstring)
def test_reference_step(measured):
    reference = measured["reference-scipy"]
    assert reference.triton_launches == 0 and reference.allocations == 0
    # measured 1251 ATen ops (forward 432, criterion 223, backward 596; the criterion's check of the target values
    # where they enter is 14 of them): the baseline the bounds below compare to; a bound, not an equality, so that
    # an unrelated change to the shared backbone or criterion code can land
    assert 1190 <= reference.launches <= 1265
    # The CPU dispatches no syncing op here: fastdetr's criterion reads no value (the original: 24 GIoU asserts and
    # one num_boxes .item()). The one sync is the scipy matcher's copy of the cost blocks to the host, once per
    # step for all layers (match_layers), which a GPU makes and a CPU tensor does not: counted by the solver calls.
    assert reference.sync_ops == ("host solver: cost blocks to the host",)   # measured: exactly this
    assert reference.host_syncs == 1


@pytest.mark.slow  # one DETR-R50-widths step per configuration through the interpreter (module docstring)
def test_fused_step_launches_every_fused_kernel_and_fewer_launches(measured):
    reference, fused = measured["reference-scipy"], measured["fastdetr-scipy"]
    enc, dec = QUICK_STEP.enc_layers, QUICK_STEP.dec_layers
    # one attention kernel per attention, forward and backward: a layer that fell back to nn.MultiheadAttention
    # or an attention split into several launches shows up here (measured 6, 6, 6)
    attentions = enc + 2 * dec
    for kernel in ("_attention_fwd_kernel", "_attention_bwd_dq_kernel", "_attention_bwd_dkdv_kernel"):
        assert fused.launch_counts.get(kernel) == attentions, kernel
    # measured 50 Triton launches (10 per encoder layer, 15 per decoder layer)
    assert fused.triton_launches <= 50
    # measured 1073 launches = 1153 ATen ops - 130 allocations + 50 Triton launches (forward 295, criterion 223,
    # backward 555), against the reference's 1251
    assert fused.launches <= 1088
    assert reference.launches - fused.launches >= 155        # measured 167
    # same matcher, same sync as the reference (measured 1)
    assert fused.sync_ops == reference.sync_ops


@pytest.mark.slow  # one DETR-R50-widths step per configuration through the interpreter (module docstring)
def test_fused_step_with_the_triton_matcher_is_sync_free(measured):
    reference, fused = measured["reference-scipy"], measured["fastdetr-triton"]
    assert fused.host_syncs == 0 and fused.sync_ops == ()     # measured: none
    # the matcher's two kernels (fused cost blocks, batched assignment), once each for all layers and images
    assert fused.launch_counts["_matching_cost_fwd_kernel"] == 1
    assert fused.launch_counts["_assignment_fwd_kernel"] == 1
    # measured 1027 launches = 1110 ATen ops - 135 allocations + 52 Triton launches (forward 295, criterion 177,
    # backward 555), 224 fewer than the reference's 1251
    assert fused.triton_launches <= 52
    assert fused.launches <= 1042
    assert reference.launches - fused.launches >= 195
    assert fused.phase_launches["criterion"] <= 184                                            # measured 177


@pytest.mark.slow  # one DETR-R50-widths step per configuration through the interpreter (module docstring)
def test_static_step_batches_the_criterion_and_stays_sync_free(measured):
    """The static-shape step (padded batch and targets, every layer's losses at once) against the dynamic one."""
    dynamic, static = measured["fastdetr-triton"], measured["fastdetr-static-triton"]
    assert static.host_syncs == 0 and static.sync_ops == ()
    assert static.launch_counts["_assignment_fwd_kernel"] == static.launch_counts["_matching_cost_fwd_kernel"] == 1
    # measured 868 launches (forward 289, criterion 109, backward 470) against 1027: the criterion's losses no
    # longer once per layer (109 against 177), and so its backward (470 against 555)
    assert static.launches <= 883
    assert static.phase_launches["criterion"] <= 115
    assert dynamic.phase_launches["criterion"] - static.phase_launches["criterion"] >= 60
    assert static.phase_launches["backward"] <= dynamic.phase_launches["backward"] - 70
    # the optimizer phase: fastdetr's fused AdamW and one clipping call, 10 launches; the reference's foreach
    # AdamW and clip_grad_norm_, 17 (its 230 reads of host-side step counters launch nothing and are not counted)
    assert static.optimizer_launches == dynamic.optimizer_launches <= 12
    assert measured["reference-scipy"].optimizer_launches <= 20
    assert static.step_launches == static.launches + static.optimizer_launches


@pytest.mark.slow  # one DETR-R50-widths step per configuration through the interpreter (module docstring)
def test_fused_step_saves_fewer_activation_bytes(measured):
    reference = measured["reference-scipy"].saved_activation_bytes   # measured 13,269,004 bytes (12.65 MiB)
    fused = measured["fastdetr-scipy"].saved_activation_bytes         # measured 11,739,454 bytes (11.20 MiB)
    # the matcher is no_grad: it keeps nothing for the backward, whichever backend
    assert measured["fastdetr-triton"].saved_activation_bytes == fused
    # Most of the step's bytes are the ResNet-50's at these tiny images, which fusion does not touch: the ratio
    # (measured 0.885) moves little; the difference (measured 1,529,550 bytes) is what the fused layers save.
    # Its bound fails when the fused step keeps 30 KB more, e.g. one more (Q * B, d) float32 decoder activation
    # (20 queries x 2 images x 256 x 4 bytes = 40,960).
    assert fused <= 0.89 * reference
    assert reference - fused >= 1_500_000


@pytest.mark.slow  # one DETR-R50-widths step per configuration through the interpreter (module docstring)
def test_rows_and_table(measured, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks import common
    from benchmarks.proxies import proxy_rows

    env = dict(device="cpu", git_sha="test", torch=torch.__version__, triton="test", timestamp="now")
    results = list(measured.values())
    rows = proxy_rows(env, results)
    assert all(set(row) == set(common.COLUMNS) for row in rows)
    assert len(rows) == 8 * len(results)
    by_key = {(row["provider"], row["metric"]): row for row in rows}
    fused = by_key[("fastdetr-triton", "launches")]
    assert fused["p50"] == fused["p20"] == fused["p80"] == measured["fastdetr-triton"].launches
    assert by_key[("reference-scipy", "saved_activation_bytes")]["unit"] == "bytes"
    table = format_table(results)
    assert table.count("\n") == 2 + len(results)
    assert "| fastdetr | triton |" in table


@pytest.mark.slow  # one DETR-R50-widths step per configuration through the interpreter (module docstring)
def test_cli_prints_the_table(measured, monkeypatch, capsys):
    """The command line (measuring itself is what the tests above do): measured results stand in for a run."""
    by_configuration = {(result.provider != "reference", result.matcher, result.provider == "fastdetr-static"): result
                        for result in measured.values()}
    monkeypatch.setattr("fastdetr.measure.proxies.step_proxies",
                        lambda fused, matcher, shape, device, static: by_configuration[(fused, matcher, static)])
    assert main(["proxies", "--quick", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "2+2 layers, 20 queries" in out
    assert f"| reference | scipy | {measured['reference-scipy'].aten_ops} |" in out
    assert "_assignment_fwd_kernel" in out and "| fastdetr-static | triton |" in out


def test_refuses_to_measure_a_fused_step_without_the_interpreter(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        step_proxies(True, "scipy", QUICK_STEP)


# ---------------------------------------------------------------------------------------------
# Deformable DETR: the same step for Deformable-DETR-R50 (StepShape.model "deformable_detr")
# ---------------------------------------------------------------------------------------------
# Measured with `TRITON_INTERPRET=1 .venv/bin/fastdetr proxies --model deformable_detr --quick --verbose`
# (DEFORMABLE_QUICK_STEP: 2 + 2 layers, 20 queries, batch 2 of 16x24 and 24x16 images; torch 2.13 CPU, Triton 3.6
# interpreter; about 75 s per fused configuration on 2 busy cores, nearly all of it the MSDA kernels).

def test_deformable_shapes_and_their_description():
    assert DEFORMABLE_QUICK_STEP.deformable and not QUICK_STEP.deformable
    assert STEPS["deformable_detr"] == (DEFORMABLE_R50_STEP, DEFORMABLE_QUICK_STEP)
    assert (DEFORMABLE_R50_STEP.enc_layers, DEFORMABLE_R50_STEP.dec_layers, DEFORMABLE_R50_STEP.num_queries) == \
           (6, 6, 300)
    assert DEFORMABLE_QUICK_STEP.describe().startswith("Deformable-DETR-R50 widths, 2+2 layers, 20 queries")
    assert QUICK_STEP.describe().startswith("DETR-R50 widths")
    with pytest.raises(ValueError, match="StepShape.model"):
        dataclasses.replace(QUICK_STEP, model="dino")


@pytest.fixture(scope="module")
def measured_deformable():
    """step_proxies of every configuration at DEFORMABLE_QUICK_STEP, by name; about 4 minutes through the
    interpreter on a 2-core CPU."""
    if not (triton_importable() and interpreter_enabled()):
        pytest.skip("the fused kernels run on a CPU only through Triton's interpreter (TRITON_INTERPRET=1)")
    results = [step_proxies(fused, matcher, DEFORMABLE_QUICK_STEP, static=static)
               for _, fused, matcher, static in CONFIGURATIONS]
    return {result.name: result for result in results}


def _msda_calls(shape) -> int:
    return shape.enc_layers + shape.dec_layers   # one MSDA per encoder layer (self), per decoder layer (cross)


@pytest.mark.slow  # one Deformable-DETR-R50-widths step per configuration through the interpreter (above)
def test_deformable_reference_step(measured_deformable):
    reference = measured_deformable["reference-scipy"]
    assert reference.triton_launches == 0 and reference.allocations == 0
    # measured 1806 launches (forward 739, criterion 271, backward 796; at 64x96 images 8 more in the forward, the
    # flattening reshapes that the 1x1 levels make views)
    assert 1750 <= reference.launches <= 1820
    assert sum(reference.phase_launches.values()) == reference.launches
    # the scipy solver's one copy of the cost blocks (every decoder layer at once), then the reference MSDA's two
    # host reads of spatial_shapes and level_start_index per call, which a GPU makes and a CPU tensor does not
    # (measured: exactly these, 9)
    reads = 2 * _msda_calls(DEFORMABLE_QUICK_STEP)
    assert reference.sync_ops == ("host solver: cost blocks to the host", *["tolist: values to the host"] * reads)
    assert reference.optimizer_launches <= 20                                                  # measured 17


@pytest.mark.slow  # one Deformable-DETR-R50-widths step per configuration through the interpreter (above)
def test_deformable_fused_step_launches_the_fused_kernels_and_fewer_launches(measured_deformable):
    reference, fused = measured_deformable["reference-scipy"], measured_deformable["fastdetr-scipy"]
    calls = _msda_calls(DEFORMABLE_QUICK_STEP)
    # one query-side MSDA kernel per call, forward and backward: a module left unconverted shows up here (measured
    # 4, 4), and the decoder self-attention kernel once per decoder layer (measured 2 each)
    assert fused.launch_counts.get("_msda_query_fwd_kernel") == fused.launch_counts.get("_msda_query_bwd_kernel") \
        == calls
    for kernel in ("_attention_fwd_kernel", "_attention_bwd_dq_kernel", "_attention_bwd_dkdv_kernel"):
        assert fused.launch_counts.get(kernel) == DEFORMABLE_QUICK_STEP.dec_layers, kernel
    # measured 48 Triton launches; 1477 launches = 1561 ATen ops - 132 allocations + 48 (forward 500, criterion
    # 271, backward 706) against the reference's 1806
    assert fused.triton_launches <= 48
    assert fused.launches <= 1490
    assert reference.launches - fused.launches >= 310                                          # measured 329
    assert fused.phase_launches["criterion"] == reference.phase_launches["criterion"]          # the same criterion
    # the fused MSDA reads no shape on the host (its CPU-only token-count check runs outside the counters)
    assert fused.sync_ops == ("host solver: cost blocks to the host",)                          # measured: exactly
    assert fused.optimizer_launches <= 12                                                      # measured 10


@pytest.mark.slow  # one Deformable-DETR-R50-widths step per configuration through the interpreter (above)
def test_deformable_fused_step_with_the_triton_matcher_is_sync_free(measured_deformable):
    fused = measured_deformable["fastdetr-triton"]
    assert fused.host_syncs == 0 and fused.sync_ops == ()                                     # measured: none
    # the focal cost runs in PyTorch (FocalHungarianMatcher): the assignment kernel alone, once for all layers
    assert fused.launch_counts["_assignment_fwd_kernel"] == 1
    assert "_matching_cost_fwd_kernel" not in fused.launch_counts
    # measured 1482 launches (forward 500, criterion 276, backward 706), 49 of them Triton's
    assert fused.triton_launches <= 49
    assert fused.launches <= 1495
    assert sum(fused.phase_launches.values()) == fused.launches
    assert fused.step_launches == fused.launches + fused.optimizer_launches                   # measured 1492


@pytest.mark.slow  # one Deformable-DETR-R50-widths step per configuration through the interpreter (above)
def test_deformable_static_step_batches_the_criterion(measured_deformable):
    dynamic, static = measured_deformable["fastdetr-triton"], measured_deformable["fastdetr-static-triton"]
    # measured 1279 launches (forward 494, criterion 187, backward 598) against 1482: every layer's losses at once
    assert static.launches <= 1295
    assert static.phase_launches["criterion"] <= 195
    assert dynamic.phase_launches["criterion"] - static.phase_launches["criterion"] >= 80      # measured 89
    assert static.phase_launches["backward"] <= dynamic.phase_launches["backward"] - 100       # measured 108
    assert sum(static.phase_launches.values()) == static.launches
    assert static.launch_counts["_assignment_fwd_kernel"] == 1
    assert static.host_syncs == 0 and static.sync_ops == ()                                   # measured: none
    assert static.optimizer_launches == dynamic.optimizer_launches


@pytest.mark.slow  # one Deformable-DETR-R50-widths step per configuration through the interpreter (above)
def test_deformable_fused_step_saves_fewer_activation_bytes(measured_deformable):
    reference = measured_deformable["reference-scipy"].saved_activation_bytes   # measured 7,042,818 (6.72 MiB)
    fused = measured_deformable["fastdetr-scipy"].saved_activation_bytes         # measured 3,339,522 (3.18 MiB)
    assert measured_deformable["fastdetr-triton"].saved_activation_bytes == fused
    assert fused <= 0.5 * reference                                                            # measured 0.47


@pytest.mark.slow  # one Deformable-DETR-R50-widths step per configuration through the interpreter (above)
def test_deformable_rows_and_cli(measured_deformable, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks.proxies import CASES, proxy_rows

    env = dict(device="cpu", git_sha="test", torch=torch.__version__, triton="test", timestamp="now")
    rows = proxy_rows(env, list(measured_deformable.values()))
    assert {row["case"] for row in rows} == {CASES["deformable_detr"]} == {"deformable_detr_r50_step_proxies"}
    by_configuration = {(result.provider != "reference", result.matcher, result.provider == "fastdetr-static"): result
                        for result in measured_deformable.values()}
    monkeypatch.setattr("fastdetr.measure.proxies.step_proxies",
                        lambda fused, matcher, shape, device, static: by_configuration[(fused, matcher, static)])
    assert main(["proxies", "--model", "deformable_detr", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "DeformableSetCriterion" in out and "Deformable-DETR-R50 widths, 2+2 layers, 20 queries" in out
    assert f"| reference | scipy | {measured_deformable['reference-scipy'].aten_ops} |" in out
