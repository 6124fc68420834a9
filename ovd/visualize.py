"""Draw detections on an image with OpenCV: one box, one ``"name 0.87"`` label per detection.

Shape shorthand: ``N`` detections, ``H x W`` image size. Boxes are absolute-pixel xyxy, colours RGB.

The colour of a class is a pure function of its name (a CRC-32 hash, not Python's salted ``hash``),
so a class keeps its colour across images, video frames, runs and vocabularies.
"""

from __future__ import annotations

import colorsys
import math
import zlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from ovd.predictor import Prediction

Color = tuple[int, int, int]

# Label size follows detectron2's Visualizer: font height max(sqrt(H * W) / 90, 10) pixels, and a box
# line width of a quarter of it (at least one pixel).
FONT_HEIGHT_DIVISOR = 90.0
MIN_FONT_HEIGHT_PX = 10
LINE_WIDTH_PER_FONT_PX = 0.25
# Padding between the label text and the edge of its filled background, in pixels.
LABEL_PADDING_PX = 2
FONT = cv2.FONT_HERSHEY_SIMPLEX
# Hashed class colours: hue from the name, fixed saturation and value (bright, readable on any image).
HASH_SATURATION = 0.85
HASH_VALUE = 0.95
# Label text is black on backgrounds brighter than this (ITU-R BT.601 luma, 0-255), white otherwise.
DARK_TEXT_LUMA = 150.0


def _name_hash(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def color_for_name(name: str, palette: Mapping[str, Color] | Sequence[Color] | None = None) -> Color:
    """The stable RGB colour of a class name.

    Args:
        name: the class name.
        palette: ``None``: a hue hashed from the name; a sequence: the entry picked by the name's hash;
            a mapping: the colour given for the name (names it lacks fall back to the hashed hue).
    """
    if isinstance(palette, Mapping) and name in palette:
        return tuple(int(c) for c in palette[name])  # type: ignore[return-value]
    if palette is not None and not isinstance(palette, Mapping):
        if len(palette) == 0:
            raise ValueError("palette is empty")
        return tuple(int(c) for c in palette[_name_hash(name) % len(palette)])  # type: ignore[return-value]
    hue = (_name_hash(name) % 360) / 360.0
    r, g, b = colorsys.hsv_to_rgb(hue, HASH_SATURATION, HASH_VALUE)
    return round(r * 255), round(g * 255), round(b * 255)


def _text_color(background: Color) -> Color:
    r, g, b = background
    luma = 0.299 * r + 0.587 * g + 0.114 * b
    return (0, 0, 0) if luma > DARK_TEXT_LUMA else (255, 255, 255)


def _label_origin(box: tuple[int, int, int, int], size: tuple[int, int], image_hw: tuple[int, int]) -> tuple[int, int]:
    """Top-left corner of a ``size = (w, h)`` label for ``box``: above the box, or just inside its top
    edge when there is no room above; always shifted so the label lies inside the image."""
    x1, y1, _, _ = box
    lw, lh = size
    height, width = image_hw
    top = y1 - lh if y1 - lh >= 0 else y1
    top = max(0, min(top, height - lh))
    left = max(0, min(x1, width - lw))
    return left, top


def draw_detections(
    image_rgb: np.ndarray,
    prediction: Prediction,
    *,
    palette: Mapping[str, Color] | Sequence[Color] | None = None,
) -> np.ndarray:
    """Draw boxes with ``"name score"`` labels on a copy of an image.

    Detections are drawn from the lowest to the highest score, so the most confident labels end up on
    top. Boxes are clipped to the image; labels are moved inside the image when they would leave it.

    Args:
        image_rgb: ``uint8[H, W, 3]`` RGB image (not modified).
        prediction: the detections: ``boxes float[N, 4]`` xyxy pixels, ``scores float[N]``, ``names``.
        palette: class colours, see :func:`color_for_name`.

    Returns:
        ``uint8[H, W, 3]`` RGB image with the detections drawn.
    """
    image = np.ascontiguousarray(image_rgb).copy()
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    boxes = np.asarray(prediction.boxes, dtype=np.float64).reshape(-1, 4)  # (N, 4)
    scores = np.asarray(prediction.scores, dtype=np.float64).reshape(-1)  # (N,)
    names = list(prediction.names)
    if not (len(boxes) == len(scores) == len(names)):
        raise ValueError(f"prediction has {len(boxes)} boxes, {len(scores)} scores and {len(names)} names")

    font_px = max(math.sqrt(height * width) / FONT_HEIGHT_DIVISOR, MIN_FONT_HEIGHT_PX)
    line = max(round(font_px * LINE_WIDTH_PER_FONT_PX), 1)
    text_thickness = 1
    font_scale = cv2.getFontScaleFromHeight(FONT, round(font_px), text_thickness)

    for i in np.argsort(scores, kind="stable"):
        if not np.isfinite(boxes[i]).all():
            continue
        x1, y1, x2, y2 = boxes[i]
        x1, x2 = (int(round(min(max(v, 0), width - 1))) for v in (x1, x2))
        y1, y2 = (int(round(min(max(v, 0), height - 1))) for v in (y1, y2))
        color = color_for_name(names[i], palette)
        cv2.rectangle(image, (x1, y1), (x2, y2), color, line, lineType=cv2.LINE_8)

        text = f"{names[i]} {scores[i]:.2f}"
        (tw, th), baseline = cv2.getTextSize(text, FONT, font_scale, text_thickness)
        size = (tw + 2 * LABEL_PADDING_PX, th + baseline + 2 * LABEL_PADDING_PX)
        left, top = _label_origin((x1, y1, x2, y2), size, (height, width))
        cv2.rectangle(image, (left, top), (left + size[0] - 1, top + size[1] - 1), color, cv2.FILLED)
        cv2.putText(
            image,
            text,
            (left + LABEL_PADDING_PX, top + LABEL_PADDING_PX + th),
            FONT,
            font_scale,
            _text_color(color),
            text_thickness,
            lineType=cv2.LINE_AA,
        )
    return image
