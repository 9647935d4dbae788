"""The CPU proxies suite's rows: `fastdetr.measure.proxies`' counts in the long-format results table.

benchmarks/run.py runs it (`--suites proxies`) in a process of its own, through
Triton's interpreter; what is counted, and how, is fastdetr.measure.proxies'
docstring. case "detr_r50_step_proxies", provider "<reference|fastdetr|fastdetr-static>-<matcher>",
mode "train_step", one row per configuration and metric, p50 = p20 = p80 = the count.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from fastdetr.measure.proxies import DETR_R50_STEP, StepProxies, StepShape, measure

CASE = "detr_r50_step_proxies"


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
    DETR_R50_STEP takes minutes there).
    """
    results = measure(shape, device) if results is None else results
    rows = []
    for result in results:
        for metric, unit, value in _metrics(result):
            rows.append(dict(case=CASE, provider=result.name, mode="train_step", metric=metric, unit=unit,
                             shape=result.shape.describe(), p50=value, p20=value, p80=value, **env))
    return rows
