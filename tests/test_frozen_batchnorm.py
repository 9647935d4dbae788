"""FrozenBatchNorm2d's cached fold: one op per forward, refolded when a buffer changes, the original when recorded.

The oracle is the original's forward, written out here: the fold from the buffers, then `x * scale + shift`.
By default the cached forward is that last expression on the cached fold, bit for bit (tested at the end);
with `single_op` (what fastdetr.optimize sets, and what the tests use) it is `torch.addcmul(shift, x, scale)`,
which this CPU computes as a fused multiply-add: measured
against the oracle, at most 1.19e-7 (2**-23) of |x * scale| + |shift| for a float32 output, so the bound below is
1e-6 of that; a bfloat16 output (bfloat16 buffers and input) differs by up to a bfloat16 rounding (1e-2 bound).
"""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

from fastdetr.measure.counters import OpCounter
from fastdetr.reference import FrozenBatchNorm2d

CHANNELS = 64
STATE_DICT_KEYS = ["weight", "bias", "running_mean", "running_var"]


def _random_module(channels: int = CHANNELS, seed: int = 0) -> FrozenBatchNorm2d:
    generator = torch.Generator().manual_seed(seed)
    module = FrozenBatchNorm2d(channels)
    module.single_op = True   # the tests below are of the one-op forward; the default's are at the end
    module.load_state_dict({
        "weight": torch.randn(channels, generator=generator),
        "bias": torch.randn(channels, generator=generator),
        "running_mean": torch.randn(channels, generator=generator),
        "running_var": torch.rand(channels, generator=generator) * 3 + 0.1,
    })
    return module


def _input(dtype: torch.dtype = torch.float32, channels: int = CHANNELS, channels_last: bool = False,
           seed: int = 1) -> torch.Tensor:
    x = (torch.randn(2, channels, 13, 21, generator=torch.Generator().manual_seed(seed)) * 4).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _fold(module: FrozenBatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The original's fold, (1, C, 1, 1) each."""
    scale = module.weight.reshape(1, -1, 1, 1) * (module.running_var.reshape(1, -1, 1, 1) + module.eps).rsqrt()
    shift = module.bias.reshape(1, -1, 1, 1) - module.running_mean.reshape(1, -1, 1, 1) * scale
    return scale, shift


def _original(module: FrozenBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    scale, shift = _fold(module)
    return x * scale + shift


def _assert_matches_original(out: torch.Tensor, module: FrozenBatchNorm2d, x: torch.Tensor) -> None:
    expected = _original(module, x)
    assert out.dtype == expected.dtype and out.shape == expected.shape and out.stride() == expected.stride()
    scale, shift = _fold(module)
    magnitude = ((x * scale).abs() + shift.abs()).double()
    bound = 1e-6 if out.dtype in (torch.float32, torch.float64) else 1e-2
    assert ((out.double() - expected.double()).abs() <= bound * magnitude).all()


@pytest.mark.parametrize("buffer_dtype,input_dtype", [(torch.float32, torch.float32),
                                                      (torch.float32, torch.bfloat16),   # autocast's backbone
                                                      (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_the_original_and_caches_its_fold_bit_for_bit(buffer_dtype, input_dtype, channels_last):
    module = _random_module().to(buffer_dtype)
    x = _input(input_dtype, channels_last=channels_last)
    for _ in range(2):   # the first call folds, the second reads the cache
        out = module(x)
        _assert_matches_original(out, module, x)
    scale, shift = _fold(module)
    assert torch.equal(module._fold_cache.scale, scale) and torch.equal(module._fold_cache.shift, shift)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert list(module.state_dict()) == STATE_DICT_KEYS


@pytest.mark.parametrize("channels", [1, 7, 257])
def test_odd_channel_counts(channels):
    module = _random_module(channels)
    x = _input(channels=channels)
    _assert_matches_original(module(x), module, x)
    _assert_matches_original(module(x[:1, :, :1, :1]), module, x[:1, :, :1, :1])


def test_second_forward_is_one_op():
    module, x = _random_module(), _input()
    with OpCounter() as first:
        module(x)
    with OpCounter() as second:
        module(x)
    assert first.op_counts == {"aten.add": 1, "aten.rsqrt": 1, "aten.mul": 2, "aten.sub": 1, "aten.addcmul": 1}
    assert second.op_counts == {"aten.addcmul": 1} and second.syncs == 0


def _load_other_state_dict(module):
    module.load_state_dict(_random_module(seed=5).state_dict())


def _load_with_num_batches_tracked(module):
    module.load_state_dict({**_random_module(seed=5).state_dict(), "num_batches_tracked": torch.tensor(3)})


def _assign_new_tensor(module):
    module.bias = torch.randn(CHANNELS)


def _replace_data(module):
    module.running_mean.data = torch.randn(CHANNELS)


@pytest.mark.parametrize("change", [
    _load_other_state_dict,
    _load_with_num_batches_tracked,
    lambda module: module.running_var.mul_(2),
    lambda module: module.weight.copy_(torch.randn(CHANNELS)),
    _assign_new_tensor,
    _replace_data,
    lambda module: module.double(),
    lambda module: module.half(),
], ids=["load_state_dict", "load_state_dict_num_batches_tracked", "mul_", "copy_", "assignment", "data",
        "double", "half"])
def test_follows_every_change_of_the_buffers(change):
    module, x = _random_module(), _input()
    before = module(x)
    with torch.no_grad():
        change(module)
    after = module(x)
    _assert_matches_original(after, module, x)
    assert not torch.equal(after, before)
    with OpCounter() as counter:   # refolded once, then cached again
        module(x)
    assert counter.op_counts == {"aten.addcmul": 1}


def test_refolds_in_place_where_a_captured_graph_reads():
    module, x = _random_module(), _input()
    module(x)
    scale, shift = module._fold_cache.scale, module._fold_cache.shift
    addresses = scale.data_ptr(), shift.data_ptr()
    _load_other_state_dict(module)   # refolds at once, without a forward
    assert module._fold_cache.scale is scale and module._fold_cache.shift is shift
    assert (scale.data_ptr(), shift.data_ptr()) == addresses
    assert torch.equal(scale, _fold(module)[0]) and torch.equal(shift, _fold(module)[1])
    with torch.no_grad():
        module.running_var.mul_(2)   # seen at the next forward, into the same tensors
    _assert_matches_original(module(x), module, x)
    assert module._fold_cache.scale is scale and torch.equal(scale, _fold(module)[0])


def test_gradient_of_the_input_is_the_originals():
    module = _random_module()
    x = _input().requires_grad_()
    grad_out = torch.randn_like(x)
    module(x)   # fills the cache: the gradient below goes through it
    (grad_x,) = torch.autograd.grad(module(x), x, grad_out)
    (expected,) = torch.autograd.grad(_original(module, x), x, grad_out)
    assert torch.equal(grad_x, expected)


def test_buffers_that_require_grad_get_gradients():
    """Training the statistics is not FrozenBatchNorm's use, but autograd then sees the fold, as in the original."""
    module, x = _random_module(), _input()
    module.weight.requires_grad_()
    module(x).sum().backward()
    reference = _random_module()
    reference.weight.requires_grad_()
    _original(reference, x).sum().backward()
    assert module._fold_cache is None
    torch.testing.assert_close(module.weight.grad, reference.weight.grad, rtol=1e-5, atol=1e-5)


def test_a_cache_filled_in_inference_mode_serves_training():
    module, x = _random_module(), _input()
    with torch.inference_mode():
        module(x)
    x = x.requires_grad_()
    out = module(x)   # would fail if the cache were an inference tensor: addcmul saves scale for the backward
    out.sum().backward()
    assert torch.equal(x.grad, _fold(module)[0].expand_as(x))
    with torch.inference_mode():
        module.running_var.mul_(2)
        _assert_matches_original(module(x.detach()), module, x.detach())   # refolds in place in inference mode


def test_autocast_keeps_the_originals_dtype():
    module, x = _random_module(), _input()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = torch.nn.functional.conv2d(x, torch.randn(CHANNELS, CHANNELS, 1, 1))   # bfloat16
        out, expected = module(features), _original(module, features)
    assert features.dtype == torch.bfloat16 and out.dtype == expected.dtype == torch.float32
    _assert_matches_original(out, module, features)


def test_torch_compile_records_the_fold_from_the_buffers():
    module, x = _random_module(), _input()
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), _original(module, x))   # the original's ops: same rounding
    assert module._fold_cache is None                        # neither read nor written while compiling
    with torch.no_grad():
        module.running_var.mul_(2)
    assert torch.equal(compiled(x), _original(module, x))   # the graph reads the buffers, not a folded constant
    _assert_matches_original(module(x), module, x)


def test_jit_trace_and_fx_record_the_buffers():
    """torch.fx's tracer records buffers only with proxy_buffer_attributes (by default it bakes in the fold's
    result as constants, from the original's forward too)."""
    module, x = _random_module(), _input()
    module(x)   # a cache exists: tracing must not bake it in
    traced = torch.jit.trace(module, (x,), check_trace=False)
    tracer = torch.fx.Tracer()
    tracer.proxy_buffer_attributes = True
    graph = torch.fx.GraphModule(module, tracer.trace(module))
    assert {node.target for node in graph.graph.nodes if node.op == "get_attr"} == set(STATE_DICT_KEYS)
    with torch.no_grad():
        module.running_var.mul_(2)
    assert torch.equal(traced(x), _original(module, x))
    assert torch.equal(graph(x), _original(module, x))


def test_torchscript_compiles_the_original():
    module, x = _random_module(), _input()
    module(x)   # a cache exists: scripting skips it
    scripted = torch.jit.script(module)
    with torch.no_grad():
        module.running_var.mul_(2)   # the scripted module shares the buffers
    assert torch.equal(scripted(x), _original(module, x))
    assert list(scripted.state_dict()) == STATE_DICT_KEYS


def test_meta_buffers_and_inputs():
    module = _random_module().to("meta")
    out = module(torch.empty(2, CHANNELS, 5, 7, device="meta"))
    assert out.shape == (2, CHANNELS, 5, 7) and out.is_meta and module._fold_cache is None


def test_deepcopy_pickle_and_torch_save_drop_the_cache():
    module, x = _random_module(), _input()
    expected = module(x)
    saved = io.BytesIO()
    torch.save(module, saved)
    saved.seek(0)
    copies = [copy.deepcopy(module), pickle.loads(pickle.dumps(module)), torch.load(saved, weights_only=False)]
    model_copy = copy.deepcopy(torch.nn.Sequential(module, torch.nn.ReLU()))
    for other in [*copies, model_copy[0]]:
        assert other._fold_cache is None and list(other.state_dict()) == STATE_DICT_KEYS
        assert torch.equal(other(x), expected)
        with torch.no_grad():
            other.running_var.mul_(2)   # the copy's buffers are its own
    assert torch.equal(module(x), expected) and module._fold_cache is not None


def test_cuda_graph_replay_sees_a_loaded_state_dict():
    if not torch.cuda.is_available():
        pytest.skip("CUDA graphs need a CUDA device")
    module, x = _random_module().cuda(), _input().cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        module(x)   # warm-up: fills the cache outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = module(x)
    _load_other_state_dict(module)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, _original(module, x), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_the_default_forward_is_the_originals_bit_for_bit_in_two_ops(input_dtype):
    module = _random_module()
    module.single_op = False
    x = _input(input_dtype)
    module(x)
    with OpCounter() as counter:
        out = module(x)
    assert torch.equal(out, _original(module, x)) and out.dtype == _original(module, x).dtype
    assert counter.op_counts == {"aten.mul": 1, "aten.add": 1}


def test_optimize_makes_every_frozen_norm_one_op():
    import fastdetr

    model = fastdetr.build_model("detr_resnet50", num_classes=3, enc_layers=1, dec_layers=1)  # frozen norms
    norms = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert norms and not any(m.single_op for m in norms)
    fastdetr.optimize(model)
    assert all(m.single_op for m in norms)
