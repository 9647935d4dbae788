"""The DETR-R50 problem size that the measurements and the benchmarks share, defined once.

A problem is a preset's widths (`fastdetr.config.PRESETS`) together with what a
training step adds to them: the batch and the padded image size. The encoder's
token count follows from the image size and the backbone's output stride.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import preset


@dataclass(frozen=True)
class DETRProblem:
    """A preset's transformer widths at one batch and padded image size."""
    preset: str                    # key of fastdetr.config.PRESETS
    d_model: int
    heads: int
    dim_feedforward: int
    queries: int
    enc_layers: int
    dec_layers: int
    num_classes: int               # the class head has num_classes + 1 logits (no-object)
    batch: int
    image_size: tuple[int, int]    # (H, W) pixels of the padded batch
    stride: int                    # the backbone's output stride: 32, or 16 with DC5

    @classmethod
    def from_preset(cls, name: str, batch: int, image_size: tuple[int, int]) -> "DETRProblem":
        """The preset's widths (ValueError for an unknown name) at `batch` images padded to `image_size`."""
        config = preset(name)
        return cls(preset=name, d_model=config.hidden_dim, heads=config.nheads,
                   dim_feedforward=config.dim_feedforward, queries=config.num_queries,
                   enc_layers=config.enc_layers, dec_layers=config.dec_layers, num_classes=config.num_classes,
                   batch=batch, image_size=(int(image_size[0]), int(image_size[1])),
                   stride=16 if config.dilation else 32)

    @property
    def feature_map(self) -> tuple[int, int]:
        """(h, w) of the backbone's output: every stride-2 layer of a ResNet rounds up."""
        height, width = self.image_size
        return -(-height // self.stride), -(-width // self.stride)

    @property
    def tokens(self) -> int:
        """S, the encoder's sequence length per image: h * w."""
        height, width = self.feature_map
        return height * width

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    @property
    def logits(self) -> int:
        """Outputs of the class head: the classes and no-object."""
        return self.num_classes + 1

    def describe(self) -> str:
        height, width = self.feature_map
        return (f"{self.preset}: d {self.d_model}, {self.heads} heads, FFN {self.dim_feedforward}, "
                f"{self.queries} queries, {self.enc_layers}+{self.dec_layers} layers, batch {self.batch} of "
                f"{self.image_size[0]}x{self.image_size[1]} (S = {height} x {width} = {self.tokens})")


# DETR's training resolution: shorter side 800, padded batch 800 x 1216 (S = 25 x 38 = 950), batch 8.
DETR_R50 = DETRProblem.from_preset("detr_resnet50", batch=8, image_size=(800, 1216))
