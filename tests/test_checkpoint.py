"""Checkpoints: official layout, fastdetr's own files, atomic writes, clear errors on mismatch."""
from __future__ import annotations

import os

import pytest
import torch

import fastdetr
from fastdetr.checkpoint import CheckpointError, atomic_save


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
