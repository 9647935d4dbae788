"""DeformableDETRConfig: every architecture choice of a Deformable DETR model, with named presets.

The defaults are the official Deformable-DETR-R50 (fundamentalvision/Deformable-DETR,
main.py's defaults): 4 feature levels (C3-C5 and a stride-2 conv on C5), d_model 256,
8 heads, 4 sampling points per head and level in encoder and decoder, FFN 1024,
dropout 0.1, 6 + 6 layers, 300 queries, aux loss, FrozenBatchNorm with conv1 and
layer1 frozen. `with_box_refine` and `two_stage` are the official options of the
same names. `DEFORMABLE_PRESETS` holds the three official R50 variants and a small
model for the CPU.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .config import BACKBONES


@dataclass(frozen=True)
class DeformableDETRConfig:
    """Architecture of a Deformable DETR model. Frozen: derive variants with `replace(**changes)`."""

    num_classes: int = 91  # focal loss: the head has num_classes outputs, no "no object" class
    # backbone
    backbone: str = "resnet50"
    dilation: bool = False  # DC5: dilate the last stage instead of striding it
    backbone_width: int = 64  # stem/first-stage channels; 64 is the standard ResNet
    frozen_batchnorm: bool = True  # False: trainable BatchNorm2d (needed when training from scratch)
    train_backbone: bool = True  # False freezes the whole backbone
    freeze_stem: bool = True  # conv1 and layer1 stay frozen (the official choice for pretrained weights)
    position_embedding: str = "sine"  # or "learned"
    num_feature_levels: int = 4  # 1: C5 only; >= 3: C3-C5 plus (levels - 3) stride-2 convs
    # transformer
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.1
    activation: str = "relu"
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_queries: int = 300  # two-stage: the number of top-k proposals
    aux_loss: bool = True
    with_box_refine: bool = False  # iterative box refinement: per-layer heads, each layer refines the last's boxes
    two_stage: bool = False  # queries from the top-k encoder proposals instead of learned embeddings

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.backbone not in BACKBONES:
            raise ValueError(f"{name}.backbone: unknown {self.backbone!r}; expected one of {BACKBONES}")
        if self.dilation and self.backbone in ("resnet18", "resnet34"):
            raise ValueError(f"{name}.dilation (DC5) needs resnet50 or resnet101, not {self.backbone}")
        if self.position_embedding not in ("sine", "learned"):
            raise ValueError(f"{name}.position_embedding: unknown {self.position_embedding!r}; "
                             "expected 'sine' or 'learned'")
        if self.activation not in ("relu", "gelu", "glu"):
            raise ValueError(f"{name}.activation: unknown {self.activation!r}")
        for field in ("num_classes", "backbone_width", "num_feature_levels", "hidden_dim", "nheads", "enc_layers",
                      "dec_layers", "dim_feedforward", "enc_n_points", "dec_n_points", "num_queries"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if field == "enc_layers" else 1):
                raise ValueError(f"{name}.{field}: expected a positive integer, got {value!r}")
        if self.num_feature_levels == 2:
            raise ValueError(f"{name}.num_feature_levels: 1 (C5) or >= 3 (C3-C5 plus extra levels), not 2")
        if self.hidden_dim % 32:
            raise ValueError(f"{name}.hidden_dim ({self.hidden_dim}) must be divisible by 32 "
                             "(GroupNorm(32) in the input projections)")
        if self.hidden_dim % self.nheads:
            raise ValueError(f"{name}.hidden_dim ({self.hidden_dim}) must be divisible by nheads ({self.nheads})")
        if self.two_stage and not self.with_box_refine:
            # the proposals are scored and boxed by the decoder's extra heads, which only box refinement gives
            # it (the official fails there too)
            raise ValueError(f"{name}.two_stage needs with_box_refine=True (as in the official two-stage model)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{name}.dropout: expected a value in [0, 1), got {self.dropout!r}")

    def replace(self, **changes: Any) -> "DeformableDETRConfig":
        """A copy with `changes` applied; an unknown field raises TypeError naming it."""
        known = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(known))
        if unknown:
            raise TypeError(f"unknown {type(self).__name__} field(s) {unknown}; known: {known}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DeformableDETRConfig":
        return cls().replace(**values)


_R50 = DeformableDETRConfig()

DEFORMABLE_PRESETS: dict[str, DeformableDETRConfig] = {
    "deformable_detr_resnet50": _R50,
    "deformable_detr_resnet50_box_refine": _R50.replace(with_box_refine=True),
    "deformable_detr_resnet50_two_stage": _R50.replace(with_box_refine=True, two_stage=True),
    # For tests and CPU experiments: half-width ResNet-18 (C3-C5 of 64/128/256 channels), trainable
    # BatchNorm, every layer trained, d_model 128, 2 + 3 layers, FFN 512, 50 queries, no dropout.
    "deformable_detr_small": _R50.replace(
        backbone="resnet18", backbone_width=32, frozen_batchnorm=False, freeze_stem=False,
        hidden_dim=128, enc_layers=2, dec_layers=3, dim_feedforward=512, dropout=0.0, num_queries=50,
    ),
}


def deformable_preset(name: str, **overrides: Any) -> DeformableDETRConfig:
    """The named preset with `overrides` applied."""
    if name not in DEFORMABLE_PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(DEFORMABLE_PRESETS)}")
    return DEFORMABLE_PRESETS[name].replace(**overrides)
