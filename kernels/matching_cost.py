"""The Hungarian matcher's cost blocks in one kernel: class probability, L1 and GIoU, per image only.

What is fused: for every problem p (image p % B of decoder layer p // B) and
every (query q, target t) pair of that image,

    cost[p, q, t] = w_bbox * |box_q - box_t|_1 - w_class * softmax(logits_q)[label_t] - w_giou * GIoU(q, t)

with boxes in normalised cxcywh (GIoU on their xyxy corners). The reference
is `fastdetr.matcher.matching_cost_ref`, the plain-PyTorch math the matcher
runs on the CPU and the tests hold this kernel to (a softmax over all
classes, a gather, cdist, two box conversions and ~20 elementwise ops over
(P, Q, T), each a kernel and an HBM round trip). The original DETR computes
the (B*Q) x (all targets) matrix instead and throws all but the diagonal
blocks away.

Kernel: a program owns BLOCK_Q queries of one problem. It reads their logits
once (in BLOCK_C chunks, an online max and sum give each row's logsumexp),
then walks the image's targets in BLOCK_T chunks: the probability of each
target's class is exp(logit[label] - logsumexp) (one gathered load), and L1
and GIoU are elementwise on the two sets of boxes, all in fp32 registers; only
the cost is written. Padded targets (t >= the image's count) get a finite cost
from the padding box and label the caller supplies; they are never solved.

Numbers: fp32 throughout; the softmax is exp(x - logsumexp) rather than
torch's exp(x - max) / sum, so entries differ from the reference by float32
rounding (~1e-7 relative), not bit for bit. No autograd (matching has no
gradient). Limits: labels must lie in [0, C] (not checked on the device: an
out-of-range label reads another query's logit, like an unchecked gather);
M < 2**31. Block sizes were picked for no register spills on sm_80 / sm_90
(`aot_configs()`), not tuned on a GPU.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastdetr.backend import use_triton
from fastdetr.kernels.common import TRITON_DTYPE_NAMES, KernelConfig, aot_signature, unit_last_stride

DTYPES = tuple(TRITON_DTYPE_NAMES)   # logits / boxes dtypes the kernel reads (the cost is always fp32)


def _check_inputs(logits, boxes, target_labels, target_boxes) -> None:
    """Shape and dtype checks that read metadata only."""
    if logits.dim() != 3:
        raise ValueError(f"matching_cost: logits must be (P, Q, C+1); got {tuple(logits.shape)}")
    problems, queries, _ = logits.shape
    if tuple(boxes.shape) != (problems, queries, 4):
        raise ValueError(f"matching_cost: boxes must be {(problems, queries, 4)}; got {tuple(boxes.shape)}")
    if target_labels.dim() != 2:
        raise ValueError(f"matching_cost: target_labels must be (B, T); got {tuple(target_labels.shape)}")
    images, targets = target_labels.shape
    if tuple(target_boxes.shape) != (images, targets, 4):
        raise ValueError(f"matching_cost: target_boxes must be {(images, targets, 4)}; "
                         f"got {tuple(target_boxes.shape)}")
    if images == 0 or problems % images != 0:
        raise ValueError(f"matching_cost: P = {problems} problems is not a multiple of B = {images} images")
    if target_labels.dtype.is_floating_point or target_labels.dtype == torch.bool:
        raise ValueError(f"matching_cost: target_labels must be integers; got {target_labels.dtype}")
    for name, tensor in (("logits", logits), ("boxes", boxes), ("target_boxes", target_boxes)):
        if not tensor.dtype.is_floating_point:
            raise ValueError(f"matching_cost: {name} must be floating point; got {tensor.dtype}")


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _configs() -> dict:
    """Launch config by logits dtype family; the work is elementwise on (BLOCK_Q, BLOCK_T) tiles."""
    return {family: dict(BLOCK_Q=32, BLOCK_T=32, BLOCK_C=128, num_warps=4, num_stages=1)
            for family in ("16bit", "fp32")}


def block_config(dtype: torch.dtype) -> dict:
    return dict(_configs()["fp32" if dtype == torch.float32 else "16bit"])


@triton.jit
def _corners(cx, cy, w, h):
    return cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h


@triton.jit
def _matching_cost_fwd_kernel(
    Logits_ptr,                 # (P, Q, C1), last stride 1
    Boxes_ptr,                  # (P, Q, 4) cxcywh, last stride 1
    Labels_ptr,                 # (B, T) int64
    TargetBoxes_ptr,            # (B, T, 4) cxcywh fp32, last stride 1
    Cost_ptr,                   # (P, Q, T) fp32 out
    stride_logits_p, stride_logits_q, stride_boxes_p, stride_boxes_q,
    stride_labels_b, stride_tboxes_b, stride_tboxes_t, stride_cost_p, stride_cost_q,
    num_queries, num_classes, num_targets, num_images,   # Q, C1 (classes + no-object), T, B
    weight_class, weight_bbox, weight_giou,
    BLOCK_Q: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    problem = tl.program_id(0)
    image = problem % num_images
    offs_q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = offs_q < num_queries
    logits_rows = Logits_ptr + problem.to(tl.int64) * stride_logits_p + offs_q.to(tl.int64) * stride_logits_q

    # stage 1: each query's logsumexp over the classes (online max and sum over BLOCK_C chunks)
    row_max = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_Q], tl.float32)
    for c_start in range(0, num_classes, BLOCK_C):
        offs_c = c_start + tl.arange(0, BLOCK_C)
        chunk = tl.load(logits_rows[:, None] + offs_c[None, :], mask=q_ok[:, None] & (offs_c < num_classes)[None, :],
                        other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(row_max, tl.max(chunk, 1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)   # masked rows: all -inf
        row_sum = row_sum * tl.exp(row_max - safe_max) + tl.sum(tl.exp(chunk - safe_max[:, None]), 1)
        row_max = new_max
    logsumexp = row_max + tl.log(tl.where(q_ok, row_sum, 1.0))   # rows past Q: no log(0)

    # the queries' boxes, as corners and as cxcywh
    box_rows = Boxes_ptr + problem.to(tl.int64) * stride_boxes_p + offs_q.to(tl.int64) * stride_boxes_q
    cx = tl.load(box_rows + 0, mask=q_ok, other=0.5).to(tl.float32)
    cy = tl.load(box_rows + 1, mask=q_ok, other=0.5).to(tl.float32)
    w = tl.load(box_rows + 2, mask=q_ok, other=0.5).to(tl.float32)
    h = tl.load(box_rows + 3, mask=q_ok, other=0.5).to(tl.float32)
    x0, y0, x1, y1 = _corners(cx, cy, w, h)
    area = (x1 - x0) * (y1 - y0)

    # stage 2: every target chunk of this image
    cost_rows = Cost_ptr + problem.to(tl.int64) * stride_cost_p + offs_q.to(tl.int64) * stride_cost_q
    for t_start in range(0, num_targets, BLOCK_T):
        offs_t = t_start + tl.arange(0, BLOCK_T)
        t_ok = offs_t < num_targets
        labels = tl.load(Labels_ptr + image.to(tl.int64) * stride_labels_b + offs_t, mask=t_ok, other=0)
        target_rows = TargetBoxes_ptr + image.to(tl.int64) * stride_tboxes_b + offs_t.to(tl.int64) * stride_tboxes_t
        tcx = tl.load(target_rows + 0, mask=t_ok, other=0.5)
        tcy = tl.load(target_rows + 1, mask=t_ok, other=0.5)
        tw = tl.load(target_rows + 2, mask=t_ok, other=0.5)
        th = tl.load(target_rows + 3, mask=t_ok, other=0.5)
        tx0, ty0, tx1, ty1 = _corners(tcx, tcy, tw, th)
        target_area = (tx1 - tx0) * (ty1 - ty0)
        mask = q_ok[:, None] & t_ok[None, :]

        picked = tl.load(logits_rows[:, None] + labels[None, :], mask=mask, other=0.0).to(tl.float32)
        prob = tl.exp(picked - logsumexp[:, None])
        l1 = (tl.abs(cx[:, None] - tcx[None, :]) + tl.abs(cy[:, None] - tcy[None, :])
              + tl.abs(w[:, None] - tw[None, :]) + tl.abs(h[:, None] - th[None, :]))
        inter_w = tl.maximum(tl.minimum(x1[:, None], tx1[None, :]) - tl.maximum(x0[:, None], tx0[None, :]), 0.0)
        inter_h = tl.maximum(tl.minimum(y1[:, None], ty1[None, :]) - tl.maximum(y0[:, None], ty0[None, :]), 0.0)
        inter = inter_w * inter_h
        union = area[:, None] + target_area[None, :] - inter
        hull_w = tl.maximum(tl.maximum(x1[:, None], tx1[None, :]) - tl.minimum(x0[:, None], tx0[None, :]), 0.0)
        hull_h = tl.maximum(tl.maximum(y1[:, None], ty1[None, :]) - tl.minimum(y0[:, None], ty0[None, :]), 0.0)
        hull = hull_w * hull_h
        giou = inter / union - (hull - union) / hull
        cost = weight_bbox * l1 - weight_class * prob - weight_giou * giou
        tl.store(cost_rows[:, None] + offs_t[None, :], cost, mask=mask)


# ---------------------------------------------------------------------------------------------
# Launcher and public function
# ---------------------------------------------------------------------------------------------

def matching_cost_forward(logits, boxes, target_labels, target_boxes, weight_class, weight_bbox, weight_giou):
    """Launch the kernel: logits (P, Q, C+1), boxes (P, Q, 4), target_labels (B, T), target_boxes (B, T, 4)
    -> cost (P, Q, T) fp32, problem p's targets those of image p % B."""
    logits, boxes = unit_last_stride(logits), unit_last_stride(boxes)
    target_labels = target_labels.to(torch.int64).contiguous()
    target_boxes = target_boxes.to(torch.float32).contiguous()
    problems, queries, classes = logits.shape
    images, targets = target_labels.shape
    cost = torch.empty(problems, queries, targets, dtype=torch.float32, device=logits.device)
    if cost.numel() == 0:
        return cost
    config = block_config(logits.dtype)
    grid = (problems, triton.cdiv(queries, config["BLOCK_Q"]))
    _matching_cost_fwd_kernel[grid](
        logits, boxes, target_labels, target_boxes, cost,
        logits.stride(0), logits.stride(1), boxes.stride(0), boxes.stride(1),
        target_labels.stride(0), target_boxes.stride(0), target_boxes.stride(1), cost.stride(0), cost.stride(1),
        queries, classes, targets, images,
        float(weight_class), float(weight_bbox), float(weight_giou),
        BLOCK_Q=config["BLOCK_Q"], BLOCK_T=config["BLOCK_T"], BLOCK_C=config["BLOCK_C"],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return cost


# The kernel as a torch.library custom op (`fastdetr::matching_cost`), which torch.compile (fullgraph) and CUDA
# graphs hold as one node; no gradient (the matcher runs under no_grad).

@torch.library.custom_op("fastdetr::matching_cost", mutates_args=())
def matching_cost_op(logits: torch.Tensor, boxes: torch.Tensor, target_labels: torch.Tensor,
                     target_boxes: torch.Tensor, weight_class: float, weight_bbox: float,
                     weight_giou: float) -> torch.Tensor:
    """`matching_cost_forward`: (P, Q, T) fp32."""
    return matching_cost_forward(logits, boxes, target_labels, target_boxes, weight_class, weight_bbox, weight_giou)


@matching_cost_op.register_fake
def _(logits, boxes, target_labels, target_boxes, weight_class, weight_bbox, weight_giou):
    return logits.new_empty((logits.shape[0], logits.shape[1], target_labels.shape[1]), dtype=torch.float32)


_POINTER_TYPES = {"Labels_ptr": "*i64", "TargetBoxes_ptr": "*fp32", "Cost_ptr": "*fp32"}
_FLOAT_ARGS = ("weight_class", "weight_bbox", "weight_giou")


def aot_configs() -> list[KernelConfig]:
    """Every variant the launcher can choose: one kernel per logits/boxes dtype."""
    configs = []
    for dtype, dtype_name in TRITON_DTYPE_NAMES.items():
        config = block_config(dtype)
        configs.append(KernelConfig(
            _matching_cost_fwd_kernel,
            aot_signature(_matching_cost_fwd_kernel, dtype_name, _POINTER_TYPES, _FLOAT_ARGS),
            dict(BLOCK_Q=config["BLOCK_Q"], BLOCK_T=config["BLOCK_T"], BLOCK_C=config["BLOCK_C"]),
            dict(num_warps=config["num_warps"], num_stages=config["num_stages"])))
    return configs


def matching_cost(logits, boxes, target_labels, target_boxes, weight_class=1.0, weight_bbox=5.0, weight_giou=2.0):
    """DETR's matching cost of every problem's (query, target) block: (P, Q, T) float32, by the kernel.

    logits: (P, Q, C+1) and boxes: (P, Q, 4) normalised cxcywh, P = layers x B
    (problem p is image p % B); target_labels: (B, T) integers in [0, C) and
    target_boxes: (B, T, 4) cxcywh, padded to the batch's most targets T (the
    padding columns get finite values, never solved). logits and boxes share one
    of `DTYPES`. No gradient. Tensors must be ones Triton runs (CUDA, or the CPU
    under TRITON_INTERPRET=1): the matcher decides, in `fastdetr.nn.functional`,
    whether its cost comes from here or from `fastdetr.matcher.matching_cost_ref`.
    """
    _check_inputs(logits, boxes, target_labels, target_boxes)
    if logits.dtype not in DTYPES or boxes.dtype != logits.dtype:
        raise ValueError(f"matching_cost: logits and boxes must share one of {DTYPES}; "
                         f"got {logits.dtype} and {boxes.dtype}")
    if not use_triton(logits, boxes, target_labels, target_boxes):
        raise RuntimeError(f"matching_cost: the kernel needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU); "
                           f"got tensors on {logits.device}. fastdetr.matcher.matching_cost_ref is the "
                           "plain-PyTorch cost")
    with torch.no_grad():
        return torch.ops.fastdetr.matching_cost(logits, boxes, target_labels, target_boxes, float(weight_class),
                                                float(weight_bbox), float(weight_giou))
