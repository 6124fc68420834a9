"""Benchmark: OV-COCO evaluation with faster-coco-eval vs pycocotools on the same synthetic set.

Generates a COCO-format ground truth shaped like OV-COCO val (the 80 COCO category ids; 48 base and
17 novel classes get boxes, the 15 excluded classes get none, as in ``instances_val2017_all_2_oriorder``)
and detections (jittered GT, some with a confused class, plus random false positives on any of the
80 classes), then times :func:`ovd.evaluation.coco_ovd.evaluate_ovd` with both backends, checks the
numbers agree and prints a markdown report.

    python benchmarks/bench_eval.py --num-images 5000 --seed 0 --output benchmarks/results/eval.md
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from typing import Any

import numpy as np
from machine import emit_report, header, row, table_header  # benchmarks/ (scripts run from this folder's path)
from timing import Stopwatch

from ovd.evaluation.coco_ovd import evaluate_ovd

# COCO's 80 category ids (1..90 with gaps) and the OV-COCO split, METHOD §6.1.
COCO_IDS = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]
NOVEL_IDS = [5, 6, 17, 18, 21, 22, 28, 32, 36, 41, 47, 49, 61, 63, 76, 81, 87]
EXCLUDED_IDS = [10, 11, 13, 14, 37, 39, 40, 43, 46, 58, 64, 67, 77, 88, 89]
BASE_IDS = [c for c in COCO_IDS if c not in NOVEL_IDS and c not in EXCLUDED_IDS]

IMAGE_W, IMAGE_H = 640, 480
TOL = 1e-9  # percent points; pycocotools' eps in tp / (tp + fp + eps) makes ~1e-14 differences
KEYS = ("AP50_novel", "AP50_base", "AP50_all", "AP", "AP75", "APs", "APm", "APl")


def make_data(
    num_images: int, seed: int, gt_per_image: tuple[int, int], dets_per_image: tuple[int, int]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A synthetic GT dict and COCO results list (see the module docstring)."""
    rng = np.random.default_rng(seed)
    labelled = np.array(BASE_IDS + NOVEL_IDS)
    all_ids = np.array(COCO_IDS)
    images, anns, dets = [], [], []

    def random_boxes(n: int) -> np.ndarray:
        wh = np.exp(rng.uniform(np.log(8), np.log(400), (n, 2)))  # small, medium and large boxes
        xy = rng.uniform(0, 1, (n, 2)) * np.maximum([IMAGE_W, IMAGE_H] - wh, 1)
        return np.concatenate([xy, wh], axis=1)  # (n, 4) xywh

    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": IMAGE_W, "height": IMAGE_H, "file_name": f"{image_id:012d}.jpg"})
        n_gt = int(rng.integers(gt_per_image[0], gt_per_image[1] + 1))
        boxes, cats = random_boxes(n_gt), rng.choice(labelled, n_gt)
        for box, cat in zip(boxes, cats, strict=True):
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": int(cat),
                    "bbox": box.round(2).tolist(),
                    "area": float(box[2] * box[3]),
                    "iscrowd": 0,
                }
            )
        found = rng.random(n_gt) < 0.85
        jitter = rng.normal(0, 0.08, (n_gt, 4)) * boxes[:, [2, 3, 2, 3]]
        det_boxes = np.abs(boxes + jitter)[found]
        det_cats = np.where(rng.random(n_gt) < 0.9, cats, rng.choice(all_ids, n_gt))[found]
        det_scores = rng.beta(4, 2, n_gt)[found]
        n_fp = max(int(rng.integers(dets_per_image[0], dets_per_image[1] + 1)) - len(det_boxes), 0)
        det_boxes = np.concatenate([det_boxes, random_boxes(n_fp)])
        det_cats = np.concatenate([det_cats, rng.choice(all_ids, n_fp)])
        det_scores = np.concatenate([det_scores, rng.beta(2, 4, n_fp)])
        for box, cat, score in zip(det_boxes, det_cats, det_scores, strict=True):
            dets.append(
                {
                    "image_id": image_id,
                    "category_id": int(cat),
                    "bbox": box.round(2).tolist(),
                    "score": round(float(score), 5),
                }
            )
    categories = [{"id": c, "name": f"class_{c}"} for c in COCO_IDS]
    return {"images": images, "annotations": anns, "categories": categories}, dets


def max_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest |a - b| over the summary numbers and the per-class AP50 / AP."""
    pairs = [(a[k], b[k]) for k in KEYS]
    for ca, cb in zip(a["per_class"], b["per_class"], strict=True):
        pairs += [(ca["AP50"], cb["AP50"]), (ca["AP"], cb["AP"])]
    diff = 0.0
    for x, y in pairs:
        if (x is None) != (y is None):
            return float("inf")
        if x is not None:
            diff = max(diff, abs(x - y))
    return diff


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=5000, help="synthetic images (default 5000, ~COCO val)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the synthetic data (default 0)")
    parser.add_argument(
        "--gt-per-image",
        type=int,
        nargs=2,
        default=(1, 14),
        metavar=("MIN", "MAX"),
        help="GT boxes per image",
    )
    parser.add_argument(
        "--dets-per-image",
        type=int,
        nargs=2,
        default=(20, 50),
        metavar=("MIN", "MAX"),
        help="detections per image (jittered GT topped up with false positives)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per backend; the minimum is reported")
    parser.add_argument("--output", default=None, help="also write the markdown report to this file")
    args = parser.parse_args(argv)

    with Stopwatch() as gen:
        gt, dets = make_data(args.num_images, args.seed, tuple(args.gt_per_image), tuple(args.dets_per_image))
    split = dict(base_category_ids=BASE_IDS, novel_category_ids=NOVEL_IDS)

    times: dict[str, list[float]] = {"faster": [], "pycocotools": []}
    results: dict[str, dict[str, Any]] = {}
    for _ in range(args.repeats):
        for backend in times:  # alternate, so neither backend always runs on a warmer machine
            with Stopwatch() as w:
                results[backend] = evaluate_ovd(gt, dets, backend=backend, **split)
            times[backend].append(w.s)
    best = {b: min(t) for b, t in times.items()}
    diff = max_difference(results["faster"], results["pycocotools"])
    same = diff <= TOL

    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("numpy", "pycocotools", "faster-coco-eval"))
    ratio = best["pycocotools"] / best["faster"]
    ref = results["pycocotools"]

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    if diff == 0:
        verdict = "bitwise identical"
    elif same:
        verdict = f"identical within {TOL:g} (pycocotools divides by tp + fp + eps, faster-coco-eval by tp + fp)"
    else:
        verdict = f"**DIFFERENT** (tolerance {TOL:g})"
    details = [
        f"- Versions: {versions}.",
        f"- Data (seed {args.seed}, generated in {gen.s:.1f} s): {ref['num_images']} images, 80 categories "
        f"({len(BASE_IDS)} base, {len(NOVEL_IDS)} novel, {len(EXCLUDED_IDS)} without GT), "
        f"{len(gt['annotations'])} GT boxes, {ref['num_detections']} detections "
        f"({ref['num_detections'] / ref['num_images']:.1f} per image), max_dets {ref['max_dets']}.",
        f"- Timed: one `evaluate_ovd` call (input checks + COCO evaluation), best of {args.repeats}, "
        "both backends on the same data in the same process.",
    ]
    lines = header("OV-COCO evaluation: faster-coco-eval vs pycocotools", "\n".join(details), argv=argv, level=2)
    lines += table_header(["backend", "time (s)", "AP50_novel", "AP50_base", "AP50_all", "AP", "AP75"], "lrrrrrr")
    for backend, m in results.items():
        metrics = (fmt(m[k]) for k in ("AP50_novel", "AP50_base", "AP50_all", "AP", "AP75"))
        lines.append(row(backend, f"{best[backend]:.2f}", *metrics))
    lines += [
        "",
        f"- Speed-up: **{ratio:.1f}×** (pycocotools / faster; goal ≥ 3×: {'met' if ratio >= 3 else 'NOT met'}).",
        f"- Agreement: max |difference| over {len(KEYS)} summary numbers and per-class AP50/AP of "
        f"{len(ref['per_class'])} classes = {diff:.1e} percent points: {verdict}.",
    ]
    emit_report(lines, args.output)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
