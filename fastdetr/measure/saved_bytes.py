"""What autograd keeps for backward: a saved-tensor report, and the fused layers against the reference ones.

    fastdetr memory [--small] [--device cpu|cuda] [--dtype float32|bfloat16|float16]
                    [--batch B] [--source S] [--queries Q] [--verbose] [--no-msda]

A training step's activation memory is what the forward saves for the backward.
`saved_tensor_bytes(fn, ...)` runs `fn` under `torch.autograd.graph.saved_tensors_hooks`
and adds up those tensors: by storage, each distinct storage once (q, k and v
saved as views of one (L, B, 3E) projection count once, as the allocator holds
them), split into the call's parameters, its inputs, and activations, which are
what a fused kernel can save on. Only storages still held by the graph when `fn`
returns are counted; a branch whose result was dropped keeps nothing alive.

`msda_saved_bytes(...)` measures one `fastdetr.nn.MultiScaleDeformableAttention`
forward three ways: the grid_sample core, the Triton sampling op alone, and the
module with its query and value sides fused too (`MSDAShape`: Deformable DETR's
widths, levels from an image size); saved bytes for training, and for a no-grad
forward the bytes it writes and its launches. The command prints it after the
layers unless `--no-msda`.

`layer_saved_bytes(...)` measures one DETR encoder or decoder layer: the
reference (`fastdetr.reference.transformer`) and the fused one
(`fastdetr.nn`, same state_dict), train mode, dropout 0.1, inputs requiring
grad as inside a training step (the sine position embedding of the tokens is a
constant; the learned query embedding is a parameter of the model, so it
requires grad).

CPU and GPU differ in what dropout keeps: on a CUDA tensor `F.dropout` is
`native_dropout`, which saves a bool mask (1 byte per element); on a CPU tensor
it is a multiplication by a float noise tensor, which saves the noise (4 bytes
in float32). So that a CPU run counts what a GPU keeps, `layer_saved_bytes`
routes `F.dropout` through `torch.native_dropout` while it measures
(`gpu_dropout_on_cpu=True`: the `gpu_dropout()` context, a scoped swap of
`torch.nn.functional.dropout`, undone on exit).

Shapes. Saved bytes grow linearly with the batch at fixed sequence lengths, and
the fused layers' also linearly with the tokens; the reference's do not: its
nn.MultiheadAttention keeps the (B * heads, L, S) attention weights (softmax
output, dropout mask, dropped weights), so its bytes per token grow with S. On
a GPU the command measures DETR-R50's problem (`DETR_R50`, from
`fastdetr.measure.problem.DETR_R50`). On the CPU the fused kernels run through
Triton's interpreter, slowly, so the CPU default (`CPU_DEFAULT`) keeps DETR-R50's
widths and queries with one image of fewer tokens (a 12 x 19 feature map). The
fused encoder's bytes per token carry over to DETR-R50's S; the reference's, and
the decoder's (which keeps keys and values of the memory), grow with S.
`--source` and `--batch` override the tokens and the batch (DETR-R50's S on the
CPU, say). The README holds the measured figures.
"""
from __future__ import annotations

import contextlib
import functools
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .problem import DETR_R50 as _R50_PROBLEM

KINDS = ("encoder", "decoder")


# ---------------------------------------------------------------------------------------------
# Counting saved tensors
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SavedStorage:
    """One distinct storage autograd holds: its bytes, its category, and the first tensor saved from it."""
    kind: str                # "activation", "parameter" or "input"
    nbytes: int              # the whole storage, which is what stays allocated
    shape: tuple[int, ...]   # of the first tensor saved with this storage (it may be a view)
    dtype: torch.dtype


@dataclass(frozen=True)
class SavedBytes:
    """Bytes autograd keeps for backward after one call, each storage counted once.

    activation_bytes: storages made during the call (what fusion can save on);
    parameter_bytes: storages of the parameters and buffers of the modules the call
    involves (they exist anyway); input_bytes: storages of the call's tensor
    arguments (they belong to the caller); count: tensors saved, before
    de-duplication; storages: one entry per distinct storage, largest first.
    """
    activation_bytes: int
    parameter_bytes: int
    input_bytes: int
    count: int
    storages: tuple[SavedStorage, ...] = field(default=(), repr=False)

    @property
    def total_bytes(self) -> int:
        return self.activation_bytes + self.parameter_bytes + self.input_bytes


def _tensors(tree) -> Iterator[Tensor]:
    """The tensors in nested lists / tuples / dicts (the arguments of a call)."""
    if isinstance(tree, Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


def _modules(fn: Callable, args: tuple, kwargs: dict) -> Iterator[nn.Module]:
    """Modules whose parameters count as parameters: `fn` itself, the owner of a bound method, a
    functools.partial's function and arguments, and modules passed as arguments."""
    while isinstance(fn, functools.partial):
        args, kwargs = fn.args + args, {**fn.keywords, **kwargs}
        fn = fn.func
    for candidate in (fn, getattr(fn, "__self__", None), *args, *kwargs.values()):
        if isinstance(candidate, nn.Module):
            yield candidate


def _storage_key(tensor: Tensor) -> tuple:
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):   # sparse, nested or other storage-less tensors
        return ("tensor", id(tensor))
    return (tensor.device, storage.data_ptr()) if storage.data_ptr() else ("empty", id(tensor))


def _storage_nbytes(tensor: Tensor) -> int:
    try:
        return tensor.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return tensor.numel() * tensor.element_size()


def saved_tensor_bytes(fn: Callable, *args, **kwargs) -> SavedBytes:
    """Run `fn(*args, **kwargs)` and report what autograd saved for its backward (see SavedBytes).

    Storages are told apart by data pointer. A storage is a parameter's when it
    belongs to a parameter or buffer of a module found as `fn`, its owner, or an
    argument (or when an nn.Parameter itself is saved): pass a Module or a bound
    method rather than a lambda that closes over one, or its weights count as
    activations. A storage is an input's when it belongs to a tensor argument.
    `fn`'s result is dropped after counting, which frees its graph. Tensors that
    `fn` saves under saved_tensors_hooks of its own (activation checkpointing)
    are packed by those hooks, not counted here.
    """
    owned: dict[tuple, str] = {}
    for tensor in _tensors((args, kwargs)):
        owned[_storage_key(tensor)] = "input"
    for module in _modules(fn, args, kwargs):   # parameters win over inputs: a weight passed as an argument
        for tensor in (*module.parameters(), *module.buffers()):
            owned[_storage_key(tensor)] = "parameter"

    # The graph holds a detached alias of each saved tensor (same storage): the tensor
    # itself would hold its own grad_fn when it is an output (softmax, exp, ...), a
    # reference cycle that outlives the graph. Weak references to the aliases: one
    # whose graph was dropped during the call dies (its address may be reused by a
    # later tensor); only what is alive when `fn` returns is counted.
    saved: list[weakref.ref] = []

    def pack(tensor: Tensor) -> Tensor:
        if isinstance(tensor, nn.Parameter):
            owned[_storage_key(tensor)] = "parameter"
        alias = tensor.detach()
        saved.append(weakref.ref(alias))
        return alias

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn(*args, **kwargs)
    alive = [tensor for tensor in (ref() for ref in saved) if tensor is not None]
    del result

    storages: dict[tuple, SavedStorage] = {}
    for tensor in alive:
        key = _storage_key(tensor)
        if key not in storages:
            storages[key] = SavedStorage(owned.get(key, "activation"), _storage_nbytes(tensor),
                                         tuple(tensor.shape), tensor.dtype)
    totals = {"activation": 0, "parameter": 0, "input": 0}
    for storage in storages.values():
        totals[storage.kind] += storage.nbytes
    return SavedBytes(activation_bytes=totals["activation"], parameter_bytes=totals["parameter"],
                      input_bytes=totals["input"], count=len(alive),
                      storages=tuple(sorted(storages.values(), key=lambda s: -s.nbytes)))


@contextlib.contextmanager
def gpu_dropout() -> Iterator[None]:
    """Inside the block, F.dropout in training runs `torch.native_dropout`, as it does on CUDA tensors.

    On CPU tensors `F.dropout` multiplies by a float noise tensor and autograd
    saves that noise; `native_dropout` (CUDA's path) saves a bool mask. Same
    distribution and gradients; only what is saved differs. Replaces the
    module attribute `torch.nn.functional.dropout`, which both nn.Dropout and
    F.multi_head_attention_forward look up at call time; not thread-safe.
    """
    original = F.dropout

    def dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
        if not training or inplace or not 0.0 < p < 1.0 or input.is_cuda:
            return original(input, p, training, inplace)
        return torch.native_dropout(input, p, True)[0]

    F.dropout = dropout
    try:
        yield
    finally:
        F.dropout = original


# ---------------------------------------------------------------------------------------------
# One DETR layer: reference against fused
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerShape:
    """One layer's problem size: widths, and tokens S (encoder sequence / decoder memory) and queries Q.

    The defaults are DETR-R50's (`fastdetr.measure.problem.DETR_R50`).
    """
    d_model: int = _R50_PROBLEM.d_model
    nhead: int = _R50_PROBLEM.heads
    dim_feedforward: int = _R50_PROBLEM.dim_feedforward
    source: int = _R50_PROBLEM.tokens
    queries: int = _R50_PROBLEM.queries
    batch: int = _R50_PROBLEM.batch

    def tokens(self, kind: str) -> int:
        """Rows the layer transforms: S * B for the encoder, Q * B for the decoder."""
        return (self.source if kind == "encoder" else self.queries) * self.batch

    def describe(self) -> str:
        return (f"d {self.d_model}, {self.nhead} heads, FFN {self.dim_feedforward}, "
                f"S {self.source}, Q {self.queries}, batch {self.batch}")


DETR_R50 = LayerShape()                                         # fastdetr.measure.problem.DETR_R50
CPU_DEFAULT = LayerShape(source=12 * 19, batch=1)               # DETR-R50 widths, one image, fewer tokens
SMALL = LayerShape(d_model=64, nhead=2, dim_feedforward=128, source=24, queries=5, batch=2)


@dataclass(frozen=True)
class LayerReport:
    """Saved-for-backward bytes of one layer forward, reference and fused (same state_dict, same inputs).

    fused_fallback: the fused layer ran nn.MultiheadAttention's forward, i.e. fell
    back to the reference math (a configuration the fused path does not cover,
    or CPU tensors without Triton's interpreter).
    """
    kind: str
    normalize_before: bool
    shape: LayerShape
    dtype: torch.dtype
    device: torch.device
    reference: SavedBytes
    fused: SavedBytes
    fused_fallback: bool

    @property
    def tokens(self) -> int:
        return self.shape.tokens(self.kind)

    @property
    def activation_ratio(self) -> float:
        """Fused over reference activation bytes."""
        return self.fused.activation_bytes / max(self.reference.activation_bytes, 1)


def _padding_mask(batch: int, source: int, device) -> Tensor:
    """(B, S) bool, True = padded: every other image padded over its last quarter, as DETR pads smaller images."""
    mask = torch.zeros(batch, source, dtype=torch.bool)
    mask[1::2, source - source // 4:] = True
    return mask.to(device)


def _random(generator: torch.Generator, device, dtype):
    """randn(*size, requires_grad=False): fresh normal values drawn on the CPU from `generator`, then moved."""
    def randn(*size, requires_grad=False):
        return torch.randn(*size, generator=generator).to(device, dtype).requires_grad_(requires_grad)

    return randn


def _layer_inputs(kind: str, shape: LayerShape, dtype, device, generator) -> dict[str, Tensor]:
    """Keyword arguments of one layer call, as inside a training step (see the module docstring)."""
    randn = _random(generator, device, dtype)
    batch, d_model = shape.batch, shape.d_model
    tokens = randn(shape.source, batch, d_model, requires_grad=True)
    pos = randn(shape.source, batch, d_model, requires_grad=False)
    mask = _padding_mask(batch, shape.source, device)
    if kind == "encoder":
        return dict(src=tokens, pos=pos, src_key_padding_mask=mask)
    return dict(tgt=randn(shape.queries, batch, d_model, requires_grad=True), memory=tokens, pos=pos,
                query_pos=randn(shape.queries, batch, d_model, requires_grad=True),
                memory_key_padding_mask=mask)


def layer_saved_bytes(kind: str, shape: LayerShape = DETR_R50, normalize_before: bool = False,
                      dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                      dropout: float = 0.1, gpu_dropout_on_cpu: bool = True, seed: int = 0) -> LayerReport:
    """Saved-for-backward bytes of one `kind` ("encoder" or "decoder") layer forward, reference and fused.

    Both layers are built from one random init (same state_dict), in train mode
    with `dropout`, and called on the same inputs: encoder src (S, B, d), pos
    (S, B, d), src_key_padding_mask (B, S); decoder tgt (Q, B, d), memory
    (S, B, d), pos, query_pos (Q, B, d), memory_key_padding_mask (B, S).
    On a CPU the fused layer runs its kernels only under TRITON_INTERPRET=1
    (otherwise it falls back, and the report says so). gpu_dropout_on_cpu: count
    dropout as CUDA saves it (see `gpu_dropout`).
    """
    import fastdetr.nn as fnn
    from fastdetr.reference import transformer as reference

    from .counters import TorchFunctionCounter

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    device = torch.device(device)
    reference_cls, fused_cls = {"encoder": (reference.TransformerEncoderLayer, fnn.TransformerEncoderLayer),
                                "decoder": (reference.TransformerDecoderLayer, fnn.TransformerDecoderLayer)}[kind]
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    arguments = dict(d_model=shape.d_model, nhead=shape.nhead, dim_feedforward=shape.dim_feedforward,
                     dropout=dropout, normalize_before=normalize_before)
    reference_layer = reference_cls(**arguments).to(device, dtype).train()
    fused_layer = fused_cls(**arguments).to(device, dtype).train()
    fused_layer.load_state_dict(reference_layer.state_dict())
    inputs = _layer_inputs(kind, shape, dtype, device, generator)

    swap = gpu_dropout() if gpu_dropout_on_cpu and device.type == "cpu" else contextlib.nullcontext()
    with swap:
        reference_bytes = saved_tensor_bytes(reference_layer, **inputs)
        with TorchFunctionCounter() as calls:
            fused_bytes = saved_tensor_bytes(fused_layer, **inputs)
    return LayerReport(kind=kind, normalize_before=normalize_before, shape=shape, dtype=dtype, device=device,
                       reference=reference_bytes, fused=fused_bytes,
                       fused_fallback=calls.ran("multi_head_attention"))


# ---------------------------------------------------------------------------------------------
# Multi-scale deformable attention
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MSDAShape:
    """One `MultiScaleDeformableAttention` call: Deformable DETR's widths, its levels from an image size.

    Level l is the image at stride `strides[l]` (ceil division, as a ResNet rounds); S = sum of H_l * W_l.
    """
    d_model: int = 256
    heads: int = 8
    points: int = 4
    image: tuple[int, int] = (800, 1333)       # (H, W) of the padded batch
    strides: tuple[int, ...] = (8, 16, 32, 64)
    queries: int = 300                         # the decoder's; the encoder's are its S tokens
    batch: int = 2

    def level_shapes(self) -> list[tuple[int, int]]:
        height, width = self.image
        return [(-(-height // stride), -(-width // stride)) for stride in self.strides]

    def tokens(self) -> int:
        return sum(height * width for height, width in self.level_shapes())

    def describe(self) -> str:
        return (f"d {self.d_model}, {self.heads} heads, {len(self.strides)} levels x {self.points} points, "
                f"{self.image[0]}x{self.image[1]} (S = {self.tokens()}), Q {self.queries}, batch {self.batch}")


MSDA_DEFORMABLE_DETR = MSDAShape()                                       # the decoder of Deformable-DETR-R50
MSDA_CPU_DEFAULT = MSDAShape(image=(128, 192), queries=100, batch=1)     # its widths, fewer tokens and queries
MSDA_SMALL = MSDAShape(d_model=64, heads=2, points=2, image=(32, 48), strides=(8, 16), queries=10, batch=2)


@dataclass(frozen=True)
class MSDAPath:
    """One way of running the module: what its training forward saves for backward, and what its inference
    forward (no grad) writes and launches (ATen ops that are not views or bare allocations, plus Triton
    kernels). fell_back: it ran grid_sample although it was meant to run the kernel."""
    saved: SavedBytes
    written_bytes: int
    launches: int
    fell_back: bool


@dataclass(frozen=True)
class MSDAReport:
    """One MultiScaleDeformableAttention forward three ways (same parameters, same inputs, padding mask
    included): `reference` the grid_sample core, `op` the Triton sampling core alone (query and value sides
    unfused), `fused` the query side and the value side fused as well (the default)."""
    shape: MSDAShape
    dtype: torch.dtype
    device: torch.device
    reference: MSDAPath
    op: MSDAPath
    fused: MSDAPath

    @property
    def fused_fallback(self) -> bool:
        return self.op.fell_back or self.fused.fell_back

    @property
    def activation_ratio(self) -> float:
        return self.fused.saved.activation_bytes / max(self.reference.saved.activation_bytes, 1)


def _measure_msda_path(module: nn.Module, inputs: dict, kernel_expected: bool) -> MSDAPath:
    from .counters import ALLOCATION_OPS, OpCounter, TorchFunctionCounter, TritonLaunchCounter, WrittenBytes

    with TorchFunctionCounter() as calls:
        saved = saved_tensor_bytes(module, **inputs)
    with torch.no_grad(), TritonLaunchCounter() as kernels, OpCounter() as ops, WrittenBytes() as written:
        module(**inputs)
    aten = sum(count for name, count in ops.op_counts.items() if name not in ALLOCATION_OPS)
    return MSDAPath(saved=saved, written_bytes=written.nbytes, launches=aten + kernels.launches,
                    fell_back=kernel_expected and calls.ran("grid_sample"))


def msda_saved_bytes(shape: MSDAShape = MSDA_CPU_DEFAULT, dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu", seed: int = 0) -> MSDAReport:
    """`fastdetr.nn.MultiScaleDeformableAttention` measured three ways (`MSDAReport`, `MSDAPath`).

    Random parameters (offsets of a few pixels, non-uniform weights), query and
    input_flatten requiring grad as inside a training step, 2-d reference points,
    a padding mask on the last eighth of each image's tokens (the value side's
    fill). On a CPU the kernels run only under TRITON_INTERPRET=1.
    """
    from fastdetr.nn.deformable_attention import MultiScaleDeformableAttention
    from fastdetr.reference import deformable_attention as reference

    class GridSampleCore(MultiScaleDeformableAttention):
        def _core(self, value, shapes, starts, locations, weights):
            return reference.ms_deform_attn(value, shapes, starts, locations, weights)

    device = torch.device(device)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    levels = len(shape.strides)
    fused = MultiScaleDeformableAttention(shape.d_model, levels, shape.heads, shape.points)
    with torch.no_grad():
        fused.sampling_offsets.weight.normal_(0, 2 / shape.d_model ** 0.5)
        fused.attention_weights.weight.normal_(0, 1 / shape.d_model ** 0.5)
    fused = fused.to(device, dtype)
    op = MultiScaleDeformableAttention(shape.d_model, levels, shape.heads, shape.points).to(device, dtype)
    grid_sample = GridSampleCore(shape.d_model, levels, shape.heads, shape.points).to(device, dtype)
    for module in (op, grid_sample):
        module.load_state_dict(fused.state_dict())
        module.fuse_query_side = module.fuse_value_side = False
    level_shapes = torch.tensor(shape.level_shapes(), dtype=torch.int64)
    sizes = level_shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    tokens = shape.tokens()
    padding = torch.zeros(shape.batch, tokens, dtype=torch.bool)
    padding[:, tokens - tokens // 8:] = True

    randn = _random(generator, device, dtype)
    inputs = dict(query=randn(shape.batch, shape.queries, shape.d_model, requires_grad=True),
                  reference_points=torch.rand(shape.batch, shape.queries, levels, 2, generator=generator).to(
                      device, dtype),
                  input_flatten=randn(shape.batch, tokens, shape.d_model, requires_grad=True),
                  input_spatial_shapes=level_shapes.to(device), input_level_start_index=starts.to(device),
                  input_padding_mask=padding.to(device))
    return MSDAReport(shape=shape, dtype=dtype, device=device,
                      reference=_measure_msda_path(grid_sample, inputs, kernel_expected=False),
                      op=_measure_msda_path(op, inputs, kernel_expected=True),
                      fused=_measure_msda_path(fused, inputs, kernel_expected=True))


def format_msda_table(reports: Iterable[MSDAReport]) -> str:
    """A markdown table: the grid_sample core, the op alone and the fused module, per MSDA shape."""
    header = ("| module | S (tokens) | Q | path | activations MiB | activation B/query | tensors saved "
              "| / grid_sample | inference writes MiB | inference launches |\n"
              "|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for report in reports:
        rows = report.shape.queries * report.shape.batch
        for label, path in (("grid_sample", report.reference), ("fastdetr op", report.op),
                            ("fastdetr fused", report.fused)):
            label += " (fell back to grid_sample)" if path.fell_back else ""
            ratio = "" if path is report.reference else \
                f"{path.saved.activation_bytes / max(report.reference.saved.activation_bytes, 1):.2f}"
            lines.append(f"| MultiScaleDeformableAttention | {report.shape.tokens()} | {report.shape.queries} "
                         f"| {label} | {_mib(path.saved.activation_bytes)} "
                         f"| {path.saved.activation_bytes / rows:,.0f} | {path.saved.count} | {ratio} "
                         f"| {_mib(path.written_bytes)} | {path.launches} |")
    return header + "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The report `fastdetr memory` prints
# ---------------------------------------------------------------------------------------------

def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f}"


def format_table(reports: Iterable[LayerReport]) -> str:
    """A markdown table: per layer kind and norm placement, reference and fused saved bytes."""
    header = ("| layer | norm | path | activations MiB | activation B/token | parameters MiB | inputs MiB "
              "| tensors saved | fused / reference |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for report in reports:
        norm = "pre" if report.normalize_before else "post"
        for path, saved in (("reference", report.reference), ("fused", report.fused)):
            label = path + (" (fell back to reference)" if path == "fused" and report.fused_fallback else "")
            ratio = f"{report.activation_ratio:.2f}" if path == "fused" else ""
            lines.append(f"| {report.kind} | {norm} | {label} | {_mib(saved.activation_bytes)} "
                         f"| {saved.activation_bytes / report.tokens:,.0f} | {_mib(saved.parameter_bytes)} "
                         f"| {_mib(saved.input_bytes)} | {saved.count} | {ratio} |")
    return header + "\n".join(lines) + "\n"


def run_report(shape: LayerShape, dtype: torch.dtype, device: torch.device, verbose: bool = False,
               msda_shape: MSDAShape | None = None) -> int:
    """`fastdetr memory`: measure both layer kinds, post- and pre-norm, at `shape`, and print the table;
    with `msda_shape`, also one MultiScaleDeformableAttention forward (`msda_saved_bytes`).

    On a CPU the caller sets TRITON_INTERPRET=1 before the first kernel module is imported (fastdetr.cli does).
    verbose: also list every saved storage.
    """
    print(f"saved for backward, one layer forward, train mode, dropout 0.1: {shape.describe()}, "
          f"{str(dtype).removeprefix('torch.')}, {device}", flush=True)
    reports = []
    for normalize_before in (False, True):
        for kind in KINDS:
            start = time.perf_counter()
            report = layer_saved_bytes(kind, shape, normalize_before, dtype, device)
            reports.append(report)
            print(f"  {kind}, {'pre' if normalize_before else 'post'}-norm: measured in "
                  f"{time.perf_counter() - start:.1f} s", flush=True)
            if verbose:
                for path, saved in (("reference", report.reference), ("fused", report.fused)):
                    for storage in saved.storages:
                        print(f"    {path:<9} {storage.kind:<10} {_mib(storage.nbytes):>9} MiB "
                              f"{list(storage.shape)} {str(storage.dtype).removeprefix('torch.')}")
    print()
    print(format_table(reports))
    print("token = source token (encoder, S * B rows) or query (decoder, Q * B rows; its bytes include "
          "the memory-side keys and values, which grow with S). The reference keeps (B * heads, L, S) "
          "attention weights, so its bytes per token grow with S; the fused layers' do not.")
    if torch.device(device).type == "cpu":
        print("dropout counted as CUDA keeps it (bool masks), see fastdetr.measure.saved_bytes.gpu_dropout.")
    if any(report.fused_fallback for report in reports):
        print("'fell back to reference': the fused class ran nn.MultiheadAttention's forward for that layer.")
    if msda_shape is not None:
        start = time.perf_counter()
        msda = msda_saved_bytes(msda_shape, dtype, device)
        print(f"\nmulti-scale deformable attention, one module forward: {msda_shape.describe()} "
              f"(measured in {time.perf_counter() - start:.1f} s)\n")
        print(format_msda_table([msda]))
        print("grid_sample per level keeps per-level value copies, grids and the sampled (N * heads, D, Q, L * P) "
              "values; the op keeps its inputs only (value, locations, weights); the fused module keeps value and "
              "the query (an input), and recomputes the offsets+logits GEMM in backward; it never writes locations or "
              "softmaxed weights. "
              "'op': the sampling kernel with the query and value sides in separate ops; 'fused': "
              "fuse_query_side and fuse_value_side on (the default). Inference columns: a no-grad forward.")
    return 0
