"""OV-LVIS data: the norare training split, category info, repeat-factor sampling, ImageNet-LVIS.

What the reference does (METHOD §6.2, §4.1, §10.12) and what this module provides:

* :func:`make_norare`: ``lvis_v1_train.json`` without the annotations of the 337 rare classes
  (``frequency == "r"``); every image and category is kept (``lvis_v1_train_norare.json``).
* :func:`category_info`: per category ``image_count`` / ``instance_count`` counted from the annotations
  of the given file, so the norare file gives 0 for the rare classes. Detic's
  ``lvis_v1_train_cat_info.json`` counts rare classes too (the leak of Detic #79) and is never used.
* :func:`repeat_factors` / :func:`repeat_indices`: LVIS repeat-factor sampling.
* :func:`imagenet_lvis_json`: the ImageNet-LVIS image-label file from a folder of ``wnid/*.JPEG``.
* :func:`load_lvis_json`: LVIS v1 files into :class:`~ovd.structures.ImageRecord` (image paths from
  ``coco_url`` when ``file_name`` is absent, as in the official files).
* :func:`register_lvis`: ``lvis_v1_train_norare``, ``lvis_v1_val`` and ``imagenet_lvis`` in the catalog.

Shape shorthand: ``I`` images (records), ``C`` classes.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ovd.data import coco
from ovd.data.catalog import DatasetInfo, datasets_root, register_dataset
from ovd.errors import OVDError
from ovd.structures import ImageRecord
from ovd.utils.io import read_json

logger = logging.getLogger(__name__)

FREQUENCIES = ("r", "c", "f")
"""LVIS frequency groups: rare (1-10 training images), common (11-100), frequent (> 100)."""
RARE = "r"
REPEAT_THRESHOLD = 0.001
"""LVIS repeat-factor threshold ``t`` (METHOD §1.4 ``REPEAT_THRESHOLD``, §10.12)."""
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
"""Files of an ImageNet class folder read as images (case-insensitive)."""

# Catalog paths, relative to $OVD_DATASETS (METHOD §6.3). LVIS images are the COCO 2017 images.
LVIS_IMAGE_ROOT = "coco"
LVIS_TRAIN = "lvis/lvis_v1_train.json"
LVIS_TRAIN_NORARE = "lvis/lvis_v1_train_norare.json"
LVIS_CAT_INFO = "lvis/lvis_v1_train_norare_cat_info.json"
LVIS_VAL = "lvis/lvis_v1_val.json"
IMAGENET_LVIS_ROOT = "imagenet/ImageNet-LVIS"
IMAGENET_LVIS_INFO = "imagenet/annotations/imagenet_lvis_image_info.json"
IMAGENET_LVIS_PSEUDO = "imagenet/annotations/imagenet_lvis_image_info_pis.json"
"""ImageNet-LVIS with one pseudo box per image (``ann_type`` "pseudo")."""


# ----------------------------------------------------------------------------------------------
# Norare split and category info
# ----------------------------------------------------------------------------------------------


def _categories(dataset: Mapping[str, Any], *, need_frequency: bool, path: str | None = None) -> list[dict]:
    """The checked ``categories`` of an LVIS/COCO-format dict (ids unique integers)."""
    if not isinstance(dataset, Mapping):
        raise OVDError(f"expected a JSON object, got {type(dataset).__name__}", path=path)
    cats = dataset.get("categories")
    if not isinstance(cats, list):
        raise OVDError("missing or not a list", path=path, field="categories")
    seen: set[int] = set()
    for i, cat in enumerate(cats):
        field = f"categories[{i}]"
        if not isinstance(cat, Mapping) or "id" not in cat:
            raise OVDError("expected an object with an 'id'", path=path, field=field)
        cid = cat["id"]
        if not isinstance(cid, int) or isinstance(cid, bool) or cid in seen:
            raise OVDError(f"category id must be a unique integer, got {cid!r}", path=path, field=f"{field}.id")
        seen.add(cid)
        if need_frequency and cat.get("frequency") not in FREQUENCIES:
            raise OVDError(
                f"expected one of {FREQUENCIES}, got {cat.get('frequency')!r}", path=path, field=f"{field}.frequency"
            )
    return cats


def _annotations(dataset: Mapping[str, Any], cat_ids: set[int], path: str | None = None) -> list[dict]:
    """The ``annotations`` list, each checked to name a known category and an integer image id."""
    anns = dataset.get("annotations")
    if not isinstance(anns, list):
        raise OVDError("missing or not a list", path=path, field="annotations")
    for i, ann in enumerate(anns):
        if not isinstance(ann, Mapping) or "category_id" not in ann or "image_id" not in ann:
            raise OVDError("expected an object with 'image_id' and 'category_id'", path=path, field=f"annotations[{i}]")
        cid = ann["category_id"]
        if not isinstance(cid, int) or cid not in cat_ids:
            raise OVDError(
                f"category id {cid!r} is not in categories",
                path=path,
                field=f"annotations[{i}].category_id",
            )
    return anns


def make_norare(lvis_train: Mapping[str, Any], *, path: str | None = None) -> dict[str, Any]:
    """``lvis_v1_train_norare``: the LVIS training file without rare-class annotations (METHOD §6.2).

    Args:
        lvis_train: the loaded ``lvis_v1_train.json`` (left unmodified).
        path: the file it came from, named in errors.

    Returns:
        A new dict: the same top-level fields, ``annotations`` keeping only those whose category has
        ``frequency`` ``"c"`` or ``"f"``. Every image (also those left without annotations) and every
        category are kept, so contiguous class ids do not change.

    Raises:
        OVDError: missing ``categories`` / ``annotations``, a category without a valid
            ``frequency``, or an annotation of an unknown category.
    """
    cats = _categories(lvis_train, need_frequency=True, path=path)
    rare = {c["id"] for c in cats if c["frequency"] == RARE}
    anns = _annotations(lvis_train, {c["id"] for c in cats}, path=path)
    kept = [a for a in anns if a["category_id"] not in rare]
    logger.info("norare: kept %d of %d annotations (%d rare classes removed)", len(kept), len(anns), len(rare))
    return {**lvis_train, "annotations": kept}


def category_info(dataset: Mapping[str, Any], *, path: str | None = None) -> list[dict[str, Any]]:
    """Per-category image and instance counts, counted from ``dataset``'s own annotations.

    This is the reference's ``*_cat_info.json`` (``tools/get_lvis_cat_info.py``): the sigmoid CE
    ignores classes with ``image_count == 0`` and the federated loss samples classes with probability
    ``∝ image_count ** 0.5`` (METHOD §2.3). On the norare file the rare classes get 0.

    Args:
        dataset: a COCO/LVIS-format dict (``categories``, ``annotations`` with ``image_id`` and
            ``category_id``). Every annotation is counted (LVIS has no crowd boxes).
        path: the file it came from, named in errors.

    Returns:
        One dict per category, sorted by id: ``id``, ``name``, ``frequency`` (when the category has
        one), ``image_count`` (images with at least one annotation of it) and ``instance_count``.
    """
    cats = _categories(dataset, need_frequency=False, path=path)
    ids = sorted(c["id"] for c in cats)
    anns = _annotations(dataset, set(ids), path=path)
    instances = dict.fromkeys(ids, 0)
    images: dict[int, set[Any]] = {cid: set() for cid in ids}
    for ann in anns:
        instances[ann["category_id"]] += 1
        images[ann["category_id"]].add(ann["image_id"])
    out = []
    for cat in sorted(cats, key=lambda c: c["id"]):
        info: dict[str, Any] = {"id": cat["id"], "name": cat.get("name", str(cat["id"]))}
        if "frequency" in cat:
            info["frequency"] = cat["frequency"]
        info["image_count"] = len(images[cat["id"]])
        info["instance_count"] = instances[cat["id"]]
        out.append(info)
    return out


# ----------------------------------------------------------------------------------------------
# Repeat-factor sampling
# ----------------------------------------------------------------------------------------------


def repeat_factors(records: Sequence[ImageRecord], num_classes: int, threshold: float = REPEAT_THRESHOLD) -> np.ndarray:
    """LVIS repeat factor of each image (METHOD §10.12).

    ``f_c`` = fraction of the ``I`` images with at least one box of class ``c``;
    ``r_c = max(1, sqrt(t / f_c))``; an image's factor is the largest ``r_c`` over the classes of its
    boxes, 1 for an image without boxes. Only box labels count (image-level ``pos_labels`` do not).

    Args:
        records: the training images (labels contiguous ``0..C-1``).
        num_classes: ``C``.
        threshold: ``t`` (LVIS: 0.001); must be > 0.

    Returns:
        ``float64[I]``, every entry >= 1.
    """
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0):
        raise OVDError(f"must be a positive number, got {threshold!r}", field="repeat_threshold")
    counts = coco.category_image_counts(records, num_classes)  # (C,) images containing each class
    freq = counts / max(len(records), 1)  # (C,) f_c
    with np.errstate(divide="ignore"):
        class_factor = np.maximum(1.0, np.sqrt(threshold / freq))  # (C,) inf where f_c = 0 (never looked up)
    out = np.ones(len(records), dtype=np.float64)
    for i, rec in enumerate(records):
        if len(rec.labels):
            out[i] = class_factor[rec.labels].max()
    return out


def repeat_indices(factors: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Image indices of one epoch under repeat-factor sampling, by stochastic rounding.

    Image ``i`` appears ``floor(r_i) + Bernoulli(r_i - floor(r_i))`` times, so ``r_i`` times on average.
    The draws come from ``np.random.default_rng([seed, epoch])``: the same ``(seed, epoch)`` gives the
    same indices on every rank and after a resume.

    Args:
        factors: ``float[I]`` repeat factors (>= 0, finite), e.g. from :func:`repeat_factors`.
        seed: non-negative run seed.
        epoch: non-negative epoch number.

    Returns:
        ``int64[~sum(r)]`` indices in ascending order (the caller shuffles).
    """
    factors = np.asarray(factors, dtype=np.float64)
    if factors.ndim != 1 or not np.isfinite(factors).all() or (factors < 0).any():
        raise OVDError("repeat factors must be a 1-D array of finite numbers >= 0", field="repeat_factors")
    if seed < 0 or epoch < 0:
        raise OVDError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    rng = np.random.default_rng([int(seed), int(epoch)])
    whole = np.floor(factors)  # (I,)
    copies = whole.astype(np.int64) + (rng.random(len(factors)) < factors - whole)  # (I,)
    return np.repeat(np.arange(len(factors), dtype=np.int64), copies)


# ----------------------------------------------------------------------------------------------
# ImageNet-LVIS image labels (METHOD §4.1)
# ----------------------------------------------------------------------------------------------


def read_wnid_mapping(
    source: Mapping[str, int | str] | str | os.PathLike[str], categories: Sequence[Mapping[str, Any]]
) -> dict[str, int]:
    """ImageNet WordNet id → LVIS category id.

    Args:
        source: a dict, or a file: JSON ``{wnid: target}``, or text with one ``wnid target`` per line
            (blank lines and ``#`` comments skipped). A target is an LVIS category id, name
            (``aerosol_can``) or synset (``aerosol.n.02``).
        categories: the LVIS categories (``id``, ``name``, optionally ``synset``).

    Returns:
        ``{wnid: lvis_id}``.

    Raises:
        OVDError: an unreadable file, a line without a target (a bare wnid needs WordNet to be mapped),
            or a target that names no category.
    """
    path = None if isinstance(source, Mapping) else Path(source)
    pairs: list[tuple[str, Any, str]] = []  # (wnid, target, field)
    if isinstance(source, Mapping):
        pairs = [(str(w), t, f"wnid_to_lvis[{w!r}]") for w, t in source.items()]
    elif path is not None and path.suffix == ".json":
        data = read_json(path)
        if not isinstance(data, Mapping):
            raise OVDError(f"expected an object {{wnid: category}}, got {type(data).__name__}", path=path)
        pairs = [(str(w), t, str(w)) for w, t in data.items()]
    else:
        if path is None or not path.is_file():
            raise OVDError("file not found", path=path)
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            parts = line.split("#", 1)[0].split()
            if not parts:
                continue
            if len(parts) != 2:
                raise OVDError(
                    f"expected 'wnid lvis_category' (id, name or synset), got {line.strip()!r}; a bare wnid "
                    "cannot be mapped without WordNet",
                    path=path,
                    field=f"line {n}",
                )
            pairs.append((parts[0], int(parts[1]) if parts[1].isdigit() else parts[1], f"line {n}"))
    by_id = {int(c["id"]): int(c["id"]) for c in categories}
    by_name = {str(c.get("name")): int(c["id"]) for c in categories if "name" in c}
    by_synset = {str(c.get("synset")): int(c["id"]) for c in categories if "synset" in c}
    out: dict[str, int] = {}
    for wnid, target, field in pairs:
        if isinstance(target, int) and not isinstance(target, bool):
            cid = by_id.get(target)
        else:
            cid = by_name.get(str(target), by_synset.get(str(target)))
        if cid is None:
            raise OVDError(f"{target!r} is not an LVIS category id, name or synset", path=path, field=field)
        if wnid in out and out[wnid] != cid:
            raise OVDError(f"wnid {wnid} is mapped twice ({out[wnid]} and {cid})", path=path, field=field)
        out[wnid] = cid
    return out


def _image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the image header only (PIL opens lazily)."""
    try:
        with Image.open(path) as im:
            width, height = im.size
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise OVDError(f"unreadable image ({e})", path=path) from e
    if width <= 0 or height <= 0:
        raise OVDError(f"image has size {width}x{height}", path=path)
    return width, height


def imagenet_lvis_json(
    image_root: str | os.PathLike[str],
    wnid_to_lvis: Mapping[str, int | str] | str | os.PathLike[str],
    categories: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """The ImageNet-LVIS image-label file (``imagenet_lvis_image_info.json``, METHOD §4.1).

    Args:
        image_root: folder of ``<wnid>/<name>.JPEG`` (any of :data:`IMAGE_EXTENSIONS`, any case).
        wnid_to_lvis: the class list (see :func:`read_wnid_mapping`).
        categories: the LVIS categories (e.g. ``lvis_v1_val.json``'s).

    Returns:
        ``{"images": [{id, file_name "wnid/x.JPEG", width, height, pos_category_ids: [lvis_id]}],
        "categories": categories + image_count (ImageNet images per category), "annotations": []}``;
        images in (wnid, file name) order with ids ``1..N``. Sizes come from the image headers.

    Raises:
        OVDError: a missing root, a class folder whose wnid is not in the mapping, or an unreadable image.
    """
    root = Path(image_root)
    if not root.is_dir():
        raise OVDError("image folder not found", path=root)
    mapping = read_wnid_mapping(wnid_to_lvis, categories)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in folders if p.name not in mapping]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise OVDError(f"{len(unknown)} class folder(s) not in the wnid mapping: {shown}", path=root)
    images: list[dict[str, Any]] = []
    counts: dict[int, int] = {}
    for folder in folders:
        cid = mapping[folder.name]
        files = sorted(
            p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        )
        for file in files:
            width, height = _image_size(file)
            images.append(
                {
                    "id": len(images) + 1,
                    "file_name": f"{folder.name}/{file.name}",
                    "width": width,
                    "height": height,
                    "pos_category_ids": [cid],
                }
            )
        counts[cid] = counts.get(cid, 0) + len(files)
    cats = [{**c, "image_count": counts.get(int(c["id"]), 0)} for c in categories]
    for cat in cats:
        cat.pop("instance_count", None)  # an LVIS count, meaningless here
    logger.info("ImageNet-LVIS: %d images in %d classes under %s", len(images), len(folders), root)
    return {"images": images, "categories": cats, "annotations": []}


# ----------------------------------------------------------------------------------------------
# Loading and the catalog
# ----------------------------------------------------------------------------------------------


def load_lvis_json(
    ann_file: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    category_ids: Sequence[int],
    *,
    with_masks: bool = False,
) -> list[ImageRecord]:
    """LVIS v1 boxes (and masks) as image records: :func:`ovd.data.coco.load_coco_json`, which derives
    an official LVIS image's missing ``file_name`` from its ``coco_url`` (``train2017/<name>.jpg``, so
    ``image_root`` is the COCO folder). Images without boxes are kept."""
    return coco.load_coco_json(ann_file, image_root, category_ids, with_masks=with_masks)


def load_lvis_dataset(info: DatasetInfo, *, with_masks: bool | None = None) -> list[ImageRecord]:
    """Records of an LVIS catalog entry (box files via :func:`load_lvis_json`, image labels via COCO)."""
    if not info.category_ids:
        raise OVDError(
            f"the LVIS vocabulary is unknown: write {LVIS_CAT_INFO} under the datasets root with "
            "'python tools/prepare_lvis.py norare' and re-register (ovd.data.lvis.register_lvis())",
            field=f"catalog[{info.name}]",
        )
    if info.ann_type == "image":
        return coco.load_coco_json(info.ann_file_path, info.image_root_path, info.category_ids, ann_type="image")
    masks = info.extra.get("masks") == "true" if with_masks is None else with_masks
    return load_lvis_json(info.ann_file_path, info.image_root_path, info.category_ids, with_masks=masks)


def read_categories(path: str | os.PathLike[str], *, need_frequency: bool = False) -> list[dict[str, Any]]:
    """The checked categories of an LVIS/COCO JSON file (its ``categories``) or of a category-info list."""
    data = read_json(path)
    return _categories(
        {"categories": data} if isinstance(data, list) else data, need_frequency=need_frequency, path=str(path)
    )


def lvis_vocabulary(cat_info: str | os.PathLike[str]) -> tuple[tuple[int, ...], tuple[str, ...], tuple[str, ...]]:
    """``(category ids, names, frequencies)`` sorted by id, from a category-info or LVIS JSON file."""
    cats = sorted(read_categories(cat_info, need_frequency=True), key=lambda c: c["id"])
    return (
        tuple(int(c["id"]) for c in cats),
        tuple(str(c.get("name", c["id"])) for c in cats),
        tuple(str(c["frequency"]) for c in cats),
    )


def register_lvis(root: str | os.PathLike[str] | None = None) -> None:
    """Register ``lvis_v1_train_norare``, ``lvis_v1_val`` (boxes) and ``imagenet_lvis`` (image labels).

    Paths follow METHOD §6.3 under the datasets root; LVIS images are COCO's (``coco/{train,val}2017``).
    The 1203-class vocabulary (ids, names; base = frequent + common, novel = rare) is read from the
    small category-info file :data:`LVIS_CAT_INFO` that ``python tools/prepare_lvis.py norare`` writes,
    so registering never parses the large annotation files. Without that file the entries are
    registered with an empty vocabulary and :func:`load_lvis_dataset` says what to run; call this
    again (it overwrites) once the file exists.

    Args:
        root: the datasets root to look for the category-info file in (default :func:`datasets_root`).
    """
    cat_info = Path(root) if root is not None else datasets_root()
    cat_info = cat_info / LVIS_CAT_INFO
    ids: tuple[int, ...] = ()
    names: tuple[str, ...] = ()
    freqs: tuple[str, ...] = ()
    if cat_info.is_file():
        try:
            ids, names, freqs = lvis_vocabulary(cat_info)
        except OVDError as e:
            logger.warning("LVIS datasets registered without a vocabulary: %s", e)
    vocab = dict(
        class_names=names,
        category_ids=ids,
        base_classes=tuple(k for k, f in enumerate(freqs) if f != RARE),
        novel_classes=tuple(k for k, f in enumerate(freqs) if f == RARE),
    )
    extra = {"format": "lvis", "cat_info": LVIS_CAT_INFO}
    entries = (
        ("lvis_v1_train_norare", LVIS_IMAGE_ROOT, LVIS_TRAIN_NORARE, "box", {"masks": "true"}),
        ("lvis_v1_val", LVIS_IMAGE_ROOT, LVIS_VAL, "box", {"masks": "true"}),
        ("imagenet_lvis", IMAGENET_LVIS_ROOT, IMAGENET_LVIS_INFO, "image", {}),
        # one pseudo box per image (tools/generate_pseudo_labels.py; METHOD §4.2's imagenet_lvis_image_info_pis)
        ("imagenet_lvis_pseudo", IMAGENET_LVIS_ROOT, IMAGENET_LVIS_PSEUDO, "pseudo", {}),
    )
    for name, image_root, ann_file, ann_type, more in entries:
        register_dataset(
            DatasetInfo(
                name=name,
                image_root=image_root,
                ann_file=ann_file,
                ann_type=ann_type,
                extra={**extra, **more},
                evaluator="lvis",
                **vocab,
            ),
            overwrite=True,
        )
