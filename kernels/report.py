"""Ahead-of-time compile report: every kernel configuration, for sm_80 and sm_90, without a GPU.

    fastdetr kernel-report [--targets 80 90] [--alignments generic aligned] [--json FILE] [--jobs N]
    python -m fastdetr.kernels.report [...]     (the same command)

Each kernel module exposes `aot_configs()`: every (kernel, signature,
constexprs, options) its launchers can choose. This compiles each one twice
per target -- "generic" (nothing known of pointers and strides) and "aligned"
(all divisible by 16, the specialisation Triton's JIT gives the transformer
kernels' tensors at d_model 256; whole-vector loads, often far fewer
registers) -- with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))` -- no GPU
needed, the Triton wheel carries ptxas and cuobjdump -- then reads the cubin's
resource usage (registers, spill stores/loads, local memory, shared memory)
and the tensor-core instructions in its PTX (mma.sync = HMMA on sm_80/sm_90,
wgmma = HGMMA on sm_90). It prints a table and exits non-zero on a compile error or a
spill: the interpreter that CI runs the kernels through accepts code a real
GPU would reject, and this is the check that catches it.

The kernels must be compiled with Triton's interpreter off (under the
interpreter, `triton.jit` returns an interpreted function), so `run_report` sets
TRITON_INTERPRET=0 before it imports any kernel module, and refuses when Triton
was already imported with the interpreter on; run it as its own process (tests
do, through subprocess).
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

# Kernel modules with an `aot_configs()`; a new kernel module is added here.
KERNEL_MODULES = ("fastdetr.kernels.attention", "fastdetr.kernels.assignment", "fastdetr.kernels.linear_layernorm",
                  "fastdetr.kernels.linear_relu", "fastdetr.kernels.in_projection", "fastdetr.kernels.ffn",
                  "fastdetr.kernels.matching_cost", "fastdetr.kernels.deformable_attention")


@dataclass
class CompileRow:
    module: str
    kernel: str
    config: str
    target: str
    ok: bool
    alignment: str = "generic"  # "generic" or "aligned" (see `aligned_attrs`)
    registers: int | None = None
    spill_bytes: int | None = None  # local memory per thread: spills and stack
    shared_bytes: int | None = None  # dynamic shared memory per program
    tensor_cores: str = ""
    seconds: float = 0.0
    error: str = ""


def _triton_tool(name: str) -> str | None:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.access(path, os.X_OK) else None


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, local bytes per thread) read off a cubin by cuobjdump; (None, None) without cuobjdump."""
    cuobjdump = _triton_tool("cuobjdump")
    if cuobjdump is None:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", file.name], capture_output=True,
                               text=True, check=True).stdout

    def field(name: str) -> int | None:
        match = re.search(rf"\b{name}:(\d+)", usage)
        return int(match.group(1)) if match else None

    return field("REG"), (field("LOCAL") or 0) + (field("STACK") or 0)


def _tensor_cores(ptx: str) -> str:
    """"wgmma" (warpgroup MMA, HGMMA in SASS), "mma" (mma.sync, HMMA) or "none", read off the PTX.

    ptxas turns each of these PTX instructions into that tensor-core SASS instruction and emits
    tensor-core SASS for nothing else, so the PTX answers what disassembling the cubin would, in a
    millisecond instead of the second or more `cuobjdump -sass` takes to disassemble a kernel.
    """
    if re.search(r"^\s*wgmma\.mma_async", ptx, re.MULTILINE):
        return "wgmma"
    if re.search(r"^\s*mma\.sync", ptx, re.MULTILINE):
        return "mma"
    return "none"


def _describe(signature: dict, constexprs: dict, options: dict) -> str:
    dtype = next((kind[1:] for kind in signature.values() if kind.startswith("*")), "")
    items = {**constexprs, **options}
    return " ".join([dtype] + [f"{key}={value}" for key, value in items.items()])


def aligned_attrs(kernel, signature: dict) -> dict:
    """The specialisation Triton's JIT gives DETR's tensors: every pointer and every stride divisible by 16.

    At run time the JIT marks an argument "divisible by 16" (`tt.divisibility`)
    when a pointer is 16-byte aligned or an int a multiple of 16 -- true of every
    pointer and row stride at d_model 256 -- and the kernel then loads whole
    vectors instead of one masked element at a time, with other register needs.
    Sizes (rows = tokens x batch) are not assumed aligned.
    """
    attrs = {}
    for index, name in enumerate(kernel.arg_names):
        kind = signature.get(name, "constexpr")
        if kind.startswith("*") or (name.startswith("stride_") and kind == "i32"):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return attrs


def _compile_one(module_name: str, index: int, alignment: str, cap: int) -> CompileRow:
    """Compile configuration `index` of `module_name`'s `aot_configs()` for one alignment and target."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, signature, constexprs, options = importlib.import_module(module_name).aot_configs()[index]
    name = getattr(kernel, "__name__", None) or kernel.fn.__name__
    row = CompileRow(module_name.rsplit(".", 1)[-1], name, _describe(signature, constexprs, options),
                     f"sm_{cap}", ok=False, alignment=alignment)
    start = time.perf_counter()
    try:
        attrs = aligned_attrs(kernel, signature) if alignment == "aligned" else None
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", cap, 32), options=options)
        row.registers, row.spill_bytes = _resource_usage(compiled.asm["cubin"])
        row.tensor_cores = _tensor_cores(compiled.asm["ptx"])
        row.shared_bytes = compiled.metadata.shared  # Triton's shared memory is dynamic
        row.ok = True
    except Exception as error:  # report every failure, keep compiling the rest
        row.error = f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:200]}"
    row.seconds = time.perf_counter() - start
    return row


def compile_all(targets: tuple[int, ...] = (80, 90), modules: tuple[str, ...] = KERNEL_MODULES,
                alignments: tuple[str, ...] = ("generic", "aligned"), jobs: int = 1) -> list[CompileRow]:
    """Compile every configuration of `modules` for every target and alignment; never raises on a compile error.

    "generic" assumes nothing of pointers and strides (what an odd d_model or a
    strided view gets); "aligned" is what DETR's own shapes get (`aligned_attrs`).
    jobs > 1 compiles in that many worker processes (ptxas is single-threaded);
    the rows come back in the same order.
    """
    tasks = [(module_name, index, alignment, cap)
             for module_name in modules
             for index in range(len(importlib.import_module(module_name).aot_configs()))
             for alignment in alignments for cap in targets]
    if jobs <= 1:
        return [_compile_one(*task) for task in tasks]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # fork: the workers inherit TRITON_INTERPRET=0 and the imported modules (no CUDA here to fork badly)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile_one, *zip(*tasks)))


def format_table(rows: list[CompileRow]) -> str:
    header = ("module", "kernel", "config", "target", "alignment", "regs", "spill B", "shared B", "tensor cores",
              "status")
    lines = [header]
    for row in rows:
        status = "ok" if row.ok and not row.spill_bytes else ("SPILL" if row.ok else f"FAIL {row.error}")
        lines.append((row.module, row.kernel, row.config, row.target, row.alignment, str(row.registers),
                      str(row.spill_bytes), str(row.shared_bytes), row.tensor_cores, status))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def run_report(targets: tuple[int, ...] = (80, 90), modules: tuple[str, ...] = KERNEL_MODULES,
               alignments: tuple[str, ...] = ("generic", "aligned"), json_path: str | None = None,
               jobs: int = 1) -> int:
    """`fastdetr kernel-report`: compile, print the table, write `json_path` if given; the exit status.

    0 when every compile is clean, 1 on a compile error or a spill, 2 when Triton was already imported
    with the interpreter on (the kernels would be interpreted functions, not compilable ones).
    """
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("kernels.report: Triton was imported with the interpreter on; run this as its own process",
              file=sys.stderr)
        return 2
    os.environ["TRITON_INTERPRET"] = "0"  # compile real kernels, whatever the caller's environment says
    rows = compile_all(tuple(targets), tuple(modules), tuple(alignments), jobs)
    print(format_table(rows))
    if json_path:
        with open(json_path, "w") as file:
            json.dump([asdict(row) for row in rows], file, indent=1)
    failed = [row for row in rows if not row.ok or row.spill_bytes]
    print(f"\n{len(rows)} compiles, {len(rows) - len(failed)} clean, {len(failed)} failed or spilled")
    return 1 if failed else 0


if __name__ == "__main__":   # `python -m fastdetr.kernels.report`: the CLI's kernel-report verb
    from fastdetr.cli import main

    sys.exit(main(["kernel-report", *sys.argv[1:]]))
