"""Hugging Face transformers' DETR checkpoints, read into fastdetr's (the official DETR's) layout and back.

The hub's facebook/detr-resnet-50 and its fine-tunes are
`DetrForObjectDetection` files, Table Transformer's (microsoft/table-transformer-*)
`TableTransformerForObjectDetection` ones: `model.safetensors` or
`pytorch_model.bin` beside a `config.json`. `fastdetr.load_checkpoint` reads them through this
module: `is_transformers_state_dict` recognises the layout, `from_transformers`
renames the keys (and packs q, k, v into `in_proj_weight` as [q; k; v]), and
`config_from_transformers` turns the config.json into a `DETRConfig`.

Two key layouts exist, both read:
- what `save_pretrained` writes, in transformers 4.x and 5.x alike (the layout
  of every hub file): `model.backbone.conv_encoder.model.*`, `self_attn.out_proj`,
  `fc1` / `fc2` on the layer;
- what a live transformers 5 model's `state_dict()` returns:
  `model.backbone.model.*`, `self_attn.o_proj`, `mlp.fc1` / `mlp.fc2`.
The backbone's names are timm's ResNet (torchvision's names, kept as they are)
or transformers' own `ResNetBackbone` (`embedder.embedder.*`,
`encoder.stages.{s}.layers.{b}.layer.{k}.*`, `shortcut.*`), renamed to
torchvision's. The rest maps one to one: `input_projection` -> `input_proj`,
`query_position_embeddings` -> `query_embed`, `class_labels_classifier` ->
`class_embed`, `bbox_predictor` -> `bbox_embed`, the layer norms by position
(encoder: `self_attn_layer_norm` norm1, `final_layer_norm` norm2; decoder: norm1,
`encoder_attn_layer_norm` norm2, `final_layer_norm` norm3), `encoder_attn` ->
`multihead_attn`, `decoder.layernorm` -> `transformer.decoder.norm`. Table
Transformer is the same DETR, pre-norm (`model_type` "table-transformer" ->
`pre_norm=True`), with the pre-norm encoder's final LayerNorm
(`encoder.layernorm` -> `transformer.encoder.norm`) and a ResNet-18 backbone.

The way back, `to_transformers` and `transformers_config`, is what
`fastdetr.save_checkpoint(..., format="transformers")` writes: the hub layout,
the backbone in timm's names or transformers' ResNet's; a pre-norm DETR as a
Table Transformer.

transformers' `pixel_mask` is 1 on valid pixels; fastdetr's mask is True on padding.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import DETRConfig

# the files save_pretrained writes, in the order they are looked for in a directory
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

_BACKBONE_PREFIXES = ("model.backbone.conv_encoder.model.", "model.backbone.model.")
_HF_RESNET_STEM = {"embedder.embedder.convolution.": "conv1.", "embedder.embedder.normalization.": "bn1."}
_HF_RESNET_BLOCK = re.compile(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(.+)")
_ATTENTION_RENAMES = {"o_proj.": "out_proj.", "out_proj.": "out_proj."}
_ENCODER_NORMS = {"self_attn_layer_norm.": "norm1.", "final_layer_norm.": "norm2."}
_DECODER_NORMS = {"self_attn_layer_norm.": "norm1.", "encoder_attn_layer_norm.": "norm2.",
                  "final_layer_norm.": "norm3."}
_FFN = {"fc1.": "linear1.", "fc2.": "linear2.", "mlp.fc1.": "linear1.", "mlp.fc2.": "linear2."}
# transformers' ResNetConfig (layer_type, depths) -> fastdetr's backbone name
_DEPTHS = {("bottleneck", (3, 4, 6, 3)): "resnet50", ("bottleneck", (3, 4, 23, 3)): "resnet101",
           ("basic", (2, 2, 2, 2)): "resnet18", ("basic", (3, 4, 6, 3)): "resnet34"}
_TIMM_NAMES = {f"{prefix}{depth}": f"resnet{depth}" for depth in (18, 34, 50, 101) for prefix in ("resnet", "resnet-")}
PRE_NORM_MODEL_TYPES = ("table-transformer",)


def is_transformers_state_dict(state_dict: dict[str, Tensor]) -> bool:
    """Whether the keys are a transformers DETR-for-detection model's (either layout)."""
    return "class_labels_classifier.weight" in state_dict and any(key.startswith("model.") for key in state_dict)


def _backbone_key(name: str, source: str) -> str:
    """A backbone parameter's name inside timm's or transformers' ResNet -> torchvision's."""
    for hf_prefix, tv_prefix in _HF_RESNET_STEM.items():
        if name.startswith(hf_prefix):
            return tv_prefix + name[len(hf_prefix):]
    block = _HF_RESNET_BLOCK.fullmatch(name)
    if block is None:
        return name   # timm's ResNet names are torchvision's
    stage, index, rest = int(block.group(1)), block.group(2), block.group(3)
    prefix = f"layer{stage + 1}.{index}."
    if rest.startswith("shortcut.convolution."):
        return prefix + "downsample.0." + rest[len("shortcut.convolution."):]
    if rest.startswith("shortcut.normalization."):
        return prefix + "downsample.1." + rest[len("shortcut.normalization."):]
    conv = re.fullmatch(r"layer\.(\d+)\.(convolution|normalization)\.(.+)", rest)
    if conv is None:
        raise KeyError(f"{source}: backbone key {name!r} is not a ResNet parameter fastdetr knows")
    kind = "conv" if conv.group(2) == "convolution" else "bn"
    return f"{prefix}{kind}{int(conv.group(1)) + 1}.{conv.group(3)}"


def _rename(rest: str, renames: dict[str, str]) -> str | None:
    for old, new in renames.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    return None


def _layer_key(stack: str, rest: str, source: str) -> str | None:
    """`encoder.layers.{i}.` / `decoder.layers.{i}.` suffixes; None for q/k/v projections (packed apart)."""
    for attention, target in (("self_attn.", "self_attn."), ("encoder_attn.", "multihead_attn.")):
        if rest.startswith(attention):
            inner = rest[len(attention):]
            if inner.startswith(("q_proj.", "k_proj.", "v_proj.")):
                return None
            renamed = _rename(inner, _ATTENTION_RENAMES)
            if renamed is not None:
                return target + renamed
    renamed = _rename(rest, _ENCODER_NORMS if stack == "encoder" else _DECODER_NORMS) or _rename(rest, _FFN)
    if renamed is None:
        raise KeyError(f"{source}: {stack} layer key {rest!r} is not a DETR layer parameter")
    return renamed


def from_transformers(state_dict: dict[str, Tensor], source: str = "checkpoint") -> dict[str, Tensor]:
    """transformers' `DetrForObjectDetection` state_dict (module docstring's layouts) -> the official layout.

    Raises CheckpointError naming the first key that fits neither layout, or a layer whose q, k, v are
    incomplete.
    """
    from .checkpoint import CheckpointError

    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}   # (official attention prefix, weight|bias) -> {q, k, v}
    simple = {"model.input_projection.": "input_proj.", "model.query_position_embeddings.": "query_embed.",
              "class_labels_classifier.": "class_embed.", "bbox_predictor.": "bbox_embed.",
              "model.decoder.layernorm.": "transformer.decoder.norm.",
              "model.encoder.layernorm.": "transformer.encoder.norm.",
              "model.backbone.position_embedding.row_embeddings.": "backbone.1.row_embed.",
              "model.backbone.position_embedding.column_embeddings.": "backbone.1.col_embed.",
              "model.position_embedding.row_embeddings.": "backbone.1.row_embed.",
              "model.position_embedding.column_embeddings.": "backbone.1.col_embed."}
    layer_key = re.compile(r"model\.(encoder|decoder)\.layers\.(\d+)\.(.+)")
    try:
        for key, tensor in state_dict.items():
            if key.endswith("num_batches_tracked"):
                continue
            backbone = next((p for p in _BACKBONE_PREFIXES if key.startswith(p)), None)
            if backbone is not None:
                out["backbone.0.body." + _backbone_key(key[len(backbone):], source)] = tensor
                continue
            renamed = _rename(key, simple)
            if renamed is not None:
                out[renamed] = tensor
                continue
            layer = layer_key.fullmatch(key)
            if layer is None:
                raise KeyError(f"{source}: key {key!r} is not part of a transformers DETR-for-detection model")
            stack, index, rest = layer.groups()
            prefix = f"transformer.{stack}.layers.{index}."
            target = _layer_key(stack, rest, source)
            if target is not None:
                out[prefix + target] = tensor
                continue
            attention, projection, kind = rest.split(".")          # e.g. self_attn, q_proj, weight
            official = prefix + ("self_attn" if attention == "self_attn" else "multihead_attn")
            qkv.setdefault((official, kind), {})[projection[0]] = tensor
    except KeyError as error:
        raise CheckpointError(error.args[0]) from None
    for (official, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{source}: {official} has {sorted(parts)} projections' {kind}, "
                                  f"not all of q, k and v")
        out[f"{official}.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def config_from_transformers(config: dict[str, Any], source: str = "config.json") -> DETRConfig:
    """A `DETRConfig` from a transformers DetrConfig's or TableTransformerConfig's dict (its config.json).

    ResNet-18 / -34 / -50 / -101 from `backbone` (timm) or `backbone_config`'s `layer_type` and `depths`
    (transformers' ResNet), pre-norm for Table Transformer (`PRE_NORM_MODEL_TYPES`), `dilation`,
    the class count (`num_labels`, else `id2label`), widths, layers, heads, queries, dropout, position
    embedding and auxiliary loss. A configuration fastdetr's DETR cannot express (another activation than
    ReLU, another backbone) raises CheckpointError naming the field.
    """
    from .checkpoint import CheckpointError

    def field(name: str, default: Any = None) -> Any:
        return config.get(name, default)

    if field("activation_function", "relu") != "relu":
        raise CheckpointError(f"{source}: activation_function {field('activation_function')!r}: fastdetr's DETR "
                              f"has ReLU FFNs only")
    backbone_config = field("backbone_config") or {}
    if field("use_timm_backbone", True) and not backbone_config:
        backbone = _TIMM_NAMES.get(str(field("backbone", "resnet50")))
    else:
        backbone = _DEPTHS.get((backbone_config.get("layer_type", "bottleneck"),
                                tuple(backbone_config.get("depths", ()))))
        if backbone_config.get("downsample_in_bottleneck", False) or backbone_config.get(
                "downsample_in_first_stage", False):
            backbone = None
    if backbone is None:
        raise CheckpointError(f"{source}: backbone {field('backbone')!r} / {backbone_config or None} is not a "
                              f"ResNet-18, -34, -50 or -101 in torchvision's form")
    labels = field("num_labels", len(field("id2label") or {}) or 91)
    heads = field("encoder_attention_heads", 8)
    if field("decoder_attention_heads", heads) != heads or field("decoder_ffn_dim", None) not in (
            None, field("encoder_ffn_dim", 2048)):
        raise CheckpointError(f"{source}: encoder and decoder differ in heads or FFN width; fastdetr's DETR "
                              f"shares them")
    return DETRConfig(
        num_classes=int(labels),
        backbone=backbone,
        dilation=bool(field("dilation", False)),
        position_embedding=str(field("position_embedding_type", "sine")),
        hidden_dim=int(field("d_model", 256)),
        nheads=int(heads),
        enc_layers=int(field("encoder_layers", 6)),
        dec_layers=int(field("decoder_layers", 6)),
        dim_feedforward=int(field("encoder_ffn_dim", 2048)),
        dropout=float(field("dropout", 0.1)),
        num_queries=int(field("num_queries", 100)),
        aux_loss=bool(field("auxiliary_loss", False)),
        pre_norm=field("model_type") in PRE_NORM_MODEL_TYPES,
    )


def weight_file(path: Path) -> Path:
    """The weights of a save_pretrained directory (`WEIGHT_FILES`, first found), or `path` itself."""
    if not path.is_dir():
        return path
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"{path}: a directory without {' or '.join(WEIGHT_FILES)}")


def read_safetensors(path: Path, map_location: Any) -> dict[str, Tensor]:
    """A .safetensors file's tensors (the `safetensors` package, which transformers installs)."""
    from .checkpoint import CheckpointError

    try:
        from safetensors.torch import load_file
    except ImportError as error:
        raise CheckpointError(f"{path}: reading .safetensors needs the safetensors package "
                              f"(pip install safetensors)") from error
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
    try:
        return load_file(str(path), device=device)
    except Exception as error:
        raise CheckpointError(f"{path}: not a readable safetensors file: {error}") from error


def read_config_beside(path: Path) -> dict[str, Any] | None:
    """The config.json in the weights' directory, or None."""
    config = path.parent / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text())
    except (OSError, json.JSONDecodeError) as error:
        from .checkpoint import CheckpointError

        raise CheckpointError(f"{config}: not a readable JSON config: {error}") from error


# ---------------------------------------------------------------------------------------------
# fastdetr -> transformers
# ---------------------------------------------------------------------------------------------

BACKBONE_FORMATS = ("timm", "transformers")
_RESNET_LAYOUTS = {name: (kind, list(depths)) for (kind, depths), name in _DEPTHS.items()}
_HIDDEN_SIZES = {"basic": [64, 128, 256, 512], "bottleneck": [256, 512, 1024, 2048]}


def _to_hf_resnet(name: str) -> str:
    """torchvision's ResNet parameter name -> transformers' ResNetBackbone's (the inverse of `_backbone_key`)."""
    for hf_prefix, tv_prefix in _HF_RESNET_STEM.items():
        if name.startswith(tv_prefix):
            return hf_prefix + name[len(tv_prefix):]
    block = re.fullmatch(r"layer(\d)\.(\d+)\.(.+)", name)
    if block is None:
        raise KeyError(f"backbone key {name!r} is not a ResNet parameter")
    stage, index, rest = int(block.group(1)) - 1, block.group(2), block.group(3)
    prefix = f"encoder.stages.{stage}.layers.{index}."
    for tv, hf in (("downsample.0.", "shortcut.convolution."), ("downsample.1.", "shortcut.normalization.")):
        if rest.startswith(tv):
            return prefix + hf + rest[len(tv):]
    conv = re.fullmatch(r"(conv|bn)(\d)\.(.+)", rest)
    if conv is None:
        raise KeyError(f"backbone key {name!r} is not a ResNet parameter")
    kind = "convolution" if conv.group(1) == "conv" else "normalization"
    return f"{prefix}layer.{int(conv.group(2)) - 1}.{kind}.{conv.group(3)}"


def to_transformers(state_dict: dict[str, Tensor], backbone: str = "timm") -> dict[str, Tensor]:
    """fastdetr's (the official) DETR state_dict -> the hub layout `save_pretrained` writes (`from_transformers`
    reversed): in_proj split into q, k, v; the backbone in timm's names (`backbone="timm"`, the hub's
    facebook/detr-resnet-50 kind) or transformers' ResNet's (`"transformers"`, loadable without timm)."""
    if backbone not in BACKBONE_FORMATS:
        raise ValueError(f"backbone must be one of {BACKBONE_FORMATS}; got {backbone!r}")
    inverse = {"input_proj.": "model.input_projection.", "query_embed.": "model.query_position_embeddings.",
               "class_embed.": "class_labels_classifier.", "bbox_embed.": "bbox_predictor.",
               "transformer.decoder.norm.": "model.decoder.layernorm.",
               "transformer.encoder.norm.": "model.encoder.layernorm.",
               "backbone.1.row_embed.": "model.backbone.position_embedding.row_embeddings.",
               "backbone.1.col_embed.": "model.backbone.position_embedding.column_embeddings."}
    norms = {"encoder": {v: k for k, v in _ENCODER_NORMS.items()}, "decoder": {v: k for k, v in _DECODER_NORMS.items()}}
    ffn = {"linear1.": "fc1.", "linear2.": "fc2."}
    layer_key = re.compile(r"transformer\.(encoder|decoder)\.layers\.(\d+)\.(.+)")
    out: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.startswith("backbone.0.body."):
            name = key[len("backbone.0.body."):]
            out["model.backbone.conv_encoder.model." + (name if backbone == "timm" else _to_hf_resnet(name))] = tensor
            continue
        renamed = _rename(key, inverse)
        if renamed is not None:
            out[renamed] = tensor
            continue
        layer = layer_key.fullmatch(key)
        if layer is None:
            raise KeyError(f"key {key!r} is not part of fastdetr's DETR")
        stack, index, rest = layer.groups()
        prefix = f"model.{stack}.layers.{index}."
        attention = re.fullmatch(r"(self_attn|multihead_attn)\.(.+)", rest)
        if attention is not None:
            hf_attention = "self_attn." if attention.group(1) == "self_attn" else "encoder_attn."
            inner = attention.group(2)
            packed = re.fullmatch(r"in_proj_(weight|bias)", inner)
            if packed is None:
                out[prefix + hf_attention + inner] = tensor
                continue
            for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3)):
                out[f"{prefix}{hf_attention}{name}.{packed.group(1)}"] = part.contiguous()
            continue
        renamed = _rename(rest, norms[stack]) or _rename(rest, ffn)
        if renamed is None:
            raise KeyError(f"key {key!r} is not part of fastdetr's DETR")
        out[prefix + renamed] = tensor
    return out


def transformers_config(config: DETRConfig, backbone: str = "timm") -> dict[str, Any]:
    """The config.json of a transformers `DetrForObjectDetection` equal to a fastdetr DETR of `config`, or of a
    `TableTransformerForObjectDetection` for a pre-norm one (fields transformers leaves at its defaults are left
    out). Raises ValueError for what it cannot hold."""
    if backbone not in BACKBONE_FORMATS:
        raise ValueError(f"backbone must be one of {BACKBONE_FORMATS}; got {backbone!r}")
    if config.backbone not in _RESNET_LAYOUTS:
        raise ValueError(f"transformers' DETR takes ResNet-18, -34, -50 or -101 here; got {config.backbone!r}")
    if config.activation != "relu" or config.backbone_width != 64 or not config.frozen_batchnorm:
        raise ValueError("transformers' DETR and Table Transformer are ReLU, a standard-width ResNet with frozen "
                         f"BatchNorm: activation={config.activation!r}, backbone_width={config.backbone_width}, "
                         f"frozen_batchnorm={config.frozen_batchnorm}")
    if backbone == "transformers" and config.dilation:
        raise ValueError("a dilated (DC5) backbone is written with backbone='timm' only")
    out: dict[str, Any] = {
        "model_type": PRE_NORM_MODEL_TYPES[0] if config.pre_norm else "detr",
        "architectures": ["TableTransformerForObjectDetection" if config.pre_norm else "DetrForObjectDetection"],
        "num_labels": config.num_classes, "id2label": {str(i): f"LABEL_{i}" for i in range(config.num_classes)},
        "label2id": {f"LABEL_{i}": i for i in range(config.num_classes)},
        "d_model": config.hidden_dim, "encoder_layers": config.enc_layers, "decoder_layers": config.dec_layers,
        "encoder_attention_heads": config.nheads, "decoder_attention_heads": config.nheads,
        "encoder_ffn_dim": config.dim_feedforward, "decoder_ffn_dim": config.dim_feedforward,
        "num_queries": config.num_queries, "dropout": config.dropout, "activation_function": "relu",
        "position_embedding_type": config.position_embedding, "dilation": config.dilation,
        "auxiliary_loss": config.aux_loss, "use_pretrained_backbone": False,
    }
    kind, depths = _RESNET_LAYOUTS[config.backbone]
    if backbone == "timm":
        out.update(use_timm_backbone=True, backbone=config.backbone, backbone_config=None)
    else:
        out.update(use_timm_backbone=False, backbone=None, backbone_config={
            "model_type": "resnet", "depths": depths, "layer_type": kind, "hidden_sizes": _HIDDEN_SIZES[kind],
            "embedding_size": 64, "out_features": ["stage4"], "downsample_in_bottleneck": False})
    return out
