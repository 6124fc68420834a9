"""OV-Shapes-LT's long tail: the presets, the declared r / c / f groups and the per-class image targets.

See :mod:`ovd.data.ovshapes_lt` (which re-exports these names) for the protocol; this module holds the
numbers that define a world's tail, so they can be read without the generator.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from ovd.data.ovshapes_meta import CLASS_NAMES, CLASSES
from ovd.data.ovshapes_render import drawing_problem
from ovd.errors import OVDError

FREQUENT, COMMON, RARE = "f", "c", "r"
TAIL: tuple[tuple[str, str], ...] = (
    ("circle", FREQUENT), ("square", FREQUENT), ("triangle", FREQUENT), ("star", FREQUENT),
    ("cross", FREQUENT), ("arrow", FREQUENT),
    ("house", COMMON), ("cloud", COMMON), ("bell", COMMON), ("spiral", COMMON), ("ring", COMMON), ("tree", COMMON),
    ("heart", RARE), ("crescent", RARE), ("lightning bolt", RARE), ("key", RARE),
)  # fmt: skip
"""Every class, most frequent first, with its declared LVIS group: 6 frequent, 6 common and 4 rare (LVIS
v1: 405 / 461 / 337 of 1203). The rare ones are OV-Shapes novel classes."""


@dataclass(frozen=True)
class OVShapesLTPreset:
    """Size, tail and annotation protocol of one world (``root/ovshapes_lt/<name>/``).

    Attributes:
        name: folder name.
        num_train, num_val: number of images.
        num_imagenet: images of the class-balanced image-label split (generated separately on first
            use, so it is not part of the world's identity in ``train_norare.json``).
        head_fraction: share of train (and val) images holding the most frequent class.
        decay: ratio of the train image counts of consecutive tail ranks.
        val_decay: the same in val (flatter, so rare classes get enough val instances).
        val_min_images: val images per class at least.
        rare_fraction, common_fraction: the r/c/f thresholds as shares of ``num_train`` (module docstring).
        extra_instance_prob: an allocated (class, image) pair gets one more instance with this
            probability, repeatedly, up to ``max_instances``.
        max_instances: instances of one class in one image at most.
        neg_fraction: share of an image's absent classes listed in ``neg_category_ids``.
        not_exhaustive_prob: val: chance that an image drops one instance of a class drawn twice or more.
        image_size, object_size, clutter_per_image, max_box_iou, max_occlusion: drawing, as
            :class:`~ovd.data.ovshapes.OVShapesPreset`.
    """

    name: str
    num_train: int
    num_val: int
    num_imagenet: int = 800
    head_fraction: float = 0.7
    decay: float = 0.69
    val_decay: float = 0.83
    val_min_images: int = 15
    rare_fraction: float = 0.01
    common_fraction: float = 0.1
    extra_instance_prob: float = 0.25
    max_instances: int = 3
    neg_fraction: float = 0.5
    not_exhaustive_prob: float = 0.15
    image_size: tuple[int, int] = (224, 288)
    object_size: tuple[float, float] = (16.0, 96.0)
    clutter_per_image: tuple[int, int] = (0, 6)
    max_box_iou: float = 0.3
    max_occlusion: float = 0.2

    def __post_init__(self) -> None:
        def check(ok: bool, what: str) -> None:
            if not ok:
                raise OVDError(f"invalid OV-Shapes-LT preset: {what}", field=f"preset[{self.name}]")

        check(re.fullmatch(r"[A-Za-z0-9_.-]+", self.name) is not None, "name must be a plain folder name")
        check(self.num_train >= 8 and self.num_val >= 1, "num_train must be >= 8 and num_val >= 1")
        check(self.num_imagenet >= 0, "num_imagenet must be >= 0")
        for label, value in (
            ("head_fraction", self.head_fraction),
            ("decay", self.decay),
            ("val_decay", self.val_decay),
        ):
            check(0 < value <= 1, f"{label} must lie in (0, 1]")
        check(0 < self.rare_fraction < self.common_fraction < 1, "need 0 < rare_fraction < common_fraction < 1")
        check(1 <= self.val_min_images <= self.num_val, "val_min_images must lie in [1, num_val]")
        check(0 <= self.extra_instance_prob < 1 and self.max_instances >= 1, "bad instance settings")
        check(0 <= self.neg_fraction <= 1 and 0 <= self.not_exhaustive_prob <= 1, "probabilities lie in [0, 1]")
        problem = drawing_problem(
            self.image_size, self.object_size, self.clutter_per_image, self.max_box_iou, self.max_occlusion
        )
        check(problem is None, str(problem))

    @property
    def rare_max(self) -> int:
        """Largest train image count of a rare class."""
        return max(1, math.floor(self.rare_fraction * self.num_train))

    @property
    def common_max(self) -> int:
        """Largest train image count of a common class (frequent above)."""
        return max(self.rare_max + 1, math.floor(self.common_fraction * self.num_train))


PRESETS: dict[str, OVShapesLTPreset] = {
    "small": OVShapesLTPreset("small", num_train=64, num_val=32, num_imagenet=32, val_min_images=3),
    "default": OVShapesLTPreset("default", num_train=2000, num_val=400),
}


def resolve_preset(preset: str | OVShapesLTPreset) -> OVShapesLTPreset:
    """A preset by name (or itself). Unknown names raise :class:`OVDError` listing the valid ones."""
    if isinstance(preset, OVShapesLTPreset):
        return preset
    if preset not in PRESETS:
        raise OVDError(f"unknown OV-Shapes-LT preset {preset!r} (valid: {', '.join(sorted(PRESETS))})")
    return PRESETS[preset]


# ----------------------------------------------------------------------------------------------
# The tail


def declared_frequencies() -> tuple[str, ...]:
    """The declared LVIS group (``"r"``, ``"c"``, ``"f"``) of each class, in :data:`CLASSES` order."""
    groups = dict(TAIL)
    return tuple(groups[name] for name in CLASS_NAMES)


def frequency_of(image_count: int, preset: OVShapesLTPreset) -> str:
    """The LVIS group of a class with ``image_count`` train images, by the preset's thresholds."""
    if image_count <= preset.rare_max:
        return RARE
    return COMMON if image_count <= preset.common_max else FREQUENT


def train_image_targets(preset: str | OVShapesLTPreset) -> np.ndarray:
    """``int64[K]`` train images allocated to each class (in :data:`CLASSES` order; module docstring)."""
    preset = resolve_preset(preset)
    band = {
        RARE: (1, preset.rare_max),
        COMMON: (preset.rare_max + 1, preset.common_max),
        FREQUENT: (preset.common_max + 1, preset.num_train),
    }
    out = np.zeros(len(CLASSES), dtype=np.int64)
    for rank, (name, group) in enumerate(TAIL):
        raw = round(preset.num_train * preset.head_fraction * preset.decay**rank)
        lo, hi = band[group]
        out[CLASS_NAMES.index(name)] = min(max(raw, lo), hi)
    return out


def val_image_targets(preset: str | OVShapesLTPreset) -> np.ndarray:
    """``int64[K]`` val images allocated to each class (in :data:`CLASSES` order)."""
    preset = resolve_preset(preset)
    out = np.zeros(len(CLASSES), dtype=np.int64)
    for rank, (name, _) in enumerate(TAIL):
        raw = round(preset.num_val * preset.head_fraction * preset.val_decay**rank)
        out[CLASS_NAMES.index(name)] = min(max(raw, preset.val_min_images), preset.num_val)
    return out
