"""Pieces shared by the Triton kernels of `fastdetr.kernels`: the bf16 dot workaround and AOT descriptions.

`_dot` is every kernel's matrix product. Triton 3.6's interpreter keeps bf16
tiles as uint16 bit patterns and its `tl.dot` multiplies those integers
(checked: a 16 x 16 bf16 product is off by ~1e10), so under the interpreter a
bf16 product widens its operands, already rounded to bf16, to fp32 first,
which gives the product a tensor core computes. Compiled kernels
(UPCAST_DOT=False, the only variant built for a GPU) keep bf16 operands and
tensor cores.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastdetr.backend import interpreter_enabled


def _upcast_dot(dtype: torch.dtype) -> bool:
    """Whether the kernels must multiply in fp32: only bf16 under Triton's interpreter (module docstring)."""
    return dtype == torch.bfloat16 and interpreter_enabled()


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """a @ b with fp32 accumulation; UPCAST_DOT widens the operands first (see `_upcast_dot`)."""
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _dropout_keep(seed, rng_offset, row_ids, col_ids, dropout_p):
    """Bool block, True = keep: Philox4x32-10, counter (column, row, 0, rng_offset), key seed.

    Each element has its own counter, so forward and backward tiles draw the
    same number for the same (row, column) whatever their block shapes. The
    dropout of every GEMM-epilogue kernel (linear_layernorm, linear_relu).
    """
    zeros = tl.zeros_like(row_ids)
    bits, _, _, _ = tl.philox(seed, col_ids, row_ids, zeros, zeros + rng_offset)
    return tl.uint_to_uniform_float(bits) >= dropout_p


# ---- ahead-of-time compile descriptions (read by fastdetr.kernels.report) ----------------------

TRITON_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class KernelConfig(NamedTuple):
    """One kernel variant, as `triton.compile(ASTSource(kernel, signature, constexprs), options=...)` takes it."""
    kernel: object          # the @triton.jit function
    signature: dict         # argument name -> Triton type ("*bf16", "*i32", "i32", "fp32", "constexpr")
    constexprs: dict        # constexpr name -> value
    options: dict           # num_warps, num_stages


def aot_signature(kernel, dtype_name: str, pointer_types: Mapping[str, str] | None = None,
                  float_args: Collection[str] = ()) -> dict:
    """Triton types of every argument of `kernel`, as its launcher passes them.

    UPPER_CASE arguments are constexprs; `*_ptr` arguments point at the input
    dtype (`dtype_name`) unless `pointer_types` names another ("*fp32", "*i32",
    "*u8"); scalars in `float_args` are fp32, every other scalar i32 (sizes and
    strides of tensors under 2**31 elements).
    """
    pointer_types = pointer_types or {}
    signature = {}
    for name in kernel.arg_names:
        if name.isupper():
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointer_types.get(name, "*" + dtype_name)
        else:
            signature[name] = "fp32" if name in float_args else "i32"
    return signature
