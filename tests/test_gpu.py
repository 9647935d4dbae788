"""The fused kernels and layers on a real GPU, at DETR-R50 shapes (run by benchmarks/gpu_suite.sh).

Everything else in tests/ feeds CPU tensors to Triton's interpreter, which
accepts code a GPU would reject and computes bf16 differently; this file is
what checks the compiled kernels' numbers. Skipped without CUDA. To check the
test code itself on a CPU, `FASTDETR_GPU_TESTS_ON_CPU=1 TRITON_INTERPRET=1
pytest tests/test_gpu.py` runs it through the interpreter at small shapes.

Shapes on CUDA: batch 2 (batch 8 for the ops), d_model 256, 8 heads, FFN
2048, S = 25 x 38 = 950 tokens with DETR's image padding, 100 queries.
Compared with float64 math (ops) or the float32 reference (layers, model) at
shared/DESIGN.md's tolerances; TF32 is switched off for the float32 checks.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
from kernel_checks import TOLERANCES, dtype_id, relative_error

import fastdetr
import fastdetr.nn as fnn
from fastdetr.backend import interpreter_enabled
from fastdetr.reference import transformer as reference

ON_CPU = os.environ.get("FASTDETR_GPU_TESTS_ON_CPU") == "1" and interpreter_enabled()
pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or ON_CPU),
                                reason="needs a CUDA GPU (FASTDETR_GPU_TESTS_ON_CPU=1 runs it through the interpreter)")

DEVICE = "cpu" if ON_CPU else "cuda"
# (batch, tokens, queries, d_model, heads, ffn): DETR-R50's on a GPU, small through the interpreter
BATCH, TOKENS, QUERIES, D_MODEL, HEADS, FFN = (2, 37, 5, 64, 2, 128) if ON_CPU else (2, 950, 100, 256, 8, 2048)
DTYPES = [torch.float32, torch.bfloat16]
# a 16-bit result may be this many times the reference's own 16-bit error; 3 through the interpreter,
# which rounds to bf16 by truncation where a GPU rounds to nearest even
BASELINE_FACTOR = 3.0 if ON_CPU else 2.0


@pytest.fixture(autouse=True)
def _no_tf32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _randn(*shape, dtype, generator, scale=1.0, shift=0.0):
    values = torch.randn(*shape, generator=generator, dtype=torch.float64) * scale + shift
    return values.to(device=DEVICE, dtype=dtype).requires_grad_()


def _image_padding_mask(batch: int, height: int, width: int) -> torch.Tensor:
    """(B, H*W) True on padding: odd images lose a quarter of their rows, even ones a quarter of each row."""
    mask = torch.zeros(batch, height, width, dtype=torch.bool)
    mask[1::2, height - height // 4:] = True
    mask[0::2, :, width - width // 4:] = True
    return mask.flatten(1).to(DEVICE)


def _check_grads(outs, inputs, refs, refs_inputs, generator, dtype):
    """Forward and every input gradient against float64, for random upstream gradients."""
    fwd_tol, grad_tol = TOLERANCES[dtype]
    grad_outs = [torch.randn(out.shape, generator=generator, dtype=torch.float64).to(DEVICE) for out in outs]
    grads = torch.autograd.grad(outs, inputs, [g.to(dtype) for g in grad_outs])
    ref_grads = torch.autograd.grad(refs, refs_inputs, grad_outs)
    for out, ref in zip(outs, refs):
        assert relative_error(out, ref) <= fwd_tol
    for index, (grad, ref) in enumerate(zip(grads, ref_grads)):
        assert relative_error(grad, ref, norm_floor=1e-12) <= grad_tol, f"gradient {index}"


def _float64(*tensors):
    return tuple(t.detach().double().requires_grad_() for t in tensors)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_attention_with_image_padding(dtype):
    from fastdetr.kernels.attention import attention, attention_ref

    generator = torch.Generator().manual_seed(0)
    height, width = (5, 8) if ON_CPU else (25, 38)
    head_dim = D_MODEL // HEADS
    q, k, v = (_randn(4 * BATCH, HEADS, height * width, head_dim, dtype=dtype, generator=generator)
               for _ in range(3))
    mask = _image_padding_mask(4 * BATCH, height, width)
    out = attention(q, k, v, key_padding_mask=mask)
    q64, k64, v64 = _float64(q, k, v)
    _check_grads([out], (q, k, v), [attention_ref(q64, k64, v64, mask)], (q64, k64, v64), generator, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_projection_ops(dtype):
    from fastdetr.kernels.in_projection import in_projection, in_projection_ref
    from fastdetr.kernels.linear_relu import linear_relu_dropout, linear_relu_dropout_ref

    generator = torch.Generator().manual_seed(1)
    x = _randn(TOKENS, 4 * BATCH, D_MODEL, dtype=dtype, generator=generator)
    pos = _randn(TOKENS, 4 * BATCH, D_MODEL, dtype=dtype, generator=generator)
    weight = _randn(3 * D_MODEL, D_MODEL, dtype=dtype, generator=generator, scale=D_MODEL ** -0.5)
    bias = _randn(3 * D_MODEL, dtype=dtype, generator=generator, scale=0.1)
    refs_inputs = _float64(x, pos, weight, bias)
    _check_grads([in_projection(x, pos, weight, bias)], (x, pos, weight, bias),
                 [in_projection_ref(*refs_inputs)], refs_inputs, generator, dtype)

    weight1 = _randn(FFN, D_MODEL, dtype=dtype, generator=generator, scale=D_MODEL ** -0.5)
    bias1 = _randn(FFN, dtype=dtype, generator=generator, scale=0.1)
    refs_inputs = _float64(x, weight1, bias1)
    _check_grads([linear_relu_dropout(x, weight1, bias1)], (x, weight1, bias1),
                 [linear_relu_dropout_ref(*refs_inputs)], refs_inputs, generator, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("variant", ["post-norm", "pre-norm", "residual"])
def test_residual_ops(dtype, variant):
    import torch.nn.functional as F

    from fastdetr.kernels import linear_layernorm as ops

    generator = torch.Generator().manual_seed(2)
    inner = FFN if variant == "residual" else D_MODEL
    x = _randn(TOKENS * 4 * BATCH, inner, dtype=dtype, generator=generator)
    weight = _randn(D_MODEL, inner, dtype=dtype, generator=generator, scale=inner ** -0.5)
    bias = _randn(D_MODEL, dtype=dtype, generator=generator, scale=0.1)
    residual = _randn(TOKENS * 4 * BATCH, D_MODEL, dtype=dtype, generator=generator)
    ln_weight = _randn(D_MODEL, dtype=dtype, generator=generator, scale=0.2, shift=1.0)
    ln_bias = _randn(D_MODEL, dtype=dtype, generator=generator, scale=0.1)
    inputs = (x, weight, bias, residual, ln_weight, ln_bias)
    x64, weight64, bias64, residual64, ln_weight64, ln_bias64 = refs_inputs = _float64(*inputs)
    z = residual64 + F.linear(x64, weight64, bias64)
    y = F.layer_norm(z, (D_MODEL,), ln_weight64, ln_bias64)
    if variant == "post-norm":
        _check_grads([ops.linear_residual_layernorm(*inputs)], inputs, [y], refs_inputs, generator, dtype)
    elif variant == "pre-norm":
        _check_grads(list(ops.linear_residual_and_layernorm(*inputs)), inputs, [z, y], refs_inputs, generator, dtype)
    else:
        _check_grads([ops.linear_residual(*inputs[:4])], inputs[:4], [z], refs_inputs[:4], generator, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("norm", [True, False], ids=["post-norm", "pre-norm"])
def test_inference_ffn(dtype, norm):
    from fastdetr.kernels.ffn import ffn_inference, ffn_inference_ref

    generator = torch.Generator().manual_seed(3)
    shapes = [(TOKENS, 4 * BATCH, D_MODEL), (FFN, D_MODEL), (FFN,), (D_MODEL, FFN), (D_MODEL,),
              (TOKENS, 4 * BATCH, D_MODEL), (D_MODEL,), (D_MODEL,)]
    scales = [1.0, D_MODEL ** -0.5, 0.1, FFN ** -0.5, 0.1, 1.0, 0.2, 0.1]
    inputs = [_randn(*shape, dtype=dtype, generator=generator, scale=scale).detach()
              for shape, scale in zip(shapes, scales)]
    inputs[6] = inputs[6] + 1.0
    if not norm:
        inputs[6:] = [None, None]
    with torch.no_grad():
        out = ffn_inference(*inputs)
        ref = ffn_inference_ref(*(None if t is None else t.double() for t in inputs))
    assert relative_error(out, ref) <= TOLERANCES[dtype][0]


def _layer_pair(kind: str, normalize_before: bool, dtype: torch.dtype):
    """(fused layer in `dtype`, reference layer in `dtype`, reference layer in float64), one state_dict."""
    torch.manual_seed(0)
    fused_cls, ref_cls = {"encoder": (fnn.TransformerEncoderLayer, reference.TransformerEncoderLayer),
                          "decoder": (fnn.TransformerDecoderLayer, reference.TransformerDecoderLayer)}[kind]
    args = dict(d_model=D_MODEL, nhead=HEADS, dim_feedforward=FFN, dropout=0.1, normalize_before=normalize_before)
    fused = fused_cls(**args)
    with torch.no_grad():
        for name, param in fused.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    refs = []
    for ref_dtype in (dtype, torch.float64):
        ref = ref_cls(**args)
        ref.load_state_dict(fused.state_dict())
        refs.append(ref.to(DEVICE, ref_dtype).eval())
    return fused.to(DEVICE, dtype).eval(), *refs


def _layer_call(kind: str, mask: torch.Tensor):
    if kind == "encoder":
        def call(layer, src, pos):
            return layer(src, src_key_padding_mask=mask, pos=pos)
    else:
        def call(layer, tgt, memory, pos, query_pos):
            return layer(tgt, memory, memory_key_padding_mask=mask, pos=pos, query_pos=query_pos)
    return call


def _output_and_grads(layer, call, tensors, grad_out):
    out = call(layer, *tensors)
    return [out, *torch.autograd.grad(out, (*tensors, *layer.parameters()), grad_out.to(out.dtype))]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("normalize_before", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_fused_layer_matches_the_reference(kind, normalize_before, dtype):
    """Output and every parameter and input gradient against the reference layer in float64: within the
    dtype's tolerance, or (a whole layer of 16-bit roundings) within twice the reference's own error in that
    dtype, the flash-attention idiom of shared/STYLE.md."""
    fused, ref, ref64 = _layer_pair(kind, normalize_before, dtype)
    generator = torch.Generator().manual_seed(4)
    height, width = (5, 8) if ON_CPU else (25, 38)
    shapes = [(height * width, BATCH, D_MODEL)] * 2
    if kind == "decoder":
        shapes = [(QUERIES, BATCH, D_MODEL), *shapes, (QUERIES, BATCH, D_MODEL)]
    tensors = [_randn(*shape, dtype=dtype, generator=generator) for shape in shapes]
    call = _layer_call(kind, _image_padding_mask(BATCH, height, width))
    grad_out = torch.randn(shapes[0], generator=generator, dtype=torch.float64).to(DEVICE)
    fused_results = _output_and_grads(fused, call, tensors, grad_out)
    ref_results = _output_and_grads(ref, call, tensors, grad_out)
    exact = _output_and_grads(ref64, call, _float64(*tensors), grad_out)
    fwd_tol, grad_tol = TOLERANCES[dtype]
    for index, (actual, baseline, expected) in enumerate(zip(fused_results, ref_results, exact)):
        tolerance = fwd_tol if index == 0 else grad_tol
        if dtype != torch.float32:
            tolerance = max(tolerance, BASELINE_FACTOR * relative_error(baseline, expected, norm_floor=1e-12))
        assert relative_error(actual, expected, norm_floor=1e-12) <= tolerance, f"result {index}"


def test_dropout_in_train_mode_keeps_the_expected_fraction():
    fused, _, _ = _layer_pair("encoder", False, torch.float32)
    fused.train()
    generator = torch.Generator().manual_seed(5)
    src = _randn(TOKENS, BATCH, D_MODEL, dtype=torch.float32, generator=generator)
    outs = [fused(src) for _ in range(2)]
    assert all(torch.isfinite(out).all() for out in outs)
    assert not torch.equal(outs[0], outs[1])   # a fresh dropout draw per call
    outs[0].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in fused.parameters())


def _outputs_and_gradients(net, images):
    """(logits, boxes, {parameter name: gradient}) of a random projection of both outputs (seed 1)."""
    net.zero_grad()
    outputs = net(images)
    torch.manual_seed(1)
    loss = (outputs["pred_logits"] * torch.randn_like(outputs["pred_logits"])).sum() + \
        (outputs["pred_boxes"] * torch.randn_like(outputs["pred_boxes"])).sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}
    return outputs["pred_logits"].detach(), outputs["pred_boxes"].detach(), grads


def test_optimized_detr_r50_matches_the_reference():
    """A whole DETR-R50 (random weights), forward and backward, fused vs not, float32."""
    torch.manual_seed(0)
    if ON_CPU:
        model = fastdetr.detr_small(num_classes=5, hidden_dim=D_MODEL, nheads=HEADS, dim_feedforward=FFN,
                                    enc_layers=1, dec_layers=2, num_queries=QUERIES)
        sizes = [(64, 96), (80, 64)]
    else:
        model = fastdetr.detr_resnet50(num_classes=91)
        sizes = [(800, 1216), (640, 960)]
    model = model.to(DEVICE).eval()
    optimized = fastdetr.optimize(copy.deepcopy(model))
    assert all(type(layer) in (fnn.TransformerEncoderLayer, fnn.TransformerDecoderLayer)
               for layer in (*optimized.transformer.encoder.layers, *optimized.transformer.decoder.layers))
    images = [torch.randn(3, h, w, device=DEVICE) for h, w in sizes]
    (logits, boxes, grads), (logits_opt, boxes_opt, grads_opt) = (_outputs_and_gradients(net, images)
                                                                  for net in (model, optimized))
    assert relative_error(logits_opt, logits) <= 1e-5 and relative_error(boxes_opt, boxes) <= 1e-5
    assert grads.keys() == grads_opt.keys()
    for name, grad in grads.items():
        assert relative_error(grads_opt[name], grad, norm_floor=1e-12) <= 1e-4, name


def test_criterion_with_the_device_matcher_makes_no_host_sync(monkeypatch):
    """DETR's training criterion with backend='triton' (fused cost + batched solver) under CUDA's sync
    debug mode "error": any synchronising call raises. Its losses equal the scipy backend's."""
    from fastdetr.config import DETRConfig
    from fastdetr.criterion import build_criterion
    from fastdetr.matcher import resolve_solver

    generator = torch.Generator().manual_seed(7)
    layers = [{"pred_logits": torch.randn(8, 100, 92, generator=generator).to(DEVICE),
               "pred_boxes": torch.rand(8, 100, 4, generator=generator).mul(0.5).add(0.25).to(DEVICE)}
              for _ in range(6)]
    outputs = {**layers[-1], "aux_outputs": layers[:-1]}
    sizes = torch.randint(1, 31, (8,), generator=generator).tolist()
    targets = [{"labels": torch.randint(0, 91, (n,), generator=generator).to(DEVICE),
                "boxes": torch.rand(n, 4, generator=generator).mul(0.5).add(0.25).to(DEVICE)} for n in sizes]
    criterion = build_criterion(DETRConfig(), backend="triton")
    criterion.matcher.solver = resolve_solver("triton", check_invalid=False)
    criterion(outputs, targets)   # compile the kernels outside the checked region
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        losses = criterion(outputs, targets)
    finally:
        if DEVICE == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    expected = build_criterion(DETRConfig(), backend="scipy")(outputs, targets)
    for name, value in expected.items():
        assert torch.allclose(losses[name], value, rtol=1e-5, atol=1e-6), name
    if DEVICE == "cuda":   # the default backend ("auto") takes the kernels for CUDA tensors
        import fastdetr.kernels.assignment as assignment

        launches = []
        launcher = assignment.assignment_forward
        monkeypatch.setattr(assignment, "assignment_forward", lambda *a: launches.append(1) or launcher(*a))
        auto_losses = build_criterion(DETRConfig())(outputs, targets)
        assert launches == [1]
        for name, value in expected.items():
            assert torch.allclose(auto_losses[name], value, rtol=1e-5, atol=1e-6), name


def test_optimized_model_under_bf16_autocast_stays_on_the_fused_path(monkeypatch):
    """The trainer's AMP: under bf16 autocast the fused layers run (no nn.MultiheadAttention forward) and the
    outputs stay as close to float32 as the reference's under autocast."""
    torch.manual_seed(0)
    model = fastdetr.detr_small(num_classes=5, hidden_dim=D_MODEL, nheads=HEADS, dim_feedforward=FFN,
                                enc_layers=2, dec_layers=2, num_queries=QUERIES).to(DEVICE).eval()
    images = [torch.randn(3, 96, 128, device=DEVICE), torch.randn(3, 128, 96, device=DEVICE)]
    with torch.no_grad():
        exact = model(images)["pred_boxes"].double()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            ref = model(images)["pred_boxes"].double()
    optimized = fastdetr.optimize(copy.deepcopy(model))
    monkeypatch.setattr(torch.nn.MultiheadAttention, "forward",
                        lambda *a, **k: pytest.fail("a fused layer fell back under autocast"))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        outputs = optimized(images)
    boxes = outputs["pred_boxes"].double()
    assert relative_error(boxes, exact) <= max(1e-2, BASELINE_FACTOR * relative_error(ref, exact))
    outputs["pred_logits"].float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in optimized.parameters() if p.grad is not None)


def test_optimized_deformable_detr_r50_matches_the_reference(monkeypatch):
    """A whole Deformable-DETR-R50 (random weights, box refinement), forward and backward, fused vs not, float32:
    the MSDA kernels, the fused layers' epilogues and FFNs, the decoder's self-attention kernel."""
    torch.manual_seed(0)
    if ON_CPU:
        model = fastdetr.deformable_detr_small(num_classes=5, hidden_dim=D_MODEL, nheads=HEADS,
                                               dim_feedforward=FFN, enc_layers=1, dec_layers=2, num_queries=QUERIES,
                                               enc_n_points=2, dec_n_points=2, with_box_refine=True,
                                               num_feature_levels=3)
        # C3-C5 only: a stride-64 level of these tiny images would be 1 x 1, its GroupNorm's gradient
        # ill-conditioned in float32 itself
        sizes = [(96, 80), (64, 112)]
    else:
        model = fastdetr.deformable_detr_resnet50(num_classes=91, with_box_refine=True)
        sizes = [(640, 800), (576, 736)]
    model = model.to(DEVICE).train()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():   # off the official init, whose zero offsets and logits sample one fixed pattern
        for param in model.transformer.parameters():
            param.add_(torch.randn(param.shape, generator=generator).to(DEVICE) * 0.02)
    optimized = fastdetr.optimize(copy.deepcopy(model))
    images = [torch.randn(3, h, w, device=DEVICE) for h, w in sizes]
    logits, boxes, grads = _outputs_and_gradients(model, images)
    monkeypatch.setattr(torch.nn.MultiheadAttention, "forward",
                        lambda *a, **k: pytest.fail("the fused decoder fell back to nn.MultiheadAttention"))
    logits_opt, boxes_opt, grads_opt = _outputs_and_gradients(optimized, images)
    assert relative_error(logits_opt, logits) <= 1e-5 and relative_error(boxes_opt, boxes) <= 1e-5
    assert grads.keys() == grads_opt.keys()
    largest = max(grad.norm().item() for grad in grads.values())
    for name, grad in grads.items():
        assert relative_error(grads_opt[name], grad, norm_floor=1e-3 * largest) <= 1e-4, name


def test_deformable_criterion_with_the_device_matcher_makes_no_host_sync():
    """Deformable DETR's criterion (focal cost in PyTorch, the batched assignment kernel), per image and padded,
    two-stage proposals included, under CUDA's sync debug mode "error"; the losses equal the scipy backend's."""
    from fastdetr.deformable_config import DeformableDETRConfig
    from fastdetr.deformable_criterion import build_deformable_criterion
    from fastdetr.matcher import resolve_solver
    from fastdetr.padded import pad_targets

    generator = torch.Generator().manual_seed(8)

    def layer(queries):
        return {"pred_logits": torch.randn(4, queries, 91, generator=generator).to(DEVICE),
                "pred_boxes": torch.rand(4, queries, 4, generator=generator).mul(0.5).add(0.25).to(DEVICE)}

    layers = [layer(300) for _ in range(6)]
    outputs = {**layers[-1], "aux_outputs": layers[:-1], "enc_outputs": layer(2000)}
    sizes = torch.randint(0, 31, (4,), generator=generator).tolist()
    host = [{"labels": torch.randint(0, 91, (n,), generator=generator),
             "boxes": torch.rand(n, 4, generator=generator).mul(0.5).add(0.25)} for n in sizes]
    targets = [{key: value.to(DEVICE) for key, value in target.items()} for target in host]
    padded = pad_targets(host, 300, 91).to(DEVICE)
    config = DeformableDETRConfig(with_box_refine=True, two_stage=True)
    criterion = build_deformable_criterion(config, backend="triton", check_targets=False)
    criterion.matcher.solver = resolve_solver("triton", check_invalid=False)
    criterion(outputs, targets), criterion.forward_padded(outputs, padded)   # compile outside the checked region
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        losses, padded_losses = criterion(outputs, targets), criterion.forward_padded(outputs, padded)
    finally:
        if DEVICE == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    expected = build_deformable_criterion(config, backend="scipy")(outputs, targets)
    for name, value in expected.items():
        assert torch.allclose(losses[name], value, rtol=1e-5, atol=1e-6), name
        assert torch.allclose(padded_losses[name], value, rtol=1e-5, atol=1e-5), name
