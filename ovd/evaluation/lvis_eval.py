"""LVIS box and mask evaluation with the federated rules, through faster-coco-eval's LVIS mode.

The metric is lvis-api 0.5.3's ``LVISEval`` (METHOD §6.4), which detectron2's ``LVISEvaluator`` runs:

- at most ``max_dets`` (300) detections per image: the highest scores, ties kept in input order;
- a detection of class ``c`` on image ``i`` counts only if ``i`` has a GT instance of ``c`` or ``c`` is
  in ``i``'s ``neg_category_ids``; the others are dropped (nothing is known about ``c`` there);
- an unmatched detection of a class in ``i``'s ``not_exhaustive_category_ids`` is ignored, not a false
  positive;
- GT instances and detections of area 0 are skipped (lvis-api's ``0 < area`` filter);
- areas for small / medium / large: the GT ``area`` field (mask area in LVIS) for both IoU types; for
  detections the box ``w·h`` (bbox) or the mask area (segm), as detectron2 does by dropping the box
  of mask results;
- AP over IoU .50:.05:.95 and 101 recall points; a class without GT is excluded (precision -1);
  APr / APc / APf average the classes of each ``frequency`` group of the GT file.

faster-coco-eval (C++) runs the matching and accumulation (``COCOeval_faster(..., lvis_style=True)``).
Accumulation is per class, so classes are evaluated in chunks, each over only the images where they
occur, and the per-class precision slices are concatenated: the numbers are those of one run, while
memory and time follow the chunks instead of images × classes (one faster-coco-eval run visits and
keeps a Python object per (image, class) pair and per detection: ~24M pairs and 6M detections on
LVIS val). Detections are held in flat arrays (:class:`LVISDetections`) and become dicts one chunk at
a time. The per-image limit and the federated filter are applied here, before faster-coco-eval (its
own filter, in 1.8.0, crashes on segm when a dropped detection's image has nothing else to evaluate).

All numbers are in percent (0-100). Shape legend: ``N`` detections, ``K`` classes, ``T`` IoU
thresholds, ``R`` recall thresholds, ``A`` area ranges.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ovd.errors import OVDError
from ovd.evaluation.common import (
    AREA_KEYS,
    IOU_50,
    IOU_75,
    IOU_TYPES,
    fmt,
    is_int,
    mean_valid,
    quiet,
    silent,
    write_metrics_report,
)
from ovd.evaluation.lvis_inputs import (
    FREQUENCY_KEYS,
    LVISDetections,
    LVISGroundTruth,
    as_detections,
    load_lvis_gt,
)

logger = logging.getLogger(__name__)

MAX_DETS = 300  # LVIS's detections per image (lvis-api LVISResults max_dets; METHOD §6.4)
CHUNK_SIZE = 250_000
"""GT instances + detections per faster-coco-eval run (a class with more runs alone)."""
CHUNK_PAIRS = 20_000
"""(image, class) pairs per run, at most (each costs ~5 µs even when empty; 20k was ~25 % faster than
2M on 2,000 synthetic LVIS images, ``benchmarks/bench_lvis_eval.py``)."""


# ----------------------------------------------------------------------------------------------
# Detection selection: per-image limit and federated filter
# ----------------------------------------------------------------------------------------------


def _positions(ids: np.ndarray, known: np.ndarray, key: str) -> np.ndarray:
    """Positions of ``ids`` in the sorted ``known`` ids; an unknown id raises naming its detection."""
    pos = np.searchsorted(known, ids).clip(max=len(known) - 1)  # (N,) known is never empty
    bad = np.flatnonzero(known[pos] != ids)
    if bad.size:
        what = "an image" if key == "image_id" else "a category"
        raise OVDError(f"id {int(ids[bad[0]])} is not {what} of the ground truth", field=f"detections[{bad[0]}].{key}")
    return pos.astype(np.int64)


def _top_per_image(image_pos: np.ndarray, scores: np.ndarray, max_dets: int) -> np.ndarray:
    """Indices (ascending) of each image's ``max_dets`` highest-scoring detections; ties in input order."""
    order = np.argsort(-scores, kind="stable")  # (N,)
    order = order[np.argsort(image_pos[order], kind="stable")]  # by image, then score descending
    grouped = image_pos[order]
    starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])  # first slot of each image
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))  # (N,)
    return np.sort(order[rank < max_dets])


def _federated(gt: LVISGroundTruth, image_pos: np.ndarray, cat_pos: np.ndarray) -> np.ndarray:
    """``bool[N]``: the (image, class) of the detection has GT there or is in the image's negative list."""
    num_cats = len(gt.cat_ids)
    neg_codes = [i * num_cats + k for i, ks in enumerate(gt.neg) for k in ks]
    allowed = np.unique(np.concatenate([gt.ann_image * num_cats + gt.ann_cat, np.array(neg_codes, np.int64)]))
    return np.isin(image_pos * num_cats + cat_pos, allowed)


# ----------------------------------------------------------------------------------------------
# Chunked faster-coco-eval runs
# ----------------------------------------------------------------------------------------------


def _chunks(work: np.ndarray, class_images: list[np.ndarray], num_images: int, chunk_size: int) -> Iterator[slice]:
    """Consecutive class ranges whose work (GT + detections) and (image, class) pairs stay bounded.

    Args:
        work: ``int[K]`` GT instances + detections of each class.
        class_images: ``K`` arrays of the image positions where each class has GT or detections.
        num_images: ``I``.
        chunk_size: the work budget of one range (a class above it gets a range of its own).
    """
    seen = np.zeros(num_images, dtype=bool)  # (I,) images of the current range
    start, total, n_images = 0, 0, 0
    for k in range(len(work)):
        new = np.unique(class_images[k][~seen[class_images[k]]])
        pairs = (n_images + len(new)) * (k - start + 1)
        if k > start and (total + work[k] > chunk_size or pairs > CHUNK_PAIRS):
            yield slice(start, k)
            seen[:] = False
            start, total, n_images = k, 0, 0
            new = np.unique(class_images[k])
        seen[new] = True
        n_images += len(new)
        total += int(work[k])
    if start < len(work):
        yield slice(start, len(work))


def _evaluate_chunk(
    gt: LVISGroundTruth,
    dets: LVISDetections,
    det_index: np.ndarray,
    det_image: np.ndarray,
    ann_rows: np.ndarray,
    cats: slice,
    iou_type: str,
    max_dets: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    """faster-coco-eval over the classes ``cats`` (``Kc`` of them).

    Returns:
        Precision ``(T, R, Kc, A)``, recall ``(T, Kc, A)`` and the number of detections evaluated.
    """
    from faster_coco_eval import COCO, COCOeval_faster
    from faster_coco_eval.core import mask as mask_utils

    anns = gt.dataset["annotations"]
    cat_ids = [int(c) for c in gt.cat_ids[cats]]
    cat_set = set(range(cats.start, cats.stop))
    image_pos = np.unique(np.concatenate([gt.ann_image[ann_rows], det_image]))
    images = []
    for i in image_pos:
        h, w = gt.image_hw[i]
        images.append(
            {
                "id": int(gt.image_ids[i]),
                "height": int(h),
                "width": int(w),
                "neg_category_ids": [int(gt.cat_ids[k]) for k in gt.neg[i] if k in cat_set],
                "not_exhaustive_category_ids": [int(gt.cat_ids[k]) for k in gt.not_exhaustive[i] if k in cat_set],
            }
        )
    gt_anns = []
    for j, row in enumerate(ann_rows):
        a = anns[gt.ann_index[row]]
        g = {"id": j + 1, "image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"]}
        g.update(area=a["area"], iscrowd=0)
        if iou_type == "segm":
            g["segmentation"] = a["segmentation"]
        gt_anns.append(g)

    ids = dets.image_ids[det_index].tolist()
    cids = dets.category_ids[det_index].tolist()
    scores = dets.scores[det_index].tolist()
    boxes = dets.boxes[det_index]
    if iou_type == "segm":
        sizes = dets.mask_sizes[det_index].tolist()
        rles = [{"size": s, "counts": dets.masks[i]} for s, i in zip(sizes, det_index.tolist(), strict=True)]
        area = np.asarray(mask_utils.area(rles), dtype=np.float64) if rles else np.zeros(0)  # (Nc,)
        dt_anns = [  # the box rides along unused: segm IoU and areas come from the mask
            {"image_id": i, "category_id": c, "score": s, "segmentation": r, "area": float(a), "bbox": b}
            for i, c, s, r, a, b in zip(ids, cids, scores, rles, area, boxes.tolist(), strict=True)
            if a > 0  # lvis-api's 0 < area filter
        ]
    else:
        area = boxes[:, 2] * boxes[:, 3]
        dt_anns = [
            {"image_id": i, "category_id": c, "score": s, "bbox": b, "area": float(a)}
            for i, c, s, b, a in zip(ids, cids, scores, boxes.tolist(), area, strict=True)
            if a > 0
        ]
    for j, d in enumerate(dt_anns):
        d["id"] = j + 1
        d["iscrowd"] = 0

    categories = [
        {"id": c, "name": gt.names[k], "frequency": gt.frequency[k]}
        for k, c in zip(range(cats.start, cats.stop), cat_ids, strict=True)
    ]
    with quiet():
        coco_gt = COCO({"images": images, "annotations": gt_anns, "categories": categories}, print_function=silent)
        coco_dt = COCO(print_function=silent)
        coco_dt.dataset = {"images": images, "annotations": dt_anns, "categories": categories}
        coco_dt.createIndex()
        evaluator = COCOeval_faster(coco_gt, coco_dt, iouType=iou_type, lvis_style=True, print_function=silent)
        evaluator.params.imgIds = [im["id"] for im in images]
        evaluator.params.catIds = cat_ids
        evaluator.params.maxDets = [max_dets]
        evaluator.evaluate()
    precision = np.asarray(evaluator.eval["precision"])[..., -1]  # (T, R, Kc, A)
    recall = np.asarray(evaluator.eval["recall"])[..., -1]  # (T, Kc, A)
    return precision, recall, len(dt_anns)


# ----------------------------------------------------------------------------------------------
# Metric
# ----------------------------------------------------------------------------------------------


def _eval_params() -> tuple[np.ndarray, int, list[str]]:
    """IoU thresholds ``(T,)``, the number of recall thresholds ``R`` and the ``A`` area-range labels.

    faster-coco-eval's defaults, which are lvis-api's: IoU .50:.05:.95, 101 recall points, areas
    all / small / medium / large split at 32² and 96².
    """
    from faster_coco_eval.core.cocoeval import Params

    p = Params(iouType="bbox")
    return np.asarray(p.iouThrs), len(p.recThrs), list(p.areaRngLbl)


def evaluate_lvis(
    gt: str | os.PathLike[str] | Mapping[str, Any],
    detections: LVISDetections | Sequence[Mapping[str, Any]] | str | os.PathLike[str],
    iou_types: Sequence[str] = IOU_TYPES,
    *,
    max_dets: int = MAX_DETS,
    chunk_size: int = CHUNK_SIZE,
) -> dict[str, Any]:
    """Evaluate detections on an LVIS-format ground truth with the federated rules.

    Args:
        gt: an LVIS-format JSON path or the loaded dict (left unmodified): ``images`` with ``height``,
            ``width``, ``neg_category_ids`` and ``not_exhaustive_category_ids`` (missing lists count as
            empty), ``annotations`` with ``bbox``, ``area`` (and ``segmentation`` for segm), and
            ``categories`` with ``frequency`` in ``r`` / ``c`` / ``f``.
        detections: :class:`LVISDetections`, COCO results (``{image_id, category_id, bbox, score,
            segmentation?}``, masks as compressed RLE of the full image), or a JSON file of them. Every
            image id and category id must exist in ``gt``.
        iou_types: any of ``"bbox"`` and ``"segm"`` (segm needs masks).
        max_dets: detections kept per image, highest scores first (LVIS: 300).
        chunk_size: GT instances + detections per faster-coco-eval run; bounds memory, not the result.

    Returns:
        A JSON-serialisable dict, numbers in percent, None where undefined: per IoU type
        (``metrics["bbox"]``, ``metrics["segm"]``) ``AP``, ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl``,
        ``APr``, ``APc``, ``APf``, ``AR@{max_dets}``, ``ARs@…``, ``ARm@…``, ``ARl@…`` and
        ``num_detections`` (those matched against GT: after the per-image limit, the federated and
        zero-area filters, in classes with GT); plus
        ``num_images``, ``num_detections`` (given), ``max_dets``, ``iou_types``,
        ``num_classes_with_gt`` (``{"r", "c", "f", "all"}``) and ``per_class``: one
        ``{category_id, name, frequency, num_gt, AP_bbox?, AP_segm?}`` per category in id order.

    Raises:
        OVDError: a malformed GT or detection, an id unknown to the GT, a mask whose size is not its
            image's, segm without masks, or bad arguments.
    """
    iou_types = tuple(iou_types)
    if not iou_types or any(t not in IOU_TYPES for t in iou_types) or len(set(iou_types)) != len(iou_types):
        raise OVDError(f"expected distinct values from {IOU_TYPES}, got {iou_types!r}", field="iou_types")
    for name, value in (("max_dets", max_dets), ("chunk_size", chunk_size)):
        if not is_int(value) or value < 1:
            raise OVDError(f"must be a positive integer, got {value!r}", field=name)
    gt_index = load_lvis_gt(gt, iou_types)
    dets = as_detections(detections)
    image_pos = _positions(dets.image_ids, gt_index.image_ids, "image_id")  # (N,)
    cat_pos = _positions(dets.category_ids, gt_index.cat_ids, "category_id")  # (N,)
    if "segm" in iou_types:
        if dets.masks is None:
            raise OVDError("segm evaluation needs a 'segmentation' in every detection", field="detections")
        bad = np.flatnonzero((dets.mask_sizes != gt_index.image_hw[image_pos]).any(axis=1))
        if bad.size:
            i = int(bad[0])
            raise OVDError(
                f"mask size {dets.mask_sizes[i].tolist()} is not the image's (height, width) "
                f"{gt_index.image_hw[image_pos[i]].tolist()}",
                field=f"detections[{i}].segmentation.size",
            )

    kept = _top_per_image(image_pos, dets.scores, max_dets)  # (N',) lvis-api LVISResults' limit
    kept = kept[_federated(gt_index, image_pos[kept], cat_pos[kept])]
    num_cats = len(gt_index.cat_ids)
    det_order = kept[np.argsort(cat_pos[kept], kind="stable")]  # by class, input order inside
    det_bounds = np.searchsorted(cat_pos[det_order], np.arange(num_cats + 1))  # (K+1,)
    ann_order = np.argsort(gt_index.ann_cat, kind="stable")
    ann_bounds = np.searchsorted(gt_index.ann_cat[ann_order], np.arange(num_cats + 1))  # (K+1,)
    work = np.diff(det_bounds) + np.diff(ann_bounds)  # (K,)
    det_image_sorted = image_pos[det_order]
    ann_image_sorted = gt_index.ann_image[ann_order]
    class_images = [
        np.concatenate(
            [ann_image_sorted[ann_bounds[k] : ann_bounds[k + 1]], det_image_sorted[det_bounds[k] : det_bounds[k + 1]]]
        )
        for k in range(num_cats)
    ]

    iou_thrs, num_recalls, area_labels = _eval_params()
    metrics: dict[str, Any] = {
        "num_images": len(gt_index.image_ids),
        "num_detections": len(dets),
        "max_dets": int(max_dets),
        "iou_types": list(iou_types),
    }
    per_class_ap: dict[str, list[float | None]] = {}
    num_gt = np.bincount(gt_index.ann_cat, minlength=num_cats)  # (K,)
    for iou_type in iou_types:
        precision = -np.ones((len(iou_thrs), num_recalls, num_cats, len(area_labels)))  # (T, R, K, A)
        recall = -np.ones((len(iou_thrs), num_cats, len(area_labels)))  # (T, K, A)
        evaluated = 0
        for cats in _chunks(work, class_images, len(gt_index.image_ids), chunk_size):
            ann_rows = ann_order[ann_bounds[cats.start] : ann_bounds[cats.stop]]
            if not len(ann_rows):
                continue  # no GT: every class stays at -1 whatever the detections
            rows = det_order[det_bounds[cats.start] : det_bounds[cats.stop]]
            rows = rows[num_gt[cat_pos[rows]] > 0]  # detections of classes without GT change nothing
            if iou_type == "bbox":
                rows = rows[dets.boxes[rows, 2] * dets.boxes[rows, 3] > 0]
            p, r, n = _evaluate_chunk(gt_index, dets, rows, image_pos[rows], ann_rows, cats, iou_type, max_dets)
            precision[:, :, cats], recall[:, cats] = p, r
            evaluated += n
        metrics[iou_type] = _summarize(precision, recall, gt_index.frequency, iou_thrs, area_labels, max_dets)
        metrics[iou_type]["num_detections"] = evaluated
        all_areas = area_labels.index("all")
        per_class_ap[iou_type] = [mean_valid(precision[:, :, k, all_areas]) for k in range(num_cats)]
        logger.info(
            "LVIS %s: AP %s, APr %s, APc %s, APf %s",
            iou_type,
            *(fmt(metrics[iou_type][key]) for key in ("AP", "APr", "APc", "APf")),
        )
    has_gt = num_gt > 0
    metrics["num_classes_with_gt"] = {
        **{
            f: int(sum(h and fr == f for h, fr in zip(has_gt, gt_index.frequency, strict=True))) for f in FREQUENCY_KEYS
        },
        "all": int(has_gt.sum()),
    }
    metrics["per_class"] = [
        {
            "category_id": int(gt_index.cat_ids[k]),
            "name": gt_index.names[k],
            "frequency": gt_index.frequency[k],
            "num_gt": int(num_gt[k]),
            **{f"AP_{t}": per_class_ap[t][k] for t in iou_types},
        }
        for k in range(num_cats)
    ]
    return metrics


def _summarize(
    precision: np.ndarray,
    recall: np.ndarray,
    frequency: Sequence[str],
    iou_thrs: np.ndarray,
    area_labels: Sequence[str],
    max_dets: int,
) -> dict[str, Any]:
    """lvis-api's ``summarize`` on precision ``(T, R, K, A)`` and recall ``(T, K, A)``, in percent."""
    t50 = int(np.flatnonzero(np.isclose(iou_thrs, IOU_50))[0])
    t75 = int(np.flatnonzero(np.isclose(iou_thrs, IOU_75))[0])
    area = {label: area_labels.index(label) for label in AREA_KEYS}
    out: dict[str, Any] = {
        "AP": mean_valid(precision[..., area["all"]]),
        "AP50": mean_valid(precision[t50, :, :, area["all"]]),
        "AP75": mean_valid(precision[t75, :, :, area["all"]]),
    }
    for label, key in AREA_KEYS.items():
        if label != "all":
            out[key] = mean_valid(precision[..., area[label]])
    groups = np.asarray(frequency)
    for f, key in FREQUENCY_KEYS.items():
        out[key] = mean_valid(precision[:, :, groups == f, area["all"]])
    out[f"AR@{max_dets}"] = mean_valid(recall[:, :, area["all"]])
    for label in ("small", "medium", "large"):
        out[f"AR{label[0]}@{max_dets}"] = mean_valid(recall[:, :, area[label]])
    return out


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------

_SUMMARY_KEYS = ("APr", "APc", "APf", "AP", "AP50", "AP75", "APs", "APm", "APl")
_FREQUENCY_ORDER = {"r": 0, "c": 1, "f": 2}


def format_lvis_table(metrics: Mapping[str, Any]) -> str:
    """Markdown of :func:`evaluate_lvis` output: the summary per IoU type, then one row per class.

    Classes are grouped rare, common, frequent (each in id order); "-" marks a class without GT.
    """
    types = [t for t in metrics.get("iou_types", IOU_TYPES) if t in metrics]
    n = metrics.get("num_classes_with_gt", {})
    lines = [
        f"LVIS evaluation: {metrics.get('num_images', '?')} images, {metrics.get('num_detections', '?')} detections "
        f"(max {metrics.get('max_dets', '?')} per image); classes with GT: {n.get('r', '?')} rare, "
        f"{n.get('c', '?')} common, {n.get('f', '?')} frequent, {n.get('all', '?')} in all.",
        "",
        "| metric | " + " | ".join(types) + " |",
        "|---|" + "---:|" * len(types),
    ]
    for key in _SUMMARY_KEYS:
        lines.append(f"| {key} | " + " | ".join(fmt(metrics[t].get(key)) for t in types) + " |")
    lines += ["", "| category | id | frequency | #gt | " + " | ".join(f"AP {t}" for t in types) + " |"]
    lines.append("|---|---:|---|---:|" + "---:|" * len(types))
    rows = sorted(
        metrics.get("per_class", []), key=lambda c: (_FREQUENCY_ORDER.get(c["frequency"], 3), c["category_id"])
    )
    for c in rows:
        aps = " | ".join(fmt(c.get(f"AP_{t}")) for t in types)
        lines.append(f"| {c['name']} | {c['category_id']} | {c['frequency']} | {c['num_gt']} | {aps} |")
    return "\n".join(lines) + "\n"


def write_lvis_report(metrics: Mapping[str, Any], output_dir: str | os.PathLike[str]) -> Path:
    """Write ``metrics.json`` and ``per_class.md`` (:func:`format_lvis_table`) atomically into ``output_dir``.

    Returns:
        The path of ``metrics.json``.
    """
    return write_metrics_report(metrics, format_lvis_table(metrics), output_dir)
