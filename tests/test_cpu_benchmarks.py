"""CPU-runnable benchmark cases under pytest-benchmark (issue 8): the matcher and the criterion at DETR scale.

    pytest tests/test_cpu_benchmarks.py --benchmark-only [--benchmark-json FILE]

In `make test` each case runs a few pedantic rounds (seconds in all) and checks
its result, so a case that breaks fails the suite; the timings are only
meaningful from a quiet machine with --benchmark-only.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import matcher as matcher_bench  # noqa: E402
from fastdetr.config import DETRConfig  # noqa: E402
from fastdetr.criterion import build_criterion  # noqa: E402
from fastdetr.matcher import HungarianMatcher  # noqa: E402
from fastdetr.reference.transformer import TransformerEncoderLayer  # noqa: E402

DETR_CASE = matcher_bench.CASES[0]   # 6 layers x 8 images x 100 queries, 1..30 targets


@pytest.fixture(scope="module")
def detr_step():
    return matcher_bench.make_inputs(DETR_CASE, "cpu")


@pytest.mark.benchmark(group="matcher-detr")
def test_original_matcher_loop(benchmark, detr_step):
    outputs, targets = detr_step
    result = benchmark.pedantic(matcher_bench.original_match, args=(outputs, targets), rounds=3, iterations=1)
    assert len(result) == DETR_CASE.layers and all(len(layer) == DETR_CASE.batch for layer in result)


@pytest.mark.benchmark(group="matcher-detr")
def test_fastdetr_matcher_scipy_backend(benchmark, detr_step):
    outputs, targets = detr_step
    matcher = HungarianMatcher(**matcher_bench.WEIGHTS, backend="scipy")
    result = benchmark.pedantic(matcher.match_layers, args=(outputs, targets), rounds=3, iterations=1)
    original = matcher_bench.original_match(outputs, targets)
    for layer, original_layer in zip(result, original):
        for (pred_idx, tgt_idx), (rows, cols) in zip(layer, original_layer):
            assert pred_idx.tolist() == rows.tolist() and tgt_idx.tolist() == cols.tolist()


@pytest.mark.benchmark(group="criterion-detr")
def test_criterion_forward(benchmark, detr_step):
    outputs, targets = detr_step
    criterion = build_criterion(DETRConfig(num_classes=DETR_CASE.logits - 1, dec_layers=DETR_CASE.layers))
    losses = benchmark.pedantic(criterion, args=(outputs, targets), rounds=3, iterations=1)
    assert all(torch.isfinite(value) for value in losses.values())


@pytest.mark.benchmark(group="encoder-layer")
def test_reference_encoder_layer_forward(benchmark):
    """One DETR-R50 encoder layer (d 256, 8 heads, FFN 2048) over one image's 228 tokens, eager CPU."""
    torch.manual_seed(0)
    layer = TransformerEncoderLayer(256, 8, 2048, dropout=0.0).eval()
    src, pos = torch.randn(228, 1, 256), torch.randn(228, 1, 256)
    with torch.no_grad():
        out = benchmark.pedantic(layer, args=(src,), kwargs=dict(pos=pos), rounds=3, iterations=1)
    assert out.shape == src.shape and torch.isfinite(out).all()
