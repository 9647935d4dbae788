"""benchmarks/matcher.py: the written-out original matcher is DETR's, and the smoke run writes the table."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import matcher as bench  # noqa: E402
from benchmarks.common import COLUMNS, read_csv  # noqa: E402
from fastdetr.backend import interpreter_enabled  # noqa: E402
from fastdetr.matcher import HungarianMatcher  # noqa: E402


def test_the_original_loop_finds_the_matchers_assignment():
    case = bench.Case("check", layers=3, batch=3, queries=20, logits=8, min_targets=0, max_targets=9)
    outputs, targets = bench.make_inputs(case, "cpu")
    original = bench.original_match(outputs, targets)
    ours = HungarianMatcher(**bench.WEIGHTS, backend="scipy").match_layers(outputs, targets)
    assert len(original) == len(ours) == 3
    for original_layer, layer in zip(original, ours):
        for (rows, cols), (pred_idx, tgt_idx) in zip(original_layer, layer):
            assert torch.equal(torch.as_tensor(rows, dtype=torch.int64), pred_idx)
            assert torch.equal(torch.as_tensor(cols, dtype=torch.int64), tgt_idx)


def test_a_non_optimal_provider_is_caught():
    calls = bench.providers(bench.SMOKE[0], "cpu", with_triton=False)
    good = calls["fastdetr-scipy"]()
    calls["broken"] = lambda: [[(rows, cols.flip(0)) for rows, cols in layer] for layer in good]
    with pytest.raises(RuntimeError, match="broken found total cost"):
        bench.check_agreement(calls)


@pytest.mark.skipif(not interpreter_enabled(), reason="the smoke run's triton provider needs TRITON_INTERPRET=1")
def test_smoke_run_writes_every_provider(tmp_path):
    assert bench.main(["--smoke", "--out", str(tmp_path), "--reps", "2"]) == 0
    header = (tmp_path / "results.csv").read_text().splitlines()[0]
    assert tuple(header.split(",")) == COLUMNS
    rows = read_csv(tmp_path / "results.csv")
    assert {r["provider"] for r in rows} == set(bench.PROVIDERS)
    assert all(r["metric"] == "time" and r["p50"] > 0 for r in rows)
    summary = (tmp_path / "results.md").read_text()
    assert "fastdetr-triton" in summary and "Targets" in summary
