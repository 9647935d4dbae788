"""The `fastdetr` command (also `python -m fastdetr`).

    fastdetr info                      versions, devices and which backend each path takes
    fastdetr demo                      train a small DETR on generated shapes, evaluate, draw (`make demo`)
    fastdetr smoke                     build DETR-R50 and the small preset, run inference, count ops and syncs
    fastdetr train [--flags]           train (every TrainConfig field is a flag; see `fastdetr train -h`)
    fastdetr eval --checkpoint C --images DIR --annotations FILE
    fastdetr predict IMAGE... --checkpoint C [--threshold T] [--out DIR]
    fastdetr export --checkpoint C --onnx OUT.onnx [--mask] [--postprocess] [--verify]
    fastdetr buckets [--augment A] ... the padding the static-shape step's size buckets cost (COCO's sizes)
    fastdetr proxies [--quick] ...     one training step's launches, host syncs and saved bytes, counted on a CPU
    fastdetr memory [--small] ...      what one layer keeps for backward, reference against fused
    fastdetr kernel-report [...]       compile every kernel configuration for sm_80 / sm_90, fail on a spill
    fastdetr bench --out DIR ...       the benchmark runner (needs a source checkout: benchmarks/ is not installed)

`python -m fastdetr.proxies`, `python -m fastdetr.memory` and `python -m
fastdetr.kernels.report` are the same commands as `fastdetr proxies`, `memory`
and `kernel-report`. Multi-process training: `torchrun --nproc_per_node N -m fastdetr train ...`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .backend import interpreter_enabled, triton_importable
from .demo import DEMO_STEPS
from .measure.counters import OpCounter
from .models import build_model
from .reference.detr import PostProcess


def _info(_: argparse.Namespace) -> int:
    print(f"fastdetr {__version__}  python {platform.python_version()}  torch {torch.__version__}")
    if triton_importable():
        import triton

        print(f"triton {triton.__version__}  interpreter {'on' if interpreter_enabled() else 'off'}")
    else:
        print("triton not installed: every path runs plain PyTorch")
    if torch.cuda.is_available():
        print(f"cuda device: {torch.cuda.get_device_name()} (fused Triton paths)")
    else:
        print("no CUDA device: CPU tensors run the plain-PyTorch path"
              + (" (Triton kernels through the interpreter)" if interpreter_enabled() else ""))
    return 0


def _smoke(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    print("fastdetr smoke: inference with freshly initialised weights,")
    print(f"on {device}. Detections below are meaningless; shapes, speed and sync counts are not.\n")
    sizes = [(args.size, args.size * 4 // 3), (args.size * 3 // 4, args.size)]
    images = [torch.randn(3, h, w, device=device) for h, w in sizes]
    for name in args.presets:
        model = build_model(name).to(device).eval()
        params = sum(p.numel() for p in model.parameters())
        print(f"{name}: {params / 1e6:.1f} M parameters, {len(model.state_dict())} state_dict keys")
        with torch.no_grad():
            model(images)  # warm-up
            start = time.perf_counter()
            for _ in range(args.repeat):
                outputs = model(images)
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = (time.perf_counter() - start) / args.repeat
            with OpCounter() as counter:
                model(images)
        shapes = ", ".join(f"{h}x{w}" for h, w in sizes)
        print(f"  batch of {len(images)} images ({shapes}): {elapsed * 1e3:.0f} ms per batch, "
              f"{counter.ops} ATen ops, {counter.syncs} host syncs")
        print(f"  pred_logits {tuple(outputs['pred_logits'].shape)}, pred_boxes {tuple(outputs['pred_boxes'].shape)}, "
              f"{len(outputs.get('aux_outputs', []))} auxiliary outputs")
        result = PostProcess()(outputs, torch.tensor(sizes, device=device))[0]
        best = result["scores"].argmax()
        box = ", ".join(f"{v:.0f}" for v in result["boxes"][best].tolist())
        print(f"  top query of image 0: label {int(result['labels'][best])}, score "
              f"{float(result['scores'][best]):.3f}, box [{box}]\n")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    demo = DemoConfig(out_dir=args.out, data_dir=args.data_dir, steps=args.steps, device=args.device,
                      num_train=args.num_train, num_val=args.num_val, progress=not args.no_progress)
    run_demo(demo)
    return 0


def _parse_field(kind: Any, text: str) -> Any:
    if kind in ("bool", bool):
        lowered = text.strip().lower()
        if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        return lowered in ("1", "true", "yes", "on")
    if kind in ("int", int):
        return int(text)
    if kind in ("float", float):
        return float(text)
    return text


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One --flag per field of the dataclass `cls`; None, dicts and unions parse as their default's kind."""
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if isinstance(default, dict):
            parser.add_argument(flag, dest=field.name, type=json.loads, default=default,
                                help=f"JSON object (default {json.dumps(default)})")
            continue
        annotation = str(field.type)
        kind = next((name for name in ("bool", "int", "float") if name in annotation.split(" | ")), "str")
        parser.add_argument(flag, dest=field.name, default=default, metavar=kind.upper(),
                            type=lambda text, kind=kind: None if text.lower() == "none" else _parse_field(kind, text),
                            help=field.metadata.get("help", f"(default {default})"))


def _buckets(args: argparse.Namespace) -> int:
    from .static import COCO_IMAGE_SIZES, annotation_sizes, default_step, format_padding_report, padding_report
    from .train import AUGMENTS

    if args.augment not in AUGMENTS:
        raise SystemExit(f"fastdetr buckets: unknown --augment {args.augment!r}; expected one of {sorted(AUGMENTS)}")
    augment = AUGMENTS[args.augment]
    sizes = annotation_sizes(args.annotations) if args.annotations else COCO_IMAGE_SIZES
    rows = [padding_report(augment, batch_size, step, sizes, args.batches) for batch_size in args.batch_sizes
            for step in args.steps or [default_step(augment)]]
    print(f"augment {args.augment!r}, {args.batches} random batches per row, image sizes from "
          f"{args.annotations or 'fastdetr.static.COCO_IMAGE_SIZES (an approximate mix)'}\n")
    print(format_padding_report(rows))
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(TrainConfig)}
    try:
        config = TrainConfig(**values)
    except ValueError as error:
        print(f"fastdetr train: {error}", file=sys.stderr)
        return 2
    summary = train(config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({key: value for key, value in summary.items()}, indent=1))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_checkpoint, format_summary

    stats = evaluate_checkpoint(args.checkpoint, args.images, args.annotations, batch_size=args.batch_size,
                                device=args.device, num_workers=args.num_workers, val_size=args.val_size,
                                max_size=args.max_size)
    print(format_summary(stats))
    if args.json:
        Path(args.json).write_text(json.dumps(stats, indent=1))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .predict import output_names, predict_files

    reports = predict_files(args.images, args.checkpoint, threshold=args.threshold, out_dir=args.out,
                            device=args.device)
    for report, name in zip(reports, output_names(args.images)):
        found = ", ".join(f"{d['category']} {d['score']:.2f}" for d in report["detections"]) or "nothing"
        print(f"{report['image']} -> {name}.json, {name}.png: {found}")
    print(f"wrote a JSON and a PNG per image to {args.out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .export import export_onnx, verify_onnx

    model = load_checkpoint(args.checkpoint).eval()
    size = tuple(args.size)
    path = export_onnx(model, args.onnx, opset=args.opset, dynamic=not args.static,
                       with_postprocess=args.postprocess, with_mask=args.mask, image_size=size,
                       batch_size=args.batch)
    inputs, outputs = ["images (batch, 3, height, width) float32"], ["pred_logits", "pred_boxes"]
    if args.mask:
        inputs.append("mask (batch, height, width) bool")
    if args.postprocess:
        inputs.append("orig_sizes (batch, 2) int64")
        outputs += ["scores", "labels", "boxes"]
    shape = f"fixed at batch {args.batch}, {size[0]}x{size[1]}" if args.static else "batch, height and width dynamic"
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, opset {args.opset}, {shape})")
    print(f"  inputs: {', '.join(inputs)}\n  outputs: {', '.join(outputs)}")
    if not args.verify:
        return 0
    # A dynamic graph is checked at a batch and size it was not traced at.
    batch, check_size = (args.batch, size) if args.static else (args.batch + 1, (size[0] * 3 // 4 + 5, size[1] + 37))
    errors = verify_onnx(model, path, image_size=check_size, batch_size=batch)
    worst = max(errors.values())
    report = ", ".join(f"{name} {error:.1e}" for name, error in errors.items())
    print(f"onnxruntime vs PyTorch, padded batch of {batch} up to {check_size[0]}x{check_size[1]}: {report}")
    if worst > 1e-4:
        print(f"fastdetr export: onnxruntime differs from PyTorch by {worst:.1e} (limit 1e-4)", file=sys.stderr)
        return 1
    return 0


# The source checkout `fastdetr bench` runs from: the repository root above this package.
SOURCE_ROOT = Path(__file__).resolve().parents[1]


def _bench(bench_args: list[str]) -> int:
    """benchmarks/run.py of the source checkout this package was installed from (benchmarks/ is not installed)."""
    import runpy

    runner = SOURCE_ROOT / "benchmarks" / "run.py"
    if not (runner.is_file() and (SOURCE_ROOT / "setup.py").is_file()):
        print("fastdetr bench: the benchmarks run from a source checkout of fastdetr, and this installed package "
              f"has none (no benchmarks/run.py in {SOURCE_ROOT}): benchmarks/ is not installed with it. In a clone "
              "of the repository, `pip install -e .` and then `fastdetr bench ...`, or `python benchmarks/run.py "
              "...` there.", file=sys.stderr)
        return 2
    return runpy.run_path(str(runner), run_name="fastdetr_bench")["main"](bench_args)


# ---- measurement verbs ----------------------------------------------------------------------------
# Each sets TRITON_INTERPRET before a kernel module is first imported (triton.jit reads it at decoration
# time). Their parsers import nothing of the training stack (see `_measure_parser`).

def _add_proxies(sub) -> None:
    from .measure import proxies

    parser = sub.add_parser("proxies", help="one training step's launches, host syncs and saved bytes, "
                            "reference vs fused, counted on a CPU", description=proxies.__doc__.splitlines()[0])
    parser.add_argument("--model", choices=proxies.MODELS, default="detr",
                        help="the model whose step is counted: detr (default, DETR-R50) or deformable_detr "
                        "(Deformable-DETR-R50, plain: no box refinement, not two-stage)")
    parser.add_argument("--quick", action="store_true", help=f"the tests' shape ({proxies.QUICK_STEP.describe()}; "
                        f"deformable_detr: {proxies.DEFORMABLE_QUICK_STEP.describe()}) instead of "
                        f"{proxies.DETR_R50_STEP.describe()} (deformable_detr: "
                        f"{proxies.DEFORMABLE_R50_STEP.describe()})")
    parser.add_argument("--enc-layers", type=int, help="override the shape's encoder layers")
    parser.add_argument("--dec-layers", type=int, help="override the shape's decoder layers")
    parser.add_argument("--queries", type=int, help="override the shape's number of queries")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu (default; the fused kernels through Triton's interpreter) or cuda")
    parser.add_argument("--verbose", action="store_true",
                        help="also list the launches per kernel, the sync ops, and the ATen ops that differ")
    parser.set_defaults(func=_proxies)


def _proxies(args: argparse.Namespace) -> int:
    if args.device == "cpu" and "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1"
    from .measure import proxies

    full, quick = proxies.STEPS[args.model]
    shape = quick if args.quick else full
    overrides = {name: value for name, value in (("enc_layers", args.enc_layers), ("dec_layers", args.dec_layers),
                                                 ("num_queries", args.queries)) if value is not None}
    return proxies.run_report(dataclasses.replace(shape, **overrides), args.device, args.verbose)


def _add_memory(sub) -> None:
    from .measure import saved_bytes

    parser = sub.add_parser("memory", help="what one encoder / decoder layer keeps for backward, reference vs fused",
                            description=saved_bytes.__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--small", action="store_true",
                        help=f"tiny shapes ({saved_bytes.SMALL.describe()}), for a quick check")
    parser.add_argument("--batch", type=int, help="override the preset's batch")
    parser.add_argument("--source", type=int, help="override the preset's token count S")
    parser.add_argument("--queries", type=int, help="override the preset's query count Q")
    parser.add_argument("--verbose", action="store_true", help="list every saved storage")
    parser.add_argument("--no-msda", dest="msda", action="store_false",
                        help="leave out the multi-scale deformable attention module's row")
    parser.set_defaults(func=_memory)


def _memory(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1"
    from .measure import saved_bytes

    shape = saved_bytes.SMALL if args.small else saved_bytes.DETR_R50 if device.type == "cuda" \
        else saved_bytes.CPU_DEFAULT
    overrides = {name: getattr(args, name) for name in ("batch", "source", "queries") if getattr(args, name)}
    msda_shape = None
    if args.msda:
        msda_shape = saved_bytes.MSDA_SMALL if args.small else saved_bytes.MSDA_DEFORMABLE_DETR \
            if device.type == "cuda" else saved_bytes.MSDA_CPU_DEFAULT
    return saved_bytes.run_report(dataclasses.replace(shape, **overrides), getattr(torch, args.dtype), device,
                                  args.verbose, msda_shape)


def _add_kernel_report(sub) -> None:
    from .kernels import report

    parser = sub.add_parser("kernel-report", help="compile every kernel configuration for sm_80 / sm_90 without a "
                            "GPU; fails on a compile error or a spill", description=report.__doc__.split("\n")[0])
    parser.add_argument("--targets", type=int, nargs="+", default=[80, 90], help="compute capabilities")
    parser.add_argument("--modules", nargs="+", default=list(report.KERNEL_MODULES))
    parser.add_argument("--alignments", nargs="+", default=["generic", "aligned"], choices=["generic", "aligned"],
                        help="generic: nothing assumed of pointers and strides; aligned: all divisible by 16")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: CPUs)")
    parser.set_defaults(func=_kernel_report)


def _kernel_report(args: argparse.Namespace) -> int:
    from .kernels import report  # imports no kernel module: run_report sets TRITON_INTERPRET=0 first

    return report.run_report(tuple(args.targets), tuple(args.modules), tuple(args.alignments), args.json, args.jobs)


MEASURE_COMMANDS = {"proxies": _add_proxies, "memory": _add_memory, "kernel-report": _add_kernel_report}


def _measure_parser() -> argparse.ArgumentParser:
    """The measurement verbs alone. The full parser's `train` flags import fastdetr.train and the data
    pipeline (PIL); these verbs also run where only torch and Triton are installed (benchmarks/gpu_suite.sh)."""
    parser = argparse.ArgumentParser(prog="fastdetr", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in MEASURE_COMMANDS.values():
        add(sub)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdetr", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and backends").set_defaults(func=_info)
    demo = sub.add_parser("demo", help="train a small DETR on generated shapes, evaluate and draw (make demo)")
    demo.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    demo.add_argument("--data-dir", default="out/data/easy", help="where the synthetic set is generated")
    demo.add_argument("--steps", type=int, default=DEMO_STEPS,
                      help=f"training steps of batch 8 (default {DEMO_STEPS})")
    demo.add_argument("--num-train", type=int, default=4000, help="training images to generate")
    demo.add_argument("--num-val", type=int, default=200, help="validation images to generate")
    demo.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda")
    demo.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    demo.set_defaults(func=_demo)

    smoke = sub.add_parser("smoke", help="inference smoke run with fresh weights: speed, ops and host syncs")
    smoke.add_argument("--presets", nargs="+", default=["detr_small", "detr_resnet50"],
                      help="presets to build (default: detr_small detr_resnet50)")
    smoke.add_argument("--size", type=int, default=480, help="height of the first image in pixels")
    smoke.add_argument("--repeat", type=int, default=2, help="timed forward passes per preset")
    smoke.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    smoke.add_argument("--seed", type=int, default=0)
    smoke.set_defaults(func=_smoke)

    from .train import TrainConfig

    train = sub.add_parser("train", help="train a DETR (COCO-format data or a synthetic set)",
                           description="Train a DETR. Every field of fastdetr.train.TrainConfig is a flag.")
    _add_dataclass_flags(train, TrainConfig)
    train.set_defaults(func=_train)

    buckets = sub.add_parser("buckets", help="the padding the static-shape step's size buckets cost",
                             description="Random training batches of DETR's augmentation over COCO's image sizes "
                                         "(fastdetr.static.COCO_IMAGE_SIZES, or an annotations file's): the "
                                         "pixels padded to each batch's largest image and to its size bucket.")
    buckets.add_argument("--augment", default="detr", help="an augment preset of fastdetr.train.AUGMENTS")
    buckets.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 4, 8])
    buckets.add_argument("--steps", type=int, nargs="+", help="bucket steps in px (default: the augment's default)")
    buckets.add_argument("--batches", type=int, default=4000, help="random batches per row")
    buckets.add_argument("--annotations", help="a COCO annotations file: its image sizes instead of the built-in mix")
    buckets.set_defaults(func=_buckets)

    evaluate = sub.add_parser("eval", help="COCO evaluation of a checkpoint")
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--images", required=True, help="image folder")
    evaluate.add_argument("--annotations", required=True, help="COCO json")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    evaluate.add_argument("--num-workers", type=int, default=0)
    evaluate.add_argument("--val-size", type=int, default=None, help="shorter side in pixels (default: checkpoint's)")
    evaluate.add_argument("--max-size", type=int, default=None, help="longer side at most (default: checkpoint's)")
    evaluate.add_argument("--json", help="also write the 12 numbers to this file")
    evaluate.set_defaults(func=_eval)

    predict = sub.add_parser("predict", help="detections on image files: a JSON and an annotated PNG each")
    predict.add_argument("images", nargs="+", help="image files")
    predict.add_argument("--checkpoint", required=True)
    predict.add_argument("--threshold", type=float, default=0.5, help="minimum score (default 0.5)")
    predict.add_argument("--out", default="out/predict", help="output folder (default out/predict)")
    predict.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    predict.set_defaults(func=_predict)

    export = sub.add_parser("export", help="export a checkpoint to ONNX (dynamic batch and image size)")
    export.add_argument("--checkpoint", required=True)
    export.add_argument("--onnx", required=True, help="output .onnx file")
    export.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    export.add_argument("--mask", action="store_true", help="add a `mask` input (B, H, W) bool for padded batches")
    export.add_argument("--postprocess", action="store_true",
                        help="add an `orig_sizes` input and scores/labels/boxes (pixels) outputs")
    export.add_argument("--static", action="store_true", help="fix batch and size at --batch and --size")
    export.add_argument("--size", type=int, nargs=2, default=[320, 480], metavar=("H", "W"),
                        help="example image size traced (default 320 480)")
    export.add_argument("--batch", type=int, default=2, help="example batch traced (default 2)")
    export.add_argument("--verify", action="store_true",
                        help="run the file in onnxruntime and compare with PyTorch (exit 1 above 1e-4)")
    export.set_defaults(func=_export)

    for add in MEASURE_COMMANDS.values():
        add(sub)

    bench = sub.add_parser("bench", help="the benchmark runner (benchmarks/run.py of a source checkout; --help "
                           "there)", add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments of benchmarks/run.py")
    bench.set_defaults(func=lambda args: _bench(args.bench_args))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:   # every later argument is the runner's own, options included
        return _bench(argv[1:])
    parser = _measure_parser() if argv[:1] and argv[0] in MEASURE_COMMANDS else build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as error:
        # bad input (a missing file, a bad annotation, a checkpoint mismatch): one clear line, no traceback
        print(f"fastdetr {args.command}: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
