"""The CPU proxies suite's rows: `fastdetr.measure.proxies`' counts in the long-format results table.

benchmarks/run.py runs it (`--suites proxies`) in a process of its own, through
Triton's interpreter; what is counted, and how, is fastdetr.measure.proxies'
docstring. case "detr_r50_step_proxies" (DETR-R50) or "deformable_detr_r50_step_proxies" (Deformable-DETR-R50,
a shape with model "deformable_detr": `DEFORMABLE_R50_STEP`, `DEFORMABLE_QUICK_STEP`), provider
"<reference|fastdetr|fastdetr-static>-<matcher>", mode "train_step", one row per configuration and metric,
p50 = p20 = p80 = the count. One call measures one model (`proxy_rows(env, shape=...)`); `SHAPES` names each
level's shapes.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from fastdetr.measure.proxies import DETR_R50_STEP, StepProxies, StepShape, measure

CASE = "detr_r50_step_proxies"
# by StepShape.model; each name ends in "proxies", which benchmarks/run.py routes to the CPU proxies table
CASES = {"detr": CASE, "deformable_detr": "deformable_detr_r50_step_proxies"}
# level -> the fastdetr.measure.proxies shapes a run measures, one `proxy_rows` call (and process) each; the
# full Deformable-DETR-R50 step would take hours through the interpreter (its MSDA kernels), so both levels
# measure its quick shape (`fastdetr proxies --model deformable_detr` measures the full one by hand)
SHAPES = {"full": ("DETR_R50_STEP", "DEFORMABLE_QUICK_STEP"), "quick": ("QUICK_STEP", "DEFORMABLE_QUICK_STEP")}


def _metrics(result: StepProxies) -> list[tuple[str, str, int]]:
    """(metric, unit, value) of one configuration."""
    return [("aten_ops", "count", result.aten_ops), ("allocations", "count", result.allocations),
            ("triton_launches", "count", result.triton_launches), ("launches", "count", result.launches),
            ("optimizer_launches", "count", result.optimizer_launches),
            ("step_launches", "count", result.step_launches), ("host_syncs", "count", result.host_syncs),
            ("saved_activation_bytes", "bytes", result.saved_activation_bytes)]


def proxy_rows(env: dict, results: Sequence[StepProxies] | None = None, shape: StepShape = DETR_R50_STEP,
               device: torch.device | str = "cpu") -> list[dict]:
    """Rows of the results table (benchmarks/common.py COLUMNS), one per configuration and metric.

    env: the environment columns (device, git_sha, torch, triton, timestamp), as
    `benchmarks.common.environment("cpu")` returns them. results: measured
    already (`fastdetr.measure.proxies.measure`), or None to measure `shape` on
    `device` now (on a CPU the process must have started with TRITON_INTERPRET=1;
    DETR_R50_STEP takes minutes there, DEFORMABLE_R50_STEP far longer). The case follows each result's model.
    """
    results = measure(shape, device) if results is None else results
    rows = []
    for result in results:
        for metric, unit, value in _metrics(result):
            rows.append(dict(case=CASES[result.shape.model], provider=result.name, mode="train_step", metric=metric,
                             unit=unit, shape=result.shape.describe(), p50=value, p20=value, p80=value, **env))
    return rows
