"""fastdetr.kernels.matching_cost: the fused cost blocks against float64 math and the matcher's own cost.

Through Triton's interpreter on the CPU (conftest sets TRITON_INTERPRET=1):
DETR's sizes (6 layers, 100 queries, 92 logits, 0..30 targets) and odd ones
(7 and 129 queries, 1 and 37 targets, more classes than one BLOCK_C chunk).
"""
from __future__ import annotations

import pytest
import torch
from test_matcher import random_batch, reference_cost

from fastdetr.backend import interpreter_enabled
from fastdetr.kernels.matching_cost import aot_configs, matching_cost
from fastdetr.matcher import HungarianMatcher, matching_cost_ref

needs_interpreter = pytest.mark.skipif(not interpreter_enabled(),
                                       reason="CPU tensors run the kernel only under TRITON_INTERPRET=1")


def _problem(seed, layers, images, queries, classes, sizes, dtype=torch.float32):
    """Logits (L*B, Q, C+1), boxes, and the padded targets (B, T), (B, T, 4) as the matcher pads them."""
    batches = [random_batch(seed + k, images, queries, classes, sizes) for k in range(layers)]
    logits = torch.cat([outputs["pred_logits"] for outputs, _ in batches]).to(dtype)
    boxes = torch.cat([outputs["pred_boxes"] for outputs, _ in batches]).to(dtype)
    targets = batches[0][1]
    labels = torch.nn.utils.rnn.pad_sequence([t["labels"] for t in targets], batch_first=True)
    target_boxes = torch.nn.utils.rnn.pad_sequence([t["boxes"] for t in targets], batch_first=True,
                                                   padding_value=0.5)
    return logits, boxes, labels, target_boxes, targets


@needs_interpreter
@pytest.mark.parametrize("layers,images,queries,classes,sizes", [
    (6, 2, 100, 91, [30, 4]),     # DETR: 6 layers, 92 logits
    (1, 3, 7, 4, [1, 0, 3]),       # tiny, an image without targets
    (2, 1, 129, 300, [37]),        # 301 logits: three BLOCK_C chunks; 37 targets: two BLOCK_T chunks
])
def test_matches_float64_math_per_image(layers, images, queries, classes, sizes):
    logits, boxes, labels, target_boxes, targets = _problem(7 + queries, layers, images, queries, classes, sizes)
    weights = (1.5, 4.0, 2.5)
    cost = matching_cost(logits, boxes, labels, target_boxes, *weights)
    assert cost.shape == (layers * images, queries, max(sizes)) and cost.dtype == torch.float32
    assert torch.isfinite(cost).all()   # padding columns included
    for problem in range(layers * images):
        image = problem % images
        n = sizes[image]
        expected = reference_cost(logits[problem].double(), boxes[problem].double(), targets[image]["labels"],
                                  targets[image]["boxes"].double(), weights)
        assert torch.allclose(cost[problem, :, :n].double(), expected, rtol=1e-5, atol=1e-5), problem
    reference = matching_cost_ref(logits, boxes, labels, target_boxes, *weights)
    assert torch.allclose(cost, reference, rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_half_precision_logits():
    logits, boxes, labels, target_boxes, _ = _problem(3, 2, 2, 100, 91, [5, 12], dtype=torch.bfloat16)
    cost = matching_cost(logits, boxes, labels, target_boxes)
    expected = matching_cost_ref(logits, boxes, labels, target_boxes)   # the same bf16 values, in float32
    assert torch.allclose(cost, expected, rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_the_matcher_with_the_fused_cost_matches_scipy():
    """backend='triton' (fused cost + batched solver) gives the scipy backend's assignment on DETR-like data."""
    layers = [random_batch(30 + k, batch_size=3, num_queries=100, num_classes=91, sizes=[9, 0, 21])[0]
              for k in range(3)]
    _, targets = random_batch(40, batch_size=3, num_queries=100, num_classes=91, sizes=[9, 0, 21])
    outputs = {**layers[-1], "aux_outputs": layers[:-1]}
    fused, plain = HungarianMatcher(backend="triton"), HungarianMatcher(backend="scipy")
    assert fused.fused_cost and not plain.fused_cost
    for kernel_layer, scipy_layer in zip(fused.match_layers(outputs, targets), plain.match_layers(outputs, targets)):
        for (p1, t1), (p2, t2) in zip(kernel_layer, scipy_layer):
            assert torch.equal(p1, p2) and torch.equal(t1, t2)


def test_plain_cpu_runs_the_reference(monkeypatch):
    """Off the kernel path the matcher's cost is `matching_cost_ref`; the kernel itself says it cannot run."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    logits, boxes, labels, target_boxes, targets = _problem(5, 1, 2, 7, 4, [2, 3])
    matcher = HungarianMatcher(backend="auto")
    assert torch.equal(matcher.cost_blocks(logits, boxes, targets),
                       matching_cost_ref(logits, boxes, labels, target_boxes))
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        matching_cost(logits, boxes, labels, target_boxes)


def test_bad_inputs_raise():
    logits, boxes, labels, target_boxes, _ = _problem(6, 2, 2, 7, 4, [2, 3])
    with pytest.raises(ValueError, match="boxes must be"):
        matching_cost(logits, boxes[:, :5], labels, target_boxes)
    with pytest.raises(ValueError, match="target_boxes must be"):
        matching_cost(logits, boxes, labels, target_boxes[:, :1])
    with pytest.raises(ValueError, match="not a multiple of B = 3"):
        matching_cost(logits, boxes, torch.zeros(3, 3, dtype=torch.int64), torch.rand(3, 3, 4))
    with pytest.raises(ValueError, match="target_labels must be integers"):
        matching_cost(logits, boxes, labels.float(), target_boxes)


def test_aot_configs_cover_every_dtype():
    """tests/test_kernel_report.py compiles each for sm_80 and sm_90."""
    assert {c.signature["Logits_ptr"] for c in aot_configs()} == {"*fp32", "*fp16", "*bf16"}
