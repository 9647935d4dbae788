"""Counting what a step costs without a GPU: ATen ops, Triton kernel launches and host syncs.

At DETR's sizes a GPU step is bound by kernel launches and host syncs as much
as by arithmetic, and both can be counted on a CPU: every ATen op that is not
a view is (roughly) one kernel launch on a GPU, and a handful of ops force the
host to wait for the device (reading a value, or producing a tensor whose size
depends on values).

    with OpCounter() as counter:
        loss = criterion(model(images), targets)
        loss.backward()
    counter.ops, counter.syncs, counter.sync_ops

A fused kernel is one launch but no ATen op: `TritonLaunchCounter` counts the
launches of Triton kernels, compiled or run by Triton's interpreter.
"""
from __future__ import annotations

import contextlib
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

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

# Ops that only allocate: on a GPU they launch no kernel (the caching allocator
# hands out memory), so a launch estimate leaves them out. A fused launcher
# allocates its outputs with these where a plain ATen op allocates inside itself.
ALLOCATION_OPS = frozenset({
    "aten.empty",
    "aten.empty_like",
    "aten.empty_strided",
    "aten.new_empty",
    "aten.new_empty_strided",
})


def _op_name(func) -> str:
    return f"aten.{func._schema.name.split('::', 1)[-1]}"


def _through_custom_op(mode: TorchDispatchMode, func, args, kwargs):
    """(True, result) for a `fastdetr::` custom op, run as its Python implementation with `mode` active again, so
    the ATen ops and launches inside it are seen as they were before the kernels became ops (the op call itself
    launches nothing); (False, None) for any other op."""
    if func.namespace != "fastdetr":
        return False, None
    from torch._library.custom_ops import _maybe_get_opdef

    opdef = _maybe_get_opdef(func._schema.name)
    if opdef is None:
        return False, None
    with mode:
        return True, opdef._init_fn(*args, **kwargs)


class OpCounter(TorchDispatchMode):
    """Counts ATen ops (views excluded) and host-syncing ops dispatched inside the block.

    Copies of a CUDA tensor to the CPU are counted as syncs too. `op_counts`
    has a per-op breakdown; `sync_ops` lists the syncing ops in order. A
    `fastdetr::` custom op is looked into (its ATen ops count, the call itself
    does not).
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
        handled, result = _through_custom_op(self, func, args, kwargs)
        if handled:
            return result
        name = _op_name(func)
        if not func.is_view:
            self.op_counts[name] += 1
        if name in HOST_SYNC_OPS:
            self.sync_ops.append(name)
        elif name in ("aten._to_copy", "aten.copy_") and _is_device_to_host(func, args, kwargs):
            self.sync_ops.append(f"{name} (device to host)")
        return func(*args, **kwargs)


class WrittenBytes(TorchDispatchMode):
    """Adds up the bytes of every tensor an ATen op inside the block outputs (views excluded; in-place ops
    count what they overwrite): the activations a forward writes to memory, a proxy for its traffic.

    A fused kernel's outputs are the tensors its launcher allocates (`aten.empty` and friends), so they count
    too; wrap the block in a `TritonLaunchCounter` as well under the interpreter, which hides the copies it
    makes around each launch. A `fastdetr::` custom op is looked into: what its launcher allocates and writes
    counts, as for any other op.
    """

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        handled, result = _through_custom_op(self, func, args, kwargs or {})
        if handled:
            return result
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            outputs = out if isinstance(out, (tuple, list)) else (out,)
            self.nbytes += sum(t.numel() * t.element_size() for t in outputs
                               if isinstance(t, torch.Tensor) and t.device.type != "meta")   # meta: no data
        return out


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


class TritonLaunchCounter:
    """Counts Triton kernel launches inside the block, per kernel name (a context manager).

    Compiled kernels (a real GPU) are seen through Triton's launch-enter hook,
    which the launcher calls once per launch, autotuner benchmark launches
    included; kernels run by Triton's interpreter (TRITON_INTERPRET=1) by a
    scoped wrapper around `InterpretedFunction.run`. Both are installed on
    entry and removed on exit; the wrapper swaps a class attribute, so nested
    counters must exit in reverse order of entry (a `with` statement does), and
    the counter is not thread-safe. `launch_counts` maps a kernel's function
    name to its launches; `launches` is their sum.

    hide_interpreter_ops: the interpreter copies every tensor argument to a host
    tensor and back around each launch (`new_empty`, `set_`, `copy_`): ATen ops
    that a compiled launch does not make. With True (default) they run with the
    TorchDispatchModes switched off, so an `OpCounter` around the block counts
    the program's ATen ops only.
    """

    def __init__(self, hide_interpreter_ops: bool = True) -> None:
        self.launch_counts: Counter[str] = Counter()
        self.hide_interpreter_ops = hide_interpreter_ops
        self._exit_stack: contextlib.ExitStack | None = None

    @property
    def launches(self) -> int:
        return sum(self.launch_counts.values())

    def _on_launch(self, metadata) -> None:
        # the launcher passes a LazyDict; its plain `data` has the name without evaluating the lazy extras
        data = getattr(metadata, "data", None) or {}
        self.launch_counts[data.get("name", "<compiled kernel>")] += 1

    def __enter__(self) -> "TritonLaunchCounter":
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(self._compiled_hook())
            stack.enter_context(self._interpreter_hook())
        except BaseException:
            stack.close()
            raise
        self._exit_stack = stack
        return self

    def __exit__(self, *exc_info) -> None:
        stack, self._exit_stack = self._exit_stack, None
        if stack is not None:
            stack.close()

    @contextlib.contextmanager
    def _compiled_hook(self):
        try:
            import triton
        except ImportError:   # no Triton, no Triton launches
            yield
            return
        knobs = getattr(triton, "knobs", None)
        chain = getattr(getattr(knobs, "runtime", None), "launch_enter_hook", None)
        if hasattr(chain, "add"):  # Triton >= 3.5: a HookChain that every launcher calls
            chain.add(self._on_launch)
            try:
                yield
            finally:
                chain.remove(self._on_launch)
            return
        # older Triton: a single optional hook, on triton.knobs.runtime (3.4) or CompiledKernel (3.2, 3.3)
        owner = knobs.runtime if knobs is not None else triton.compiler.CompiledKernel
        previous = getattr(owner, "launch_enter_hook", None)

        def hook(metadata) -> None:
            self._on_launch(metadata)
            if previous is not None:
                previous(metadata)

        owner.launch_enter_hook = hook
        try:
            yield
        finally:
            owner.launch_enter_hook = previous

    @contextlib.contextmanager
    def _interpreter_hook(self):
        try:
            from triton.runtime.interpreter import InterpretedFunction
        except ImportError:
            yield
            return

        original = InterpretedFunction.run
        counter = self

        def run(function, *args, grid, warmup, **kwargs):
            if warmup:  # compiles nothing and launches nothing under the interpreter
                return original(function, *args, grid=grid, warmup=warmup, **kwargs)
            counter.launch_counts[function.__name__] += 1
            hide = _disable_current_modes() if counter.hide_interpreter_ops else contextlib.nullcontext()
            with hide:
                return original(function, *args, grid=grid, warmup=warmup, **kwargs)

        InterpretedFunction.run = run
        try:
            yield
        finally:
            InterpretedFunction.run = original
