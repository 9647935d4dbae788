"""fastdetr.nn.MultiheadAttention against torch.nn.MultiheadAttention (the parent), through the interpreter."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fastdetr.nn as fnn
from fastdetr.nn import attention as attention_module


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all(), "NaN/inf in the fused result"
    return ((a - b).norm() / b.norm()).item()


def _pair(embed: int, heads: int, batch_first: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    fused = fnn.MultiheadAttention(embed, heads, dropout=0.1, batch_first=batch_first)
    with torch.no_grad():  # non-trivial biases (they start at zero)
        fused.in_proj_bias.normal_(0, 0.1)
        fused.out_proj.bias.normal_(0, 0.1)
    reference = nn.MultiheadAttention(embed, heads, dropout=0.1, batch_first=batch_first)
    reference.load_state_dict(fused.state_dict())
    return fused.eval(), reference.eval()


def test_same_parameters_and_state_dict_as_torch():
    torch.manual_seed(0)
    fused = fnn.MultiheadAttention(256, 8)
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(256, 8)
    assert isinstance(fused, nn.MultiheadAttention)
    assert list(fused.state_dict()) == list(reference.state_dict())
    for key, value in reference.state_dict().items():
        assert torch.equal(fused.state_dict()[key], value), key


@pytest.mark.parametrize("embed,heads,length,source,self_attention,batch_first", [
    (256, 8, 37, 37, True, False),     # encoder self-attention, D = 32
    (256, 8, 20, 53, False, False),    # decoder cross-attention
    (128, 2, 9, 9, True, True),        # D = 64, batch_first
    (256, 8, 1, 7, False, False),      # a single query
])
def test_fused_forward_and_backward_match_torch(embed, heads, length, source, self_attention, batch_first):
    fused, reference = _pair(embed, heads, batch_first)
    torch.manual_seed(1)
    batch = 2
    shape_q = (batch, length, embed) if batch_first else (length, batch, embed)
    shape_k = (batch, source, embed) if batch_first else (source, batch, embed)
    query = torch.randn(shape_q, requires_grad=True)
    key = query if self_attention else torch.randn(shape_k, requires_grad=True)
    value = torch.randn(shape_k, requires_grad=True)
    mask = torch.zeros(batch, source, dtype=torch.bool)
    mask[1, source // 2 + 1:] = True  # half the keys of image 1 padded
    grad_out = torch.randn(shape_q)

    out, weights = fused(query, key, value, key_padding_mask=mask, need_weights=False)
    assert weights is None
    inputs = [query, value] if self_attention else [query, key, value]
    grads = torch.autograd.grad(out, inputs + list(fused.parameters()), grad_out)
    ref_out = reference(query, key, value, key_padding_mask=mask, need_weights=False)[0]
    ref_grads = torch.autograd.grad(ref_out, inputs + list(reference.parameters()), grad_out)
    assert _rel(out, ref_out) < 1e-5
    for grad, ref_grad in zip(grads, ref_grads):
        assert _rel(grad, ref_grad) < 1e-4


@pytest.mark.parametrize("embed,heads,length,source,self_attention", [
    (256, 8, 20, 53, False),   # decoder cross-attention, D = 32
    (128, 2, 9, 9, True),      # D = 64, self-attention (one GEMM for q and k)
])
def test_bf16_module_matches_torch_in_float64(embed, heads, length, source, self_attention):
    """bf16 fused module vs torch.nn.MultiheadAttention in float64 with the same state_dict.

    Within shared/DESIGN.md's bf16 tolerances (1e-2 forward, 2e-2 gradients), and within
    three times the error of torch's own bf16 module (flash-attention's idiom: the kernel
    rounds P to bf16 for P @ V, which costs about 2x the error of an fp32 softmax).
    """
    fused, _ = _pair(embed, heads)
    state = fused.state_dict()
    fused = fused.to(torch.bfloat16)
    modules = {"fused": fused}
    for name, dtype in (("torch_bf16", torch.bfloat16), ("float64", torch.float64)):
        modules[name] = nn.MultiheadAttention(embed, heads, dropout=0.1).to(dtype).eval()
        modules[name].load_state_dict(state)
    generator = torch.Generator().manual_seed(2)
    batch = 2

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(torch.bfloat16)

    query, key, value = randn(length, batch, embed), randn(source, batch, embed), randn(source, batch, embed)
    grad_out = randn(length, batch, embed)
    mask = torch.zeros(batch, source, dtype=torch.bool)
    mask[1, source // 2 + 1:] = True
    results = {}
    for name, module in modules.items():
        dtype = module.in_proj_weight.dtype
        q_in, v_in = query.to(dtype).requires_grad_(), value.to(dtype).requires_grad_()
        k_in = q_in if self_attention else key.to(dtype).requires_grad_()
        inputs = [q_in, v_in] if self_attention else [q_in, k_in, v_in]
        out = module(q_in, k_in, v_in, key_padding_mask=mask, need_weights=False)[0]
        grads = torch.autograd.grad(out, inputs + list(module.parameters()), grad_out.to(dtype))
        results[name] = (out, *grads)
    assert results["fused"][0].dtype == torch.bfloat16
    for index, (fused_t, torch_t, exact) in enumerate(zip(results["fused"], results["torch_bf16"],
                                                          results["float64"])):
        fused_error, torch_error = _rel(fused_t.double(), exact), _rel(torch_t.double(), exact)
        assert fused_error <= (1e-2 if index == 0 else 2e-2), index
        assert fused_error <= 3 * torch_error + 1e-4, (index, fused_error, torch_error)


def test_fully_padded_keys_give_zeros_not_nan():
    fused, _ = _pair(256, 8)
    query = torch.randn(5, 2, 256)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0] = True
    out = fused(query, query, query, key_padding_mask=mask, need_weights=False)[0]
    # Image 0 attends to nothing: the attention core gives zeros, so the output is the out-projection's bias.
    torch.testing.assert_close(out[:, 0], fused.out_proj.bias.expand(5, -1).detach(), rtol=0, atol=1e-6)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kwargs,reason", [
    ({"need_weights": True}, "need_weights"),
    ({"need_weights": False, "attn_mask": torch.zeros(6, 6, dtype=torch.bool)}, "attn_mask"),
])
def test_unsupported_calls_fall_back_with_one_warning(kwargs, reason):
    fused, reference = _pair(256, 8)
    attention_module._warned.clear()
    query = torch.randn(6, 2, 256)
    with pytest.warns(attention_module.FusedFallbackWarning, match=reason):
        out = fused(query, query, query, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is silent
        fused(query, query, query, **kwargs)
    torch.testing.assert_close(out[0], reference(query, query, query, **kwargs)[0])


def test_unsupported_head_dim_falls_back():
    fused, reference = _pair(64, 4)  # head dim 16
    attention_module._warned.clear()
    query = torch.randn(6, 2, 64)
    with pytest.warns(attention_module.FusedFallbackWarning, match="head dim 16"):
        out = fused(query, query, query, need_weights=False)[0]
    torch.testing.assert_close(out, reference(query, query, query, need_weights=False)[0])


def test_dropout_in_training_is_seeded_and_off_in_eval():
    fused, _ = _pair(256, 8)
    query = torch.randn(16, 2, 256)
    fused.train()
    torch.manual_seed(5)
    first = fused(query, query, query, need_weights=False)[0]
    torch.manual_seed(5)
    again = fused(query, query, query, need_weights=False)[0]
    torch.manual_seed(6)
    other = fused(query, query, query, need_weights=False)[0]
    fused.eval()
    clean = fused(query, query, query, need_weights=False)[0]
    assert torch.equal(first, again)
    assert not torch.allclose(first, other) and not torch.allclose(first, clean)


def test_convert_keeps_the_same_parameters():
    module = nn.MultiheadAttention(256, 8)
    weight = module.in_proj_weight
    converted = fnn.MultiheadAttention.convert(module)
    assert converted is module and isinstance(module, fnn.MultiheadAttention)
    assert module.in_proj_weight is weight
    with pytest.raises(TypeError, match="MultiheadAttention"):
        fnn.MultiheadAttention.convert(nn.Linear(2, 2))
