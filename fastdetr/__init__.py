"""fastdetr: DETR with fused Triton kernels and a batched GPU Hungarian matcher.

The same model and checkpoints as the original DETR. `fastdetr.reference`
holds the plain-PyTorch specification that every fused path is tested against.

    import fastdetr
    model = fastdetr.detr_resnet50(num_classes=91)
    fastdetr.load_checkpoint("detr-r50-e632da11.pth", model)
    outputs = model([image])  # list of (3, H, W) normalised tensors
    detections = fastdetr.PostProcess()(outputs, torch.tensor([[height, width]]))
"""
from . import box_ops
from .checkpoint import (
    CheckpointError,
    infer_config,
    load_backbone_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from .config import PRESETS, DETRConfig
from .criterion import SetCriterion, build_criterion
from .deformable_config import DEFORMABLE_PRESETS, DeformableDETRConfig
from .deformable_criterion import DeformableSetCriterion, FocalHungarianMatcher, build_deformable_criterion
from .export import export_onnx
from .matcher import HungarianMatcher
from .models import (
    build_deformable_model,
    build_model,
    deformable_detr_resnet50,
    deformable_detr_small,
    detr_resnet50,
    detr_resnet50_dc5,
    detr_resnet101,
    detr_resnet101_dc5,
    detr_small,
)
from .nested import ImageBatch, batch_images
from .nn.convert import optimize
from .reference.deformable_detr import DeformableDETR
from .reference.deformable_detr import PostProcess as DeformablePostProcess
from .reference.detr import DETR, MLP, PostProcess

__version__ = "0.1.0"

__all__ = [
    "DETR", "DETRConfig", "PRESETS", "MLP", "PostProcess", "ImageBatch", "batch_images", "box_ops",
    "build_model", "detr_resnet50", "detr_resnet101", "detr_resnet50_dc5", "detr_resnet101_dc5", "detr_small",
    "load_checkpoint", "save_checkpoint", "load_backbone_checkpoint", "infer_config", "CheckpointError",
    "HungarianMatcher", "SetCriterion", "build_criterion", "optimize", "export_onnx",
    "DeformableDETR", "DeformableDETRConfig", "DEFORMABLE_PRESETS", "build_deformable_model",
    "deformable_detr_resnet50", "deformable_detr_small",
    "DeformableSetCriterion", "FocalHungarianMatcher", "build_deformable_criterion", "DeformablePostProcess",
]
