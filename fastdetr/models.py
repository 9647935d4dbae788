"""Builders for the named DETR presets: `fastdetr.detr_resnet50(num_classes=91, **overrides)` and friends.

Each returns a `fastdetr.DETR` with freshly initialised weights; `overrides`
are DETRConfig fields (an unknown name raises TypeError). Load weights with
`fastdetr.load_checkpoint(path, model)`. `fused=True` (any builder) returns
the model with its transformer layers switched to the fused ones
(`fastdetr.optimize`); the state_dict is the same. `deformable_detr_resnet50`
and `deformable_detr_small` build a `fastdetr.DeformableDETR` the same way,
from `fastdetr.deformable_config.DEFORMABLE_PRESETS`.
"""
from __future__ import annotations

from typing import Any

from .config import preset
from .deformable_config import deformable_preset
from .reference.deformable_detr import DeformableDETR
from .reference.detr import DETR


def build_model(name: str, num_classes: int = 91, fused: bool = False, **overrides: Any) -> DETR:
    """The preset `name` (see fastdetr.config.PRESETS) as a DETR; `fused=True` applies `fastdetr.optimize`."""
    model = DETR(preset(name, num_classes=num_classes, **overrides))
    if fused:
        from .nn.convert import optimize

        optimize(model)
    return model


def detr_resnet50(num_classes: int = 91, **overrides: Any) -> DETR:
    """DETR-R50: 41.5 M parameters, 458 state_dict keys, as the official checkpoint."""
    return build_model("detr_resnet50", num_classes, **overrides)


def detr_resnet101(num_classes: int = 91, **overrides: Any) -> DETR:
    """DETR-R101."""
    return build_model("detr_resnet101", num_classes, **overrides)


def detr_resnet50_dc5(num_classes: int = 91, **overrides: Any) -> DETR:
    """DETR-R50 with a dilated last stage (stride 16 features)."""
    return build_model("detr_resnet50_dc5", num_classes, **overrides)


def detr_resnet101_dc5(num_classes: int = 91, **overrides: Any) -> DETR:
    """DETR-R101 with a dilated last stage (stride 16 features)."""
    return build_model("detr_resnet101_dc5", num_classes, **overrides)


def detr_small(num_classes: int = 91, **overrides: Any) -> DETR:
    """A 4 M-parameter DETR that trains from scratch on a CPU (half-width ResNet-18, d_model 128)."""
    return build_model("detr_small", num_classes, **overrides)


def build_deformable_model(name: str, num_classes: int = 91, fused: bool = False,
                           **overrides: Any) -> DeformableDETR:
    """The Deformable DETR preset `name` (see fastdetr.deformable_config.DEFORMABLE_PRESETS); `fused=True`
    applies `fastdetr.optimize` (its MSDA modules become fastdetr.nn.MultiScaleDeformableAttention)."""
    model = DeformableDETR(deformable_preset(name, num_classes=num_classes, **overrides))
    if fused:
        from .nn.convert import optimize

        optimize(model)
    return model


def deformable_detr_resnet50(num_classes: int = 91, with_box_refine: bool = False, two_stage: bool = False,
                             **overrides: Any) -> DeformableDETR:
    """Deformable-DETR-R50 as the official (300 queries, focal-loss head of num_classes outputs; the official
    COCO checkpoints have 91); `with_box_refine`, `two_stage` (which needs box refinement) as its options."""
    return build_deformable_model("deformable_detr_resnet50", num_classes, with_box_refine=with_box_refine,
                                  two_stage=two_stage, **overrides)


def deformable_detr_small(num_classes: int = 91, **overrides: Any) -> DeformableDETR:
    """A 4.5 M-parameter Deformable DETR for the CPU (half-width ResNet-18, d_model 128, 2 + 3 layers)."""
    return build_deformable_model("deformable_detr_small", num_classes, **overrides)
