"""The DETR model and its inference post-processing, in plain PyTorch.

Same modules, names and forward as the original DETR (models/detr.py), so its
checkpoints load unchanged. Differences: the model is built from a
`DETRConfig`, accepts every common input form (a list of differently sized
images, a batch tensor, a (tensor, mask) pair, or a NestedTensor-like object),
and its input checks read only metadata, never tensor values (no host sync):
images in another floating dtype than the weights are a TypeError naming
both, except under autocast.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..box_ops import box_cxcywh_to_xyxy
from ..config import DETRConfig
from ..nested import to_image_batch
from .backbone import Backbone, Joiner, build_position_embedding
from .transformer import Transformer


class MLP(nn.Module):
    """`num_layers` Linear layers with ReLU between them (the box head: 3 layers, d -> d -> d -> 4)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        self.num_layers = num_layers
        hidden = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(
            nn.Linear(n_in, n_out) for n_in, n_out in zip([input_dim] + hidden, hidden + [output_dim])
        )

    def forward(self, x: Tensor) -> Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < self.num_layers - 1:
                x = F.relu(x)
        return x


class DETR(nn.Module):
    """DEtection TRansformer: backbone, transformer, class and box heads.

    forward(samples) -> {
        "pred_logits": (B, num_queries, num_classes + 1)  -- the last class is "no object",
        "pred_boxes":  (B, num_queries, 4)                -- normalised (cx, cy, w, h) in [0, 1],
        "aux_outputs": [{"pred_logits", "pred_boxes"}] * (dec_layers - 1)  -- when config.aux_loss,
    }
    """

    def __init__(self, config: DETRConfig | None = None):
        super().__init__()
        config = DETRConfig() if config is None else config
        self.config = config
        backbone = Backbone(config.backbone, dilation=config.dilation, width=config.backbone_width,
                            frozen_batchnorm=config.frozen_batchnorm, train_backbone=config.train_backbone,
                            freeze_stem=config.freeze_stem)
        hidden_dim = config.hidden_dim
        # Registration order as in the original, so state_dict keys come in the official order.
        self.num_queries = config.num_queries
        self.transformer = Transformer(
            d_model=hidden_dim, nhead=config.nheads, num_encoder_layers=config.enc_layers,
            num_decoder_layers=config.dec_layers, dim_feedforward=config.dim_feedforward,
            dropout=config.dropout, activation=config.activation, normalize_before=config.pre_norm,
        )
        self.class_embed = nn.Linear(hidden_dim, config.num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(config.num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone.num_channels, hidden_dim, kernel_size=1)
        self.backbone = Joiner(backbone, build_position_embedding(config.position_embedding, hidden_dim))
        self.aux_loss = config.aux_loss

    def forward(self, samples: Any) -> dict[str, Any]:
        images, mask = to_image_batch(samples)
        self._check_dtype(images)
        features, mask, pos = self.backbone(images, mask)
        hs = self.transformer(self.input_proj(features), mask, self.query_embed.weight, pos)[0]
        outputs_class = self.class_embed(hs)
        outputs_coord = self.bbox_embed(hs).sigmoid()
        out: dict[str, Any] = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [
                {"pred_logits": logits, "pred_boxes": boxes}
                for logits, boxes in zip(outputs_class[:-1], outputs_coord[:-1])
            ]
        return out

    def _check_dtype(self, images: Tensor) -> None:
        """TypeError when the images' floating dtype is not the weights' (metadata only: no host sync).

        Under autocast for the images' device the ops cast their inputs themselves, so any
        floating dtype is fine there.
        """
        check_image_dtype(images, self.input_proj.weight.dtype)


def check_image_dtype(images: Tensor, expected: torch.dtype) -> None:
    """TypeError when the images' floating dtype is not `expected` (the weights'), except under autocast."""
    if images.dtype == expected or _autocast_enabled(images.device.type):
        return
    raise TypeError(
        f"images are {images.dtype} but the model's weights are {expected}: convert the images "
        f"(images.to({expected})), or the model (model.to({images.dtype})), or run it under "
        f"torch.autocast('{images.device.type}') for mixed precision")


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta): nothing is cast there
        return False


def as_target_sizes(target_sizes: Any, logits: Tensor) -> Tensor:
    """A post-process's target_sizes as a (B, 2) (height, width) tensor on the logits' device (a list or
    tuple is converted); ValueError naming the expected shape otherwise."""
    if not isinstance(target_sizes, Tensor):
        target_sizes = torch.as_tensor(target_sizes, device=logits.device)
    if target_sizes.dim() != 2 or target_sizes.shape != (logits.shape[0], 2):
        raise ValueError(f"target_sizes: expected ({logits.shape[0]}, 2) (height, width) per image, "
                         f"got {tuple(target_sizes.shape)}")
    return target_sizes


class PostProcess(nn.Module):
    """Turns DETR outputs into per-image detections in pixel coordinates.

    forward(outputs, target_sizes) with target_sizes (B, 2) as (height, width)
    of each original image -> a list of B dicts: "scores" (Q,), "labels" (Q,)
    int64 and "boxes" (Q, 4) xyxy in pixels. Each query reports its most likely
    real class (the no-object class is dropped before the argmax).
    """

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], target_sizes: Tensor) -> list[dict[str, Tensor]]:
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        target_sizes = as_target_sizes(target_sizes, logits)
        prob = F.softmax(logits, -1)
        scores, labels = prob[..., :-1].max(-1)
        boxes = box_cxcywh_to_xyxy(boxes)
        img_h, img_w = target_sizes.unbind(1)
        scale = torch.stack((img_w, img_h, img_w, img_h), dim=1).to(boxes.dtype)
        boxes = boxes * scale[:, None, :]
        return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes)]
