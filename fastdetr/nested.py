"""Padded image batches: the (tensors, mask) pair DETR consumes.

DETR takes images of different sizes in one batch: each is copied into the
top-left corner of a zero tensor of the batch's largest height and width, and
a boolean mask marks the padding (True = padding). The original code wraps the
pair in a `NestedTensor` class; here `ImageBatch` is a NamedTuple with the same
`.tensors` / `.mask` attributes and `decompose()`, so code written for either
works with both.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor


class ImageBatch(NamedTuple):
    """A padded batch: `tensors` (B, C, H, W) and `mask` (B, H, W) bool, True on padding."""

    tensors: Tensor
    mask: Tensor

    def decompose(self) -> tuple[Tensor, Tensor]:
        return self.tensors, self.mask

    def to(self, *args: Any, **kwargs: Any) -> "ImageBatch":
        tensors = self.tensors.to(*args, **kwargs)
        return ImageBatch(tensors, self.mask.to(tensors.device))


def _check_image(index: int, image: Any, reference: Tensor | None) -> None:
    if not isinstance(image, Tensor):
        raise TypeError(f"image {index}: expected a torch.Tensor, got {type(image).__name__}")
    if image.dim() != 3:
        raise ValueError(f"image {index}: expected a (3, H, W) tensor, got shape {tuple(image.shape)}")
    if image.shape[0] != 3:
        raise ValueError(f"image {index}: expected 3 channels (RGB) in dim 0, got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise ValueError(
            f"image {index}: images must be floating point (normalised RGB), got {image.dtype}; "
            "convert with image.float() / 255 and normalise first"
        )
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"image {index}: empty image of shape {tuple(image.shape)}")
    if reference is not None and (image.dtype != reference.dtype or image.device != reference.device):
        raise ValueError(
            f"image {index}: dtype/device {image.dtype}/{image.device} differs from image 0's "
            f"{reference.dtype}/{reference.device}"
        )


def batch_images(images: Sequence[Tensor], size: tuple[int, int] | None = None) -> ImageBatch:
    """Pad a list of (3, H_i, W_i) float tensors into an `ImageBatch`.

    The batch is (B, 3, max H, max W), or (B, 3, *size) when `size` = (H, W) is given (at
    least the largest image: a static-shape step's bucket); each image sits in the top-left
    corner, the rest is zero, and the mask is True there.
    """
    if len(images) == 0:
        raise ValueError("empty image list: pass at least one (3, H, W) image")
    for index, image in enumerate(images):
        _check_image(index, image, images[0] if index else None)
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    if size is not None:
        if size[0] < height or size[1] < width:
            raise ValueError(f"batch_images: size {tuple(size)} is smaller than the largest image ({height}, {width})")
        height, width = size
    first = images[0]
    tensors = first.new_zeros((len(images), 3, height, width))
    mask = torch.ones((len(images), height, width), dtype=torch.bool, device=first.device)
    for index, image in enumerate(images):
        tensors[index, :, : image.shape[1], : image.shape[2]].copy_(image)
        mask[index, : image.shape[1], : image.shape[2]] = False
    return ImageBatch(tensors, mask)


def to_image_batch(samples: Any) -> ImageBatch:
    """Accept every input form DETR takes and return an `ImageBatch`.

    - a list or tuple of (3, H, W) tensors (padded to the batch maximum);
    - a (B, 3, H, W) tensor (no padding);
    - a `(tensor, mask)` pair with mask (B, H, W) bool;
    - any object with `.tensors` and `.mask` (the original DETR's NestedTensor).

    Only metadata is checked (shapes, dtypes, devices): nothing here reads a
    tensor's values, so it never synchronises with the GPU.
    """
    if hasattr(samples, "tensors") and hasattr(samples, "mask"):
        return _checked_pair(samples.tensors, samples.mask)
    if isinstance(samples, Tensor):
        if samples.dim() == 3:
            raise ValueError(
                f"got a single (C, H, W) image of shape {tuple(samples.shape)}; pass a batch "
                "(B, 3, H, W) tensor or a list of images"
            )
        _check_batch(samples)
        mask = torch.zeros(
            (samples.shape[0], samples.shape[2], samples.shape[3]), dtype=torch.bool, device=samples.device
        )
        return ImageBatch(samples, mask)
    if isinstance(samples, (list, tuple)):
        if (
            len(samples) == 2
            and isinstance(samples[0], Tensor)
            and isinstance(samples[1], Tensor)
            and samples[0].dim() == 4
        ):
            return _checked_pair(samples[0], samples[1])
        return batch_images(samples)
    raise TypeError(
        "samples must be a list of (3, H, W) tensors, a (B, 3, H, W) tensor, a (tensor, mask) pair "
        f"or an object with .tensors and .mask; got {type(samples).__name__}"
    )


def _check_batch(tensors: Tensor) -> None:
    if tensors.dim() != 4:
        raise ValueError(f"images: expected a (B, 3, H, W) tensor, got shape {tuple(tensors.shape)}")
    if tensors.shape[1] != 3:
        raise ValueError(f"images: expected 3 channels (RGB) in dim 1, got shape {tuple(tensors.shape)}")
    if not tensors.is_floating_point():
        raise ValueError(
            f"images: must be floating point (normalised RGB), got {tensors.dtype}; "
            "convert with images.float() / 255 and normalise first"
        )
    if tensors.shape[0] == 0:
        raise ValueError("images: empty batch (B = 0)")


def _checked_pair(tensors: Tensor, mask: Tensor) -> ImageBatch:
    _check_batch(tensors)
    expected = (tensors.shape[0], tensors.shape[2], tensors.shape[3])
    if not isinstance(mask, Tensor) or tuple(mask.shape) != expected:
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(
            f"mask: expected shape (B, H, W) = {expected} to match images {tuple(tensors.shape)}, got {shape}"
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"mask: expected a bool tensor (True = padding), got {mask.dtype}")
    if mask.device != tensors.device:
        raise ValueError(f"mask is on {mask.device} but images are on {tensors.device}")
    return ImageBatch(tensors, mask)
