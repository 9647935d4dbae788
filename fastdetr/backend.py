"""Where fastdetr decides between a Triton kernel and plain PyTorch.

One rule, used by every fused op: run Triton when the tensors are on a CUDA
device (and Triton imports), or when Triton's interpreter is switched on
(`TRITON_INTERPRET=1`, how CI runs the kernels on a CPU). Otherwise the
plain-PyTorch math runs. The decision reads only tensor metadata: it never
synchronises with the GPU.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch


def interpreter_enabled() -> bool:
    """True when Triton's interpreter is on (TRITON_INTERPRET set to a true value)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no", "off")


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    """True when the `triton` package is installed (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Whether the Triton path should run for these tensors (None entries are ignored).

    All tensors must live on one kind of device: CUDA tensors take the Triton
    path; CPU tensors take it only under the interpreter.
    """
    present = [t for t in tensors if t is not None]
    if not present or not triton_importable():
        return False
    if all(t.is_cuda for t in present):
        return True
    return interpreter_enabled() and all(t.device.type == "cpu" for t in present)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: `taskset`, a container's cpuset), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity call on this platform
        return os.cpu_count() or 1
