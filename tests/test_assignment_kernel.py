"""fastdetr.kernels.assignment against scipy's linear_sum_assignment (the oracle).

The kernel runs on the CPU through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1). Totals must equal scipy's up to float32 rounding (the
kernel solves in float32); indices must equal scipy's where the optimum is
unique. tests/test_kernel_report.py compiles every kernel configuration for
sm_80 / sm_90 and fails on a spill.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import fastdetr.kernels.assignment as assignment
from fastdetr.kernels.assignment import (
    STATUS_INFEASIBLE,
    STATUS_INVALID,
    STATUS_OK,
    aot_configs,
    assignment_forward,
    batched_linear_sum_assignment,
)

EPS32 = float(np.finfo(np.float32).eps)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _check_valid(cost: torch.Tensor, row_ind: torch.Tensor, col_ind: torch.Tensor) -> None:
    """A valid scipy-style assignment: min(N, M) pairs, rows strictly ascending, distinct columns."""
    num_rows, num_cols = cost.shape
    num_pairs = min(num_rows, num_cols)
    for ind in (row_ind, col_ind):
        assert ind.dtype == torch.int64 and ind.device == cost.device
        assert ind.shape == (num_pairs,)
    if num_pairs == 0:
        return
    assert bool((row_ind[1:] > row_ind[:-1]).all()), row_ind
    assert 0 <= int(row_ind.min()) and int(row_ind.max()) < num_rows
    assert 0 <= int(col_ind.min()) and int(col_ind.max()) < num_cols
    assert len(set(col_ind.tolist())) == num_pairs


def _check_optimal(cost: torch.Tensor, row_ind: torch.Tensor, col_ind: torch.Tensor) -> None:
    """Valid, and its total equals scipy's up to float32 rounding of the duals."""
    _check_valid(cost, row_ind, col_ind)
    cost64 = cost.double()
    ref_rows, ref_cols = linear_sum_assignment(cost64.numpy())
    ref_total = float(cost64.numpy()[ref_rows, ref_cols].sum())
    total = float(cost64[row_ind, col_ind].sum())
    finite = cost64[torch.isfinite(cost64)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    # Each reduced cost the kernel compares is a float32 sum of terms up to the largest cost.
    tol = 4 * EPS32 * max(1, min(cost.shape)) * scale
    assert abs(total - ref_total) <= tol, (tuple(cost.shape), total, ref_total, tol)


def _kinds(seed: int) -> list[torch.Tensor]:
    """One of each kind of problem the solver must handle, with different sizes."""
    g = _generator(seed)
    wide_range = lambda n, m: 10 ** (torch.rand(n, m, generator=g) * 7 - 3)  # noqa: E731  1e-3..1e4
    return [
        torch.rand(7, 5, generator=g),  # random, more rows than columns
        torch.rand(5, 9, generator=g),  # random, more columns than rows
        torch.rand(13, 13, generator=g),  # random, square
        torch.randint(0, 3, (8, 6), generator=g).float(),  # small integers: many ties
        torch.randint(0, 2, (9, 12), generator=g).float(),
        torch.full((6, 4), 2.5),  # constant
        torch.full((4, 4), -1.0),
        -torch.rand(9, 7, generator=g) * 100,  # negative
        wide_range(10, 8),
        wide_range(6, 15),
        torch.rand(1, 9, generator=g),  # thin
        torch.rand(9, 1, generator=g),
        torch.rand(1, 1, generator=g),
        torch.randn(4, 12, generator=g),  # wide
        torch.randn(12, 3, generator=g),  # tall
        torch.empty(5, 0),  # empty
        torch.empty(0, 6),
        torch.empty(0, 0),
    ]


def test_every_kind_in_one_batch_matches_scipy_total():
    costs = _kinds(0)
    results = batched_linear_sum_assignment(costs)
    assert len(results) == len(costs)
    for cost, (row_ind, col_ind) in zip(costs, results):
        _check_optimal(cost, row_ind, col_ind)


def test_unique_optimum_same_indices_as_scipy():
    g = _generator(1)
    shapes = [(5, 5), (6, 11), (11, 6), (1, 7), (7, 1), (17, 3), (3, 17), (20, 20)]
    costs = [torch.rand(shape, generator=g) for shape in shapes]
    for cost, (row_ind, col_ind) in zip(costs, batched_linear_sum_assignment(costs)):
        ref_rows, ref_cols = linear_sum_assignment(cost.numpy())
        assert row_ind.tolist() == ref_rows.tolist()
        assert col_ind.tolist() == ref_cols.tolist()


def test_moderate_problems_both_orientations():
    # DETR-like: many queries, fewer targets; and the transpose (more targets than queries).
    g = _generator(2)
    costs = [torch.rand(300, 60, generator=g), torch.rand(60, 300, generator=g)]
    for cost, (row_ind, col_ind) in zip(costs, batched_linear_sum_assignment(costs)):
        ref_rows, ref_cols = linear_sum_assignment(cost.numpy())
        assert row_ind.tolist() == ref_rows.tolist()
        assert col_ind.tolist() == ref_cols.tolist()


def test_random_mixed_batch_not_tuned_on():
    """Sizes and kinds drawn at random (a seed the solver was never looked at with)."""
    rng = np.random.default_rng(20240607)
    costs = []
    for _ in range(20):
        shape = tuple(int(s) for s in rng.integers(0, 25, size=2))
        kind = int(rng.integers(0, 5))
        if kind == 0:
            cost = rng.random(shape)
        elif kind == 1:
            cost = rng.integers(-2, 3, shape).astype(float)
        elif kind == 2:
            cost = 10 ** rng.uniform(-3, 4, shape)
        elif kind == 3:
            cost = rng.normal(size=shape) * 1e3
        else:
            cost = np.full(shape, rng.normal())
        costs.append(torch.from_numpy(cost.astype(np.float32)))
    for cost, (row_ind, col_ind) in zip(costs, batched_linear_sum_assignment(costs)):
        _check_optimal(cost, row_ind, col_ind)


def test_float64_and_integer_inputs():
    g = _generator(3)
    costs64 = [torch.rand(6, 9, generator=g, dtype=torch.float64), torch.rand(8, 3, generator=g, dtype=torch.float64)]
    for cost, (row_ind, col_ind) in zip(costs64, batched_linear_sum_assignment(costs64)):
        ref_rows, ref_cols = linear_sum_assignment(cost.numpy())
        assert row_ind.tolist() == ref_rows.tolist() and col_ind.tolist() == ref_cols.tolist()
    costs_int = [torch.randint(0, 5, (7, 10), generator=g), torch.randint(-3, 3, (9, 4), generator=g)]
    for cost, (row_ind, col_ind) in zip(costs_int, batched_linear_sum_assignment(costs_int)):
        _check_optimal(cost, row_ind, col_ind)


def test_plus_inf_entries_are_forbidden_pairs():
    g = _generator(4)
    costs = []
    for shape in [(8, 6), (5, 9), (7, 7)]:
        cost = torch.rand(shape, generator=g)
        cost[torch.rand(shape, generator=g) < 0.4] = float("inf")
        diagonal = torch.arange(min(shape))
        cost[diagonal, diagonal] = torch.rand(min(shape), generator=g) + 5  # a costly finite assignment exists
        costs.append(cost)
    for cost, (row_ind, col_ind) in zip(costs, batched_linear_sum_assignment(costs)):
        assert bool(torch.isfinite(cost[row_ind, col_ind]).all())
        _check_optimal(cost, row_ind, col_ind)


def test_infeasible_raises_like_scipy():
    inf = float("inf")
    cost = torch.tensor([[inf, inf, inf], [1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    with pytest.raises(ValueError):
        linear_sum_assignment(cost.numpy())
    with pytest.raises(ValueError, match="infeasible"):
        batched_linear_sum_assignment([torch.rand(3, 3), cost])


@pytest.mark.parametrize("bad_value", [float("nan"), float("-inf")])
@pytest.mark.parametrize("shape", [(4, 6), (6, 4)])
def test_nan_and_minus_inf_rejected(bad_value, shape):
    cost = torch.rand(shape)
    cost[-1, -2] = bad_value
    with pytest.raises(ValueError, match=r"costs\[1\] contains NaN or -inf"):
        batched_linear_sum_assignment([torch.rand(3, 5), cost])


def test_bad_input_errors():
    assert batched_linear_sum_assignment([]) == []
    with pytest.raises(ValueError, match="2-D"):
        batched_linear_sum_assignment([torch.rand(5)])
    with pytest.raises(ValueError, match="2-D"):
        batched_linear_sum_assignment([torch.rand(3, 3), torch.rand(2, 3, 3)])
    with pytest.raises(ValueError, match="one device"):
        batched_linear_sum_assignment([torch.rand(3, 3), torch.rand(3, 3, device="meta")])
    with pytest.raises(TypeError, match="not a Tensor"):
        batched_linear_sum_assignment([np.zeros((3, 3))])
    with pytest.raises(ValueError, match=r"\[P, N_max, M_max\]"):
        assignment_forward(torch.rand(3, 3), torch.tensor([3]), torch.tensor([3]))
    with pytest.raises(ValueError, match="num_cols"):
        assignment_forward(torch.rand(2, 3, 3), torch.tensor([3, 3]), torch.tensor([3]))


def test_launcher_on_a_padded_batch():
    """The matcher's entry point: one padded tensor, sizes as tensors, errors only in `status`."""
    g = _generator(5)
    sizes = [(9, 4), (3, 12), (0, 5), (6, 6), (5, 7), (4, 2)]
    padded = torch.full((len(sizes), 9, 12), float("nan"))  # padding must never be read
    for p, (n, m) in enumerate(sizes):
        padded[p, :n, :m] = torch.rand(n, m, generator=g)
    padded[4, 2, 3] = float("nan")  # problem 4: invalid
    padded[5, :, 0] = float("inf")  # problem 5: two columns, one unusable -> infeasible
    num_rows = torch.tensor([n for n, _ in sizes])  # int64: the launcher converts
    num_cols = torch.tensor([m for _, m in sizes])
    out = assignment_forward(padded, num_rows, num_cols)

    assert out.col_for_row.shape == (6, 9) and out.row_ind.shape == (6, 9) and out.col_ind.shape == (6, 9)
    assert out.status.tolist() == [STATUS_OK] * 4 + [STATUS_INVALID, STATUS_INFEASIBLE]
    for p, (n, m) in enumerate(sizes[:4]):
        ref_rows, ref_cols = linear_sum_assignment(padded[p, :n, :m].numpy())
        k = min(n, m)
        assert out.row_ind[p, :k].tolist() == ref_rows.tolist()
        assert out.col_ind[p, :k].tolist() == ref_cols.tolist()
        assert out.row_ind[p, k:].tolist() == [-1] * (9 - k) and out.col_ind[p, k:].tolist() == [-1] * (9 - k)
        expected = [-1] * 9
        for row, col in zip(ref_rows.tolist(), ref_cols.tolist()):
            expected[row] = col
        assert out.col_for_row[p].tolist() == expected


def test_launcher_with_nothing_to_assign():
    out = assignment_forward(torch.empty(3, 4, 0), torch.tensor([4, 2, 0]), torch.zeros(3, dtype=torch.int64))
    assert out.col_for_row.tolist() == [[-1] * 4] * 3
    assert out.row_ind.shape == (3, 0) and out.status.tolist() == [STATUS_OK] * 3


def test_scipy_fallback_without_triton(monkeypatch):
    def no_kernel(*args, **kwargs):
        raise AssertionError("the kernel must not run without CUDA or the interpreter")

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(assignment, "assignment_forward", no_kernel)
    costs = _kinds(6)
    for cost, (row_ind, col_ind) in zip(costs, batched_linear_sum_assignment(costs)):
        ref_rows, ref_cols = linear_sum_assignment(cost.numpy())
        assert row_ind.tolist() == ref_rows.tolist() and col_ind.tolist() == ref_cols.tolist()
        assert row_ind.dtype == torch.int64 and col_ind.dtype == torch.int64
    with pytest.raises(ValueError):
        batched_linear_sum_assignment([torch.tensor([[float("nan")]])])


def test_problems_wider_than_the_block_go_to_scipy():
    g = _generator(7)
    big, small = torch.rand(1100, 2, generator=g), torch.rand(3, 4, generator=g)
    (big_rows, big_cols), (small_rows, small_cols) = batched_linear_sum_assignment([big, small])
    ref_rows, ref_cols = linear_sum_assignment(big.numpy())
    assert big_rows.tolist() == ref_rows.tolist() and big_cols.tolist() == ref_cols.tolist()
    _check_optimal(small, small_rows, small_cols)
    with pytest.raises(ValueError, match="exceeds"):
        assignment_forward(torch.rand(1, 1, 1100), torch.tensor([1]), torch.tensor([1100]))


# ---------------------------------------------------------------------------
# ahead-of-time compile: tests/test_kernel_report.py compiles every config for sm_80 / sm_90 and fails on a spill


def test_aot_configs_cover_the_launcher():
    blocks = sorted(config.constexprs["BLOCK"] for config in aot_configs())
    assert blocks[-1] == assignment.MAX_BLOCK
    for width in (1, 16, 33, 100, 300, 900, 1000, 1024):
        block, num_warps = assignment._launch_config(width)
        assert block >= width and block in blocks
        assert {"num_warps": num_warps} in [c.options for c in aot_configs() if c.constexprs["BLOCK"] == block]
