"""LVIS evaluation inputs: the detections of a dataset in flat arrays, and the checked, indexed ground truth.

Used by :mod:`ovd.evaluation.lvis_eval`. Shape legend: ``N`` detections, ``I`` images, ``K`` classes,
``G`` GT instances.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ovd.errors import OVDError
from ovd.evaluation.common import check_box, is_int, is_real, load_gt
from ovd.utils.io import read_json

FREQUENCY_KEYS = {"r": "APr", "c": "APc", "f": "APf"}  # LVIS frequency groups, in lvis-api's order


@dataclass
class LVISDetections:
    """The detections of a whole dataset in flat arrays (``N`` detections).

    Attributes:
        image_ids: ``int64[N]`` dataset image ids.
        category_ids: ``int64[N]`` dataset category ids (not contiguous ids).
        scores: ``float64[N]``.
        boxes: ``float64[N, 4]`` COCO ``[x, y, w, h]`` in original-image pixels.
        masks: ``N`` compressed RLE ``counts`` (bytes) of full-image masks, or None (boxes only).
        mask_sizes: ``int64[N, 2]`` ``(height, width)`` of each RLE, or None.
    """

    image_ids: np.ndarray
    category_ids: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray
    masks: list[bytes] | None = None
    mask_sizes: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.scores)
        shapes = (self.image_ids.shape, self.category_ids.shape, self.scores.shape, self.boxes.shape)
        if shapes != ((n,), (n,), (n,), (n, 4)):
            raise OVDError(f"inconsistent detection array shapes {shapes}", field="detections")
        if (self.masks is None) != (self.mask_sizes is None) or (
            self.masks is not None and (len(self.masks) != n or self.mask_sizes.shape != (n, 2))
        ):
            raise OVDError("masks and mask_sizes must both be given, one per detection", field="detections")

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def from_results(cls, results: Sequence[Mapping[str, Any]]) -> LVISDetections:
        """Convert COCO/LVIS results ``{image_id, category_id, score, bbox?, segmentation?}``.

        ``bbox`` is ``[x, y, w, h]``; ``segmentation`` a compressed RLE ``{size: [h, w], counts}``. Either
        every record has a ``segmentation`` or none has; a record with a mask may omit ``bbox`` (it is
        then the mask's bounding box).

        Raises:
            OVDError: naming the first malformed record, e.g. ``detections[7].score``.
        """
        if isinstance(results, (str, bytes, Mapping)) or not isinstance(results, Sequence):
            raise OVDError(f"expected a list of result dicts, got {type(results).__name__}", field="detections")
        has_masks = bool(results) and isinstance(results[0], Mapping) and "segmentation" in results[0]
        fast = _from_results_fast(results, has_masks)
        return fast if fast is not None else _from_results_checked(results, has_masks)

    @classmethod
    def concatenate(cls, parts: Sequence[LVISDetections]) -> LVISDetections:
        """One array set from several (e.g. one per evaluated batch or rank)."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return _empty_detections()
        with_masks = {p.masks is not None for p in parts}
        if len(with_masks) != 1:
            raise OVDError("cannot concatenate detections with and without masks", field="detections")
        masks = [m for p in parts for m in p.masks] if with_masks == {True} else None
        return cls(
            np.concatenate([p.image_ids for p in parts]),
            np.concatenate([p.category_ids for p in parts]),
            np.concatenate([p.scores for p in parts]),
            np.concatenate([p.boxes for p in parts]),
            masks,
            None if masks is None else np.concatenate([p.mask_sizes for p in parts]),
        )


def _empty_detections() -> LVISDetections:
    """No detections (usable for boxes and masks)."""
    z = np.zeros(0, np.int64)
    return LVISDetections(z, z.copy(), np.zeros(0), np.zeros((0, 4)), [], np.zeros((0, 2), np.int64))


def _rle_counts(seg: Any) -> tuple[bytes, int, int]:
    """``(counts, h, w)`` of a compressed RLE dict; raises KeyError/TypeError/ValueError otherwise."""
    counts = seg["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    if not isinstance(counts, bytes):
        raise TypeError("counts must be a string")
    h, w = seg["size"]
    if not (is_int(h) and is_int(w) and h > 0 and w > 0):
        raise ValueError("size must be two positive integers")
    return counts, int(h), int(w)


def _from_results_fast(results: Sequence[Mapping[str, Any]], has_masks: bool) -> LVISDetections | None:
    """Vectorised conversion of well-formed results; None if anything looks wrong (then re-checked)."""
    try:
        image_ids = np.array([r["image_id"] for r in results])
        category_ids = np.array([r["category_id"] for r in results])
        scores = np.array([r["score"] for r in results])
        masks = sizes = None
        if has_masks:
            decoded = [_rle_counts(r["segmentation"]) for r in results]
            masks = [c for c, _, _ in decoded]
            sizes = np.array([(h, w) for _, h, w in decoded], dtype=np.int64).reshape(-1, 2)
            if not all("bbox" in r for r in results):
                return None
        boxes = np.array([r["bbox"] for r in results])
    except (AttributeError, KeyError, TypeError, ValueError, UnicodeEncodeError):
        return None
    n = len(results)
    if n == 0:
        return _empty_detections()
    if image_ids.dtype.kind != "i" or category_ids.dtype.kind != "i" or scores.dtype.kind not in "iuf":
        return None
    if boxes.dtype.kind not in "iuf" or boxes.shape != (n, 4) or not np.isfinite(boxes).all():
        return None
    if not np.isfinite(scores).all() or (boxes[:, 2:] < 0).any():
        return None
    if any(isinstance(r["score"], bool) or isinstance(r["image_id"], bool) for r in results):
        return None
    return LVISDetections(
        image_ids.astype(np.int64),
        category_ids.astype(np.int64),
        scores.astype(np.float64),
        boxes.astype(np.float64),
        masks,
        sizes,
    )


def _from_results_checked(results: Sequence[Mapping[str, Any]], has_masks: bool) -> LVISDetections:
    """Record-by-record conversion that raises :class:`OVDError` on the first malformed field."""
    image_ids, category_ids, scores, boxes = [], [], [], []
    masks: list[bytes] = []
    sizes: list[tuple[int, int]] = []
    for i, r in enumerate(results):
        where = f"detections[{i}]"
        if not isinstance(r, Mapping):
            raise OVDError(f"expected an object, got {type(r).__name__}", field=where)
        for key in ("image_id", "category_id", "score"):
            if key not in r:
                raise OVDError(f"missing key {key!r}", field=f"{where}.{key}")
        for key in ("image_id", "category_id"):
            if not is_int(r[key]):
                raise OVDError(f"must be an integer, got {r[key]!r}", field=f"{where}.{key}")
        if not is_real(r["score"]):
            raise OVDError(f"score must be a finite number, got {r['score']!r}", field=f"{where}.score")
        if ("segmentation" in r) != has_masks:
            raise OVDError("either every detection has a 'segmentation' or none has", field=f"{where}.segmentation")
        if has_masks:
            try:
                counts, h, w = _rle_counts(r["segmentation"])
            except (KeyError, TypeError, ValueError, UnicodeEncodeError) as e:
                raise OVDError(
                    f"expected a compressed RLE {{size: [h, w], counts: str}} ({e})", field=f"{where}.segmentation"
                ) from e
            masks.append(counts)
            sizes.append((h, w))
        if "bbox" in r:
            boxes.append(check_box(r["bbox"], field=f"{where}.bbox", path=None))
        elif has_masks:
            from faster_coco_eval.core import mask as mask_utils

            rle = {"size": [h, w], "counts": counts}
            boxes.append([float(v) for v in mask_utils.toBbox([rle])[0]])
        else:
            raise OVDError("missing key 'bbox'", field=f"{where}.bbox")
        image_ids.append(int(r["image_id"]))
        category_ids.append(int(r["category_id"]))
        scores.append(float(r["score"]))
    return LVISDetections(
        np.array(image_ids, dtype=np.int64),
        np.array(category_ids, dtype=np.int64),
        np.array(scores, dtype=np.float64),
        np.array(boxes, dtype=np.float64).reshape(-1, 4),
        masks if has_masks else None,
        np.array(sizes, dtype=np.int64).reshape(-1, 2) if has_masks else None,
    )


def as_detections(detections: Any) -> LVISDetections:
    """:class:`LVISDetections` from themselves, COCO results, or a JSON file of results."""
    if isinstance(detections, LVISDetections):
        return detections
    if isinstance(detections, (str, os.PathLike)):
        return LVISDetections.from_results(read_json(detections))
    return LVISDetections.from_results(detections)


# ----------------------------------------------------------------------------------------------
# Ground truth
# ----------------------------------------------------------------------------------------------


@dataclass
class LVISGroundTruth:
    """The checked GT, indexed for the federated rules (``I`` images, ``K`` classes, ``G`` instances)."""

    dataset: dict[str, Any]
    image_ids: np.ndarray  # int64[I] sorted
    image_hw: np.ndarray  # int64[I, 2] (height, width)
    cat_ids: np.ndarray  # int64[K] sorted
    frequency: list[str]  # K
    names: list[str]  # K
    neg: list[list[int]]  # I: class positions
    not_exhaustive: list[list[int]]  # I: class positions
    ann_index: np.ndarray  # int64[G] position in dataset["annotations"] of the instances with area > 0
    ann_image: np.ndarray  # int64[G] image position
    ann_cat: np.ndarray  # int64[G] class position


def _id_lists(img: Mapping[str, Any], key: str, where: str, cat_pos: Mapping[int, int], path: str | None) -> list[int]:
    ids = img.get(key, [])
    if not isinstance(ids, list):
        raise OVDError(f"expected a list of category ids, got {type(ids).__name__}", path=path, field=f"{where}.{key}")
    for j, cid in enumerate(ids):
        if not is_int(cid) or cid not in cat_pos:
            raise OVDError(f"{cid!r} is not a category of the ground truth", path=path, field=f"{where}.{key}[{j}]")
    return sorted({cat_pos[c] for c in ids})


def load_lvis_gt(gt: str | os.PathLike[str] | Mapping[str, Any], iou_types: Sequence[str]) -> LVISGroundTruth:
    dataset, path = load_gt(gt)
    cats = sorted(dataset["categories"], key=lambda c: c["id"])
    cat_ids = np.array([c["id"] for c in cats], dtype=np.int64)
    cat_pos = {int(c): k for k, c in enumerate(cat_ids)}
    for i, cat in enumerate(dataset["categories"]):
        if cat.get("frequency") not in FREQUENCY_KEYS:
            raise OVDError(
                f"expected one of {tuple(FREQUENCY_KEYS)}, got {cat.get('frequency')!r}",
                path=path,
                field=f"categories[{i}].frequency",
            )
    images = sorted(dataset["images"], key=lambda im: im["id"])
    hw = []
    for img in images:
        where = f"images[id={img['id']}]"
        for key in ("height", "width"):
            if not is_int(img.get(key)) or img[key] <= 0:
                raise OVDError(f"expected a positive integer, got {img.get(key)!r}", path=path, field=f"{where}.{key}")
        hw.append((img["height"], img["width"]))
    neg = [_id_lists(img, "neg_category_ids", f"images[id={img['id']}]", cat_pos, path) for img in images]
    nel = [_id_lists(img, "not_exhaustive_category_ids", f"images[id={img['id']}]", cat_pos, path) for img in images]
    image_ids = np.array([img["id"] for img in images], dtype=np.int64)

    anns = dataset["annotations"]
    if "segm" in iou_types:
        for i, ann in enumerate(anns):
            if not ann.get("segmentation"):
                raise OVDError("missing 'segmentation' (needed for segm)", path=path, field=f"annotations[{i}]")
    area = np.array([a["area"] for a in anns], dtype=np.float64).reshape(-1)
    keep = np.flatnonzero(area > 0)  # (G,) lvis-api only reads instances with 0 < area
    ann_image = np.searchsorted(image_ids, np.array([anns[i]["image_id"] for i in keep], dtype=np.int64))
    ann_cat = np.searchsorted(cat_ids, np.array([anns[i]["category_id"] for i in keep], dtype=np.int64))
    return LVISGroundTruth(
        dataset=dataset,
        image_ids=image_ids,
        image_hw=np.array(hw, dtype=np.int64).reshape(-1, 2),
        cat_ids=cat_ids,
        frequency=[c["frequency"] for c in cats],
        names=[c["name"] for c in cats],
        neg=neg,
        not_exhaustive=nel,
        ann_index=keep.astype(np.int64),
        ann_image=ann_image.astype(np.int64),
        ann_cat=ann_cat.astype(np.int64),
    )
