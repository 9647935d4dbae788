"""fastdetr.nn.functional, the one place that decides kernel or reference, and the rules the layout keeps.

Through Triton's interpreter on the CPU (conftest sets TRITON_INTERPRET=1);
small widths with DETR's head dim 32, odd token counts (7, 9, 13).
"""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import fastdetr
from fastdetr.backend import interpreter_enabled, triton_importable
from fastdetr.nn import functional
from fastdetr.reference import transformer as reference

ROOT = Path(__file__).resolve().parents[1]

needs_interpreter = pytest.mark.skipif(
    not (triton_importable() and interpreter_enabled()),
    reason="CPU tensors take the kernel path only under Triton's interpreter (TRITON_INTERPRET=1)",
)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


# ---------------------------------------------------------------------------------------------
# Decisions
# ---------------------------------------------------------------------------------------------

def test_attention_supported_reads_the_kernels_head_dims():
    from fastdetr.kernels.attention import HEAD_DIMS

    for head_dim in (16, 32, 48, 64, 128):
        module = nn.MultiheadAttention(head_dim * 2, 2)
        assert functional.attention_supported(module) == (head_dim in HEAD_DIMS), head_dim
    assert "head dim 48" in functional.attention_unsupported(nn.MultiheadAttention(96, 2))
    assert "kdim" in functional.attention_unsupported(nn.MultiheadAttention(64, 2, kdim=32, vdim=32))
    assert "add_bias_kv" in functional.attention_unsupported(nn.MultiheadAttention(64, 2, add_bias_kv=True))
    assert not functional.attention_supported(nn.Linear(4, 4))


@needs_interpreter
def test_one_attention_rule_serves_the_module_and_the_layers(monkeypatch):
    """With the kernel's head dims taken away in one place, nn.MultiheadAttention and the layers both fall back."""
    generator = torch.Generator().manual_seed(1)
    layer = reference.TransformerEncoderLayer(64, 2, 96, dropout=0.0).eval()
    fastdetr.optimize(layer)
    attention = fastdetr.nn.MultiheadAttention(64, 2).eval()
    src = torch.randn(7, 2, 64, generator=generator)
    assert functional.layer_fusable(layer, (layer.norm1, layer.norm2), (layer.self_attn,), (src,), (None,))
    monkeypatch.setattr(functional, "attention_head_dims", lambda: ())
    assert not functional.layer_fusable(layer, (layer.norm1, layer.norm2), (layer.self_attn,), (src,), (None,))
    assert functional.attention_call_unsupported(attention, src, src, src, None, False, None, False) \
        == "head dim 32 is not supported (no Triton)"


def test_layer_fusable_needs_biases_relu_and_bool_masks():
    layer = reference.TransformerEncoderLayer(64, 2, 96, dropout=0.0)
    src = torch.randn(9, 2, 64)
    args = ((layer.norm1, layer.norm2), (layer.self_attn,), (src,))
    mask = torch.zeros(2, 9, dtype=torch.bool)
    assert functional.layer_fusable(layer, *args, (mask,)) == interpreter_enabled()
    assert not functional.layer_fusable(layer, *args, (mask.float(),))
    assert not functional.layer_fusable(layer, (layer.norm1, layer.norm2), (layer.self_attn,), (src[:, 0],), (None,))
    gelu = reference.TransformerEncoderLayer(64, 2, 96, dropout=0.0, activation="gelu")
    assert not functional.layer_fusable(gelu, (gelu.norm1, gelu.norm2), (gelu.self_attn,), (src,), (None,))
    batch_first = nn.MultiheadAttention(64, 2, batch_first=True)
    layer.self_attn = batch_first
    assert functional.attention_supported(batch_first)   # the module itself handles batch_first ...
    assert not functional.layer_fusable(layer, (layer.norm1, layer.norm2), (batch_first,), (src,), (None,))


def test_matcher_kernels_rule():
    cpu = torch.zeros(2, 3)
    assert functional.matcher_kernels(cpu, "triton")
    assert not functional.matcher_kernels(cpu, "scipy")
    assert not functional.matcher_kernels(cpu, "auto")   # the interpreter is slower than scipy: CPU keeps scipy
    assert not functional.matcher_kernels(cpu, "custom")


@needs_interpreter
def test_assignment_leaves_problems_wider_than_the_kernel_to_the_caller():
    from fastdetr.kernels.assignment import MAX_BLOCK

    generator = torch.Generator().manual_seed(2)
    assert functional.assignment(torch.rand(1, MAX_BLOCK + 1, 3, generator=generator), [3]) is None
    cost = torch.rand(2, 5, 4, generator=generator)
    pairs, status = functional.assignment(cost, [4, 2])
    assert status.tolist() == [0, 0] and [len(rows) for rows, _ in pairs] == [4, 2]


# ---------------------------------------------------------------------------------------------
# The layer stacks build the key padding table once
# ---------------------------------------------------------------------------------------------

def _count_table_builds(monkeypatch) -> list[int]:
    import fastdetr.kernels.attention as kernel

    builds: list[int] = []
    original = kernel.kv_block_table
    monkeypatch.setattr(kernel, "kv_block_table", lambda *args: builds.append(1) or original(*args))
    return builds


@needs_interpreter
def test_encoder_and_decoder_stacks_build_the_mask_table_once(monkeypatch):
    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = reference.Transformer(d_model=64, nhead=2, num_encoder_layers=3, num_decoder_layers=2,
                                  dim_feedforward=96, dropout=0.0)
    fused = fastdetr.optimize(reference.Transformer(d_model=64, nhead=2, num_encoder_layers=3,
                                                    num_decoder_layers=2, dim_feedforward=96, dropout=0.0))
    fused.load_state_dict(model.state_dict())
    assert isinstance(fused.encoder, fastdetr.nn.TransformerEncoder)
    assert isinstance(fused.decoder, fastdetr.nn.TransformerDecoder)
    src = torch.randn(2, 64, 3, 5, generator=generator)
    mask = torch.zeros(2, 3, 5, dtype=torch.bool)
    mask[1, :, 3:] = True   # the second image is narrower: padded keys
    query = torch.randn(6, 64, generator=generator)
    pos = torch.randn(2, 64, 3, 5, generator=generator)
    builds = _count_table_builds(monkeypatch)
    hs, memory = fused(src, mask, query, pos)
    assert len(builds) == 2   # once for the encoder's 3 self-attentions, once for the decoder's 2 cross-attentions
    (hs.square().mean() + memory.square().mean()).backward()
    assert len(builds) == 2   # backward reads the tables forward saved
    ref_hs, ref_memory = model(src, mask, query, pos)
    assert relative_error(hs, ref_hs) <= 1e-4 and relative_error(memory, ref_memory) <= 1e-4


@needs_interpreter
def test_a_layer_called_alone_builds_its_own_table(monkeypatch):
    generator = torch.Generator().manual_seed(4)
    layer = fastdetr.optimize(reference.TransformerEncoderLayer(64, 2, 96, dropout=0.0))
    src = torch.randn(13, 2, 64, generator=generator)
    mask = torch.zeros(2, 13, dtype=torch.bool)
    mask[0, 10:] = True
    builds = _count_table_builds(monkeypatch)
    layer(src, src_key_padding_mask=mask)
    layer(src, src_key_padding_mask=mask)
    assert len(builds) == 2   # nothing is cached between calls


# ---------------------------------------------------------------------------------------------
# The layout's rules
# ---------------------------------------------------------------------------------------------

def _imports(path: Path) -> list[str]:
    """Modules `path` imports, at any depth, except under `if __name__ == "__main__":`."""
    tree = ast.parse(path.read_text())
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "kernels").glob("*.py")), ids=lambda p: p.name)
def test_kernels_import_nothing_above_backend_and_box_ops(path):
    allowed = ("fastdetr.kernels", "fastdetr.backend", "fastdetr.box_ops")
    above = [name for name in _imports(path)
             if (name == "fastdetr" or name.startswith("fastdetr.")) and not name.startswith(allowed)]
    assert not above, f"{path.name} imports {above}"


@pytest.mark.parametrize("path", sorted((ROOT / "kernels").glob("*.py")), ids=lambda p: p.name)
def test_kernels_keep_no_module_level_mutable_state(path):
    """No process-wide caches: module-level names bound to lists, dicts or sets are constants in UPPER_CASE
    (configs are built by lru_cached functions), and nothing keeps weak references to callers' tensors."""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, (ast.List, ast.Dict, ast.Set)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                name = ast.unparse(target)
                assert name.lstrip("_").isupper(), f"{path.name}: module-level mutable {name}"
    assert "weakref" not in _imports(path), path.name


def test_optimize_is_the_function_and_lives_beside_the_classes_it_converts_to():
    from fastdetr.nn.convert import optimize

    assert fastdetr.optimize is optimize and callable(fastdetr.optimize)
    assert importlib.util.find_spec("fastdetr.optimize") is None   # no module shadowing the name


def test_only_functional_asks_the_backend_in_the_nn_modules_and_the_matcher():
    """The nn modules and the matcher reach the kernels and the backend through fastdetr.nn.functional only."""
    for relative in ("fastdetr/nn/attention.py", "fastdetr/nn/transformer.py", "fastdetr/nn/convert.py",
                     "fastdetr/nn/deformable_attention.py", "fastdetr/nn/hf.py", "fastdetr/nn/hf_detr.py",
                     "fastdetr/matcher.py",
                     "fastdetr/criterion.py"):
        below = [name for name in _imports(ROOT / relative)
                 if name.startswith(("fastdetr.kernels", "fastdetr.backend"))]
        assert not below, (relative, below)
        source = (ROOT / relative).read_text()
        assert "from .backend" not in source and "from ..backend" not in source, relative


def test_ms_deform_attn_takes_the_kernel_where_it_can_and_the_reference_elsewhere(monkeypatch):
    import fastdetr.kernels.deformable_attention as kernel
    from fastdetr.reference.deformable_attention import ms_deform_attn as reference

    generator = torch.Generator().manual_seed(5)
    shapes = torch.tensor([[3, 4], [1, 2]])
    starts = torch.tensor([0, 12])
    value = torch.randn(2, 14, 2, 16, generator=generator)
    locations = torch.rand(2, 5, 2, 2, 3, 2, generator=generator)
    weights = torch.rand(2, 5, 2, 2, 3, generator=generator)
    launches = []
    original = kernel.ms_deform_attn_forward
    monkeypatch.setattr(kernel, "ms_deform_attn_forward", lambda *a: launches.append(1) or original(*a))
    expected = reference(value.double(), shapes, starts, locations.double(), weights.double())
    out = functional.ms_deform_attn(value, shapes, starts, locations, weights)
    assert len(launches) == int(interpreter_enabled())
    assert relative_error(out, expected) <= 1e-5
    out64 = functional.ms_deform_attn(value.double(), shapes, starts, locations.double(), weights.double())
    assert torch.equal(out64, expected) and len(launches) == int(interpreter_enabled())   # float64: the reference
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert torch.equal(functional.ms_deform_attn(value, shapes, starts, locations, weights),
                       reference(value, shapes, starts, locations, weights))
