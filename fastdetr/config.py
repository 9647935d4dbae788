"""DETRConfig: every architecture choice of a DETR model, with named presets.

The defaults are the original DETR-R50 (d_model 256, 8 heads, FFN 2048,
dropout 0.1, 100 queries, 6 + 6 layers, aux loss, FrozenBatchNorm, conv1 and
layer1 frozen). `PRESETS` holds the official variants and a small model that
trains from scratch on a 2-core CPU (shared/DESIGN.md, "The demo on a 2-core
CPU").
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")


@dataclass(frozen=True)
class DETRConfig:
    """Architecture of a DETR model. Frozen: derive variants with `replace(**changes)`."""

    num_classes: int = 91  # COCO's category ids run to 90; the head has num_classes + 1 outputs
    # backbone
    backbone: str = "resnet50"
    dilation: bool = False  # DC5: dilate the last stage instead of striding it
    backbone_width: int = 64  # stem/first-stage channels; 64 is the standard ResNet
    frozen_batchnorm: bool = True  # False: trainable BatchNorm2d (needed when training from scratch)
    train_backbone: bool = True  # False freezes the whole backbone
    freeze_stem: bool = True  # conv1 and layer1 stay frozen (DETR's choice for pretrained weights)
    position_embedding: str = "sine"  # or "learned"
    # transformer
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    activation: str = "relu"
    pre_norm: bool = False
    num_queries: int = 100
    aux_loss: bool = True

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"DETRConfig.backbone: unknown {self.backbone!r}; expected one of {BACKBONES}")
        if self.dilation and self.backbone in ("resnet18", "resnet34"):
            raise ValueError(f"DETRConfig.dilation (DC5) needs resnet50 or resnet101, not {self.backbone}")
        if self.position_embedding not in ("sine", "learned"):
            raise ValueError(
                f"DETRConfig.position_embedding: unknown {self.position_embedding!r}; expected 'sine' or 'learned'"
            )
        if self.activation not in ("relu", "gelu", "glu"):
            raise ValueError(f"DETRConfig.activation: unknown {self.activation!r}")
        for name in ("num_classes", "backbone_width", "hidden_dim", "nheads", "enc_layers", "dec_layers",
                     "dim_feedforward", "num_queries"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "enc_layers" else 1):
                raise ValueError(f"DETRConfig.{name}: expected a positive integer, got {value!r}")
        if self.hidden_dim % self.nheads:
            raise ValueError(
                f"DETRConfig.hidden_dim ({self.hidden_dim}) must be divisible by nheads ({self.nheads})"
            )
        if self.hidden_dim % 4:
            raise ValueError(
                f"DETRConfig.hidden_dim ({self.hidden_dim}) must be divisible by 4 (sine position embedding)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"DETRConfig.dropout: expected a value in [0, 1), got {self.dropout!r}")

    def replace(self, **changes: Any) -> "DETRConfig":
        """A copy with `changes` applied; an unknown field raises TypeError naming it."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(
                f"unknown DETRConfig field(s) {unknown}; known: {[f.name for f in dataclasses.fields(self)]}"
            )
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DETRConfig":
        return cls().replace(**values)


_R50 = DETRConfig()

PRESETS: dict[str, DETRConfig] = {
    "detr_resnet50": _R50,
    "detr_resnet101": _R50.replace(backbone="resnet101"),
    "detr_resnet50_dc5": _R50.replace(dilation=True),
    "detr_resnet101_dc5": _R50.replace(backbone="resnet101", dilation=True),
    # Trains from scratch on a 2-core CPU: half-width ResNet-18 (32/64/128/256 channels,
    # 4.1 M parameters in all), trainable BatchNorm, every layer trained, d_model 128,
    # 2 + 3 layers, FFN 512, 20 queries, no dropout.
    "detr_small": _R50.replace(
        backbone="resnet18", backbone_width=32, frozen_batchnorm=False, freeze_stem=False,
        hidden_dim=128, enc_layers=2, dec_layers=3, dim_feedforward=512, dropout=0.0, num_queries=20,
    ),
}


def preset(name: str, **overrides: Any) -> DETRConfig:
    """The named preset with `overrides` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
