"""Pieces shared by the Triton kernels of `fastdetr.kernels`.

`_dot` is every kernel's matrix product. Triton 3.6's interpreter keeps bf16
tiles as uint16 bit patterns and its `tl.dot` multiplies those integers
(checked: a 16 x 16 bf16 product is off by ~1e10), so under the interpreter a
bf16 product widens its operands, already rounded to bf16, to fp32 first,
which gives the product a tensor core computes. Compiled kernels
(UPCAST_DOT=False, the only variant built for a GPU) keep bf16 operands and
tensor cores.
"""
from __future__ import annotations

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
