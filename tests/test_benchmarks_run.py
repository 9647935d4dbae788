"""benchmarks/run.py (and `fastdetr bench`): the runner on a CPU-only machine."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import run  # noqa: E402
from benchmarks.common import COLUMNS, read_csv  # noqa: E402
from fastdetr.cli import main as cli_main  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


def test_list_names_every_suite(capsys):
    assert cli_main(["bench", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(suite.name in listed for suite in run.SUITES)


def test_quick_cpu_run_writes_table_summary_and_plots(tmp_path, capsys):
    assert run.main(["--quick", "--suites", "ceiling", "matcher", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "skipped ceiling: needs a CUDA GPU" in out
    rows = read_csv(tmp_path / "results.csv")
    assert tuple((tmp_path / "results.csv").read_text().splitlines()[0].split(",")) == COLUMNS
    assert {r["provider"] for r in rows} == {"original", "fastdetr-scipy", "scipy-only"}
    assert all(r["case"] == "detr" and r["p50"] > 0 for r in rows)
    summary = (tmp_path / "results.md").read_text()
    assert "Skipped (no GPU): ceiling" in summary and "Matcher benchmark" in summary
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["detr_step.png"]


def test_summary_of_gpu_rows_reports_the_ceiling_fraction():
    """results.md from GPU-shaped rows (as a GPU run writes them): ceilings, model tables, fraction of the ceiling."""
    env = dict(device="NVIDIA H100", git_sha="abc", torch="2.11", triton="3.6", timestamp="t")
    rows = [dict(case="ceiling", provider="torch.matmul", mode="bf16", metric="tflops", unit="TFLOP/s",
                 shape="8192", p50=700.0, p20=690.0, p80=710.0, **env),
            dict(case="detr_r50", provider="fastdetr-bf16", mode="train_step", metric="time", unit="ms",
                 shape="B=8", p50=100.0, p20=99.0, p80=101.0, **env),
            dict(case="detr_r50", provider="fastdetr-bf16", mode="train_step", metric="tflops", unit="TFLOP/s",
                 shape="B=8", p50=70.0, p20=69.0, p80=71.0, **env)]
    summary = run.summary_markdown(rows)
    assert "# Ceilings" in summary and "10.0%" in summary and "DETR-R50" in summary


def test_summary_routes_proxy_rows_to_their_table():
    env = dict(device="cpu (Triton interpreter)", git_sha="abc", torch="2.13", triton="3.6", timestamp="t")
    rows = [dict(case="detr_r50_step_proxies", provider=provider, mode="train_step", metric="launches",
                 unit="count", shape="s", p50=value, p20=value, p80=value, **env)
            for provider, value in (("reference-scipy", 1502.0), ("fastdetr-triton", 1318.0))]
    summary = run.summary_markdown(rows)
    assert "CPU proxies" in summary and "| 1318 | count |" in summary


def test_headline_gives_each_case_its_speedup():
    env = dict(device="NVIDIA H200", git_sha="abc", torch="2.11", triton="3.6", timestamp="t")
    rows = [dict(case="transformer", provider=provider, mode="fwd+bwd", metric="time", unit="ms", shape="s",
                 p50=value, p20=value, p80=value, **env)
            for provider, value in (("reference", 9.0), ("fastdetr", 3.0))]
    rows.append(dict(case="ceiling", provider="torch.matmul", mode="bf16", metric="tflops", unit="TFLOP/s",
                     shape="8192", p50=700.0, p20=690.0, p80=710.0, **env))
    lines = run.headline(rows).splitlines()
    assert lines[0].startswith("NVIDIA H200, torch 2.11")
    assert any("torch.matmul: 700.0 TFLOP/s" in line for line in lines)
    assert any(line.startswith("transformer") and "x3.00 vs reference" in line for line in lines)


def test_a_failing_suite_is_reported_and_the_next_one_still_writes(tmp_path, monkeypatch, capsys):
    def broken(env, level):
        raise RuntimeError("no such kernel")

    def one_row(env, level):
        return [dict(case="detr", provider="original", mode="step", metric="time", unit="ms", shape="s",
                     p50=1.0, p20=1.0, p80=1.0, **env)]

    monkeypatch.setenv("TRITON_INTERPRET", "1")   # --smoke would set it for the rest of the session
    monkeypatch.setitem(run.RUNNERS, "ops", broken)
    monkeypatch.setitem(run.RUNNERS, "matcher", one_row)
    assert run.main(["--smoke", "--suites", "ops", "matcher", "--out", str(tmp_path)]) == 1
    assert "suite ops FAILED" in capsys.readouterr().out
    assert [r["provider"] for r in read_csv(tmp_path / "results.csv")] == ["original"]
    assert (tmp_path / "headline.txt").read_text().splitlines()[1].startswith("detr")
