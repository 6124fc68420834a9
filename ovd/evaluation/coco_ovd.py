"""OV-COCO box evaluation: COCO AP plus AP50 over the base and the novel classes.

The metric follows the reference ``CustomCOCOEvaluator`` (METHOD §6.4, §10 item 15):

- the standard COCO box evaluation runs over every ground-truth category;
- a category with no ground truth gets precision -1 and is excluded from every mean;
- per-class ``AP50_k`` = mean of ``precision[T=0.5, :, k, area=all, maxDet=max_dets]``;
- ``AP50_novel`` / ``AP50_base`` = mean of ``AP50_k`` over the novel / base classes that have GT;
- ``AP50_all`` = the COCOeval AP50 over all classes with GT (the README's "AP" on OV-COCO).

Two interchangeable backends compute the COCO precision array: ``"faster"`` (faster-coco-eval, C++)
and ``"pycocotools"`` (the reference). They agree to ~1e-13 percent points (pycocotools divides by
``tp + fp + eps``, faster-coco-eval by ``tp + fp``); the first is several times faster.
All numbers are in percent (0-100). Shape legend of the precision array: ``T`` IoU thresholds,
``R`` recall thresholds, ``K`` categories, ``A`` area ranges, ``M`` max-detection settings.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ovd.errors import OVDError
from ovd.evaluation.common import (
    AREA_KEYS,
    IOU_50,
    IOU_75,
    IOU_TYPES,
    Precision,
    check_box,
    fmt,
    is_int,
    is_real,
    load_gt,
    mean_valid,
    quiet,
    require,
    silent,
    write_metrics_report,
)
from ovd.utils.io import write_json

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------


def _segmentation(value: Any, *, field: str) -> dict[str, Any]:
    """Check a result's compressed-RLE ``segmentation`` (``{"size": [h, w], "counts": str}``)."""
    if not isinstance(value, Mapping) or not isinstance(value.get("counts"), (str, bytes)):
        raise OVDError("segmentation must be a compressed RLE {'size': [h, w], 'counts': str}", field=field)
    size = value.get("size")
    if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(is_int(v) and v > 0 for v in size):
        raise OVDError(f"segmentation size must be [h, w], got {size!r}", field=f"{field}.size")
    counts = value["counts"]
    return {"size": [int(v) for v in size], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def _normalize_detection(
    i: int, det: Any, image_ids: set[int] | None = None, cat_ids: set[int] | None = None
) -> dict[str, Any]:
    """Check one COCO result record (against the GT ids, if given); return it with plain values.

    A ``segmentation`` (compressed RLE, from a Mask R-CNN) is checked and kept when present."""
    where = f"detections[{i}]"
    image_id = require(det, "image_id", field=where, path=None)
    category_id = require(det, "category_id", field=where, path=None)
    score = require(det, "score", field=where, path=None)
    for key, value, known in (("image_id", image_id, image_ids), ("category_id", category_id, cat_ids)):
        if not is_int(value):
            raise OVDError(f"must be an integer, got {value!r}", field=f"{where}.{key}")
        if known is not None and value not in known:
            what = "an image" if key == "image_id" else "a category"
            raise OVDError(f"id {value} is not {what} of the ground truth", field=f"{where}.{key}")
    if not is_real(score):
        raise OVDError(f"score must be a finite number, got {score!r}", field=f"{where}.score")
    box = check_box(require(det, "bbox", field=where, path=None), field=f"{where}.bbox", path=None)
    out = {"image_id": int(image_id), "category_id": int(category_id), "bbox": box, "score": float(score)}
    if "segmentation" in det:
        out["segmentation"] = _segmentation(det["segmentation"], field=f"{where}.segmentation")
    return out


def _normalize_detections(
    detections: Sequence[Mapping[str, Any]], dataset: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Check COCO results (and, given the GT ``dataset``, that their ids exist there)."""
    if isinstance(detections, (str, bytes, Mapping)) or not isinstance(detections, Sequence):
        raise OVDError(f"expected a list of COCO result dicts, got {type(detections).__name__}", field="detections")
    image_ids = cat_ids = None
    if dataset is not None:
        image_ids = {img["id"] for img in dataset["images"]}
        cat_ids = {cat["id"] for cat in dataset["categories"]}
    return [_normalize_detection(i, det, image_ids, cat_ids) for i, det in enumerate(detections)]


def _check_split(ids: Sequence[int], name: str, cat_ids: set[int], path: str | None) -> set[int]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise OVDError(f"expected a list of category ids, got {type(ids).__name__}", field=name)
    for i, cat_id in enumerate(ids):
        if not is_int(cat_id) or cat_id not in cat_ids:
            raise OVDError(
                f"category id {cat_id!r} is not a category of the ground truth",
                path=path,
                field=f"{name}[{i}]",
            )
    return {int(c) for c in ids}


# ----------------------------------------------------------------------------------------------
# Backends: (normalised GT dict, normalised detections, max_dets) -> COCOeval's eval dict + params
# ----------------------------------------------------------------------------------------------


def _run_faster(
    dataset: dict[str, Any], dets: list[dict[str, Any]], max_dets: int, iou_type: str = "bbox"
) -> tuple[Precision, Any]:
    from faster_coco_eval import COCO, COCOeval_faster

    with quiet():
        coco_gt = COCO(dataset, print_function=silent)
        coco_dt = coco_gt.loadRes(dets)  # handles an empty list
        evaluator = COCOeval_faster(coco_gt, coco_dt, iouType=iou_type, print_function=silent)
        evaluator.params.maxDets = [max_dets]
        evaluator.evaluate()
        evaluator.accumulate()
    return np.asarray(evaluator.eval["precision"]), evaluator.params


def _run_pycocotools(
    dataset: dict[str, Any], dets: list[dict[str, Any]], max_dets: int, iou_type: str = "bbox"
) -> tuple[Precision, Any]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with quiet():
        coco_gt = COCO()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        if dets:
            coco_dt = coco_gt.loadRes(dets)
        else:  # pycocotools' loadRes indexes anns[0]: build the empty result set by hand
            coco_dt = COCO()
            coco_dt.dataset = {
                "images": dataset["images"],
                "categories": dataset["categories"],
                "annotations": [],
            }
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        evaluator.params.maxDets = [max_dets]
        evaluator.evaluate()
        evaluator.accumulate()
    return np.asarray(evaluator.eval["precision"]), evaluator.params


_BACKENDS: dict[str, Callable[[dict[str, Any], list[dict[str, Any]], int, str], tuple[Precision, Any]]] = {
    "faster": _run_faster,
    "pycocotools": _run_pycocotools,
}


# ----------------------------------------------------------------------------------------------
# Metric
# ----------------------------------------------------------------------------------------------


def _mean_or_none(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def evaluate_ovd(
    gt: str | os.PathLike[str] | Mapping[str, Any],
    detections: Sequence[Mapping[str, Any]],
    *,
    base_category_ids: Sequence[int],
    novel_category_ids: Sequence[int],
    backend: Literal["faster", "pycocotools"] = "faster",
    max_dets: int = 100,
    iou_type: Literal["bbox", "segm"] = "bbox",
) -> dict[str, Any]:
    """Evaluate COCO-format box (or mask) detections with the OV-COCO base / novel split.

    Args:
        gt: a COCO-format ground-truth JSON path, or the loaded dict (left unmodified).
        detections: COCO results, one ``{image_id, category_id, bbox: [x, y, w, h], score}`` per box
            (absolute pixels). Every image id and category id must exist in ``gt``.
        base_category_ids: dataset category ids (not contiguous ids) of the base classes.
        novel_category_ids: dataset category ids of the novel classes; disjoint from the base ids.
            GT categories in neither list are reported with split ``"other"``.
        backend: ``"faster"`` (faster-coco-eval) or ``"pycocotools"`` (the reference); same numbers.
        max_dets: detections kept per image (highest scores first), COCO's ``maxDets``.
        iou_type: ``"bbox"`` or ``"segm"`` (mask IoU: every detection and GT annotation needs a
            ``segmentation``; area ranges use the GT ``area``).

    Returns:
        A JSON-serialisable dict, numbers in percent (0-100), ``None`` where undefined (no GT):
        ``AP50_novel``, ``AP50_base`` (mean per-class AP50 over the split's classes with GT),
        ``AP50_all`` (COCOeval AP50 over every class with GT), ``AP`` (AP@[.5:.95]), ``AP50``
        (= ``AP50_all``), ``AP75``, ``APs``, ``APm``, ``APl``, ``num_images``, ``num_detections``,
        ``num_classes_with_gt`` (``{"base", "novel", "all"}``), ``backend``, ``max_dets`` and
        ``per_class``: one ``{category_id, name, split, AP50, AP, num_gt}`` per GT category in id
        order (``num_gt`` counts non-crowd boxes).

    Raises:
        OVDError: a malformed GT file or detection, a detection on an unknown image or category,
            a split id that is not a GT category, an unknown backend or a bad ``max_dets``.
    """
    if backend not in _BACKENDS:
        raise OVDError(f"unknown backend {backend!r}; valid: {sorted(_BACKENDS)}", field="backend")
    if not is_int(max_dets) or max_dets < 1:
        raise OVDError(f"must be a positive integer, got {max_dets!r}", field="max_dets")
    if iou_type not in IOU_TYPES:
        raise OVDError(f"unknown iou_type {iou_type!r}; valid: {list(IOU_TYPES)}", field="iou_type")
    dataset, path = load_gt(gt)
    cat_ids = {cat["id"] for cat in dataset["categories"]}
    base = _check_split(base_category_ids, "base_category_ids", cat_ids, path)
    novel = _check_split(novel_category_ids, "novel_category_ids", cat_ids, path)
    for i, cat_id in enumerate(novel_category_ids):
        if cat_id in base:
            raise OVDError(f"category id {cat_id} is both base and novel", field=f"novel_category_ids[{i}]")
    dets = _normalize_detections(detections, dataset)
    if iou_type == "segm":
        if any("segmentation" not in d for d in dets):
            raise OVDError("iou_type 'segm' needs a segmentation in every detection", field="detections")
        if any("segmentation" not in a for a in dataset["annotations"]):
            raise OVDError("iou_type 'segm' needs a segmentation in every annotation", path=path, field="annotations")

    precision, params = _BACKENDS[backend](dataset, dets, int(max_dets), iou_type)  # (T, R, K, A, M)
    iou_thrs = np.asarray(params.iouThrs)
    t50 = int(np.flatnonzero(np.isclose(iou_thrs, IOU_50))[0])
    t75 = int(np.flatnonzero(np.isclose(iou_thrs, IOU_75))[0])
    area = {label: params.areaRngLbl.index(label) for label in AREA_KEYS}
    p_all = precision[..., area["all"], -1]  # (T, R, K) at area=all, maxDet=max_dets

    num_gt = dict.fromkeys(cat_ids, 0)
    for ann in dataset["annotations"]:
        num_gt[ann["category_id"]] += 0 if ann["iscrowd"] else 1
    names = {cat["id"]: cat["name"] for cat in dataset["categories"]}
    per_class = []
    for k, cat_id in enumerate(int(c) for c in params.catIds):
        split = "base" if cat_id in base else "novel" if cat_id in novel else "other"
        per_class.append(
            {
                "category_id": cat_id,
                "name": names[cat_id],
                "split": split,
                "AP50": mean_valid(p_all[t50, :, k]),
                "AP": mean_valid(p_all[:, :, k]),
                "num_gt": num_gt[cat_id],
            }
        )

    def split_ap50(split: str) -> float | None:
        return _mean_or_none([c["AP50"] for c in per_class if c["split"] == split])

    def with_gt(split: str | None) -> int:
        return sum(c["AP50"] is not None and (split is None or c["split"] == split) for c in per_class)

    ap50_all = mean_valid(p_all[t50])
    metrics: dict[str, Any] = {
        "AP50_novel": split_ap50("novel"),
        "AP50_base": split_ap50("base"),
        "AP50_all": ap50_all,
        **{key: mean_valid(precision[:, :, :, area[label], -1]) for label, key in AREA_KEYS.items()},
        "AP50": ap50_all,
        "AP75": mean_valid(p_all[t75]),
        "num_images": len(dataset["images"]),
        "num_detections": len(dets),
        "num_classes_with_gt": {"base": with_gt("base"), "novel": with_gt("novel"), "all": with_gt(None)},
        "backend": backend,
        "max_dets": int(max_dets),
        "iou_type": iou_type,
        "per_class": per_class,
    }
    logger.info(
        "OV-COCO (%s): AP50 novel %s, base %s, all %s; AP %s",
        backend,
        *(fmt(metrics[key]) for key in ("AP50_novel", "AP50_base", "AP50_all", "AP")),
    )
    return metrics


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------

_SUMMARY_KEYS = ("AP50_novel", "AP50_base", "AP50_all", "AP", "AP50", "AP75", "APs", "APm", "APl")
_SPLIT_ORDER = {"novel": 0, "base": 1, "other": 2}


def format_table(metrics: dict[str, Any]) -> str:
    """Render :func:`evaluate_ovd` output as markdown: the summary, then one row per class.

    Classes are grouped novel, base, other (each in category-id order); "-" marks a class without
    GT. Numbers are percent with one decimal, as in the reference README.

    Args:
        metrics: the dict returned by :func:`evaluate_ovd` (or read back from ``metrics.json``).

    Returns:
        The markdown text, ending with a newline.
    """
    n = metrics.get("num_classes_with_gt", {})
    lines = [
        f"OV-COCO box evaluation: {metrics.get('num_images', '?')} images, "
        f"{metrics.get('num_detections', '?')} detections, max {metrics.get('max_dets', '?')} per image, "
        f"backend {metrics.get('backend', '?')}; classes with GT: {n.get('novel', '?')} novel, "
        f"{n.get('base', '?')} base, {n.get('all', '?')} in all.",
        "",
        "| metric | value |",
        "|---|---:|",
        *(f"| {key} | {fmt(metrics.get(key))} |" for key in _SUMMARY_KEYS if key in metrics),
        "",
        "| category | id | split | #gt | AP50 | AP |",
        "|---|---:|---|---:|---:|---:|",
    ]
    rows = sorted(metrics.get("per_class", []), key=lambda c: (_SPLIT_ORDER.get(c["split"], 3), c["category_id"]))
    for c in rows:
        lines.append(
            f"| {c['name']} | {c['category_id']} | {c['split']} | {c['num_gt']} | {fmt(c['AP50'])} | {fmt(c['AP'])} |"
        )
    return "\n".join(lines) + "\n"


def write_report(
    metrics: dict[str, Any],
    output_dir: str | os.PathLike[str],
    *,
    detections: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Write an evaluation's outputs atomically into ``output_dir`` (created if missing).

    Files: ``metrics.json`` (the metrics dict), ``per_class.md`` (:func:`format_table`) and, when
    ``detections`` is given, ``detections.json`` (COCO results: image_id, category_id, bbox, score).

    Args:
        metrics: the dict returned by :func:`evaluate_ovd`.
        output_dir: the folder to write into.
        detections: the evaluated COCO results, to be saved alongside; validated like in
            :func:`evaluate_ovd` (malformed records raise :class:`OVDError`).

    Returns:
        The path of ``metrics.json``.
    """
    results = None if detections is None else _normalize_detections(detections)
    metrics_path = write_metrics_report(metrics, format_table(metrics), output_dir)
    if results is not None:
        write_json(Path(output_dir) / "detections.json", results, indent=None)
    return metrics_path
