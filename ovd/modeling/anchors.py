"""detectron2's anchor generator (``DefaultAnchorGenerator``), for models trained with detectron2.

torchvision's ``AnchorGenerator`` differs in three ways that change a trained RPN's proposals:

* its cell anchors are rounded to integers; detectron2's are not (a 0.5-ratio anchor of size 32 is
  45.25 × 22.63 px, not 45 × 23);
* its anchors at one location are ordered ratio-major (``for ratio: for size``), detectron2's size-major;
  this order is the channel order of the RPN head's objectness and delta convolutions;
* it infers each level's stride as ``padded image size // feature size``, which is wrong when images
  are not padded to a multiple of the stride (detectron2's C4 models use no padding); here the strides
  are the backbone's.

Cell anchor of size ``s`` and ratio ``r = h / w``: ``w = sqrt(s² / r)``, ``h = r · w``, centred at 0;
the anchors of a level are the cell anchors shifted to ``(offset + (j, i)) · stride`` for every feature
pixel ``(i, j)``, location-major (detectron2's offset is 0.0).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList


def cell_anchors(sizes: list[float], aspect_ratios: list[float]) -> Tensor:
    """``Tensor[len(sizes) · len(aspect_ratios), 4]`` xyxy anchors centred at 0, size-major."""
    out = []
    for size in sizes:
        area = float(size) ** 2
        for ratio in aspect_ratios:
            w = math.sqrt(area / ratio)
            h = ratio * w
            out.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(out, dtype=torch.float32)


class Detectron2AnchorGenerator(nn.Module):
    """``(images, features) → list[Tensor[A_total, 4]]``, one per image, as torchvision's generator.

    Args:
        sizes: anchor sizes per level (one inner list per feature map).
        aspect_ratios: ``h / w`` ratios, the same at every level.
        strides: the stride of each level in input pixels.
        offset: anchor centre offset in strides (detectron2 ``ANCHOR_GENERATOR.OFFSET``).
    """

    def __init__(self, sizes: list[list[float]], aspect_ratios: list[float], strides: list[int], offset: float = 0.0):
        super().__init__()
        if len(sizes) != len(strides):
            raise ValueError(f"{len(sizes)} anchor size lists for {len(strides)} feature levels")
        self.strides = [int(s) for s in strides]
        self.offset = offset
        for i, s in enumerate(sizes):
            self.register_buffer(f"cell_{i}", cell_anchors(list(s), list(aspect_ratios)), persistent=False)
        self.num_levels = len(sizes)

    def num_anchors_per_location(self) -> list[int]:
        return [int(getattr(self, f"cell_{i}").shape[0]) for i in range(self.num_levels)]

    def grid_anchors(self, grid_sizes: list[tuple[int, int]], device: torch.device) -> list[Tensor]:
        """Per level ``Tensor[H·W·A, 4]``: location-major, the ``A`` cell anchors at each location."""
        out = []
        for i, ((h, w), stride) in enumerate(zip(grid_sizes, self.strides, strict=True)):
            cell = getattr(self, f"cell_{i}").to(device)  # (A, 4)
            shift_x = torch.arange(w, dtype=torch.float32, device=device) * stride + self.offset * stride  # (W,)
            shift_y = torch.arange(h, dtype=torch.float32, device=device) * stride + self.offset * stride  # (H,)
            yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")  # (H, W)
            xx, yy = xx.reshape(-1), yy.reshape(-1)
            shifts = torch.stack([xx, yy, xx, yy], dim=1)  # (H·W, 4)
            out.append((shifts[:, None, :] + cell[None]).reshape(-1, 4))  # (H·W·A, 4)
        return out

    def forward(self, images: ImageList, features: list[Tensor]) -> list[Tensor]:
        grid_sizes = [(f.shape[-2], f.shape[-1]) for f in features]
        anchors = torch.cat(self.grid_anchors(grid_sizes, features[0].device))  # (A_total, 4)
        return [anchors.to(features[0].dtype) for _ in range(len(images.image_sizes))]
