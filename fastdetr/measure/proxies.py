"""What one DETR training step costs a GPU, counted on a CPU: kernel launches, host syncs, saved bytes.

    fastdetr proxies [--model detr|deformable_detr] [--quick] [--enc-layers N] [--dec-layers N] [--queries Q]
                     [--device cpu|cuda] [--verbose]

At DETR's sizes a GPU step is bound by kernel launches and host syncs as much
as by arithmetic (shared/DESIGN.md), and both are counts: they can be taken
on a machine without a GPU, with the fused kernels run by Triton's
interpreter. `step_proxies(fused, matcher)` runs one training step -- model
forward, SetCriterion with aux losses (`fastdetr.build_criterion`), the
weighted total, backward -- of a model with DETR-R50's widths and classes
(`fastdetr.measure.problem.DETR_R50`: its preset, ResNet-50, random weights)
and counts:

- ATen ops, views excluded (`fastdetr.measure.counters.OpCounter`), and among
  them allocations (`ALLOCATION_OPS`: `empty` and kin, no kernel on a GPU);
- Triton kernel launches (`fastdetr.measure.counters.TritonLaunchCounter`); the
  interpreter's own argument copies are not counted as ATen ops;
- launches = ATen ops - allocations + Triton launches: the kernels a GPU
  would launch, roughly (an ATen op is one kernel, a few are more or none);
- host syncs: ops that make the host wait for the device (OpCounter's
  `sync_ops`), plus the scipy matcher's device-to-host copy of its cost
  blocks, which a CPU tensor does not make (`.cpu()` of a CPU tensor is the
  tensor itself) and a GPU makes once per step: counted by the solver calls;
- saved activation bytes: what the forward and the criterion leave for the
  backward, parameters and inputs excluded
  (`fastdetr.measure.saved_bytes.saved_tensor_bytes`), dropout counted as a GPU
  keeps it (`fastdetr.measure.saved_bytes.gpu_dropout`, also for the op count:
  one `native_dropout` as on CUDA).

Four configurations (`CONFIGURATIONS`): the reference model with the scipy
matcher (the original's setting), the fused model (`fastdetr.optimize`) with
the same matcher, the fused model with the "triton" matcher (fused cost
kernel and batched assignment kernel) without its CPU-only status check, the
path a GPU takes: `resolve_solver("triton", check_invalid=False)`, and
"fastdetr-static": that step in the static-shape form a CUDA graph captures
(`fastdetr.static`: the batch padded to its size bucket, the targets to
num_queries slots, `SetCriterion.forward_padded` with every layer's losses in
one batched computation).

The step counted is a steady one: the caches a first forward fills (FrozenBatchNorm2d's
folded statistics) are filled before it.

The optimizer phase -- gradient clipping at 0.1 and the AdamW step, its state
made beforehand so the step counted is a steady one -- is counted apart
(`optimizer_launches`; `step_launches` adds it): the reference runs what the
original gets on a GPU (torch's AdamW and `clip_grad_norm_`, foreach there),
fastdetr its fused AdamW and one foreach clipping call (`fastdetr.optim`).

Deformable DETR (`StepShape.model` "deformable_detr"): the same step and configurations for plain
Deformable-DETR-R50 (the "deformable_detr_resnet50" preset, no box refinement, not two-stage;
`fastdetr.build_deformable_criterion`, whose FocalHungarianMatcher computes its focal cost in PyTorch with
either solver: the "triton" matcher is the assignment kernel alone; the static form its `forward_padded`). The
fused model is `fastdetr.optimize`'s: fastdetr.nn.MultiScaleDeformableAttention and the fused encoder and
decoder layers. Two things a CPU would count otherwise than a GPU: the reference MSDA reads spatial_shapes
and level_start_index on the host (`tolist`, two device-to-host copies per call on a GPU, none on a CPU
tensor: counted as syncs by their calls, as the scipy solver's copy), and the fused MSDA checks the levels'
token count on CPU tensors only (a value read, 3 ops): run outside the counters. The optimizer phase is the
same `_optimizer` over all trainable parameters; the official's three learning-rate groups (backbone,
sampling offsets and reference points, the rest) change no launch count (one fused launch or foreach call
covers every group).

Shapes. Op, launch and sync counts do not depend on the image sizes or the
number of queries (tests/test_proxies.py checks it for the reference); from two
decoder layers on they grow linearly with the layers (the first aux layer also
adds the matcher's stacking of layers), so a step with fewer layers gives the
full model's counts by adding layer pairs. Saved bytes grow with everything,
the reference's faster: it keeps the (B * heads, L, S) attention weights.
`DETR_R50_STEP`: DETR-R50's layers and queries, batch 2 of small images (a
3 x 3 feature map, one padded row or column each), so that the interpreter's
step stays affordable; `QUICK_STEP`, which the tests measure, keeps the widths
and the aux losses with 2 + 2 layers and 20 queries. The measured counts live
in the benchmark results (`fastdetr bench --suites proxies`) and, as bounds
with the values they were set from, in tests/test_proxies.py. `DEFORMABLE_R50_STEP`: 6 + 6 layers and 300
queries on the same images (maps 12x12, 6x6, 3x3, 2x2); through the interpreter its fused MSDA kernels take
hours on a CPU (their programs grow with tokens and queries). `DEFORMABLE_QUICK_STEP`: 2 + 2 layers, 20
queries, images 16x24 and 24x16, about a minute per fused configuration; its 1x1 levels make two reshapes
views (8 fewer forward ops in the reference, 4 fused, than at 64x96; otherwise the same counts).
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import _disable_current_modes

from ..criterion import build_criterion, total_loss
from ..deformable_criterion import build_deformable_criterion
from .counters import ALLOCATION_OPS, OpCounter, TritonLaunchCounter
from .problem import DETR_R50
from .saved_bytes import SavedBytes, gpu_dropout, saved_tensor_bytes

MODELS = ("detr", "deformable_detr")
DEFORMABLE_PRESET = "deformable_detr_resnet50"
NUM_CLASSES = DETR_R50.num_classes   # 91, COCO's ids, for both models (Deformable DETR's focal head: 91 outputs)
MATCHERS = ("scipy", "triton")
# (provider, fused, matcher, static): the reference with the original's matcher, then fastdetr with it and with its
# own, then fastdetr's static-shape step (`fastdetr.static`: padded batch and targets, `forward_padded`)
CONFIGURATIONS = (("reference", False, "scipy", False), ("fastdetr", True, "scipy", False),
                  ("fastdetr", True, "triton", False), ("fastdetr-static", True, "triton", True))
PHASES = ("forward", "criterion", "backward")
# Ops of the optimizer phase that launch nothing on a GPU: the reference AdamW's reads of its host-side step
# counters (one `.item()` per tensor) and the profiler's record_function markers.
OPTIMIZER_HOST_OPS = ("aten._local_scalar_dense", "aten._record_function_enter_new", "aten._record_function_exit")


@dataclass(frozen=True)
class StepShape:
    """The measured step's problem size; the widths are always the model's R50 preset's: DETR-R50's
    (`fastdetr.measure.problem.DETR_R50`) or, with model "deformable_detr", Deformable-DETR-R50's
    (the "deformable_detr_resnet50" preset: 4 levels, d 256, FFN 1024, focal head of 91 classes).

    image_sizes: (H, W) per image, padded to the largest of each (DETR's batching);
    num_targets: boxes per image, len(image_sizes) entries; model: one of MODELS.
    """
    enc_layers: int = DETR_R50.enc_layers
    dec_layers: int = DETR_R50.dec_layers
    num_queries: int = DETR_R50.queries
    image_sizes: tuple[tuple[int, int], ...] = ((64, 96), (96, 64))
    num_targets: tuple[int, ...] = (4, 7)
    model: str = "detr"

    def __post_init__(self) -> None:
        if len(self.num_targets) != len(self.image_sizes):
            raise ValueError(f"StepShape: {len(self.image_sizes)} images but {len(self.num_targets)} target counts")
        if self.model not in MODELS:
            raise ValueError(f"StepShape.model: expected one of {MODELS}, got {self.model!r}")

    @property
    def deformable(self) -> bool:
        return self.model == "deformable_detr"

    def describe(self) -> str:
        sizes = ", ".join(f"{h}x{w}" for h, w in self.image_sizes)
        widths = "Deformable-DETR-R50" if self.deformable else "DETR-R50"
        return (f"{widths} widths, {self.enc_layers}+{self.dec_layers} layers, {self.num_queries} queries, "
                f"batch {len(self.image_sizes)} ({sizes}), {'/'.join(map(str, self.num_targets))} targets")


DETR_R50_STEP = StepShape()
QUICK_STEP = StepShape(enc_layers=2, dec_layers=2, num_queries=20)
# 64x96 and 96x64 images give Deformable DETR's four levels (strides 8 / 16 / 32 / 64) 8x12, 4x6, 2x3 and 1x2 maps
DEFORMABLE_R50_STEP = StepShape(num_queries=300, model="deformable_detr")
# The quick one's smaller images (padded 24x24: 3x3, 2x2, 1x1, 1x1 maps) keep the interpreter's MSDA kernels, most
# of its time, affordable; at its two 1x1 levels two reshapes of the flattened maps are views where larger maps copy
DEFORMABLE_QUICK_STEP = StepShape(enc_layers=2, dec_layers=2, num_queries=20, image_sizes=((16, 24), (24, 16)),
                                  model="deformable_detr")
# model -> (its full step, its quick step): what `fastdetr proxies --model M [--quick]` measures
STEPS = {"detr": (DETR_R50_STEP, QUICK_STEP), "deformable_detr": (DEFORMABLE_R50_STEP, DEFORMABLE_QUICK_STEP)}


@dataclass(frozen=True)
class StepProxies:
    """The counts of one training step (module docstring); `launches` and `name` are derived.

    phase_launches: launches per phase, "forward" (model), "criterion" (matcher,
    losses, weighted total) and "backward". op_counts: non-view ATen ops by name;
    launch_counts: Triton launches by kernel name. seconds: the step's wall time,
    through the interpreter for the fused kernels on a CPU (not a GPU's time).
    """
    provider: str                       # "reference", "fastdetr" or "fastdetr-static"
    matcher: str                        # "scipy" or "triton"
    shape: StepShape
    device: str
    aten_ops: int
    allocations: int
    triton_launches: int
    host_syncs: int
    sync_ops: tuple[str, ...]           # what host_syncs counted, in order
    saved_activation_bytes: int
    saved: SavedBytes = field(repr=False)
    phase_launches: dict[str, int] = field(repr=False)
    op_counts: dict[str, int] = field(repr=False)
    launch_counts: dict[str, int] = field(repr=False)
    seconds: float = field(repr=False)
    optimizer_launches: int = 0          # gradient clipping and the AdamW step (module docstring)

    @property
    def launches(self) -> int:
        """Forward, criterion and backward (the phases in PHASES)."""
        return self.aten_ops - self.allocations + self.triton_launches

    @property
    def step_launches(self) -> int:
        """The whole step: `launches` and the optimizer's."""
        return self.launches + self.optimizer_launches

    @property
    def name(self) -> str:
        return f"{self.provider}-{self.matcher}"


def _batch(shape: StepShape, device: torch.device, seed: int) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Random images (3, H, W) and targets: "labels" (n,) among DETR-R50's classes, "boxes" (n, 4) cxcywh
    inside the image. The labels lie in [0, 91): valid for both models' heads."""
    generator = torch.Generator().manual_seed(seed + 1)
    images = [torch.randn(3, h, w, generator=generator).to(device) for h, w in shape.image_sizes]
    targets = []
    for n in shape.num_targets:
        centers = torch.rand(n, 2, generator=generator) * 0.5 + 0.25
        sizes = torch.rand(n, 2, generator=generator) * 0.4 + 0.05
        targets.append({"labels": torch.randint(0, NUM_CLASSES, (n,), generator=generator).to(device),
                        "boxes": torch.cat([centers, sizes], dim=1).to(device)})
    return images, targets


class _HostSolverCopies:
    """Wraps a host solver (scipy) and counts its calls on CPU costs: each is the one device-to-host
    copy of the padded cost blocks that the same call makes on a GPU (`fastdetr.matcher.scipy_solver`)."""

    def __init__(self, solver) -> None:
        self.solver = solver
        self.calls = 0

    def __call__(self, cost: Tensor, num_targets: Sequence[int]):
        if cost.device.type == "cpu":   # a GPU cost's copy is an aten._to_copy the OpCounter sees itself
            self.calls += 1
        return self.solver(cost, num_targets)


class _HostReads(TorchFunctionMode):
    """Counts `Tensor.tolist()` of CPU tensors: on a GPU each is a device-to-host copy the OpCounter sees there
    (an `aten._to_copy`), on a CPU tensor no op at all. In the counted steps they are the reference MSDA's reads
    of spatial_shapes and level_start_index (`fastdetr.reference.deformable_attention.ms_deform_attn`, two per
    call: the official's CUDA op reads one, its assert of the token count)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) == "tolist" and args and args[0].device.type == "cpu":
            self.calls += 1
        return func(*args, **(kwargs or {}))


def step_proxies(fused: bool, matcher: str = "scipy", shape: StepShape = DETR_R50_STEP,
                 device: torch.device | str = "cpu", seed: int = 0, gpu_dropout_on_cpu: bool = True,
                 static: bool = False) -> StepProxies:
    """Count one training step of a model with DETR-R50's widths (module docstring), reference or fused.

    fused: apply `fastdetr.optimize` (same weights). matcher: "scipy" or "triton";
    "triton" runs without the status check that reads the tensor on a CPU, as on
    a GPU. On a CPU the fused kernels need Triton's interpreter (TRITON_INTERPRET=1
    before the first kernel module import); without it the fused layers would
    fall back to the reference math, so this raises instead. Train mode, dropout
    0.1; the weights come from `seed`, the batch from `seed + 1`.
    static: the static-shape step's form (`fastdetr.static`): the batch padded to its 32-px
    size bucket, the targets to num_queries slots, the criterion's `forward_padded`.
    The optimizer phase (clipping at 0.1 and AdamW, `_optimizer`) is counted apart.
    """
    import fastdetr
    from fastdetr.backend import interpreter_enabled
    from fastdetr.matcher import resolve_solver
    from fastdetr.models import build_deformable_model, build_model

    if matcher not in MATCHERS:
        raise ValueError(f"step_proxies: matcher must be one of {MATCHERS}, got {matcher!r}")
    device = torch.device(device)
    if device.type == "cpu" and (fused or matcher == "triton") and not interpreter_enabled():
        raise RuntimeError("step_proxies: the fused kernels run on a CPU only through Triton's interpreter; "
                           "set TRITON_INTERPRET=1 before fastdetr's kernels are imported")

    torch.manual_seed(seed)
    sizes = dict(num_classes=NUM_CLASSES, enc_layers=shape.enc_layers, dec_layers=shape.dec_layers,
                 num_queries=shape.num_queries)
    if shape.deformable:
        model = build_deformable_model(DEFORMABLE_PRESET, **sizes)
    else:
        model = build_model(DETR_R50.preset, **sizes)
    model = model.to(device).train()
    if fused:
        fastdetr.optimize(model)
    # the deformable criterion's FocalHungarianMatcher computes its focal cost in PyTorch whichever solver
    build = build_deformable_criterion if shape.deformable else build_criterion
    criterion = build(model.config, backend=matcher).to(device).train()
    host_copies = None
    if matcher == "scipy":
        host_copies = criterion.matcher.solver = _HostSolverCopies(criterion.matcher.solver)
    else:
        criterion.matcher.solver = resolve_solver("triton", check_invalid=False)
    _warm_caches(model)
    if device.type == "cpu":
        _hide_cpu_only_checks(model)
    images, targets = _batch(shape, device, seed)
    if static:
        images, targets = _static_batch(images, targets, shape, device)
    optimizer, clip = _optimizer(model, fused, device)

    snapshots: dict[str, tuple[int, int, int]] = {}
    kept: list[Tensor] = []   # the loss, so that its graph outlives saved_tensor_bytes for the backward

    def snapshot(phase: str) -> None:
        allocations = sum(ops.op_counts[name] for name in ALLOCATION_OPS)
        snapshots[phase] = (ops.ops, allocations, launches.launches)

    def forward_and_loss(model, criterion, images, targets) -> Tensor:
        outputs = model(images)
        snapshot("forward")
        losses = criterion.forward_padded(outputs, targets) if static else criterion(outputs, targets)
        loss = total_loss(losses, criterion.weight_dict)
        snapshot("criterion")
        kept.append(loss)
        return loss

    dropout = gpu_dropout() if gpu_dropout_on_cpu and device.type == "cpu" else contextlib.nullcontext()
    start = time.perf_counter()
    host_reads = _HostReads() if device.type == "cpu" else contextlib.nullcontext()
    with dropout, host_reads, OpCounter() as ops, TritonLaunchCounter() as launches:
        # model and criterion as arguments: their parameters and buffers count as parameters, not activations
        saved = saved_tensor_bytes(forward_and_loss, model, criterion, images, targets)
        kept.pop().backward()
        snapshot("backward")
    seconds = time.perf_counter() - start
    # The optimizer phase apart, outside the counters above: the reference's per-tensor `step.item()` reads host
    # scalars (foreach AdamW keeps its step counters on the host on a GPU too), not syncs, so its ops count as
    # launches but not as syncs.
    with OpCounter() as optimizer_ops:
        clip()
        optimizer.step()
    optimizer_launches = optimizer_ops.ops - sum(optimizer_ops.op_counts[name] for name in
                                                 (*ALLOCATION_OPS, *OPTIMIZER_HOST_OPS))

    phase_launches, previous = {}, 0
    for phase in PHASES:
        aten_ops, allocations, triton_launches = snapshots[phase]
        phase_launches[phase] = aten_ops - allocations + triton_launches - previous
        previous += phase_launches[phase]
    copies = host_copies.calls if host_copies is not None else 0
    reads = host_reads.calls if isinstance(host_reads, _HostReads) else 0
    sync_ops = (*ops.sync_ops, *["host solver: cost blocks to the host"] * copies,
                *["tolist: values to the host"] * reads)
    return StepProxies(
        provider=_provider(fused, static), matcher=matcher, shape=shape, device=str(device),
        aten_ops=ops.ops, allocations=snapshots["backward"][1], triton_launches=launches.launches,
        host_syncs=len(sync_ops), sync_ops=sync_ops, saved_activation_bytes=saved.activation_bytes, saved=saved,
        phase_launches=phase_launches, op_counts=dict(ops.op_counts), launch_counts=dict(launches.launch_counts),
        seconds=seconds, optimizer_launches=optimizer_launches)


def _warm_caches(model: torch.nn.Module) -> None:
    """What a model's first forward computes once and later forwards reuse, made now, so that the step counted is
    a steady one: FrozenBatchNorm2d's folded statistics (5 ops for each of ResNet-50's 53 in a first forward)."""
    from ..reference.backbone import FrozenBatchNorm2d

    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module._folded()


def _hide_cpu_only_checks(model: torch.nn.Module) -> None:
    """Runs what a module checks on CPU tensors only outside the counters: `fastdetr.nn.MultiScaleDeformableAttention`
    reads its spatial shapes' token count when they are CPU tensors (3 ops and one `aten._local_scalar_dense` per
    call) and not on a GPU, where the step counted runs. The check still runs."""
    from ..nn.deformable_attention import MultiScaleDeformableAttention

    for module in model.modules():
        if isinstance(module, MultiScaleDeformableAttention):
            def check(*args, _check=module._check_inputs, **kwargs):
                with _disable_current_modes():
                    return _check(*args, **kwargs)

            module._check_inputs = check


def _provider(fused: bool, static: bool) -> str:
    return ("fastdetr-static" if static else "fastdetr") if fused else "reference"


def _static_batch(images: list[Tensor], targets: list[dict[str, Tensor]], shape: StepShape, device: torch.device):
    """The batch as the static-shape step takes it: images padded to their 32-px bucket, targets to Q slots."""
    from ..nested import batch_images
    from ..padded import pad_targets
    from ..static import SizeBuckets

    height, width = max(h for h, _ in shape.image_sizes), max(w for _, w in shape.image_sizes)
    bucket = SizeBuckets(32, max(height, width)).bucket(height, width)
    host_targets = [{key: value.cpu() for key, value in target.items()} for target in targets]
    return batch_images(images, bucket), pad_targets(host_targets, shape.num_queries, NUM_CLASSES).to(device)


def _optimizer(model: torch.nn.Module, fused: bool, device: torch.device):
    """(optimizer, clip) with its state already made, so the counted step is a steady one.

    The reference: what the original DETR gets on a GPU, `torch.optim.AdamW` (foreach there) and
    `clip_grad_norm_` (foreach there); fastdetr: `fastdetr.optim`'s fused AdamW and one foreach clipping.
    """
    from ..optim import adamw, clip_grad_norm

    trainable = [p for p in model.parameters() if p.requires_grad]
    if fused:
        optimizer = adamw([{"params": trainable}], lr=1e-4, weight_decay=1e-4, device=device)

        def clip():
            clip_grad_norm(trainable, 0.1)
    else:
        optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=1e-4, foreach=True)

        def clip():
            torch.nn.utils.clip_grad_norm_(trainable, 0.1, foreach=True)
    with torch.no_grad():
        for p in trainable:
            p.grad = torch.zeros_like(p)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer, clip


def measure(shape: StepShape = DETR_R50_STEP, device: torch.device | str = "cpu",
            configurations: Sequence[tuple[str, bool, str, bool]] = CONFIGURATIONS) -> list[StepProxies]:
    """`step_proxies` of each (provider, fused, matcher, static) configuration, in order."""
    return [step_proxies(fused, matcher, shape, device, static=static) for _, fused, matcher, static in configurations]


# ---------------------------------------------------------------------------------------------
# The report `fastdetr proxies` prints
# ---------------------------------------------------------------------------------------------

def format_table(results: Sequence[StepProxies]) -> str:
    """A markdown table, one row per configuration; ratios against the first (the reference)."""
    base = results[0]
    header = ("| provider | matcher | ATen ops | of which allocations | Triton launches | launches "
              "(forward / criterion / backward) | vs first | optimizer launches | step launches | vs first "
              "| host syncs | saved activations MiB | vs first |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for result in results:
        phases = " / ".join(str(result.phase_launches[phase]) for phase in PHASES)
        lines.append(f"| {result.provider} | {result.matcher} | {result.aten_ops} | {result.allocations} "
                     f"| {result.triton_launches} | {result.launches} ({phases}) "
                     f"| {result.launches / base.launches:.2f} | {result.optimizer_launches} "
                     f"| {result.step_launches} | {result.step_launches / base.step_launches:.2f} "
                     f"| {result.host_syncs} "
                     f"| {result.saved_activation_bytes / 2**20:.2f} "
                     f"| {result.saved_activation_bytes / max(base.saved_activation_bytes, 1):.2f} |")
    return header + "\n".join(lines) + "\n"


def run_report(shape: StepShape, device: torch.device | str = "cpu", verbose: bool = False) -> int:
    """`fastdetr proxies`: measure every configuration at `shape` and print the table.

    On a CPU the caller sets TRITON_INTERPRET=1 before the first kernel module is imported (fastdetr.cli
    does). verbose: also list the launches per kernel, the sync ops, and the ATen ops that differ.
    """
    criterion = "DeformableSetCriterion" if shape.deformable else "SetCriterion"
    print(f"one training step (forward, {criterion} with aux losses, backward), train mode, dropout 0.1: "
          f"{shape.describe()}, {device}", flush=True)
    results = []
    for _, fused, matcher, static in CONFIGURATIONS:
        result = step_proxies(fused, matcher, shape, device, static=static)
        results.append(result)
        print(f"  {result.name}: measured in {result.seconds:.1f} s", flush=True)
    print()
    print(format_table(results))
    print("launches = ATen ops (views excluded) - allocations + Triton launches. Host syncs include the scipy "
          "matcher's one copy of the cost blocks to the host, which a GPU makes and a CPU tensor does not"
          + (", and the reference MSDA's two reads of its level shapes per call (tolist), likewise."
             if shape.deformable else "."))
    if verbose:
        for result in results:
            print(f"\n{result.name}: Triton launches {dict(sorted(result.launch_counts.items()))}")
            print(f"{result.name}: host syncs {list(result.sync_ops)}")
        names = sorted(set(results[0].op_counts) | set(results[1].op_counts))
        changed = [(name, results[0].op_counts.get(name, 0), results[1].op_counts.get(name, 0)) for name in names]
        changed = sorted((c for c in changed if c[1] != c[2]), key=lambda c: c[2] - c[1])
        print(f"\nATen ops that differ, {results[0].name} -> {results[1].name}:")
        for name, before, after in changed:
            print(f"  {name:<40} {before:>5} -> {after:>5}")
    return 0
