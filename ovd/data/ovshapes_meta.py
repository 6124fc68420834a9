"""OV-Shapes' primitives: the shape classes, their names and synonyms, the default novel split, the palette.

This is OV-Shapes' metadata (as detectron2's ``builtin_meta.py``): it imports nothing of :mod:`ovd.data`,
so the caption tagger, the CLIP teacher and both synthetic worlds (:mod:`ovd.data.ovshapes`,
:mod:`ovd.data.ovshapes_lt`) can know the classes without importing a generator.

Shape shorthand: ``P`` polygon points.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

# ----------------------------------------------------------------------------------------------
# Shapes: primitives in unit coordinates (x right, y down, fitted to [-1, 1]^2)

Primitive = tuple[np.ndarray, bool]  # (float64[P, 2] polygon, additive); non-additive ones cut holes


def _ellipse(cx: float, cy: float, rx: float, ry: float | None = None, n: int = 48) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + (rx if ry is None else ry) * np.sin(t)], axis=1)


def _rect(x1: float, y1: float, x2: float, y2: float) -> np.ndarray:
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], dtype=np.float64)


def _poly(*points: tuple[float, float]) -> np.ndarray:
    return np.array(points, dtype=np.float64)


def _circle() -> list[Primitive]:
    return [(_ellipse(0, 0, 1, n=64), True)]


def _square() -> list[Primitive]:
    return [(_rect(-1, -1, 1, 1), True)]


def _triangle() -> list[Primitive]:
    t = np.deg2rad([-90.0, 30.0, 150.0])
    return [(np.stack([np.cos(t), np.sin(t)], axis=1), True)]


def _star() -> list[Primitive]:
    k = np.arange(10)
    r = np.where(k % 2 == 0, 1.0, 0.42)
    t = -np.pi / 2 + k * np.pi / 5
    return [(np.stack([r * np.cos(t), r * np.sin(t)], axis=1), True)]


def _cross() -> list[Primitive]:
    a = 0.34
    return [(_poly((-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a),
                   (-1, -a), (-a, -a)), True)]  # fmt: skip


def _heart() -> list[Primitive]:
    t = np.linspace(0.0, 2.0 * np.pi, 80, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return [(np.stack([x, y], axis=1), True)]


def _crescent() -> list[Primitive]:
    return [(_ellipse(0, 0, 1, n=64), True), (_ellipse(0.45, -0.15, 0.82, n=64), False)]


def _arrow() -> list[Primitive]:
    return [(_poly((-1, -0.2), (0.15, -0.2), (0.15, -0.62), (1, 0), (0.15, 0.62), (0.15, 0.2), (-1, 0.2)), True)]


def _ring() -> list[Primitive]:
    return [(_ellipse(0, 0, 1, n=64), True), (_ellipse(0, 0, 0.58, n=48), False)]


def _lightning_bolt() -> list[Primitive]:
    return [(_poly((0.15, -1), (0.75, -1), (0.25, -0.2), (0.65, -0.2), (-0.35, 1), (-0.05, 0.1),
                   (-0.45, 0.1)), True)]  # fmt: skip


def _house() -> list[Primitive]:
    return [
        (_poly((-1, -0.05), (0, -1), (1, -0.05)), True),  # roof
        (_rect(0.45, -0.8, 0.68, -0.3), True),  # chimney
        (_rect(-0.72, -0.1, 0.72, 1), True),  # walls
        (_rect(-0.2, 0.4, 0.2, 1.05), False),  # door
    ]


def _tree() -> list[Primitive]:
    return [
        (_poly((0, -1), (-0.45, -0.4), (0.45, -0.4)), True),
        (_poly((0, -0.7), (-0.68, 0.1), (0.68, 0.1)), True),
        (_poly((0, -0.3), (-0.9, 0.6), (0.9, 0.6)), True),
        (_rect(-0.15, 0.55, 0.15, 1), True),  # trunk
    ]


def _cloud() -> list[Primitive]:
    return [
        (_ellipse(-0.5, 0.15, 0.38), True),
        (_ellipse(-0.05, -0.12, 0.5), True),
        (_ellipse(0.48, 0.08, 0.42), True),
        (_rect(-0.5, 0.1, 0.48, 0.53), True),
    ]


def _key() -> list[Primitive]:
    return [
        (_ellipse(-0.62, 0, 0.38), True),  # bow
        (_ellipse(-0.62, 0, 0.16, n=24), False),  # its hole
        (_rect(-0.3, -0.12, 1, 0.12), True),  # shaft
        (_rect(0.55, 0.1, 0.68, 0.4), True),  # teeth
        (_rect(0.8, 0.1, 0.95, 0.3), True),
    ]


def _bell() -> list[Primitive]:
    y = np.linspace(-0.82, 0.55, 24)
    top = 0.4 * np.sqrt(np.clip(1 - ((y + 0.45) / 0.37) ** 2, 0, 1))
    half_width = np.where(y < -0.45, top, 0.4 + 0.4 * (y + 0.45) ** 2)
    body = np.concatenate([np.stack([-half_width, y], 1), np.stack([half_width, y], 1)[::-1]])
    return [
        (body, True),
        (_rect(-0.88, 0.5, 0.88, 0.68), True),  # lip
        (_ellipse(0, -0.88, 0.12, n=16), True),  # handle knob
        (_ellipse(0, 0.8, 0.17, n=20), True),  # clapper
    ]


def _spiral() -> list[Primitive]:
    turns, half_width = 2.25, 0.09
    t = np.linspace(0.0, turns * 2 * np.pi, 160)
    r = 0.12 + 0.85 * t / t[-1]
    direction = np.stack([np.cos(t), np.sin(t)], axis=1)
    outer, inner = (r + half_width)[:, None] * direction, (r - half_width)[:, None] * direction
    return [(np.concatenate([outer, inner[::-1]]), True)]


@dataclass(frozen=True)
class ShapeClass:
    """One OV-Shapes class.

    Attributes:
        name: plain-English class name (the COCO category name and first prompt term).
        synonyms: other singular names captions and prompts may use; no term of one class occurs,
            word-bounded, in a term of another class.
        outline: returns the shape as primitives in any coordinates (fitted to [-1, 1]^2 later).
        max_rotation: largest |rotation| in degrees: upright things (house, tree, bell) tilt only a
            little, and 4-fold symmetric shapes need no more than 45.
        min_size: smallest object size (px) at which the class stays legible (thin strokes, holes).
    """

    name: str
    synonyms: tuple[str, ...]
    outline: Callable[[], list[Primitive]]
    max_rotation: float = 180.0
    min_size: float = 16.0

    @property
    def terms(self) -> tuple[str, ...]:
        return (self.name, *self.synonyms)

    def draw_mask(self, affine: np.ndarray, height: int, width: int) -> np.ndarray:
        """Rasterise the shape as a binary mask: the pixels at least half covered by the shape.

        Polygons are filled with OpenCV on a ``_SUPERSAMPLE``-times finer grid over the shape's
        extent, then each pixel counts its covered sub-pixels (OpenCV alone fills every pixel whose
        centre touches the closed polygon, i.e. about half a pixel too much on two sides).

        Args:
            affine: ``float64[2, 3]`` map from unit coordinates to pixel-edge coordinates
                (pixel ``(i, j)`` spans ``[j, j + 1) x [i, i + 1)``).
            height, width: mask size.

        Returns:
            ``uint8[height, width]`` with 1 on the object's pixels.
        """
        prims = unit_primitives(self)
        polys = [poly @ affine[:, :2].T + affine[:, 2] for poly, _ in prims]  # each (P, 2), pixel edges
        extent = np.concatenate([p for p, (_, additive) in zip(polys, prims, strict=True) if additive])
        x0, y0 = np.maximum(np.floor(extent.min(axis=0)).astype(int), 0)
        x1, y1 = np.minimum(np.ceil(extent.max(axis=0)).astype(int), (width, height))
        mask = np.zeros((height, width), dtype=np.uint8)
        if x1 <= x0 or y1 <= y0:
            return mask
        s = _SUPERSAMPLE
        fine = np.zeros(((y1 - y0) * s, (x1 - x0) * s), dtype=np.uint8)
        for pts, (_, additive) in zip(polys, prims, strict=True):
            centred = ((pts - (x0, y0)) * s - 0.5) * (1 << _SUBPIXEL_BITS)  # OpenCV: pixel centres at ints
            cv2.fillPoly(fine, [np.round(centred).astype(np.int32)], int(additive), cv2.LINE_8, _SUBPIXEL_BITS)
        covered = fine.reshape(y1 - y0, s, x1 - x0, s).sum(axis=(1, 3), dtype=np.int32)  # (h, w)
        mask[y0:y1, x0:x1] = covered * 2 >= s * s
        return mask


_SUBPIXEL_BITS = 4  # fixed-point precision of polygon vertices handed to cv2.fillPoly
_SUPERSAMPLE = 4  # sub-pixels per pixel side when rasterising masks


@functools.cache
def unit_primitives(cls: ShapeClass) -> tuple[Primitive, ...]:
    """The class outline, centred and scaled so its additive parts span [-1, 1] on the longer side."""
    prims = cls.outline()
    pts = np.concatenate([p for p, additive in prims if additive])
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    centre, half = (lo + hi) / 2, float((hi - lo).max()) / 2
    return tuple(((p - centre) / half, additive) for p, additive in prims)


CLASSES: tuple[ShapeClass, ...] = (
    ShapeClass("circle", ("disk", "disc", "dot"), _circle),
    ShapeClass("square", ("block", "tile"), _square, max_rotation=45),
    ShapeClass("triangle", ("triangular shape", "wedge"), _triangle),
    ShapeClass("star", ("five-pointed star", "star shape"), _star),
    ShapeClass("cross", ("plus sign", "plus symbol"), _cross, max_rotation=45),
    ShapeClass("heart", ("love heart", "heart shape"), _heart, max_rotation=30),
    ShapeClass("crescent", ("moon", "crescent moon"), _crescent),
    ShapeClass("arrow", ("arrow sign", "pointer"), _arrow),
    ShapeClass("ring", ("hoop", "loop"), _ring, min_size=20),
    ShapeClass("lightning bolt", ("thunderbolt", "bolt"), _lightning_bolt, max_rotation=30, min_size=20),
    ShapeClass("house", ("hut", "cottage", "home"), _house, max_rotation=20, min_size=20),
    ShapeClass("tree", ("pine tree", "fir tree", "christmas tree"), _tree, max_rotation=15, min_size=20),
    ShapeClass("cloud", ("puffy cloud", "cumulus cloud"), _cloud, max_rotation=15),
    ShapeClass("key", ("door key", "latchkey"), _key, min_size=28),
    ShapeClass("bell", ("church bell", "handbell"), _bell, max_rotation=25, min_size=20),
    ShapeClass("spiral", ("swirl", "coil"), _spiral, min_size=32),
)
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in CLASSES)
DEFAULT_NOVEL: tuple[str, ...] = ("heart", "crescent", "ring", "lightning bolt", "tree", "key")

# Named colours (RGB). No colour name is a class term.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (240, 220, 40),
    "orange": (250, 140, 20), "purple": (140, 50, 180), "pink": (245, 120, 180), "white": (245, 245, 245),
    "black": (20, 20, 20), "brown": (130, 80, 40), "cyan": (40, 200, 220), "gray": (128, 128, 128),
}  # fmt: skip
PALETTE_NAMES = tuple(PALETTE)
PALETTE_RGB = np.array([PALETTE[n] for n in PALETTE_NAMES], dtype=np.float64)  # (12, 3)


def plural(term: str) -> str:
    """English plural of a class term (``cross`` → ``crosses``, ``lightning bolt`` → ``lightning bolts``)."""
    return term + ("es" if term.endswith(("s", "x", "ch", "sh")) else "s")


def synonyms() -> dict[int, list[str]]:
    """``{category id (1..K): [name, synonyms...]}`` of the classes, in :data:`CLASSES` order."""
    return {k + 1: list(cls.terms) for k, cls in enumerate(CLASSES)}
