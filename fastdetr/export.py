"""ONNX export of a DETR or a Deformable DETR for inference: `export_onnx(model, path)` and `fastdetr export`.

The exported graph takes
    images      (B, 3, H, W) float32, normalised RGB; B, H and W dynamic
    mask        (B, H, W) bool, True on padding          -- only with `with_mask=True`
    orig_sizes  (B, 2) int64, (height, width) in pixels  -- only with `with_postprocess=True`
and returns
    pred_logits (B, Q, num_classes + 1), pred_boxes (B, Q, 4) normalised (cx, cy, w, h),
    and with `with_postprocess=True` also scores (B, Q), labels (B, Q) int64 and
    boxes (B, Q, 4) xyxy in pixels: `fastdetr.PostProcess`'s output, batched.

Why DETR exports traced at one size break at another, and what is done here:
- The padding mask is downsampled to the feature map with F.interpolate
  (nearest). ONNX Resize picks source row floor(dst / (out / in)) where
  PyTorch picks floor(dst * (in / out)): in float32 the two differ by a row at
  many sizes (28 -> 2, 49 -> 7, ...), which shifts the position embedding and
  the attention mask. The graph gathers the rows and columns PyTorch picks,
  computed from the runtime sizes (`downsample_mask`).
- Sizes are never Python ints taken from the example input: the mask without a
  `mask` input, the sine position embedding (cumulative sums over the mask)
  and the batch repeat of the object queries are computed from the input's
  shape inside the graph (the tracer records `tensor.shape` as Shape ops).
- `PostProcess` returns a list of per-image dicts, a Python loop that a trace
  fixes at the example batch; the graph keeps batched (B, Q) tensors.
- Fused layers (`fastdetr.optimize`, `fastdetr.nn`) export through their
  plain-PyTorch math: their classes are swapped back to the reference classes
  for the trace and restored afterwards, also on error (`reference_layers`).
- torch.onnx.export puts the module it is given in eval mode and then calls
  `.train(previous)` on it, which overwrites every submodule's own mode; each
  module's mode is saved and restored here.
- The auxiliary (per-decoder-layer) outputs are training-only and not exported.

A `fastdetr.DeformableDETR` (`DeformableInferenceGraph`) exports the same way, from opset 16 (MSDA's
reference math, grid_sample per level, is ONNX GridSample): pred_logits are (B, Q, num_classes)
sigmoid logits (no "no object" class), and with_postprocess gives its `PostProcess`'s top
min(100, Q * num_classes) (query, class) pairs: scores, labels, boxes (B, 100, ...). Each level's
padding mask is `downsample_mask`ed as above; the levels' sizes, start tokens, reference-point
grids and two-stage proposal grids come from the feature maps' Shape ops
(`fastdetr.reference.deformable_detr._level_sizes`); two-stage's top-k keeps Q proposals, so an
input needs at least Q tokens over its levels.

The exporter is torch's TorchScript-based one (`torch.onnx.export(...,
dynamo=False)`): the torch.export-based exporter needs the `onnxscript`
package, which fastdetr does not depend on. The trace records the model's ops
once; every size-dependent value in it comes from Shape ops on the inputs.

What cannot export (a ValueError or TypeError says so before tracing): opsets
outside [MIN_OPSET, the exporter's maximum]; a model whose parameters are not
float32 (export from `model.float()`; the graph's input is float32); a module
that is not a `fastdetr.DETR` (the original repository's model, whose backbone
returns a dict of feature maps, is not one: load its checkpoint with
`fastdetr.load_checkpoint`). A model with the
learned position embedding exports, but its tables cover feature maps up to
50 x 50 (1600 x 1600 pixels at stride 32): larger inputs fail in the runtime.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy
from .nested import batch_images
from .nn.attention import MultiheadAttention as FusedMultiheadAttention
from .nn.deformable_transformer import DeformableTransformerDecoderLayer as FusedDeformableDecoderLayer
from .nn.deformable_transformer import DeformableTransformerEncoderLayer as FusedDeformableEncoderLayer
from .nn.transformer import TransformerDecoderLayer as FusedDecoderLayer
from .nn.transformer import TransformerEncoderLayer as FusedEncoderLayer
from .reference import deformable_detr as deformable_reference
from .reference import transformer as reference
from .reference.deformable_detr import DeformableDETR, top_detections
from .reference.deformable_detr import PostProcess as DeformablePostProcess
from .reference.detr import DETR, PostProcess

# CumSum (the sine position embedding) is an ONNX op from opset 11; LayerNormalization
# (opset 17) is decomposed by the exporter for older opsets.
MIN_OPSET = 11
# GridSample, for multi-scale deformable attention, is an ONNX op from opset 16.
MIN_OPSET_DEFORMABLE = 16

_REFERENCE_CLASS: dict[type, type] = {
    FusedEncoderLayer: reference.TransformerEncoderLayer,
    FusedDecoderLayer: reference.TransformerDecoderLayer,
    FusedMultiheadAttention: nn.MultiheadAttention,
    FusedDeformableEncoderLayer: deformable_reference.DeformableTransformerEncoderLayer,
    FusedDeformableDecoderLayer: deformable_reference.DeformableTransformerDecoderLayer,
}

OUTPUT_NAMES = ("pred_logits", "pred_boxes")
POSTPROCESS_NAMES = ("scores", "labels", "boxes")


def max_opset() -> int:
    """The newest opset torch's TorchScript-based exporter writes."""
    from torch.onnx import _constants

    return getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", _constants.ONNX_MAX_OPSET)


@contextlib.contextmanager
def reference_layers(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every fused fastdetr module in `model` is its reference class.

    The fused classes subclass the reference ones without adding state, so
    assigning `__class__` back is exact (same Parameters, same state_dict); it
    is undone on exit, also when the block raises. Used for export, where the
    trace must record plain PyTorch ops whatever the device or TRITON_INTERPRET.
    """
    swapped: list[tuple[nn.Module, type]] = []
    try:
        for module in model.modules():
            target = _REFERENCE_CLASS.get(type(module))
            if target is not None:
                swapped.append((module, type(module)))
                module.__class__ = target
        yield model
    finally:
        for module, fused_class in swapped:
            module.__class__ = fused_class


@contextlib.contextmanager
def _eval_modes(model: nn.Module) -> Iterator[None]:
    """Eval mode inside the block; every module's own train/eval flag restored on exit."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for module, training in modes:
            module.training = training


def downsample_mask(mask: Tensor, size: Sequence[int] | Sequence[Tensor]) -> Tensor:
    """(B, H, W) bool -> (B, h, w) bool: the pixels F.interpolate(mode="nearest") picks, as two gathers.

    Source index = min(floor(dst * float32(in / out)), in - 1), PyTorch's rule
    for nearest with an output size, computed from the runtime sizes so that
    an exported graph picks the same rows and columns at every input size.
    """
    rows = _nearest_source(mask.shape[-2], size[0], mask.device)
    cols = _nearest_source(mask.shape[-1], size[1], mask.device)
    return mask.index_select(-2, rows).index_select(-1, cols)


def _nearest_source(in_size: int | Tensor, out_size: int | Tensor, device: torch.device) -> Tensor:
    """(out_size,) int64 source indices; under tracing the sizes are 0-d tensors and stay symbolic."""
    in_size_f = _float32(in_size, device)
    scale = in_size_f / _float32(out_size, device)
    dst = torch.arange(out_size, dtype=torch.float32, device=device)
    # The clamp in float32 (exact for any image size): ONNX Clip takes no int64 before opset 12.
    return torch.minimum((dst * scale).floor(), in_size_f - 1).to(torch.int64)


def _float32(size: int | Tensor, device: torch.device) -> Tensor:
    # A traced size is a 0-d tensor and must stay one: a new tensor made from it would be a constant.
    if isinstance(size, Tensor):
        return size.to(device=device, dtype=torch.float32)
    return torch.tensor(float(size), device=device)


class InferenceGraph(nn.Module):
    """What gets traced: DETR's inference forward on (images[, mask][, orig_sizes]) with plain tensors.

    forward(images (B, 3, H, W)[, mask (B, H, W) bool][, orig_sizes (B, 2)]) -> a tuple of
    pred_logits (B, Q, C + 1), pred_boxes (B, Q, 4)[, scores (B, Q), labels (B, Q), boxes (B, Q, 4)].
    Equal to `model((images, mask))` (and `PostProcess`) in eager mode; see the module docstring
    for where and why it differs in how it computes.
    """

    def __init__(self, model: nn.Module, with_mask: bool, with_postprocess: bool):
        super().__init__()
        self.model = model
        self.with_mask = with_mask
        self.with_postprocess = with_postprocess

    def forward(self, images: Tensor, *extra: Tensor) -> tuple[Tensor, ...]:
        model = self.model
        if self.with_mask:
            mask = extra[0]
        else:
            # (B, H, W) zeros shaped like the input at run time: what DETR builds for a plain tensor.
            mask = torch.zeros_like(images[:, 0], dtype=torch.bool)
        features = model.backbone[0].body(images)
        small_mask = downsample_mask(mask, features.shape[-2:])
        pos = model.backbone[1](features, small_mask).to(features.dtype)
        hs = model.transformer(model.input_proj(features), small_mask, model.query_embed.weight, pos)[0]
        last = hs[-1]  # the auxiliary outputs of earlier decoder layers serve training only
        logits = model.class_embed(last)
        boxes = model.bbox_embed(last).sigmoid()
        if not self.with_postprocess:
            return logits, boxes
        return (logits, boxes, *postprocess(logits, boxes, extra[-1]))


class DeformableInferenceGraph(nn.Module):
    """What gets traced for a `fastdetr.DeformableDETR`: its inference forward on plain tensors.

    forward(images (B, 3, H, W)[, mask (B, H, W) bool][, orig_sizes (B, 2)]) -> a tuple of
    pred_logits (B, Q, C), pred_boxes (B, Q, 4)[, scores (B, k), labels (B, k), boxes (B, k, 4)],
    k = min(100, Q * C). Equal to `model((images, mask))` (and its `PostProcess`) in eager mode; the masks
    of the levels are gathered (`downsample_mask`) where the model interpolates.
    """

    def __init__(self, model: DeformableDETR, with_mask: bool, with_postprocess: bool):
        super().__init__()
        self.model = model
        self.with_mask = with_mask
        self.with_postprocess = with_postprocess
        self.num_select = min(DeformablePostProcess().num_select, model.num_queries * model.config.num_classes)

    def forward(self, images: Tensor, *extra: Tensor) -> tuple[Tensor, ...]:
        model = self.model
        mask = extra[0] if self.with_mask else torch.zeros_like(images[:, 0], dtype=torch.bool)
        position = model.backbone[1]
        maps = model.backbone[0].feature_maps(images)
        srcs, masks, pos = [], [], []
        for level in range(model.num_feature_levels):
            if level < len(maps):
                features = maps[level]
                src = model.input_proj[level](features)
            else:
                # the first extra level convolves C5 itself, the next ones the previous projection
                src = features = model.input_proj[level](maps[-1] if level == len(maps) else srcs[-1])
            level_mask = downsample_mask(mask, features.shape[-2:])
            srcs.append(src)
            masks.append(level_mask)
            pos.append(position(features, level_mask).to(features.dtype))
        query_embeds = None if model.two_stage else model.query_embed.weight
        hs, init_reference, inter_references, _, _ = model.transformer(srcs, masks, pos, query_embeds)
        last = len(model.transformer.decoder.layers) - 1   # earlier layers' outputs serve training only
        logits, boxes = model.predict(last, hs[last], init_reference if last == 0 else inter_references[last - 1])
        if not self.with_postprocess:
            return logits, boxes
        return (logits, boxes, *top_detections(logits, boxes, extra[-1], self.num_select))


def postprocess(logits: Tensor, boxes: Tensor, orig_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`fastdetr.PostProcess` on whole batches: logits (B, Q, C + 1), boxes (B, Q, 4) cxcywh in [0, 1],
    orig_sizes (B, 2) (height, width) -> scores (B, Q), labels (B, Q) int64, boxes (B, Q, 4) xyxy pixels."""
    scores, labels = logits.softmax(-1)[..., :-1].max(-1)
    height, width = orig_sizes.unbind(1)
    scale = torch.stack((width, height, width, height), dim=1).to(boxes.dtype)
    return scores, labels, box_cxcywh_to_xyxy(boxes) * scale[:, None, :]


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, (DETR, DeformableDETR)):
        raise TypeError(
            f"export_onnx: expected a fastdetr.DETR or fastdetr.DeformableDETR (reference or optimized), got "
            f"{type(model).__name__}; build one with fastdetr.detr_resnet50() or fastdetr.load_checkpoint(path)"
        )
    dtypes = sorted({str(t.dtype) for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()})
    if dtypes != ["torch.float32"]:
        raise ValueError(
            f"export_onnx: the model's parameters are {', '.join(dtypes)}; the exported graph is float32 "
            "(input `images` float32): export from model.float()"
        )


def _check_arguments(opset: int, image_size: Sequence[int], batch_size: int,
                     deformable: bool = False) -> tuple[int, int]:
    newest = max_opset()
    oldest, why = (MIN_OPSET_DEFORMABLE, "GridSample, for deformable attention") if deformable else \
        (MIN_OPSET, "CumSum, for the sine position embedding")
    if not isinstance(opset, int) or isinstance(opset, bool) or not oldest <= opset <= newest:
        raise ValueError(
            f"export_onnx: opset {opset!r} is not supported: {'Deformable ' if deformable else ''}DETR needs "
            f"opset >= {oldest} ({why}) and torch's TorchScript exporter writes opsets up to {newest}"
        )
    if (len(image_size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                        for v in image_size)):
        raise ValueError(f"export_onnx: image_size must be two positive ints (height, width), got {image_size!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"export_onnx: batch_size must be a positive int, got {batch_size!r}")
    return int(image_size[0]), int(image_size[1])


def export_onnx(model: nn.Module, path: str | os.PathLike, opset: int = 17, dynamic: bool = True,
                with_postprocess: bool = False, *, with_mask: bool = False,
                image_size: Sequence[int] = (320, 480), batch_size: int = 2) -> Path:
    """Export `model` (a reference or fused DETR or DeformableDETR) for inference to the ONNX file `path`.

    Returns the path.
    Inputs and outputs are listed in the module docstring. dynamic: batch,
    height and width are symbolic (`batch`, `height`, `width`), so one file
    serves every size and batch; with False the graph is fixed at
    (batch_size, 3, *image_size). with_mask: add the `mask` input for padded
    batches (without it every pixel is an image pixel). with_postprocess: add
    `orig_sizes` and the scores / labels / boxes outputs. image_size and
    batch_size set the example input that is traced; the sizes it is run at
    later need not match when `dynamic`.

    The model is traced in eval mode with its fused layers as reference
    layers; afterwards both are as before. When the `onnx` package is
    installed the file is checked with onnx.checker.
    """
    _check_model(model)
    deformable = isinstance(model, DeformableDETR)
    height, width = _check_arguments(opset, image_size, batch_size, deformable)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parameter = next(model.parameters())
    device = parameter.device
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, height, width, generator=generator).to(device)
    inputs: list[Tensor] = [images]
    input_names = ["images"]
    dynamic_axes: dict[str, dict[int, str]] = {"images": {0: "batch", 2: "height", 3: "width"}}
    if with_mask:
        inputs.append(torch.zeros(batch_size, height, width, dtype=torch.bool, device=device))
        input_names.append("mask")
        dynamic_axes["mask"] = {0: "batch", 1: "height", 2: "width"}
    if with_postprocess:
        inputs.append(torch.tensor([[height, width]] * batch_size, dtype=torch.int64, device=device))
        input_names.append("orig_sizes")
        dynamic_axes["orig_sizes"] = {0: "batch"}
    output_names = list(OUTPUT_NAMES) + (list(POSTPROCESS_NAMES) if with_postprocess else [])
    for name in output_names:
        dynamic_axes[name] = {0: "batch"}

    graph_class = DeformableInferenceGraph if deformable else InferenceGraph
    graph = graph_class(model, with_mask, with_postprocess)
    options = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    # A caller's autocast would write casts to bfloat16 / float16 into the float32 graph.
    no_autocast = torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else \
        contextlib.nullcontext()
    with reference_layers(model), _eval_modes(graph), torch.no_grad(), no_autocast, warnings.catch_warnings():
        # Expected and harmless here: torch >= 2.9 flags the TorchScript exporter as legacy (see the
        # module docstring for why it is used), and nn.MultiheadAttention's shape asserts compare
        # traced sizes, which the tracer reports as constants.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message="The feature will be removed.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module="torch.nn.functional")
        # The learned embedding's size check (feature map <= 50 x 50) is fixed in the trace; see above.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning,
                                module="fastdetr.reference.position_encoding")
        # Deformable DETR: points (x, y) or boxes (x, y, w, h) as reference points is a static fact of the graph.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning,
                                module="fastdetr.reference.deformable_detr")
        torch.onnx.export(
            graph, tuple(inputs), str(path), input_names=input_names, output_names=output_names,
            opset_version=opset, dynamic_axes=dynamic_axes if dynamic else None, do_constant_folding=True,
            **options,
        )
    try:
        import onnx
    except ImportError:
        return path
    # Deformable DETR's post-processed outputs hold k detections, not Q, and the exporter writes k itself.
    _fix_query_dims(onnx, path, model.num_queries if deformable else model.query_embed.num_embeddings,
                    OUTPUT_NAMES if deformable else output_names)
    onnx.checker.check_model(str(path), full_check=True)
    return path


def _fix_query_dims(onnx, path: Path, num_queries: int, names: Sequence[str]) -> None:
    """Write the number of queries into the outputs' dim 1, which the exporter leaves symbolic.

    The exporter's shape inference loses Q in the query embedding's batch
    repeat; a fixed Q lets runtimes that plan memory from declared shapes
    (TensorRT, ...) do so.
    """
    proto = onnx.load(str(path))
    for output in proto.graph.output:
        dims = output.type.tensor_type.shape.dim
        if output.name in names and len(dims) >= 2 and not dims[1].HasField("dim_value"):
            dims[1].dim_value = num_queries
    onnx.save(proto, str(path))


def _session(path: str | os.PathLike):
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_onnx(path: str | os.PathLike | Any, images: Tensor, mask: Tensor | None = None,
             orig_sizes: Tensor | None = None) -> dict[str, Tensor]:
    """Run an exported graph in onnxruntime (CPU) -> {output name: tensor}.

    `path` is the file or an onnxruntime.InferenceSession of it (to run one
    graph many times). Pass `mask` exactly when the graph was exported with
    `with_mask=True`, and `orig_sizes` exactly when with `with_postprocess=True`.
    """
    session = path if hasattr(path, "get_inputs") else _session(path)
    expected = [node.name for node in session.get_inputs()]
    given = {"images": images, "mask": mask, "orig_sizes": orig_sizes}
    for name, value in given.items():
        if (value is not None) != (name in expected):
            raise ValueError(f"{path}: the graph's inputs are {expected}; "
                             f"{name} was {'given' if value is not None else 'not given'}")
    feeds = {name: given[name].detach().cpu().numpy() for name in expected}
    names = [node.name for node in session.get_outputs()]
    return {name: torch.from_numpy(value) for name, value in zip(names, session.run(names, feeds))}


def compare_onnx(model: nn.Module, path: str | os.PathLike | Any, images: Tensor, mask: Tensor | None = None,
                 orig_sizes: Tensor | None = None) -> dict[str, float]:
    """Run the graph in onnxruntime and `model` in PyTorch (its reference math) on the same inputs.

    Returns {output: relative error ||onnx - torch|| / ||torch||}; for `labels`,
    the fraction of labels that differ. The PyTorch side is `model((images,
    mask))` and `fastdetr.PostProcess`, not the exported wrapper.
    """
    got = run_onnx(path, images, mask, orig_sizes)
    device = next(model.parameters()).device
    images = images.to(device)
    if mask is None:
        mask = torch.zeros_like(images[:, 0], dtype=torch.bool)
    with reference_layers(model), _eval_modes(model), torch.no_grad():
        outputs = model((images, mask.to(device)))
    expected = {name: outputs[name] for name in OUTPUT_NAMES}
    if orig_sizes is not None:
        postprocessor = DeformablePostProcess() if isinstance(model, DeformableDETR) else PostProcess()
        detections = postprocessor(outputs, orig_sizes.to(device))
        for name in POSTPROCESS_NAMES:
            expected[name] = torch.stack([d[name] for d in detections])
    errors = {}
    for name, reference_value in expected.items():
        value, reference_value = got[name], reference_value.cpu()
        if value.shape != reference_value.shape:
            raise ValueError(f"{name}: onnxruntime gave {tuple(value.shape)}, PyTorch {tuple(reference_value.shape)}")
        if name == "labels":
            errors[name] = (value != reference_value).double().mean().item()
        else:
            difference = (value.double() - reference_value.double()).norm()
            errors[name] = (difference / reference_value.double().norm().clamp_min(1e-30)).item()
    return errors


def verify_onnx(model: nn.Module, path: str | os.PathLike, image_size: Sequence[int] = (243, 317),
                batch_size: int = 3, seed: int = 0) -> dict[str, float]:
    """`compare_onnx` on a random padded batch: image 0 is `image_size`, each next one smaller.

    The batch carries a padding mask and (height, width) sizes when the graph
    takes them. Returns the relative error per output.
    """
    generator = torch.Generator().manual_seed(seed)
    height, width = image_size
    images = [torch.randn(3, max(1, height - 11 * index), max(1, width - 17 * index), generator=generator)
              for index in range(batch_size)]
    tensors, mask = batch_images(images)
    session = _session(path)
    inputs = {node.name for node in session.get_inputs()}
    orig_sizes = torch.tensor([image.shape[1:] for image in images], dtype=torch.int64)
    return compare_onnx(model, session, tensors, mask if "mask" in inputs else None,
                        orig_sizes if "orig_sizes" in inputs else None)
