"""OV-Shapes-LT: the long-tailed, LVIS-style variant of OV-Shapes, so the OV-LVIS path runs on a CPU.

It follows the OV-LVIS protocol (METHOD §1.4, §6.2, §6.4) in miniature, on the 16 OV-Shapes classes
(drawn by :mod:`ovd.data.ovshapes`'s renderer):

* **Long tail.** The classes are ranked by :data:`TAIL` (most frequent first). The train image count of
  rank ``r`` (1-based) is ``round(num_train · head_fraction · decay^(r-1))``: a geometric rank-frequency
  law (a straight line on a log scale), chosen over a Zipf power law because 16 classes must span the
  two decades between LVIS's rare and frequent thresholds. Each count is clamped into the band of the
  class's declared group (below), which only binds on tiny presets. Objects are *allocated* (each class
  gets exactly that many train images, chosen at random; a pair gets further instances with
  ``extra_instance_prob``), so the counts are exact, not sampled.
* **r / c / f.** LVIS labels a class rare / common / frequent when 1-10 / 11-100 / >100 of its ~100k train
  images contain it. Scaled to this dataset: rare if ``image_count ≤ rare_max = max(1,
  floor(rare_fraction · num_train))``, common if ``≤ common_max = max(rare_max + 1, floor(common_fraction
  · num_train))``, frequent above (defaults 1 % and 10 %: for 2000 train images, 20 and 200). The labels
  written to ``categories[*].frequency`` are computed from the rendered train annotations with those
  thresholds; generation fails if they differ from the declared groups of :data:`TAIL`.
* **Rare = novel.** ``annotations/train_norare.json`` is ``train.json`` without the annotations of the
  rare classes (:func:`ovd.data.lvis.make_norare`): their objects stay in the images, unannotated.
  ``annotations/train_norare_cat_info.json`` counts images and instances per class on it (rare = 0;
  :func:`ovd.data.lvis.category_info`), the reference's ``CAT_FREQ_PATH`` file.
* **Val** (``annotations/val.json``) annotates every class. Its tail is flatter (``val_decay``) and every
  class gets at least ``val_min_images`` images, so APr is measured on enough instances.
* **Federated annotation** (LVIS): every image lists ``neg_category_ids``, a random ``neg_fraction`` of
  the classes absent from it (verified absent: no object of the class is drawn in the image), and
  ``not_exhaustive_category_ids``. In val, with ``not_exhaustive_prob`` an image drops the annotation of
  one instance of a class drawn at least twice in it (the object stays) and lists that class as not
  exhaustive; train images are exhaustive.
* **Masks.** Every annotation carries ``segmentation``: the compressed RLE of the object's *visible*
  pixels (LVIS and COCO masks are modal), ``area`` = its pixel count, and ``bbox`` = the tight box of
  that mask in pixel-edge coordinates (OV-Shapes' boxes are tight on the full shape; objects here
  are at most ``max_occlusion`` covered, so the two differ by occluded rims only).
* **Categories** (the same list in every file, as LVIS): ids ``1..16`` in :data:`ovd.data.ovshapes.CLASSES`
  order, with ``name``, ``synonyms``, ``frequency`` and the full train split's ``image_count`` and
  ``instance_count`` (as LVIS's files; training counts must come from the norare annotations).
  There are no captions (OV-LVIS takes image labels from ImageNet-LVIS instead).
* **Image labels** (``annotations/train_image_labels.json``, derived from ``train.json`` on first use):
  every train image with ``pos_category_ids`` = the classes drawn in it, rare ones included, and no
  boxes: the stand-in for ImageNet-LVIS (METHOD §1.4, §4.1), the image-level supervision that names rare
  classes whose boxes the detector never sees. PIS turns them into pseudo boxes. They inherit the
  train split's long tail (a rare class names at most ``rare_max`` images).
* **ImageNet split** (``imagenet/*.png`` + ``annotations/imagenet_image_labels.json``, generated on first
  use): ``num_imagenet`` further images, each of **one** class drawn class-balanced (every class, rare
  ones included, in about ``num_imagenet / K`` images; 1 to ``max_instances`` instances, clutter as
  usual), labelled with that class only: the stand-in for ImageNet-21k-LVIS, a separate, roughly
  class-balanced image set (METHOD §1.4), so that PIS sees the rare classes as often as the others.

Files live under ``root/ovshapes_lt/<preset>/``: ``train/*.png``, ``val/*.png`` and the JSON files, each
written atomically, ``train_norare.json`` last: its presence means the world is complete.

Determinism: the allocation of each split is drawn from its own generator seeded with ``(seed,
stream, split)``, image ``i`` from ``(seed, stream, split, i, attempt)``: an image whose objects do not all
fit is redrawn with the next ``attempt``. The output is byte-identical for a seed, whatever the
worker count, and its seed streams never meet OV-Shapes' ones.

Shape shorthand: ``N`` objects of one image, ``K`` classes.
"""

from __future__ import annotations

import functools
import logging
import math
import multiprocessing
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_util

from ovd.data import lvis
from ovd.data.catalog import DatasetInfo, datasets_root, register_dataset
from ovd.data.ovshapes import (
    _PARALLEL_MIN_IMAGES,
    _PNG_PARAMS,
    _VAL_ID_OFFSET,
    CLASS_NAMES,
    CLASSES,
    OVShapesPreset,
    _background,
    _check_seed,
    _draw_clutter,
    _paint,
    _place_objects,
    _tight_box,
    _worker_init,
)
from ovd.errors import OVDError
from ovd.utils.io import atomic_write, read_json, write_json

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the output changes, so stale folders are not mistaken for current ones
FOLDER = "ovshapes_lt"  # under the datasets root

FREQUENT, COMMON, RARE = "f", "c", "r"
TAIL: tuple[tuple[str, str], ...] = (
    ("circle", FREQUENT), ("square", FREQUENT), ("triangle", FREQUENT), ("star", FREQUENT),
    ("cross", FREQUENT), ("arrow", FREQUENT),
    ("house", COMMON), ("cloud", COMMON), ("bell", COMMON), ("spiral", COMMON), ("ring", COMMON), ("tree", COMMON),
    ("heart", RARE), ("crescent", RARE), ("lightning bolt", RARE), ("key", RARE),
)  # fmt: skip
"""Every class, most frequent first, with its declared LVIS group: 6 frequent, 6 common and 4 rare (LVIS
v1: 405 / 461 / 337 of 1203). The rare ones are OV-Shapes novel classes."""

IMAGE_LABELS_FILE = "train_image_labels.json"  # derived from train.json when first needed
IMAGENET_FILE = "imagenet_image_labels.json"  # the class-balanced image-label split, generated when first needed
_IMAGENET_ID_OFFSET = 2_000_000  # its image ids follow val's range
ANNOTATION_FILES = ("val.json", "train.json", "train_norare_cat_info.json", "train_norare.json")  # write order
_STREAM = 100  # seed stream of this world; OV-Shapes uses 0-3
_SPLITS = {"train": 0, "val": 1, "imagenet": 2}
_MAX_ATTEMPTS = 20  # redraws of an image whose allocated objects do not all fit


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
        self.drawing()  # checks the drawing settings

    def drawing(self) -> OVShapesPreset:
        """The OV-Shapes drawing settings (object count bounds are unused: objects are allocated)."""
        return OVShapesPreset(
            self.name,
            num_train=self.num_train,
            num_val=self.num_val,
            image_size=self.image_size,
            object_size=self.object_size,
            clutter_per_image=self.clutter_per_image,
            max_box_iou=self.max_box_iou,
            max_occlusion=self.max_occlusion,
        )

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


def _split_rng(seed: int, split: str, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _STREAM, _SPLITS[split], *key]))


_ALLOCATION, _FEDERATED = 0, 1  # per-split generator purposes; images use (index + 2, attempt)


def _instance_count(rng: np.random.Generator, preset: OVShapesLTPreset) -> int:
    """Instances of an allocated (class, image) pair: one more with ``extra_instance_prob``, repeatedly,
    up to ``max_instances``."""
    count = 1
    while count < preset.max_instances and rng.random() < preset.extra_instance_prob:
        count += 1
    return count


def allocate(preset: str | OVShapesLTPreset, seed: int, split: str) -> list[list[int]]:
    """The class ids drawn in each image of ``split``, in placement order (rarest class first).

    Returns:
        One list per image; a class appears once per instance.
    """
    preset = resolve_preset(preset)
    rng = _split_rng(seed, split, _ALLOCATION)
    if split == "imagenet":  # one class per image, class-balanced: image i shows class perm[i] mod K
        out = []
        for k in rng.permutation(preset.num_imagenet) % len(CLASSES):
            out.append([int(k)] * _instance_count(rng, preset))
        return out
    num = preset.num_train if split == "train" else preset.num_val
    targets = train_image_targets(preset) if split == "train" else val_image_targets(preset)
    per_image: list[list[int]] = [[] for _ in range(num)]
    rank_of = {CLASS_NAMES.index(name): rank for rank, (name, _) in enumerate(TAIL)}
    for name, _ in TAIL:
        k = CLASS_NAMES.index(name)
        for i in np.sort(rng.choice(num, size=int(targets[k]), replace=False)):
            per_image[int(i)] += [k] * _instance_count(rng, preset)
    return [sorted(ids, key=lambda k: -rank_of[k]) for ids in per_image]


# ----------------------------------------------------------------------------------------------
# Rendering


def render_lt_image(
    preset: str | OVShapesLTPreset, seed: int, split: str, index: int, class_ids: Sequence[int]
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Draw image ``index`` of ``split`` with the objects ``class_ids`` (placed in that order).

    Returns:
        ``uint8[H, W, 3]`` RGB image and its objects, each ``{"class_id", "box" (xyxy pixel edges,
        tight on the visible mask), "mask" (uint8[H, W] visible pixels)}``. All objects are placed
        unless ``_MAX_ATTEMPTS`` redraws fail (then the last draw's objects).
    """
    preset = resolve_preset(preset)
    drawing = preset.drawing()
    for attempt in range(_MAX_ATTEMPTS):
        rng = _split_rng(seed, split, index + 2, attempt)
        height, width = (int(v) for v in rng.integers(preset.image_size[0], preset.image_size[1] + 1, 2))
        background, _ = _background(rng, height, width)
        image = background.copy()
        _draw_clutter(rng, image, int(rng.integers(preset.clutter_per_image[0], preset.clutter_per_image[1] + 1)))
        placed = _place_objects(rng, list(class_ids), drawing, height, width)
        if len(placed) == len(class_ids):
            break
    for obj in placed:
        _paint(rng, image, background, obj)
    if rng.random() < 0.5:  # sensor noise on half of the images, as OV-Shapes
        image += np.float32(rng.uniform(1, 6)) * rng.standard_normal(image.shape, dtype=np.float32)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    owner = np.full((height, width), -1, dtype=np.int16)  # top-most object per pixel (later ones on top)
    for j, obj in enumerate(placed):
        owner[obj.mask.astype(bool)] = j
    objects = []
    for j, obj in enumerate(placed):
        visible = (owner == j).astype(np.uint8)  # (H, W)
        box = _tight_box(visible)
        if box is not None:  # always: occlusion is bounded by max_occlusion < 1
            objects.append({"class_id": obj.class_id, "box": box, "mask": visible})
    return image, objects


def _render_record(job: tuple[OVShapesLTPreset, int, str, int, list[int], str]) -> dict[str, Any]:
    """Render one image, write its PNG, return its JSON pieces (worker function)."""
    preset, seed, split, index, class_ids, out_dir = job
    image, objects = render_lt_image(preset, seed, split, index, class_ids)
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
                "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
            }
        )
    return {
        "image": {"file_name": file_name, "height": image.shape[0], "width": image.shape[1]},
        "anns": anns,
        "drawn": list(class_ids),
    }


def _render_all(jobs: list[tuple], workers: int) -> list[dict[str, Any]]:
    if workers <= 1 or len(jobs) < _PARALLEL_MIN_IMAGES or "fork" not in multiprocessing.get_all_start_methods():
        return [_render_record(job) for job in jobs]
    with multiprocessing.get_context("fork").Pool(workers, initializer=_worker_init) as pool:
        return pool.map(_render_record, jobs, chunksize=16)  # ordered: output does not depend on workers


# ----------------------------------------------------------------------------------------------
# LVIS-style files


def _counts(records: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """``int64[K]`` images and instances of each class over the annotations of ``records``."""
    images = np.zeros(len(CLASSES), dtype=np.int64)
    instances = np.zeros(len(CLASSES), dtype=np.int64)
    for rec in records:
        ids = [a["class_id"] for a in rec["anns"]]
        instances += np.bincount(ids, minlength=len(CLASSES)) if ids else 0
        images[sorted(set(ids))] += 1
    return images, instances


def categories(frequencies: Sequence[str], image_counts: np.ndarray, instance_counts: np.ndarray) -> list[dict]:
    """LVIS categories: ids ``1..K`` in :data:`CLASSES` order with synonyms, frequency and train counts."""
    return [
        {
            "id": k + 1,
            "name": c.name,
            "synonyms": list(c.terms),
            "supercategory": "shape",
            "frequency": frequencies[k],
            "image_count": int(image_counts[k]),
            "instance_count": int(instance_counts[k]),
        }
        for k, c in enumerate(CLASSES)
    ]


def _lvis_json(
    records: list[dict[str, Any]], split: str, preset: OVShapesLTPreset, seed: int, info: dict, cats: list[dict]
) -> dict[str, Any]:
    """The LVIS-format JSON of one split, with the federated image lists (module docstring)."""
    rng = _split_rng(seed, split, _FEDERATED)
    images, anns = [], []
    for i, rec in enumerate(records):
        image_id = i + 1 + (_VAL_ID_OFFSET if split == "val" else 0)
        kept = list(rec["anns"])
        not_exhaustive: list[int] = []
        if split == "val" and rng.random() < preset.not_exhaustive_prob:
            ids = [a["class_id"] for a in kept]
            multi = sorted({k for k in ids if ids.count(k) >= 2})
            if multi:
                k = multi[int(rng.integers(len(multi)))]
                which = [j for j, a in enumerate(kept) if a["class_id"] == k]
                del kept[which[int(rng.integers(len(which)))]]  # the object stays in the image
                not_exhaustive = [k + 1]
        absent = [k for k in range(len(CLASSES)) if k not in set(rec["drawn"])]
        neg = sorted(k + 1 for k in absent if rng.random() < preset.neg_fraction)
        images.append(
            {
                "id": image_id,
                **rec["image"],
                "neg_category_ids": neg,
                "not_exhaustive_category_ids": not_exhaustive,
            }
        )
        for ann in kept:
            rest = {k: v for k, v in ann.items() if k != "class_id"}
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": ann["class_id"] + 1,
                         "iscrowd": 0, **rest})  # fmt: skip
    return {"info": info, "images": images, "annotations": anns, "categories": cats}


def _world_info(preset: OVShapesLTPreset, seed: int) -> dict[str, Any]:
    fields = {k: v for k, v in asdict(preset).items() if k != "num_imagenet"}  # that split has its own file
    return {
        "description": "OV-Shapes-LT: synthetic long-tailed open-vocabulary world (OV-LVIS protocol in miniature)",
        "version": FORMAT_VERSION,
        "preset": {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()},
        "seed": seed,
        "tail": [list(t) for t in TAIL],
        "thresholds": {"rare_max": preset.rare_max, "common_max": preset.common_max},
    }


def _is_complete(folder: Path, info: dict, overwrite: bool) -> bool:
    if not all((folder / "annotations" / f).is_file() for f in ANNOTATION_FILES):
        return False
    found = read_json(folder / "annotations" / "train_norare.json").get("info")
    if found == info:
        return True
    if overwrite:
        return False
    raise OVDError(
        f"holds another OV-Shapes-LT world (info {found}, wanted {info}); pass overwrite=True or choose another root",
        path=folder,
    )


def generate_ovshapes_lt(
    root: str | os.PathLike[str] | None = None,
    preset: str | OVShapesLTPreset = "default",
    seed: int = 0,
    *,
    workers: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Generate an OV-Shapes-LT world under ``root/ovshapes_lt/<preset.name>/`` (skipped when complete).

    Args:
        root: datasets root; ``None`` means :func:`ovd.data.catalog.datasets_root`.
        preset: a name in :data:`PRESETS` or an :class:`OVShapesLTPreset`.
        seed: non-negative seed; the same seed gives byte-identical files.
        workers: processes used to draw images (default: up to 2); the output does not depend on it.
        overwrite: regenerate a complete folder made with other settings instead of raising.

    Returns:
        The world's folder.

    Raises:
        OVDError: unknown preset, negative seed, a complete folder made with other settings (without
            ``overwrite``), or a preset whose rendered train counts do not give the declared r/c/f groups.
    """
    preset = resolve_preset(preset)
    _check_seed(seed)
    folder = Path(datasets_root() if root is None else root) / FOLDER / preset.name
    info = _world_info(preset, seed)
    if _is_complete(folder, info, overwrite):
        return folder
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    jobs = []
    for split in ("train", "val"):
        (folder / split).mkdir(parents=True, exist_ok=True)
        allocation = allocate(preset, seed, split)
        jobs += [(preset, seed, split, i, ids, str(folder / split)) for i, ids in enumerate(allocation)]
    rendered = _render_all(jobs, workers)
    records = {"train": rendered[: preset.num_train], "val": rendered[preset.num_train :]}

    image_counts, instance_counts = _counts(records["train"])
    found = tuple(frequency_of(int(n), preset) for n in image_counts)
    declared = declared_frequencies()
    if found != declared:
        wrong = [
            f"{CLASS_NAMES[k]}: {image_counts[k]} images → {found[k]}"
            for k in range(len(CLASSES))
            if found[k] != declared[k]
        ]
        raise OVDError(f"preset {preset.name!r} does not give the declared r/c/f groups: {', '.join(wrong)}")
    cats = categories(found, image_counts, instance_counts)
    coco = {s: _lvis_json(records[s], s, preset, seed, info, cats) for s in ("train", "val")}
    norare = lvis.make_norare(coco["train"])
    annotations = folder / "annotations"
    write_json(annotations / "val.json", coco["val"], indent=None)
    write_json(annotations / "train.json", coco["train"], indent=None)
    write_json(annotations / "train_norare_cat_info.json", lvis.category_info(norare))
    write_json(annotations / "train_norare.json", norare, indent=None)  # last: marks completion
    logger.info("OV-Shapes-LT %r (seed %d) written to %s", preset.name, seed, folder)
    return folder


# ----------------------------------------------------------------------------------------------
# Catalog


def _prepare(preset_name: str, info: DatasetInfo) -> None:
    generate_ovshapes_lt(datasets_root(), preset_name, seed=0)


def image_labels(train: dict[str, Any]) -> dict[str, Any]:
    """The image-label file of a train split: each image of ``train`` (a COCO/LVIS dict with every class
    annotated) with ``pos_category_ids`` = the sorted ids of its annotated classes; no annotations."""
    present: dict[int, set[int]] = {img["id"]: set() for img in train["images"]}
    for ann in train["annotations"]:
        present[ann["image_id"]].add(int(ann["category_id"]))
    keys = ("id", "file_name", "height", "width")
    images = [{**{k: img[k] for k in keys}, "pos_category_ids": sorted(present[img["id"]])} for img in train["images"]]
    return {"images": images, "categories": train["categories"], "annotations": []}


def _prepare_image_labels(preset_name: str, info: DatasetInfo) -> None:
    """Write the image labels of the train split (generating the world first when missing)."""
    folder = generate_ovshapes_lt(datasets_root(), preset_name, seed=0)  # returns at once when complete
    write_json(info.ann_file_path, image_labels(read_json(folder / "annotations" / "train.json")), indent=None)


def generate_imagenet_split(
    root: str | os.PathLike[str] | None = None, preset: str | OVShapesLTPreset = "default", seed: int = 0
) -> Path:
    """Generate the class-balanced image-label split of a world (module docstring) when missing.

    Returns:
        Its annotation file ``annotations/imagenet_image_labels.json`` (images with ``pos_category_ids``,
        the world's categories, no annotations), written last and atomically.

    Raises:
        OVDError: as :func:`generate_ovshapes_lt`, or the preset has ``num_imagenet = 0``.
    """
    preset = resolve_preset(preset)
    if preset.num_imagenet == 0:
        raise OVDError(f"preset {preset.name!r} has no ImageNet split (num_imagenet = 0)", field="num_imagenet")
    folder = generate_ovshapes_lt(root, preset, seed)  # the categories (and their counts) come from train
    path = folder / "annotations" / IMAGENET_FILE
    info = {**_world_info(preset, seed), "split": "imagenet", "num_imagenet": preset.num_imagenet}
    if path.is_file() and read_json(path).get("info") == info:
        return path
    out = folder / "imagenet"
    out.mkdir(exist_ok=True)
    allocation = allocate(preset, seed, "imagenet")
    jobs = [(preset, seed, "imagenet", i, ids, str(out)) for i, ids in enumerate(allocation)]
    rendered = _render_all(jobs, min(2, os.cpu_count() or 1))
    images = [
        {"id": i + 1 + _IMAGENET_ID_OFFSET, **rec["image"], "pos_category_ids": sorted({k + 1 for k in rec["drawn"]})}
        for i, rec in enumerate(rendered)
    ]
    cats = read_json(folder / "annotations" / "train_norare.json")["categories"]
    write_json(path, {"info": info, "images": images, "categories": cats, "annotations": []}, indent=None)
    logger.info("OV-Shapes-LT %r ImageNet split (%d images) written to %s", preset.name, len(images), out)
    return path


def _prepare_imagenet(preset_name: str, info: DatasetInfo) -> None:
    generate_imagenet_split(datasets_root(), preset_name, seed=0)


def register_ovshapes_lt() -> None:
    """Register ``ovshapes_lt_{train_norare,train,val,image_labels,imagenet}`` (default preset) and
    ``ovshapes_lt_small_*``.

    ``*_train_norare`` is the training set (rare annotations removed), ``*_train`` the full train split
    (LVIS's ``lvis_v1_train``, for tools and oracles), ``*_val`` the evaluation set, ``*_image_labels``
    the train images' image-level labels, ``*_imagenet`` the class-balanced image-label split
    (ImageNet-LVIS's part, for PIS). Base = frequent +
    common, novel = rare. Seed 0; each entry generates its world under the datasets root on first use.
    The entries are LVIS-style (``extra["format"] == "lvis"``) and carry masks (``extra["masks"]``).
    Calling it again re-registers the same entries.
    """
    groups = declared_frequencies()
    common = dict(
        class_names=CLASS_NAMES,
        category_ids=tuple(range(1, len(CLASSES) + 1)),
        base_classes=tuple(k for k, g in enumerate(groups) if g != RARE),
        novel_classes=tuple(k for k, g in enumerate(groups) if g == RARE),
    )
    for prefix, preset in (("ovshapes_lt", "default"), ("ovshapes_lt_small", "small")):
        folder = f"{FOLDER}/{preset}"
        prepare = functools.partial(_prepare, preset)
        extra = {
            "preset": preset,
            "format": "lvis",
            "masks": "true",
            "cat_info": f"{folder}/annotations/train_norare_cat_info.json",
        }
        for name, split, ann in (
            ("train_norare", "train", "train_norare"),
            ("train", "train", "train"),
            ("val", "val", "val"),
        ):
            info = DatasetInfo(
                name=f"{prefix}_{name}",
                image_root=f"{folder}/{split}",
                ann_file=f"{folder}/annotations/{ann}.json",
                prepare=prepare,
                extra=dict(extra),
                **common,
            )
            register_dataset(info, overwrite=True)
        image_sets = (  # (name, image folder, annotation file, prepare hook): image-level labels only
            ("image_labels", "train", IMAGE_LABELS_FILE, _prepare_image_labels),
            ("imagenet", "imagenet", IMAGENET_FILE, _prepare_imagenet),
        )
        for name, images, ann_file, hook in image_sets:
            info = DatasetInfo(
                name=f"{prefix}_{name}",
                image_root=f"{folder}/{images}",
                ann_file=f"{folder}/annotations/{ann_file}",
                ann_type="image",
                prepare=functools.partial(hook, preset),
                extra={"preset": preset, "format": "lvis"},
                **common,
            )
            register_dataset(info, overwrite=True)
