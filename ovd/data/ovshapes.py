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

The classes and palette live in :mod:`ovd.data.ovshapes_meta`, the drawing steps shared with
:mod:`ovd.data.ovshapes_lt` in :mod:`ovd.data.ovshapes_render`, the caption text in
:mod:`ovd.data.ovshapes_captions`; their public names are re-exported here.

Shape shorthand: ``N`` objects of one image, ``K`` classes.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ovd.data.catalog import DatasetInfo, datasets_root, register_dataset
from ovd.data.ovshapes_captions import PROMPT_TEMPLATES, caption_for, make_captions
from ovd.data.ovshapes_meta import (
    CLASS_NAMES,
    CLASSES,
    DEFAULT_NOVEL,
    PALETTE,
    Primitive,
    ShapeClass,
    plural,
)
from ovd.data.ovshapes_render import (
    MAX_TRIES,
    VAL_ID_OFFSET,
    Placed,
    background,
    box_iou,
    check_seed,
    draw_clutter,
    drawing_problem,
    encode_record,
    finish_image,
    is_complete,
    new_image,
    paint,
    place_objects,
    random_linear,
    render_pool,
    tight_box,
)
from ovd.errors import OVDError
from ovd.utils.io import read_json, write_json

__all__ = [  # the public names of OV-Shapes, wherever they are defined
    "ANNOTATION_FILES", "CLASSES", "CLASS_NAMES", "DEFAULT_NOVEL", "DEV_SEED", "FORMAT_VERSION", "PALETTE",
    "PRESETS", "PROMPT_TEMPLATES", "OVShapesPreset", "Primitive", "ShapeClass", "caption_for", "categories",
    "generate_ovshapes", "make_captions", "plural", "register_ovshapes", "render_image", "render_object_crops",
    "resolve_novel", "resolve_preset",
]  # fmt: skip

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the drawing changes, so stale folders are not mistaken for current ones

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
        lo, hi = self.objects_per_image
        check(0 <= lo <= hi, "objects_per_image must be (min, max) with 0 <= min <= max")
        check(lo >= 1, "objects_per_image min must be >= 1")
        check(self.captions_per_image >= 1, "captions_per_image must be >= 1")
        problem = drawing_problem(
            self.image_size, self.object_size, self.clutter_per_image, self.max_box_iou, self.max_occlusion
        )
        check(problem is None, str(problem))


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
# Rendering


def _rng(seed: int, stream: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _STREAMS[stream], index]))


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
    check_seed(seed)
    rng = _rng(seed, split, index)
    image, back, kind = new_image(rng, preset.image_size, preset.clutter_per_image)
    height, width = image.shape[:2]
    n = int(rng.integers(preset.objects_per_image[0], preset.objects_per_image[1] + 1))
    class_ids = [int(c) for c in rng.integers(0, len(CLASSES), n)]
    base_ids = [c for c in range(len(CLASSES)) if c not in novel_ids]
    if split == "train":  # like OV-COCO: every train image has a base box; it goes first, so it fits
        first_base = next((i for i, c in enumerate(class_ids) if c not in novel_ids), None)
        if first_base is None:
            class_ids[0] = base_ids[int(rng.integers(len(base_ids)))]
        else:
            class_ids.insert(0, class_ids.pop(first_base))
    objects = place_objects(rng, class_ids, preset, height, width)
    image = finish_image(rng, image, back, objects)
    return (
        image,
        [{"class_id": o.class_id, "colour": o.colour, "box": o.box, "mask": o.mask} for o in objects],
        kind,
    )


def _render_record(job: tuple[OVShapesPreset, int, str, int, tuple[str, ...], str]) -> dict:
    """Render one image, write its PNG, return its JSON pieces (worker function)."""
    preset, seed, split, index, novel, out_dir = job
    image, objects, kind = render_image(preset, seed, split, index, novel)
    record = encode_record(image, objects, out_dir, f"{split}_{index:06d}.png")
    for ann, obj in zip(record["anns"], objects, strict=True):
        ann["color"] = obj["colour"]
    if split == "train":
        rng = _rng(seed, "captions", index)
        pairs = [(o["class_id"], o["colour"]) for o in objects]
        record["captions"] = make_captions(rng, pairs, kind, preset.captions_per_image)
    return record


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
    check_seed(seed)
    folder = Path(datasets_root() if root is None else root) / "ovshapes" / preset.name
    info = _world_info(preset, seed, novel_ids)
    if is_complete(folder, info, files=ANNOTATION_FILES, world="OV-Shapes", overwrite=overwrite):
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
    rendered = render_pool(_render_record, jobs, workers)
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


def _coco_json(records: list[dict], split: str, info: dict, cats: list[dict], novel_ids: Sequence[int]) -> dict:
    """COCO instances JSON of one split; on train, novel objects get no annotation."""
    images, anns = [], []
    for i, rec in enumerate(records):
        image_id = i + 1 + (VAL_ID_OFFSET if split == "val" else 0)
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
    check_seed(seed)
    pool = list(range(len(CLASSES))) if classes is None else [CLASS_NAMES.index(c) for c in _known(classes)]
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    class_ids = np.zeros((n,), dtype=np.int64)
    captions = []
    for i in range(n):
        rng = _rng(seed, "crops", i)
        class_ids[i] = class_id = pool[int(rng.integers(len(pool)))]
        cls = CLASSES[class_id]
        back, _ = background(rng, size, size)
        image = back.copy()
        draw_clutter(rng, image, int(rng.integers(0, 4)))
        # the object's longer box side covers 55-100 % of the crop (box jitter in scale) ...
        target = max(size * math.exp(-rng.uniform(0.0, 0.6)), min(cls.min_size, size))
        linear, lo, hi = random_linear(rng, cls, 1.0)
        k = target / float((hi - lo).max())
        linear, lo, hi = linear * k, lo * k, hi * k
        centre = size / 2 - (lo + hi) / 2 + rng.normal(0, 0.06 * size, 2)  # ... and in position
        if rng.random() < partial_prob:  # 20-45 % of the box leaves the crop on one side
            axis = int(rng.integers(2))
            cut = rng.uniform(0.2, 0.45) * (hi - lo)[axis]
            centre[axis] = size + cut - hi[axis] if rng.random() < 0.5 else -cut - lo[axis]
        mask = cls.draw_mask(np.hstack([linear, centre[:, None]]), size, size)
        obj = Placed(class_id, mask, tight_box(mask) or (0, 0, size, size), int(mask.sum()))
        if rng.random() < context_prob:  # part of another object, clear of this one's box
            other_id = int(rng.integers(len(CLASSES)))
            other = CLASSES[other_id]
            x1, y1, x2, y2 = obj.box
            for _ in range(MAX_TRIES):
                lin, _, _ = random_linear(rng, other, target * math.exp(rng.uniform(-0.3, 0.3)))
                m = other.draw_mask(np.hstack([lin, rng.uniform(-0.25 * size, 1.25 * size, (2, 1))]), size, size)
                box = tight_box(m)
                if box is not None and box_iou(box, (x1 - 2, y1 - 2, x2 + 2, y2 + 2)) == 0:
                    paint(rng, image, back, Placed(other_id, m, box, int(m.sum())))
                    break
        images[i] = finish_image(rng, image, back, [obj])
        captions.append(caption_for(cls.name, obj.colour, rng))
    return images, class_ids, captions


def _known(names: Sequence[str]) -> Sequence[str]:
    if not names:
        raise OVDError(f"no OV-Shapes class given (valid: {', '.join(CLASS_NAMES)})")
    unknown = [n for n in names if n not in CLASS_NAMES]
    if unknown:
        raise OVDError(f"unknown OV-Shapes class {unknown[0]!r} (valid: {', '.join(CLASS_NAMES)})")
    return names


# ----------------------------------------------------------------------------------------------
# Catalog


def _prepare(preset_name: str, info: DatasetInfo, seed: int = 0) -> None:
    generate_ovshapes(datasets_root(), preset_name, seed=seed)


def _prepare_tags(preset_name: str, info: DatasetInfo) -> None:
    """Write the caption tags of the training images (generating the world first when missing)."""
    from ovd.data.captions import tag_captions
    from ovd.data.ovshapes_meta import synonyms

    captions = info.resolve(info.extra["captions"])
    if not captions.is_file():
        generate_ovshapes(datasets_root(), preset_name, seed=0)
    train = read_json(captions.parent / "train.json")
    tags = tag_captions(read_json(captions), train["categories"], synonyms=synonyms(), path=str(captions))
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
