"""Pieces shared by the Triton kernels of `fastdetr.kernels`, each written once.

- Launcher helpers (plain Python): `dropout_key` (the dropout RNG key, a device
  tensor drawn by that device's generator; `fixed_dropout_key`,
  `unused_dropout_key`, `launch_key`), `unit_last_stride` and `as_rows` (the
  layouts the kernels index: last stride 1, rows of a given width).
- `@triton.jit` helpers, inlined into the kernels that call them: `_dot` (the
  bf16 workaround below), the two Philox dropout masks (`_gemm_dropout_keep`
  for the (row, column) tiles of the GEMM-epilogue kernels,
  `_attention_dropout_keep` for the (query, key) scores of one batch * head;
  two counter layouts, two random streams, both kept as they are), and
  `_layernorm_rows`, the LayerNorm epilogue of the kernels that own whole rows.
- Ahead-of-time compile descriptions (`KernelConfig`, `aot_signature`), read by
  `fastdetr.kernels.report`.

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

# ---- launcher helpers ----------------------------------------------------------------------------

_INT32_LIMIT = 2**31


def dropout_key(device: torch.device | str) -> torch.Tensor:
    """The (2,) int32 tensor (seed, rng_offset), values in [0, 2**31 - 1), keying a kernel's Philox dropout.

    Drawn on `device` by torch's generator of that device (`torch.randint`): no host sync, reproducible under
    `torch.manual_seed`, and advanced by the device's generator at every call, so a step replayed as a CUDA
    graph (whose capture registers that generator) or run by torch.compile draws new masks each time. The
    kernels read it from memory; forward and backward of one call share the tensor.
    """
    return torch.randint(0, 2**31 - 1, (2,), dtype=torch.int32, device=device)


def fixed_dropout_key(seed: int, rng_offset: int, device: torch.device | str) -> torch.Tensor:
    """A given (seed, rng_offset) as a dropout key tensor (tests and mask recovery; a host-to-device copy)."""
    return torch.tensor([seed, rng_offset], dtype=torch.int32, device=device)


def unused_dropout_key(device: torch.device | str) -> torch.Tensor:
    """The key argument of a launch without dropout: allocated, never written (no launch), never used."""
    return torch.empty(2, dtype=torch.int32, device=device)


def launch_key(key: torch.Tensor | None, seed: int, rng_offset: int, device) -> torch.Tensor:
    """A launcher's key: `key` when given, else one made of the ints (launchers called directly)."""
    return key if key is not None else fixed_dropout_key(seed, rng_offset, device)


def unit_last_stride(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself when its last stride is 1, else a contiguous copy.

    The kernels index the last dimension with stride 1 (vectorised loads); any
    other layout is copied once.
    """
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def as_rows(tensor: torch.Tensor, width: int, max_row_offset: int | None = None) -> torch.Tensor:
    """(..., width) -> (M, width) with last stride 1: a view when possible, else a contiguous copy.

    max_row_offset: when given, the kernel indexes rows [0, max_row_offset) of a
    tile with int32 offsets, so a view whose stride(0) * max_row_offset reaches
    2**31 is copied too (its copy has row stride `width`).
    """
    flat = tensor.reshape(-1, width)
    if flat.stride(-1) == 1 and (max_row_offset is None or flat.stride(0) * max_row_offset < _INT32_LIMIT):
        return flat
    return flat.contiguous()


def _upcast_dot(dtype: torch.dtype) -> bool:
    """Whether the kernels must multiply in fp32: only bf16 under Triton's interpreter (module docstring)."""
    return dtype == torch.bfloat16 and interpreter_enabled()


# ---- @triton.jit helpers -------------------------------------------------------------------------

@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """a @ b with fp32 accumulation; UPCAST_DOT widens the operands first (see `_upcast_dot`)."""
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PRECISION)


# Two dropout masks, two Philox counter layouts: each kernel family's random stream is fixed (its
# tests recover the mask), so neither is rewritten in terms of the other.

@triton.jit
def _gemm_dropout_keep(seed, rng_offset, row_ids, col_ids, dropout_p):
    """Bool block, True = keep: Philox4x32-10, counter (column, row, 0, rng_offset), key seed.

    Each element has its own counter, so forward and backward tiles draw the
    same number for the same (row, column) whatever their block shapes. The
    dropout of every GEMM-epilogue kernel (linear_layernorm, linear_relu).
    """
    zeros = tl.zeros_like(row_ids)
    bits, _, _, _ = tl.philox(seed, col_ids, row_ids, zeros, zeros + rng_offset)
    return tl.uint_to_uniform_float(bits) >= dropout_p


@triton.jit
def _attention_dropout_keep(seed, rng_offset, bh, query_ids, key_ids, dropout_p):
    """Bool block, True = keep. query_ids / key_ids: int32 blocks of one shape (either orientation).

    Philox4x32-10 with counter (key, query, batch * heads + head, rng_offset) and
    key seed: each element has its own counter, so forward and backward tiles of
    any shape and orientation draw the same number for the same element, and no
    index product can overflow. The attention kernels' dropout on the softmax
    weights: the third counter word tells the (batch, head) slices apart.
    """
    bh_ids = tl.zeros_like(query_ids) + bh
    offset_ids = tl.zeros_like(query_ids) + rng_offset
    bits, _, _, _ = tl.philox(seed, key_ids, query_ids, bh_ids, offset_ids)
    return tl.uint_to_uniform_float(bits) >= dropout_p


@triton.jit
def _layernorm_rows(z, col_ok, num_cols, eps, LnW_ptr, LnB_ptr, offs_n):
    """LayerNorm of each row of the fp32 tile z (BLOCK_M, BLOCK_N) over its valid columns.

    col_ok: (BLOCK_N,) bool, the columns < num_cols; masked columns are left out of
    the mean and variance (statistics in fp32) and come out as ln_bias's masked
    load, 0. LnW_ptr, LnB_ptr: (num_cols,) affine weight and bias, loaded at
    offs_n. Returns (y (BLOCK_M, BLOCK_N) fp32, mean (BLOCK_M,), rstd (BLOCK_M,),
    z with its masked columns zeroed). A caller that still stores z stores that
    one: keeping the input z live instead costs the `linear_layernorm` forward
    registers (the AOT report).
    """
    z = tl.where(col_ok[None, :], z, 0.0)
    mean = tl.sum(z, 1) / num_cols
    centred = tl.where(col_ok[None, :], z - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / num_cols + eps)
    ln_w = tl.load(LnW_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)
    ln_b = tl.load(LnB_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)
    return centred * rstd[:, None] * ln_w[None, :] + ln_b[None, :], mean, rstd, z


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
    pointer_types = {"DropoutKey_ptr": "*i32", **(pointer_types or {})}   # every dropout kernel's key
    signature = {}
    for name in kernel.arg_names:
        if name.isupper():
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointer_types.get(name, "*" + dtype_name)
        else:
            signature[name] = "fp32" if name in float_args else "i32"
    return signature
