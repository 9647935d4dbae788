"""fastdetr.nn.TransformerEncoderLayer / DecoderLayer and fastdetr.optimize against the reference layers.

Run through Triton's interpreter (TRITON_INTERPRET=1) on a CPU; small widths
(d_model 64, 2 heads -> head dim 32) keep it fast.
"""
from __future__ import annotations

import copy

import pytest
import torch

import fastdetr
import fastdetr.nn as fnn
from fastdetr.backend import interpreter_enabled, triton_importable
from fastdetr.reference import transformer as reference

pytestmark = pytest.mark.skipif(
    not (triton_importable() and interpreter_enabled()),
    reason="CPU tensors take the fused path only under Triton's interpreter (TRITON_INTERPRET=1)",
)

D_MODEL, HEADS, FFN = 64, 2, 128


def _rel(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-30) -> float:
    """Relative error; `floor` bounds the denominator for gradients that are zero up to rounding."""
    assert torch.isfinite(a).all(), "NaN/inf in the fused result"
    return ((a - b).norm() / b.norm().clamp_min(floor)).item()


def _randomise(module: torch.nn.Module) -> None:
    with torch.no_grad():  # non-trivial biases and LayerNorm affines (they start at 0 / 1)
        for name, param in module.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)


def _pair(kind: str, **kwargs):
    torch.manual_seed(0)
    fused_cls, ref_cls = {
        "encoder": (fnn.TransformerEncoderLayer, reference.TransformerEncoderLayer),
        "decoder": (fnn.TransformerDecoderLayer, reference.TransformerDecoderLayer),
    }[kind]
    args = dict(d_model=D_MODEL, nhead=HEADS, dim_feedforward=FFN, dropout=0.1) | kwargs
    fused = fused_cls(**args)
    _randomise(fused)
    ref = ref_cls(**args)
    ref.load_state_dict(fused.state_dict())
    return fused.eval(), ref.eval()


def _padding_mask(batch: int, source: int) -> torch.Tensor:
    mask = torch.zeros(batch, source, dtype=torch.bool)
    mask[-1, source // 2 + 1:] = True  # some keys of the last image padded
    return mask


def _inputs(kind: str, source: int, batch: int = 2, queries: int = 5):
    torch.manual_seed(1)
    src = torch.randn(source, batch, D_MODEL, requires_grad=True)
    pos = torch.randn(source, batch, D_MODEL, requires_grad=True)
    mask = _padding_mask(batch, source)
    if kind == "encoder":
        return (src,), dict(src_key_padding_mask=mask, pos=pos)
    tgt = torch.randn(queries, batch, D_MODEL, requires_grad=True)
    query_pos = torch.randn(queries, batch, D_MODEL, requires_grad=True)
    return (tgt, src), dict(memory_key_padding_mask=mask, pos=pos, query_pos=query_pos)


def _forward_backward(layer, args, kwargs):
    for tensor in (*args, *kwargs.values()):
        if tensor.requires_grad:
            tensor.grad = None
    layer.zero_grad()
    out = layer(*args, **kwargs)
    torch.manual_seed(2)
    out.backward(torch.randn_like(out))
    inputs = [t.grad.clone() for t in (*args, *kwargs.values()) if t.requires_grad]
    params = {name: p.grad.clone() for name, p in layer.named_parameters()}
    return out.detach(), inputs, params


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
@pytest.mark.parametrize("source", [7, 37])
@pytest.mark.parametrize("normalize_before", [False, True], ids=["post-norm", "pre-norm"])
def test_fused_layer_matches_reference(kind, source, normalize_before):
    fused, ref = _pair(kind, normalize_before=normalize_before)
    assert list(fused.state_dict()) == list(ref.state_dict())
    args, kwargs = _inputs(kind, source)
    out, grad_inputs, grad_params = _forward_backward(fused, args, kwargs)
    out_ref, grad_inputs_ref, grad_params_ref = _forward_backward(ref, args, kwargs)
    assert _rel(out, out_ref) < 1e-5
    for index, (grad, grad_ref) in enumerate(zip(grad_inputs, grad_inputs_ref)):
        assert _rel(grad, grad_ref) < 1e-4, f"input {index}"
    assert grad_params.keys() == grad_params_ref.keys()
    for name, grad in grad_params.items():
        assert _rel(grad, grad_params_ref[name]) < 1e-4, name


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
@pytest.mark.parametrize("normalize_before", [False, True], ids=["post-norm", "pre-norm"])
def test_fused_path_runs_the_kernels(kind, normalize_before, monkeypatch):
    """Guard against a silent fallback: the fused layers never call their attention modules' forward."""
    fused, _ = _pair(kind, normalize_before=normalize_before)
    for attn in (fused.self_attn, getattr(fused, "multihead_attn", None)):
        if attn is not None:
            monkeypatch.setattr(attn, "forward", lambda *a, **k: pytest.fail("fell back to the reference"))
    args, kwargs = _inputs(kind, 7)
    fused(*args, **kwargs)


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
@pytest.mark.parametrize("normalize_before", [False, True], ids=["post-norm", "pre-norm"])
def test_train_mode_with_dropout_is_finite(kind, normalize_before):
    fused, _ = _pair(kind, dropout=0.3, normalize_before=normalize_before)
    fused.train()
    args, kwargs = _inputs(kind, 37)
    out = fused(*args, **kwargs)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in fused.parameters())


@pytest.mark.parametrize("kind,layer_kwargs,call_kwargs", [
    ("encoder", dict(activation="gelu"), {}),
    ("encoder", dict(d_model=48, nhead=2), {}),  # head dim 24
    ("encoder", {}, "src_mask"),
    ("decoder", {}, "memory_mask"),
])
def test_unsupported_cases_fall_back_to_reference(kind, layer_kwargs, call_kwargs):
    fused, ref = _pair(kind, **layer_kwargs)
    width = layer_kwargs.get("d_model", D_MODEL)
    torch.manual_seed(1)
    source, queries, batch = 7, 5, 2
    src = torch.randn(source, batch, width)
    pos = torch.randn(source, batch, width)
    mask = _padding_mask(batch, source)
    if kind == "encoder":
        args, kwargs = (src,), dict(src_key_padding_mask=mask, pos=pos)
        if call_kwargs == "src_mask":
            kwargs["src_mask"] = torch.zeros(source, source, dtype=torch.bool)
    else:
        tgt = torch.randn(queries, batch, width)
        args, kwargs = (tgt, src), dict(memory_key_padding_mask=mask, pos=pos, query_pos=torch.randn_like(tgt))
        if call_kwargs == "memory_mask":
            kwargs["memory_mask"] = torch.zeros(queries, source, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(fused(*args, **kwargs), ref(*args, **kwargs))


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
@pytest.mark.parametrize("normalize_before", [False, True], ids=["post-norm", "pre-norm"])
def test_inference_runs_the_whole_ffn_kernel(kind, normalize_before, monkeypatch):
    """eval + no_grad: the FFN is one kernel (hidden on chip), and the layer still matches the reference."""
    import fastdetr.kernels.ffn as ffn
    import fastdetr.kernels.linear_relu as linear_relu

    calls = []
    original = ffn.ffn_inference
    monkeypatch.setattr(ffn, "ffn_inference", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(linear_relu, "linear_relu_dropout", lambda *a, **k: pytest.fail("training FFN in inference"))
    fused, ref = _pair(kind, normalize_before=normalize_before)
    args, kwargs = _inputs(kind, 37)
    with torch.no_grad():
        out, out_ref = fused(*args, **kwargs), ref(*args, **kwargs)
    assert calls == [1]
    assert _rel(out, out_ref) < 1e-5


def test_plain_cpu_falls_back(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    fused, ref = _pair("encoder")
    args, kwargs = _inputs("encoder", 7)
    with torch.no_grad():
        assert torch.equal(fused(*args, **kwargs), ref(*args, **kwargs))


def _tiny_detr():
    torch.manual_seed(0)
    model = fastdetr.detr_small(num_classes=3, hidden_dim=D_MODEL, nheads=HEADS, dim_feedforward=FFN,
                                enc_layers=1, dec_layers=2, num_queries=5, dropout=0.1)
    _randomise(model.transformer)
    return model.eval()


def test_optimize_whole_detr_matches_and_shares_parameters():
    model = _tiny_detr()
    baseline = copy.deepcopy(model)
    keys = list(model.state_dict())
    param_ids = [id(p) for p in model.parameters()]

    assert fastdetr.optimize(model) is model
    layers = list(model.transformer.encoder.layers) + list(model.transformer.decoder.layers)
    assert sum(isinstance(layer, fnn.TransformerEncoderLayer) for layer in layers) == 1
    assert sum(isinstance(layer, fnn.TransformerDecoderLayer) for layer in layers) == 2
    assert [id(p) for p in model.parameters()] == param_ids
    assert list(model.state_dict()) == keys
    fastdetr.optimize(model)  # idempotent
    assert [id(p) for p in model.parameters()] == param_ids
    assert all(type(layer) in (fnn.TransformerEncoderLayer, fnn.TransformerDecoderLayer) for layer in layers)

    torch.manual_seed(3)
    images = [torch.randn(3, 64, 96), torch.randn(3, 80, 64)]  # different sizes: a padding mask
    results = []
    for net in (model, baseline):
        net.zero_grad()
        out = net(images)
        loss = out["pred_logits"].square().sum() + out["pred_boxes"].sum() + sum(
            aux["pred_logits"].sum() for aux in out["aux_outputs"])
        loss.backward()
        results.append((out, {name: p.grad for name, p in net.named_parameters() if p.grad is not None}))
    (out, grads), (out_ref, grads_ref) = results
    assert _rel(out["pred_logits"], out_ref["pred_logits"]) < 1e-5
    assert _rel(out["pred_boxes"], out_ref["pred_boxes"]) < 1e-5
    assert grads.keys() == grads_ref.keys()
    # The first decoder layer's tgt is zeros, so v is the same for every key and the gradients of its
    # self-attention W_q / W_k are exactly zero in exact arithmetic (rounding noise ~1e-6 in norm on both
    # sides). Every other gradient's absolute error is below 1e-4 (its norm 0.2 to 300), so a floor of 1.0
    # keeps the check at 1e-4 relative for all gradients of norm >= 1.
    for name, grad in grads.items():
        assert _rel(grad, grads_ref[name], floor=1.0) < 1e-4, name


def test_optimize_leaves_unknown_modules_alone(caplog):
    class LooksHalfLikeALayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = torch.nn.MultiheadAttention(D_MODEL, HEADS)
            self.linear1 = torch.nn.Linear(D_MODEL, FFN)

    model = torch.nn.Sequential(LooksHalfLikeALayer())
    with caplog.at_level("INFO", logger="fastdetr.optimize"):
        fastdetr.optimize(model)
    assert type(model[0]) is LooksHalfLikeALayer
    assert "left unchanged" in caplog.text


def test_optimize_converts_layers_of_another_class_by_structure():
    """The original DETR repository's layers: same attributes, not fastdetr classes."""
    _, ref = _pair("encoder")
    original = torch.nn.Module()
    for name, child in ref.named_children():
        setattr(original, name, copy.deepcopy(child))
    original.activation, original.normalize_before = ref.activation, False
    model = torch.nn.Sequential(original)
    fastdetr.optimize(model, inference=True)
    assert type(model[0]) is fnn.TransformerEncoderLayer
    args, kwargs = _inputs("encoder", 7)
    with torch.no_grad():
        assert _rel(model[0](*args, **kwargs), ref(*args, **kwargs)) < 1e-5


def test_builders_take_fused_true():
    import fastdetr
    from fastdetr.nn import TransformerDecoderLayer, TransformerEncoderLayer

    plain = fastdetr.detr_small(num_classes=3, enc_layers=1, dec_layers=2)
    fused = fastdetr.detr_small(num_classes=3, enc_layers=1, dec_layers=2, fused=True)
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert all(isinstance(layer, TransformerEncoderLayer) for layer in fused.transformer.encoder.layers)
    assert all(isinstance(layer, TransformerDecoderLayer) for layer in fused.transformer.decoder.layers)
    assert not any(isinstance(layer, TransformerEncoderLayer) for layer in plain.transformer.encoder.layers)


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_autocast_runs_the_fused_chain_in_bfloat16(kind, monkeypatch):
    """Under autocast (how the trainer runs AMP) the fused layer still takes the kernels, in autocast's dtype,
    and lands as close to the float32 result as the reference under autocast; gradients reach the float32
    parameters."""
    fused, ref = _pair(kind)
    args, kwargs = _inputs(kind, 37)
    with torch.no_grad():
        exact = ref(*args, **kwargs).double()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref_autocast = ref(*args, **kwargs)
    for attn in (fused.self_attn, getattr(fused, "multihead_attn", None)):
        if attn is not None:
            monkeypatch.setattr(attn, "forward", lambda *a, **k: pytest.fail("fell back to the reference"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused(*args, **kwargs)
    assert out.dtype == torch.bfloat16
    assert _rel(out.double(), exact) <= max(1e-2, 2 * _rel(ref_autocast.double(), exact))
    out.float().sum().backward()
    for name, param in fused.named_parameters():
        assert param.grad is not None and param.grad.dtype == torch.float32, name
        assert torch.isfinite(param.grad).all(), name
