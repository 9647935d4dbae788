"""ResNet backbones with torchvision's parameter names, written without torchvision.

Differences from what the original DETR uses (torchvision's ResNet wrapped in
an IntermediateLayerGetter): the body stops at layer4 (no avgpool/fc, so the
state_dict keys are exactly `backbone.0.body.*` of the official checkpoints),
the stem width is a parameter (the small CPU preset halves it), and the norm
layer is FrozenBatchNorm2d (DETR's default) or a trainable BatchNorm2d (needed
when training from scratch: frozen random statistics give fixed random
features).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine

NormLayer = Callable[[int], nn.Module]

# depth -> (block kind, blocks per stage)
RESNET_LAYOUTS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}


def _fold(weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor,
          eps: float) -> tuple[Tensor, Tensor]:
    """(C,) buffers -> scale, shift (1, C, 1, 1) with y = x * scale + shift, computed in this order as the original
    does."""
    scale = weight.reshape(1, -1, 1, 1) * (running_var.reshape(1, -1, 1, 1) + eps).rsqrt()
    shift = bias.reshape(1, -1, 1, 1) - running_mean.reshape(1, -1, 1, 1) * scale
    return scale, shift


def _recorded() -> bool:
    """Whether the forward is being recorded rather than run: torch.compile and torch.export (the torch.export-based
    ONNX exporter too), torch.jit.trace (what the TorchScript-based ONNX exporter runs), a functorch transform."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._are_functorch_transforms_active()


class _Folded(NamedTuple):
    """FrozenBatchNorm2d's cached scale and shift (1, C, 1, 1), and what they were folded from."""
    key: list                       # per buffer id, _version, data_ptr, dtype, device, shape; autocast on
    buffers: tuple[Tensor, ...]     # held so that no later tensor can take a buffer's id()
    scale: Tensor
    shift: Tensor


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters, all stored as buffers.

    y = (x - running_mean) / sqrt(running_var + eps) * weight + bias, with eps = 1e-5.
    Checkpoints written with a trainable BatchNorm2d carry `num_batches_tracked`;
    it is ignored on load.

    The statistics fold into scale = weight * rsqrt(running_var + eps) and
    shift = bias - running_mean * scale, (1, C, 1, 1), computed as the original
    does, bit for bit. They are cached on the module, not as buffers (the
    state_dict holds the four buffers only), so the forward is the original's
    last two ops, `x * scale + shift`, bit for bit, where the original runs
    seven (five for the fold). With `single_op` (what `fastdetr.optimize` sets)
    it is one op, `torch.addcmul(shift, x, scale)`. addcmul may round once (the CPU kernel is
    a fused multiply-add) where the original rounds twice: the outputs differ by
    at most two roundings of the output dtype (2**-23 of |x * scale| + |shift|
    in float32). The output dtype is the original's, x's promoted with the
    buffers' (also under autocast, without the cast of x that CUDA autocast's
    promotion of addcmul would launch); the layout is x's (channels_last stays
    channels_last). The gradient of x is the original's, bit for bit, in two ops
    where the original's takes one (addcmul's backward multiplies scale by its
    `value`, 1, first): a small (1, C, 1, 1) op.

    The cache is refolded when a buffer changes, seen from host metadata only
    (no value read, no sync): a buffer replaced (`.to()`, `.half()`, assignment)
    or changed in place (`load_state_dict`'s `copy_`, `running_var.mul_(2)`:
    its `_version`), or autocast switched on or off (CUDA autocast runs rsqrt in
    float32). A refold of the same shape, dtype and device is copied into the
    cached tensors: a CUDA graph captured after a warm-up forward reads them by
    address, and sees new values after `load_state_dict` (which refolds at once)
    or after the next eager forward (any other change). A backward still pending
    through a forward from before such a change then fails ("modified by an
    inplace operation") rather than use the new values.

    Compiled, exported or traced (torch.compile, torch.export, both ONNX
    exporters, torch.jit.trace and script, functorch transforms), with a buffer
    that is a FakeTensor, meta, an inference tensor or requires grad, or with an
    input that is not a plain tensor, the forward is the original's: the fold
    from the buffers, then `x * scale + shift`, no cache read or written.
    Pickling and deepcopy drop the cache.
    """

    _fold_cache = None   # a _Folded once folded; a class default, so that modules pickled before it load too
    single_op = False    # one addcmul instead of x * scale + shift; `fastdetr.optimize` sets it (class docstring)

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if self._fold_cache is not None:
            self._folded()   # now: a CUDA graph captured earlier reads the new values at once

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_fold_cache", None)
        return state

    def _folded(self) -> tuple[Tensor, Tensor] | None:
        """The cached (scale, shift), refolded first if the buffers or the autocast state changed; None where a
        buffer is not a plain tensor with data whose in-place changes bump `_version` (a FakeTensor or other
        subclass, a meta tensor, an inference tensor: it has no version counter) or requires grad."""
        named = self._buffers   # not the attributes: nn.Module.__getattr__ costs a microsecond each
        buffers = named["weight"], named["bias"], named["running_mean"], named["running_var"]
        key = []
        for buffer in buffers:
            if type(buffer) is not Tensor or buffer.is_meta or buffer.is_inference() or buffer.requires_grad:
                return None
            key += (id(buffer), buffer._version, buffer.data_ptr(), buffer.dtype, buffer.device, buffer.shape)
        device = buffers[0].device.type
        key.append(torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device))
        cache = self._fold_cache
        if cache is not None and cache.key == key:
            return cache.scale, cache.shift
        with torch.inference_mode(False):   # a cache made in inference mode could not be updated outside it
            scale, shift = _fold(*buffers, self.eps)
        if cache is not None and all(old.shape == new.shape and old.dtype == new.dtype and old.device == new.device
                                     for old, new in ((cache.scale, scale), (cache.shift, shift))):
            cache.scale.copy_(scale)        # in place: what a captured CUDA graph reads
            cache.shift.copy_(shift)
            scale, shift = cache.scale, cache.shift
        self._fold_cache = _Folded(key, buffers, scale, shift)
        return scale, shift

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) -> (B, C, H, W) in x's dtype promoted with the buffers', x's layout."""
        if not torch.jit.is_scripting():   # TorchScript compiles only the original's forward below
            folded = None if _recorded() or type(x) is not Tensor or x.is_meta else self._folded()
            if folded is not None:
                scale, shift = folded
                if not self.single_op:
                    return x * scale + shift   # the original's two ops on the cached fold: bit for bit
                if x.is_cuda and torch.is_autocast_enabled("cuda"):
                    # addcmul is on CUDA autocast's promote list, which would launch a cast of x first; mul and
                    # add, the original's ops, are on no list: without autocast addcmul promotes as they do.
                    with torch.autocast("cuda", enabled=False):
                        return torch.addcmul(shift, x, scale)
                return torch.addcmul(shift, x, scale)
        # the original's forward, the buffers read as attributes: what torch.fx's tracer records
        scale, shift = _fold(self.weight, self.bias, self.running_mean, self.running_var, self.eps)
        return x * scale + shift

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual (ResNet-18/34)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None,
                 dilation: int, norm_layer: NormLayer):
        super().__init__()
        if dilation > 1:
            raise ValueError("dilation (DC5) needs a bottleneck ResNet (resnet50/resnet101), not resnet18/34")
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, possibly dilated), 1x1 expand, with a residual (ResNet-50/101, v1.5)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None,
                 dilation: int, norm_layer: NormLayer):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = norm_layer(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = norm_layer(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetBody(nn.Module):
    """ResNet stem and four stages, torchvision names, without avgpool and fc.

    Input (B, 3, H, W); output the layer4 feature map (B, C, H/32, W/32), or
    (B, C, H/16, W/16) with `dilation=True` (DC5: the last stage dilated
    instead of strided). C = 8 * width (basic blocks) or 32 * width (bottlenecks);
    width 64 is the standard ResNet.
    """

    def __init__(self, name: str = "resnet50", dilation: bool = False, width: int = 64,
                 norm_layer: NormLayer = FrozenBatchNorm2d):
        super().__init__()
        if name not in RESNET_LAYOUTS:
            raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(RESNET_LAYOUTS)}")
        kind, blocks = RESNET_LAYOUTS[name]
        block = BasicBlock if kind == "basic" else Bottleneck
        self._norm_layer = norm_layer
        self._block = block
        self.inplanes = width
        self.dilation = 1
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(width, blocks[0], stride=1)
        self.layer2 = self._make_layer(width * 2, blocks[1], stride=2)
        self.layer3 = self._make_layer(width * 4, blocks[2], stride=2)
        self.layer4 = self._make_layer(width * 8, blocks[3], stride=2, dilate=dilation)
        self.num_channels = width * 8 * block.expansion
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int, dilate: bool = False) -> nn.Sequential:
        block, norm_layer = self._block, self._norm_layer
        previous_dilation = self.dilation
        if dilate:
            # The first block keeps the previous dilation; the stride becomes dilation.
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                norm_layer(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, previous_dilation, norm_layer)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, None, self.dilation, norm_layer) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class Backbone(nn.Module):
    """A ResNetBody plus the padding mask downsampled to its output.

    `train_backbone=False` freezes every parameter; otherwise conv1 and layer1
    stay frozen when `freeze_stem` (DETR's choice for pretrained weights) and
    the rest trains.
    """

    def __init__(self, name: str = "resnet50", dilation: bool = False, width: int = 64,
                 frozen_batchnorm: bool = True, train_backbone: bool = True, freeze_stem: bool = True):
        super().__init__()
        norm_layer = FrozenBatchNorm2d if frozen_batchnorm else nn.BatchNorm2d
        self.body = ResNetBody(name, dilation=dilation, width=width, norm_layer=norm_layer)
        self.num_channels = self.body.num_channels
        trainable_stages = ("layer2", "layer3", "layer4") if freeze_stem else None
        for param_name, param in self.body.named_parameters():
            trainable = train_backbone and (
                trainable_stages is None or param_name.split(".")[0] in trainable_stages
            )
            param.requires_grad_(trainable)

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """images (B, 3, H, W), mask (B, H, W) -> features (B, C, h, w), mask (B, h, w)."""
        features = self.body(images)
        # Nearest-neighbour downsampling of the padding mask, as in the original.
        small_mask = F.interpolate(mask[None].float(), size=features.shape[-2:]).to(torch.bool)[0]
        return features, small_mask


class Joiner(nn.Sequential):
    """Backbone (index 0) and position embedding (index 1): keys `backbone.0.*`, `backbone.1.*`."""

    def __init__(self, backbone: Backbone, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> features (B, C, h, w), mask (B, h, w), pos (B, hidden_dim, h, w) in the features' dtype."""
        features, small_mask = self[0](images, mask)
        pos = self[1](features, small_mask).to(features.dtype)
        return features, small_mask, pos


def build_position_embedding(kind: str, hidden_dim: int) -> nn.Module:
    """'sine' (fixed, DETR's default) or 'learned' (50 x 50 max grid), hidden_dim / 2 features per axis."""
    if kind == "sine":
        return PositionEmbeddingSine(hidden_dim // 2, normalize=True)
    if kind == "learned":
        return PositionEmbeddingLearned(hidden_dim // 2)
    raise ValueError(f"unknown position_embedding {kind!r}; expected 'sine' or 'learned'")
