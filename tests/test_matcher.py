"""HungarianMatcher: optimal against brute force, equal to scipy on the full cross-image matrix, edge cases."""
from __future__ import annotations

import itertools
import sys

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from fastdetr import box_ops
from fastdetr.matcher import HungarianMatcher, generalized_box_iou_broadcast, scipy_solver


def random_boxes(generator: torch.Generator, *shape: int) -> torch.Tensor:
    """(*shape, 4) normalised cxcywh boxes, strictly inside the image, never degenerate."""
    centre = torch.rand(*shape, 2, generator=generator) * 0.8 + 0.1
    size = torch.rand(*shape, 2, generator=generator) * 0.3 + 0.02
    return torch.cat([centre, size], dim=-1)


def random_batch(seed: int, batch_size: int, num_queries: int, num_classes: int, sizes: list[int] | None = None,
                 max_targets: int = 30):
    generator = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(batch_size, num_queries, num_classes + 1, generator=generator) * 2,
        "pred_boxes": random_boxes(generator, batch_size, num_queries),
    }
    if sizes is None:
        sizes = torch.randint(0, max_targets + 1, (batch_size,), generator=generator).tolist()
    targets = [{"labels": torch.randint(0, num_classes, (n,), generator=generator),
                "boxes": random_boxes(generator, n)} for n in sizes]
    return outputs, targets


def reference_cost(logits: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, target_boxes: torch.Tensor,
                   weights=(1.0, 5.0, 2.0)) -> torch.Tensor:
    """The matching cost written out plainly for (N, C+1) logits, (N, 4) boxes and M targets -> (N, M)."""
    w_class, w_bbox, w_giou = weights
    prob = logits.softmax(-1)[:, labels]
    l1 = (boxes[:, None, :] - target_boxes[None, :, :]).abs().sum(-1)
    giou = box_ops.generalized_box_iou(box_ops.box_cxcywh_to_xyxy(boxes), box_ops.box_cxcywh_to_xyxy(target_boxes))
    return w_bbox * l1 - w_class * prob - w_giou * giou


def brute_force_min_cost(cost: torch.Tensor) -> float:
    """Minimum total over every assignment of min(N, M) pairs of an (N, M) cost (small problems only)."""
    rows, cols = cost.shape
    if min(rows, cols) == 0:
        return 0.0
    if rows >= cols:
        return min(sum(cost[r, c].item() for c, r in enumerate(perm))
                   for perm in itertools.permutations(range(rows), cols))
    return brute_force_min_cost(cost.T)


def check_structure(indices, num_queries: int, sizes: list[int]) -> None:
    assert len(indices) == len(sizes)
    for (pred_idx, tgt_idx), n in zip(indices, sizes):
        k = min(num_queries, n)
        assert pred_idx.dtype == tgt_idx.dtype == torch.int64
        assert pred_idx.shape == tgt_idx.shape == (k,)
        assert not pred_idx.requires_grad
        assert torch.all(pred_idx[1:] > pred_idx[:-1])  # sorted, distinct
        assert len(set(tgt_idx.tolist())) == k
        if k:
            assert 0 <= int(pred_idx.min()) and int(pred_idx.max()) < num_queries
            assert 0 <= int(tgt_idx.min()) and int(tgt_idx.max()) < n


def test_broadcast_giou_equals_box_ops_bit_for_bit():
    generator = torch.Generator().manual_seed(11)
    a = box_ops.box_cxcywh_to_xyxy(random_boxes(generator, 3, 7))
    b = box_ops.box_cxcywh_to_xyxy(random_boxes(generator, 3, 5))
    pairwise = generalized_box_iou_broadcast(a[:, :, None], b[:, None])
    assert pairwise.shape == (3, 7, 5)
    for p in range(3):
        assert torch.equal(pairwise[p], box_ops.generalized_box_iou(a[p], b[p]))
    paired = generalized_box_iou_broadcast(a[0, :5], b[0])
    assert torch.equal(paired, torch.diag(box_ops.generalized_box_iou(a[0, :5], b[0])))


@pytest.mark.parametrize("seed", range(3))
def test_optimal_against_brute_force_on_small_problems(seed):
    generator = torch.Generator().manual_seed(100 + seed)
    matcher = HungarianMatcher()
    for num_queries in range(1, 7):
        sizes = torch.randint(0, 5, (3,), generator=generator).tolist()
        outputs, targets = random_batch(int(torch.randint(0, 10**6, (1,), generator=generator)), 3, num_queries, 4,
                                        sizes=sizes)
        indices = matcher(outputs, targets)
        check_structure(indices, num_queries, sizes)
        for b, ((pred_idx, tgt_idx), target) in enumerate(zip(indices, targets)):
            cost = reference_cost(outputs["pred_logits"][b], outputs["pred_boxes"][b], target["labels"],
                                  target["boxes"])
            total = cost[pred_idx, tgt_idx].sum().item()
            assert total == pytest.approx(brute_force_min_cost(cost), abs=1e-5)


@pytest.mark.parametrize("seed", range(2))
def test_equals_scipy_on_the_full_cross_image_matrix(seed):
    """The original's formulation: one (B*Q) x (all targets) matrix, scipy on each image's diagonal block."""
    outputs, targets = random_batch(seed, batch_size=4, num_queries=100, num_classes=91)
    sizes = [len(t["labels"]) for t in targets]
    full = reference_cost(outputs["pred_logits"].flatten(0, 1), outputs["pred_boxes"].flatten(0, 1),
                          torch.cat([t["labels"] for t in targets]), torch.cat([t["boxes"] for t in targets]))
    blocks = full.view(4, 100, -1).split(sizes, dim=-1)
    indices = HungarianMatcher()(outputs, targets)
    check_structure(indices, 100, sizes)
    for b, (pred_idx, tgt_idx) in enumerate(indices):
        rows, cols = linear_sum_assignment(blocks[b][b].numpy())
        assert pred_idx.tolist() == rows.tolist()
        assert tgt_idx.tolist() == cols.tolist()


def test_empty_targets_some_and_all():
    outputs, targets = random_batch(5, batch_size=3, num_queries=10, num_classes=5, sizes=[0, 4, 0])
    indices = HungarianMatcher()(outputs, targets)
    check_structure(indices, 10, [0, 4, 0])
    outputs, targets = random_batch(6, batch_size=2, num_queries=10, num_classes=5, sizes=[0, 0])
    for pred_idx, tgt_idx in HungarianMatcher()(outputs, targets):
        assert pred_idx.numel() == tgt_idx.numel() == 0 and pred_idx.dtype == torch.int64


def test_more_targets_than_queries_assigns_every_query():
    outputs, targets = random_batch(7, batch_size=2, num_queries=3, num_classes=4, sizes=[5, 2])
    indices = HungarianMatcher()(outputs, targets)
    check_structure(indices, 3, [5, 2])
    assert indices[0][0].tolist() == [0, 1, 2]
    cost = reference_cost(outputs["pred_logits"][0], outputs["pred_boxes"][0], targets[0]["labels"],
                          targets[0]["boxes"])
    assert cost[indices[0]].sum().item() == pytest.approx(brute_force_min_cost(cost), abs=1e-5)


def test_cost_weights_change_the_result_as_expected():
    # Query 0 sits on target 0's box but is confident in target 1's class; query 1 the other way round.
    logits = torch.tensor([[[-4.0, 4.0, 0.0], [4.0, -4.0, 0.0]]])
    boxes = torch.tensor([[[0.25, 0.25, 0.2, 0.2], [0.75, 0.75, 0.2, 0.2]]])
    targets = [{"labels": torch.tensor([0, 1]), "boxes": boxes[0].clone()}]
    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    by_box = HungarianMatcher(cost_class=0, cost_bbox=5, cost_giou=2)(outputs, targets)[0]
    by_class = HungarianMatcher(cost_class=1, cost_bbox=0, cost_giou=0)(outputs, targets)[0]
    by_giou = HungarianMatcher(cost_class=0, cost_bbox=0, cost_giou=1)(outputs, targets)[0]
    assert by_box[1].tolist() == [0, 1] and by_giou[1].tolist() == [0, 1]
    assert by_class[1].tolist() == [1, 0]
    # the box terms win at DETR's weights once the class evidence is weak
    weak = {"pred_logits": logits / 8, "pred_boxes": boxes}
    assert HungarianMatcher()(weak, targets)[0][1].tolist() == [0, 1]
    with pytest.raises(ValueError, match="cannot all be 0"):
        HungarianMatcher(0, 0, 0)


def test_match_layers_equals_one_layer_at_a_time():
    layers = [random_batch(20 + k, batch_size=3, num_queries=12, num_classes=6, sizes=[3, 0, 7])[0]
              for k in range(4)]
    _, targets = random_batch(30, batch_size=3, num_queries=12, num_classes=6, sizes=[3, 0, 7])
    outputs = {**layers[-1], "aux_outputs": layers[:-1]}
    matcher = HungarianMatcher()
    together = matcher.match_layers(outputs, targets)
    assert len(together) == 4
    for layer, indices in zip(layers, together):
        alone = matcher(layer, targets)
        for (p1, t1), (p2, t2) in zip(indices, alone):
            assert torch.equal(p1, p2) and torch.equal(t1, t2)
    # forward ignores aux outputs
    last = matcher(outputs, targets)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(last, together[-1]))


def test_solver_seam_gets_padded_blocks_once_for_all_layers():
    calls = []

    def recording_solver(cost, num_targets):
        calls.append((tuple(cost.shape), list(num_targets)))
        return scipy_solver(cost, num_targets)

    layers = [random_batch(40 + k, batch_size=2, num_queries=9, num_classes=3, sizes=[4, 2])[0] for k in range(3)]
    _, targets = random_batch(50, batch_size=2, num_queries=9, num_classes=3, sizes=[4, 2])
    outputs = {**layers[-1], "aux_outputs": layers[:-1]}
    result = HungarianMatcher(backend=recording_solver).match_layers(outputs, targets)
    assert calls == [((6, 9, 4), [4, 2] * 3)]
    assert [len(r) for r in result] == [2, 2, 2]


def test_backend_selection_and_a_clear_error_without_the_kernel(monkeypatch):
    assert HungarianMatcher(backend="scipy").solver is scipy_solver
    # auto: scipy for CPU tensors, bit for bit the scipy backend (the CUDA side: tests/test_gpu.py)
    outputs, targets = random_batch(9, batch_size=2, num_queries=6, num_classes=4, sizes=[2, 3])
    for (p1, t1), (p2, t2) in zip(HungarianMatcher(backend="auto")(outputs, targets),
                                  HungarianMatcher(backend="scipy")(outputs, targets)):
        assert torch.equal(p1, p2) and torch.equal(t1, t2)
    assert not HungarianMatcher(backend="auto").fused_cost
    with pytest.raises(ValueError, match="unknown backend"):
        HungarianMatcher(backend="cuda")
    monkeypatch.setitem(sys.modules, "fastdetr.kernels.assignment", None)  # import fails
    with pytest.raises(RuntimeError, match=r"backend='triton'\) needs fastdetr.kernels.assignment"):
        HungarianMatcher(backend="triton")


def test_target_checks():
    outputs, targets = random_batch(8, batch_size=2, num_queries=6, num_classes=4, sizes=[2, 3])
    matcher = HungarianMatcher()
    with pytest.raises(ValueError, match="expected 2 dicts"):
        matcher(outputs, targets[:1])
    bad = [targets[0], {"labels": targets[1]["labels"], "boxes": targets[1]["boxes"][:, :3]}]
    with pytest.raises(ValueError, match=r"targets\[1\]\['boxes'\]"):
        matcher(outputs, bad)
    bad = [targets[0], {"labels": targets[1]["labels"].float(), "boxes": targets[1]["boxes"]}]
    with pytest.raises(ValueError, match="integer tensor"):
        matcher(outputs, bad)
    bad = [targets[0], {"labels": targets[1]["labels"][:2], "boxes": targets[1]["boxes"]}]
    with pytest.raises(ValueError, match="2 labels but 3 boxes"):
        matcher(outputs, bad)
    # value checks only when asked for (they read the tensors)
    checking = HungarianMatcher(validate_targets=True)
    out_of_range = [targets[0], {"labels": torch.tensor([0, 4, 1]), "boxes": targets[1]["boxes"]}]
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        checking(outputs, out_of_range)
    negative = targets[1]["boxes"].clone()
    negative[1, 2] = -0.1
    with pytest.raises(ValueError, match="degenerate cxcywh"):
        checking(outputs, [targets[0], {"labels": targets[1]["labels"], "boxes": negative}])


def test_nan_never_passes():
    outputs, targets = random_batch(9, batch_size=2, num_queries=6, num_classes=4, sizes=[2, 3])
    nan_target = targets[1]["boxes"].clone()
    nan_target[0, 0] = float("nan")
    nan_targets = [targets[0], {"labels": targets[1]["labels"], "boxes": nan_target}]
    with pytest.raises(ValueError, match="problem 1"):  # no value check: the solver rejects it
        HungarianMatcher()(outputs, nan_targets)
    with pytest.raises(ValueError, match="degenerate"):
        HungarianMatcher(validate_targets=True)(outputs, nan_targets)
    outputs["pred_logits"][0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="problem 0"):
        HungarianMatcher()(outputs, targets)


def test_no_gradient_through_the_matcher():
    outputs, targets = random_batch(10, batch_size=2, num_queries=8, num_classes=4, sizes=[3, 1])
    outputs = {k: v.requires_grad_() for k, v in outputs.items()}
    for pred_idx, tgt_idx in HungarianMatcher()(outputs, targets):
        assert not pred_idx.requires_grad and not tgt_idx.requires_grad


def test_triton_backend_agrees_with_scipy_through_the_seam():
    pytest.importorskip("triton", reason="the triton backend needs Triton")
    pytest.importorskip("fastdetr.kernels.assignment", reason="the batched assignment kernel is not installed")
    if not (torch.cuda.is_available() or __import__("fastdetr.backend").backend.interpreter_enabled()):
        pytest.skip("no GPU and TRITON_INTERPRET is off: the kernel would fall back to scipy")
    layers = [random_batch(60 + k, batch_size=2, num_queries=20, num_classes=5, sizes=[4, 0])[0] for k in range(2)]
    _, targets = random_batch(70, batch_size=2, num_queries=20, num_classes=5, sizes=[4, 0])
    outputs = {**layers[-1], "aux_outputs": layers[:-1]}
    by_kernel = HungarianMatcher(backend="triton").match_layers(outputs, targets)
    by_scipy = HungarianMatcher(backend="scipy").match_layers(outputs, targets)
    for kernel_layer, scipy_layer in zip(by_kernel, by_scipy):
        for (p1, t1), (p2, t2) in zip(kernel_layer, scipy_layer):
            assert torch.equal(p1, p2) and torch.equal(t1, t2)  # continuous random costs: a unique optimum


def _needs_the_kernel():
    pytest.importorskip("triton", reason="the triton backend needs Triton")
    if not (torch.cuda.is_available() or __import__("fastdetr.backend").backend.interpreter_enabled()):
        pytest.skip("no GPU and TRITON_INTERPRET is off: the kernel cannot run")


def test_triton_backend_matches_scipy_on_a_detr_batch():
    """DETR's sizes: 6 layers x 4 images x 100 queries, 91 classes, 0..30 targets; one launch for all 24 problems."""
    _needs_the_kernel()
    layers = [random_batch(80 + k, batch_size=4, num_queries=100, num_classes=91, sizes=[1, 30, 0, 13])[0]
              for k in range(6)]
    _, targets = random_batch(90, batch_size=4, num_queries=100, num_classes=91, sizes=[1, 30, 0, 13])
    outputs = {**layers[-1], "aux_outputs": layers[:-1]}
    matcher = HungarianMatcher(backend="triton")
    by_kernel = matcher.match_layers(outputs, targets)
    by_scipy = HungarianMatcher(backend="scipy").match_layers(outputs, targets)
    assert matcher.solver.last_status.shape == (24,) and (matcher.solver.last_status == 0).all()
    for kernel_layer, scipy_layer in zip(by_kernel, by_scipy):
        for (p1, t1), (p2, t2) in zip(kernel_layer, scipy_layer):
            assert p1.dtype == t1.dtype == torch.int64
            assert torch.equal(p1, p2) and torch.equal(t1, t2)  # continuous random costs: a unique optimum


def test_triton_backend_nan_is_an_error_on_cpu_and_a_status_when_unchecked():
    _needs_the_kernel()
    outputs, targets = random_batch(91, batch_size=3, num_queries=10, num_classes=4, sizes=[2, 3, 1])
    outputs["pred_boxes"][1, 4] = float("nan")
    with pytest.raises(ValueError, match="problem 1 is invalid"):
        HungarianMatcher(backend="triton")(outputs, targets)
    matcher = HungarianMatcher(backend="triton", check_invalid=False)   # what a GPU runs: no sync
    indices = matcher(outputs, targets)
    assert matcher.solver.last_status.tolist()[0] == 0 and matcher.solver.last_status.tolist()[1] != 0
    for (pred_idx, tgt_idx), n in zip(indices, [2, 3, 1]):   # the failed image gets diagonal pairs: in range
        assert len(pred_idx) == len(tgt_idx) == n
        assert pred_idx.min() >= 0 and pred_idx.max() < 10 and tgt_idx.min() >= 0 and tgt_idx.max() < n
