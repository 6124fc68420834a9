"""Benchmark: LVIS evaluation (boxes and masks) with ovd's evaluator vs lvis-api, time and peak memory.

Generates LVIS-val-shaped synthetic data (seeded): 1203 classes with LVIS v1's frequency groups
(337 rare, 461 common, 405 frequent), 640×480 images with ~12 GT instances over a few positive
classes, negative and not-exhaustive category lists, and 300 detections per image (jittered GT, some
with a wrong class, the rest false positives, about a third of them on classes the federated rule
evaluates). Masks are small cut-corner pentagons rasterised to RLE. Each evaluator runs in its own
subprocess that reads the files, so its wall time and peak memory (resident + swapped, input
included) are measured alone; the numbers of both must agree to ``TOL``. lvis-api (np.float patched, imported
without its visualiser) keeps Python objects per (image, class) pair, so it only runs on the sizes
given to ``--api-sizes``.

    python benchmarks/bench_lvis_eval.py --sizes 1000 2000 20000 --api-sizes 1000 2000 --seed 0 \
        --output benchmarks/results/lvis_eval.md
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from machine import emit_report, header, row, table_header  # benchmarks/ (scripts run from this folder's path)
from timing import Stopwatch

from ovd.utils.io import write_json

IMAGE_W, IMAGE_H = 640, 480
FREQUENCY_COUNTS = {"r": 337, "c": 461, "f": 405}  # LVIS v1
CLASS_WEIGHT = {"r": 0.5, "c": 3.0, "f": 20.0}  # relative chance of a class appearing in an image
DETS_PER_IMAGE = 300
TOL = 1e-9  # percent points
KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
SEGM = ("AP", "APr", "APc", "APf")  # the mask columns of the table


# ----------------------------------------------------------------------------------------------
# Synthetic data
# ----------------------------------------------------------------------------------------------


def _boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    """``(n, 4)`` xywh boxes of log-uniform size 6..400 px inside the image."""
    wh = np.exp(rng.uniform(np.log(6), np.log(400), (n, 2)))
    wh = np.minimum(wh, [IMAGE_W - 1, IMAGE_H - 1])
    xy = rng.uniform(0, 1, (n, 2)) * ([IMAGE_W, IMAGE_H] - wh)
    return np.concatenate([xy, wh], axis=1)


def _masks(boxes: np.ndarray, cuts: np.ndarray) -> list[dict[str, Any]]:
    """Compressed RLEs of pentagons: each box without a ``cut``-fraction top-right corner."""
    from faster_coco_eval.core import mask as mask_utils  # pycocotools 2.0.11: area() of >= 256 RLEs fails on NumPy 2

    x, y, w, h = boxes.T
    cw, ch = w * cuts, h * cuts
    polys = np.stack([x, y, x + w - cw, y, x + w, y + ch, x + w, y + h, x, y + h], axis=1)  # (n, 10)
    return mask_utils.frPyObjects(polys.tolist(), IMAGE_H, IMAGE_W) if len(polys) else []


def generate(num_images: int, seed: int, folder: Path, with_json: bool) -> dict[str, int]:
    """Write ``gt.json`` and ``dets.npz`` (+ lvis-api's ``dets_bbox.json`` / ``dets_segm.json``)."""
    from faster_coco_eval.core import mask as mask_utils  # pycocotools 2.0.11: area() of >= 256 RLEs fails on NumPy 2

    rng = np.random.default_rng(seed)
    freqs = np.array([f for f, n in FREQUENCY_COUNTS.items() for _ in range(n)])
    rng.shuffle(freqs)
    num_cats = len(freqs)
    weight = np.array([CLASS_WEIGHT[f] for f in freqs])
    weight /= weight.sum()
    categories = [{"id": k + 1, "name": f"class_{k + 1}", "frequency": str(f)} for k, f in enumerate(freqs)]

    images, anns = [], []
    det_parts: dict[str, list[np.ndarray]] = {k: [] for k in ("image", "cat", "score", "box", "cut")}
    for image_id in range(1, num_images + 1):
        pos = rng.choice(num_cats, 1 + min(rng.poisson(2.5), 9), replace=False, p=weight) + 1
        rest = np.setdiff1d(np.arange(1, num_cats + 1), pos)
        neg = rng.choice(rest, 1 + min(rng.poisson(7), 30), replace=False)
        images.append(
            {
                "id": image_id,
                "width": IMAGE_W,
                "height": IMAGE_H,
                "neg_category_ids": sorted(int(c) for c in neg),
                "not_exhaustive_category_ids": sorted(int(c) for c in pos if rng.random() < 0.15),
            }
        )
        gt_cats = np.repeat(pos, rng.geometric(0.3, len(pos)))[:40]  # ~12 instances per image
        gt_boxes = _boxes(rng, len(gt_cats))
        for cat, box, cut in zip(gt_cats, gt_boxes, rng.uniform(0, 0.4, len(gt_cats)), strict=True):
            anns.append({"image_id": image_id, "category_id": int(cat), "box": box, "cut": cut})
        found = rng.random(len(gt_cats)) < 0.8
        tp_boxes = np.abs(gt_boxes + rng.normal(0, 0.07, gt_boxes.shape) * gt_boxes[:, [2, 3, 2, 3]])[found]
        tp_cats = np.where(rng.random(len(gt_cats)) < 0.85, gt_cats, rng.choice(neg, len(gt_cats)))[found]
        n_fp = DETS_PER_IMAGE - len(tp_boxes)
        allowed = np.concatenate([pos, neg])
        fp_cats = np.where(rng.random(n_fp) < 0.3, rng.choice(allowed, n_fp), rng.integers(1, num_cats + 1, n_fp))
        boxes = np.concatenate([tp_boxes, _boxes(rng, n_fp)])
        boxes[:, :2] = np.minimum(boxes[:, :2], [IMAGE_W - 2, IMAGE_H - 2])
        boxes[:, 2:] = np.maximum(np.minimum(boxes[:, 2:], [IMAGE_W, IMAGE_H] - boxes[:, :2]), 1)
        det_parts["image"].append(np.full(len(boxes), image_id))
        det_parts["cat"].append(np.concatenate([tp_cats, fp_cats]))
        det_parts["score"].append(np.round(np.concatenate([rng.beta(5, 2, len(tp_boxes)), rng.beta(1, 4, n_fp)]), 6))
        det_parts["box"].append(boxes)
        det_parts["cut"].append(rng.uniform(0, 0.4, len(boxes)))

    gt_rles = _masks(np.array([a["box"] for a in anns]).reshape(-1, 4), np.array([a["cut"] for a in anns]))
    areas = mask_utils.area(gt_rles) if gt_rles else []
    gt_anns = []
    for a, rle, area in zip(anns, gt_rles, areas, strict=True):
        if area > 0:
            seg = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            bbox = [round(float(v), 2) for v in a["box"]]
            gt_anns.append({"id": len(gt_anns) + 1, "image_id": a["image_id"], "category_id": a["category_id"]})
            gt_anns[-1].update(bbox=bbox, area=float(area), segmentation=seg)
    with open(folder / "gt.json", "w") as f:
        json.dump({"images": images, "annotations": gt_anns, "categories": categories}, f)
    del anns, gt_anns, gt_rles

    det = {k: np.concatenate(v) for k, v in det_parts.items()}
    boxes = det["box"].round(2)
    counts: list[bytes] = []
    for start in range(0, len(boxes), 200_000):  # rasterise in slices to bound memory
        counts += [r["counts"] for r in _masks(boxes[start : start + 200_000], det["cut"][start : start + 200_000])]
    offsets = np.cumsum([0] + [len(c) for c in counts])
    np.savez(
        folder / "dets.npz",
        image_ids=det["image"].astype(np.int64),
        category_ids=det["cat"].astype(np.int64),
        scores=det["score"],
        boxes=boxes,
        mask_blob=np.frombuffer(b"".join(counts), dtype=np.uint8),
        mask_offsets=offsets,
    )
    if with_json:
        for kind in ("bbox", "segm"):
            with open(folder / f"dets_{kind}.json", "w") as f:
                f.write("[")
                for i in range(len(boxes)):
                    rec: dict[str, Any] = {
                        "image_id": int(det["image"][i]),
                        "category_id": int(det["cat"][i]),
                        "score": float(det["score"][i]),
                    }
                    if kind == "bbox":
                        rec["bbox"] = boxes[i].tolist()
                    else:  # no bbox: lvis-api then uses the mask area, as detectron2 arranges
                        rec["segmentation"] = {"size": [IMAGE_H, IMAGE_W], "counts": counts[i].decode("ascii")}
                    f.write(("," if i else "") + json.dumps(rec))
                f.write("]")
    return {"images": num_images, "gt": len(areas), "detections": len(boxes)}


# ----------------------------------------------------------------------------------------------
# Workers (each in its own process)
# ----------------------------------------------------------------------------------------------


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _status_gb(key: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak since the last reset) of this process, in GiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 2**20
    return float("nan")


class _MemorySampler:
    """Samples this process's ``VmRSS + VmSwap`` every ``period`` s in a daemon thread.

    ``ru_maxrss`` counts resident pages only, so a process that outgrows RAM and swaps (lvis-api at
    20,000 images on a 24 GB machine, run with a swap file) would look smaller than it is; the
    sampled peak of resident + swapped memory does not.
    """

    def __init__(self, period: float = 0.2) -> None:
        import threading

        self.peak_gb = 0.0
        self.peak_swap_gb = 0.0
        self._period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            swap = _status_gb("VmSwap")
            self.peak_gb = max(self.peak_gb, _status_gb("VmRSS") + swap)
            self.peak_swap_gb = max(self.peak_swap_gb, swap)
            if self._stop.wait(self._period):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _reset_peak() -> None:
    """Start a new ``VmHWM`` measurement (Linux ``clear_refs`` 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker_ours(folder: Path) -> dict[str, Any]:
    import gc

    from ovd.evaluation.lvis_eval import LVISDetections, evaluate_lvis

    load = Stopwatch()
    data = np.load(folder / "dets.npz")
    blob, offsets = data["mask_blob"], data["mask_offsets"]
    masks = [blob[offsets[i] : offsets[i + 1]].tobytes() for i in range(len(offsets) - 1)]
    del blob
    dets = LVISDetections(
        data["image_ids"],
        data["category_ids"],
        data["scores"],
        data["boxes"],
        masks,
        np.tile(np.array([[IMAGE_H, IMAGE_W]], dtype=np.int64), (len(masks), 1)),
    )
    del data
    gc.collect()
    load_s = load.elapsed()
    input_rss = _status_gb("VmRSS")
    _reset_peak()
    with Stopwatch() as w:
        metrics = evaluate_lvis(folder / "gt.json", dets, ("bbox", "segm"))
    return {
        "seconds": w.s,
        "cpu_seconds": w.cpu,
        "load_seconds": load_s,
        "input_rss_gb": input_rss,
        "eval_peak_rss_gb": _status_gb("VmHWM"),
        "metrics": metrics,
    }


def worker_lvis_api(folder: Path) -> dict[str, Any]:
    import importlib.util
    import logging
    import types

    np.float = float  # lvis-api's accumulate uses np.float, removed in NumPy 2
    spec = importlib.util.find_spec("lvis")
    package = types.ModuleType("lvis")  # skip lvis/__init__.py and its matplotlib/OpenCV visualiser
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["lvis"] = package
    from lvis.eval import LVISEval
    from lvis.lvis import LVIS
    from lvis.results import LVISResults

    logging.getLogger("lvis").setLevel(logging.ERROR)
    metrics: dict[str, Any] = {}
    with Stopwatch() as w:
        for kind in ("bbox", "segm"):
            gt = LVIS(str(folder / "gt.json"))
            results = LVISResults(gt, str(folder / f"dets_{kind}.json"), max_dets=DETS_PER_IMAGE)
            evaluator = LVISEval(gt, results, kind)
            evaluator.run()
            metrics[kind] = {k: (None if v == -1 else float(v) * 100) for k, v in evaluator.get_results().items()}
            del gt, evaluator
    return {"seconds": w.s, "cpu_seconds": w.cpu, "metrics": metrics}


def run_worker(mode: str, folder: Path, timeout: float) -> dict[str, Any]:
    """Run one worker in a fresh interpreter; returns its JSON report plus wall time and peak RSS."""
    out = folder / f"{mode}.json"
    cmd = [sys.executable, __file__, "--worker", mode, "--folder", str(folder)]
    with Stopwatch() as w:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} worker failed:\n{proc.stderr[-3000:]}")
    report = json.loads(out.read_text())
    report["wall_seconds"] = w.s
    return report


def max_difference(ours: dict[str, Any], ref: dict[str, Any]) -> float:
    diff = 0.0
    for kind in ("bbox", "segm"):
        for key in KEYS:
            a, b = ours[kind][key], ref[kind][key]
            if (a is None) != (b is None):
                return float("inf")
            if a is not None:
                diff = max(diff, abs(a - b))
        a, b = ours[kind]["AR@300"], ref[kind]["AR@300"]
        diff = max(diff, abs(a - b))
    return diff


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 20000], help="image counts to evaluate")
    parser.add_argument("--api-sizes", type=int, nargs="*", default=[1000], help="sizes lvis-api also runs on")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the synthetic data (default 0)")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds allowed per worker")
    parser.add_argument("--tmp", default=None, help="folder for the generated files (default: system temp)")
    parser.add_argument("--output", default=None, help="also write the markdown report to this file")
    parser.add_argument("--worker", choices=["ours", "lvis_api"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        sampler = _MemorySampler()
        report = (worker_ours if args.worker == "ours" else worker_lvis_api)(args.folder)
        sampler.stop()
        report["peak_rss_gb"] = max(_peak_rss_gb(), sampler.peak_gb)  # resident + swapped
        report["peak_swap_gb"] = sampler.peak_swap_gb
        write_json(args.folder / f"{args.worker}.json", report, indent=None)
        return 0

    rows, all_same = [], True
    for size in args.sizes:
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            folder = Path(tmp)
            with Stopwatch() as gen:
                counts = generate(size, args.seed, folder, with_json=size in args.api_sizes)
            gen_s = gen.s
            print(f"{size} images: generated in {gen_s:.0f} s: {counts}", file=sys.stderr)
            ours = run_worker("ours", folder, args.timeout)
            print(f"  ours: {ours['seconds']:.1f} s, peak {ours['peak_rss_gb']:.2f} GB", file=sys.stderr, flush=True)
            ref = run_worker("lvis_api", folder, args.timeout) if size in args.api_sizes else None
            if ref is not None:
                print(f"  lvis-api: {ref['seconds']:.1f} s, peak {ref['peak_rss_gb']:.2f} GB", file=sys.stderr)
            diff = None if ref is None else max_difference(ours["metrics"], ref["metrics"])
            all_same &= diff is None or diff <= TOL
            rows.append((size, counts, gen_s, ours, ref, diff))

    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("numpy", "faster-coco-eval", "lvis"))

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    details = [
        f"- Memory {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; {versions}; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}.",
        f"- Data (seed {args.seed}): 640×480 images, 1203 classes (337 r / 461 c / 405 f), "
        f"{DETS_PER_IMAGE} detections per image with masks (RLE); see the script's docstring.",
        "- Each evaluator runs alone in a fresh process reading the same files; wall and CPU (process, all "
        "threads) time = its evaluation call(s) (bbox then segm); peak memory = the larger of the process's "
        "`ru_maxrss` and its sampled resident + swapped memory (`VmRSS + VmSwap`, every 0.2 s), its input "
        "included (ours: detections as arrays from `.npz`; lvis-api: its results JSON files). The machine is "
        "shared: wall times vary 2× between runs, CPU times less.",
    ]
    title = "LVIS evaluation (boxes + masks): ovd (faster-coco-eval, chunked) vs lvis-api"
    lines = header(title, "\n".join(details), argv=argv, level=2)
    columns = ["images", "GT", "detections", "evaluator", "wall (s)", "CPU (s)", "peak memory (GB)"]
    columns += ["of it swapped (GB)", "box AP", "box APr", "mask AP", "mask APr", "mask APc", "mask APf"]
    lines += table_header(columns, "rrrlrrrrrrrrrr")
    for size, counts, _, ours, ref, _ in rows:
        for name, r in (("ovd", ours), ("lvis-api", ref)):
            if r is None:
                continue
            m = r["metrics"]
            aps = [fmt(m[kind][k]) for kind, k in (("bbox", "AP"), ("bbox", "APr"), *(("segm", k) for k in SEGM))]
            lines.append(row(size, counts["gt"], counts["detections"], name, f"{r['seconds']:.1f}",
                             f"{r['cpu_seconds']:.1f}", f"{r['peak_rss_gb']:.2f}",
                             f"{r.get('peak_swap_gb', 0.0):.2f}", *aps))  # fmt: skip
    lines.append("")
    for size, _, _, ours, ref, diff in rows:
        if ref is not None:
            verdict = "identical" if diff <= TOL else "**DIFFERENT**"
            lines.append(
                f"- {size} images: speed-up **{ref['seconds'] / ours['seconds']:.1f}×** wall, "
                f"{ref['cpu_seconds'] / ours['cpu_seconds']:.1f}× CPU time; peak memory "
                f"{ours['peak_rss_gb']:.2f} vs {ref['peak_rss_gb']:.2f} GB; max |difference| over AP, AP50, AP75, "
                f"APs/m/l, APr/c/f, AR@300 of bbox and segm = {diff:.1e} points ({verdict}, tolerance {TOL:g})."
            )
        else:
            lines.append(
                f"- {size} images: ovd only: {ours['seconds']:.1f} s, process peak RSS {ours['peak_rss_gb']:.2f} GB "
                f"(goal ≤ 16 GB: {'met' if ours['peak_rss_gb'] <= 16 else 'NOT met'})."
            )
    lines.append("")
    for size, _, _, ours, _, _ in rows:
        lines.append(
            f"- ovd at {size} images: resident after reading the input (detection arrays + one bytes object per "
            f"mask) {ours['input_rss_gb']:.2f} GB; peak RSS during `evaluate_lvis` {ours['eval_peak_rss_gb']:.2f} GB "
            f"(input included; `VmHWM` reset after reading); reading the input took {ours['load_seconds']:.0f} s."
        )
    emit_report(lines, args.output)
    return 0 if all_same else 1


if __name__ == "__main__":
    sys.exit(main())
