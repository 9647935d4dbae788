"""Training a Deformable DETR: its recipe's defaults and LR groups, an end-to-end run, exact resume, evaluation.

Every run is tiny (16 synthetic 128-px images, deformable_detr_small cut to d_model 32, 1 + 1 layers and
8 queries) and runs on the CPU, for 2 epochs of 4 steps. Dropout is on (0.1) so that the RNG state matters
for the resume.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from fastdetr.data import make_splits
from fastdetr.evaluate import STAT_NAMES, evaluate_checkpoint
from fastdetr.predict import load_model, predict_files
from fastdetr.reference.deformable_detr import DeformableDETR
from fastdetr.train import LINEAR_PROJ_NAMES, TrainConfig, _setup_runtime, _TrainingRun, train

TINY_DEFORMABLE = dict(backbone_width=8, hidden_dim=32, nheads=2, enc_layers=1, dec_layers=1, dim_feedforward=64,
                       num_queries=8, dropout=0.1)
NUM_TRAIN, NUM_VAL = 16, 8
STEPS_PER_EPOCH = NUM_TRAIN // 4  # batch_size 4, one process
DETR_RECIPE = dict(epochs=300, lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4, clip_max_norm=0.1, lr_drop=200)
DEFORMABLE_RECIPE = dict(epochs=50, lr=2e-4, lr_backbone=2e-5, weight_decay=1e-4, clip_max_norm=0.1, lr_drop=40)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The synthetic "easy" set (category ids 1..3), generated once; `train` finds it complete and reuses it."""
    root = tmp_path_factory.mktemp("data")
    make_splits(root, NUM_TRAIN, NUM_VAL, preset="easy", seed=0)
    return root


def config(data_dir: Path, output_dir: Path, **changes) -> TrainConfig:
    """2 epochs, the LR dropped after the first; lr, lr_backbone, weight decay and clipping from the recipe."""
    settings = dict(synthetic="easy", data_dir=str(data_dir), num_train=NUM_TRAIN, num_val=NUM_VAL,
                    model="deformable_detr_small", model_overrides=TINY_DEFORMABLE, augment="light", epochs=2,
                    lr_drop=1, batch_size=4, eval_batch_size=4, num_workers=0, num_threads=1, device="cpu",
                    progress=False, log_every=2, output_dir=str(output_dir))
    return TrainConfig(**{**settings, **changes})


@contextlib.contextmanager
def threads_kept():
    """The process's thread count as it was afterwards (the trainer sets it for the run)."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run(train_config: TrainConfig) -> dict:
    with threads_kept(), contextlib.redirect_stdout(sys.stderr):  # the COCO summaries; pytest captures both
        return train(train_config)


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_stats(stats: dict) -> None:
    assert list(stats) == list(STAT_NAMES)
    for name, value in stats.items():
        assert value == -1.0 or 0.0 <= value <= 1.0, f"{name}={value}"


@pytest.fixture(scope="module")
def baseline(data_dir, tmp_path_factory) -> dict:
    """An uninterrupted 2-epoch run (evaluating after each epoch); its summary, log and final checkpoint."""
    output_dir = tmp_path_factory.mktemp("baseline")
    summary = run(config(data_dir, output_dir))
    return {"summary": summary, "output_dir": output_dir, "log": read_log(output_dir),
            "checkpoint": load(output_dir / "checkpoint.pth")}


# ---- the recipe ----------------------------------------------------------------------------------------

def test_the_recipe_defaults_resolve_per_model_family_and_explicit_values_win():
    deformable = TrainConfig(synthetic="easy", model="deformable_detr_small")
    assert {name: getattr(deformable, name) for name in DEFORMABLE_RECIPE} == DEFORMABLE_RECIPE
    assert TrainConfig(synthetic="easy", model="deformable_detr_resnet50").lr == 2e-4
    detr = TrainConfig(synthetic="easy")
    assert {name: getattr(detr, name) for name in DETR_RECIPE} == DETR_RECIPE
    assert TrainConfig(synthetic="easy", model="detr_resnet50").epochs == 300
    explicit = TrainConfig(synthetic="easy", model="deformable_detr_small", lr=5e-4, epochs=3, clip_max_norm=0.0)
    assert (explicit.lr, explicit.epochs, explicit.clip_max_norm) == (5e-4, 3, 0.0)
    assert (explicit.lr_backbone, explicit.lr_drop) == (2e-5, 40)  # the fields left alone: the recipe's
    # an explicit value is still checked
    with pytest.raises(ValueError, match=re.escape("TrainConfig.lr: expected a positive number, got 0.0")):
        TrainConfig(synthetic="easy", model="deformable_detr_small", lr=0.0)


def test_cuda_graphs_are_refused_for_deformable_detr(tmp_path):
    with pytest.raises(ValueError, match=re.escape("TrainConfig.cuda_graph: not supported yet for Deformable DETR")):
        config(tmp_path / "data", tmp_path / "out", cuda_graph=True)


def test_static_shapes_learn_like_the_dynamic_path(data_dir, tmp_path):
    """The padded step (size buckets, targets in fixed slots, DeformableSetCriterion.forward_padded) against
    the dynamic one from one seed, dropout off: the same losses to padding's effect at every log point."""
    logs = {}
    for static in (False, True):
        out = tmp_path / ("static" if static else "dynamic")
        run(config(data_dir, out, static_shapes=static, model_overrides={**TINY_DEFORMABLE, "dropout": 0.0},
                   epochs=1))
        logs[static] = [entry for entry in read_log(out) if entry["event"] == "train"]
    dynamic, static = logs[False], logs[True]
    assert [e["step"] for e in dynamic] == [e["step"] for e in static] and len(static) == STEPS_PER_EPOCH // 2
    for a, b in zip(dynamic, static):
        assert math.isfinite(b["loss"]) and abs(b["loss"] - a["loss"]) <= 0.05 * a["loss"], (a, b)
    assert static[-1]["static"]["eager_steps"] + static[-1]["static"]["dynamic_batches"] == STEPS_PER_EPOCH
    assert static[-1]["static"]["eager_steps"] > 0 and "static" not in dynamic[-1]


def test_the_optimizer_has_the_official_three_lr_groups(data_dir, tmp_path):
    train_config = config(data_dir, tmp_path)
    with threads_kept():
        training = _TrainingRun(train_config, _setup_runtime(train_config), None)
    assert isinstance(training.model, DeformableDETR)
    named = {id(p): name for name, p in training.model.named_parameters() if p.requires_grad}
    groups = training.optimizer.param_groups
    assert [group["lr"] for group in groups] == pytest.approx([2e-4, 2e-5, 2e-5])
    assert all(group["weight_decay"] == 1e-4 for group in groups)
    rest, backbone, linear_proj = ([named[id(p)] for p in group["params"]] for group in groups)
    assert backbone and all(name.startswith("backbone.") for name in backbone)
    assert linear_proj and all(any(key in name for key in LINEAR_PROJ_NAMES) for name in linear_proj)
    assert "transformer.reference_points.weight" in linear_proj
    assert any(".sampling_offsets." in name for name in linear_proj)
    assert not any(name.startswith("backbone.") or any(key in name for key in LINEAR_PROJ_NAMES) for name in rest)
    assert sorted(rest + backbone + linear_proj) == sorted(named.values())  # every trainable parameter, once
    # the class head has one output per label value: category ids 1..3, so 4
    assert training.model.config.num_classes == training.train_set.num_classes == 4


def test_a_detr_run_keeps_its_two_lr_groups(data_dir, tmp_path):
    train_config = config(data_dir, tmp_path, model="detr_small", lr=None, lr_drop=None, epochs=None,
                          model_overrides=dict(backbone_width=8, hidden_dim=32, nheads=2, enc_layers=1,
                                               dec_layers=1, dim_feedforward=64, num_queries=8))
    with threads_kept():
        training = _TrainingRun(train_config, _setup_runtime(train_config), None)
    assert [group["lr"] for group in training.optimizer.param_groups] == pytest.approx([1e-4, 1e-5])


# ---- a run -------------------------------------------------------------------------------------------

def test_a_run_trains_with_finite_losses_evaluates_and_logs_the_resolved_recipe(baseline):
    summary, log, checkpoint = baseline["summary"], baseline["log"], baseline["checkpoint"]
    assert summary["epochs"] == 2 and summary["steps"] == 2 * STEPS_PER_EPOCH and summary["stopped"] == "epochs"
    logged = log[0]["config"]
    assert log[0]["event"] == "config" and log[0]["num_classes"] == 4
    assert {name: logged[name] for name in DEFORMABLE_RECIPE} == {**DEFORMABLE_RECIPE, "epochs": 2, "lr_drop": 1}
    assert "num_feature_levels" in log[0]["model_config"]
    train_entries = [entry for entry in log if entry["event"] == "train"]
    assert len(train_entries) == 2 * 2  # log_every=2, 4 batches an epoch
    for entry in train_entries:
        assert all(math.isfinite(entry[name]) for name in ("loss", "loss_ce", "loss_bbox", "loss_giou"))
        assert entry["loss"] > 0
        assert entry["lr"] == pytest.approx(2e-4 if entry["epoch"] < 1 else 2e-5)  # lr_drop=1
    assert [entry["event"] for entry in log].count("eval") == 2
    assert_stats(summary["eval"])
    assert checkpoint["eval"] == summary["eval"]
    assert checkpoint["config"]["num_feature_levels"] == 4 and checkpoint["config"]["num_classes"] == 4


def test_a_resumed_run_ends_bit_exact(data_dir, baseline, tmp_path):
    run(config(data_dir, tmp_path, epochs=1, eval_every=0))  # the first epoch, as if the run had stopped there
    summary = run(config(data_dir, tmp_path, resume="auto"))
    assert summary["epochs"] == 2 and summary["steps"] == baseline["summary"]["steps"]
    assert [(entry["epoch"], entry["step"]) for entry in read_log(tmp_path) if entry["event"] == "resume"] == \
        [(1, STEPS_PER_EPOCH)]
    final, expected = load(tmp_path / "checkpoint.pth"), baseline["checkpoint"]
    assert list(final["model"]) == list(expected["model"])
    for key in expected["model"]:
        assert torch.equal(final["model"][key], expected["model"][key]), key
    for group, expected_group in zip(final["optimizer"]["param_groups"], expected["optimizer"]["param_groups"]):
        assert group == expected_group
    for index, state in expected["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(final["optimizer"]["state"][index][name], value), (index, name)
    for key in ("scheduler", "epoch", "step"):
        assert final[key] == expected[key], key


def test_the_checkpoint_loads_evaluates_and_predicts_as_a_deformable_detr(data_dir, baseline, tmp_path):
    checkpoint = baseline["output_dir"] / "checkpoint.pth"
    model, info = load_model(checkpoint)
    assert isinstance(model, DeformableDETR) and info["config"].num_classes == 4
    with threads_kept():
        torch.set_num_threads(1)  # as in the run, so the scores agree
        stats = evaluate_checkpoint(checkpoint, data_dir / "val" / "images", data_dir / "val" / "annotations.json",
                                    batch_size=4)
    assert_stats(stats)
    assert stats == pytest.approx(baseline["summary"]["eval"], abs=1e-6)
    images = sorted((data_dir / "val" / "images").iterdir())[:1]
    (report,) = predict_files(images, checkpoint, threshold=0.0, out_dir=tmp_path)
    # threshold 0: the PostProcess's top (query, class) pairs, min(100, 8 queries x 4 classes)
    assert len(report["detections"]) == 8 * 4
    scores = [detection["score"] for detection in report["detections"]]
    assert scores == sorted(scores, reverse=True) and all(0 < s <= 1 for s in scores)
    assert (tmp_path / f"{images[0].stem}.png").is_file()


def test_save_and_load_checkpoint_rebuild_a_deformable_detr_from_its_config(tmp_path):
    import fastdetr

    model = fastdetr.build_deformable_model("deformable_detr_small", num_classes=4, **TINY_DEFORMABLE)
    path = fastdetr.save_checkpoint(tmp_path / "tiny.pth", model)
    loaded = fastdetr.load_checkpoint(path)
    assert isinstance(loaded, DeformableDETR) and loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
