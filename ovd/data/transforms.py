"""Box-aware geometric transforms: shortest-edge resize and horizontal flip.

A transform is *sampled* once per image (:meth:`ResizeFlipAugmentation.sample`) into a plain
:class:`TransformParams`, which is then applied to the image, its GT boxes and any stored boxes of
the same image (RKD/PIS proposals, METHOD §3.3, §4.3, §10.13), so all of them stay consistent.

Box order of operations (METHOD §10.13): scale by ``(out_w / orig_w, out_h / orig_h)``, then
h-flip ``x1' = W - x2, x2' = W - x1``, then clip to ``[0, W] x [0, H]`` (``W, H`` = output size).

Shape shorthand: ``N`` boxes, ``H x W`` image size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from ovd.errors import OVDError


def resize_shortest_edge_size(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """Output size of a shortest-edge resize, exactly as detectron2's ``ResizeShortestEdge``.

    The short side becomes ``short``; if the long side would then exceed ``max_size``, the image is
    scaled so that the long side is ``max_size`` instead. Sizes are rounded half up.

    Args:
        h, w: input size in pixels.
        short: target short side.
        max_size: cap on the long side.

    Returns:
        ``(new_h, new_w)``.
    """
    if h <= 0 or w <= 0 or short <= 0 or max_size <= 0:
        raise OVDError(f"invalid resize: image {h}x{w}, short side {short}, max size {max_size}")
    # Same arithmetic as detectron2 ResizeShortestEdge.get_output_shape, so sizes match bit for bit.
    scale = short * 1.0 / min(h, w)
    if h < w:
        new_h, new_w = float(short), scale * w
    else:
        new_h, new_w = scale * h, float(short)
    if max(new_h, new_w) > max_size:
        scale = max_size * 1.0 / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


def _check_boxes(boxes: np.ndarray) -> np.ndarray:
    """``[N, 4]`` boxes as float64 (the arithmetic is done in float64, results are float32)."""
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise OVDError(f"expected boxes of shape [N, 4], got {list(boxes.shape)}")
    return boxes


@dataclass(frozen=True)
class TransformParams:
    """One sampled resize + optional horizontal flip.

    Attributes:
        orig_h, orig_w: size of the input image.
        out_h, out_w: size after resizing (the flip keeps it).
        flip: whether the resized image is mirrored left-right.
    """

    orig_h: int
    orig_w: int
    out_h: int
    out_w: int
    flip: bool

    @property
    def scale_x(self) -> float:
        return self.out_w / self.orig_w

    @property
    def scale_y(self) -> float:
        return self.out_h / self.orig_h

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        """Resize (bilinear) then flip an ``uint8[H, W, 3]`` image; returns ``uint8[out_h, out_w, 3]``."""
        if img.shape[:2] != (self.orig_h, self.orig_w):
            raise OVDError(
                f"image is {img.shape[0]}x{img.shape[1]} (HxW) but the transform expects {self.orig_h}x{self.orig_w}"
            )
        if (self.out_h, self.out_w) != (self.orig_h, self.orig_w):
            img = cv2.resize(img, (self.out_w, self.out_h), interpolation=cv2.INTER_LINEAR)
        if self.flip:
            img = img[:, ::-1]
        return np.ascontiguousarray(img)

    def apply_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Map ``float32[N, 4]`` xyxy boxes of the input image onto the output image.

        Scale, then h-flip (``x1' = W - x2``, ``x2' = W - x1``), then clip to ``[0, W] x [0, H]``.
        Boxes that end up empty are kept (callers decide what to drop).
        """
        boxes = _check_boxes(boxes)
        out = boxes * np.array([self.scale_x, self.scale_y, self.scale_x, self.scale_y], dtype=np.float64)
        if self.flip:
            out = np.stack([self.out_w - out[:, 2], out[:, 1], self.out_w - out[:, 0], out[:, 3]], axis=1)
        out[:, 0::2] = out[:, 0::2].clip(0, self.out_w)
        out[:, 1::2] = out[:, 1::2].clip(0, self.out_h)
        return out.astype(np.float32)

    def inverse_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Map ``float32[N, 4]`` boxes on the output image back to input-image pixels (clipped).

        Used to report detections in original-image coordinates.
        """
        boxes = _check_boxes(boxes)
        if self.flip:
            boxes = np.stack([self.out_w - boxes[:, 2], boxes[:, 1], self.out_w - boxes[:, 0], boxes[:, 3]], axis=1)
        out = boxes / np.array([self.scale_x, self.scale_y, self.scale_x, self.scale_y], dtype=np.float64)
        out[:, 0::2] = out[:, 0::2].clip(0, self.orig_w)
        out[:, 1::2] = out[:, 1::2].clip(0, self.orig_h)
        return out.astype(np.float32)


@dataclass(frozen=True)
class ResizeFlipAugmentation:
    """Random shortest-edge resize and horizontal flip (detectron2 ``ResizeShortestEdge`` + flip).

    Attributes:
        min_sizes: candidate short sides. ``"choice"``: one of them uniformly; ``"range"``: exactly
            two entries ``(lo, hi)``, the short side is uniform in ``[lo, hi]`` (inclusive).
        max_size: cap on the long side, pixels.
        sample_style: ``"choice"`` or ``"range"``.
        flip_prob: probability of a horizontal flip, in ``[0, 1]``.

    Test time uses the deterministic ``ResizeFlipAugmentation((short,), max_size, flip_prob=0)``,
    also available as :meth:`for_test`.
    """

    min_sizes: tuple[int, ...]
    max_size: int
    sample_style: Literal["choice", "range"] = "choice"
    flip_prob: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "min_sizes", tuple(int(s) for s in self.min_sizes))
        if not self.min_sizes or min(self.min_sizes) <= 0:
            raise OVDError(f"min_sizes must be positive sizes, got {self.min_sizes}", field="min_sizes")
        if self.max_size <= 0:
            raise OVDError(f"max_size must be positive, got {self.max_size}", field="max_size")
        if self.sample_style not in ("choice", "range"):
            raise OVDError(f"sample_style must be 'choice' or 'range', got {self.sample_style!r}", field="sample_style")
        if self.sample_style == "range" and (len(self.min_sizes) != 2 or self.min_sizes[0] > self.min_sizes[1]):
            raise OVDError(
                f"sample_style 'range' needs min_sizes (lo, hi) with lo <= hi, got {self.min_sizes}",
                field="min_sizes",
            )
        if not 0.0 <= self.flip_prob <= 1.0:
            raise OVDError(f"flip_prob must be in [0, 1], got {self.flip_prob}", field="flip_prob")

    def _draw_short(self, rng: np.random.Generator) -> int:
        if self.sample_style == "range":
            return int(rng.integers(self.min_sizes[0], self.min_sizes[1] + 1))
        return self.min_sizes[int(rng.integers(len(self.min_sizes)))]

    @classmethod
    def for_test(cls, short: int, max_size: int) -> ResizeFlipAugmentation:
        """The deterministic test-time transform: fixed short side, no flip."""
        return cls((short,), max_size, flip_prob=0.0)

    def sample(
        self, h: int, w: int, rng: np.random.Generator, short_rng: np.random.Generator | None = None
    ) -> TransformParams:
        """Draw the transform of one ``h x w`` image.

        Always consumes exactly two draws from ``rng`` (short side, then flip), so the stream of
        draws does not depend on the configuration. With ``short_rng`` (one short side per batch:
        every image of the batch passes a generator seeded alike) the short side is drawn from it
        instead; ``rng``'s draw is then discarded, so the flip is the same as without it.
        """
        short = self._draw_short(rng)  # drawn even when short_rng overrides it: the flip keeps its draw
        if short_rng is not None:
            short = self._draw_short(short_rng)
        flip = bool(rng.random() < self.flip_prob)
        out_h, out_w = resize_shortest_edge_size(h, w, short, self.max_size)
        return TransformParams(orig_h=h, orig_w=w, out_h=out_h, out_w=out_w, flip=flip)
