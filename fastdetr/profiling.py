"""Counting what a step costs without a GPU: ATen ops and host syncs.

At DETR's sizes a GPU step is bound by kernel launches and host syncs as much
as by arithmetic, and both can be counted on a CPU: every ATen op that is not
a view is (roughly) one kernel launch on a GPU, and a handful of ops force the
host to wait for the device (reading a value, or producing a tensor whose size
depends on values).

    with OpCounter() as counter:
        loss = criterion(model(images), targets)
        loss.backward()
    counter.ops, counter.syncs, counter.sync_ops
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that make the host wait for the device: a value read on the host, or an
# output whose shape depends on tensor values.
HOST_SYNC_OPS = frozenset({
    "aten._local_scalar_dense",  # .item(), bool(tensor), int(tensor), float(tensor)
    "aten.is_nonzero",
    "aten.equal",
    "aten.nonzero",
    "aten.masked_select",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten.repeat_interleave",  # with a tensor of repeats and no output_size
    "aten.histc",
    "aten.bincount",
})


def _op_name(func) -> str:
    return f"aten.{func._schema.name.split('::', 1)[-1]}"


class OpCounter(TorchDispatchMode):
    """Counts ATen ops (views excluded) and host-syncing ops dispatched inside the block.

    Copies of a CUDA tensor to the CPU are counted as syncs too. `op_counts`
    has a per-op breakdown; `sync_ops` lists the syncing ops in order.
    """

    def __init__(self) -> None:
        super().__init__()
        self.op_counts: Counter[str] = Counter()
        self.sync_ops: list[str] = []

    @property
    def ops(self) -> int:
        return sum(self.op_counts.values())

    @property
    def syncs(self) -> int:
        return len(self.sync_ops)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _op_name(func)
        if not func.is_view:
            self.op_counts[name] += 1
        if name in HOST_SYNC_OPS:
            self.sync_ops.append(name)
        elif name in ("aten._to_copy", "aten.copy_") and _is_device_to_host(func, args, kwargs):
            self.sync_ops.append(f"{name} (device to host)")
        return func(*args, **kwargs)


def _is_device_to_host(func, args, kwargs) -> bool:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if _op_name(func) == "aten.copy_":
        return len(tensors) >= 2 and tensors[0].device.type == "cpu" and tensors[1].device.type != "cpu"
    target = kwargs.get("device")
    return bool(tensors) and tensors[0].device.type != "cpu" and target is not None and \
        torch.device(target).type == "cpu"


class TorchFunctionCounter(TorchFunctionMode):
    """Counts torch-level functions (torch.*, torch.nn.functional.*, Tensor methods) called inside the block.

    A mode is switched off while it handles a call, so only calls made from
    Python code outside another torch function are seen: a module's own code
    path, which is what this is for (did `nn.MultiheadAttention`'s functional
    forward run, or the fused kernels?). `calls` maps a qualified name, e.g.
    "torch.nn.functional.multi_head_attention_forward", to its count.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = torch.overrides.resolve_name(func) or getattr(func, "__qualname__", repr(func))
        self.calls[name] += 1
        return func(*args, **(kwargs or {}))

    def ran(self, fragment: str) -> bool:
        """Whether a function whose name contains `fragment` was called."""
        return any(fragment in name for name in self.calls)
