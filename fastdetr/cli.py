"""The `fastdetr` command (also `python -m fastdetr`).

    fastdetr info    versions, devices and which backend each path takes
    fastdetr demo    a smoke run: build DETR-R50 and the small CPU preset, run inference, count ops and syncs

Training, evaluation and prediction commands arrive with the training issue;
until then `demo` runs inference with freshly initialised weights.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from . import __version__
from .backend import interpreter_enabled, triton_importable
from .models import build_model
from .profiling import OpCounter
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


def _demo(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    print("fastdetr demo: inference smoke run with freshly initialised weights (no training yet),")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdetr", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and backends").set_defaults(func=_info)
    demo = sub.add_parser("demo", help="smoke inference run (training arrives with the training issue)")
    demo.add_argument("--presets", nargs="+", default=["detr_small", "detr_resnet50"],
                      help="presets to build (default: detr_small detr_resnet50)")
    demo.add_argument("--size", type=int, default=480, help="height of the first image in pixels")
    demo.add_argument("--repeat", type=int, default=2, help="timed forward passes per preset")
    demo.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
