"""fastdetr.measure.saved_bytes: the saved-for-backward counter on hand-built cases, and fused against reference layers.

The counter is checked where the answer is known byte for byte (which op saves
what is autograd's documented formula); the layers run through Triton's
interpreter at small widths (d_model 64, 2 heads, FFN 128), and at DETR-R50's
shapes when a GPU is present.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdetr.backend import interpreter_enabled, triton_importable
from fastdetr.cli import main
from fastdetr.measure.saved_bytes import (
    DETR_R50,
    LayerShape,
    gpu_dropout,
    layer_saved_bytes,
    saved_tensor_bytes,
)

SMALL_LAYER = LayerShape(d_model=64, nhead=2, dim_feedforward=128, source=24, queries=5, batch=2)
FLOAT = 4  # bytes per float32

needs_interpreter = pytest.mark.skipif(
    not (triton_importable() and interpreter_enabled()),
    reason="CPU tensors take the fused path only under Triton's interpreter (TRITON_INTERPRET=1)",
)


def test_counts_a_saved_result_exactly():
    x = torch.randn(10, requires_grad=True)
    saved = saved_tensor_bytes(torch.exp, x)   # exp saves its result, nothing else
    assert (saved.activation_bytes, saved.input_bytes, saved.parameter_bytes, saved.count) == (10 * FLOAT, 0, 0, 1)
    assert saved.total_bytes == 10 * FLOAT
    assert saved.storages[0].shape == (10,) and saved.storages[0].kind == "activation"


def test_views_of_one_storage_count_once():
    x = torch.randn(10, requires_grad=True)

    def halves_product(x):
        y = x.exp()   # saves y
        return y[:5] * y[5:]   # saves both views of y

    saved = saved_tensor_bytes(halves_product, x)
    assert saved.count == 3
    assert saved.activation_bytes == 10 * FLOAT and len(saved.storages) == 1


def test_parameters_inputs_and_activations_are_told_apart():
    linear = nn.Linear(4, 3)
    x = torch.randn(2, 4, requires_grad=True)
    saved = saved_tensor_bytes(linear, x)   # addmm saves x and weight.t() (a view of the weight's storage)
    assert (saved.parameter_bytes, saved.input_bytes, saved.activation_bytes) == (3 * 4 * FLOAT, 2 * 4 * FLOAT, 0)

    assert saved_tensor_bytes(linear.forward, x).parameter_bytes == 3 * 4 * FLOAT   # a bound method's module
    # a module passed as an argument counts too; relu's saved output is an activation
    saved = saved_tensor_bytes(lambda layer, x: F.relu(layer(x)), linear, x)
    assert (saved.parameter_bytes, saved.input_bytes, saved.activation_bytes) == (3 * 4 * FLOAT, 2 * 4 * FLOAT,
                                                                                  2 * 3 * FLOAT)


def test_a_dropped_graph_keeps_nothing():
    x = torch.randn(10, requires_grad=True)

    def with_discarded_branch(x):
        x.exp().sum()   # its graph (and the saved exp result) is freed right away
        return x.sin()  # saves x

    saved = saved_tensor_bytes(with_discarded_branch, x)
    assert (saved.activation_bytes, saved.input_bytes, saved.count) == (0, 10 * FLOAT, 1)
    with torch.no_grad():
        assert saved_tensor_bytes(torch.exp, x).total_bytes == 0


def test_gpu_dropout_saves_a_bool_mask_on_the_cpu():
    x = torch.randn(64, 32, requires_grad=True)
    original = F.dropout
    assert saved_tensor_bytes(F.dropout, x, 0.1).activation_bytes == x.numel() * FLOAT   # CPU: float noise
    with gpu_dropout():
        saved = saved_tensor_bytes(lambda x: F.dropout(x, 0.1), x)
        assert saved.activation_bytes == x.numel() and saved.storages[0].dtype == torch.bool
        out = F.dropout(x, 0.25)
        kept = out != 0
        assert abs(kept.float().mean().item() - 0.75) < 0.05
        out.sum().backward()   # same gradient as CPU dropout: 1 / (1 - p) where kept, else 0
        torch.testing.assert_close(x.grad, kept.float() / 0.75)
        assert torch.equal(F.dropout(x, 0.25, training=False), x)
    assert F.dropout is original


@needs_interpreter
@pytest.mark.parametrize("normalize_before", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_fused_layer_saves_no_more_than_the_reference(kind, normalize_before):
    report = layer_saved_bytes(kind, SMALL_LAYER, normalize_before=normalize_before)
    assert report.reference.activation_bytes > 0
    assert report.fused.activation_bytes <= report.reference.activation_bytes
    if not normalize_before:   # post-norm is fused today; pre-norm may still run the reference
        assert not report.fused_fallback
        assert report.fused.activation_bytes < report.reference.activation_bytes


@needs_interpreter
def test_command_prints_the_table(capsys):
    assert main(["memory", "--small", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for kind in ("encoder", "decoder"):
        for norm in ("post", "pre"):
            assert f"| {kind} | {norm} | reference |" in out
            assert f"| {kind} | {norm} | fused" in out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="DETR-R50 shapes need a CUDA device for the kernels")
@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_fused_layer_saves_less_at_detr_r50_shapes_on_a_gpu(kind):
    report = layer_saved_bytes(kind, DETR_R50, dtype=torch.bfloat16, device="cuda")
    assert not report.fused_fallback
    assert report.fused.activation_bytes < report.reference.activation_bytes


@needs_interpreter
def test_the_msda_op_saves_less_than_grid_sample():
    from fastdetr.measure.saved_bytes import MSDA_SMALL, msda_saved_bytes

    report = msda_saved_bytes(MSDA_SMALL)
    assert not report.fused_fallback
    assert 0 < report.fused.saved.activation_bytes < report.op.saved.activation_bytes \
        < report.reference.saved.activation_bytes
    # inference: each fusion writes less and launches less
    assert report.fused.written_bytes < report.op.written_bytes < report.reference.written_bytes
    assert report.fused.launches < report.op.launches < report.reference.launches


@needs_interpreter
def test_command_prints_the_msda_row_unless_asked_not_to(capsys):
    assert main(["memory", "--small", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| MultiScaleDeformableAttention | 30 | 10 | grid_sample |" in out
    assert "| MultiScaleDeformableAttention | 30 | 10 | fastdetr op |" in out
    assert "| MultiScaleDeformableAttention | 30 | 10 | fastdetr fused |" in out
    assert main(["memory", "--small", "--device", "cpu", "--no-msda"]) == 0
    assert "MultiScaleDeformableAttention" not in capsys.readouterr().out
