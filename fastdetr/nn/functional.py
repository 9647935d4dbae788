"""fastdetr.nn.functional: the one place fastdetr calls its Triton kernels from, and decides when.

`fastdetr.nn`'s modules and `fastdetr.matcher` ask this module two kinds of
question. Whether: `attention_supported(module)`, `layer_fusable(...)`,
`matcher_kernels(...)` read the limits each kernel module declares beside its
configs (`HEAD_DIMS`, `MAX_FUSED_WIDTH`, `MAX_BLOCK`, `DTYPES`) and
`fastdetr.backend.use_triton` (CUDA tensors, or the CPU under
TRITON_INTERPRET=1); when the answer is no, the module runs its own
plain-PyTorch forward (the reference) instead. And how: the functions below
the decisions run a piece of the fused chain -- heads split and merged once,
in `attend`; projections, residual + LayerNorm epilogues and the FFN -- and are
called only after a yes.

The kernel ops themselves keep a plain-PyTorch `*_ref` beside each kernel,
their oracle and fallback for inputs beyond the limits they declare (a
linear_residual_layernorm row wider than its tile runs the reference op), so a
layer this module fuses never meets an input its kernels reject.

Every decision reads tensor metadata and module attributes only: no host
sync. Kernel modules are imported on the kernel path only (they import
Triton, which a CPU-only install may lack).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdetr.backend import use_triton

__all__ = ["use_triton"]   # re-exported: the modules ask it through here, with the rest of the rules

# ---------------------------------------------------------------------------------------------
# Decisions
# ---------------------------------------------------------------------------------------------


def attention_head_dims() -> tuple[int, ...]:
    """Head dims the attention kernel takes (`fastdetr.kernels.attention.HEAD_DIMS`); () without Triton."""
    try:
        from fastdetr.kernels.attention import HEAD_DIMS
    except ImportError:
        return ()
    return tuple(HEAD_DIMS)


def attention_unsupported(module: nn.Module) -> str | None:
    """Why the attention kernel cannot serve `module`, from its structure alone, or None when it can.

    The one structural rule for both `fastdetr.nn.MultiheadAttention` and the
    fused transformer layers (which add their own needs: `layer_fusable`).
    """
    if not isinstance(module, nn.MultiheadAttention):
        return f"{type(module).__name__} is not a torch.nn.MultiheadAttention"
    if not module._qkv_same_embed_dim:
        return "separate key/value dimensions (kdim/vdim) are not supported"
    if module.bias_k is not None or module.add_zero_attn:
        return "add_bias_kv / add_zero_attn are not supported"
    head_dims = attention_head_dims()
    if module.head_dim not in head_dims:
        return f"head dim {module.head_dim} is not supported ({' or '.join(map(str, head_dims)) or 'no Triton'})"
    return None


def attention_supported(module: nn.Module) -> bool:
    """Whether the attention kernel can serve `module` (an nn.MultiheadAttention), by structure."""
    return attention_unsupported(module) is None


def attention_call_unsupported(module: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
                               key_padding_mask: Tensor | None, need_weights: bool, attn_mask: Tensor | None,
                               is_causal: bool) -> str | None:
    """Why one `MultiheadAttention.forward` call cannot take the kernel, or None when it can.

    The call's own arguments are checked first (as torch's fast path does), then the module's structure.
    """
    if need_weights:
        return "need_weights=True (attention weights are never materialised; pass need_weights=False)"
    if attn_mask is not None or is_causal:
        return "attn_mask / is_causal is not supported by the fused kernel"
    structural = attention_unsupported(module)
    if structural is not None:
        return structural
    if query.dim() != 3:
        return "unbatched (2-D) inputs are not supported"
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        return "a float key padding mask is not supported (use a bool mask, True = ignore)"
    dtype = module.in_proj_weight.dtype
    if any(t.dtype != dtype for t in (query, key, value)):
        return f"inputs of another dtype than the parameters ({dtype})"
    return None


def autocast_dtype(tensor: Tensor) -> torch.dtype | None:
    """The dtype autocast would compute a linear in on `tensor`'s device, or None when autocast is off."""
    device_type = tensor.device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _layer_attention_ok(attn: nn.Module) -> bool:
    # the fused chain's projection kernels take biases and the (L, B, E) layout
    return (attention_supported(attn) and attn.in_proj_bias is not None and attn.out_proj.bias is not None
            and not attn.batch_first)


def layer_fusable(layer: nn.Module, norms: Sequence[nn.LayerNorm], attns: Sequence[nn.Module],
                  tensors: Sequence[Tensor | None], masks: Sequence[Tensor | None]) -> bool:
    """Whether a DETR encoder / decoder layer and these inputs run as the fused chain.

    The layer: ReLU, Linears and LayerNorms with bias / affine, every attention
    supported (`attention_supported`, with biases, sequence-first). The inputs:
    3-D, in the compute dtype (autocast's, or the parameters'), bool masks, and
    tensors `use_triton` takes.
    """
    present = [t for t in tensors if t is not None]
    if not use_triton(*present, *masks, layer.linear1.weight):   # first: the CPU reference path asks nothing else
        return False
    if layer.activation is not F.relu:
        return False
    if not all(_layer_attention_ok(attn) for attn in attns):
        return False
    if layer.linear1.bias is None or layer.linear2.bias is None:
        return False
    if any(norm.weight is None or norm.bias is None for norm in norms):
        return False
    dtype = autocast_dtype(layer.linear1.weight) or layer.linear1.weight.dtype
    if any(t.dim() != 3 or (t.dtype != dtype and not autocast_dtype(t)) for t in present):
        return False
    return not any(mask is not None and mask.dtype != torch.bool for mask in masks)


def ffn_on_chip(x: Tensor, training: bool, needs_grad: bool) -> bool:
    """Whether the FFN runs as one kernel that keeps its hidden on chip: inference only, d_model within its tile."""
    from fastdetr.kernels.ffn import MAX_FUSED_WIDTH

    return not training and not needs_grad and x.shape[-1] <= MAX_FUSED_WIDTH


def matcher_kernels(tensor: Tensor, backend: str) -> bool:
    """Whether the matcher's cost and assignment run as kernels for predictions like `tensor`.

    backend "triton": always (the kernels run on CUDA tensors, or on the CPU under
    TRITON_INTERPRET=1, and say so otherwise). "auto": CUDA tensors only -- under
    the interpreter scipy is far faster than the interpreted solver, so CPU runs keep it.
    Anything else ("scipy", a solver callable): never.
    """
    if backend == "triton":
        return True
    return backend == "auto" and tensor.is_cuda and use_triton(tensor)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------

def key_padding_table(key_padding_mask: Tensor | None, dtype: torch.dtype):
    """The attention kernel's table of key blocks that hold a valid key, for attentions computing in `dtype`.

    Built with torch ops, no host sync. A layer stack builds it once per forward
    for the mask all its attentions share and passes it down (`attend(kv_table=)`);
    None without a mask or off the kernel path.
    """
    if key_padding_mask is None or not use_triton(key_padding_mask):
        return None
    from fastdetr.kernels.attention import key_block_table

    return key_block_table(key_padding_mask, dtype)


def _split_heads(x: Tensor, heads: int, batch_first: bool = False) -> Tensor:
    """(L, B, E) -> (B, H, L, D), or (B, L, E) -> (B, H, L, D) when batch_first: a view, the attention
    kernel reads it in place."""
    x = x.unflatten(-1, (heads, x.shape[-1] // heads))
    return x.permute(0, 2, 1, 3) if batch_first else x.permute(1, 2, 0, 3)


def _merge_heads(x: Tensor, batch_first: bool = False) -> Tensor:
    """(B, H, L, D) -> (L, B, E), or (B, L, E) when batch_first; a view when the kernel wrote storage in
    that order."""
    batch, heads, length, head_dim = x.shape
    if batch_first:
        return x.transpose(1, 2).reshape(batch, length, heads * head_dim)
    return x.permute(2, 0, 1, 3).reshape(length, batch, heads * head_dim)


def attend(q: Tensor, k: Tensor, v: Tensor, num_heads: int, key_padding_mask: Tensor | None,
           dropout_p: float, kv_table=None, batch_first: bool = False) -> Tensor:
    """softmax(q k^T / sqrt(D), padded keys masked) -> dropout -> @ v, per head, by the attention kernel.

    q (L, B, E), k and v (S, B, E) -- (B, L, E) and (B, S, E) when batch_first -- projected, heads not
    yet split; key_padding_mask (B, S) bool, True = ignore; kv_table from `key_padding_table` or None.
    Returns (L, B, E) ((B, L, E) when batch_first). A query whose keys are all padded gets zeros.
    """
    from fastdetr.kernels.attention import attention

    split = [_split_heads(x, num_heads, batch_first) for x in (q, k, v)]
    out = attention(*split, key_padding_mask=key_padding_mask, dropout_p=dropout_p, kv_table=kv_table)
    return _merge_heads(out, batch_first)


def multihead_attention(module: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
                        key_padding_mask: Tensor | None, kv_table=None) -> Tensor:
    """`nn.MultiheadAttention`'s forward with the attention kernel in the middle (projections stay GEMMs).

    query (L, B, E), key and value (S, B, E) -- batch first when the module is;
    returns the output in query's layout. One GEMM for Q and K when query is
    key (DETR's self-attention, q = k = x + pos).
    """
    if module.batch_first:
        query, key, value = (x.transpose(0, 1) for x in (query, key, value))
    batch, source = query.shape[1], key.shape[0]
    if key.shape[1] != batch or value.shape[:2] != key.shape[:2]:
        raise ValueError(
            f"MultiheadAttention: query {tuple(query.shape)}, key {tuple(key.shape)} and value "
            f"{tuple(value.shape)} disagree on batch or source length"
        )
    if key_padding_mask is not None and key_padding_mask.shape != (batch, source):
        raise ValueError(f"key_padding_mask: expected shape {(batch, source)}, got {tuple(key_padding_mask.shape)}")
    embed = query.shape[-1]
    weight, bias = module.in_proj_weight, module.in_proj_bias
    bias_q, bias_k, bias_v = (None, None, None) if bias is None else bias.chunk(3)
    if query is key:
        qk = F.linear(query, weight[: 2 * embed], None if bias is None else bias[: 2 * embed])
        q, k = qk[..., :embed], qk[..., embed:]
    else:
        q = F.linear(query, weight[:embed], bias_q)
        k = F.linear(key, weight[embed: 2 * embed], bias_k)
    v = F.linear(value, weight[2 * embed:], bias_v)
    dropout_p = module.dropout if module.training else 0.0
    out = module.out_proj(attend(q, k, v, module.num_heads, key_padding_mask, dropout_p, kv_table))
    return out.transpose(0, 1) if module.batch_first else out


# ---------------------------------------------------------------------------------------------
# The transformer layers' fused chain (called after `layer_fusable` said yes)
# ---------------------------------------------------------------------------------------------

def self_attention(attn: nn.MultiheadAttention, x: Tensor, pos: Tensor | None, key_padding_mask: Tensor | None,
                   training: bool, cast, kv_table=None, batch_first: bool = False) -> Tensor:
    """DETR's self-attention core (q = k = x + pos, v = x) up to, not including, out_proj: (L, B, E), or
    (B, L, E) in and out when batch_first (Deformable DETR's decoder, whose module is sequence-first but
    whose layer holds batch-first tensors: no transposed copies).

    One kernel projects Q, K and V, adding pos while it loads x for the Q and K columns.
    """
    from fastdetr.kernels.in_projection import in_projection

    qkv = in_projection(x, pos, cast(attn.in_proj_weight), cast(attn.in_proj_bias))
    q, k, v = qkv.split(x.shape[-1], dim=-1)
    return attend(q, k, v, attn.num_heads, key_padding_mask, attn.dropout if training else 0.0, kv_table,
                  batch_first)


def cross_attention(attn: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
                    key_padding_mask: Tensor | None, training: bool, cast, kv_table=None) -> Tensor:
    """Attention with distinct query and key inputs, up to out_proj; plain F.linear in-projections."""
    weight_q, weight_k, weight_v = cast(attn.in_proj_weight).chunk(3)
    bias_q, bias_k, bias_v = cast(attn.in_proj_bias).chunk(3)
    q, k, v = F.linear(query, weight_q, bias_q), F.linear(key, weight_k, bias_k), F.linear(value, weight_v, bias_v)
    return attend(q, k, v, attn.num_heads, key_padding_mask, attn.dropout if training else 0.0, kv_table)


def residual_norm(x: Tensor, linear: nn.Linear, residual: Tensor, norm: nn.LayerNorm, dropout: nn.Dropout,
                  training: bool, cast) -> Tensor:
    """norm(residual + dropout(linear(x))) in one fused op (post-norm)."""
    from fastdetr.kernels.linear_layernorm import linear_residual_layernorm

    return linear_residual_layernorm(x, cast(linear.weight), cast(linear.bias), residual, cast(norm.weight),
                                     cast(norm.bias), eps=norm.eps, dropout_p=dropout.p if training else 0.0)


def residual_then_norm(x: Tensor, linear: nn.Linear, residual: Tensor, norm: nn.LayerNorm, dropout: nn.Dropout,
                       training: bool, cast) -> tuple[Tensor, Tensor]:
    """(stream, norm(stream)) with stream = residual + dropout(linear(x)), in one fused op (pre-norm)."""
    from fastdetr.kernels.linear_layernorm import linear_residual_and_layernorm

    return linear_residual_and_layernorm(x, cast(linear.weight), cast(linear.bias), residual, cast(norm.weight),
                                         cast(norm.bias), eps=norm.eps, dropout_p=dropout.p if training else 0.0)


def layer_norm(x: Tensor, norm: nn.LayerNorm, cast) -> Tensor:
    return F.layer_norm(x, norm.normalized_shape, cast(norm.weight), cast(norm.bias), norm.eps)


def _needs_grad(layer: nn.Module, *tensors: Tensor | None) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors) or any(p.requires_grad for p in layer.parameters())


def ffn(layer: nn.Module, x: Tensor, residual: Tensor, norm: nn.LayerNorm | None, dropout: nn.Dropout,
        cast, hidden_dropout: nn.Dropout | None = None) -> Tensor:
    """residual + dropout(linear2(hidden_dropout(relu(linear1(x))))), then `norm` when given (post-norm).

    hidden_dropout: the hidden's dropout module, `layer.dropout` (DETR's name) when None.

    Inference with d_model within the kernel's tile (`ffn_on_chip`): one kernel,
    the hidden never leaves the chip. Otherwise two: GEMM + ReLU + dropout, then
    GEMM + residual (+ LayerNorm).
    """
    training = layer.training
    hidden_dropout = layer.dropout if hidden_dropout is None else hidden_dropout
    if ffn_on_chip(x, training, _needs_grad(layer, x, residual)):
        from fastdetr.kernels.ffn import ffn_inference

        return ffn_inference(x, cast(layer.linear1.weight), cast(layer.linear1.bias), cast(layer.linear2.weight),
                             cast(layer.linear2.bias), residual, None if norm is None else cast(norm.weight),
                             None if norm is None else cast(norm.bias), eps=1e-5 if norm is None else norm.eps)
    from fastdetr.kernels.linear_layernorm import linear_residual
    from fastdetr.kernels.linear_relu import linear_relu_dropout

    hidden = linear_relu_dropout(x, cast(layer.linear1.weight), cast(layer.linear1.bias),
                                 dropout_p=hidden_dropout.p if training else 0.0)
    if norm is not None:
        return residual_norm(hidden, layer.linear2, residual, norm, dropout, training, cast)
    return linear_residual(hidden, cast(layer.linear2.weight), cast(layer.linear2.bias), residual,
                           dropout_p=dropout.p if training else 0.0)


# ---------------------------------------------------------------------------------------------
# Multi-scale deformable attention
# ---------------------------------------------------------------------------------------------

def msda_kernel_supported(value: Tensor, sampling_locations: Tensor, attention_weights: Tensor) -> bool:
    """Whether the MSDA kernel takes these inputs: tensors `use_triton` takes, dtypes and head dim within
    `fastdetr.kernels.deformable_attention`'s `DTYPES` and `MAX_HEAD_DIM`."""
    if not use_triton(value, sampling_locations, attention_weights):
        return False
    from fastdetr.kernels.deformable_attention import DTYPES, MAX_HEAD_DIM

    return (all(t.dtype in DTYPES for t in (value, sampling_locations, attention_weights))
            and value.dim() == 4 and value.shape[-1] <= MAX_HEAD_DIM)


def ms_deform_attn(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                   attention_weights: Tensor) -> Tensor:
    """Multi-scale deformable attention, (N, Lq, M * D): the Triton kernel where `msda_kernel_supported`,
    else `fastdetr.reference.deformable_attention.ms_deform_attn` (grid_sample per level). Same semantics.

    A trace (`torch.jit.trace`, `torch.onnx.export`) always records the reference, with the level sizes as
    traced values: a kernel launch is not an op a trace or an ONNX graph can hold."""
    from fastdetr.reference import deformable_attention as reference

    if not reference.tracing() and msda_kernel_supported(value, sampling_locations, attention_weights):
        from fastdetr.kernels.deformable_attention import ms_deform_attn as kernel

        return kernel(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return reference.ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def msda_query_side_fusable(value: Tensor, query: Tensor, reference_points: Tensor) -> bool:
    """Whether `ms_deform_attn_query_side` runs the fused query-side kernel on these inputs: tensors Triton
    takes, in the kernel module's `DTYPES`, head dim up to its `QUERY_SIDE_MAX_HEAD_DIM` (past it the module
    runs the sampling core alone), and not while tracing (a trace records the reference)."""
    from fastdetr.reference.deformable_attention import tracing

    if tracing() or not use_triton(value, query, reference_points):
        return False
    from fastdetr.kernels.deformable_attention import DTYPES, QUERY_SIDE_MAX_HEAD_DIM

    return (all(t.dtype in DTYPES for t in (value, query, reference_points))
            and value.dim() == 4 and value.shape[-1] <= QUERY_SIDE_MAX_HEAD_DIM)


def ms_deform_attn_query_side(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, query: Tensor,
                              offsets: nn.Linear, logits: nn.Linear, reference_points: Tensor,
                              gemm_on_chip: bool = True) -> Tensor:
    """MSDA from the query on, called after `msda_query_side_fusable` said yes: offsets and logits from one
    GEMM over the two Linears (stacked afresh from the Parameters each call, so never stale), softmax and
    locations inside the kernel, the GEMM recomputed in backward; in inference the GEMM inside the kernel too
    (`fastdetr.kernels.deformable_attention.ms_deform_attn_projected`), in autocast's dtype under autocast."""
    from fastdetr.kernels.deformable_attention import ms_deform_attn_projected

    return ms_deform_attn_projected(value, spatial_shapes, level_start_index, query, offsets.weight, offsets.bias,
                                    logits.weight, logits.bias, reference_points,
                                    dtype=autocast_dtype(query) or query.dtype, gemm_on_chip=gemm_on_chip)


def value_projection(x: Tensor, linear: nn.Linear, padding_mask: Tensor | None, fuse: bool = True) -> Tensor:
    """linear(x) with the rows where padding_mask is True set to 0 (MSDA's value). With a mask, on tensors
    Triton runs and fuse: one GEMM with the fill in its epilogue (`linear_masked_rows`, in autocast's dtype
    when autocast is on); otherwise, and while tracing, linear then masked_fill."""
    from fastdetr.reference.deformable_attention import tracing

    if padding_mask is None:
        return linear(x)
    if fuse and not tracing() and linear.bias is not None and use_triton(x, linear.weight, padding_mask):
        from fastdetr.kernels.linear_relu import DTYPES, linear_masked_rows

        dtype = autocast_dtype(x) or x.dtype
        if dtype in DTYPES and linear.weight.dtype in DTYPES:
            return linear_masked_rows(x.to(dtype), linear.weight.to(dtype), linear.bias.to(dtype), padding_mask)
    return linear(x).masked_fill(padding_mask[..., None], 0.0)


# ---------------------------------------------------------------------------------------------
# The matcher (called after `matcher_kernels` said yes)
# ---------------------------------------------------------------------------------------------

def matching_cost(logits: Tensor, boxes: Tensor, target_labels: Tensor, target_boxes: Tensor,
                  weight_class: float, weight_bbox: float, weight_giou: float) -> Tensor:
    """The matcher's padded cost blocks (P, Q, T) float32 by one kernel (`fastdetr.kernels.matching_cost`)."""
    from fastdetr.kernels.matching_cost import matching_cost as kernel

    return kernel(logits, boxes, target_labels, target_boxes, weight_class, weight_bbox, weight_giou)


def require_assignment_kernel(caller: str, instead: str) -> None:
    """A RuntimeError naming `caller` (and what to use `instead`) when the assignment kernel cannot be imported."""
    try:
        import fastdetr.kernels.assignment  # noqa: F401
    except ImportError as error:
        raise RuntimeError(f"{caller} needs fastdetr.kernels.assignment (and Triton): {error}. {instead}") from error


def failed_problems(status: Tensor) -> list[int]:
    """The problems whose assignment status is not OK (reads the status: a host sync on a GPU)."""
    from fastdetr.kernels.assignment import STATUS_OK

    return (status != STATUS_OK).nonzero().flatten().tolist()


def assignment(cost: Tensor, num_targets: Sequence[int]):
    """Every padded problem (P, Q, T_max) solved in one launch, no host sync; None when one is too wide.

    Returns (pairs, status): pairs, P (pred_idx, tgt_idx) device tensors of
    min(Q, n_p) pairs (a problem that failed gets the diagonal, see
    `assignment_pairs`); status, the [P] int32 STATUS_* tensor, unread. None
    when max(Q, T_max) exceeds the kernel's column block (`MAX_BLOCK`): the
    caller solves those on the host.
    """
    from fastdetr.kernels.assignment import MAX_BLOCK, assignment_pairs, padded_assignment

    num_problems, num_queries, t_max = cost.shape
    if max(num_queries, t_max) > MAX_BLOCK:
        return None
    result = padded_assignment(cost, [num_queries] * num_problems, num_targets)
    return assignment_pairs(result, [min(num_queries, n) for n in num_targets]), result.status


def padded_assignment(cost: Tensor, num_targets: Tensor):
    """The query -> target map of every padded problem (P, Q, T), solved in one launch; no host sync, no shape
    that depends on a value. None when max(Q, T) exceeds the kernel's column block (`MAX_BLOCK`).

    num_targets: [P] integer tensor on cost's device, problem p's valid columns (the first ones).
    Returns (col_for_row, status): col_for_row [P, Q] int64, the target column matched to each
    query, -1 for none (every one of the min(Q, n_p) targets is matched); status, the [P]
    int32 STATUS_* tensor, unread. A problem whose status is not OK (a NaN block) gets the
    diagonal, query k to target k for k < n_p: valid indices, and its NaN reaches the loss.
    """
    from fastdetr.kernels.assignment import MAX_BLOCK, STATUS_OK, assignment_forward

    num_problems, num_queries, t_max = cost.shape
    if max(num_queries, t_max) > MAX_BLOCK:
        return None
    num_targets = num_targets.to(torch.int32)
    num_rows = torch.full((num_problems,), num_queries, dtype=torch.int32, device=cost.device)
    result = assignment_forward(cost, num_rows, num_targets)
    query = torch.arange(num_queries, device=cost.device)
    diagonal = torch.where(query < num_targets[:, None], query, -1)
    return torch.where((result.status == STATUS_OK)[:, None], result.col_for_row, diagonal), result.status
