"""What every kernel test compares with: the tolerance table of shared/DESIGN.md and the relative error."""
from __future__ import annotations

import torch

# shared/DESIGN.md: relative error ||out - ref|| / ||ref||, (forward, gradients)
TOLERANCES = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-2, 2e-2),
    torch.bfloat16: (1e-2, 2e-2),
}


def dtype_id(value) -> str:
    """pytest ids: "bfloat16", not "dtype1"."""
    return str(value).removeprefix("torch.")


def relative_error(actual: torch.Tensor, expected: torch.Tensor, norm_floor: float = 0.0) -> float:
    """||actual - expected|| / max(||expected||, norm_floor), in float64; a NaN in `actual` fails the test."""
    assert not torch.isnan(actual).any(), "NaN in the kernel's result"
    diff = (actual.double() - expected.double()).norm().item()
    return diff / max(expected.double().norm().item(), norm_floor)
