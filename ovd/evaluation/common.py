"""Helpers shared by the evaluators (:mod:`ovd.evaluation.coco_ovd`, :mod:`ovd.evaluation.lvis_eval`).

Input checks that name the file and field of a bad value, the COCO ground-truth loader, COCOeval's
mean over valid precision entries, quiet evaluator runs and the report writer (``metrics.json`` beside
the per-class table). Shape legend of a precision array: ``T`` IoU thresholds, ``R`` recall
thresholds, ``K`` categories, ``A`` area ranges, ``M`` max-detection settings.
"""

from __future__ import annotations

import contextlib
import io
import math
import numbers
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ovd.errors import OVDError
from ovd.utils.io import atomic_open, read_json, write_json

PERCENT = 100.0  # the reference README reports AP in percent
IOU_50 = 0.5  # COCO's loose IoU threshold (AP50)
IOU_75 = 0.75  # COCO's strict IoU threshold (AP75)
# COCOeval's area-range labels (pycocotools ``Params.setDetParams``), reported as AP / APs / APm / APl.
AREA_KEYS = {"all": "AP", "small": "APs", "medium": "APm", "large": "APl"}

Precision = np.ndarray  # float[T, R, K, A, M], -1 where a category has no ground truth
IOU_TYPES = ("bbox", "segm")  # box or mask IoU (segm needs a ``segmentation`` in every GT and detection)


def is_int(x: Any) -> bool:
    # The exact-type test is a fast path: ABC isinstance checks dominate on 10^5 detections.
    return type(x) is int or (isinstance(x, numbers.Integral) and not isinstance(x, bool))


def is_real(x: Any) -> bool:
    if type(x) is float or type(x) is int:
        return math.isfinite(x)
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def check_box(value: Any, *, field: str, path: str | None) -> list[float]:
    """Check an ``[x, y, w, h]`` box and return it as plain floats."""
    if type(value) is not list and (isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__len__")):
        raise OVDError("bbox must be a list [x, y, w, h]", path=path, field=field)
    if len(value) != 4:
        raise OVDError(f"bbox must have 4 numbers [x, y, w, h], got {len(value)}", path=path, field=field)
    for v in value:
        if not is_real(v):
            raise OVDError(f"bbox must hold 4 finite numbers, got {list(value)!r}", path=path, field=field)
    box = [float(v) for v in value]
    if box[2] < 0 or box[3] < 0:
        raise OVDError(f"bbox width and height must be >= 0, got {box}", path=path, field=field)
    return box


def require(record: Any, key: str, *, field: str, path: str | None) -> Any:
    if type(record) is not dict and not isinstance(record, Mapping):
        raise OVDError(f"expected an object, got {type(record).__name__}", path=path, field=field)
    if key not in record:
        raise OVDError(f"missing key {key!r}", path=path, field=f"{field}.{key}")
    return record[key]


def load_gt(gt: str | os.PathLike[str] | Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Read (if needed) and normalise a COCO GT dict; the caller's dict is never modified.

    Annotations are copied, renumbered ``1..N`` (both evaluators index them by id), and get the
    ``area`` (box area) and ``iscrowd`` (0) fields the evaluators need when those are missing.
    """
    path = None if isinstance(gt, Mapping) else str(gt)
    raw = gt if isinstance(gt, Mapping) else read_json(gt)
    if not isinstance(raw, Mapping):
        raise OVDError(f"a COCO annotation file must hold an object, got {type(raw).__name__}", path=path)
    for key in ("images", "annotations", "categories"):
        if not isinstance(raw.get(key), list):
            raise OVDError("missing or not a list", path=path, field=key)
    if not raw["images"]:
        raise OVDError("no images to evaluate on", path=path, field="images")
    if not raw["categories"]:
        raise OVDError("no categories to evaluate", path=path, field="categories")

    images, image_ids = [], set()
    for i, img in enumerate(raw["images"]):
        img_id = require(img, "id", field=f"images[{i}]", path=path)
        if not is_int(img_id) or img_id in image_ids:
            raise OVDError(f"image id must be a unique integer, got {img_id!r}", path=path, field=f"images[{i}].id")
        image_ids.add(int(img_id))
        images.append({**img, "id": int(img_id)})

    categories, cat_ids = [], set()
    for i, cat in enumerate(raw["categories"]):
        cat_id = require(cat, "id", field=f"categories[{i}]", path=path)
        if not is_int(cat_id) or cat_id in cat_ids:
            raise OVDError(
                f"category id must be a unique integer, got {cat_id!r}",
                path=path,
                field=f"categories[{i}].id",
            )
        cat_ids.add(int(cat_id))
        categories.append({**cat, "id": int(cat_id), "name": str(cat.get("name", cat_id))})

    annotations = []
    for i, ann in enumerate(raw["annotations"]):
        where = f"annotations[{i}]"
        img_id = require(ann, "image_id", field=where, path=path)
        if not is_int(img_id) or img_id not in image_ids:
            raise OVDError(f"image id {img_id!r} is not in 'images'", path=path, field=f"{where}.image_id")
        cat_id = require(ann, "category_id", field=where, path=path)
        if not is_int(cat_id) or cat_id not in cat_ids:
            raise OVDError(f"category id {cat_id!r} is not in 'categories'", path=path, field=f"{where}.category_id")
        box = check_box(require(ann, "bbox", field=where, path=path), field=f"{where}.bbox", path=path)
        annotations.append(
            {
                **ann,
                "id": i + 1,
                "image_id": int(img_id),
                "category_id": int(cat_id),
                "bbox": box,
                "area": float(ann.get("area", box[2] * box[3])),
                "iscrowd": int(ann.get("iscrowd", 0)),
            }
        )
    dataset = {"images": images, "annotations": annotations, "categories": categories}
    return dataset, path


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Swallow the evaluators' progress prints (pycocotools prints unconditionally)."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def silent(*args: Any, **kwargs: Any) -> None:
    """A ``print_function`` for faster-coco-eval that prints nothing."""


def mean_valid(values: np.ndarray) -> float | None:
    """Mean of the entries > -1 in percent, as COCOeval's ``_summarize``; None when there are none."""
    valid = values[values > -1]
    return float(np.mean(valid)) * PERCENT if valid.size else None


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def write_metrics_report(metrics: Mapping[str, Any], table: str, output_dir: str | os.PathLike[str]) -> Path:
    """Write ``metrics.json`` and ``per_class.md`` (``table``) atomically into ``output_dir`` (created if missing).

    Returns:
        The path of ``metrics.json``.
    """
    output_dir = Path(output_dir)
    metrics_path = output_dir / "metrics.json"
    write_json(metrics_path, dict(metrics))
    with atomic_open(output_dir / "per_class.md", "w") as f:
        f.write(table)
    return metrics_path
