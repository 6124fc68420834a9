"""Data records shared by the whole package, and the conventions they carry.

Conventions (stated once, used everywhere):

* **Boxes** are absolute-pixel ``xyxy`` float32: ``0 <= x1 <= x2 <= W`` and ``0 <= y1 <= y2 <= H`` in
  the coordinates of the image they belong to. COCO ``xywh`` is converted at load time.
* **Labels** are contiguous foreground ids ``0..C-1`` in the order of the dataset's class list;
  background is ``C``. Dataset category ids are mapped to contiguous ids only in ``ovd.data``.

Shape shorthand: ``N`` boxes of one image, ``L`` image-level labels of one image, ``K`` stored
regions (proposals) of one image, ``D`` CLIP embedding dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor


def _empty_boxes() -> np.ndarray:
    return np.zeros((0, 4), dtype=np.float32)


def _empty_labels() -> np.ndarray:
    return np.zeros((0,), dtype=np.int64)


@dataclass
class ImageRecord:
    """One image of a dataset, before any transform.

    Attributes:
        image_id: the dataset's image id (COCO ``images[*].id``).
        file_name: absolute path of the image file.
        height, width: image size in pixels, as declared by the annotation file.
        boxes: ``float32[N, 4]`` xyxy boxes in original-image pixels.
        labels: ``int64[N]`` contiguous class ids of ``boxes``.
        pos_labels: ``int64[L]`` contiguous ids of image-level labels (captions / ImageNet tags);
            empty for box-annotated data.
        ann_type: ``"box"`` (box supervision) or ``"image"`` (image-level labels only).
        masks: instance masks aligned with ``boxes``, as the COCO ``segmentation`` of each box (an RLE
            dict or a list of polygons, original-image pixels), or ``None`` when not loaded.
    """

    image_id: int
    file_name: str
    height: int
    width: int
    boxes: np.ndarray = field(default_factory=_empty_boxes)
    labels: np.ndarray = field(default_factory=_empty_labels)
    pos_labels: np.ndarray = field(default_factory=_empty_labels)
    ann_type: str = "box"
    masks: list[dict | list] | None = None


@dataclass
class Detections:
    """Detections of one image.

    Attributes:
        boxes: ``Tensor[N, 4]`` xyxy in the pixel coordinates of the image given to the model (or of
            the original image once :meth:`scale` was applied).
        scores: ``Tensor[N]`` in ``[0, 1]``.
        labels: ``Tensor[N]`` contiguous class ids into the current vocabulary.
        masks: ``Tensor[N, 1, M, M]`` mask probabilities inside each box (a Mask R-CNN's output; they
            follow their box, so :meth:`scale` keeps them), or ``None`` for a box-only detector.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    masks: Tensor | None = None

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def __getitem__(self, index: Tensor | slice) -> Detections:
        masks = None if self.masks is None else self.masks[index]
        return Detections(self.boxes[index], self.scores[index], self.labels[index], masks)

    def to(self, device: torch.device | str) -> Detections:
        masks = None if self.masks is None else self.masks.to(device)
        return Detections(self.boxes.to(device), self.scores.to(device), self.labels.to(device), masks)

    def scale(self, sx: float, sy: float) -> Detections:
        """Return detections with boxes multiplied by ``(sx, sy, sx, sy)`` (box-relative masks unchanged)."""
        factor = self.boxes.new_tensor([sx, sy, sx, sy])
        return Detections(self.boxes * factor, self.scores, self.labels, self.masks)

    @staticmethod
    def empty(device: torch.device | str = "cpu") -> Detections:
        return Detections(
            torch.zeros((0, 4), device=device),
            torch.zeros((0,), device=device),
            torch.zeros((0,), dtype=torch.int64, device=device),
        )
