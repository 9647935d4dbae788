"""The `fastdetr` command: train, eval, predict and demo end to end on tiny synthetic sets, and its errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from fastdetr.cli import build_parser, main

# A detr_small shrunk further so that a CLI run takes seconds on two cores.
TINY_MODEL = json.dumps({"num_queries": 6, "enc_layers": 1, "dec_layers": 2, "hidden_dim": 64,
                         "dim_feedforward": 128, "nheads": 2})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """One CLI training run (1 epoch of 8 images): its output folder, checkpoint and data folder."""
    root = tmp_path_factory.mktemp("cli")
    out, data = root / "run", root / "data"
    code = main(["train", "--synthetic", "easy", "--data-dir", str(data), "--num-train", "8", "--num-val", "4",
                 "--model-overrides", TINY_MODEL, "--epochs", "1", "--batch-size", "2", "--num-workers", "0",
                 "--device", "cpu", "--output-dir", str(out), "--progress", "false", "--log-every", "2",
                 "--augment", "light"])
    assert code == 0
    return {"out": out, "checkpoint": out / "checkpoint.pth", "data": data}


def test_train_writes_a_checkpoint_and_a_log(trained, capsys):
    assert trained["checkpoint"].is_file()
    events = [json.loads(line) for line in (trained["out"] / "log.jsonl").read_text().splitlines()]
    kinds = [event["event"] for event in events]
    assert kinds[0] == "config" and "train" in kinds and "eval" in kinds and kinds[-1] == "end"
    config = events[0]["config"]
    assert config["num_train"] == 8 and config["model_overrides"]["num_queries"] == 6 and config["progress"] is False


def test_every_train_config_field_is_a_flag():
    from fastdetr.train import TrainConfig

    args = build_parser().parse_args(["train", "--synthetic", "demo", "--time-budget-s", "12.5", "--resume", "none",
                                      "--num-threads", "3", "--model-overrides", '{"num_queries": 7}'])
    assert args.time_budget_s == 12.5 and args.resume is None and args.num_threads == 3
    assert args.model_overrides == {"num_queries": 7}
    for field in TrainConfig.__dataclass_fields__:
        assert hasattr(args, field), field


def test_train_rejects_bad_flags(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--progress", "maybe"])
    assert main(["train", "--epochs", "2"]) == 2  # no data given
    assert "train_images" in capsys.readouterr().err


def test_eval_prints_the_coco_summary(trained, capsys, tmp_path):
    val = trained["data"] / "val"
    stats_file = tmp_path / "stats.json"
    code = main(["eval", "--checkpoint", str(trained["checkpoint"]), "--images", str(val / "images"),
                 "--annotations", str(val / "annotations.json"), "--device", "cpu", "--json", str(stats_file)])
    assert code == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "maxDets" in line]
    assert len(lines) == 12
    stats = json.loads(stats_file.read_text())
    assert set(stats) >= {"AP", "AP50", "AR100"} and all(-1 <= v <= 1 for v in stats.values())


def test_predict_writes_json_and_png(trained, capsys, tmp_path):
    images = sorted((trained["data"] / "val" / "images").iterdir())[:2]
    code = main(["predict", *map(str, images), "--checkpoint", str(trained["checkpoint"]), "--threshold", "0",
                 "--out", str(tmp_path), "--device", "cpu"])
    assert code == 0
    for image in images:
        report = json.loads((tmp_path / f"{image.stem}.json").read_text())
        assert report["image"] == str(image) and report["detections"], report
        width, height = report["width"], report["height"]
        for detection in report["detections"]:
            x0, y0, x1, y1 = detection["box"]
            assert -1e-3 <= x0 <= x1 <= width + 1e-3 and -1e-3 <= y0 <= y1 <= height + 1e-3
            assert 0 <= detection["score"] <= 1 and isinstance(detection["category"], str)
        with Image.open(tmp_path / f"{image.stem}.png") as drawn:
            assert drawn.size == (width, height)


def test_predict_names_a_missing_checkpoint_and_a_bad_image(trained, capsys, tmp_path):
    image = next((trained["data"] / "val" / "images").iterdir())
    assert main(["predict", str(image), "--checkpoint", str(tmp_path / "nope.pth"), "--out", str(tmp_path)]) == 1
    assert "nope.pth" in capsys.readouterr().err
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    assert main(["predict", str(broken), "--checkpoint", str(trained["checkpoint"]), "--out", str(tmp_path),
                 "--device", "cpu"]) == 1
    assert "broken.jpg" in capsys.readouterr().err


def test_demo_trains_evaluates_and_draws(tmp_path, capsys):
    """The demo's whole pipeline on a few steps (the figures come from the real run, see README)."""
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--data-dir", str(tmp_path / "data"), "--steps", "6",
                 "--num-train", "32", "--num-val", "4", "--device", "cpu", "--no-progress"])
    assert code == 0
    for name in ("loss_curve.png", "predictions.png", "checkpoint.pth", "log.jsonl"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    with Image.open(out / "loss_curve.png") as curve:
        assert curve.width > 400
    printed = capsys.readouterr().out
    assert "AP50 =" in printed and "trained 6 steps (2 epochs)" in printed  # fixed work: 6 steps, 4 per epoch


def test_smoke_runs_inference_and_counts_syncs(capsys):
    assert main(["smoke", "--presets", "detr_small", "--size", "64", "--repeat", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "detr_small" in out and "0 host syncs" in out and "pred_logits (2, 20, 92)" in out


def test_info_names_the_backend(capsys):
    assert main(["info"]) == 0
    assert "torch" in capsys.readouterr().out


def test_predict_gives_inputs_that_share_a_stem_their_own_outputs(tmp_path, capsys):
    import torch

    import fastdetr

    torch.manual_seed(5)
    model = fastdetr.detr_small(num_classes=2, **json.loads(TINY_MODEL))
    checkpoint = tmp_path / "tiny.pth"
    torch.save({"model": model.state_dict(), "config": model.config.to_dict(),
                "val_transform": {"val_size": 64, "max_size": 64}}, checkpoint)
    generator = torch.Generator().manual_seed(6)
    images = [tmp_path / "left" / "img.jpg", tmp_path / "right" / "img.jpg", tmp_path / "left" / "img.png"]
    for index, path in enumerate(images):
        path.parent.mkdir(exist_ok=True)
        pixels = torch.randint(0, 256, (32 + 4 * index, 40, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(path)
    out = tmp_path / "out"
    assert main(["predict", *map(str, images), "--checkpoint", str(checkpoint), "--threshold", "0",
                 "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    for image, name in zip(images, ["left__img", "right__img", "img.png"]):
        assert json.loads((out / f"{name}.json").read_text())["image"] == str(image)
        assert f"{image} -> {name}.json, {name}.png: " in printed
    assert len(list(out.iterdir())) == 6


# ---- fastdetr bench: the runner lives in the source checkout, not in the installed package ----------------------

def test_bench_without_a_source_checkout_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("fastdetr.cli.SOURCE_ROOT", tmp_path)   # as installed: no benchmarks/ beside the package
    assert main(["bench", "--list"]) == 2
    err = capsys.readouterr().err
    assert "fastdetr bench" in err and "source checkout" in err and "pip install -e ." in err


def test_bench_runs_the_checkouts_runner_with_every_argument(tmp_path, monkeypatch, capsys):
    (tmp_path / "setup.py").write_text("")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "run.py").write_text("def main(argv):\n    print('runner', argv)\n    return 3\n")
    monkeypatch.setattr("fastdetr.cli.SOURCE_ROOT", tmp_path)
    assert main(["bench", "--quick", "--out", "x"]) == 3
    assert "runner ['--quick', '--out', 'x']" in capsys.readouterr().out


# ---- the measurement verbs: fastdetr proxies / memory / kernel-report, and their `python -m` aliases -------------

@pytest.mark.parametrize("module, verb, flag", [("fastdetr.proxies", "proxies", "--enc-layers"),
                                                ("fastdetr.memory", "memory", "--source"),
                                                ("fastdetr.kernels.report", "kernel-report", "--alignments")])
def test_measurement_verbs_and_their_module_aliases(module, verb, flag, capsys):
    import subprocess
    import sys

    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"])
    assert exit_info.value.code == 0 and flag in capsys.readouterr().out
    alias = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300)
    assert alias.returncode == 0, alias.stderr
    assert f"usage: fastdetr {verb}" in alias.stdout and flag in alias.stdout


def test_measurement_verbs_parse_without_the_training_stack():
    """They run where only torch and Triton are installed (benchmarks/gpu_suite.sh); the `train` flags need more."""
    import subprocess
    import sys

    script = ("import sys; from fastdetr.cli import main\n"
              "try:\n    main(['memory', '--help'])\nexcept SystemExit:\n    pass\n"
              "print('fastdetr.train' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False"


def test_kernel_report_refuses_a_process_that_imported_triton_interpreted(monkeypatch, capsys):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert main(["kernel-report", "--targets", "90"]) == 2
    assert "Triton was imported with the interpreter on" in capsys.readouterr().err
