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
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ovd.data import lvis
from ovd.data.catalog import DatasetInfo, datasets_root, register_dataset
from ovd.data.ovshapes_lt_tail import (
    COMMON,
    FREQUENT,
    PRESETS,
    RARE,
    TAIL,
    OVShapesLTPreset,
    declared_frequencies,
    frequency_of,
    resolve_preset,
    train_image_targets,
    val_image_targets,
)
from ovd.data.ovshapes_meta import CLASS_NAMES, CLASSES
from ovd.data.ovshapes_render import (
    VAL_ID_OFFSET,
    check_seed,
    encode_record,
    finish_image,
    is_complete,
    new_image,
    place_objects,
    render_pool,
    tight_box,
)
from ovd.errors import OVDError
from ovd.utils.io import read_json, write_json

__all__ = [  # the public names of OV-Shapes-LT, wherever they are defined
    "ANNOTATION_FILES", "COMMON", "FOLDER", "FORMAT_VERSION", "FREQUENT", "IMAGENET_FILE", "IMAGE_LABELS_FILE",
    "PRESETS", "RARE", "TAIL", "OVShapesLTPreset", "allocate", "categories", "declared_frequencies", "frequency_of",
    "generate_imagenet_split", "generate_ovshapes_lt", "image_labels", "register_ovshapes_lt", "render_lt_image",
    "resolve_preset", "train_image_targets", "val_image_targets",
]  # fmt: skip

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the output changes, so stale folders are not mistaken for current ones
FOLDER = "ovshapes_lt"  # under the datasets root

IMAGE_LABELS_FILE = "train_image_labels.json"  # derived from train.json when first needed
IMAGENET_FILE = "imagenet_image_labels.json"  # the class-balanced image-label split, generated when first needed
_IMAGENET_ID_OFFSET = 2_000_000  # its image ids follow val's range
ANNOTATION_FILES = ("val.json", "train.json", "train_norare_cat_info.json", "train_norare.json")  # write order
_STREAM = 100  # seed stream of this world; OV-Shapes uses 0-3
_SPLITS = {"train": 0, "val": 1, "imagenet": 2}
_MAX_ATTEMPTS = 20  # redraws of an image whose allocated objects do not all fit


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
    for attempt in range(_MAX_ATTEMPTS):
        rng = _split_rng(seed, split, index + 2, attempt)
        image, back, _ = new_image(rng, preset.image_size, preset.clutter_per_image)
        height, width = image.shape[:2]
        placed = place_objects(rng, list(class_ids), preset, height, width)
        if len(placed) == len(class_ids):
            break
    image = finish_image(rng, image, back, placed)
    owner = np.full((height, width), -1, dtype=np.int16)  # top-most object per pixel (later ones on top)
    for j, obj in enumerate(placed):
        owner[obj.mask.astype(bool)] = j
    objects = []
    for j, obj in enumerate(placed):
        visible = (owner == j).astype(np.uint8)  # (H, W)
        box = tight_box(visible)
        if box is not None:  # always: occlusion is bounded by max_occlusion < 1
            objects.append({"class_id": obj.class_id, "box": box, "mask": visible})
    return image, objects


def _render_record(job: tuple[OVShapesLTPreset, int, str, int, list[int], str]) -> dict[str, Any]:
    """Render one image, write its PNG, return its JSON pieces (worker function)."""
    preset, seed, split, index, class_ids, out_dir = job
    image, objects = render_lt_image(preset, seed, split, index, class_ids)
    return {**encode_record(image, objects, out_dir, f"{split}_{index:06d}.png"), "drawn": list(class_ids)}


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
        image_id = i + 1 + (VAL_ID_OFFSET if split == "val" else 0)
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


def generate_ovshapes_lt(
    root: str | os.PathLike[str] | None = None,
    preset: str | OVShapesLTPreset = "default",
    seed: int = 0,
    *,
    workers: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Generate an OV-Shapes-LT world under ``root/ovshapes_lt/<preset.name>/`` (skipped when complete).

    ``preset`` is a name in :data:`PRESETS` or an :class:`OVShapesLTPreset`; ``root``, ``seed``, ``workers``
    and ``overwrite`` mean what they mean for :func:`ovd.data.ovshapes.generate_ovshapes`. Returns the
    world's folder.

    Raises:
        OVDError: unknown preset, negative seed, a complete folder made with other settings (without
            ``overwrite``), or a preset whose rendered train counts do not give the declared r/c/f groups.
    """
    preset = resolve_preset(preset)
    check_seed(seed)
    folder = Path(datasets_root() if root is None else root) / FOLDER / preset.name
    info = _world_info(preset, seed)
    if is_complete(folder, info, files=ANNOTATION_FILES, world="OV-Shapes-LT", overwrite=overwrite):
        return folder
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    jobs = []
    for split in ("train", "val"):
        (folder / split).mkdir(parents=True, exist_ok=True)
        allocation = allocate(preset, seed, split)
        jobs += [(preset, seed, split, i, ids, str(folder / split)) for i, ids in enumerate(allocation)]
    rendered = render_pool(_render_record, jobs, workers)
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
    rendered = render_pool(_render_record, jobs, min(2, os.cpu_count() or 1))
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
                evaluator="lvis",
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
