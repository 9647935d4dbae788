"""The training step captured as a CUDA graph (fastdetr.static.StaticStep(cuda_graph=True)) on a real GPU.

A graph cannot be captured on a CPU, so everything here is skipped without CUDA (benchmarks/gpu_suite.sh runs
it); the same step runs eagerly on the CPU in tests/test_static.py. Checked: a captured step's losses and
weights follow the eager step's for the same batches (bf16 tolerance); replays make no host sync
(`torch.cuda.set_sync_debug_mode("error")`); two replays on identical inputs draw different dropout masks;
and `fastdetr train --cuda-graph true` captures, replays and learns like the eager static run.
"""
from __future__ import annotations

import contextlib
import copy
import json
import sys

import pytest
import torch

from fastdetr.criterion import build_criterion
from fastdetr.data import make_splits
from fastdetr.models import build_model
from fastdetr.nested import ImageBatch
from fastdetr.optim import adamw
from fastdetr.padded import PaddedTargets
from fastdetr.static import SizeBuckets, StaticCollate, StaticStep
from fastdetr.train import LOGGED, TrainConfig, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")

NUM_CLASSES = 91


def _model(dropout: float):
    torch.manual_seed(0)
    return build_model("detr_small", num_classes=NUM_CLASSES, fused=True, nheads=4, dropout=dropout,
                       num_queries=100).cuda().train()


def _step(model, cuda_graph: bool, lr: float = 1e-4, warmup: int = 2) -> StaticStep:
    criterion = build_criterion(model.config, backend="auto").cuda()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw([{"params": trainable}], lr=lr, weight_decay=1e-4, device=torch.device("cuda"))
    return StaticStep(model, criterion, optimizer, trainable, 0.1, "bf16", LOGGED, cuda_graph=cuda_graph,
                      warmup=warmup)


def _batches(count: int, seed: int = 0):
    """`count` pinned batches of one bucket (448 x 640), 2 images of other sizes and 1..30 targets each."""
    generator = torch.Generator().manual_seed(seed)
    collate = StaticCollate(SizeBuckets(64, 1344), max_targets=40, num_classes=NUM_CLASSES)
    batches = []
    for _ in range(count):
        samples = []
        for _ in range(2):
            height, width = int(torch.randint(385, 449, (), generator=generator)), \
                int(torch.randint(577, 641, (), generator=generator))
            n = int(torch.randint(1, 31, (), generator=generator))
            boxes = torch.cat([torch.rand(n, 2, generator=generator) * 0.6 + 0.2,
                               torch.rand(n, 2, generator=generator) * 0.3 + 0.05], 1)
            samples.append((torch.randn(3, height, width, generator=generator),
                            {"labels": torch.randint(0, NUM_CLASSES, (n,), generator=generator), "boxes": boxes}))
        batch = collate(samples)
        assert batch.bucket == (448, 640)
        # pinned, as the trainer's DataLoader gives them: the step's copies to the device are then asynchronous
        batches.append((ImageBatch(*(t.pin_memory() for t in batch.images)),
                        PaddedTargets(*(t.pin_memory() for t in batch.padded))))
    return batches


def test_captured_step_follows_the_eager_step():
    """Dropout 0: the same batches through the eager step and the captured one (2 warm-up steps, then
    capture and replays) give the same losses and weights, to bf16 tolerance."""
    eager_model = _model(dropout=0.0)
    graph_model = copy.deepcopy(eager_model)
    eager, graphed = _step(eager_model, False), _step(graph_model, True)
    for step, (images, padded) in enumerate(_batches(6)):
        expected = eager(images, padded).clone()
        logged = graphed(images, padded).clone()
        assert torch.isfinite(logged).all(), step
        assert torch.allclose(logged, expected, rtol=2e-2, atol=2e-2), (step, logged, expected)
    assert graphed.counters() == {"eager_steps": 2, "replays": 4, "graphs": 1}
    for (name, p), q in zip(eager_model.named_parameters(), graph_model.parameters()):
        assert torch.allclose(p, q, rtol=1e-2, atol=1e-3), name


def test_replays_make_no_host_sync_and_draw_new_dropout_masks():
    """lr 0 leaves the weights as they are: two replays on one batch differ only by their dropout masks."""
    step = _step(_model(dropout=0.1), True, lr=0.0, warmup=1)
    (images, padded), = _batches(1, seed=1)
    step(images, padded)            # warm-up
    step(images, padded)            # capture, then the first replay
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        first = step(images, padded).clone()
        second = step(images, padded).clone()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert step.counters()["replays"] == 3
    assert torch.isfinite(first).all() and torch.isfinite(second).all()
    assert not torch.equal(first[0], second[0])


def test_train_with_cuda_graphs_learns_like_the_eager_static_run(tmp_path):
    """96-px images (the "tiny" augment): every batch is one bucket, captured after its warm-up steps."""
    make_splits(tmp_path / "data", 64, 8, preset="easy", seed=0)
    logs = {}
    for cuda_graph in (False, True):
        out = tmp_path / f"graph_{cuda_graph}"
        config = TrainConfig(synthetic="easy", data_dir=str(tmp_path / "data"), num_train=64, num_val=8,
                             model="detr_small", model_overrides=dict(nheads=4, dropout=0.0), augment="tiny",
                             epochs=2, batch_size=4, num_workers=0, device="cuda", progress=False, log_every=8,
                             eval_every=0, output_dir=str(out), static_shapes=True, cuda_graph=cuda_graph)
        with contextlib.redirect_stdout(sys.stderr):
            train(config)
        logs[cuda_graph] = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()
                            if json.loads(line)["event"] == "train"]
    eager, graphed = logs[False], logs[True]
    assert graphed[-1]["static"]["graphs"] >= 1 and graphed[-1]["static"]["replays"] > 0
    assert graphed[-1]["loss"] < graphed[0]["loss"]
    for a, b in zip(eager, graphed):
        assert abs(a["loss"] - b["loss"]) <= 0.1 * a["loss"], (a["step"], a["loss"], b["loss"])
