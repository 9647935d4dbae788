"""Reading and writing DETR checkpoints.

Reads the official DETR files (`{"model": state_dict, ...}`), fastdetr's own
(which add `"config"`), bare state dicts, and DDP-wrapped ones (`module.`
prefixes), always with `torch.load(weights_only=True)`: nothing in a
checkpoint can run code; and Hugging Face transformers' DETR weights
(safetensors or `pytorch_model.bin`, `fastdetr.hub`). The trainer's checkpoints (`save_training_state`,
`load_training_state`) are fastdetr's files plus what a resumed run needs to
continue exactly. A fastdetr file's "config" holds a DETRConfig's or a DeformableDETRConfig's
fields (`config_from_dict` tells them apart; `model_from_config` builds either model).
Writes are atomic (a temporary file in the same folder, flushed, then renamed over
the target), so an interrupted save never leaves a truncated checkpoint behind.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .config import DETRConfig
from .deformable_config import DeformableDETRConfig
from .reference.deformable_detr import DeformableDETR
from .reference.detr import DETR

FORMAT_VERSION = 1
# What resuming a run reads from a training checkpoint (`load_training_state` requires them).
TRAINING_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "step", "train_time_s", "rng")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file and keys."""


def _read(path_or_url: str | os.PathLike, map_location: Any) -> Any:
    source = str(path_or_url)
    if re.match(r"^https?://", source):
        try:
            return torch.hub.load_state_dict_from_url(source, map_location=map_location, weights_only=True)
        except Exception as error:  # network, hash or format errors: say which URL
            raise CheckpointError(f"{source}: could not download or read the checkpoint: {error}") from error
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # the official Deformable DETR's files keep their argparse Namespace ("args"): plain values, allowed
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (or it holds objects other than tensors and "
            f"plain containers, which weights_only loading refuses): {error}"
        ) from error


def extract_state_dict(checkpoint: Any, source: str = "checkpoint") -> dict[str, Tensor]:
    """The model state_dict inside a loaded checkpoint, with any DDP `module.` prefix removed."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        state_dict = checkpoint["model"]
    elif isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, Tensor) for v in checkpoint.values()):
        state_dict = checkpoint
    else:
        keys = sorted(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"{source}: no model state_dict found (expected a 'model' entry); top level: {keys}")
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key[len("module."):]: value for key, value in state_dict.items()}
    return state_dict


def _count_layers(state_dict: dict[str, Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for key in state_dict if (m := pattern.match(key))}
    return max(indices) + 1 if indices else 0


def infer_config(state_dict: dict[str, Tensor], source: str = "checkpoint") -> DETRConfig | DeformableDETRConfig:
    """Read a DETRConfig off an official-layout state_dict (a DeformableDETRConfig off an official Deformable
    DETR one, `infer_deformable_config`: it has `transformer.level_embed`).

    Everything is inferred from key names and shapes except `nheads` (8 is
    assumed), `dilation` (False: DC5 weights are indistinguishable, pass a
    config for them), dropout and aux_loss (defaults).
    """
    if "transformer.level_embed" in state_dict:
        return infer_deformable_config(state_dict, source)
    try:
        class_weight = state_dict["class_embed.weight"]
        query_weight = state_dict["query_embed.weight"]
        stem_weight = state_dict["backbone.0.body.conv1.weight"]
        ffn_weight = state_dict["transformer.decoder.layers.0.linear1.weight"]
    except KeyError as error:
        raise CheckpointError(f"{source}: not a DETR state_dict, key {error} is missing") from error
    return DETRConfig(
        num_classes=class_weight.shape[0] - 1,
        backbone=_resnet(state_dict, source),
        backbone_width=stem_weight.shape[0],
        frozen_batchnorm=not any(key.endswith("num_batches_tracked") for key in state_dict),
        position_embedding="learned" if "backbone.1.row_embed.weight" in state_dict else "sine",
        hidden_dim=class_weight.shape[1],
        enc_layers=_count_layers(state_dict, "transformer.encoder.layers."),
        dec_layers=_count_layers(state_dict, "transformer.decoder.layers."),
        dim_feedforward=ffn_weight.shape[0],
        pre_norm="transformer.encoder.norm.weight" in state_dict,
        num_queries=query_weight.shape[0],
    )


def _resnet(state_dict: dict[str, Tensor], source: str) -> str:
    bottleneck = "backbone.0.body.layer1.0.conv3.weight" in state_dict
    layer3_blocks = _count_layers(state_dict, "backbone.0.body.layer3.")
    depth = {(True, 6): "resnet50", (True, 23): "resnet101", (False, 2): "resnet18", (False, 6): "resnet34"}
    backbone = depth.get((bottleneck, layer3_blocks))
    if backbone is None:
        raise CheckpointError(f"{source}: backbone with {layer3_blocks} layer3 blocks is not a known ResNet")
    return backbone


def infer_deformable_config(state_dict: dict[str, Tensor], source: str = "checkpoint") -> DeformableDETRConfig:
    """Read a DeformableDETRConfig off an official Deformable DETR state_dict (fundamentalvision's files).

    From key names and shapes: classes, widths, backbone, levels, layers, FFN, points per level (8 heads
    assumed, as every official model), queries (two-stage: its 300 proposals), box refinement (the decoder's
    own box heads, `transformer.decoder.bbox_embed.*`) and two-stage (`transformer.enc_output`). `dilation`
    (DC5) cannot be told apart and stays False; dropout and aux_loss keep their defaults.
    """
    try:
        class_weight = state_dict["class_embed.0.weight"]
        stem_weight = state_dict["backbone.0.body.conv1.weight"]
        ffn_weight = state_dict["transformer.encoder.layers.0.linear1.weight"]
        levels = state_dict["transformer.level_embed"].shape[0]
        encoder_logits = state_dict["transformer.encoder.layers.0.self_attn.attention_weights.weight"].shape[0]
        decoder_logits = state_dict["transformer.decoder.layers.0.cross_attn.attention_weights.weight"].shape[0]
    except KeyError as error:
        raise CheckpointError(f"{source}: not a Deformable DETR state_dict, key {error} is missing") from error
    heads = DeformableDETRConfig.nheads
    two_stage = "transformer.enc_output.weight" in state_dict
    if not two_stage and "query_embed.weight" not in state_dict:
        raise CheckpointError(f"{source}: not a Deformable DETR state_dict, key 'query_embed.weight' is missing "
                              "(and no 'transformer.enc_output.weight' of a two-stage model)")
    return DeformableDETRConfig(
        num_classes=class_weight.shape[0],
        backbone=_resnet(state_dict, source),
        backbone_width=stem_weight.shape[0],
        frozen_batchnorm=not any(key.endswith("num_batches_tracked") for key in state_dict),
        num_feature_levels=levels,
        hidden_dim=class_weight.shape[1],
        nheads=heads,
        enc_layers=_count_layers(state_dict, "transformer.encoder.layers."),
        dec_layers=_count_layers(state_dict, "transformer.decoder.layers."),
        dim_feedforward=ffn_weight.shape[0],
        enc_n_points=encoder_logits // (heads * levels),
        dec_n_points=decoder_logits // (heads * levels),
        num_queries=DeformableDETRConfig.num_queries if two_stage else state_dict["query_embed.weight"].shape[0],
        with_box_refine="transformer.decoder.bbox_embed.0.layers.0.weight" in state_dict,
        two_stage=two_stage,
    )


def config_from_dict(values: dict[str, Any]) -> DETRConfig | DeformableDETRConfig:
    """A checkpoint's stored "config": a DeformableDETRConfig where it holds a field only that class has
    (num_feature_levels, enc_n_points, ...), else a DETRConfig (whose older files may lack newer fields)."""
    deformable_only = ({f.name for f in dataclasses.fields(DeformableDETRConfig)}
                       - {f.name for f in dataclasses.fields(DETRConfig)})
    config_class = DeformableDETRConfig if deformable_only & set(values) else DETRConfig
    return config_class.from_dict(values)


def model_from_config(config: DETRConfig | DeformableDETRConfig) -> DETR | DeformableDETR:
    """A freshly initialised model of `config`'s family."""
    return DeformableDETR(config) if isinstance(config, DeformableDETRConfig) else DETR(config)


def check_state_dict(model: nn.Module, state_dict: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Raise CheckpointError listing missing keys, unexpected keys and shape mismatches, if any."""
    expected = model.state_dict()
    # BatchNorm step counters: FrozenBatchNorm2d drops them, a trainable BatchNorm2d keeps its own.
    ignorable = ("num_batches_tracked",)
    missing = [key for key in expected if key not in state_dict and not key.endswith(ignorable)]
    unexpected = [key for key in state_dict if key not in expected and not key.endswith(ignorable)]
    mismatched = [
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state_dict and tuple(state_dict[key].shape) != tuple(value.shape)
    ]
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{source} does not fit the model:"]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", mismatched)):
        if items:
            shown = "\n    ".join(items[:20])
            more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
            lines.append(f"  {len(items)} {title}:\n    {shown}{more}")
    raise CheckpointError("\n".join(lines))


def load_checkpoint(path_or_url: str | os.PathLike, model: nn.Module | None = None, *,
                    config: DETRConfig | DeformableDETRConfig | None = None, map_location: Any = "cpu") -> nn.Module:
    """Load DETR or Deformable DETR weights into `model` (strictly) and return it.

    Reads fastdetr's and the official DETR's and Deformable DETR's files, and Hugging Face
    transformers' `DetrForObjectDetection` weights (`fastdetr.hub`): a
    `model.safetensors` or `pytorch_model.bin`, or the save_pretrained
    directory holding one, in either key layout. Without a model, one is built:
    from `config` if given, else from the checkpoint's own config (fastdetr
    files) or the config.json beside transformers' weights, else inferred from
    the state_dict's keys and shapes (official files; see `infer_config`).
    A mismatch raises CheckpointError naming the missing and unexpected keys
    and the differing shapes.
    """
    from . import hub

    source = str(path_or_url)
    weights = None if re.match(r"^https?://", source) else hub.weight_file(Path(source))
    if weights is not None and weights.suffix == ".safetensors":
        source = str(weights)
        checkpoint: Any = hub.read_safetensors(weights, map_location)
    else:
        source = source if weights is None else str(weights)
        checkpoint = _read(source, map_location)
    state_dict = extract_state_dict(checkpoint, source)
    if hub.is_transformers_state_dict(state_dict):
        if model is None and config is None and weights is not None:
            hf_config = hub.read_config_beside(weights)
            if hf_config is not None:
                config = hub.config_from_transformers(hf_config, str(weights.parent / "config.json"))
        state_dict = hub.from_transformers(state_dict, source)
    if model is None:
        if config is None and isinstance(checkpoint, dict) and isinstance(checkpoint.get("config"), dict):
            config = config_from_dict(checkpoint["config"])
        model = model_from_config(config if config is not None else infer_config(state_dict, source))
    check_state_dict(model, state_dict, source)
    model.load_state_dict(state_dict, strict=False)  # check_state_dict is the strict check
    return model


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file beside `path`, fsync, then rename over `path`."""
    return atomic_write(path, lambda file: torch.save(obj, file))


def atomic_write(path: str | os.PathLike, write: Any) -> Path:
    """`write(file)` into a temporary file beside `path` (binary), fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file 0600; give it the mode a plain open() would (0666 less the umask)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(handle, 0o666 & ~umask)
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        if os.path.exists(temp_name):
            os.unlink(temp_name)
        raise
    return path


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *, format: str = "fastdetr",
                    transformers_backbone: str = "timm", **extra: Any) -> Path:
    """Write `{"model": state_dict, "config": ..., "format_version": FORMAT_VERSION, **extra}` atomically.

    `extra` entries (optimizer state, epoch, ...) must be tensors or plain
    containers so that weights_only loading reads them back.

    format="transformers": `path` is a directory, written as Hugging Face's
    save_pretrained writes a `DetrForObjectDetection` (model.safetensors in the
    hub layout and config.json, each file atomically; `fastdetr.hub`), which
    `DetrForObjectDetection.from_pretrained(path)` loads offline; a pre-norm
    DETR as a `TableTransformerForObjectDetection`.
    transformers_backbone: "timm" (the hub's own kind; loading needs timm) or
    "transformers" (transformers' ResNet; loads without timm).
    """
    if format == "transformers":
        if extra:
            raise ValueError(f"save_checkpoint(format='transformers') writes the model only; got {sorted(extra)}")
        return _save_transformers(Path(path), model, transformers_backbone)
    if format != "fastdetr":
        raise ValueError(f"save_checkpoint: format must be 'fastdetr' or 'transformers'; got {format!r}")
    checkpoint: dict[str, Any] = {"model": model.state_dict(), "format_version": FORMAT_VERSION}
    config = getattr(model, "config", None)
    if isinstance(config, (DETRConfig, DeformableDETRConfig)):
        checkpoint["config"] = config.to_dict()
    checkpoint.update(extra)
    return atomic_save(checkpoint, path)


def _save_transformers(directory: Path, model: nn.Module, backbone: str) -> Path:
    import json

    from . import hub

    config = getattr(model, "config", None)
    if not isinstance(config, DETRConfig):
        raise ValueError("save_checkpoint(format='transformers') needs a fastdetr DETR (its .config)")
    try:
        from safetensors.torch import save as safetensors_bytes
    except ImportError as error:
        raise CheckpointError("writing transformers' format needs the safetensors package "
                              "(pip install safetensors)") from error
    hf_config = hub.transformers_config(config, backbone)
    tensors = {key: tensor.detach().contiguous().cpu()
               for key, tensor in hub.to_transformers(model.state_dict(), backbone).items()}
    directory.mkdir(parents=True, exist_ok=True)
    data = safetensors_bytes(tensors, metadata={"format": "pt"})
    atomic_write(directory / "model.safetensors", lambda file: file.write(data))
    atomic_write(directory / "config.json", lambda file: file.write(json.dumps(hf_config, indent=2).encode()))
    return directory


class _Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...


def save_training_state(path: str | os.PathLike, model: DETR | DeformableDETR, *, optimizer: _Stateful,
                        scheduler: _Stateful, scaler: _Stateful, epoch: int, step: int, train_time_s: float,
                        rng: list[dict[str, Any]], eval_stats: dict[str, float] | None, world_size: int,
                        categories: dict[int, str], val_transform: dict[str, int],
                        train_config: dict[str, Any]) -> Path:
    """Write a training checkpoint atomically: a fastdetr checkpoint plus everything `train` resumes from.

    epoch: epochs done; step: optimizer steps done; train_time_s: training seconds so far; rng: each
    process's RNG states, by rank; eval_stats: the last COCO stats or None; categories: {id: name};
    val_transform: {"val_size", "max_size"} for prediction; train_config: the TrainConfig as a dict.
    Every entry must be a tensor or plain container (weights_only loading). The entries and their order
    are the file format (FORMAT_VERSION); change them only with the version.
    """
    return atomic_save({
        "model": model.state_dict(), "config": model.config.to_dict(), "format_version": FORMAT_VERSION,
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
        "epoch": epoch, "step": step, "train_time_s": train_time_s, "rng": rng, "eval": eval_stats,
        "world_size": world_size, "categories": categories, "val_transform": val_transform,
        "train_config": train_config,
    }, path)


def load_training_state(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """A training checkpoint (`save_training_state`'s entries), its "model" without any DDP `module.` prefix.

    Raises FileNotFoundError for a missing file and CheckpointError, naming the file, for one that is not
    a training checkpoint: unreadable, no or another format_version, or one of TRAINING_KEYS missing.
    """
    source = str(path)
    checkpoint = _read(path, map_location)
    if not isinstance(checkpoint, dict) or "format_version" not in checkpoint:
        keys = sorted(map(str, checkpoint))[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"{source}: not a fastdetr training checkpoint, it has no 'format_version' "
                              f"entry; top level: {keys}")
    if checkpoint["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{source}: format_version {checkpoint['format_version']!r}, but this fastdetr "
                              f"reads training checkpoints of version {FORMAT_VERSION}")
    missing = [key for key in TRAINING_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{source}: not a training checkpoint, missing {', '.join(map(repr, missing))} "
                              f"(resuming a run reads {', '.join(TRAINING_KEYS)})")
    return {**checkpoint, "model": extract_state_dict(checkpoint, source)}


def load_backbone_checkpoint(model: DETR, path: str | os.PathLike) -> DETR:
    """Load ImageNet ResNet weights (torchvision's key names, e.g. resnet50-0676ba61.pth) into the backbone.

    The classifier (`fc.*`) is dropped; every other key must fit the backbone body.
    """
    source = str(path)
    state_dict = extract_state_dict(_read(path, "cpu"), source)
    state_dict = {key: value for key, value in state_dict.items() if not key.startswith("fc.")}
    body = model.backbone[0].body
    check_state_dict(body, state_dict, source)
    body.load_state_dict(state_dict, strict=False)  # checked above
    return model
