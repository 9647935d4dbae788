"""`fastdetr.optimize(model)`: switch a model's DETR transformer layers and stacks, and its multi-scale deformable
attention (MSDA) modules, to the fused ones, in place.

Modules are recognised by structure, not by class, so the original DETR
repository's layers (same attribute names) are converted as well as
`fastdetr.reference`'s. A conversion assigns `__class__` (to
`fastdetr.nn.TransformerEncoderLayer` / `TransformerDecoderLayer`, and the
stacks holding them to `fastdetr.nn.TransformerEncoder` / `TransformerDecoder`):
the same module object, the same Parameter objects (optimizer state stays
valid), the same state_dict keys. The fused forwards read only the attributes
checked here.

Hugging Face transformers' `DetrEncoderLayer` / `DetrDecoderLayer` (the layouts of transformers 4.x and
>= 5) and `TableTransformerEncoderLayer` / `TableTransformerDecoderLayer` become subclasses of their own
class running the same fused chain (`fastdetr.nn.hf_detr`).

Deformable DETR's encoder and decoder layers (`fastdetr.reference.deformable_detr`'s and the official
repository's: the same attributes, and forward arguments of the same names) become
`fastdetr.nn.DeformableTransformerEncoderLayer` / `DeformableTransformerDecoderLayer`
(`fastdetr.nn.deformable_transformer`): their MSDA output projection, residual and LayerNorm as one kernel,
the decoder's self-attention through the attention kernel, the FFNs through the GEMM-epilogue kernels.

The MSDA modules, converted the same way (their sampling then runs
`fastdetr.nn.functional.ms_deform_attn`):
- Deformable DETR's official `MSDeformAttn` (its four Linears, d_model /
  n_levels / n_heads / n_points and its forward's arguments) becomes
  `fastdetr.nn.MultiScaleDeformableAttention`;
- Hugging Face transformers' sampling core `MultiScaleDeformableAttention` (the
  `.attn` of Deformable DETR's and RT-DETR's attention) and RT-DETRv2's
  `RTDetrV2MultiscaleDeformableAttention` become subclasses of their own class
  made by `fastdetr.nn.hf` (transformers itself is never imported).
"""
from __future__ import annotations

import inspect
import logging

from torch import Tensor, nn

from fastdetr.nn import hf_detr
from fastdetr.nn.deformable_attention import MultiScaleDeformableAttention
from fastdetr.nn.deformable_transformer import DeformableTransformerDecoderLayer, DeformableTransformerEncoderLayer
from fastdetr.nn.hf import FusedRTDetrV2Attention, FusedSamplingCore, fused_subclass
from fastdetr.nn.transformer import (
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)
from fastdetr.reference.backbone import FrozenBatchNorm2d

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


_MSDA_LINEARS = {"sampling_offsets": nn.Linear, "attention_weights": nn.Linear, "value_proj": nn.Linear,
                 "output_proj": nn.Linear}
_MSDA_SIZES = ("d_model", "n_levels", "n_heads", "n_points")
_OFFICIAL_FORWARD = ("query", "reference_points", "input_flatten", "input_spatial_shapes", "input_level_start_index",
                     "input_padding_mask")
_HF_CORE_FORWARD = ("value", "value_spatial_shapes", "value_spatial_shapes_list", "level_start_index",
                    "sampling_locations", "attention_weights", "im2col_step")
_HF_V2_FORWARD = {"hidden_states", "attention_mask", "encoder_hidden_states", "position_embeddings",
                  "reference_points", "spatial_shapes", "spatial_shapes_list", "level_start_index"}


def _forward_arguments(module: nn.Module) -> tuple[str, ...]:
    """The names of the arguments of `module`'s forward, self excluded."""
    try:
        return tuple(inspect.signature(type(module).forward).parameters)[1:]
    except (TypeError, ValueError):  # a forward without a signature (a C function)
        return ()


def _msda_sizes(module: nn.Module, points: int) -> bool:
    """The four Linears, nothing else, and their sizes agree with d_model, n_heads and `points` per head."""
    if not _has(module, _MSDA_LINEARS) or {name for name, _ in module.named_children()} != set(_MSDA_LINEARS):
        return False
    if not all(isinstance(getattr(module, name, None), int) for name in _MSDA_SIZES):
        return False
    d_model, heads = module.d_model, module.n_heads
    return (heads > 0 and d_model % heads == 0
            and all(getattr(module, name).in_features == d_model for name in _MSDA_LINEARS)
            and module.sampling_offsets.out_features == heads * points * 2
            and module.attention_weights.out_features == heads * points
            and module.value_proj.out_features == d_model and module.output_proj.out_features == d_model)


def _is_official_msda(module: nn.Module) -> bool:
    """Deformable DETR's `MSDeformAttn`: fastdetr.nn.MultiScaleDeformableAttention's attributes and forward."""
    return (_msda_sizes(module, getattr(module, "n_levels", 0) * getattr(module, "n_points", 0))
            and not list(module.parameters(recurse=False)) and not list(module.buffers(recurse=False))
            and _forward_arguments(module) == _OFFICIAL_FORWARD)


def _is_hf_sampling_core(module: nn.Module) -> bool:
    """transformers' parameter-free `MultiScaleDeformableAttention` core with the official op's arguments."""
    return (type(module).__name__ == "MultiScaleDeformableAttention" and _forward_arguments(module) == _HF_CORE_FORWARD
            and not list(module.parameters()) and not list(module.buffers()) and not list(module.children()))


def _is_hf_rtdetr_v2(module: nn.Module) -> bool:
    """transformers' `RTDetrV2MultiscaleDeformableAttention`: the MSDA attributes plus per-level point counts
    `n_points_list` (and their `n_points_scale` 1 / P_l per point), `offset_scale`, `method`."""
    counts = getattr(module, "n_points_list", None)
    if not isinstance(counts, (list, tuple)) or not counts or not all(isinstance(c, int) and c > 0 for c in counts):
        return False
    scale = getattr(module, "n_points_scale", None)
    return (_HF_V2_FORWARD <= set(_forward_arguments(module)) and isinstance(scale, Tensor)
            and tuple(scale.shape) == (sum(counts),) and isinstance(getattr(module, "method", None), str)
            and isinstance(getattr(module, "offset_scale", None), (int, float))
            and len(counts) == getattr(module, "n_levels", None) and _msda_sizes(module, sum(counts)))


_DEFORMABLE_FFN = {"linear1": nn.Linear, "linear2": nn.Linear, "dropout1": nn.Dropout, "dropout2": nn.Dropout,
                   "dropout3": nn.Dropout, "norm1": nn.LayerNorm, "norm2": nn.LayerNorm}
_DEFORMABLE_ENCODER_FORWARD = ("src", "pos", "reference_points", "spatial_shapes", "level_start_index",
                               "padding_mask")
_DEFORMABLE_DECODER_FORWARD = ("tgt", "query_pos", "reference_points", "src", "src_spatial_shapes",
                               "level_start_index", "src_padding_mask")


def _is_msda(module: nn.Module | None) -> bool:
    return module is not None and (isinstance(module, MultiScaleDeformableAttention) or _is_official_msda(module))


def _deformable_layer_class(module: nn.Module) -> type | None:
    """The fused class a Deformable DETR encoder / decoder layer (fastdetr.reference.deformable_detr's or the
    official's: the same attributes and forward arguments) can become, or None."""
    if not _has(module, _DEFORMABLE_FFN) or not hasattr(module, "activation"):
        return None
    arguments = _forward_arguments(module)
    if (arguments == _DEFORMABLE_ENCODER_FORWARD and _is_msda(getattr(module, "self_attn", None))
            and not hasattr(module, "norm3")):
        return DeformableTransformerEncoderLayer
    if (arguments == _DEFORMABLE_DECODER_FORWARD and _is_msda(getattr(module, "cross_attn", None))
            and _has(module, {"self_attn": nn.MultiheadAttention, "norm3": nn.LayerNorm, "dropout4": nn.Dropout})):
        return DeformableTransformerDecoderLayer
    return None


def _msda_class(module: nn.Module) -> type | None:
    """The fused class an MSDA module (or transformers' sampling core) can become, or None."""
    if isinstance(module, (MultiScaleDeformableAttention, FusedSamplingCore, FusedRTDetrV2Attention)):
        return None
    if "forward" in vars(module):  # an instance-level forward (a hub kernel, a patch) would hide the new class's
        return None
    if _is_official_msda(module):
        return MultiScaleDeformableAttention
    if _is_hf_sampling_core(module):
        return fused_subclass(type(module), FusedSamplingCore)
    if _is_hf_rtdetr_v2(module):
        return fused_subclass(type(module), FusedRTDetrV2Attention)
    return None


def _msda_fused(module: nn.Module) -> bool:
    """Whether an MSDA-looking module's sampling now runs fastdetr's op (its class, or its core's)."""
    return any(isinstance(part, (MultiScaleDeformableAttention, FusedSamplingCore, FusedRTDetrV2Attention))
               for part in (module, *module.children()))


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
    """Convert, in place, every DETR and Deformable DETR encoder / decoder layer and MSDA module in `model` to
    its fused class, and
    make every FrozenBatchNorm2d one elementwise op (`single_op`); returns `model`.

    A module that already is fused is left alone (calling this twice is harmless).
    A module that has `self_attn` but not the rest of a DETR layer's attributes, or
    `sampling_offsets` but no recognised MSDA structure (module docstring), is left
    alone with a log line (logger `fastdetr.optimize`). Layers the fused path does
    not support at run time (pre-norm, non-ReLU, ...) still convert: their forward
    falls back to the reference math (fastdetr.nn.transformer), as RT-DETRv2's
    "discrete" sampling falls back to its own forward (fastdetr.nn.hf).
    inference: also put the model in eval mode (dropout off).
    """
    converted, deformable, transformers_layers, deformable_layers = 0, {}, {}, {}
    for name, module in model.named_modules():
        if isinstance(module, (TransformerEncoderLayer, TransformerDecoderLayer, *hf_detr.MIXINS)):
            continue
        found = None if "forward" in vars(module) else hf_detr.layout_of(module)
        if found is not None:
            kind, layout = found
            original = type(module).__name__
            module.__class__ = fused_subclass(type(module), hf_detr.mixin_for(kind, layout))
            transformers_layers[original] = transformers_layers.get(original, 0) + 1
            reason = hf_detr.structure_supported(module, layout, kind == "decoder")
            if reason is not None:
                logger.info("fastdetr.optimize: %s (%s) runs transformers' own forward: %s", name or "<root>",
                            original, reason)
            continue
        if isinstance(module, (DeformableTransformerEncoderLayer, DeformableTransformerDecoderLayer)):
            continue
        layer_class = None if "forward" in vars(module) else _deformable_layer_class(module)
        if layer_class is not None:
            module.__class__ = layer_class
            deformable_layers[layer_class.__name__] = deformable_layers.get(layer_class.__name__, 0) + 1
            continue
        msda = _msda_class(module)
        if msda is not None:
            logger.debug("fastdetr.optimize: %s (%s) -> %s", name or "<root>", type(module).__name__, msda.__name__)
            kind = f"{type(module).__name__} -> {msda.__name__}"
            deformable[kind] = deformable.get(kind, 0) + 1
            module.__class__ = msda
            continue
        target = _target_class(module)
        if target is None:
            if hasattr(module, "self_attn"):
                logger.info("fastdetr.optimize: %s (%s) has self_attn but not the attributes of a DETR "
                            "encoder/decoder layer; left unchanged", name or "<root>", type(module).__name__)
            continue
        module.__class__ = target
        converted += 1
    for name, module in model.named_modules():
        if hasattr(module, "sampling_offsets") and not _msda_fused(module):
            logger.info("fastdetr.optimize: %s (%s) has sampling_offsets but not the structure of a deformable "
                        "attention module fastdetr knows; left unchanged", name or "<root>", type(module).__name__)
    # then the stacks: their forward builds each key padding mask's block table once for all their layers
    for module in model.modules():
        if not isinstance(module, (TransformerEncoder, TransformerDecoder)):
            target = _stack_class(module)
            if target is not None:
                module.__class__ = target
    # the backbone's frozen norms: one addcmul each on their cached fold (FrozenBatchNorm2d's docstring)
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.single_op = True
    logger.debug("fastdetr.optimize: converted %d transformer layers", converted)
    if transformers_layers:
        logger.info("fastdetr.optimize: converted %s transformers DETR layers (%s)", sum(transformers_layers.values()),
                    ", ".join(f"{count} {kind}" for kind, count in sorted(transformers_layers.items())))
    if deformable:
        logger.info("fastdetr.optimize: converted %s deformable attention modules (%s)", sum(deformable.values()),
                    ", ".join(f"{count} {kind}" for kind, count in sorted(deformable.items())))
    if deformable_layers:
        logger.info("fastdetr.optimize: converted %s Deformable DETR layers (%s)", sum(deformable_layers.values()),
                    ", ".join(f"{count} {kind}" for kind, count in sorted(deformable_layers.items())))
    if inference:
        model.eval()
    return model
