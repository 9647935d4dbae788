"""transformers' DETR checkpoints read by `fastdetr.load_checkpoint`: the key renaming against the reference
key lists (timm ResNet-50, 91 labels; transformers 4.57.6 and 5.24.0 write the same names), and whole models
built offline with transformers' own ResNet (timm needs torchvision, which does not install beside the CPU
torch wheel), saved with save_pretrained and loaded by fastdetr: the same outputs on a padded batch."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import fastdetr
from fastdetr.checkpoint import CheckpointError
from fastdetr.hub import from_transformers, is_transformers_state_dict
from fastdetr.reference.detr import DETR

# copies of shared/reference's key lists (read off transformers 4.57.6 and 5.24.0 with save_pretrained)
REFERENCE = Path(__file__).resolve().parent / "fixtures"


def _key_list(name: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in (REFERENCE / name).read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split("\t")
        shapes[key] = tuple(int(n) for n in re.findall(r"\d+", shape))
    return shapes


def _random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}


@pytest.mark.parametrize("fixture", ["hf_detr_resnet50_keys_transformers4.txt",
                                     "hf_detr_resnet50_keys_transformers5.txt"])
def test_the_hub_layout_renames_onto_detr_r50_exactly(fixture):
    """Every key of a hub DETR-R50 file lands on a key of fastdetr's DETR-R50 with its shape; none is left."""
    hf = _random_state_dict(_key_list(fixture))
    assert is_transformers_state_dict(hf)
    official = from_transformers(hf, fixture)
    model = DETR(fastdetr.DETRConfig(num_classes=91, aux_loss=False))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert {k: tuple(v.shape) for k, v in official.items()} == expected
    prefix = "model.decoder.layers.3.encoder_attn."
    packed = official["transformer.decoder.layers.3.multihead_attn.in_proj_weight"]
    assert torch.equal(packed, torch.cat([hf[prefix + "q_proj.weight"], hf[prefix + "k_proj.weight"],
                                          hf[prefix + "v_proj.weight"]]))
    assert torch.equal(official["backbone.0.body.layer3.0.downsample.1.running_var"],
                       hf["model.backbone.conv_encoder.model.layer3.0.downsample.1.running_var"])
    assert torch.equal(official["transformer.decoder.layers.5.norm3.weight"],
                       hf["model.decoder.layers.5.final_layer_norm.weight"])


def test_a_foreign_key_is_named():
    hf = _random_state_dict(_key_list("hf_detr_resnet50_keys_transformers5.txt"))
    hf["model.encoder.layers.0.self_attn.rotary.weight"] = torch.ones(2)
    with pytest.raises(CheckpointError, match="rotary"):
        from_transformers(hf)
    del hf["model.encoder.layers.0.self_attn.rotary.weight"]
    del hf["model.encoder.layers.0.self_attn.k_proj.bias"]
    with pytest.raises(CheckpointError, match=r"encoder.layers.0.self_attn has \['q', 'v'\]"):
        from_transformers(hf)


def _hf_model(position_embedding: str = "sine", seed: int = 0):
    pytest.importorskip("transformers", reason="transformers is a dev dependency (the conversion tests)")
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

    torch.manual_seed(seed)
    config = DetrConfig(use_timm_backbone=False, backbone=None, use_pretrained_backbone=False,
                        backbone_config=ResNetConfig(out_features=["stage4"]), d_model=64, encoder_layers=2,
                        decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                        encoder_ffn_dim=128, decoder_ffn_dim=128, num_queries=7, num_labels=5,
                        position_embedding_type=position_embedding)
    return _perturb_frozen_batchnorm(DetrForObjectDetection(config).eval())


def _perturb_frozen_batchnorm(model):
    """Move the frozen BatchNorms' statistics off identity, so the backbone's mapping is exercised."""
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    return model


def _padded_batch(seed: int = 1):
    """Two images of different sizes, padded to one batch: (pixel_values, pixel_mask 1 = valid)."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(2, 3, 96, 128, generator=generator)
    pixel_mask = torch.ones(2, 96, 128, dtype=torch.long)
    pixel_mask[1, 64:, :] = 0
    pixel_mask[1, :, 96:] = 0
    pixel_values[1] *= pixel_mask[1]
    return pixel_values, pixel_mask


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
@pytest.mark.parametrize("position_embedding", ["sine", "learned"])
def test_save_pretrained_files_load_and_give_transformers_outputs(tmp_path, weights, position_embedding):
    hf = _hf_model(position_embedding)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    if weights == "pytorch_model.bin":
        # what transformers 4.x wrote by default (5.x writes safetensors only): the same tensors, torch.save'd
        from safetensors.torch import load_file

        torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / weights)
        (tmp_path / "model.safetensors").unlink()
    model = fastdetr.load_checkpoint(tmp_path).eval()
    assert model.config.num_classes == 5 and model.config.num_queries == 7 and model.config.hidden_dim == 64
    assert model.config.position_embedding == position_embedding
    _assert_same_outputs(hf, model, seed=1)


def _assert_same_outputs(hf, model, seed: int, tolerance: float = 1e-5) -> None:
    """transformers' model and fastdetr's on one padded batch: logits and boxes within `tolerance`."""
    pixel_values, pixel_mask = _padded_batch(seed=seed)
    with torch.no_grad():
        expected = hf(pixel_values=pixel_values, pixel_mask=pixel_mask)
        actual = model((pixel_values, pixel_mask == 0))
    assert (actual["pred_logits"] - expected.logits).abs().max().item() < tolerance
    assert (actual["pred_boxes"] - expected.pred_boxes).abs().max().item() < tolerance


def test_a_table_transformer_directory_loads_pre_norm_with_a_resnet18(tmp_path):
    """Table Transformer's save_pretrained files (pre-norm, the encoder's final LayerNorm, a ResNet-18 of
    basic blocks): fastdetr builds the matching DETR from config.json and gives transformers' outputs."""
    pytest.importorskip("transformers", reason="transformers is a dev dependency (the conversion tests)")
    from transformers import ResNetConfig, TableTransformerConfig, TableTransformerForObjectDetection

    torch.manual_seed(5)
    backbone = ResNetConfig(out_features=["stage4"], layer_type="basic", depths=[2, 2, 2, 2],
                            hidden_sizes=[64, 128, 256, 512])
    config = TableTransformerConfig(use_timm_backbone=False, backbone=None, use_pretrained_backbone=False,
                                    backbone_config=backbone, d_model=64, encoder_layers=2, decoder_layers=3,
                                    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=96,
                                    decoder_ffn_dim=96, num_queries=9, num_labels=3)
    hf = _perturb_frozen_batchnorm(TableTransformerForObjectDetection(config).eval())
    with torch.no_grad():      # transformers initialises LayerNorms to identity: move them off it
        for name, p in hf.named_parameters():
            if "layer_norm" in name or "layernorm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
    hf.save_pretrained(tmp_path)
    model = fastdetr.load_checkpoint(tmp_path).eval()
    assert model.config.pre_norm and model.config.backbone == "resnet18" and model.config.dec_layers == 3
    assert model.transformer.encoder.norm is not None
    _assert_same_outputs(hf, model, seed=6)


def test_a_live_state_dict_loads_into_a_given_model(tmp_path):
    """The installed transformers' in-memory layout saved as a bare state_dict file: transformers 5's
    (model.backbone.model.*, o_proj, mlp.fc1) or, under transformers 4.x (`make test-transformers4`), the
    hub layout itself (out_proj, fc1 on the layer)."""
    import transformers

    hf = _hf_model(seed=3)
    state_dict = hf.state_dict()
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert any(".o_proj." in key for key in state_dict) and any(".mlp.fc1." in key for key in state_dict)
    else:
        assert any(".out_proj." in key for key in state_dict) and not any(".mlp." in key for key in state_dict)
    torch.save(state_dict, tmp_path / "live.pt")
    model = DETR(fastdetr.DETRConfig(num_classes=5, hidden_dim=64, nheads=4, enc_layers=2, dec_layers=2,
                                     dim_feedforward=128, num_queries=7, aux_loss=False)).eval()
    assert fastdetr.load_checkpoint(tmp_path / "live.pt", model) is model
    pixel_values, pixel_mask = _padded_batch(seed=4)
    with torch.no_grad():
        expected = hf(pixel_values=pixel_values, pixel_mask=pixel_mask)
        actual = model((pixel_values, pixel_mask == 0))
    assert (actual["pred_logits"] - expected.logits).abs().max().item() < 1e-5


def test_an_unsupported_config_is_named(tmp_path):
    hf = _hf_model()
    hf.config.activation_function = "gelu"
    hf.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="activation_function 'gelu'"):
        fastdetr.load_checkpoint(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors or pytorch_model.bin"):
        fastdetr.load_checkpoint(empty)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        fastdetr.load_checkpoint(empty / "model.safetensors")
    (empty / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        fastdetr.load_checkpoint(empty / "model.safetensors")


# ---------------------------------------------------------------------------------------------
# fastdetr -> transformers
# ---------------------------------------------------------------------------------------------

def _fastdetr_model(seed: int = 5, **overrides) -> DETR:
    torch.manual_seed(seed)
    settings = dict(num_classes=5, hidden_dim=64, nheads=4, enc_layers=2, dec_layers=2, dim_feedforward=128,
                    num_queries=7, aux_loss=False)
    return _perturb_frozen_batchnorm(DETR(fastdetr.DETRConfig(**{**settings, **overrides})).eval())


def test_detr_r50_writes_the_hub_layout_exactly_and_reads_back_bit_for_bit():
    from fastdetr.hub import to_transformers

    model = DETR(fastdetr.DETRConfig(num_classes=91, aux_loss=False))
    official = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    hub_layout = to_transformers(official)
    expected = _key_list("hf_detr_resnet50_keys_transformers5.txt")
    assert {k: tuple(v.shape) for k, v in hub_layout.items()} == expected
    back = from_transformers(hub_layout)
    assert back.keys() == official.keys() and all(torch.equal(back[k], official[k]) for k in official)


def test_saved_in_transformers_format_from_pretrained_gives_fastdetr_outputs(tmp_path):
    pytest.importorskip("transformers", reason="transformers is a dev dependency (the conversion tests)")
    from transformers import DetrForObjectDetection

    model = _fastdetr_model()
    assert fastdetr.save_checkpoint(tmp_path, model, format="transformers",
                                    transformers_backbone="transformers") == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    hf = DetrForObjectDetection.from_pretrained(tmp_path).eval()     # offline: a local directory
    _assert_same_outputs(hf, model, seed=6)
    reloaded = fastdetr.load_checkpoint(tmp_path)
    assert reloaded.config == model.config
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_a_pre_norm_resnet18_detr_saves_as_a_table_transformer(tmp_path):
    pytest.importorskip("transformers", reason="transformers is a dev dependency (the conversion tests)")
    from transformers import TableTransformerForObjectDetection

    model = _fastdetr_model(seed=7, pre_norm=True, backbone="resnet18", dec_layers=3)
    with torch.no_grad():      # fresh LayerNorms are identities: move them off it
        for name, p in model.named_parameters():
            if ".norm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
    fastdetr.save_checkpoint(tmp_path, model, format="transformers", transformers_backbone="transformers")
    hf = TableTransformerForObjectDetection.from_pretrained(tmp_path).eval()
    _assert_same_outputs(hf, model, seed=8)
    assert fastdetr.load_checkpoint(tmp_path).config == model.config


def test_transformers_format_refuses_what_it_cannot_hold(tmp_path):
    model = _fastdetr_model()
    with pytest.raises(ValueError, match="writes the model only"):
        fastdetr.save_checkpoint(tmp_path, model, format="transformers", epoch=3)
    with pytest.raises(ValueError, match="format must be"):
        fastdetr.save_checkpoint(tmp_path / "x.pth", model, format="onnx")
    with pytest.raises(ValueError, match="ReLU"):
        fastdetr.save_checkpoint(tmp_path, _fastdetr_model(activation="gelu"), format="transformers")
    with pytest.raises(ValueError, match="backbone must be one of"):
        fastdetr.save_checkpoint(tmp_path, model, format="transformers", transformers_backbone="torchvision")
    assert not any(tmp_path.iterdir())   # nothing half-written
