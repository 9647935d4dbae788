"""`fastdetr.optimize(model)`: switch a DETR model's transformer layers and stacks to the fused ones, in place.

Modules are recognised by structure, not by class, so the original DETR
repository's layers (same attribute names) are converted as well as
`fastdetr.reference`'s. A conversion assigns `__class__` (to
`fastdetr.nn.TransformerEncoderLayer` / `TransformerDecoderLayer`, and the
stacks holding them to `fastdetr.nn.TransformerEncoder` / `TransformerDecoder`):
the same module object, the same Parameter objects (optimizer state stays
valid), the same state_dict keys. The fused forwards read only the attributes
checked here.
"""
from __future__ import annotations

import logging

from torch import nn

from fastdetr.nn.transformer import (
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

logger = logging.getLogger("fastdetr.optimize")

_SHARED = {
    "self_attn": nn.MultiheadAttention, "linear1": nn.Linear, "linear2": nn.Linear,
    "norm1": nn.LayerNorm, "norm2": nn.LayerNorm,
    "dropout": nn.Dropout, "dropout1": nn.Dropout, "dropout2": nn.Dropout,
}
_DECODER_ONLY = {"multihead_attn": nn.MultiheadAttention, "norm3": nn.LayerNorm, "dropout3": nn.Dropout}
_PLAIN = ("activation", "normalize_before")


def _has(module: nn.Module, spec: dict) -> bool:
    return all(isinstance(getattr(module, name, None), kind) for name, kind in spec.items())


def _target_class(module: nn.Module) -> type | None:
    """The fused class `module` can become, or None when it does not look like a DETR layer."""
    if not _has(module, _SHARED) or not all(hasattr(module, name) for name in _PLAIN):
        return None
    if _has(module, _DECODER_ONLY):
        return TransformerDecoderLayer
    if not hasattr(module, "multihead_attn"):
        return TransformerEncoderLayer
    return None


def _stack_class(module: nn.Module) -> type | None:
    """The fused stack class `module` can become: a `layers` ModuleList of fused layers of one kind, a `norm`."""
    layers = getattr(module, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0 or not hasattr(module, "norm"):
        return None
    if all(isinstance(layer, TransformerDecoderLayer) for layer in layers) and hasattr(module, "return_intermediate"):
        return TransformerDecoder
    if all(isinstance(layer, TransformerEncoderLayer) for layer in layers):
        return TransformerEncoder
    return None


def optimize(model: nn.Module, inference: bool = False) -> nn.Module:
    """Convert, in place, every DETR encoder / decoder layer in `model` to its fused class; returns `model`.

    A layer that already is fused is left alone (calling this twice is harmless).
    A module that has `self_attn` but not the rest of a DETR layer's attributes is
    left alone with a log line (logger `fastdetr.optimize`). Layers the fused
    path does not support at run time (pre-norm, non-ReLU, ...) still convert:
    their forward falls back to the reference math (fastdetr.nn.transformer).
    inference: also put the model in eval mode (dropout off).
    """
    converted = 0
    for name, module in model.named_modules():
        if isinstance(module, (TransformerEncoderLayer, TransformerDecoderLayer)):
            continue
        target = _target_class(module)
        if target is None:
            if hasattr(module, "self_attn"):
                logger.info("fastdetr.optimize: %s (%s) has self_attn but not the attributes of a DETR "
                            "encoder/decoder layer; left unchanged", name or "<root>", type(module).__name__)
            continue
        module.__class__ = target
        converted += 1
    # then the stacks: their forward builds each key padding mask's block table once for all their layers
    for module in model.modules():
        if not isinstance(module, (TransformerEncoder, TransformerDecoder)):
            target = _stack_class(module)
            if target is not None:
                module.__class__ = target
    logger.debug("fastdetr.optimize: converted %d transformer layers", converted)
    if inference:
        model.eval()
    return model
