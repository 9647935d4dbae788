"""Exact batched linear assignment (the Hungarian matcher's solver) in one Triton launch.

The original DETR matcher copies each image's cost block to the host and calls
`scipy.optimize.linear_sum_assignment` image by image. Here every problem of a
batch (every image of every decoder layer) is solved by its own Triton program
in one launch, and the results stay on the device.

Algorithm: shortest augmenting paths with dual variables, the Jonker-Volgenant
family that scipy's solver belongs to (Crouse, "On implementing 2D rectangular
assignment algorithms", 2016). For each row to assign, a Dijkstra-like search
over the columns on reduced costs `cost[i, j] - u[i] - v[j]`, vectorised over a
block of BLOCK >= (number of columns) lanes; then the column duals are updated
and the matching is flipped along the path found. How it differs from scipy's:
- Everything lives in registers, indexed by column: the column duals `v`, the
  row held by each column, the search's path and distances. The row duals are
  never stored: a matched edge is tight (zero reduced cost), so the dual of the
  row held by column j is `cost[i, j] - v[j]`, read when the search reaches it.
- Ties between equally short columns go to a free column first (as in scipy),
  then to the lowest column index; with ties another optimal assignment than
  scipy's may come out, always with the same total.
- Each problem is transposed internally (through its strides) so that the rows
  assigned are the smaller dimension: min(N, M) pairs, rows ascending, like scipy.

Numbers: costs are solved in float32 (float64 inputs are rounded to float32 on
every device), so totals equal scipy's up to float32 rounding. +inf entries are
allowed (forbidden pairs), as in scipy; a problem with no finite complete
assignment is reported infeasible. NaN and -inf entries are invalid.

Errors without a host sync: the kernel writes a status per problem (0 ok,
1 NaN or -inf entry, 2 infeasible, 3 search cap reached: a bug) instead of
raising. `assignment_forward` (the launcher for the matcher) only returns that
status tensor; `batched_linear_sum_assignment` (the public helper, whose
results are read on the host anyway) reads it once per call and raises
ValueError.

Limits: the column block holds max(N, M) of the largest problem; BLOCK is at
most 1024, so each problem has at most 1024 rows and 1024 columns in the kernel
(`batched_linear_sum_assignment` hands larger problems to scipy). The work per
problem is O(min(N, M)^2 * BLOCK) in the worst case, serial within a program:
the kernel is meant for many small problems (DETR: 100 x 0..60; DINO: 900 x
0..100), not one huge one. A transposed problem (more rows than columns, the
DETR case) reads its cost matrix column by column, in strided loads; a search
re-reads a cost row per step, from cache at these sizes. No autograd:
assignment has no gradient. Registers: at most 8 lanes per thread, no spills
(checked by the tests' ahead-of-time compile for sm_80 / sm_90).

Reference and fallback: `linear_sum_assignment_ref` (scipy).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch
import triton
import triton.language as tl
from scipy.optimize import linear_sum_assignment as _scipy_linear_sum_assignment
from torch import Tensor

from fastdetr.backend import use_triton
from fastdetr.kernels.common import KernelConfig

STATUS_OK = 0
STATUS_INVALID = 1  # a NaN or -inf entry
STATUS_INFEASIBLE = 2  # no complete assignment with finite cost
STATUS_SEARCH_CAP = 3  # a search ran past its bound: a bug, never expected

MAX_BLOCK = 1024  # widest column block: max(N, M) of any problem the kernel takes

# The same values as the kernel sees them (jit code reads only constexpr globals).
_INF = tl.constexpr(float("inf"))
_INVALID = tl.constexpr(STATUS_INVALID)
_INFEASIBLE = tl.constexpr(STATUS_INFEASIBLE)
_SEARCH_CAP = tl.constexpr(STATUS_SEARCH_CAP)


def linear_sum_assignment_ref(cost: Tensor) -> tuple[Tensor, Tensor]:
    """scipy's solver on one (N, M) cost matrix -> (row_ind, col_ind) int64 on cost's device.

    The oracle the kernel is tested against and the fallback without Triton.
    Raises scipy's ValueError on NaN, -inf or an infeasible matrix.
    """
    rows, cols = _scipy_linear_sum_assignment(cost.detach().cpu().numpy())
    return (
        torch.from_numpy(rows.astype(np.int64)).to(cost.device),
        torch.from_numpy(cols.astype(np.int64)).to(cost.device),
    )


# ---------------------------------------------------------------------------
# configs: one per column block width; nothing here touches a GPU


def _configs() -> list[tuple[int, int]]:
    """(BLOCK, num_warps) pairs the launcher may pick: few lanes per thread, one warp when it fits.

    Each search step is a chain of block reductions over the columns, so it is
    latency bound: one warp (no shared-memory round trip) while a thread holds
    at most 8 lanes, then more warps to keep 8 lanes per thread.
    """
    return [(32, 1), (64, 1), (128, 1), (256, 1), (512, 2), (1024, 4)]


@triton.jit
def _assignment_fwd_kernel(
    cost_ptr,  # [P, N_max, M_max] fp32, padded; problem p is cost[p, :N_p, :M_p]
    num_rows_ptr,  # [P] int32: N_p
    num_cols_ptr,  # [P] int32: M_p
    col_for_row_ptr,  # [P, N_max] int64 out: column given to each row, -1 for none / padding
    row_ind_ptr,  # [P, K_max] int64 out: rows of the min(N_p, M_p) pairs, ascending; -1 padding
    col_ind_ptr,  # [P, K_max] int64 out: their columns; -1 padding
    status_ptr,  # [P] int32 out: STATUS_* of each problem
    stride_cost_p,
    stride_cost_n,
    stride_cost_m,  # strides of cost
    n_max,
    m_max,  # N_max, M_max: padded sizes (also the stride of col_for_row)
    k_max,  # min(N_max, M_max): the stride of row_ind / col_ind
    BLOCK: tl.constexpr,  # power of two >= max(N_max, M_max)
):
    pid = tl.program_id(0)
    n = tl.minimum(tl.load(num_rows_ptr + pid), n_max)
    m = tl.minimum(tl.load(num_cols_ptr + pid), m_max)
    # Transpose through the strides so the assigned side is the smaller one.
    transposed = n > m
    num_assign = tl.minimum(n, m)  # rows of the internal problem
    num_free = tl.maximum(n, m)  # columns of the internal problem
    stride_row = tl.where(transposed, stride_cost_m, stride_cost_n)
    stride_col = tl.where(transposed, stride_cost_n, stride_cost_m)
    cost_base = cost_ptr + pid.to(tl.int64) * stride_cost_p

    offs = tl.arange(0, BLOCK)
    col_valid = offs < num_free
    col_offs = offs.to(tl.int64) * stride_col

    v = tl.zeros([BLOCK], dtype=tl.float32)  # column duals
    row4col = tl.full([BLOCK], -1, dtype=tl.int32)  # internal row held by each column
    status = tl.full([], 0, dtype=tl.int32)
    cur = tl.full([], 0, dtype=tl.int32)  # the row being assigned; rows < cur hold a column
    while (cur < num_assign) & (status == 0):
        # stage 1: shortest augmenting path from row `cur` (Dijkstra over columns)
        row_cost = tl.load(cost_base + cur.to(tl.int64) * stride_row + col_offs, mask=col_valid, other=_INF)
        # Every row is loaded here once, so this sees every entry of the problem.
        invalid = tl.max(((row_cost != row_cost) | (row_cost == -_INF)).to(tl.int32), axis=0)
        status = tl.where(invalid > 0, _INVALID, status)

        dist = tl.full([BLOCK], _INF, dtype=tl.float32)  # shortest reduced distance to each column
        path = tl.full([BLOCK], -1, dtype=tl.int32)  # row preceding each column on its shortest path
        scanned = offs >= num_free  # padding lanes count as scanned: never picked
        min_val = tl.zeros([], dtype=tl.float32)  # distance of the row being scanned
        u_i = tl.zeros([], dtype=tl.float32)  # its dual (0 for the new row)
        i = cur
        sink = tl.full([], -1, dtype=tl.int32)  # free column ending the path
        steps = tl.full([], 0, dtype=tl.int32)
        searching = status == 0
        # A step scans one column; at most cur columns are held, so the cur+1-th is free.
        while searching:
            reduced = min_val + row_cost - u_i - v
            improve = (reduced < dist) & (~scanned)
            dist = tl.where(improve, reduced, dist)
            path = tl.where(improve, i, path)
            open_dist = tl.where(scanned, _INF, dist)
            lowest = tl.min(open_dist, axis=0)
            tie = (open_dist == lowest) & (~scanned)
            free_tie = tie & (row4col < 0)
            any_free = tl.max(free_tie.to(tl.int32), axis=0) > 0
            pick = tl.where(any_free, free_tie, tie)
            j = tl.min(tl.where(pick, offs, BLOCK), axis=0)
            j = tl.where(lowest < _INF, j, BLOCK)  # BLOCK: every open column is out of reach
            feasible = j < BLOCK
            hit = offs == j
            scanned = scanned | hit
            held_by = tl.max(tl.where(hit, row4col, -1), axis=0)
            min_val = tl.where(feasible, lowest, min_val)
            sink = tl.where(feasible & (held_by < 0), j, sink)
            # Move to the row holding column j; its dual makes the matched edge tight.
            i = tl.where(held_by >= 0, held_by, i)
            row_cost = tl.load(cost_base + i.to(tl.int64) * stride_row + col_offs, mask=col_valid, other=_INF)
            u_i = tl.sum(tl.where(hit, row_cost - v, 0.0), axis=0)
            status = tl.where(feasible, status, _INFEASIBLE)
            steps += 1
            searching = feasible & (sink < 0) & (steps <= cur)
        status = tl.where((status == 0) & (sink < 0), _SEARCH_CAP, status)

        # stage 2: dual update on the scanned columns (row duals follow implicitly)
        found = sink >= 0
        v = tl.where(scanned & col_valid & found, v - (min_val - dist), v)

        # stage 3: augment, flipping the matching from the sink back to row cur
        j = sink
        steps = tl.full([], 0, dtype=tl.int32)
        while (j >= 0) & (steps <= cur):
            hit = offs == j
            i = tl.max(tl.where(hit, path, -1), axis=0)
            prev_j = tl.min(tl.where(row4col == i, offs, BLOCK), axis=0)  # BLOCK when i == cur
            row4col = tl.where(hit, i, row4col)
            j = tl.where(prev_j < BLOCK, prev_j, -1)
            steps += 1
        cur += 1

    # epilogue: back to the caller's orientation. Scatter addresses are distinct
    # and disjoint from the padding stores, so no store races another.
    neg_one = tl.full([BLOCK], -1, dtype=tl.int64)
    col_for_row_base = col_for_row_ptr + pid.to(tl.int64) * n_max
    cfr_addr = tl.where(transposed, offs, row4col)
    cfr_val = tl.where(transposed, row4col, offs)
    cfr_mask = tl.where(transposed, offs < n, row4col >= 0)
    tl.store(col_for_row_base + cfr_addr, cfr_val.to(tl.int64), mask=cfr_mask)
    tl.store(col_for_row_base + offs, neg_one, mask=(offs >= n) & (offs < n_max))

    # Pairs sorted by original row: row k itself, or, transposed, its rank among held columns.
    held = col_valid & (row4col >= 0)
    rank = tl.cumsum(held.to(tl.int32), axis=0) - 1
    pair_pos = tl.where(transposed, rank, row4col)
    pair_row = tl.where(transposed, offs, row4col)
    pair_col = tl.where(transposed, row4col, offs)
    row_ind_base = row_ind_ptr + pid.to(tl.int64) * k_max
    col_ind_base = col_ind_ptr + pid.to(tl.int64) * k_max
    tl.store(row_ind_base + pair_pos, pair_row.to(tl.int64), mask=held)
    tl.store(col_ind_base + pair_pos, pair_col.to(tl.int64), mask=held)
    pad = (offs >= num_assign) & (offs < k_max)
    tl.store(row_ind_base + offs, neg_one, mask=pad)
    tl.store(col_ind_base + offs, neg_one, mask=pad)
    tl.store(status_ptr + pid, status)


# ---------------------------------------------------------------------------
# launchers


class Assignment(NamedTuple):
    """Device results of one batched solve; P problems, padded to N_max rows and K_max = min(N_max, M_max).

    col_for_row: [P, N_max] int64, the column given to each row, -1 for an unassigned or padding row.
    row_ind, col_ind: [P, K_max] int64, the min(N_p, M_p) pairs of problem p first, rows ascending
        (as scipy returns them), then -1.
    status: [P] int32, STATUS_OK or the STATUS_* error of each problem; where it is not
        STATUS_OK that problem's other outputs are undefined.
    """

    col_for_row: Tensor
    row_ind: Tensor
    col_ind: Tensor
    status: Tensor


def _launch_config(width: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for problems with at most `width` columns after transposition."""
    for block, num_warps in _configs():
        if block >= width:
            return block, num_warps
    raise ValueError(f"assignment kernel: max(N, M) = {width} exceeds the kernel's limit of {MAX_BLOCK}")


def aot_configs() -> list[KernelConfig]:
    """Every (kernel, signature, constexprs, options) the launcher can run, for ahead-of-time compiles.

    Compile them in a process where TRITON_INTERPRET is off (Triton's
    interpreter replaces the kernel and parts of triton.language at import).
    """
    signature = {
        "cost_ptr": "*fp32",
        "num_rows_ptr": "*i32",
        "num_cols_ptr": "*i32",
        "col_for_row_ptr": "*i64",
        "row_ind_ptr": "*i64",
        "col_ind_ptr": "*i64",
        "status_ptr": "*i32",
        "stride_cost_p": "i32",
        "stride_cost_n": "i32",
        "stride_cost_m": "i32",
        "n_max": "i32",
        "m_max": "i32",
        "k_max": "i32",
        "BLOCK": "constexpr",
    }
    return [
        KernelConfig(_assignment_fwd_kernel, dict(signature), {"BLOCK": block}, {"num_warps": num_warps})
        for block, num_warps in _configs()
    ]


def assignment_forward(cost: Tensor, num_rows: Tensor, num_cols: Tensor) -> Assignment:
    """Solve P padded problems in one launch, with no host sync.

    cost: [P, N_max, M_max], problem p is cost[p, :num_rows[p], :num_cols[p]] (padding
        is never read); solved in float32.
    num_rows, num_cols: [P] integer tensors on cost's device; values above N_max / M_max
        are clamped to them.
    Returns an `Assignment` of device tensors. Errors (NaN, infeasible) are only
    reported in its `status`, never raised: reading it needs a host sync.
    Raises ValueError (from shapes alone) when max(N_max, M_max) > MAX_BLOCK.
    """
    if cost.dim() != 3:
        raise ValueError(f"assignment_forward: cost must be [P, N_max, M_max], got shape {tuple(cost.shape)}")
    num_problems, n_max, m_max = cost.shape
    for name, sizes in (("num_rows", num_rows), ("num_cols", num_cols)):
        if sizes.shape != (num_problems,) or sizes.device != cost.device:
            raise ValueError(
                f"assignment_forward: {name} must be a [{num_problems}] tensor on {cost.device}, "
                f"got shape {tuple(sizes.shape)} on {sizes.device}"
            )
    return Assignment(*torch.ops.fastdetr.assignment(cost, num_rows, num_cols))


# The kernel as a torch.library custom op (`fastdetr::assignment`), which torch.compile (fullgraph) and CUDA
# graphs hold as one node: (col_for_row, row_ind, col_ind, status), `Assignment`'s fields.

@torch.library.custom_op("fastdetr::assignment", mutates_args=())
def assignment_op(cost: Tensor, num_rows: Tensor, num_cols: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`assignment_forward`'s launch, its arguments checked."""
    num_problems, n_max, m_max = cost.shape
    k_max = min(n_max, m_max)
    device = cost.device
    col_for_row = torch.empty((num_problems, n_max), dtype=torch.int64, device=device)
    row_ind = torch.empty((num_problems, k_max), dtype=torch.int64, device=device)
    col_ind = torch.empty((num_problems, k_max), dtype=torch.int64, device=device)
    status = torch.empty((num_problems,), dtype=torch.int32, device=device)
    if num_problems == 0 or k_max == 0:  # nothing to assign, and no entry to check
        col_for_row.fill_(-1)
        status.zero_()
        return col_for_row, row_ind, col_ind, status
    block, num_warps = _launch_config(max(n_max, m_max))
    cost = cost.to(torch.float32).contiguous()
    _assignment_fwd_kernel[(num_problems,)](
        cost,
        num_rows.to(torch.int32).contiguous(),
        num_cols.to(torch.int32).contiguous(),
        col_for_row,
        row_ind,
        col_ind,
        status,
        cost.stride(0),
        cost.stride(1),
        cost.stride(2),
        n_max,
        m_max,
        k_max,
        BLOCK=block,
        num_warps=num_warps,
    )
    return col_for_row, row_ind, col_ind, status


@assignment_op.register_fake
def _(cost, num_rows, num_cols):
    num_problems, n_max, m_max = cost.shape
    k_max = min(n_max, m_max)
    index = dict(dtype=torch.int64)
    return (cost.new_empty((num_problems, n_max), **index), cost.new_empty((num_problems, k_max), **index),
            cost.new_empty((num_problems, k_max), **index), cost.new_empty((num_problems,), dtype=torch.int32))


def padded_assignment(cost: Tensor, num_rows: Sequence[int], num_cols: Sequence[int]) -> Assignment:
    """`assignment_forward` with the problem sizes given as host ints: still no host sync.

    The sizes reach the device from a pinned host buffer, asynchronously (a
    pageable one would wait for the device). The one launcher behind both
    `batched_linear_sum_assignment` and the matcher's device solver.
    """
    sizes = torch.tensor([list(num_rows), list(num_cols)], dtype=torch.int32).reshape(2, -1)
    sizes = sizes.pin_memory().to(cost.device, non_blocking=True) if cost.is_cuda else sizes.to(cost.device)
    return assignment_forward(cost, sizes[0], sizes[1])


def assignment_pairs(result: Assignment, num_pairs: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
    """The first num_pairs[p] (row, col) pairs of every problem, views of the device results.

    A problem whose status is not STATUS_OK gets the diagonal pairs (k, k)
    instead: always valid indices, chosen on the device (no host sync), so a
    caller that cannot read the status yet still gets usable indices.
    """
    ok = (result.status == STATUS_OK)[:, None]
    diagonal = torch.arange(result.row_ind.shape[1], device=result.row_ind.device)
    row_ind = torch.where(ok, result.row_ind, diagonal)
    col_ind = torch.where(ok, result.col_ind, diagonal)
    return [(row_ind[p, :n], col_ind[p, :n]) for p, n in enumerate(num_pairs)]


# ---------------------------------------------------------------------------
# public function


def _check_costs(costs: Sequence[Tensor]) -> list[Tensor]:
    costs = list(costs)
    for k, cost in enumerate(costs):
        if not isinstance(cost, Tensor):
            raise TypeError(f"batched_linear_sum_assignment: costs[{k}] is a {type(cost).__name__}, not a Tensor")
        if cost.dim() != 2:
            raise ValueError(
                f"batched_linear_sum_assignment: costs[{k}] must be a 2-D (N, M) matrix, "
                f"got shape {tuple(cost.shape)}"
            )
        if cost.is_complex():
            raise ValueError(f"batched_linear_sum_assignment: costs[{k}] is complex ({cost.dtype})")
    devices = {cost.device for cost in costs}
    if len(devices) > 1:
        raise ValueError(
            f"batched_linear_sum_assignment: all cost matrices must be on one device, got {sorted(map(str, devices))}"
        )
    return costs


def batched_linear_sum_assignment(costs: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """Minimum-cost assignment of each (N_p, M_p) cost matrix, like scipy's `linear_sum_assignment`.

    costs: a list of 2-D tensors, shapes may differ, all on one device.
    Returns a list of (row_ind, col_ind) int64 tensors on that device, min(N_p, M_p)
    pairs each, rows ascending. Ties may give another optimal assignment than scipy's.

    CUDA tensors (or CPU tensors under TRITON_INTERPRET=1) are solved by one Triton
    launch, in float32; problems with max(N, M) > MAX_BLOCK by scipy. Otherwise
    scipy solves each. Raises ValueError for a NaN or -inf entry or an infeasible
    matrix (+inf entries are allowed). On the GPU this is checked from the
    kernel's status tensor, read here once per call -- the one host sync, where
    the results are returned for use anyway; `assignment_forward` never syncs.
    """
    costs = _check_costs(costs)
    if not use_triton(*costs):
        return [linear_sum_assignment_ref(cost) for cost in costs]

    results: list[tuple[Tensor, Tensor] | None] = [None] * len(costs)
    in_kernel = [k for k, cost in enumerate(costs) if max(cost.shape) <= MAX_BLOCK]
    for k in range(len(costs)):
        if k not in in_kernel:
            results[k] = linear_sum_assignment_ref(costs[k])
    if not in_kernel:
        return results
    device = costs[0].device
    n_max = max(costs[k].shape[0] for k in in_kernel)
    m_max = max(costs[k].shape[1] for k in in_kernel)
    padded = torch.zeros((len(in_kernel), n_max, m_max), dtype=torch.float32, device=device)
    for slot, k in enumerate(in_kernel):
        padded[slot, : costs[k].shape[0], : costs[k].shape[1]] = costs[k].detach()
    out = padded_assignment(padded, [costs[k].shape[0] for k in in_kernel], [costs[k].shape[1] for k in in_kernel])
    pairs = assignment_pairs(out, [min(costs[k].shape) for k in in_kernel])

    status = out.status.cpu()  # the one host sync
    for slot, k in enumerate(in_kernel):
        code = int(status[slot])
        # A search that fails before reaching a NaN row reports infeasible: name the NaN, as scipy does.
        invalid = code == STATUS_INFEASIBLE and bool((torch.isnan(costs[k]) | torch.isneginf(costs[k])).any())
        if code == STATUS_INVALID or invalid:
            raise ValueError(f"batched_linear_sum_assignment: costs[{k}] contains NaN or -inf entries")
        if code == STATUS_INFEASIBLE:
            raise ValueError(f"batched_linear_sum_assignment: costs[{k}] is infeasible (no finite assignment)")
        if code != STATUS_OK:
            raise RuntimeError(f"batched_linear_sum_assignment: solver failed on costs[{k}] (status {code})")
        results[k] = pairs[slot]
    return results
