"""The static-shape step (fastdetr.static, fastdetr.padded): size buckets, padded targets, the padded matcher and
criterion against the dynamic ones, the op trace of a whole step that no batch of a bucket changes, and training
with static shapes against the dynamic path."""
from __future__ import annotations

import contextlib
import copy
import json
import math
import sys

import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from fastdetr.backend import interpreter_enabled, triton_importable
from fastdetr.config import DETRConfig
from fastdetr.criterion import BadTargetError, build_criterion, total_loss
from fastdetr.data import DETR_AUGMENT, SYNTHETIC_AUGMENT, make_splits
from fastdetr.data.transforms import augment_train, train_output_size
from fastdetr.matcher import HungarianMatcher
from fastdetr.models import build_model
from fastdetr.nested import batch_images
from fastdetr.optim import adamw
from fastdetr.padded import PaddedTargets, pad_targets, unpad_targets
from fastdetr.static import (
    COCO_IMAGE_SIZES,
    SizeBuckets,
    StaticCollate,
    StaticStep,
    default_step,
    format_padding_report,
    padding_report,
)
from fastdetr.train import LIGHT_AUGMENT, LOGGED, TrainConfig, train

KERNELS = triton_importable() and interpreter_enabled()
needs_kernels = pytest.mark.skipif(not KERNELS, reason="the device solver is a Triton kernel: on the CPU only "
                                                       "under TRITON_INTERPRET=1")


def _targets(counts, num_classes, generator):
    return [{"labels": torch.randint(0, num_classes, (n,), generator=generator),
             "boxes": torch.cat([torch.rand(n, 2, generator=generator) * 0.6 + 0.2,
                                 torch.rand(n, 2, generator=generator) * 0.3 + 0.05], 1)} for n in counts]


def _outputs(layers, batch, queries, num_classes, generator):
    made = [{"pred_logits": torch.randn(batch, queries, num_classes + 1, generator=generator).requires_grad_(),
             "pred_boxes": (torch.rand(batch, queries, 4, generator=generator) * 0.5 + 0.1).requires_grad_()}
            for _ in range(layers)]
    return {**made[-1], "aux_outputs": made[:-1]} if layers > 1 else dict(made[0]), made


# ---- buckets -------------------------------------------------------------------------------------------

def test_buckets_round_each_side_up_to_the_step_within_the_largest_side():
    buckets = SizeBuckets(128, 1333)
    assert buckets.max_side == 1408
    assert buckets.bucket(800, 1199) == (896, 1280)
    assert buckets.bucket(128, 129) == (128, 256)
    assert buckets.bucket(1408, 1408) == (1408, 1408) and buckets.bucket(1409, 100) is None
    assert len(buckets.sizes()) == 11 * 11 and buckets.sizes()[0] == (128, 128)
    assert default_step(DETR_AUGMENT) == 128 and default_step(SYNTHETIC_AUGMENT) == 32
    assert SizeBuckets.for_augment(LIGHT_AUGMENT) == SizeBuckets(32, 160)
    for step in (0, 48, 100):
        with pytest.raises(ValueError, match="multiple of 32"):
            SizeBuckets(step, 1333)


def test_train_output_size_is_the_augmentations_size():
    """The padding report samples sizes without images; each equals augment_train's output for the same draws."""
    for seed in range(40):
        width, height = [(640, 480), (427, 640), (300, 123), (200, 500)][seed % 4]
        image = Image.new("RGB", (width, height))
        target = {"boxes": torch.tensor([[10.0, 10.0, 60.0, 90.0]]), "labels": torch.tensor([1]),
                  "area": torch.tensor([4000.0]), "iscrowd": torch.tensor([0]), "size": torch.tensor([height, width])}
        out, _ = augment_train(image, target, DETR_AUGMENT, torch.Generator().manual_seed(seed))
        assert train_output_size(width, height, DETR_AUGMENT, torch.Generator().manual_seed(seed)) == \
            (out.height, out.width)


def test_padding_report_counts_the_pixels_buckets_add():
    report = padding_report(DETR_AUGMENT, batch_size=2, batches=300)
    assert report["step"] == 128 and report["buckets_possible"] == 121 and report["unfit_share"] == 0
    assert 1 < report["dynamic_pixels"] < report["static_pixels"]
    assert report["extra_cost"] == pytest.approx(report["static_pixels"] / report["dynamic_pixels"] - 1)
    assert 0 < report["extra_cost"] < 0.3 and 5 < report["buckets_used"] <= 121
    # a finer step pads less; one image size padded to itself costs nothing
    assert padding_report(DETR_AUGMENT, 2, 64, batches=300)["extra_cost"] < report["extra_cost"]
    single = padding_report(DETR_AUGMENT, 1, batches=50, image_sizes=[(640, 480, 1.0)])
    assert single["dynamic_pixels"] == pytest.approx(1.0)
    table = format_padding_report([report, single]).splitlines()
    assert len(table) == 4 and table[2].startswith("| 2 | 128 |")
    assert math.isclose(sum(share for _, _, share in COCO_IMAGE_SIZES), 1.0)


# ---- padded targets --------------------------------------------------------------------------------------

def test_pad_targets_keeps_each_images_targets_first_and_round_trips():
    generator = torch.Generator().manual_seed(0)
    targets = _targets([3, 0, 5], 7, generator)
    padded = pad_targets(targets, 6, 7)
    assert padded.labels.shape == (3, 6) and padded.boxes.shape == (3, 6, 4) and padded.valid.dtype == torch.bool
    assert padded.valid.sum(1).tolist() == [3, 0, 5] and padded.counts.tolist() == [3, 0, 5]
    for original, back in zip(targets, unpad_targets(padded)):
        assert torch.equal(original["labels"], back["labels"]) and torch.equal(original["boxes"], back["boxes"])
    assert torch.isfinite(padded.boxes).all()


def test_pad_targets_errors_name_the_image():
    generator = torch.Generator().manual_seed(1)
    targets = _targets([2, 4], 5, generator)
    with pytest.raises(ValueError, match=r"targets\[1\] has 4 targets, more than max_targets=3"):
        pad_targets(targets, 3, 5)
    targets[1]["labels"][2] = 5
    with pytest.raises(BadTargetError, match=r"targets\[1\].*label 5 \(target 2\) is outside \[0, 5\)"):
        pad_targets(targets, 4, 5)
    with pytest.raises(ValueError, match="max_targets must be a positive integer"):
        pad_targets(targets, 0, 5)


def test_static_collate_pads_to_the_bucket_or_says_why_not():
    generator = torch.Generator().manual_seed(2)
    collate = StaticCollate(SizeBuckets(32, 160), max_targets=4, num_classes=3)
    images = [torch.randn(3, 100, 90, generator=generator), torch.randn(3, 70, 120, generator=generator)]
    batch = collate(list(zip(images, _targets([1, 4], 3, generator))))
    assert batch.bucket == (128, 128) and batch.images.tensors.shape == (2, 3, 128, 128) and batch.reason == ""
    assert batch.images.mask[0, :100, :90].logical_not().all() and batch.images.mask[0, 100:].all()
    assert batch.padded.labels.shape == (2, 4)
    crowded = collate(list(zip(images, _targets([5, 0], 3, generator))))
    assert crowded.padded is None and "5 targets, more than max_targets=4" in crowded.reason
    assert crowded.images.tensors.shape == (2, 3, 100, 120)  # the dynamic path's padding
    large = collate([(torch.randn(3, 200, 64, generator=generator), _targets([1], 3, generator)[0])])
    assert large.padded is None and "exceeds the largest bucket side 160" in large.reason
    with pytest.raises(ValueError, match="smaller than the largest image"):
        batch_images(images, (64, 64))


# ---- matcher and criterion on padded targets -------------------------------------------------------------

BACKENDS = ["scipy", pytest.param("triton", marks=needs_kernels)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_match_padded_is_match_layers(backend):
    generator = torch.Generator().manual_seed(3)
    num_classes, layers, batch, queries = 9, 3, 4, 13
    outputs, _ = _outputs(layers, batch, queries, num_classes, generator)
    targets = _targets([5, 0, 13, 1], num_classes, generator)
    matcher = HungarianMatcher(backend=backend)
    expected = matcher.match_layers(outputs, targets)
    logits = torch.stack([layer["pred_logits"] for layer in [*outputs["aux_outputs"], outputs]])
    boxes = torch.stack([layer["pred_boxes"] for layer in [*outputs["aux_outputs"], outputs]])
    col_for_row = matcher.match_padded(logits, boxes, pad_targets(targets, 13, num_classes))
    assert col_for_row.shape == (layers, batch, queries) and col_for_row.dtype == torch.int64
    for layer in range(layers):
        for image, (pred_idx, tgt_idx) in enumerate(expected[layer]):
            row = col_for_row[layer, image]
            assert torch.equal((row >= 0).nonzero().flatten(), pred_idx)
            assert torch.equal(row[pred_idx], tgt_idx)
    with pytest.raises(ValueError, match="max_targets must be at most num_queries"):
        matcher.match_padded(logits, boxes, pad_targets(targets, 14, num_classes))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_block_gets_the_diagonal_or_raises(backend):
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 2, 6, 4, generator=generator)
    logits[1, 0, 2, 1] = float("nan")
    boxes = torch.rand(2, 2, 6, 4, generator=generator) * 0.5 + 0.2
    targets = pad_targets(_targets([3, 2], 3, generator), 4, 3)
    matcher = HungarianMatcher(backend=backend)
    col_for_row = matcher.match_padded(logits, boxes, targets, check_invalid=False)
    assert col_for_row[1, 0].tolist() == [0, 1, 2, -1, -1, -1]   # layer 1, image 0: three targets
    assert (col_for_row[0] >= 0).sum(1).tolist() == [3, 2] and (col_for_row[1, 1] >= 0).sum() == 2
    with pytest.raises(ValueError, match="invalid"):
        matcher.match_padded(logits, boxes, targets, check_invalid=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("counts, layers", [([4, 0, 9], 3), ([0, 0], 2), ([7], 1), ([1, 20, 3], 6)])
def test_forward_padded_equals_forward(backend, counts, layers):
    """Same keys in the same order, the same losses and gradients (float32 sums in another order)."""
    generator = torch.Generator().manual_seed(sum(counts) + layers)
    num_classes, queries = 7, 20
    criterion = build_criterion(DETRConfig(num_classes=num_classes, dec_layers=layers, aux_loss=layers > 1),
                                backend=backend)
    outputs, made = _outputs(layers, len(counts), queries, num_classes, generator)
    targets = _targets(counts, num_classes, generator)
    expected = criterion(outputs, targets)
    losses = criterion.forward_padded(outputs, pad_targets(targets, 20, num_classes))
    assert list(losses) == list(expected)
    for name, value in expected.items():
        assert torch.isfinite(losses[name]) and torch.allclose(losses[name], value, rtol=1e-6, atol=1e-6), name
    inputs = [tensor for layer in made for tensor in layer.values()]
    grads = torch.autograd.grad(total_loss(losses, criterion.weight_dict), inputs)
    expected_grads = torch.autograd.grad(total_loss(expected, criterion.weight_dict), inputs)
    for grad, expected_grad in zip(grads, expected_grads):
        assert torch.allclose(grad, expected_grad, rtol=1e-5, atol=1e-7)


def test_forward_padded_keeps_the_criterions_subset_of_losses():
    generator = torch.Generator().manual_seed(5)
    criterion = build_criterion(DETRConfig(num_classes=4, dec_layers=2))
    criterion.losses = ["boxes"]
    outputs, _ = _outputs(2, 2, 8, 4, generator)
    targets = _targets([2, 3], 4, generator)
    losses = criterion.forward_padded(outputs, pad_targets(targets, 5, 4))
    assert list(losses) == ["loss_bbox", "loss_giou", "loss_bbox_0", "loss_giou_0"] == list(criterion(outputs,
                                                                                                      targets))


# ---- the whole step: one op trace per bucket, no sync ------------------------------------------------------

# ops that read a value on the host or give an output whose shape depends on values
SYNCING = ("_local_scalar_dense", "item", "nonzero", "masked_select", "unique", "is_nonzero", "equal",
           "allclose", "_assert_async", "repeat_interleave", "bincount")


class OpTrace(TorchDispatchMode):
    """Every op dispatched, as (name, input and output shapes and dtypes); fastdetr's custom ops are one op each."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if str(func).startswith("profiler."):  # record_function markers: no work
            return out
        flat = torch.utils._pytree.tree_leaves((args, kwargs, out))
        self.ops.append((str(func), tuple((tuple(t.shape), t.dtype) for t in flat if isinstance(t, torch.Tensor))))
        return out


def _trace_step(step, images, targets, collate):
    batch = collate(list(zip(images, targets)))
    assert batch.padded is not None
    with OpTrace() as trace:
        logged = step(batch.images, batch.padded)
    assert torch.isfinite(logged).all()
    return trace.ops, batch.bucket


@needs_kernels
def test_one_bucket_gives_one_op_trace_with_no_syncing_op():
    """Two batches of one bucket, with other image sizes and target counts: the same ops with the same shapes
    and dtypes, forward, matcher (the device solver), losses, backward, clipping and AdamW; nothing syncs."""
    torch.manual_seed(0)
    num_classes = 4
    # head dim 32, which the attention kernel takes
    model = build_model("detr_small", num_classes=num_classes, fused=True, hidden_dim=64, nheads=2,
                        dim_feedforward=128, dropout=0.1, enc_layers=1, dec_layers=2, num_queries=10,
                        backbone_width=8).train()
    criterion = build_criterion(model.config, backend="triton")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw([{"params": trainable}], lr=1e-4, weight_decay=1e-4, device=torch.device("cpu"))
    step = StaticStep(model, criterion, optimizer, trainable, 0.1, None, LOGGED)
    collate = StaticCollate(SizeBuckets(32, 160), max_targets=6, num_classes=num_classes)
    generator = torch.Generator().manual_seed(1)
    first = ([torch.randn(3, 100, 90, generator=generator), torch.randn(3, 75, 128, generator=generator)],
             _targets([3, 1], num_classes, generator))
    second = ([torch.randn(3, 128, 99, generator=generator), torch.randn(3, 97, 120, generator=generator)],
              _targets([0, 6], num_classes, generator))
    _trace_step(step, *second, collate)  # the first step creates the gradients and the optimizer state
    trace_a, bucket_a = _trace_step(step, *first, collate)
    trace_b, bucket_b = _trace_step(step, *second, collate)
    assert bucket_a == bucket_b == (128, 128)
    names = [name for name, _ in trace_a]
    assert trace_a == trace_b
    assert any("fastdetr.assignment" in name for name in names) and any("attention_fwd" in name for name in names)
    assert any("_fused_adamw" in name for name in names)
    syncing = sorted({name for name in names if name.split(".")[1] in SYNCING})
    assert not syncing, syncing
    # the dynamic path's trace does follow the target counts: the invariance above is the padding's doing
    dynamic = [OpTrace(), OpTrace()]
    for mode, (images, targets) in zip(dynamic, (first, second)):
        with mode:
            outputs = model(batch_images(images, (128, 128)))
            total_loss(criterion(outputs, targets), criterion.weight_dict).backward()
    assert dynamic[0].ops != dynamic[1].ops


def test_cuda_graph_needs_what_a_captured_step_can_hold():
    model = build_model("detr_small", num_classes=3, backbone_width=8, hidden_dim=32, nheads=2, enc_layers=1,
                        dec_layers=1, dim_feedforward=64, num_queries=4)
    criterion = build_criterion(model.config, backend="scipy")
    trainable = list(model.parameters())
    optimizer = adamw([{"params": trainable}], lr=1e-4, weight_decay=1e-4, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"on cpu, and CUDA graphs need a CUDA device.*fp16.*'scipy' solver"):
        StaticStep(model, criterion, optimizer, trainable, 0.1, "fp16", LOGGED, cuda_graph=True)


# ---- training --------------------------------------------------------------------------------------------

TINY_MODEL = dict(backbone_width=8, hidden_dim=32, nheads=2, enc_layers=1, dec_layers=2, dim_feedforward=64,
                  num_queries=8, dropout=0.1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_splits(root, 48, 8, preset="easy", seed=0)
    return root


def _config(data_dir, output_dir, **changes) -> TrainConfig:
    settings = dict(synthetic="easy", data_dir=str(data_dir), num_train=48, num_val=8, model="detr_small",
                    model_overrides=TINY_MODEL, augment="light", epochs=2, lr_drop=100, batch_size=4,
                    eval_batch_size=4, num_workers=0, num_threads=1, device="cpu", progress=False, log_every=4,
                    eval_every=0, output_dir=str(output_dir))
    return TrainConfig(**{**settings, **changes})


def _run(config):
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return train(config)
    finally:
        torch.set_num_threads(threads)


def _train_log(output_dir):
    entries = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    return [entry for entry in entries if entry["event"] == "train"]


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """The same short run (24 steps, same seed), dynamic and static; the static one's output folder."""
    out = {}
    for static in (False, True):
        output_dir = tmp_path_factory.mktemp(f"static_{static}")
        _run(_config(data_dir, output_dir, static_shapes=static, lr=5e-4))
        out[static] = output_dir
    return out


# The static step pads images to 32-px buckets: the model sees more padding than on the dynamic path, so its
# losses are close, not equal. Mean loss over each log window within this fraction of the dynamic run's.
LEARNING_TOLERANCE = 0.05


def test_static_shapes_learn_like_the_dynamic_path(runs):
    dynamic, static = _train_log(runs[False]), _train_log(runs[True])
    assert [e["step"] for e in dynamic] == [e["step"] for e in static] == list(range(4, 25, 4))
    for a, b in zip(dynamic, static):
        assert abs(b["loss"] - a["loss"]) <= LEARNING_TOLERANCE * a["loss"], (a["step"], a["loss"], b["loss"])
    assert static[-1]["loss"] < static[0]["loss"] and dynamic[-1]["loss"] < dynamic[0]["loss"]
    assert static[-1]["static"] == {"eager_steps": 24, "replays": 0, "graphs": 0, "dynamic_batches": 0}
    assert "static" not in dynamic[-1]


def test_static_run_resumes_bit_exact(data_dir, runs, tmp_path):
    class Killed(Exception):
        pass

    def kill(info):
        if info.epoch == 1 and info.batch_index == 3:
            raise Killed

    config = _config(data_dir, tmp_path, static_shapes=True, lr=5e-4)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(Killed), contextlib.redirect_stdout(sys.stderr):
            train(config, kill)
    finally:
        torch.set_num_threads(threads)
    _run(_config(data_dir, tmp_path, static_shapes=True, lr=5e-4, resume="auto"))
    final = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    expected = torch.load(runs[True] / "checkpoint.pth", weights_only=True)
    for key, value in expected["model"].items():
        assert torch.equal(final["model"][key], value), key


def test_batches_that_fit_no_bucket_run_dynamically_and_are_counted(data_dir, tmp_path):
    _run(_config(data_dir, tmp_path, static_shapes=True, max_targets=1, epochs=1))
    counts = _train_log(tmp_path)[-1]["static"]
    assert counts["dynamic_batches"] > 0 and counts["eager_steps"] + counts["dynamic_batches"] == 12


@pytest.mark.parametrize("changes, message", [
    (dict(max_targets=0), "max_targets: expected None or a positive integer"),
    (dict(bucket_step=48), "bucket_step: expected None or a positive multiple of 32"),
])
def test_static_config_errors(data_dir, tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        _config(data_dir, tmp_path, static_shapes=True, **changes)


def test_static_config_checks_the_model(data_dir, tmp_path):
    assert _config(data_dir, tmp_path, cuda_graph=True).static_shapes
    with pytest.raises(ValueError, match="max_targets=9 exceeds the model's num_queries=8"):
        _run(_config(data_dir, tmp_path, static_shapes=True, max_targets=9))
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        _run(_config(data_dir, tmp_path, cuda_graph=True))


def test_padded_targets_move_as_one():
    padded = PaddedTargets(torch.zeros(1, 2, dtype=torch.int64), torch.rand(1, 2, 4), torch.ones(1, 2, dtype=bool))
    assert all(t.device.type == "cpu" for t in padded.to("cpu"))


def test_buckets_command_prints_the_padding_table(capsys):
    from fastdetr.cli import main as cli

    assert cli(["buckets", "--batches", "30", "--batch-sizes", "2", "--steps", "64", "128"]) == 0
    out = capsys.readouterr().out
    assert "COCO_IMAGE_SIZES" in out and "| 2 | 64 |" in out and "| 2 | 128 |" in out
    with pytest.raises(SystemExit, match="unknown --augment 'coco'"):
        cli(["buckets", "--augment", "coco"])


# ---- the graph bookkeeping, on a CPU ---------------------------------------------------------------------

class _FakeStream:
    def wait_stream(self, other):
        pass


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on a CPU: "capturing" runs the step once with the weights, optimizer
    state and RNG put back afterwards (a capture records, it does not run), and each replay runs it again on the
    captured static inputs, writing into the captured output, as a graph's replay would."""

    capturing: list = []

    def __init__(self):
        self.call = None

    def replay(self):
        args, output, step = self.call
        output.copy_(step(*args))

    def pool(self):
        return "pool"


@contextlib.contextmanager
def _fake_capture(graph, pool=None):
    _FakeGraph.capturing.append(graph)
    try:
        yield
    finally:
        _FakeGraph.capturing.pop()


def test_graph_bookkeeping_warms_up_captures_once_per_bucket_and_replays_on_new_inputs(monkeypatch):
    """The capture path's Python (what tests/test_gpu_graph.py checks on a GPU), with the CUDA calls faked:
    warm-up steps per bucket, one capture per bucket into one pool, replays that copy each batch into the static
    inputs; the logged losses are an eager StaticStep's for the same batches."""
    torch.manual_seed(0)
    model = build_model("detr_small", num_classes=3, backbone_width=8, hidden_dim=32, nheads=2, enc_layers=1,
                        dec_layers=2, dim_feedforward=64, num_queries=6, dropout=0.0)
    eager_model = copy.deepcopy(model)

    def make(m, graphs):
        criterion = build_criterion(m.config, backend="scipy")
        trainable = [p for p in m.parameters() if p.requires_grad]
        optimizer = adamw([{"params": trainable}], lr=1e-3, weight_decay=1e-4, device=torch.device("cpu"))
        step = StaticStep(m, criterion, optimizer, trainable, 0.1, None, LOGGED, warmup=2)
        step.cuda_graph = graphs  # past _check_capturable, which wants CUDA
        return step

    graphed, eager = make(model, True), make(eager_model, False)
    real_step = graphed.step

    def step(*args):
        if not _FakeGraph.capturing:
            return real_step(*args)
        saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(graphed.optimizer.state_dict()),
                 torch.get_rng_state())
        output = real_step(*args)
        model.load_state_dict(saved[0])
        graphed.optimizer.load_state_dict(saved[1])
        torch.set_rng_state(saved[2])
        _FakeGraph.capturing[-1].call = (args, output, real_step)
        return output

    monkeypatch.setattr(graphed, "step", step)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", _fake_capture)
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())

    generator = torch.Generator().manual_seed(3)
    collate = StaticCollate(SizeBuckets(32, 160), max_targets=4, num_classes=3)
    sizes = [(100, 100), (64, 60), (120, 97), (60, 50), (99, 128), (40, 64), (128, 128), (64, 64)]  # 2 buckets
    for index, (height, width) in enumerate(sizes):
        images = [torch.randn(3, height, width, generator=generator),
                  torch.randn(3, height - 7, width, generator=generator)]
        batch = collate(list(zip(images, _targets([index % 4 + 1, 1], 3, generator))))
        expected = eager(batch.images, batch.padded).clone()
        logged = graphed(batch.images, batch.padded).clone()
        assert torch.allclose(logged, expected, rtol=1e-5, atol=1e-6), (index, logged, expected)
    # buckets (128, 128) and (64, 64) alternate: 2 warm-up steps each, then a capture (and its replay) each,
    # then the remaining 2 batches replay
    assert graphed.counters() == {"eager_steps": 4, "replays": 4, "graphs": 2}
    assert len(graphed.graph_buckets) == 2 and graphed.pool == "pool"
    for p, q in zip(model.parameters(), eager_model.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)


def test_a_capturable_optimizers_learning_rate_is_a_device_tensor_the_schedule_fills():
    from fastdetr.static import make_capturable
    from fastdetr.train import StepLR

    parameter = torch.nn.Parameter(torch.randn(3))
    optimizer = torch.optim.AdamW([{"params": [parameter], "lr": 2e-4}], lr=2e-4)
    schedule = StepLR(optimizer, 0.1)
    make_capturable(optimizer, torch.device("cpu"))
    lr = optimizer.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and optimizer.param_groups[0]["capturable"]
    schedule.set_drops(1)
    assert optimizer.param_groups[0]["lr"] is lr  # filled in place: what a replayed graph reads
    assert lr.item() == pytest.approx(2e-5) and schedule.base_lrs == [2e-4]
