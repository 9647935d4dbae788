"""Checkpoints: official layout, fastdetr's own files, atomic writes, clear errors on mismatch."""
from __future__ import annotations

import os

import pytest
import torch

import fastdetr
from fastdetr.checkpoint import (
    FORMAT_VERSION,
    TRAINING_KEYS,
    CheckpointError,
    atomic_save,
    load_training_state,
    save_training_state,
)


def _randomised(model):
    torch.manual_seed(11)
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.copy_(torch.rand_like(value) * 0.2 + 0.9 if value.dim() == 1 else torch.randn_like(value) * 0.05)
    return model.eval()


def _outputs(model, images):
    with torch.no_grad():
        return model(images)["pred_logits"]


@pytest.fixture
def images():
    torch.manual_seed(12)
    return [torch.randn(3, 64, 80), torch.randn(3, 72, 64)]


def test_save_load_round_trip_rebuilds_the_model(tmp_path, images):
    model = _randomised(fastdetr.detr_small(num_classes=4, pre_norm=True))
    path = fastdetr.save_checkpoint(tmp_path / "run" / "model.pth", model, epoch=3)
    loaded = fastdetr.load_checkpoint(path).eval()
    assert loaded.config == model.config
    torch.testing.assert_close(_outputs(loaded, images), _outputs(model, images), rtol=0, atol=0)
    assert torch.load(path, weights_only=True)["epoch"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["model.pth"]  # no temporary file left behind


def test_official_layout_without_config_is_inferred(tmp_path, images):
    model = _randomised(fastdetr.detr_small(num_classes=6, frozen_batchnorm=True, freeze_stem=True))
    torch.save({"model": model.state_dict()}, tmp_path / "official.pth")
    loaded = fastdetr.load_checkpoint(tmp_path / "official.pth").eval()
    for field in ("num_classes", "backbone", "backbone_width", "hidden_dim", "enc_layers", "dec_layers",
                  "dim_feedforward", "num_queries", "pre_norm", "frozen_batchnorm", "position_embedding"):
        assert getattr(loaded.config, field) == getattr(model.config, field), field
    torch.testing.assert_close(_outputs(loaded, images), _outputs(model, images), rtol=0, atol=0)


def test_r50_config_inferred_from_official_keys():
    config = fastdetr.infer_config(fastdetr.detr_resnet50().state_dict())
    assert config == fastdetr.DETRConfig()


def test_load_into_given_model_and_ddp_prefix(tmp_path, images):
    model = _randomised(fastdetr.detr_small(num_classes=4))
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "ddp.pth")
    target = fastdetr.detr_small(num_classes=4)
    assert fastdetr.load_checkpoint(tmp_path / "ddp.pth", target) is target
    torch.testing.assert_close(_outputs(target.eval(), images), _outputs(model, images), rtol=0, atol=0)


def test_mismatch_names_keys_and_shapes(tmp_path):
    state_dict = fastdetr.detr_small(num_classes=4).state_dict()
    state_dict.pop("query_embed.weight")
    state_dict["extra.weight"] = torch.zeros(2)
    torch.save({"model": state_dict}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as info:
        fastdetr.load_checkpoint(tmp_path / "bad.pth", fastdetr.detr_small(num_classes=9))
    message = str(info.value)
    assert "bad.pth" in message
    assert "missing keys" in message and "query_embed.weight" in message
    assert "unexpected keys" in message and "extra.weight" in message
    assert "class_embed.weight: checkpoint (5, 128) vs model (10, 128)" in message


def test_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        fastdetr.load_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        fastdetr.load_checkpoint(tmp_path / "garbage.pth")
    torch.save({"optimizer": {}}, tmp_path / "nomodel.pth")
    with pytest.raises(CheckpointError, match="no model state_dict"):
        fastdetr.load_checkpoint(tmp_path / "nomodel.pth")


class _NotATensor:
    pass


def test_weights_only_refuses_arbitrary_objects(tmp_path):
    torch.save({"model": {"x": torch.zeros(1)}, "payload": _NotATensor()}, tmp_path / "pickle.pth")
    with pytest.raises(CheckpointError, match="weights_only"):
        fastdetr.load_checkpoint(tmp_path / "pickle.pth")


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "ckpt.pth"
    atomic_save({"a": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_save({"a": Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert os.listdir(tmp_path) == ["ckpt.pth"]


def test_backbone_checkpoint_with_torchvision_names(tmp_path, images):
    donor = _randomised(fastdetr.detr_resnet50()).backbone[0].body
    torchvision_like = dict(donor.state_dict())
    torchvision_like.update({"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    torchvision_like.update({k.replace("running_var", "num_batches_tracked"): torch.tensor(0)
                             for k in donor.state_dict() if k.endswith("running_var")})
    torch.save(torchvision_like, tmp_path / "resnet50.pth")
    model = fastdetr.load_backbone_checkpoint(fastdetr.detr_resnet50(), tmp_path / "resnet50.pth")
    for key, value in donor.state_dict().items():
        assert torch.equal(model.backbone[0].body.state_dict()[key], value), key


def test_atomic_save_gives_the_file_the_usual_permissions(tmp_path):
    """Not mkstemp's owner-only 0600: the mode a plain open() would give (0666 less the umask)."""
    import os
    import stat

    umask = os.umask(0o022)
    try:
        path = atomic_save({"a": torch.randn(3)}, tmp_path / "perm.pth")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def _tiny_model():
    return fastdetr.detr_small(num_classes=1, hidden_dim=32, nheads=2, enc_layers=1, dec_layers=1,
                               dim_feedforward=64, num_queries=4, backbone_width=8)


def _training_state(model):
    """save_training_state's entries (besides the model) as `train` passes them, after one optimizer step."""
    from fastdetr.train import StepLR

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for parameter in model.parameters():
        parameter.grad = torch.full_like(parameter, 0.01)
    optimizer.step()
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    return dict(optimizer=optimizer, scheduler=StepLR(optimizer, 0.1), scaler=scaler, epoch=2, step=7,
                train_time_s=1.5, rng=[{"torch": torch.get_rng_state()}], eval_stats=None, world_size=1,
                categories={1: "a"}, val_transform={"val_size": 64, "max_size": 64}, train_config={"seed": 1})


def test_training_state_round_trip_in_the_fixed_layout(tmp_path):
    model = _tiny_model()
    entries = _training_state(model)
    path = save_training_state(tmp_path / "run" / "checkpoint.pth", model, **entries)
    raw = torch.load(path, weights_only=True)
    assert list(raw) == ["model", "config", "format_version", "optimizer", "scheduler", "scaler", "epoch", "step",
                         "train_time_s", "rng", "eval", "world_size", "categories", "val_transform", "train_config"]
    assert raw["format_version"] == FORMAT_VERSION == 1 and raw["config"] == model.config.to_dict()
    state = load_training_state(path)
    assert set(TRAINING_KEYS) <= set(state)
    assert (state["epoch"], state["step"], state["train_time_s"], state["eval"]) == (2, 7, 1.5, None)
    assert state["scheduler"] == {"gamma": 0.1, "base_lrs": [1e-4], "drops": 0}
    assert state["optimizer"]["state"].keys() == entries["optimizer"].state_dict()["state"].keys()
    for key, value in model.state_dict().items():
        assert torch.equal(state["model"][key], value), key
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pth"]  # written atomically


def test_load_training_state_names_the_file_and_what_is_wrong(tmp_path):
    model = _tiny_model()
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_training_state(tmp_path / "nope.pth")
    torch.save({"model": model.state_dict()}, tmp_path / "official.pth")  # the official DETR files' layout
    with pytest.raises(CheckpointError, match=r"official.pth: not a fastdetr training checkpoint.*'format_version'"):
        load_training_state(tmp_path / "official.pth")
    path = save_training_state(tmp_path / "future.pth", model, **_training_state(model))
    torch.save({**torch.load(path, weights_only=True), "format_version": 2}, path)
    with pytest.raises(CheckpointError, match=r"future.pth: format_version 2, .* version 1"):
        load_training_state(path)
    weights = fastdetr.save_checkpoint(tmp_path / "weights.pth", model)
    with pytest.raises(CheckpointError, match=r"weights.pth: not a training checkpoint, missing 'optimizer', "
                                              r"'scheduler', .*'rng' \(resuming a run reads model, optimizer"):
        load_training_state(weights)
    ddp = {**torch.load(path, weights_only=True), "format_version": 1}
    ddp["model"] = {f"module.{key}": value for key, value in ddp["model"].items()}
    torch.save(ddp, tmp_path / "ddp.pth")
    assert list(load_training_state(tmp_path / "ddp.pth")["model"]) == list(model.state_dict())
