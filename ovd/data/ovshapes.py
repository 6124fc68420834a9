"""OV-Shapes: a built-in, procedurally generated open-vocabulary detection world.

It follows the OV-COCO protocol (METHOD §6.1) in miniature:

* ``annotations/train.json``: boxes of **base** classes only. Novel objects are drawn in the train
  images but left unannotated, and every train image holds at least one base object.
* ``annotations/val.json``: boxes of **all** classes.
* ``annotations/captions_train.json``: COCO-captions style, several captions per train image naming
  every object with its colour, by its name or a synonym (the image-level source of METHOD §4.1).
  Captions hold no punctuation and mention every present class at least once in the singular, so the
  §4.1 rule (``' ' + synonym + ' '`` in the joined captions) tags exactly the objects present.
* ``categories`` (in every file): all ``K`` classes with ids ``1..K`` in :data:`CLASSES` order, each
  with ``"synonyms"`` and ``"split"`` (``"base"`` / ``"novel"``).
* Each annotation carries ``bbox`` (COCO ``xywh``, the tight box of the object's own full mask in
  pixel-edge coordinates), ``area`` (mask pixels), ``segmentation`` (compressed COCO RLE of that
  mask, exact) and ``color``.

Files live under ``root/ovshapes/<preset>/``: ``train/*.png``, ``val/*.png`` and the JSON files, which
are written last (``train.json`` very last), each atomically: its presence means the world is complete.

Determinism: image ``i`` of a split is drawn from its own ``numpy`` generator seeded with
``(seed, stream(split), i)``, so the output is byte-identical for a seed whatever the worker count.
:func:`render_object_crops` uses another stream, so its crops never coincide with val images.

Shape shorthand: ``N`` objects of one image, ``K`` classes, ``P`` polygon points.
"""

from __future__ import annotations

import functools
import logging
import math
import multiprocessing
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_util

from ovd.data.catalog import DatasetInfo, datasets_root, register_dataset
from ovd.errors import OVDError
from ovd.utils.io import atomic_write, read_json, write_json

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the drawing changes, so stale folders are not mistaken for current ones

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
        prims = _unit_primitives(self)
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
def _unit_primitives(cls: ShapeClass) -> tuple[Primitive, ...]:
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
_PALETTE_NAMES = tuple(PALETTE)
_PALETTE_RGB = np.array([PALETTE[n] for n in _PALETTE_NAMES], dtype=np.float64)  # (12, 3)

# ----------------------------------------------------------------------------------------------
# Presets


@dataclass(frozen=True)
class OVShapesPreset:
    """Size and difficulty of one generated world (``root/ovshapes/<name>/``).

    Attributes:
        name: folder name of the world.
        num_train, num_val: number of images.
        image_size: (min, max) side length in px; height and width are drawn independently.
        objects_per_image: (min, max) objects drawn per image (fewer if placement keeps failing).
        object_size: (min, max) object size in px (longer side of the unrotated shape), log-uniform.
        clutter_per_image: (min, max) distractor strokes and blobs (no class) per image.
        captions_per_image: captions per train image (the first enumerates objects in the singular).
        max_box_iou: a placement whose box IoU with an earlier object exceeds this is redrawn.
        max_occlusion: largest share of an earlier object's mask that later objects may cover.
    """

    name: str
    num_train: int
    num_val: int
    image_size: tuple[int, int] = (224, 288)
    objects_per_image: tuple[int, int] = (1, 6)
    object_size: tuple[float, float] = (16.0, 120.0)
    clutter_per_image: tuple[int, int] = (0, 6)
    captions_per_image: int = 2
    max_box_iou: float = 0.3
    max_occlusion: float = 0.2

    def __post_init__(self) -> None:
        def check(ok: bool, what: str) -> None:
            if not ok:
                raise OVDError(f"invalid OV-Shapes preset: {what}", field=f"preset[{self.name}]")

        check(re.fullmatch(r"[A-Za-z0-9_.-]+", self.name) is not None, "name must be a plain folder name")
        check(self.num_train >= 1 and self.num_val >= 1, "num_train and num_val must be >= 1")
        for label, (lo, hi) in (
            ("image_size", self.image_size),
            ("objects_per_image", self.objects_per_image),
            ("object_size", self.object_size),
            ("clutter_per_image", self.clutter_per_image),
        ):
            check(0 <= lo <= hi, f"{label} must be (min, max) with 0 <= min <= max")
        check(self.image_size[0] >= 64, "image_size min must be >= 64")
        check(self.objects_per_image[0] >= 1, "objects_per_image min must be >= 1")
        check(self.object_size[0] >= 8, "object_size min must be >= 8")
        check(self.captions_per_image >= 1, "captions_per_image must be >= 1")
        check(0 <= self.max_box_iou <= 1 and 0 <= self.max_occlusion <= 1, "overlap limits lie in [0, 1]")


PRESETS: dict[str, OVShapesPreset] = {
    "small": OVShapesPreset("small", num_train=48, num_val=24),
    "default": OVShapesPreset("default", num_train=1500, num_val=300),
    # a development split for choosing recipes, so that `default`'s val split stays a test set: the val
    # split of another world drawn with DEV_SEED (its one training image is never used)
    "dev": OVShapesPreset("dev", num_train=1, num_val=300),
}
DEV_SEED = 1
"""Seed of the ``dev`` preset's world (the registered worlds use seed 0)."""

_STREAMS = {"train": 0, "val": 1, "crops": 2, "captions": 3}  # seed streams: crops never reuse val's
_MAX_TRIES = 30  # placement attempts per object
_ASPECT_JITTER = 0.15  # |log| of the per-object aspect stretch
_MIN_CONTRAST = 90.0  # RGB distance wanted between an object's colour and the background under it
_PARALLEL_MIN_IMAGES = 256  # below this, generate in-process (pool start-up is not worth it)
# fast zlib level with run-length matching: ~25 % quicker and ~8 % smaller than the default on these images
_PNG_PARAMS = (cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE)
ANNOTATION_FILES = ("val.json", "captions_train.json", "train.json")  # write order; train.json last


def resolve_preset(preset: str | OVShapesPreset) -> OVShapesPreset:
    """A preset by name (or itself). Unknown names raise :class:`OVDError` listing the valid ones."""
    if isinstance(preset, OVShapesPreset):
        return preset
    if preset not in PRESETS:
        raise OVDError(f"unknown OV-Shapes preset {preset!r} (valid: {', '.join(sorted(PRESETS))})")
    return PRESETS[preset]


def resolve_novel(novel: Sequence[str] | None = None) -> tuple[int, ...]:
    """Contiguous ids (sorted) of the novel classes; ``None`` means :data:`DEFAULT_NOVEL`."""
    names = DEFAULT_NOVEL if novel is None else tuple(novel)
    unknown = [n for n in names if n not in CLASS_NAMES]
    if unknown:
        raise OVDError(f"unknown OV-Shapes class {unknown[0]!r} (valid: {', '.join(CLASS_NAMES)})")
    ids = tuple(sorted({CLASS_NAMES.index(n) for n in names}))
    if len(ids) == len(CLASSES):
        raise OVDError("at least one OV-Shapes class must stay base")
    return ids


# ----------------------------------------------------------------------------------------------
# Captions and prompts

_COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_PREFIXES = ("a picture of", "an image of", "a drawing of", "a scene with", "a synthetic image showing", "")
_CONNECTORS = ("and", "next to", "with", "beside", "as well as")
_BACKGROUND_WORDS = {
    "plain": ("a plain background", "a uniform background", "a flat background"),
    "gradient": ("a gradient background", "a shaded background", "a smooth gradient"),
    "noisy": ("a noisy background", "a mottled background", "a textured background"),
    "striped": ("a striped background", "stripes", "a background of stripes"),
}
_BACKGROUND_LINKS = ("on", "over", "against", "in front of")
PROMPT_TEMPLATES = (
    "a photo of a {colour} {term}",
    "a {colour} {term}",
    "a {term}",
    "a photo of a {term}",
    "a drawing of a {colour} {term}",
    "an image of a {term}",
    "the {colour} {term}",
    "{term}",
)


def _pick(rng: np.random.Generator, seq: Sequence[str]) -> str:
    return seq[int(rng.integers(len(seq)))]


def _with_article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def plural(term: str) -> str:
    """English plural of a class term (``cross`` → ``crosses``, ``lightning bolt`` → ``lightning bolts``)."""
    return term + ("es" if term.endswith(("s", "x", "ch", "sh")) else "s")


def _term(rng: np.random.Generator, class_id: int) -> str:
    cls = CLASSES[class_id]
    return cls.name if rng.random() < 0.5 else _pick(rng, cls.synonyms)


def caption_for(class_name: str, colour: str | None, rng: np.random.Generator) -> str:
    """A prompt-style caption of one object: ``"a photo of a red star"``, ``"a moon"``, ...

    The class is named by its name or a synonym; templates with a colour are skipped when ``colour``
    is ``None``. Articles follow the next word (``"an orange arrow"``).
    """
    if class_name not in CLASS_NAMES:
        raise OVDError(f"unknown OV-Shapes class {class_name!r} (valid: {', '.join(CLASS_NAMES)})")
    templates = [t for t in PROMPT_TEMPLATES if colour is not None or "{colour}" not in t]
    text = _pick(rng, templates).format(colour=colour, term=_term(rng, CLASS_NAMES.index(class_name)))
    return re.sub(r"\ba ([aeiou])", r"an \1", text)


def _assemble(rng: np.random.Generator, phrases: list[str], background: str) -> str:
    words = [phrases[0]]
    for phrase in phrases[1:]:
        words += [_pick(rng, _CONNECTORS), phrase]
    prefix = _pick(rng, _PREFIXES)
    if prefix:
        words.insert(0, prefix)
    if rng.random() < 0.75:
        words += [_pick(rng, _BACKGROUND_LINKS), _pick(rng, _BACKGROUND_WORDS[background])]
    return " ".join(words)


def _enumerated_caption(rng: np.random.Generator, objects: list[tuple[int, str]], background: str) -> str:
    """Every object in the singular: ``"a red star next to a moon and another blue moon"``."""
    seen: set[int] = set()
    phrases = []
    for i in rng.permutation(len(objects)):
        class_id, colour = objects[i]
        head = f"{colour} {_term(rng, class_id)}" if rng.random() < 0.8 else _term(rng, class_id)
        phrases.append(f"another {head}" if class_id in seen else _with_article(head))
        seen.add(class_id)
    return _assemble(rng, phrases, background)


def _grouped_caption(rng: np.random.Generator, objects: list[tuple[int, str]], background: str) -> str:
    """Objects counted per class (and colour): ``"two blue moons and a red star"``."""
    by_colour = rng.random() < 0.7
    groups: dict[tuple[int, str], int] = {}
    for class_id, colour in objects:
        key = (class_id, colour if by_colour else "")
        groups[key] = groups.get(key, 0) + 1
    keys = list(groups)
    phrases = []
    for i in rng.permutation(len(keys)):
        (class_id, colour), count = keys[i], groups[keys[i]]
        noun = _term(rng, class_id) if count == 1 else plural(_term(rng, class_id))
        head = f"{colour} {noun}" if colour else noun
        phrases.append(_with_article(head) if count == 1 else f"{_COUNT_WORDS[count]} {head}")
    return _assemble(rng, phrases, background)


def make_captions(rng: np.random.Generator, objects: list[tuple[int, str]], background: str, n: int) -> list[str]:
    """``n`` captions naming exactly ``objects`` (``(class_id, colour)`` pairs); the first is enumerated."""
    return [
        (_enumerated_caption if i == 0 or rng.random() < 0.3 else _grouped_caption)(rng, objects, background)
        for i in range(n)
    ]


# ----------------------------------------------------------------------------------------------
# Rendering


def _rng(seed: int, stream: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _STREAMS[stream], index]))


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    base = rng.uniform(40, 215, 3)
    return base.mean() + (base - base.mean()) * 0.5  # half the saturation: objects stand out


def _background(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, str]:
    """A textured background: ``float32[H, W, 3]`` RGB and its kind (a key of ``_BACKGROUND_WORDS``)."""
    kind = _pick(rng, tuple(_BACKGROUND_WORDS))
    c1, c2 = _muted_colour(rng).astype(np.float32), _muted_colour(rng).astype(np.float32)
    angle = rng.uniform(0, np.pi)
    xs = np.arange(width, dtype=np.float32) * np.float32(np.cos(angle))  # (W,)
    ys = np.arange(height, dtype=np.float32) * np.float32(np.sin(angle))  # (H,)
    along = ys[:, None] + xs[None, :]  # (H, W)
    if kind == "plain":
        t = np.zeros((height, width), np.float32)
    elif kind == "gradient":
        t = (along - along.min()) / max(float(along.max() - along.min()), 1.0)
    elif kind == "noisy":
        grid = rng.random((int(rng.integers(3, 13)), int(rng.integers(3, 13)))).astype(np.float32)
        t = np.clip(cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC), 0, 1)
        t = t + np.float32(0.08) * rng.standard_normal((height, width), dtype=np.float32)
    else:  # striped
        period = rng.uniform(6, 28)
        t = np.sin(along * np.float32(2 * np.pi / period) + np.float32(rng.uniform(0, 2 * np.pi))) > 0
        t = t.astype(np.float32)
    return c1 + (c2 - c1) * t[..., None], kind


def _draw_clutter(rng: np.random.Generator, image: np.ndarray, n: int) -> None:
    """Distractors that are no class: thin lines, scribbles and small jagged blobs (in place)."""
    height, width = image.shape[:2]
    for _ in range(n):
        colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
        kind = int(rng.integers(3))
        start = rng.uniform((0, 0), (width, height))
        if kind == 0:
            angle = rng.uniform(0, 2 * np.pi)
            end = start + rng.uniform(20, 120) * np.array([np.cos(angle), np.sin(angle)])
            ends = [(int(x), int(y)) for x, y in (start, end)]
            cv2.line(image, ends[0], ends[1], colour, int(rng.integers(1, 3)), cv2.LINE_AA)
        elif kind == 1:
            pts = start + np.cumsum(rng.uniform(-18, 18, (int(rng.integers(3, 7)), 2)), axis=0)
            cv2.polylines(image, [pts.astype(np.int32)], False, colour, int(rng.integers(1, 3)), cv2.LINE_AA)
        else:
            k = int(rng.integers(7, 12))
            t = np.sort(rng.uniform(0, 2 * np.pi, k))
            r = rng.uniform(2, 7) * rng.uniform(0.4, 1.0, k)
            pts = start + np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
            cv2.fillPoly(image, [pts.astype(np.int32)], colour, cv2.LINE_AA)


@dataclass
class _Placed:
    class_id: int
    mask: np.ndarray  # uint8[H, W], the object's own full mask
    box: tuple[int, int, int, int]  # xyxy pixel edges, tight on mask
    area: int
    colour: str = ""


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _box_iou(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _random_linear(rng: np.random.Generator, cls: ShapeClass, size: float) -> tuple[np.ndarray, ...]:
    """Random rotation, stretch and flip at ``size`` px.

    Returns:
        ``float64[2, 2]`` linear map from unit coordinates to px, and the low and high corners
        (``float64[2]`` each) of the mapped shape's extent relative to its centre.
    """
    aspect = math.exp(rng.uniform(-_ASPECT_JITTER, _ASPECT_JITTER))
    flip = -1.0 if rng.random() < 0.5 else 1.0
    angle = np.deg2rad(rng.uniform(-cls.max_rotation, cls.max_rotation))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    linear = rot @ np.diag([flip * aspect * size / 2, size / 2 / aspect])  # (2, 2)
    pts = np.concatenate([p for p, additive in _unit_primitives(cls) if additive]) @ linear.T  # (P, 2)
    return linear, pts.min(axis=0), pts.max(axis=0)


def _object_affine(
    rng: np.random.Generator, cls: ShapeClass, size: float, height: int, width: int, margin: int = 1
) -> np.ndarray:
    """A random :func:`_random_linear` pose, shrunk if needed and translated to lie inside the image."""
    linear, lo, hi = _random_linear(rng, cls, size)
    fit = min(1.0, (width - 2 * margin) / (hi[0] - lo[0]), (height - 2 * margin) / (hi[1] - lo[1]))
    linear, lo, hi = linear * fit, lo * fit, hi * fit
    low = margin - lo  # (2,) lowest centre that keeps the shape inside
    high = np.maximum(np.array([width, height]) - margin - hi, low)  # equal when the shape fills the image
    return np.hstack([linear, rng.uniform(low, high)[:, None]])


def _sample_size(rng: np.random.Generator, cls: ShapeClass, lo: float, hi: float, height: int, width: int) -> float:
    hi = min(hi, 0.9 * min(height, width))
    lo = min(max(lo, cls.min_size), hi)
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def _place_objects(
    rng: np.random.Generator, class_ids: Sequence[int], preset: OVShapesPreset, height: int, width: int
) -> list[_Placed]:
    """Place objects in order; a placement breaking the overlap limits is redrawn, then dropped."""
    placed: list[_Placed] = []
    owner = np.full((height, width), -1, dtype=np.int8)  # index of the top-most object per pixel
    visible: list[int] = []  # pixels of each placed object not covered by later ones
    for class_id in class_ids:
        cls = CLASSES[class_id]
        for _ in range(_MAX_TRIES):
            size = _sample_size(rng, cls, *preset.object_size, height, width)
            mask = cls.draw_mask(_object_affine(rng, cls, size, height, width), height, width)
            box = _tight_box(mask)
            if box is None or any(_box_iou(box, p.box) > preset.max_box_iou for p in placed):
                continue
            on = mask.astype(bool)
            covered = np.bincount(owner[on] + 1, minlength=len(placed) + 1)[1:]  # (N,)
            left = [v - int(c) for v, c in zip(visible, covered, strict=True)]
            if any(v < (1 - preset.max_occlusion) * p.area for v, p in zip(left, placed, strict=True)):
                continue
            owner[on] = len(placed)
            placed.append(_Placed(class_id, mask, box, int(on.sum())))
            visible = [*left, placed[-1].area]
            break
    return placed


def _paint(rng: np.random.Generator, image: np.ndarray, background: np.ndarray, obj: _Placed) -> None:
    """Colour an object (in place): a palette colour that contrasts with the background, shaded."""
    x1, y1, x2, y2 = obj.box
    m = obj.mask[y1:y2, x1:x2].astype(bool)
    under = background[y1:y2, x1:x2][m].mean(axis=0)  # (3,)
    order = rng.permutation(len(PALETTE))  # (12,) colours in random order
    distance = np.linalg.norm(_PALETTE_RGB[order] - under, axis=1)  # (12,)
    far = np.flatnonzero(distance >= _MIN_CONTRAST)
    pick = order[far[0]] if far.size else order[int(np.argmax(distance))]
    obj.colour = _PALETTE_NAMES[pick]
    rgb = np.clip(_PALETTE_RGB[pick] + rng.uniform(-15, 15, 3), 0, 255).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    gx = np.linspace(-1, 1, x2 - x1, dtype=np.float32) * np.float32(np.cos(angle))  # (w,)
    gy = np.linspace(-1, 1, y2 - y1, dtype=np.float32) * np.float32(np.sin(angle))  # (h,)
    shade = 1 + np.float32(rng.uniform(0, 0.18)) * (gy[:, None] + gx[None, :])  # (h, w)
    fill = rgb * shade[..., None]  # (h, w, 3)
    if rng.random() < 0.3:  # dark outline, inside the mask
        inner = cv2.erode(obj.mask[y1:y2, x1:x2], np.ones((3, 3), np.uint8)).astype(bool)
        fill[m & ~inner] *= 0.5
    image[y1:y2, x1:x2][m] = fill[m]


def render_image(
    preset: str | OVShapesPreset, seed: int, split: str, index: int, novel: Sequence[str] | None = None
) -> tuple[np.ndarray, list[dict], str]:
    """Draw image ``index`` of ``split`` exactly as :func:`generate_ovshapes` writes it.

    Returns:
        ``uint8[H, W, 3]`` RGB image; its objects (novel ones included), each
        ``{"class_id", "colour", "box" (xyxy pixel edges), "mask" (uint8[H, W])}``; the background kind.
    """
    preset = resolve_preset(preset)
    if split not in ("train", "val"):
        raise OVDError(f"unknown split {split!r} (valid: train, val)")
    novel_ids = resolve_novel(novel)
    _check_seed(seed)
    rng = _rng(seed, split, index)
    height, width = (int(v) for v in rng.integers(preset.image_size[0], preset.image_size[1] + 1, 2))
    background, kind = _background(rng, height, width)
    image = background.copy()
    _draw_clutter(rng, image, int(rng.integers(preset.clutter_per_image[0], preset.clutter_per_image[1] + 1)))
    n = int(rng.integers(preset.objects_per_image[0], preset.objects_per_image[1] + 1))
    class_ids = [int(c) for c in rng.integers(0, len(CLASSES), n)]
    base_ids = [c for c in range(len(CLASSES)) if c not in novel_ids]
    if split == "train":  # like OV-COCO: every train image has a base box; it goes first, so it fits
        first_base = next((i for i, c in enumerate(class_ids) if c not in novel_ids), None)
        if first_base is None:
            class_ids[0] = base_ids[int(rng.integers(len(base_ids)))]
        else:
            class_ids.insert(0, class_ids.pop(first_base))
    objects = _place_objects(rng, class_ids, preset, height, width)
    for obj in objects:
        _paint(rng, image, background, obj)
    if rng.random() < 0.5:  # sensor noise on half of the images
        image += np.float32(rng.uniform(1, 6)) * rng.standard_normal(image.shape, dtype=np.float32)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return (
        image,
        [{"class_id": o.class_id, "colour": o.colour, "box": o.box, "mask": o.mask} for o in objects],
        kind,
    )


def _render_record(job: tuple[OVShapesPreset, int, str, int, tuple[str, ...], str]) -> dict:
    """Render one image, write its PNG, return its JSON pieces (worker function)."""
    preset, seed, split, index, novel, out_dir = job
    image, objects, kind = render_image(preset, seed, split, index, novel)
    file_name = f"{split}_{index:06d}.png"
    ok, png = cv2.imencode(".png", image[:, :, ::-1], _PNG_PARAMS)  # RGB → BGR for OpenCV
    if not ok:  # pragma: no cover - OpenCV failure
        raise OVDError("PNG encoding failed", path=Path(out_dir) / file_name)
    atomic_write(Path(out_dir) / file_name, lambda tmp: Path(tmp).write_bytes(png.tobytes()))
    anns = []
    for obj in objects:
        rle = mask_util.encode(np.asfortranarray(obj["mask"]))
        x1, y1, x2, y2 = obj["box"]
        anns.append(
            {
                "class_id": obj["class_id"],
                "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                "area": float(obj["mask"].sum()),
                "segmentation": {
                    "size": [int(v) for v in rle["size"]],
                    "counts": rle["counts"].decode("ascii"),
                },
                "color": obj["colour"],
            }
        )
    record = {
        "image": {"file_name": file_name, "height": image.shape[0], "width": image.shape[1]},
        "anns": anns,
    }
    if split == "train":
        rng = _rng(seed, "captions", index)
        pairs = [(o["class_id"], o["colour"]) for o in objects]
        record["captions"] = make_captions(rng, pairs, kind, preset.captions_per_image)
    return record


def _worker_init() -> None:
    cv2.setNumThreads(1)


def _render_all(jobs: list[tuple], workers: int) -> list[dict]:
    if workers <= 1 or len(jobs) < _PARALLEL_MIN_IMAGES or "fork" not in multiprocessing.get_all_start_methods():
        return [_render_record(job) for job in jobs]
    with multiprocessing.get_context("fork").Pool(workers, initializer=_worker_init) as pool:
        return pool.map(_render_record, jobs, chunksize=16)  # ordered: output does not depend on workers


# ----------------------------------------------------------------------------------------------
# Generation


def categories(novel_ids: Sequence[int]) -> list[dict]:
    """COCO categories of all classes, ids ``1..K`` in :data:`CLASSES` order, with synonyms and split."""
    return [
        {
            "id": k + 1,
            "name": c.name,
            "supercategory": "shape",
            "synonyms": list(c.terms),
            "split": "novel" if k in novel_ids else "base",
        }
        for k, c in enumerate(CLASSES)
    ]


def _world_info(preset: OVShapesPreset, seed: int, novel_ids: Sequence[int]) -> dict:
    return {
        "description": "OV-Shapes: synthetic open-vocabulary detection world (OV-COCO protocol in miniature)",
        "version": FORMAT_VERSION,
        "preset": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(preset).items()},
        "seed": seed,
        "novel": [CLASS_NAMES[k] for k in novel_ids],
    }


def _is_complete(folder: Path, info: dict, overwrite: bool) -> bool:
    if not all((folder / "annotations" / f).is_file() for f in ANNOTATION_FILES):
        return False
    found = read_json(folder / "annotations" / "train.json").get("info")
    if found == info:
        return True
    if overwrite:
        return False
    raise OVDError(
        f"holds another OV-Shapes world (info {found}, wanted {info}); "
        "pass overwrite=True (--overwrite) or choose another root",
        path=folder,
    )


def generate_ovshapes(
    root: str | os.PathLike[str] | None = None,
    preset: str | OVShapesPreset = "default",
    seed: int = 0,
    novel: Sequence[str] | None = None,
    *,
    workers: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Generate an OV-Shapes world under ``root/ovshapes/<preset.name>/`` (skipped when complete).

    Args:
        root: datasets root; ``None`` means :func:`ovd.data.catalog.datasets_root`.
        preset: a name in :data:`PRESETS` or an :class:`OVShapesPreset`.
        seed: non-negative seed; the same seed gives byte-identical files.
        novel: names of the novel classes (default :data:`DEFAULT_NOVEL`); all others are base.
        workers: processes used to draw images (default: up to 2); the output does not depend on it.
        overwrite: regenerate a complete folder that was made with other settings instead of raising.

    Returns:
        The world's folder.

    Raises:
        OVDError: unknown preset or class name, negative seed, or a complete folder made with other
            settings (without ``overwrite``).
    """
    preset = resolve_preset(preset)
    novel_ids = resolve_novel(novel)
    _check_seed(seed)
    folder = Path(datasets_root() if root is None else root) / "ovshapes" / preset.name
    info = _world_info(preset, seed, novel_ids)
    if _is_complete(folder, info, overwrite):
        return folder
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    novel_names = tuple(CLASS_NAMES[k] for k in novel_ids)
    jobs = [
        (preset, seed, split, i, novel_names, str(folder / split))
        for split, count in (("train", preset.num_train), ("val", preset.num_val))
        for i in range(count)
    ]
    for split in ("train", "val"):
        (folder / split).mkdir(parents=True, exist_ok=True)
    rendered = _render_all(jobs, workers)
    records = {"train": rendered[: preset.num_train], "val": rendered[preset.num_train :]}
    cats = categories(novel_ids)
    coco = {s: _coco_json(records[s], s, info, cats, novel_ids) for s in ("train", "val")}
    captions = {
        "info": info,
        "images": coco["train"]["images"],
        "annotations": _caption_annotations(coco["train"]["images"], records["train"]),
    }
    write_json(folder / "annotations" / "val.json", coco["val"], indent=None)
    write_json(folder / "annotations" / "captions_train.json", captions, indent=None)
    write_json(folder / "annotations" / "train.json", coco["train"], indent=None)  # last: marks completion
    logger.info("OV-Shapes %r (seed %d) written to %s", preset.name, seed, folder)
    return folder


def _caption_annotations(images: list[dict], records: list[dict]) -> list[dict]:
    anns = []
    for image, rec in zip(images, records, strict=True):
        for caption in rec["captions"]:
            anns.append({"id": len(anns) + 1, "image_id": image["id"], "caption": caption})
    return anns


_VAL_ID_OFFSET = 1_000_000  # val image ids follow train ids' range so the two never collide


def _coco_json(records: list[dict], split: str, info: dict, cats: list[dict], novel_ids: Sequence[int]) -> dict:
    """COCO instances JSON of one split; on train, novel objects get no annotation."""
    images, anns = [], []
    for i, rec in enumerate(records):
        image_id = i + 1 + (_VAL_ID_OFFSET if split == "val" else 0)
        images.append({"id": image_id, **rec["image"]})
        for ann in rec["anns"]:
            if split == "train" and ann["class_id"] in novel_ids:
                continue
            rest = {k: v for k, v in ann.items() if k != "class_id"}
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": ann["class_id"] + 1,
                         "iscrowd": 0, **rest})  # fmt: skip
    return {"info": info, "images": images, "annotations": anns, "categories": cats}


# ----------------------------------------------------------------------------------------------
# Crops for a CLIP teacher


def render_object_crops(
    n: int,
    seed: int,
    *,
    size: int = 64,
    classes: Sequence[str] | None = None,
    partial_prob: float = 0.25,
    context_prob: float = 0.3,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Crops of single objects for training a small CLIP teacher (own seed stream, disjoint from val).

    Each crop is the object's tight box, jittered in position and scale (the object spans 55-100 %
    of the crop), on a textured background with clutter, drawn directly at ``size`` px. With
    ``partial_prob`` the crop cuts 20-45 % of the object off; with ``context_prob`` a piece of another
    object shows beside it.

    Args:
        n: number of crops.
        seed: non-negative seed; crop ``i`` depends only on ``(seed, i)``.
        size: output side in px.
        classes: class names to draw from (default: all), uniformly.

    Returns:
        ``uint8[n, size, size, 3]`` RGB crops, ``int64[n]`` contiguous class ids (into :data:`CLASSES`)
        and ``n`` prompt-style captions from :func:`caption_for`.
    """
    _check_seed(seed)
    pool = list(range(len(CLASSES))) if classes is None else [CLASS_NAMES.index(c) for c in _known(classes)]
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    class_ids = np.zeros((n,), dtype=np.int64)
    captions = []
    for i in range(n):
        rng = _rng(seed, "crops", i)
        class_ids[i] = class_id = pool[int(rng.integers(len(pool)))]
        cls = CLASSES[class_id]
        background, _ = _background(rng, size, size)
        image = background.copy()
        _draw_clutter(rng, image, int(rng.integers(0, 4)))
        # the object's longer box side covers 55-100 % of the crop (box jitter in scale) ...
        target = max(size * math.exp(-rng.uniform(0.0, 0.6)), min(cls.min_size, size))
        linear, lo, hi = _random_linear(rng, cls, 1.0)
        k = target / float((hi - lo).max())
        linear, lo, hi = linear * k, lo * k, hi * k
        centre = size / 2 - (lo + hi) / 2 + rng.normal(0, 0.06 * size, 2)  # ... and in position
        if rng.random() < partial_prob:  # 20-45 % of the box leaves the crop on one side
            axis = int(rng.integers(2))
            cut = rng.uniform(0.2, 0.45) * (hi - lo)[axis]
            centre[axis] = size + cut - hi[axis] if rng.random() < 0.5 else -cut - lo[axis]
        mask = cls.draw_mask(np.hstack([linear, centre[:, None]]), size, size)
        obj = _Placed(class_id, mask, _tight_box(mask) or (0, 0, size, size), int(mask.sum()))
        if rng.random() < context_prob:  # part of another object, clear of this one's box
            other_id = int(rng.integers(len(CLASSES)))
            other = CLASSES[other_id]
            x1, y1, x2, y2 = obj.box
            for _ in range(_MAX_TRIES):
                lin, _, _ = _random_linear(rng, other, target * math.exp(rng.uniform(-0.3, 0.3)))
                m = other.draw_mask(np.hstack([lin, rng.uniform(-0.25 * size, 1.25 * size, (2, 1))]), size, size)
                box = _tight_box(m)
                if box is not None and _box_iou(box, (x1 - 2, y1 - 2, x2 + 2, y2 + 2)) == 0:
                    _paint(rng, image, background, _Placed(other_id, m, box, int(m.sum())))
                    break
        _paint(rng, image, background, obj)
        if rng.random() < 0.5:
            image += np.float32(rng.uniform(1, 6)) * rng.standard_normal(image.shape, dtype=np.float32)
        images[i] = np.clip(np.rint(image), 0, 255).astype(np.uint8)
        captions.append(caption_for(cls.name, obj.colour, rng))
    return images, class_ids, captions


def _known(names: Sequence[str]) -> Sequence[str]:
    if not names:
        raise OVDError(f"no OV-Shapes class given (valid: {', '.join(CLASS_NAMES)})")
    unknown = [n for n in names if n not in CLASS_NAMES]
    if unknown:
        raise OVDError(f"unknown OV-Shapes class {unknown[0]!r} (valid: {', '.join(CLASS_NAMES)})")
    return names


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise OVDError(f"seed must be a non-negative int, got {seed!r}")


# ----------------------------------------------------------------------------------------------
# Catalog


def _prepare(preset_name: str, info: DatasetInfo, seed: int = 0) -> None:
    generate_ovshapes(datasets_root(), preset_name, seed=seed)


def _prepare_tags(preset_name: str, info: DatasetInfo) -> None:
    """Write the caption tags of the training images (generating the world first when missing)."""
    from ovd.data.captions import ovshapes_synonyms, tag_captions

    captions = info.resolve(info.extra["captions"])
    if not captions.is_file():
        generate_ovshapes(datasets_root(), preset_name, seed=0)
    train = read_json(captions.parent / "train.json")
    tags = tag_captions(read_json(captions), train["categories"], synonyms=ovshapes_synonyms(), path=str(captions))
    write_json(info.ann_file_path, tags)


def register_ovshapes() -> None:
    """Register ``ovshapes_{train,val}`` (default preset), ``ovshapes_small_{train,val}`` and
    ``ovshapes_dev`` (the val split of the ``dev`` preset's world, for choosing recipes).

    Seed 0 (:data:`DEV_SEED` for ``dev``) and :data:`DEFAULT_NOVEL`; each entry generates its world
    under the datasets root on first use. Calling it again re-registers the same entries.
    """
    novel = resolve_novel(None)
    common = dict(
        class_names=CLASS_NAMES,
        category_ids=tuple(range(1, len(CLASSES) + 1)),
        base_classes=tuple(k for k in range(len(CLASSES)) if k not in novel),
        novel_classes=novel,
    )
    for prefix, preset in (("ovshapes", "default"), ("ovshapes_small", "small")):
        folder = f"ovshapes/{preset}"
        prepare = functools.partial(_prepare, preset)
        for split in ("train", "val"):
            extra = {"preset": preset}
            if split == "train":
                extra["captions"] = f"{folder}/annotations/captions_train.json"
            info = DatasetInfo(
                name=f"{prefix}_{split}",
                image_root=f"{folder}/{split}",
                ann_file=f"{folder}/annotations/{split}.json",
                prepare=prepare,
                extra=extra,
                **common,
            )
            register_dataset(info, overwrite=True)
        # the caption tags of the training images: image-level labels of all classes (PIS, METHOD §4.1)
        register_dataset(
            DatasetInfo(
                name=f"{prefix}_captions",
                image_root=f"{folder}/train",
                ann_file=f"{folder}/annotations/captions_train_tags.json",
                ann_type="image",
                prepare=functools.partial(_prepare_tags, preset),
                extra={
                    "preset": preset,
                    "captions": f"{folder}/annotations/captions_train.json",
                    "synonyms": "ovshapes",  # the tagging table: ovd.data.captions.synonym_table
                },
                **common,
            ),
            overwrite=True,
        )
    register_dataset(
        DatasetInfo(
            name="ovshapes_dev",
            image_root="ovshapes/dev/val",
            ann_file="ovshapes/dev/annotations/val.json",
            prepare=functools.partial(_prepare, "dev", seed=DEV_SEED),
            extra={"preset": "dev", "seed": DEV_SEED},
            **common,
        ),
        overwrite=True,
    )
