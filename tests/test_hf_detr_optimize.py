"""`fastdetr.optimize` on Hugging Face transformers' DETR and Table Transformer: the encoder and decoder layers
convert in place (same Parameters, same state_dict) and run fastdetr's fused chain, with transformers' outputs
(fp32 eval 1e-5) and gradients (1e-4, dropout 0) on a padded batch of two image sizes; what the fused chain
does not take runs transformers' own forward. Models are built offline from configs with transformers' own
ResNet (small, for the interpreter), random weights.

`make test` runs this file under the venv's transformers 5 (DETR in the layout of transformers 5, Table
Transformer in the 4.x layout it kept); `make test-transformers4` runs it again under transformers 4.57.6
(both in the 4.x layout)."""
from __future__ import annotations

import copy
import io
import logging

import pytest
import torch

import fastdetr
from fastdetr.backend import interpreter_enabled, triton_importable
from fastdetr.measure.counters import TritonLaunchCounter
from fastdetr.nn import hf_detr

transformers = pytest.importorskip("transformers", reason="transformers is a dev dependency (the conversion tests)")
pytestmark = pytest.mark.skipif(not (triton_importable() and interpreter_enabled()),
                                reason="CPU tensors run the fused chain only under TRITON_INTERPRET=1")
TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


def _model(seed: int = 0, family: str = "detr", **overrides):
    """A small DetrForObjectDetection ("detr") or TableTransformerForObjectDetection ("table"), eval mode."""
    from transformers import (
        DetrConfig,
        DetrForObjectDetection,
        ResNetConfig,
        TableTransformerConfig,
        TableTransformerForObjectDetection,
    )

    torch.manual_seed(seed)
    settings = dict(use_timm_backbone=False, backbone=None, use_pretrained_backbone=False,
                    backbone_config=ResNetConfig(out_features=["stage4"], depths=[1, 1, 1, 1],
                                                 hidden_sizes=[8, 16, 32, 64], embedding_size=8),
                    d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                    decoder_attention_heads=2, encoder_ffn_dim=96, decoder_ffn_dim=96, num_queries=6, num_labels=4,
                    dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    config, model = ((DetrConfig, DetrForObjectDetection) if family == "detr"
                     else (TableTransformerConfig, TableTransformerForObjectDetection))
    return model(config(**{**settings, **overrides})).eval()


def _batch(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(2, 3, 96, 128, generator=generator)
    pixel_mask = torch.ones(2, 96, 128, dtype=torch.long)
    pixel_mask[1, 64:, :] = 0
    pixel_mask[1, :, 80:] = 0
    return pixel_values, pixel_mask


def _relative(actual, expected, floor=1e-5) -> float:
    assert torch.isfinite(actual).all()
    return ((actual - expected).norm() / expected.norm().clamp_min(floor)).item()


@pytest.mark.parametrize("family", ["detr", "table"])
def test_layers_convert_in_place_with_a_log_line(caplog, family):
    model = _model(family=family)
    parameters = {name: id(p) for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    with caplog.at_level(logging.INFO, logger="fastdetr.optimize"):
        assert fastdetr.optimize(model) is model
    prefix = "Detr" if family == "detr" else "TableTransformer"
    assert (f"converted 4 transformers DETR layers (2 {prefix}DecoderLayer, 2 {prefix}EncoderLayer)"
            in caplog.text)
    assert {name: id(p) for name, p in model.named_parameters()} == parameters
    assert list(model.state_dict()) == keys
    layer = model.model.encoder.layers[0]
    module = transformers.models.detr.modeling_detr if family == "detr" else \
        transformers.models.table_transformer.modeling_table_transformer
    assert isinstance(layer, getattr(module, f"{prefix}EncoderLayer"))
    assert type(layer).__name__ == f"Fused{prefix}EncoderLayer"
    legacy = family == "table" or TRANSFORMERS_MAJOR < 5
    assert type(layer).__mro__[1] is (hf_detr.FusedLegacyEncoderLayer if legacy else hf_detr.FusedDetrEncoderLayer)
    assert hf_detr.layout_of(layer)[1].normalize_before == (family == "table")     # Table Transformer: pre-norm
    fastdetr.optimize(model)   # twice is harmless
    assert type(model.model.decoder.layers[1]).__name__ == f"Fused{prefix}DecoderLayer"


@pytest.mark.parametrize("family, attention", [("detr", "default"), ("detr", "eager"), ("table", "default")])
def test_eval_outputs_match_and_run_the_fused_kernels(family, attention):
    """transformers 5's DETR default (sdpa) takes bool masks, eager additive float masks; transformers 4.x and
    Table Transformer additive float masks."""
    plain = _model(family=family, **({} if attention == "default" else {"attn_implementation": attention}))
    fused = fastdetr.optimize(copy.deepcopy(plain))
    pixel_values, pixel_mask = _batch()
    with torch.no_grad():
        expected = plain(pixel_values=pixel_values, pixel_mask=pixel_mask)
        with TritonLaunchCounter() as launches:
            actual = fused(pixel_values=pixel_values, pixel_mask=pixel_mask)
    # per layer: the in-projection, the attention kernel(s), the residual+LayerNorm epilogues, the FFN
    assert launches.launch_counts["_attention_fwd_kernel"] == 2 + 2 * 2, dict(launches.launch_counts)
    assert _relative(actual.logits, expected.logits) < 1e-5
    assert _relative(actual.pred_boxes, expected.pred_boxes) < 1e-5
    assert _relative(actual.encoder_last_hidden_state, expected.encoder_last_hidden_state) < 1e-5
    assert _relative(actual.last_hidden_state, expected.last_hidden_state) < 1e-5


@pytest.mark.parametrize("family", ["detr", "table"])
def test_the_bare_model_converts_too(family):
    """DetrModel / TableTransformerModel (no detection heads): the same conversion, the same decoder output."""
    plain = _model(seed=17, family=family).model
    assert type(plain).__name__ == ("DetrModel" if family == "detr" else "TableTransformerModel")
    fused = fastdetr.optimize(copy.deepcopy(plain))
    pixel_values, pixel_mask = _batch(seed=18)
    with torch.no_grad():
        expected = plain(pixel_values=pixel_values, pixel_mask=pixel_mask)
        with TritonLaunchCounter() as launches:
            actual = fused(pixel_values=pixel_values, pixel_mask=pixel_mask)
    assert launches.launch_counts["_attention_fwd_kernel"] == 6
    assert _relative(actual.last_hidden_state, expected.last_hidden_state) < 1e-5


@pytest.mark.parametrize("family", ["detr", "table"])
def test_training_gradients_match_with_dropout_off(family):
    plain = _model(seed=2, family=family).train()
    fused = fastdetr.optimize(copy.deepcopy(plain)).train()
    pixel_values, pixel_mask = _batch(seed=3)
    weights = torch.linspace(-1, 1, 6 * 5).view(1, 6, 5)   # 6 queries x (4 labels + no-object)
    for model in (plain, fused):
        with TritonLaunchCounter() as launches:
            out = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
            ((out.logits * weights).sum() + out.pred_boxes.square().sum()).backward()
    assert launches.launch_counts["_attention_bwd_dq_kernel"] > 0     # the fused backward ran (last: fused)
    total = torch.stack([q.grad.norm() for q in plain.parameters() if q.grad is not None]).norm().item()
    for (name, p), (_, q) in zip(fused.named_parameters(), plain.named_parameters()):
        if q.grad is None:
            assert p.grad is None, name
            continue
        # gradients that are zero in exact arithmetic (a key bias: softmax is shift-invariant; the first
        # decoder layers' self-attention, whose queries start equal) are held to 1e-7 of the model's total
        # gradient norm, not to their own rounding noise
        assert _relative(p.grad, q.grad, floor=1e-3 * total) < 1e-4, name


@pytest.mark.skipif(TRANSFORMERS_MAJOR < 5, reason="transformers 4.x's DETR does not support gradient checkpointing")
def test_activation_checkpointing_recomputes_the_same_dropout_masks():
    """transformers' activation checkpointing reruns the fused layers in backward: the kernels' dropout seeds come
    from torch's generator, whose state checkpointing restores, so the gradients are the un-checkpointed ones
    bit for bit, dropout on."""
    plain = fastdetr.optimize(_model(seed=15, dropout=0.1, attention_dropout=0.1, activation_dropout=0.1).train())
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing_enable()
    pixel_values, pixel_mask = _batch(seed=16)
    gradients, launches = [], []
    for model in (plain, checkpointed):
        torch.manual_seed(0)
        with TritonLaunchCounter() as counter:
            out = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
            (out.logits.sum() + out.pred_boxes.square().sum()).backward()
        launches.append(counter.launch_counts["_attention_fwd_kernel"])
        gradients.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    assert launches[1] > launches[0] == 6        # the layers ran again in backward
    assert gradients[0].keys() == gradients[1].keys()
    assert all(torch.equal(gradients[0][name], gradients[1][name]) for name in gradients[0])


def test_a_legacy_layers_bool_mask_reads_true_as_masked():
    """transformers' DetrAttention / TableTransformerAttention fill a bool mask's True with -inf: the fused
    layer reads it the same way, and a float mask as additive."""
    plain = _model(seed=11, family="table").model.encoder.layers[0]
    fused = fastdetr.optimize(copy.deepcopy(plain))
    assert type(fused).__mro__[1] is hf_detr.FusedLegacyEncoderLayer
    generator = torch.Generator().manual_seed(12)
    hidden, position = (torch.randn(3, 20, 64, generator=generator) for _ in range(2))
    padding = torch.zeros(3, 20, dtype=torch.bool)
    padding[1, 13:], padding[2, 5:] = True, True
    bool_mask = padding[:, None, None, :].expand(3, 1, 20, 20)
    float_mask = torch.zeros(3, 1, 20, 20).masked_fill(bool_mask, torch.finfo(torch.float32).min)
    with torch.no_grad():
        for mask in (bool_mask, float_mask):
            expected = plain(hidden, mask, object_queries=position)
            with TritonLaunchCounter() as launches:
                actual = fused(hidden, mask, object_queries=position)
            assert launches.launch_counts["_attention_fwd_kernel"] == 1
            assert isinstance(actual, tuple) and len(actual) == 1
            assert _relative(actual[0], expected[0]) < 1e-5


@pytest.mark.parametrize("family", ["detr", "table"])
def test_recorded_attentions_run_transformers_forward(family):
    plain = _model(seed=4, family=family, attn_implementation="eager")   # sdpa returns no attention weights
    fused = fastdetr.optimize(copy.deepcopy(plain))
    pixel_values, pixel_mask = _batch(seed=5)
    with torch.no_grad():
        expected = plain(pixel_values=pixel_values, pixel_mask=pixel_mask, output_attentions=True)
        with TritonLaunchCounter() as launches:
            actual = fused(pixel_values=pixel_values, pixel_mask=pixel_mask, output_attentions=True)
    assert launches.launch_counts["_attention_fwd_kernel"] == 0
    assert len(actual.encoder_attentions) == 2 and actual.encoder_attentions[0] is not None
    assert torch.allclose(actual.encoder_attentions[1], expected.encoder_attentions[1], atol=1e-6)
    assert _relative(actual.logits, expected.logits) < 1e-6


def test_an_unsupported_activation_is_logged_and_runs_transformers_forward(caplog):
    plain = _model(seed=6, activation_function="gelu")
    fused = copy.deepcopy(plain)
    with caplog.at_level(logging.INFO, logger="fastdetr.optimize"):
        fastdetr.optimize(fused)
    assert "runs transformers' own forward: activation GELUActivation" in caplog.text
    pixel_values, pixel_mask = _batch(seed=7)
    with torch.no_grad(), TritonLaunchCounter() as launches:
        actual = fused(pixel_values=pixel_values, pixel_mask=pixel_mask)
    assert launches.launches == 0
    with torch.no_grad():
        assert torch.equal(actual.logits, plain(pixel_values=pixel_values, pixel_mask=pixel_mask).logits)


@pytest.mark.parametrize("family", ["detr", "table"])
def test_bf16_autocast_within_bf16_tolerance(family):
    plain = _model(seed=8, family=family)
    fused = fastdetr.optimize(copy.deepcopy(plain))
    pixel_values, pixel_mask = _batch(seed=9)
    with torch.no_grad():
        exact = plain(pixel_values=pixel_values, pixel_mask=pixel_mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            actual = fused(pixel_values=pixel_values, pixel_mask=pixel_mask)
    assert _relative(actual.logits.float(), exact.logits) < 3e-2
    assert _relative(actual.pred_boxes.float(), exact.pred_boxes) < 3e-2


def test_an_optimized_model_pickles_and_loads_with_its_fused_layers():
    """torch.save of the whole module (fused classes pickle by reference) and torch.load back."""
    model = fastdetr.optimize(_model(seed=13))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.model.decoder.layers[0]) is type(model.model.decoder.layers[0])
    pixel_values, pixel_mask = _batch(seed=14)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixel_values, pixel_mask=pixel_mask).logits,
                           model(pixel_values=pixel_values, pixel_mask=pixel_mask).logits)


def test_a_layer_with_neither_layout_is_left_alone_with_a_log_line(caplog):
    """A class named like transformers' DETR layer whose FFN is missing (no fc2): left unchanged."""
    from torch import nn

    class DetrAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.k_proj, self.v_proj, self.q_proj, self.out_proj = (nn.Linear(8, 8) for _ in range(4))
            self.head_dim, self.dropout = 4, 0.0

    class DetrEncoderLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = DetrAttention()
            self.self_attn_layer_norm, self.final_layer_norm = nn.LayerNorm(8), nn.LayerNorm(8)
            self.fc1, self.activation_fn = nn.Linear(8, 16), nn.ReLU()
            self.dropout = self.activation_dropout = 0.0

    layer = DetrEncoderLayer()
    assert hf_detr.layout_of(layer) is None
    with caplog.at_level(logging.INFO, logger="fastdetr.optimize"):
        fastdetr.optimize(layer)
    assert type(layer) is DetrEncoderLayer
    assert "has self_attn but not the attributes" in caplog.text
    layer.fc2 = nn.Linear(16, 8)     # now the 4.x layout: it converts
    fastdetr.optimize(layer)
    assert type(layer).__mro__[1] is hf_detr.FusedLegacyEncoderLayer


class _HFDetection(torch.utils.data.Dataset):
    """fastdetr's synthetic COCO set in transformers' DETR format: pixel_values and labels
    ({"class_labels", "boxes" cxcywh normalised})."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        image, target = self.dataset[index]
        return {"pixel_values": image, "labels": {"class_labels": target["labels"], "boxes": target["boxes"]}}


def _collate(samples: list[dict]) -> dict:
    height = max(s["pixel_values"].shape[1] for s in samples)
    width = max(s["pixel_values"].shape[2] for s in samples)
    pixel_values = torch.zeros(len(samples), 3, height, width)
    pixel_mask = torch.zeros(len(samples), height, width, dtype=torch.long)
    for i, sample in enumerate(samples):
        _, h, w = sample["pixel_values"].shape
        pixel_values[i, :, :h, :w] = sample["pixel_values"]
        pixel_mask[i, :h, :w] = 1
    return {"pixel_values": pixel_values, "pixel_mask": pixel_mask, "labels": [s["labels"] for s in samples]}


def test_transformers_trainer_runs_two_steps_of_an_optimized_model(tmp_path):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (a dev dependency)")
    from transformers import Trainer, TrainingArguments

    from fastdetr.data import build_synthetic

    train, _ = build_synthetic(tmp_path / "synthetic", num_train=4, num_val=1, augment_seed=0)
    model = fastdetr.optimize(_model(seed=10, num_labels=train.num_classes).train())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    arguments = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2,
                                  learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to=[],
                                  use_cpu=True, dataloader_num_workers=0, remove_unused_columns=False, seed=0)
    trainer = Trainer(model=model, args=arguments, train_dataset=_HFDetection(train), data_collator=_collate)
    with TritonLaunchCounter() as launches:
        result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert launches.launch_counts["_attention_fwd_kernel"] > 0    # the fused chain ran inside the Trainer
    changed = [name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert any(name.startswith("model.encoder.layers.0.self_attn.q_proj") for name in changed)
