"""How good are the two novel-class signals of an OV-Shapes pipeline run? (issue #5: why the ordering)

RKD learns from the CLIP teacher's embeddings of the stored class-agnostic regions; PIS learns from one
pseudo box per (image, caption label), picked among the same stored regions by the same teacher. The
train split holds no novel boxes, but the generator redraws every image exactly with all its objects
(:func:`ovd.data.ovshapes.render_image`), so both signals can be checked against the true objects:

- region recall: the share of true objects that some stored region covers at IoU >= 0.5 (all K stored
  regions, and the first ``--rkd-k`` that RKD reads);
- teacher top-1 on regions: for the regions RKD reads that cover a true object at IoU >= 0.5, how often
  the teacher's zero-shot argmax over all classes names that object's class;
- pseudo-box precision: the share of pseudo boxes that cover an object of their label's class at
  IoU >= 0.5, and the share of (image, label) pairs that got a pseudo box at all.

Each is split by base / novel class. ``--write-oracle F`` also writes the run's pseudo-label file with
every pseudo box replaced by the largest true object of its label's class, for training the PIS stages on
perfect boxes. Example (the main job's output folder and its datasets root):

    OVD_DATASETS=datasets python benchmarks/ovshapes_signal_quality.py --run output/ovshapes
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from machine import emit_report, header, row, table_header  # benchmarks/ (scripts run from this folder's path)
from torchvision.ops import box_iou

from ovd.data.catalog import get_dataset
from ovd.data.ovshapes import render_image
from ovd.distill.store import RegionStore
from ovd.utils.io import read_json, write_json


def _true_objects(world: dict, num_images: int) -> list[list[tuple[int, np.ndarray]]]:
    """(0-based class id, xyxy box) of every object of train images 0..num_images-1, novel ones included."""
    preset, seed, novel = world["preset"]["name"], int(world["seed"]), world["novel"]
    out = []
    for i in range(num_images):
        _, objects, _ = render_image(preset, seed, "train", i, novel)
        out.append([(int(o["class_id"]), np.asarray(o["box"], dtype=np.float32)) for o in objects])
    return out


def _pct(num: int, den: int) -> str:
    return f"{100.0 * num / den:.1f} % ({num}/{den})" if den else "—"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a pipeline output folder (regions/, pseudo_labels/)")
    p.add_argument("--dataset", default="ovshapes_train")
    p.add_argument("--pseudo", default="ovshapes_train_pseudo", help="pseudo-label file name in RUN/pseudo_labels")
    p.add_argument("--rkd-k", type=int, default=5, help="stored regions per image that RKD reads")
    p.add_argument("--iou", type=float, default=0.5)
    p.add_argument("--images", type=int, default=0, help="first N train images only (0: all)")
    p.add_argument(
        "--write-oracle",
        type=Path,
        help="also write the pseudo-label file with each pseudo box "
        "replaced by the largest true object of its label's class (PIS with perfect boxes)",
    )
    args = p.parse_args()

    info = get_dataset(args.dataset)
    train = read_json(info.ann_file_path)
    world = train["info"]
    novel_ids = {c["id"] - 1 for c in train["categories"] if c["name"] in set(world["novel"])}
    images = sorted(train["images"], key=lambda im: im["id"])
    if args.images:
        images = images[: args.images]
    truth = _true_objects(world, len(images))  # image i has id i + 1 (ovd.data.ovshapes._coco_json)

    store = RegionStore.open(args.run / "regions" / args.dataset)
    vocab_dir = args.run / "pseudo_labels" / "text_embeddings"
    text = np.load(vocab_dir / "vocabulary.npy").astype(np.float32)  # (C, D)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    keys = ("recall_all", "recall_rkd", "teacher_top1", "pseudo_prec", "pseudo_cover")
    split_counts = {s: {k: [0, 0] for k in keys} for s in ("base", "novel")}  # key -> [hits, total]

    per_class: dict[int, dict[str, list[int]]] = {}

    def add(key: str, cls: int, hit: bool) -> None:
        for c in (
            split_counts["novel" if cls in novel_ids else "base"][key],
            per_class.setdefault(cls, {}).setdefault(key, [0, 0]),
        ):
            c[0] += int(hit)
            c[1] += 1

    for im, objs in zip(images, truth, strict=True):
        boxes, emb = store.lookup(im["id"])  # (k, 4), (k, D)
        if not objs:
            continue
        gt = torch.as_tensor(np.stack([b for _, b in objs]))  # (G, 4)
        iou = box_iou(gt, torch.as_tensor(boxes)).numpy() if len(boxes) else np.zeros((len(objs), 0))  # (G, k)
        top = emb[: args.rkd_k] @ text.T if len(boxes) else np.zeros((0, len(text)))  # (k', C)
        for g, (cls, _) in enumerate(objs):
            add("recall_all", cls, bool((iou[g] >= args.iou).any()))
            add("recall_rkd", cls, bool((iou[g, : args.rkd_k] >= args.iou).any()))
        for r in range(min(args.rkd_k, len(boxes))):
            g = int(iou[:, r].argmax())
            if iou[g, r] >= args.iou:
                add("teacher_top1", objs[g][0], int(top[r].argmax()) == objs[g][0])

    pseudo = read_json(args.run / "pseudo_labels" / f"{args.pseudo}.json")
    by_image: dict[int, list[dict]] = {}
    for a in pseudo["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    index = {im["id"]: i for i, im in enumerate(images)}
    for im in pseudo["images"]:
        if im["id"] not in index:
            continue
        objs = truth[index[im["id"]]]
        got = {a["category_id"] - 1: a for a in by_image.get(im["id"], [])}
        for cat in im.get("pos_category_ids", []):
            add("pseudo_cover", cat - 1, (cat - 1) in got)
        for cls, a in got.items():
            x, y, w, h = a["bbox"]
            same = [b for c, b in objs if c == cls]
            hit = bool(same) and bool(
                (box_iou(torch.tensor([[x, y, x + w, y + h]]), torch.as_tensor(np.stack(same))) >= args.iou).any()
            )
            add("pseudo_prec", cls, hit)

    if args.write_oracle:
        oracle = {**pseudo, "annotations": []}
        for im in pseudo["images"]:
            objs = truth[index[im["id"]]] if im["id"] in index else []
            for cat in im.get("pos_category_ids", []):
                same = [b for c, b in objs if c == cat - 1]
                if not same:
                    continue
                x0, y0, x1, y1 = (float(v) for v in max(same, key=lambda b: (b[2] - b[0]) * (b[3] - b[1])))
                oracle["annotations"].append({"id": len(oracle["annotations"]) + 1, "image_id": im["id"],
                                              "category_id": cat, "bbox": [x0, y0, x1 - x0, y1 - y0],
                                              "area": (x1 - x0) * (y1 - y0), "score": 1.0, "iscrowd": 0})  # fmt: skip
        write_json(args.write_oracle, oracle)
        print(f"oracle pseudo labels: {args.write_oracle} ({len(oracle['annotations'])} boxes)")

    rows = [
        ("true objects covered by a stored region (all K)", "recall_all"),
        (f"true objects covered by one of the first {args.rkd_k} (what RKD reads)", "recall_rkd"),
        ("teacher top-1 on those regions (all classes)", "teacher_top1"),
        ("caption labels that got a pseudo box", "pseudo_cover"),
        ("pseudo boxes on an object of their class", "pseudo_prec"),
    ]
    lines = header("", f"run: {args.run} ({len(images)} train images, IoU >= {args.iou}, K = {store.k})")
    lines += table_header(["signal", "base classes", "novel classes"], "lrr")
    for label, key in rows:
        lines.append(row(label, _pct(*split_counts["base"][key]), _pct(*split_counts["novel"][key])))
    names = {c["id"] - 1: c["name"] for c in train["categories"]}
    columns = ["class", "split", "teacher top-1 on RKD regions", "pseudo boxes on an object of their class"]
    lines += ["", *table_header(columns, "llrr")]
    for cls in sorted(per_class):
        c = per_class[cls]
        split = "novel" if cls in novel_ids else "base"
        lines.append(row(names[cls], split, _pct(*c.get("teacher_top1", [0, 0])), _pct(*c.get("pseudo_prec", [0, 0]))))
    emit_report(lines, "")
    print(json.dumps({"split": split_counts, "per_class": {names[k]: v for k, v in sorted(per_class.items())}}))


if __name__ == "__main__":
    main()
