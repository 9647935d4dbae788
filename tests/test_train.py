"""The trainer, COCO evaluation and prediction: exact resume, DDP on gloo, non-finite stops, config errors.

Every run is tiny (16 synthetic 128-px images, a DETR with d_model 32 and 8 queries) and runs on the CPU.
Dropout is on (0.1) so that the RNG state matters: a resume that restored the weights but not the RNG, or an
evaluation that drew from the training RNG, would change the final weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from fastdetr.checkpoint import CheckpointError
from fastdetr.data import CocoDetection, make_splits
from fastdetr.evaluate import STAT_NAMES, evaluate, evaluate_checkpoint, format_summary
from fastdetr.predict import load_model, predict_files
from fastdetr.train import LIGHT_AUGMENT, NonFiniteLossError, TrainConfig, train

TINY_MODEL = dict(backbone_width=8, hidden_dim=32, nheads=2, enc_layers=1, dec_layers=2, dim_feedforward=64,
                  num_queries=8, dropout=0.1)
NUM_TRAIN, NUM_VAL = 16, 8
STEPS_PER_EPOCH = NUM_TRAIN // 4  # batch_size 4, one process
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The synthetic "easy" set, generated once; `train` finds it complete and reuses it."""
    root = tmp_path_factory.mktemp("data")
    make_splits(root, NUM_TRAIN, NUM_VAL, preset="easy", seed=0)
    return root


def config(data_dir: Path, output_dir: Path, **changes) -> TrainConfig:
    settings = dict(synthetic="easy", data_dir=str(data_dir), num_train=NUM_TRAIN, num_val=NUM_VAL,
                    model="detr_small", model_overrides=TINY_MODEL, augment="light", epochs=3, lr_drop=2,
                    batch_size=4, eval_batch_size=4, num_workers=0, num_threads=1, device="cpu",
                    progress=False, log_every=3, output_dir=str(output_dir))
    return TrainConfig(**{**settings, **changes})


def run(train_config: TrainConfig, step_hook=None) -> dict:
    """`train`, then the process's thread count as it was (the trainer sets it for the run)."""
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the COCO summaries; pytest captures both
            return train(train_config, step_hook)
    finally:
        torch.set_num_threads(threads)


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_identical(actual, expected, where: str = "") -> None:
    """Bit-for-bit equality of nested dicts / lists of tensors and plain values."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected), where
        for key in expected:
            assert_identical(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert_identical(a, e, f"{where}[{index}]")
    elif isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype, where
        assert torch.equal(actual, expected), f"{where}: differs (max abs diff " \
            f"{(actual.double() - expected.double()).abs().max().item():.3g})"
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def assert_stats(stats: dict) -> None:
    assert list(stats) == list(STAT_NAMES)
    for name, value in stats.items():
        assert value == -1.0 or 0.0 <= value <= 1.0, f"{name}={value}"


@pytest.fixture(scope="module")
def baseline(data_dir, tmp_path_factory) -> dict:
    """An uninterrupted 3-epoch run (evaluating after every epoch); its summary, log and final checkpoint."""
    output_dir = tmp_path_factory.mktemp("baseline")
    summary = run(config(data_dir, output_dir))
    return {"summary": summary, "output_dir": output_dir, "log": read_log(output_dir),
            "checkpoint": load(output_dir / "checkpoint.pth")}


class Killed(Exception):
    """Stands in for a kill signal in the middle of an epoch."""


# ---- one process: log, checkpoint, exact resume ------------------------------------------------------

def test_run_writes_log_and_complete_checkpoint(baseline):
    summary, log, checkpoint = baseline["summary"], baseline["log"], baseline["checkpoint"]
    assert summary["epochs"] == 3 and summary["steps"] == 3 * STEPS_PER_EPOCH and summary["stopped"] == "epochs"
    # written atomically: no temporary file left beside the checkpoint
    assert sorted(path.name for path in baseline["output_dir"].iterdir()) == ["checkpoint.pth", "log.jsonl"]
    events = [entry["event"] for entry in log]
    assert events[0] == "config" and events[-1] == "end"
    assert events.count("epoch") == 3 and events.count("eval") == 3  # after epochs 0 and 1, and the final one
    train_entries = [entry for entry in log if entry["event"] == "train"]
    # log_every=3 with 4 batches an epoch: a log point at batch 2 and at the end of the epoch
    assert [(entry["epoch"], entry["batch"], entry["step"]) for entry in train_entries] == \
        [(epoch, batch, epoch * 4 + batch + 1) for epoch in range(3) for batch in (2, 3)]
    for entry in train_entries:
        assert all(math.isfinite(entry[name]) for name in ("loss", "loss_ce", "loss_bbox", "loss_giou"))
        assert entry["loss"] > 0
        # lr_drop=2: the LR is divided by 10 from epoch 2 on
        assert entry["lr"] == pytest.approx(1e-4 if entry["epoch"] < 2 else 1e-5)
    assert checkpoint["epoch"] == 3 and checkpoint["step"] == 12 and checkpoint["world_size"] == 1
    assert checkpoint["scheduler"]["drops"] == 1 and len(checkpoint["rng"]) == 1
    assert checkpoint["eval"] == summary["eval"]
    assert_stats(checkpoint["eval"])
    assert checkpoint["categories"] == {1: "circle", 2: "square", 3: "triangle"}
    assert checkpoint["val_transform"] == {"val_size": LIGHT_AUGMENT.val_size, "max_size": LIGHT_AUGMENT.max_size}


def test_killed_run_resumes_bit_exact(data_dir, baseline, tmp_path):
    def kill(info):
        if info.epoch == 1 and info.batch_index == 2:
            raise Killed

    with pytest.raises(Killed):
        run(config(data_dir, tmp_path), kill)
    interrupted = load(tmp_path / "checkpoint.pth")
    assert interrupted["epoch"] == 1 and interrupted["step"] == STEPS_PER_EPOCH

    summary = run(config(data_dir, tmp_path, resume="auto"))
    assert summary["epochs"] == 3 and summary["steps"] == baseline["summary"]["steps"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint.pth", "log.jsonl"]
    final = load(tmp_path / "checkpoint.pth")
    resumes = [entry for entry in read_log(tmp_path) if entry["event"] == "resume"]
    assert [(entry["epoch"], entry["step"]) for entry in resumes] == [(1, STEPS_PER_EPOCH)]

    expected = baseline["checkpoint"]
    assert any(not torch.equal(final["model"][key], interrupted["model"][key]) for key in final["model"])
    assert_identical(final["model"], expected["model"], "model")
    assert_identical(final["optimizer"], expected["optimizer"], "optimizer")
    assert_identical(final["rng"], expected["rng"], "rng")
    for key in ("scheduler", "scaler", "epoch", "step", "eval"):
        assert final[key] == expected[key], key


def first_format(checkpoint: dict) -> dict:
    """`checkpoint`'s entries in the layout the trainer has written since it was first committed (format_version 1),
    spelt out here so that a change to the writer cannot move the reader along with it."""
    (rng,) = checkpoint["rng"]
    return {
        "model": checkpoint["model"], "config": checkpoint["config"], "format_version": 1,
        "optimizer": checkpoint["optimizer"],
        "scheduler": {key: checkpoint["scheduler"][key] for key in ("gamma", "base_lrs", "drops")},
        "scaler": checkpoint["scaler"], "epoch": checkpoint["epoch"], "step": checkpoint["step"],
        "train_time_s": checkpoint["train_time_s"],
        "rng": [{"torch": rng["torch"],
                 "numpy": {key: rng["numpy"][key] for key in ("keys", "pos", "has_gauss", "cached_gaussian")},
                 "python": {key: rng["python"][key] for key in ("version", "state", "gauss_next")}}],
        "eval": checkpoint["eval"], "world_size": checkpoint["world_size"],
        "categories": checkpoint["categories"], "val_transform": checkpoint["val_transform"],
        "train_config": checkpoint["train_config"],
    }


def test_a_checkpoint_in_the_first_format_resumes_bit_exact(data_dir, baseline, tmp_path):
    """The writer keeps the first format, entry for entry, and a file written in it (plain torch.save, as
    the first trainer's) still continues exactly."""
    def kill(info):
        if info.epoch == 2 and info.batch_index == 0:
            raise Killed

    with pytest.raises(Killed):
        run(config(data_dir, tmp_path, eval_every=0), kill)
    written = load(tmp_path / "checkpoint.pth")
    old = first_format(written)
    assert_identical(written, old, "checkpoint")
    assert list(baseline["checkpoint"]) == list(old)
    torch.save(old, tmp_path / "checkpoint.pth")

    summary = run(config(data_dir, tmp_path, eval_every=0, resume="auto"))
    assert (summary["epochs"], summary["steps"]) == (3, 3 * STEPS_PER_EPOCH)
    final, expected = load(tmp_path / "checkpoint.pth"), baseline["checkpoint"]
    for key in ("model", "optimizer", "rng"):
        assert_identical(final[key], expected[key], key)
    for key in ("scheduler", "scaler", "epoch", "step", "eval"):
        assert final[key] == expected[key], key


def test_evaluation_does_not_change_training(data_dir, baseline, tmp_path):
    # eval_every=0: only the final evaluation; the baseline also evaluated after epochs 0 and 1
    summary = run(config(data_dir, tmp_path, eval_every=0))
    assert [entry["event"] for entry in read_log(tmp_path)].count("eval") == 1
    assert summary["eval"] == baseline["summary"]["eval"]
    assert_identical(load(tmp_path / "checkpoint.pth")["model"], baseline["checkpoint"]["model"], "model")


def test_resuming_a_finished_budgeted_run_trains_nothing(data_dir, tmp_path):
    first = run(config(data_dir, tmp_path, time_budget_s=1e-9, eval_every=0))
    assert first["stopped"] == "time_budget" and first["epochs"] == 1 and first["steps"] == 3  # first log point
    for _ in range(2):
        again = run(config(data_dir, tmp_path, time_budget_s=1e-9, eval_every=0, resume="auto"))
        assert (again["stopped"], again["epochs"], again["steps"]) == ("time_budget", 1, 3)
        checkpoint = load(tmp_path / "checkpoint.pth")
        assert (checkpoint["epoch"], checkpoint["step"]) == (1, 3)


def test_max_steps_stops_mid_epoch_drops_the_lr_by_steps_and_resumes_to_nothing(data_dir, tmp_path):
    """The demo's fixed work: 6 steps (an epoch and a half), the LR drop after half of them, whatever the speed."""
    settings = dict(max_steps=6, lr_drop_fraction=0.5, epochs=10, eval_every=0, channels_last=True)
    summary = run(config(data_dir, tmp_path, **settings))
    assert (summary["stopped"], summary["steps"], summary["epochs"]) == ("max_steps", 6, 2)
    log = read_log(tmp_path)
    drops = [entry for entry in log if entry["event"] == "lr_drop"]
    assert [entry["step"] for entry in drops] == [3] and drops[0]["lr"] == pytest.approx(1e-5)
    assert [entry["step"] for entry in log if entry["event"] == "train"][-1] == 6   # a log point at the last step
    checkpoint = load(tmp_path / "checkpoint.pth")
    assert (checkpoint["epoch"], checkpoint["step"], checkpoint["scheduler"]["drops"]) == (2, 6, 1)
    again = run(config(data_dir, tmp_path, resume="auto", **settings))
    assert (again["stopped"], again["steps"], again["epochs"]) == ("max_steps", 6, 2)
    assert_identical(load(tmp_path / "checkpoint.pth")["model"], checkpoint["model"], "model")


# ---- non-finite losses ------------------------------------------------------------------------------

def test_nan_weights_stop_the_run_naming_the_step(data_dir, tmp_path):
    def poison(info):
        if info.step == STEPS_PER_EPOCH + 1:  # epoch 1, batch 0: the next step's outputs are NaN
            with torch.no_grad():
                info.model.class_embed.weight.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError) as raised:
        run(config(data_dir, tmp_path), poison)
    message = str(raised.value)
    assert f"step {STEPS_PER_EPOCH + 2} (epoch 1, batch 1 of {STEPS_PER_EPOCH}" in message
    assert str(tmp_path / "checkpoint.pth") in message  # the last good checkpoint, from epoch 0
    ids = [int(i) for i in re.search(r"image ids on rank 0: \[([\d, ]+)\]", message).group(1).split(",")]
    assert len(ids) == 4 and all(1 <= i <= NUM_TRAIN for i in ids)


@pytest.mark.parametrize("bad_step", [2, 4])
def test_infinite_loss_stops_the_run_naming_its_step(data_dir, tmp_path, monkeypatch, bad_step):
    """Step 2: the next step's matcher meets the poisoned weights before the log point, which must still name
    step 2. Step 4: found at the log point (log_every=4)."""
    import fastdetr.train as train_module

    calls = []

    def total_loss(loss_dict, weight_dict):
        calls.append(None)
        loss = original(loss_dict, weight_dict)
        return loss * math.inf if len(calls) == bad_step else loss

    original = train_module.total_loss
    monkeypatch.setattr(train_module, "total_loss", total_loss)
    with pytest.raises(NonFiniteLossError, match=rf"non-finite loss at step {bad_step} \(epoch 0, batch "
                                                 rf"{bad_step - 1} of 4; .*loss=inf.*none \(first epoch\)"):
        run(config(data_dir, tmp_path, log_every=4))
    assert not (tmp_path / "checkpoint.pth").exists()


# ---- configuration errors -----------------------------------------------------------------------------

@pytest.mark.parametrize("changes, message", [
    (dict(synthetic=None), "give train_images and train_annotations"),
    (dict(synthetic=None, train_images="images/"), "give train_images and train_annotations"),
    (dict(augment="strong"), "TrainConfig.augment: unknown 'strong'"),
    (dict(amp="fp32"), "TrainConfig.amp: expected auto, bf16, fp16 or off, got 'fp32'"),
    (dict(device="gpu"), "TrainConfig.device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    (dict(epochs=0), "TrainConfig.epochs: expected a positive integer, got 0"),
    (dict(batch_size=0), "TrainConfig.batch_size"),
    (dict(log_every=-1), "TrainConfig.log_every"),
    (dict(time_budget_s=0.0), "TrainConfig.time_budget_s"),
])
def test_config_errors(tmp_path, changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        config(tmp_path / "data", tmp_path / "out", **changes)


def test_run_errors_name_the_problem(data_dir, baseline, tmp_path):
    with pytest.raises(ValueError, match="16 training images give no full batch of 32 per process"):
        run(config(data_dir, tmp_path, batch_size=32))
    with pytest.raises(TypeError, match="unknown DETRConfig field.*num_layers"):
        run(config(data_dir, tmp_path, model_overrides={"num_layers": 2}))
    with pytest.raises(ValueError, match="unknown preset 'detr_tiny'"):
        run(config(data_dir, tmp_path, model="detr_tiny"))
    missing = tmp_path / "nowhere" / "checkpoint.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        run(config(data_dir, tmp_path, resume=str(missing)))
    other_model = {**TINY_MODEL, "num_queries": 5}
    with pytest.raises(CheckpointError, match=r"checkpoint.pth does not fit the model(.|\n)*query_embed.weight"):
        run(config(data_dir, tmp_path, model_overrides=other_model,
                   resume=str(baseline["output_dir"] / "checkpoint.pth")))


def test_cuda_device_without_cuda(data_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: the error is for machines without it")
    with pytest.raises(RuntimeError, match="TrainConfig.device='cuda' but CUDA is not available"):
        run(config(data_dir, tmp_path, device="cuda"))


# ---- two processes (DDP, gloo) ------------------------------------------------------------------------

DDP_HELPER = '''
import contextlib, json, os, sys
import torch
from fastdetr.train import TrainConfig, train

settings, report_dir = json.loads(sys.argv[1]), sys.argv[2]
rank = os.environ["RANK"]
last = {}
with open(os.path.join(report_dir, f"stdout_rank{rank}.txt"), "w") as out, contextlib.redirect_stdout(out):
    summary = train(TrainConfig(**settings), step_hook=lambda info: last.update(model=info.model))
model = last["model"]
torch.save({"state_dict": model.state_dict(), "parameters": [name for name, _ in model.named_parameters()]},
           os.path.join(report_dir, f"model_rank{rank}.pt"))
with open(os.path.join(report_dir, f"summary_rank{rank}.json"), "w") as out:
    json.dump(summary, out)
'''


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_process_ddp_on_gloo(tmp_path):
    """torchrun, 2 processes on the CPU: rank 0 alone writes the set, log and checkpoint; the ranks stay in step."""
    helper, report_dir, output_dir = tmp_path / "helper.py", tmp_path / "report", tmp_path / "out"
    helper.write_text(DDP_HELPER)
    report_dir.mkdir()
    # batch 2 per process: 16 images give 4 steps an epoch on each rank (8 without the DistributedSampler)
    settings = dataclasses.asdict(config(tmp_path / "data", output_dir, epochs=2, batch_size=2, eval_every=1,
                                         num_val=4, num_threads=None))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(helper), json.dumps(settings), str(report_dir)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]

    assert sorted(path.name for path in output_dir.iterdir()) == ["checkpoint.pth", "log.jsonl"]
    log = read_log(output_dir)
    events = [entry["event"] for entry in log]
    # one writer: each event once (two writers would double every line)
    assert events.count("config") == 1 and events.count("end") == 1 and events.count("epoch") == 2
    assert events.count("eval") == 2 and events.count("train") == 4
    assert log[0]["world_size"] == 2
    for entry in log:
        if entry["event"] == "train":
            assert all(math.isfinite(entry[name]) for name in ("loss", "loss_ce", "loss_bbox", "loss_giou"))
    checkpoint = load(output_dir / "checkpoint.pth")
    assert (checkpoint["epoch"], checkpoint["step"], checkpoint["world_size"]) == (2, 8, 2)
    assert len(checkpoint["rng"]) == 2  # every process's RNG, and they differ (per-process streams)
    assert not torch.equal(checkpoint["rng"][0]["torch"], checkpoint["rng"][1]["torch"])

    summaries = [json.loads((report_dir / f"summary_rank{rank}.json").read_text()) for rank in (0, 1)]
    for summary in summaries:
        assert summary["steps"] == 8 and summary["epochs"] == 2
        assert summary["eval"] == checkpoint["eval"]  # rank 0's evaluation, on every rank
    assert_stats(checkpoint["eval"])
    models = [torch.load(report_dir / f"model_rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    # The parameters agree; BatchNorm running stats need not: DDP broadcasts rank 0's at the start of each
    # forward, and each rank then updates them with its own batch.
    names = models[0]["parameters"]
    assert len(names) > 50 and models[1]["parameters"] == names
    assert_identical({name: models[1]["state_dict"][name] for name in names},
                     {name: models[0]["state_dict"][name] for name in names}, "rank 1 vs rank 0")
    assert_identical(checkpoint["model"], models[0]["state_dict"], "checkpoint vs rank 0")

    stdout = [(report_dir / f"stdout_rank{rank}.txt").read_text() for rank in (0, 1)]
    assert "COCO evaluation after epoch 1" in stdout[0] and stdout[1] == ""


# ---- evaluation ----------------------------------------------------------------------------------------

class Oracle(nn.Module):
    """Predicts each image's ground truth (images come in dataset order), the other queries as no-object.

    shift moves every predicted box right by that fraction of the image width.
    """

    def __init__(self, dataset: CocoDetection, num_queries: int, shift: float = 0.0):
        super().__init__()
        self.targets = [dataset[index][1] for index in range(len(dataset))]
        self.num_queries, self.shift, self.seen = num_queries, shift, 0
        self.num_classes = dataset.num_classes

    def forward(self, images) -> dict[str, torch.Tensor]:
        batch_size = images.tensors.shape[0]
        logits = torch.full((batch_size, self.num_queries, self.num_classes + 1), -8.0)
        logits[..., -1] = 8.0
        boxes = torch.rand(batch_size, self.num_queries, 4) * 0.2 + 0.3
        for b, target in enumerate(self.targets[self.seen:self.seen + batch_size]):
            count = len(target["labels"])
            logits[b, torch.arange(count), target["labels"]] = 8.0
            logits[b, :count, -1] = -8.0
            boxes[b, :count] = target["boxes"] + torch.tensor([self.shift, 0.0, 0.0, 0.0])
        self.seen += batch_size
        return {"pred_logits": logits, "pred_boxes": boxes}


def test_evaluate_scores_ground_truth_one_and_scales_to_the_original_size(data_dir):
    # images resized to 96 px for the model: boxes must be scaled to the original 128 px to match
    augment = dataclasses.replace(LIGHT_AUGMENT, val_size=96, max_size=96)
    dataset = CocoDetection(data_dir / "val" / "images", data_dir / "val" / "annotations.json", train=False,
                            augment=augment)
    assert dataset[0][0].shape[-2:] == (96, 96)
    stats = evaluate(Oracle(dataset, num_queries=8), dataset, batch_size=3)
    assert_stats(stats)
    assert stats["AP"] == pytest.approx(1.0) and stats["AR100"] == pytest.approx(1.0)
    assert stats["APl"] == -1.0  # the easy preset's objects are at most 60 px: no large ones
    shifted = evaluate(Oracle(dataset, num_queries=8, shift=0.15), dataset, batch_size=3)
    assert_stats(shifted)
    assert shifted["AP"] < 0.5 * stats["AP"]
    assert len(format_summary(stats).splitlines()) == 12


def test_evaluate_checkpoint_matches_the_run(data_dir, baseline):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the run, so the scores agree bit for bit
    try:
        stats = evaluate_checkpoint(baseline["output_dir"] / "checkpoint.pth", data_dir / "val" / "images",
                                    data_dir / "val" / "annotations.json", batch_size=4)
    finally:
        torch.set_num_threads(threads)
    assert_stats(stats)
    assert stats == pytest.approx(baseline["summary"]["eval"], abs=1e-6)


# ---- prediction on image files -------------------------------------------------------------------------

def test_predict_files_writes_json_and_png(data_dir, baseline, tmp_path):
    images = sorted((data_dir / "val" / "images").iterdir())[:3]
    checkpoint = baseline["output_dir"] / "checkpoint.pth"
    reports = predict_files(images, checkpoint, threshold=0.0, out_dir=tmp_path)
    categories = load_model(checkpoint)[1]["categories"]
    assert len(reports) == len(images)
    for image_path, report in zip(images, reports):
        written = json.loads((tmp_path / f"{image_path.stem}.json").read_text())
        assert written == report
        assert set(report) == {"image", "width", "height", "threshold", "detections"}
        assert report["image"] == str(image_path) and (report["width"], report["height"]) == (128, 128)
        assert report["threshold"] == 0.0
        assert len(report["detections"]) == TINY_MODEL["num_queries"]  # threshold 0 keeps every query
        scores = [detection["score"] for detection in report["detections"]]
        assert scores == sorted(scores, reverse=True) and all(0 < s <= 1 for s in scores)
        for detection in report["detections"]:
            assert set(detection) == {"category_id", "category", "score", "box"}
            assert detection["category"] == categories[detection["category_id"]]
            x0, y0, x1, y1 = detection["box"]
            assert -1e-3 <= x0 <= x1 <= 128 + 1e-3 and -1e-3 <= y0 <= y1 <= 128 + 1e-3
        with Image.open(tmp_path / f"{image_path.stem}.png") as drawn:
            assert drawn.format == "PNG" and drawn.size == (128, 128)
            with Image.open(image_path) as original:  # the boxes were drawn onto it
                assert drawn.convert("RGB").tobytes() != original.convert("RGB").tobytes()


def test_predicted_boxes_are_clipped_to_the_image(baseline, data_dir, tmp_path):
    checkpoint = baseline["checkpoint"]
    model = dict(checkpoint["model"])
    # every query: (cx, cy, w, h) = (0.1, 0.9, 0.5, 0.5), a box crossing the left and bottom borders
    model["bbox_embed.layers.2.weight"] = torch.zeros_like(model["bbox_embed.layers.2.weight"])
    model["bbox_embed.layers.2.bias"] = torch.logit(torch.tensor([0.1, 0.9, 0.5, 0.5]))
    torch.save({**checkpoint, "model": model}, tmp_path / "border.pth")
    image = sorted((data_dir / "val" / "images").iterdir())[0]
    report = predict_files([image], tmp_path / "border.pth", threshold=0.0, out_dir=tmp_path)[0]
    assert len(report["detections"]) == TINY_MODEL["num_queries"]
    for detection in report["detections"]:  # unclipped: [-19.2, 83.2, 44.8, 147.2]
        assert detection["box"] == pytest.approx([0.0, 83.2, 44.8, 128.0], abs=1e-3)


def test_predict_errors_name_the_file(data_dir, baseline, tmp_path):
    image = sorted((data_dir / "val" / "images").iterdir())[0]
    missing = tmp_path / "missing.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(f"checkpoint not found: {missing}")):
        predict_files([image], missing, out_dir=tmp_path / "out")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    with pytest.raises(ValueError, match=re.escape(f"{broken}: cannot read image")):
        predict_files([broken], baseline["output_dir"] / "checkpoint.pth", out_dir=tmp_path / "out")
    not_a_checkpoint = tmp_path / "notes.pth"
    not_a_checkpoint.write_text("hello")
    with pytest.raises(CheckpointError, match=re.escape(f"{not_a_checkpoint}: not a readable PyTorch checkpoint")):
        predict_files([image], not_a_checkpoint, out_dir=tmp_path / "out")


def test_skip_bad_skips_a_corrupt_image_and_counts_it_in_the_log(data_dir, tmp_path):
    """A corrupt training image: an error naming it by default; with skip_bad, a warning, a skip and a count."""
    import shutil
    import warnings

    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    annotations = json.loads((copy / "train" / "annotations.json").read_text())
    broken = copy / "train" / "images" / annotations["images"][3]["file_name"]
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(Exception, match=broken.name):
        run(config(copy, tmp_path / "strict", epochs=1))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        run(config(copy, tmp_path / "lenient", epochs=1, skip_bad=True))
    epochs = [event for event in read_log(tmp_path / "lenient") if event["event"] == "epoch"]
    assert epochs[-1]["skipped"] == {"annotations": 0, "images": 1}


# ---- numeric ranges of the configuration --------------------------------------------------------------

@pytest.mark.parametrize("field, value, expected", [
    ("lr", 0.0, "a positive number"), ("lr", -1e-4, "a positive number"), ("lr", math.nan, "a positive number"),
    ("lr_backbone", -1e-5, "a number >= 0"), ("weight_decay", -0.1, "a number >= 0"),
    ("clip_max_norm", -0.1, "a number >= 0"), ("lr_drop", -3, "an integer >= 0"), ("lr_gamma", 0.0, "positive"),
    ("lr_drop_fraction", 0.0, "in (0, 1]"), ("lr_drop_fraction", 1.5, "in (0, 1]"),
    ("eval_every", -2, "an integer >= 0"), ("eval_batch_size", 0, "a positive integer"),
    ("num_workers", -1, "an integer >= 0"), ("num_threads", 0, "None or a positive integer"),
    ("num_train", 0, "a positive integer"), ("num_val", -5, "a positive integer"),
])
def test_config_rejects_numbers_out_of_range_naming_the_field(tmp_path, field, value, expected):
    with pytest.raises(ValueError, match=re.escape(f"TrainConfig.{field}: expected ") + f".*{re.escape(expected)}.*"
                                         + re.escape(f"got {value!r}")):
        config(tmp_path / "data", tmp_path / "out", **{field: value})


def test_config_accepts_the_edges_of_each_range(tmp_path):
    edges = dict(lr_backbone=0.0, weight_decay=0.0, clip_max_norm=0.0, lr_drop=0, eval_every=0, num_workers=0,
                 num_threads=None, lr_drop_fraction=1.0, eval_batch_size=1, num_train=1, num_val=1)
    made = config(tmp_path / "data", tmp_path / "out", **edges)
    assert all(getattr(made, name) == value for name, value in edges.items())
    # without a synthetic set, num_train / num_val are unused and not checked
    assert TrainConfig(train_images="images", train_annotations="train.json", num_train=0).num_train == 0


# ---- prediction: one output per input, even where file stems repeat --------------------------------------

def test_output_names_tell_apart_inputs_that_share_a_stem(tmp_path):
    from fastdetr.predict import output_names

    a, b = tmp_path / "a" / "img.jpg", tmp_path / "b" / "img.jpg"
    assert output_names([a, tmp_path / "c.jpg"]) == ["img", "c"]  # unique stems stay as they are
    assert output_names([a, b, tmp_path / "c.jpg"]) == ["a__img", "b__img", "c"]
    assert output_names([a, a.with_suffix(".png")]) == ["img.jpg", "img.png"]
    assert output_names([a, b, b.with_suffix(".png")]) == ["a__img", "b__img", "img.png"]
    deep = [tmp_path / "x" / "same" / "img.jpg", tmp_path / "y" / "same" / "img.jpg"]
    assert output_names(deep) == ["x__same__img", "y__same__img"]
    assert output_names([a, str(a), a.parent / "." / "img.jpg"]) == ["img", "img-2", "img-3"]  # one file, thrice
    assert output_names([a, tmp_path / "IMG.png"]) == ["img.jpg", "IMG.png"]  # case-insensitive file systems
    assert output_names([a, tmp_path / "img.jpg.png"]) == ["img", "img.jpg"]
    assert output_names([]) == []


def tiny_checkpoint(path: Path) -> Path:
    """An untrained tiny DETR saved as fastdetr's checkpoints are, with a 64-px validation resize."""
    from fastdetr.models import detr_small

    torch.manual_seed(3)
    model = detr_small(num_classes=3, **TINY_MODEL)
    torch.save({"model": model.state_dict(), "config": model.config.to_dict(), "categories": {1: "a", 2: "b"},
                "val_transform": {"val_size": 64, "max_size": 64}}, path)
    return path


def write_images_sharing_stems(root: Path) -> dict[Path, tuple[int, int]]:
    """Four images, three of them with the stem "img", each of its own size and random content."""
    generator = torch.Generator().manual_seed(11)
    sizes = {root / "a" / "img.jpg": (40, 30), root / "b" / "img.jpg": (44, 36), root / "a" / "img.png": (52, 28),
             root / "c.jpg": (36, 36)}
    for path, (width, height) in sizes.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(path)
    return sizes


def test_predict_files_writes_one_output_per_input_when_stems_repeat(tmp_path):
    sizes = write_images_sharing_stems(tmp_path / "in")
    out = tmp_path / "out"
    reports = predict_files(list(sizes), tiny_checkpoint(tmp_path / "tiny.pth"), threshold=0.0, out_dir=out)
    expected = ["a__img", "b__img", "img.png", "c"]
    assert sorted(path.name for path in out.iterdir()) == sorted(f"{n}.{e}" for n in expected for e in ("json", "png"))
    for (image_path, (width, height)), report, name in zip(sizes.items(), reports, expected):
        assert json.loads((out / f"{name}.json").read_text()) == report and report["image"] == str(image_path)
        assert (report["width"], report["height"]) == (width, height)
        with Image.open(out / f"{name}.png") as drawn:
            assert drawn.size == (width, height)


# ---- bad targets -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("recorded", [False, True], ids=["at once", "recorded"])
def test_a_bad_target_label_stops_the_run_naming_its_image(data_dir, tmp_path, monkeypatch, recorded):
    """At once: the CPU path, from the criterion. Recorded: the GPU path (checked on the device, no sync),
    raised at the next log point (log_every=3) and naming step 2 from the window."""
    import fastdetr.train as train_module
    from fastdetr.criterion import BadTargetError

    bad_ids = []

    def to_device(targets, device):
        if not bad_ids and len(seen) == 1:  # step 2: a label no class has
            targets[1]["labels"][0] = 99
            bad_ids.append(int(targets[1]["image_id"][0]))
        seen.append(None)
        return original_to_device(targets, device)

    seen, original_to_device = [], train_module._to_device
    monkeypatch.setattr(train_module, "_to_device", to_device)
    if recorded:
        original_build = train_module.build_criterion
        monkeypatch.setattr(train_module, "build_criterion",
                            lambda *args, **kwargs: original_build(*args, check_targets=False, **kwargs))
    with pytest.raises(BadTargetError) as raised:
        run(config(data_dir, tmp_path, log_every=3))
    message = str(raised.value)
    assert f"targets[1] (image_id {bad_ids[0]}): label 99 (target 0) is outside [0, " in message
    assert len(seen) == (3 if recorded else 2)  # recorded: found at the log point after step 3
    if recorded:
        assert message.startswith("bad targets at step 2 (epoch 0, batch 1 of 4; image ids on rank 0: [")
        assert "forward 2 of the 3 since the last check" in message and "none (first epoch)" in message
    assert not (tmp_path / "checkpoint.pth").exists()


# ---- two processes, one of them failing ------------------------------------------------------------------

FAILING_HELPER = '''
import os, sys, time
import fastdetr.train as train_module
from fastdetr.train import TrainConfig, train

settings, release, grace = __import__("json").loads(sys.argv[1]), sys.argv[2], float(sys.argv[3])
train_module.PEER_FAILURE_GRACE_S, train_module.FAILURE_POLL_S = grace, 0.2
rank = int(os.environ["RANK"])


def fail_on_rank_1(info):
    if rank == 1 and info.step == 1:
        raise RuntimeError("bad batch on rank 1")


try:
    train(TrainConfig(**settings), step_hook=fail_on_rank_1)
finally:
    while release and not os.path.exists(release):  # a caller that keeps the failed process alive
        time.sleep(0.1)
'''


@pytest.mark.parametrize("failed_process", [
    "exits",
    # the watch's last resort (ending the process); the case above covers the named error every rank raises
    pytest.param("stays alive", marks=pytest.mark.slow),
])
def test_when_one_process_fails_every_process_stops_naming_its_error(data_dir, tmp_path, failed_process):
    """Two gloo processes (launched directly: torchrun would kill the survivor itself, as a multi-node job's
    agents do not); rank 1 raises after its first step while rank 0 goes on to the next collective. Exits:
    rank 0's collective fails when rank 1's process ends; it raises PeerFailedError naming rank 1's error.
    Stays alive: rank 0's collective would wait as long as rank 1 lives; it ends itself, naming the error."""
    import time

    import fastdetr.train as train_module

    release = tmp_path / "release" if failed_process == "stays alive" else ""
    settings = dataclasses.asdict(config(data_dir, tmp_path / "out", epochs=1, batch_size=2, num_threads=1))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "LOCAL_WORLD_SIZE": "2"}
    (tmp_path / "helper.py").write_text(FAILING_HELPER)
    logs = [tmp_path / f"stderr_rank{rank}.txt" for rank in (0, 1)]
    # a short grace where rank 1 stays alive; where it exits, the default, which its exit takes less than
    grace = 2.0 if release else train_module.PEER_FAILURE_GRACE_S
    command = [sys.executable, str(tmp_path / "helper.py"), json.dumps(settings), str(release), str(grace)]
    processes = [subprocess.Popen(command,
                                  env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, cwd=tmp_path,
                                  stdout=subprocess.DEVNULL, stderr=open(logs[rank], "w")) for rank in (0, 1)]
    try:
        deadline = time.monotonic() + 90
        while processes[0].poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert processes[0].poll() is not None, "rank 0 still runs 90 s after the start: it hangs"
        rank1_alive = processes[1].poll() is None
        if release:
            assert rank1_alive  # rank 0 did not wait for rank 1's process to end
            (tmp_path / "release").touch()
        processes[1].wait(timeout=30)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    errors = [log.read_text() for log in logs]
    assert processes[0].returncode != 0 and processes[1].returncode != 0, errors
    assert "RuntimeError: bad batch on rank 1" in errors[1]
    named = "rank 1: RuntimeError: bad batch on rank 1"
    if release:
        assert f"[rank 0] stopping this process: another process failed: {named}" in errors[0], errors[0][-3000:]
    else:
        assert f"PeerFailedError: rank 0 stopped because another process failed first: {named}" in errors[0], \
            errors[0][-3000:]
