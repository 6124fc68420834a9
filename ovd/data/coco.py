"""Load COCO-format annotation files into :class:`~ovd.structures.ImageRecord` lists.

Two kinds of files are read (``ann_type``):

* ``"box"``: a COCO detection JSON (``images``, ``annotations`` with ``bbox`` in ``xywh`` pixels,
  ``categories``). Boxes become ``xyxy`` float32 in original-image pixels; crowd annotations
  (``iscrowd=1``) are skipped.
* ``"image"``: an image-label JSON (LVIS / Detic style): each ``images[i]`` carries
  ``pos_category_ids``, a list of dataset category ids present in the image. They become
  :attr:`ImageRecord.pos_labels`; images without any are dropped. ``annotations`` are not read.

Dataset category ids are mapped to contiguous ids ``0..C-1`` by their position in the dataset's
``category_ids`` (the vocabulary of :class:`~ovd.data.catalog.DatasetInfo`).

Every malformed entry raises :class:`~ovd.errors.OVDError` naming the file and the field path,
e.g. ``annotations[17].bbox: expected 4 numbers, got 3``.

Shape shorthand: ``N`` boxes of one image, ``L`` image-level labels, ``C`` classes.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torchvision.ops import box_convert

from ovd.data.catalog import DatasetInfo
from ovd.errors import OVDError
from ovd.structures import ImageRecord
from ovd.utils.io import read_json

logger = logging.getLogger(__name__)

ANN_TYPES = ("box", "image", "pseudo")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class _Checker:
    """Raises :class:`OVDError` naming the annotation file and a field path."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, field: str, reason: str) -> OVDError:
        return OVDError(reason, path=self.path, field=field)

    def key(self, entry: Any, field: str, key: str) -> Any:
        if not isinstance(entry, Mapping):
            raise self.fail(field, f"expected an object, got {type(entry).__name__}")
        if key not in entry:
            raise self.fail(field, f"missing key {key!r}")
        return entry[key]

    def int_id(self, value: Any, field: str) -> int:
        if not _is_int(value):
            raise self.fail(field, f"expected an integer id, got {value!r}")
        return value

    def positive_int(self, value: Any, field: str) -> int:
        if _is_number(value) and math.isfinite(value) and value == int(value) and value > 0:
            return int(value)
        raise self.fail(field, f"expected a positive integer, got {value!r}")

    def list_(self, value: Any, field: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(field, f"expected a list, got {type(value).__name__}")
        return value


def _vocabulary(category_ids: Sequence[int]) -> dict[int, int]:
    """Dataset category id → contiguous id (position in ``category_ids``)."""
    mapping: dict[int, int] = {}
    for i, cid in enumerate(category_ids):
        if cid in mapping:
            raise OVDError(f"category id {cid} appears twice in the vocabulary", field="category_ids")
        mapping[int(cid)] = i
    return mapping


def _file_categories(data: Mapping[str, Any], vocab: Mapping[int, int], chk: _Checker) -> set[int] | None:
    """The file's ``categories`` ids, each checked to be in the vocabulary (None if absent)."""
    if "categories" not in data:
        return None
    ids: set[int] = set()
    for i, cat in enumerate(chk.list_(data["categories"], "categories")):
        field = f"categories[{i}]"
        cid = chk.int_id(chk.key(cat, field, "id"), f"{field}.id")
        if cid not in vocab:
            raise chk.fail(f"{field}.id", f"{cid} is not in the dataset's vocabulary (category_ids)")
        ids.add(cid)
    return ids


def _check_category(cid: Any, field: str, vocab: Mapping[int, int], file_cats: set[int] | None, chk: _Checker) -> int:
    """Contiguous id of a dataset category id, after checking it is declared."""
    cid = chk.int_id(cid, field)
    if file_cats is not None:
        if cid not in file_cats:
            raise chk.fail(field, f"{cid} is not in categories")
    elif cid not in vocab:
        raise chk.fail(field, f"{cid} is not in the dataset's vocabulary (category_ids)")
    return vocab[cid]


def _file_name_from_url(img: Mapping[str, Any]) -> str | None:
    """``train2017/000000155379.jpg`` from ``coco_url``: LVIS v1 images have no ``file_name``, so their
    ``image_root`` is the COCO folder holding ``train2017/`` and ``val2017/``."""
    url = img.get("coco_url")
    if isinstance(url, str) and url.count("/") >= 2:
        return "/".join(url.split("/")[-2:])
    return None


def _read_images(
    data: Mapping[str, Any], image_root: Path, chk: _Checker
) -> tuple[list[dict[str, Any]], dict[int, int]]:
    """Parse ``images`` into plain dicts; returns them and image id → position."""
    images = chk.list_(chk.key(data, "<top level>", "images"), "images")
    root = os.path.abspath(image_root)
    out: list[dict[str, Any]] = []
    position: dict[int, int] = {}
    for i, img in enumerate(images):
        field = f"images[{i}]"
        if not isinstance(img, Mapping):
            raise chk.fail(field, f"expected an object, got {type(img).__name__}")
        for key in ("id", "height", "width"):
            if key not in img:
                raise chk.fail(field, f"missing key {key!r}")
        image_id = chk.int_id(img["id"], f"{field}.id")
        if image_id in position:
            raise chk.fail(f"{field}.id", f"duplicate image id {image_id}")
        file_name = img.get("file_name", _file_name_from_url(img))
        if file_name is None:
            raise chk.fail(field, "missing key 'file_name' (and no 'coco_url' to derive it from)")
        if not isinstance(file_name, str) or not file_name:
            raise chk.fail(f"{field}.file_name", f"expected a non-empty string, got {file_name!r}")
        position[image_id] = i
        out.append(
            {
                "image_id": image_id,
                "file_name": os.path.join(root, file_name),
                "height": chk.positive_int(img["height"], f"{field}.height"),
                "width": chk.positive_int(img["width"], f"{field}.width"),
            }
        )
    return out, position


class _FlatBoxes(NamedTuple):
    """Non-crowd annotations of a file, in annotation order (``M`` boxes)."""

    image_pos: np.ndarray  # int64[M]: position of the box's image in ``images``
    labels: np.ndarray  # int64[M]: contiguous class ids
    xywh: np.ndarray  # float64[M, 4]


def _read_boxes_fast(
    anns: list[Any],
    images: list[dict[str, Any]],
    vocab: Mapping[int, int],
    file_cats: set[int] | None,
) -> _FlatBoxes | None:
    """Vectorised reading of well-formed annotations; ``None`` if anything looks wrong.

    On ``None`` the caller re-reads with :func:`_read_boxes_checked`, which finds and reports the
    first bad field. This keeps large files (COCO: ~860k boxes) fast without weakening the checks.
    """
    try:
        kept = [a for a in anns if not a.get("iscrowd", 0)]
        image_ids = np.array([a["image_id"] for a in kept])
        cat_ids = np.array([a["category_id"] for a in kept])
        xywh = np.array([a["bbox"] for a in kept])
        known_ids = np.array([img["image_id"] for img in images], dtype=np.int64)
    except (AttributeError, KeyError, TypeError, ValueError, OverflowError):
        return None
    m = len(kept)
    if m == 0:
        return _FlatBoxes(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4), np.float64))
    if image_ids.dtype.kind != "i" or cat_ids.dtype.kind != "i" or len(known_ids) == 0:
        return None
    if xywh.dtype.kind not in "iuf" or xywh.shape != (m, 4):
        return None
    xywh = xywh.astype(np.float64)

    id_order = np.argsort(known_ids)
    slot = np.searchsorted(known_ids[id_order], image_ids).clip(max=len(known_ids) - 1)  # (M,)
    if not (known_ids[id_order][slot] == image_ids).all():
        return None
    image_pos = id_order[slot]  # (M,)

    allowed = np.array(sorted(file_cats if file_cats is not None else vocab), dtype=np.int64)
    if not np.isin(cat_ids, allowed).all():
        return None
    vocab_ids = np.array(list(vocab), dtype=np.int64)  # allowed ⊆ vocab_ids, checked by the caller
    vocab_order = np.argsort(vocab_ids)
    labels = vocab_order[np.searchsorted(vocab_ids[vocab_order], cat_ids)]  # (M,) position in vocab

    size = np.array([[img["width"], img["height"]] for img in images], dtype=np.float64)[image_pos]  # (M, 2)
    x, y, w, h = xywh.T
    ok = np.isfinite(xywh).all(axis=1) & (w > 0) & (h > 0)
    ok &= (x < size[:, 0]) & (y < size[:, 1]) & (x + w > 0) & (y + h > 0)
    if not ok.all():
        return None
    return _FlatBoxes(image_pos.astype(np.int64), labels.astype(np.int64), xywh)


def _read_boxes_checked(
    anns: list[Any],
    images: list[dict[str, Any]],
    position: Mapping[int, int],
    vocab: Mapping[int, int],
    file_cats: set[int] | None,
    chk: _Checker,
) -> _FlatBoxes:
    """Entry-by-entry reading that raises :class:`OVDError` on the first malformed field."""
    image_pos: list[int] = []
    labels: list[int] = []
    xywh: list[list[float]] = []
    for i, ann in enumerate(anns):
        field = f"annotations[{i}]"
        if not isinstance(ann, Mapping):
            raise chk.fail(field, f"expected an object, got {type(ann).__name__}")
        if ann.get("iscrowd", 0):
            continue
        for key in ("image_id", "category_id", "bbox"):
            if key not in ann:
                raise chk.fail(field, f"missing key {key!r}")
        image_id = chk.int_id(ann["image_id"], f"{field}.image_id")
        if image_id not in position:
            raise chk.fail(f"{field}.image_id", f"{image_id} is not in images")
        label = _check_category(ann["category_id"], f"{field}.category_id", vocab, file_cats, chk)
        bbox = ann["bbox"]
        if not isinstance(bbox, list):
            raise chk.fail(f"{field}.bbox", f"expected 4 numbers, got {type(bbox).__name__}")
        if len(bbox) != 4:
            raise chk.fail(f"{field}.bbox", f"expected 4 numbers, got {len(bbox)}")
        if not all(_is_number(v) for v in bbox):
            raise chk.fail(f"{field}.bbox", f"expected 4 numbers, got {bbox!r}")
        if not all(math.isfinite(v) for v in bbox):
            raise chk.fail(f"{field}.bbox", f"non-finite value in {bbox}")
        x, y, w, h = bbox
        if w <= 0 or h <= 0:
            raise chk.fail(f"{field}.bbox", f"non-positive size (w={w}, h={h})")
        img = images[position[image_id]]
        if x >= img["width"] or y >= img["height"] or x + w <= 0 or y + h <= 0:
            raise chk.fail(
                f"{field}.bbox",
                f"box {bbox} lies outside image {image_id} ({img['width']}x{img['height']})",
            )
        image_pos.append(position[image_id])
        labels.append(label)
        xywh.append(bbox)
    return _FlatBoxes(
        np.array(image_pos, dtype=np.int64),
        np.array(labels, dtype=np.int64),
        np.array(xywh, dtype=np.float64).reshape(-1, 4),
    )


def _read_boxes(
    data: Mapping[str, Any],
    images: list[dict[str, Any]],
    position: Mapping[int, int],
    vocab: Mapping[int, int],
    file_cats: set[int] | None,
    chk: _Checker,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per image: ``float32[N, 4]`` xyxy boxes clipped to the image and ``int64[N]`` labels.

    Boxes of an image keep their annotation order.
    """
    anns = chk.list_(chk.key(data, "<top level>", "annotations"), "annotations")
    flat = _read_boxes_fast(anns, images, vocab, file_cats)
    if flat is None:
        flat = _read_boxes_checked(anns, images, position, vocab, file_cats, chk)
    if not images:
        return [], []
    size = np.array([[img["width"], img["height"]] for img in images], dtype=np.float64).reshape(-1, 2)
    xyxy = box_convert(torch.from_numpy(flat.xywh), in_fmt="xywh", out_fmt="xyxy")  # (M, 4)
    limit = torch.from_numpy(size[flat.image_pos]).repeat(1, 2)  # (M, 4) as (W, H, W, H)
    xyxy = torch.minimum(xyxy.clamp(min=0), limit).to(torch.float32).numpy()  # (M, 4)
    order = np.argsort(flat.image_pos, kind="stable")  # group by image, annotation order inside
    splits = np.cumsum(np.bincount(flat.image_pos, minlength=len(images)))[:-1]
    return np.split(xyxy[order], splits), np.split(flat.labels[order], splits)


def _check_segmentation(segm: Any, img: Mapping[str, Any], field: str, chk: _Checker) -> dict | list:
    """A COCO ``segmentation``: an RLE dict of the image's size, or a list of polygons."""
    if isinstance(segm, Mapping):
        size, counts = segm.get("size"), segm.get("counts")
        if not isinstance(size, list) or len(size) != 2 or not isinstance(counts, (str, list)):
            raise chk.fail(field, "expected an RLE {'size': [h, w], 'counts': ...} or a list of polygons")
        if list(size) != [img["height"], img["width"]]:
            raise chk.fail(f"{field}.size", f"RLE size {size} differs from the image's {[img['height'], img['width']]}")
        return dict(segm)
    if isinstance(segm, list) and segm:
        for j, poly in enumerate(segm):
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2 or not all(_is_number(v) for v in poly):
                raise chk.fail(f"{field}[{j}]", "expected a polygon [x1, y1, x2, y2, ...] of at least 3 points")
        return segm
    raise chk.fail(field, "expected an RLE {'size': [h, w], 'counts': ...} or a non-empty list of polygons")


def _read_segmentations(
    data: Mapping[str, Any], images: list[dict[str, Any]], position: Mapping[int, int], chk: _Checker
) -> list[list[dict | list]]:
    """Per image: the ``segmentation`` of each non-crowd annotation, aligned with :func:`_read_boxes`."""
    out: list[list[dict | list]] = [[] for _ in images]
    for i, ann in enumerate(data["annotations"]):  # already checked by _read_boxes
        if ann.get("iscrowd", 0):
            continue
        if "segmentation" not in ann:
            raise chk.fail(f"annotations[{i}]", "missing key 'segmentation' (masks were requested)")
        pos = position[ann["image_id"]]
        out[pos].append(_check_segmentation(ann["segmentation"], images[pos], f"annotations[{i}].segmentation", chk))
    return out


def _read_pos_labels(
    raw_images: list[Any],
    vocab: Mapping[int, int],
    file_cats: set[int] | None,
    chk: _Checker,
) -> list[list[int]]:
    """Per image: contiguous ids of ``pos_category_ids`` (deduplicated, first-seen order)."""
    if raw_images and not any("pos_category_ids" in img for img in raw_images):
        raise chk.fail("images", "no image has 'pos_category_ids'; is this an image-label file (ann_type='image')?")
    out: list[list[int]] = []
    for i, img in enumerate(raw_images):
        field = f"images[{i}].pos_category_ids"
        ids = chk.list_(img.get("pos_category_ids", []), field)
        labels = [_check_category(c, f"{field}[{j}]", vocab, file_cats, chk) for j, c in enumerate(ids)]
        out.append(list(dict.fromkeys(labels)))
    return out


def load_coco_json(
    ann_file: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    category_ids: Sequence[int],
    *,
    ann_type: str = "box",
    filter_empty: bool = False,
    with_masks: bool = False,
) -> list[ImageRecord]:
    """Read a COCO-format JSON into image records.

    Args:
        ann_file: the annotation JSON.
        image_root: folder that ``images[*].file_name`` is relative to; record file names are made
            absolute under it.
        category_ids: the vocabulary: dataset category id of each contiguous id (``C`` ids). Every
            id in the file's ``categories`` must be in it.
        ann_type: ``"box"`` (read ``annotations[*].bbox``), ``"image"`` (read
            ``images[*].pos_category_ids``; images with none are dropped) or ``"pseudo"`` (both: the
            image-level labels and one pseudo box per label that got one, from
            ``tools/generate_pseudo_labels.py``; images without labels are dropped).
        filter_empty: for ``"box"``, drop images with no (non-crowd) box. Off by default: images
            without base annotations stay in the training set (METHOD §1.5).
        with_masks: for ``"box"``, also read each annotation's ``segmentation`` (RLE or polygons) into
            :attr:`ImageRecord.masks`; every non-crowd annotation must have one. Off by default
            (``masks`` stays ``None`` and nothing more is parsed).

    Returns:
        One :class:`ImageRecord` per kept image, in the order of ``images``. ``boxes`` are
        ``float32[N, 4]`` xyxy in original pixels (clipped to the image), ``labels`` ``int64[N]``,
        ``pos_labels`` ``int64[L]``.

    Raises:
        OVDError: the file is missing or malformed; the message names the file and the field.
    """
    if ann_type not in ANN_TYPES:
        raise OVDError(f"unknown ann_type {ann_type!r}; expected one of {ANN_TYPES}", field="ann_type")
    path = Path(ann_file)
    chk = _Checker(path)
    data = read_json(path)
    if not isinstance(data, Mapping):
        raise chk.fail("<top level>", f"expected a JSON object, got {type(data).__name__}")
    vocab = _vocabulary(category_ids)
    file_cats = _file_categories(data, vocab, chk)
    images, position = _read_images(data, Path(image_root), chk)

    records: list[ImageRecord] = []
    if ann_type == "box":
        boxes, labels = _read_boxes(data, images, position, vocab, file_cats, chk)
        segms: list[Any] = _read_segmentations(data, images, position, chk) if with_masks else [None] * len(images)
        for img, b, lab, segm in zip(images, boxes, labels, segms, strict=True):
            if filter_empty and not len(b):
                continue
            records.append(
                ImageRecord(
                    **img,
                    boxes=b,
                    labels=lab,
                    ann_type="box",
                    masks=segm,
                )
            )
    else:
        pos = _read_pos_labels(data["images"], vocab, file_cats, chk)
        if ann_type == "pseudo":
            boxes, labels = _read_boxes(data, images, position, vocab, file_cats, chk)
        else:
            boxes = [np.zeros((0, 4), dtype=np.float32)] * len(images)
            labels = [np.zeros((0,), dtype=np.int64)] * len(images)
        for img, p, b, lab in zip(images, pos, boxes, labels, strict=True):
            if not p:
                continue
            extra = set(lab.tolist()) - set(p)
            if extra:
                raise chk.fail(f"images[id={img['image_id']}]", f"pseudo boxes of classes {sorted(extra)} that are "
                               "not among its pos_category_ids")  # fmt: skip
            records.append(
                ImageRecord(**img, boxes=b, labels=lab, pos_labels=np.asarray(p, dtype=np.int64), ann_type=ann_type)
            )
    logger.info("loaded %d %s-annotated images from %s", len(records), ann_type, path)
    return records


MASKS_KEY = "masks"
"""``DatasetInfo.extra[MASKS_KEY] == "true"``: the dataset's records carry instance masks (for Mask R-CNN)."""


def load_dataset(info: DatasetInfo, *, filter_empty: bool = False, with_masks: bool | None = None) -> list[ImageRecord]:
    """Records of a catalog dataset (see :func:`load_coco_json`).

    ``with_masks=None`` reads masks when the catalog entry says its annotations have them
    (``info.extra["masks"] == "true"``).
    """
    if not info.category_ids:
        hint = " (LVIS: run 'python tools/prepare_lvis.py norare' first)" if info.extra.get("format") == "lvis" else ""
        raise OVDError(f"dataset {info.name!r} has an empty vocabulary{hint}", field="category_ids")
    if with_masks is None:
        with_masks = info.extra.get(MASKS_KEY) == "true"
    return load_coco_json(
        info.ann_file_path,
        info.image_root_path,
        info.category_ids,
        ann_type=info.ann_type,
        filter_empty=filter_empty,
        with_masks=with_masks and info.ann_type == "box",
    )


def _check_labels(labels: np.ndarray, num_classes: int, rec: ImageRecord) -> None:
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise OVDError(f"label {int(bad[0])} outside 0..{num_classes - 1}", path=rec.file_name)


def category_image_counts(records: Sequence[ImageRecord], num_classes: int) -> np.ndarray:
    """Number of images with at least one box of each class.

    This is the ``image_count`` of the reference's cat-info JSON; classes with count 0 are the ones
    the sigmoid CE ignores (METHOD §2.3, §10.3). Only box labels are counted, not ``pos_labels``.

    Returns:
        ``int64[C]``.
    """
    counts = np.zeros(num_classes, dtype=np.int64)
    for rec in records:
        _check_labels(rec.labels, num_classes, rec)
        counts[np.unique(rec.labels)] += 1
    return counts


def category_instance_counts(records: Sequence[ImageRecord], num_classes: int) -> np.ndarray:
    """Number of (non-crowd) boxes of each class. Returns ``int64[C]``."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for rec in records:
        _check_labels(rec.labels, num_classes, rec)
        counts += np.bincount(rec.labels, minlength=num_classes)
    return counts
