"""fastdetr.optim: foreach gradient clipping equals torch's clip_grad_norm_; AdamW is fused where torch has it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fastdetr.optim import adamw, clip_grad_norm


def _model_with_grads(seed: int, scale: float) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 7, 3), nn.BatchNorm2d(7), nn.Flatten(), nn.Linear(7 * 5 * 5, 13),
                          nn.Linear(13, 1))
    model[3].bias.requires_grad_(False)          # a parameter without a gradient is skipped
    loss = model(torch.randn(4, 3, 7, 7)).sum() * scale
    loss.backward()
    return model


@pytest.mark.parametrize("max_norm,scale", [(0.1, 1.0), (1e3, 1.0), (0.5, 1e-4)])
def test_clip_matches_torch(max_norm, scale):
    ours, theirs = _model_with_grads(0, scale), _model_with_grads(0, scale)
    norm = clip_grad_norm(ours.parameters(), max_norm)
    expected = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm)
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-12)
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ours.parameters() if p.grad is not None]))
    assert clipped <= max_norm * (1 + 1e-5) or max_norm > norm


def test_clip_without_gradients_and_with_nan():
    model = nn.Linear(3, 2)
    assert float(clip_grad_norm(model.parameters(), 0.1)) == 0.0
    model(torch.randn(2, 3)).sum().backward()
    model.weight.grad[0, 0] = float("nan")
    assert torch.isnan(clip_grad_norm(model.parameters(), 0.1))   # the trainer's loss check stops such a run


def test_adamw_is_fused_on_the_cpu_and_steps_like_the_loop():
    fused_model, loop_model = _model_with_grads(1, 1.0), _model_with_grads(1, 1.0)
    fused = adamw([{"params": list(fused_model.parameters())}], lr=1e-3, weight_decay=1e-4, device=torch.device("cpu"))
    assert fused.defaults["fused"] is True
    loop = torch.optim.AdamW(loop_model.parameters(), lr=1e-3, weight_decay=1e-4, foreach=False)
    for _ in range(3):
        fused.step()
        loop.step()
    for a, b in zip(fused_model.parameters(), loop_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
