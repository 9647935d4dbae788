"""benchmarks/family_convergence.py end to end in its quick mode: the CSV, the summary and the plot agree."""
from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "family_convergence.py"
MODELS = ("detr_small", "deformable_detr_small")

pytest.importorskip("pycocotools", reason="the study evaluates with pycocotools' COCOeval")
pytest.importorskip("matplotlib", reason="the study draws its plot with matplotlib")


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("family_convergence")
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--quick"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "results.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_csv_has_every_run_with_sane_values(quick_study):
    rows = _rows(quick_study)
    for column in ("model", "seed", "step", "cpu_s", "wall_s", "AP50", "AP", "loss"):
        assert column in rows[0], column
    runs: dict[tuple[str, int], list[dict[str, str]]] = {}
    for row in rows:
        runs.setdefault((row["model"], int(row["seed"])), []).append(row)
    assert set(runs) == {(model, seed) for model in MODELS for seed in (0, 1)}
    budget = 2.0  # --quick's CPU seconds per run
    for (model, seed), run in runs.items():
        steps = [int(row["step"]) for row in run]
        cpu = [float(row["cpu_s"]) for row in run]
        assert len(run) >= 2, (model, seed)
        assert steps == sorted(set(steps)) and steps[0] > 1, (model, seed, steps)
        assert cpu == sorted(cpu) and all(value > 0 for value in cpu), (model, seed, cpu)
        # every evaluation but the last falls on a multiple of --quick's 5 steps, before the budget is spent
        assert all(step % 5 == 0 for step in steps[:-1]) and all(value < budget for value in cpu[:-1])
        assert budget <= cpu[-1] < budget + 2, (model, seed, cpu[-1])  # stopped at the budget: the step it crossed
        for row in run:
            for key in ("cpu_s", "wall_s", "AP50", "AP", "loss"):
                assert not math.isnan(float(row[key])), (model, seed, key, row)
            assert 0.0 <= float(row["AP"]) <= float(row["AP50"]) <= 1.0, row
            assert float(row["loss"]) > 0, row
    # same budget, so the cheaper step gets further: detr_small's step is the cheaper one at these sizes
    last = {key: int(run[-1]["step"]) for key, run in runs.items()}
    assert all(last[("detr_small", seed)] > last[("deformable_detr_small", seed)] for seed in (0, 1)), last


def test_summary_matches_the_csv(quick_study):
    text = (quick_study / "results.md").read_text()
    rows = _rows(quick_study)
    for model in MODELS:
        assert f"| {model} |" in text
    for heading in ("## End of the CPU budget", "## AP50 at matched steps", "## AP50 at matched training CPU"):
        assert heading in text
    # the end-of-budget step cell is the mean over seeds of the CSV's last steps, then the per-seed values
    for model in MODELS:
        ends = [max(int(r["step"]) for r in rows if r["model"] == model and int(r["seed"]) == seed) for seed in (0, 1)]
        line = next(line for line in text.splitlines() if line.startswith(f"| {model} |"))
        assert f"{sum(ends) / 2:.0f} ({ends[0]}, {ends[1]})" in line, line
        assert " M |" in line  # the parameter count


def test_plot_is_a_png_and_is_redrawn_from_the_csv(quick_study, tmp_path):
    png = quick_study / "convergence_deformable.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    redrawn = tmp_path / "again.png"
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(quick_study), "--plot-only", "--plot",
                           str(redrawn)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert redrawn.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
