"""Miniature OV-COCO and OV-LVIS trees in the real datasets' formats (issue #17), laid out as
``datasets/README.md`` says, from scikit-image's sample photos and small synthetic images.

OV-COCO (:func:`build_ov_coco`): the 80 real COCO categories and ids; ``captions_train2017.json`` with
every train image; the OVR-CNN zero-shot files with their real properties: the seen-class train split
keeps only images with a base-class box and only base-class annotations (so caption-only and
novel-only images exist outside it), the val file keeps base and novel annotations (excluded classes
dropped), both list all 80 categories; grayscale JPEGs, a crowd annotation (uncompressed RLE),
polygons and a compressed RLE. OV-LVIS (:func:`build_ov_lvis`, on the COCO images): LVIS v1 files
without ``file_name`` (paths from ``coco_url``, one val image from ``train2017``), ``frequency``,
``neg_category_ids``, ``not_exhaustive_category_ids``, ``image_count``/``instance_count``, ``synset``;
an ImageNet-LVIS folder by WordNet id and its wnid map (the norare / cat-info / imagenet files are made
by ``tools/prepare_lvis.py``, as the docs say).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from ovd.data.builtin import COCO_CATEGORIES, COCO_EXCLUDED_IDS, COCO_NOVEL_IDS

NAMES = dict(COCO_CATEGORIES)
BASE_IDS = tuple(c for c, _ in COCO_CATEGORIES if c not in COCO_NOVEL_IDS and c not in COCO_EXCLUDED_IDS)

# (image source: a skimage.data photo or "synthetic", grayscale, COCO category ids of its objects)
TRAIN = [
    ("astronaut", False, [1]),
    ("camera", True, [1, 1]),  # grayscale; + a crowd of persons
    ("coffee", False, [47, 50, 67]),  # novel cup, base spoon, excluded dining table
    ("chelsea", False, [17]),  # novel only: not in the seen split, in the captions
    ("rocket", False, [5]),  # novel only
    ("clock", True, [85]),  # grayscale, base clock
    ("coins", True, []),  # caption only, nothing annotated
    ("hubble_deep_field", False, []),  # caption only
    ("synthetic", False, [3, 18]),
    ("synthetic", False, [6]),  # novel only
    ("synthetic", False, [44, 49]),
    ("synthetic", True, [16]),  # grayscale synthetic
    ("synthetic", False, [8, 10]),
    ("synthetic", False, [62, 63]),
    ("synthetic", False, [19]),
    ("synthetic", False, [20, 21]),
    ("synthetic", False, [84, 87]),
    ("synthetic", False, [9]),
]
VAL = [
    ("astronaut", False, [1]),
    ("chelsea", False, [17]),  # novel only
    ("camera", True, [1]),
    ("synthetic", False, [3, 18]),
    ("synthetic", False, [47, 44]),
    ("synthetic", True, [6, 62]),
    ("synthetic", False, [16, 58]),  # excluded hot dog dropped
    ("synthetic", False, [21, 20]),
]

LVIS_CATEGORIES = [  # id, name, synset, frequency
    (1, "person", "person.n.01", "f"),
    (2, "cat", "cat.n.01", "c"),
    (3, "cup", "cup.n.01", "f"),
    (4, "clock", "clock.n.01", "f"),
    (5, "rocket", "rocket.n.01", "r"),
    (6, "spoon", "spoon.n.01", "c"),
    (7, "dog", "dog.n.01", "f"),
    (8, "car_(automobile)", "car.n.01", "f"),
    (9, "teapot", "teapot.n.01", "r"),
    (10, "bus_(vehicle)", "bus.n.01", "c"),
    (11, "coin", "coin.n.01", "r"),
    (12, "bird", "bird.n.01", "f"),
]
COCO_TO_LVIS = {1: 1, 17: 2, 47: 3, 85: 4, 5: 5, 50: 6, 18: 7, 3: 8, 6: 10, 16: 12}
WNIDS = {"n02123045": "cat.n.01", "n03196217": "clock.n.01", "n03063599": "cup.n.01", "n04099969": "teapot.n.01"}


def _photo(name: str, gray: bool, rng: np.random.Generator) -> Image.Image:
    if name == "synthetic":
        h, w = int(rng.integers(160, 260)), int(rng.integers(200, 320))
        im = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 255, 3)))
        draw = ImageDraw.Draw(im)
        for _ in range(4):
            x, y = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            draw.rectangle([x, y, x + 40, y + 40], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    else:
        import skimage.data

        im = Image.fromarray(np.asarray(getattr(skimage.data, name)()))
        im.thumbnail((320, 320))
    return im.convert("L" if gray else "RGB")


def _box(rng: np.random.Generator, w: int, h: int) -> list[float]:
    bw, bh = float(rng.integers(w // 5, w // 2)), float(rng.integers(h // 5, h // 2))
    x, y = float(rng.integers(0, w - int(bw))), float(rng.integers(0, h - int(bh)))
    return [x, y, bw, bh]


def _polygon(b: list[float]) -> list[list[float]]:
    x, y, w, h = b
    return [[x, y, x + w, y, x + w, y + h, x + w / 2, y + h + 0.0, x, y + h]]


def _images(split: str, plan: list, root: Path, first_id: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Write the images of ``plan`` as JPEGs; returns (COCO image entries, COCO annotations with every object)."""
    rng = np.random.default_rng(seed)
    folder = root / "coco" / split
    folder.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i, (source, gray, cats) in enumerate(plan):
        image_id = first_id + 7 * i
        name = f"{image_id:012d}.jpg"
        im = _photo(source, gray, rng)
        im.save(folder / name, quality=90)
        w, h = im.size
        images.append({
            "license": 1, "file_name": name, "coco_url": f"http://images.cocodataset.org/{split}/{name}",
            "height": h, "width": w, "date_captured": "2013-11-14 16:28:13",
            "flickr_url": f"http://farm4.staticflickr.com/{image_id}.jpg", "id": image_id,
        })  # fmt: skip
        for k, cid in enumerate(cats):
            b = _box(rng, w, h)
            segm: dict | list = _polygon(b)
            if k == 1:  # a compressed RLE for a second object
                m = np.zeros((h, w), dtype=np.uint8, order="F")
                m[int(b[1]) : int(b[1] + b[3]), int(b[0]) : int(b[0] + b[2])] = 1
                rle = mask_utils.encode(m)
                segm = {"size": [h, w], "counts": rle["counts"].decode()}
            anns.append({"segmentation": segm, "area": b[2] * b[3], "iscrowd": 0, "image_id": image_id,
                         "bbox": b, "category_id": cid, "id": 0})  # fmt: skip
        if source == "camera" and split == "train2017":  # a crowd of persons: uncompressed RLE
            m = np.zeros((h, w), dtype=np.uint8)
            m[h // 2 :, : w // 3] = 1
            counts, flat, last, run = [], m.flatten(order="F"), 0, 0
            for v in flat:
                if v != last:
                    counts.append(run)
                    run, last = 0, v
                run += 1
            counts.append(run)
            crowd = {"size": [h, w], "counts": counts}
            anns.append({"segmentation": crowd, "area": float(m.sum()), "iscrowd": 1, "image_id": image_id,
                         "bbox": [0.0, h / 2, w / 3, h / 2], "category_id": 1, "id": 0})  # fmt: skip
    return images, anns


def _coco_file(images: list[dict], anns: list[dict], keep_cats: set[int], keep_images: str) -> dict:
    kept = [a for a in anns if a["category_id"] in keep_cats]
    with_boxes = {a["image_id"] for a in kept if not a["iscrowd"]}
    imgs = [im for im in images if keep_images == "all" or im["id"] in with_boxes]
    ids = {im["id"] for im in imgs}
    kept = [{**a, "id": n + 1} for n, a in enumerate(a for a in kept if a["image_id"] in ids)]
    return {
        "info": {"description": "COCO 2017 Dataset (miniature)", "version": "1.0", "year": 2017},
        "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1, "name": "BY-NC-SA"}],
        "images": imgs,
        "annotations": kept,
        "categories": [{"supercategory": "thing", "id": c, "name": n} for c, n in COCO_CATEGORIES],
    }


def _caption(cats: list[int], k: int) -> str:
    if not cats:
        return ["a blurry photograph of something small", "an image with many colours"][k % 2]
    names = [NAMES[c] for c in cats]
    return f"a photo of a {' and a '.join(names)}" if k == 0 else f"there is a {names[0]} in this picture."


def build_ov_coco(root: Path) -> dict:
    """The miniature OV-COCO tree under ``root`` (see the module docstring); returns facts about it."""
    root = Path(root)
    train_images, train_anns = _images("train2017", TRAIN, root, 9, seed=0)
    val_images, val_anns = _images("val2017", VAL, root, 139, seed=1)
    zs = root / "coco" / "zero-shot"
    zs.mkdir(parents=True, exist_ok=True)
    seen = _coco_file(train_images, train_anns, set(BASE_IDS), "with_boxes")
    val = _coco_file(val_images, val_anns, set(BASE_IDS) | set(COCO_NOVEL_IDS), "with_boxes")
    (zs / "instances_train2017_seen_2_oriorder.json").write_text(json.dumps(seen))
    (zs / "instances_val2017_all_2_oriorder.json").write_text(json.dumps(val))
    captions = [
        {"image_id": im["id"], "id": 1000 * im["id"] + k, "caption": _caption(plan[2], k)}
        for im, plan in zip(train_images, TRAIN, strict=True)
        for k in range(2)
    ]
    ann_dir = root / "coco" / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    cap = {"info": seen["info"], "licenses": seen["licenses"], "images": train_images, "annotations": captions}
    (ann_dir / "captions_train2017.json").write_text(json.dumps(cap))
    seen_ids = {im["id"] for im in seen["images"]}
    return {
        "train_images": len(train_images),
        "seen_images": len(seen_ids),
        "caption_only_ids": sorted(im["id"] for im in train_images if im["id"] not in seen_ids),
        "novel_only_ids": sorted(
            im["id"] for im, p in zip(train_images, TRAIN, strict=True) if p[2] and set(p[2]) <= set(COCO_NOVEL_IDS)
        ),
        "val_images": len(val["images"]),
        "missing_image": root / "coco" / "train2017" / seen["images"][0]["file_name"],
    }


def build_ov_lvis(root: Path) -> dict:
    """The miniature OV-LVIS files and ImageNet-LVIS folder (needs :func:`build_ov_coco`'s images)."""
    root = Path(root)
    cats = [
        {"id": i, "name": n, "synset": s, "synonyms": [n], "def": f"a {n}", "frequency": f,
         "image_count": 0, "instance_count": 0}
        for i, n, s, f in LVIS_CATEGORIES
    ]  # fmt: skip

    def lvis_file(split: str, plan: list, first_id: int, seed: int, extra: list[tuple[str, list[int]]]) -> dict:
        rng = np.random.default_rng(seed)
        images, anns = [], []
        entries = [(f"{first_id + 7 * i:012d}.jpg", split, p[2]) for i, p in enumerate(plan)]
        entries += [(name, other, c) for name, c in extra for other in ["train2017"]]
        for name, folder, coco_cats in entries:
            with Image.open(root / "coco" / folder / name) as im:
                w, h = im.size
            image_id = int(name[:-4])
            lv = [COCO_TO_LVIS[c] for c in coco_cats if c in COCO_TO_LVIS]
            if folder == "train2017" and name == "000000000037.jpg":
                lv.append(5)  # a rare rocket (the rocket photo)
            images.append({
                "id": image_id, "coco_url": f"http://images.cocodataset.org/{folder}/{name}", "height": h, "width": w,
                "license": 1, "flickr_url": "", "date_captured": "2013-11-14 16:28:13",
                "neg_category_ids": [9], "not_exhaustive_category_ids": lv[:1],
            })  # fmt: skip
            for cid in lv:
                b = _box(rng, w, h)
                anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cid, "bbox": b,
                             "area": b[2] * b[3], "segmentation": _polygon(b)})  # fmt: skip
        counted = [
            {**c, "image_count": len({a["image_id"] for a in anns if a["category_id"] == c["id"]}),
             "instance_count": sum(a["category_id"] == c["id"] for a in anns)}
            for c in cats
        ]  # fmt: skip
        return {"info": {"year": 2020}, "licenses": [], "images": images, "annotations": anns, "categories": counted}

    lvis = root / "lvis"
    lvis.mkdir(parents=True, exist_ok=True)
    train = lvis_file("train2017", TRAIN[:-1], 9, 2, [])
    val = lvis_file("val2017", VAL, 139, 3, [(f"{9 + 7 * (len(TRAIN) - 1):012d}.jpg", [9])])
    (lvis / "lvis_v1_train.json").write_text(json.dumps(train))
    (lvis / "lvis_v1_val.json").write_text(json.dumps(val))
    rng = np.random.default_rng(4)
    for wnid in WNIDS:
        folder = root / "imagenet" / "ImageNet-LVIS" / wnid
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(3):
            _photo("synthetic", k == 2, rng).save(folder / f"{wnid}_{k + 1}.JPEG", quality=90)
    wnid_map = root / "imagenet" / "imagenet_lvis_wnid_map.txt"
    wnid_map.write_text("# wnid lvis synset\n" + "".join(f"{w} {s}\n" for w, s in WNIDS.items()))
    return {"wnid_map": wnid_map, "train_images": len(train["images"]), "val_images": len(val["images"])}
