"""The optimizer and gradient clipping the trainer uses, each one call per step instead of one per tensor.

DETR's recipe is AdamW plus gradient-norm clipping. With stock PyTorch on
the CPU both run tensor by tensor: `clip_grad_norm_` uses its foreach path
only on CUDA (a small DETR has ~150 parameter tensors, so ~150 norm calls and
~150 multiplies per step), and AdamW's default there is the per-tensor loop.
Together they were about 15% of the demo's CPU step. Here:

- `adamw(...)`: AdamW with the fused implementation where this torch has one
  for the device (CUDA, and the CPU since torch 2.4), else the foreach one.
- `clip_grad_norm(...)`: the same result as `torch.nn.utils.clip_grad_norm_`
  (total 2-norm over every gradient, scaled by max_norm / (norm + 1e-6) when
  that is below 1), computed with `torch._foreach_norm` / `_foreach_mul_` on
  any device: one dispatch for all norms and one for all multiplies. No host
  sync: the clip coefficient stays a tensor.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor


def _fused_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 4)


def adamw(param_groups: list[dict[str, Any]], lr: float, weight_decay: float,
          device: torch.device) -> torch.optim.AdamW:
    """AdamW over `param_groups` (each a dict with "params" and optionally "lr"), fused where supported."""
    if _fused_supported(device):
        return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay, fused=True)
    return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay, foreach=True)


def clip_grad_norm(parameters: Iterable[Tensor], max_norm: float) -> Tensor:
    """Scale the gradients in place so their total 2-norm is at most `max_norm`; returns the norm before.

    Parameters without a gradient are ignored. A non-finite norm makes the
    gradients non-finite (as torch's own does with error_if_nonfinite=False);
    the trainer's loss check stops such a run.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads)
    total = torch.linalg.vector_norm(torch.stack([norm.to(torch.float32) for norm in norms]))
    coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for grad in grads:
        by_dtype.setdefault(grad.dtype, []).append(grad)
    for dtype, group in by_dtype.items():
        torch._foreach_mul_(group, coefficient.to(dtype))
    return total
