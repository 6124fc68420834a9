"""OV-Shapes-LT: determinism, the norare protocol, the declared long tail, masks vs boxes, federated lists."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from ovd.data import ovshapes_lt as lt
from ovd.data.catalog import get_dataset
from ovd.data.coco import load_coco_json, load_dataset
from ovd.data.loader import DetectionDataset
from ovd.data.ovshapes import CLASS_NAMES, DEFAULT_NOVEL
from ovd.data.transforms import ResizeFlipAugmentation
from ovd.errors import OVDError
from ovd.utils.io import read_json

# pycocotools' C decoder trips a numpy-2 copy-keyword deprecation; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

RARE_IDS = {CLASS_NAMES.index(n) + 1 for n, g in lt.TAIL if g == lt.RARE}  # dataset category ids


def _checksums(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lt.generate_ovshapes_lt(tmp_path_factory.mktemp("lt"), "small", seed=0)


def _json(world: Path, name: str) -> dict:
    return read_json(world / "annotations" / f"{name}.json")


def test_deterministic(world, tmp_path):
    again = lt.generate_ovshapes_lt(tmp_path, "small", seed=0, workers=2)
    assert _checksums(again) == _checksums(world)
    other = lt.generate_ovshapes_lt(tmp_path / "s1", "small", seed=1)
    assert _checksums(other) != _checksums(world)


def test_declared_split_is_lvis_like():
    groups = lt.declared_frequencies()
    assert [groups.count(g) for g in "fcr"] == [6, 6, 4]  # LVIS: 405 / 461 / 337 of 1203
    assert {CLASS_NAMES[k] for k, g in enumerate(groups) if g == "r"} <= set(DEFAULT_NOVEL)
    for name in lt.PRESETS:
        preset = lt.PRESETS[name]
        targets = lt.train_image_targets(name)
        # every class's allocated image count lies in its declared band
        assert [lt.frequency_of(int(n), preset) for n in targets] == list(groups)
        order = [targets[CLASS_NAMES.index(c)] for c, _ in lt.TAIL]
        assert order == sorted(order, reverse=True)  # the tail is monotone
    # default: 2000 train images → rare ≤ 20, common ≤ 200 (1 % / 10 %), and no clamping is needed
    d = lt.PRESETS["default"]
    assert (d.rare_max, d.common_max) == (20, 200)
    raw = [round(d.num_train * d.head_fraction * d.decay**r) for r in range(len(lt.TAIL))]
    assert sorted(lt.train_image_targets("default").tolist(), reverse=True) == raw


def test_frequencies_follow_the_tail(world):
    full = _json(world, "train")
    preset = lt.PRESETS["small"]
    images: dict[int, set[int]] = {}
    for a in full["annotations"]:
        images.setdefault(a["category_id"], set()).add(a["image_id"])
    targets = lt.train_image_targets("small")
    for cat in full["categories"]:
        count = len(images.get(cat["id"], ()))
        assert count == cat["image_count"] == targets[cat["id"] - 1]  # allocation is exact
        assert cat["frequency"] == lt.frequency_of(count, preset) == lt.declared_frequencies()[cat["id"] - 1]
        assert cat["instance_count"] == sum(a["category_id"] == cat["id"] for a in full["annotations"])
        assert set(cat["synonyms"]) >= {cat["name"]}
    # every file carries the same categories (as LVIS)
    assert _json(world, "val")["categories"] == _json(world, "train_norare")["categories"] == full["categories"]


def test_norare_keeps_rare_objects_unannotated(world):
    full, norare = _json(world, "train"), _json(world, "train_norare")
    assert not [a for a in norare["annotations"] if a["category_id"] in RARE_IDS]
    assert norare["images"] == full["images"]  # every image kept
    rare_images = {a["image_id"] for a in full["annotations"] if a["category_id"] in RARE_IDS}
    assert {a["category_id"] for a in full["annotations"]} >= RARE_IDS  # the objects are drawn in train
    assert rare_images <= {img["id"] for img in norare["images"]}
    assert len(norare["annotations"]) == len(full["annotations"]) - sum(
        a["category_id"] in RARE_IDS for a in full["annotations"]
    )
    info = read_json(world / "annotations" / "train_norare_cat_info.json")
    assert {c["id"]: c["image_count"] for c in info if c["id"] in RARE_IDS} == dict.fromkeys(RARE_IDS, 0)
    assert all(c["image_count"] > 0 for c in info if c["id"] not in RARE_IDS)


def test_val_has_every_class(world):
    val = _json(world, "val")
    counts = np.bincount([a["category_id"] for a in val["annotations"]], minlength=len(CLASS_NAMES) + 1)[1:]
    assert counts.min() >= 1
    assert counts[[k - 1 for k in RARE_IDS]].min() >= 1


@pytest.mark.parametrize("split", ["train", "val"])
def test_masks_agree_with_boxes(world, split):
    data = _json(world, split)
    size = {img["id"]: (img["height"], img["width"]) for img in data["images"]}
    for ann in data["annotations"]:
        mask = mask_util.decode(ann["segmentation"])
        assert tuple(ann["segmentation"]["size"]) == mask.shape == size[ann["image_id"]]
        ys, xs = np.nonzero(mask)
        tight = [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]  # xywh, pixel edges
        assert ann["bbox"] == [float(v) for v in tight]
        assert ann["area"] == float(mask.sum())
    # masks are modal: two objects of an image never share a pixel
    by_image: dict[int, np.ndarray] = {}
    for ann in data["annotations"]:
        m = mask_util.decode(ann["segmentation"]).astype(np.int32)
        by_image[ann["image_id"]] = by_image.get(ann["image_id"], 0) + m
    assert max(int(m.max()) for m in by_image.values()) == 1


def test_federated_lists_are_consistent(world):
    full, val = _json(world, "train"), _json(world, "val")
    num_not_exhaustive = 0
    for data in (full, val):
        present: dict[int, set[int]] = {}
        for a in data["annotations"]:
            present.setdefault(a["image_id"], set()).add(a["category_id"])
        negatives = 0
        for img in data["images"]:
            pos = present.get(img["id"], set())
            assert not set(img["neg_category_ids"]) & pos  # a negative class has no annotation there
            assert set(img["not_exhaustive_category_ids"]) <= pos  # only annotated classes are not exhaustive
            negatives += len(img["neg_category_ids"])
            num_not_exhaustive += len(img["not_exhaustive_category_ids"])
        assert negatives > 0
    assert num_not_exhaustive > 0
    assert all(not img["not_exhaustive_category_ids"] for img in full["images"])  # train is exhaustive
    # a rare object left unannotated in norare is never listed as a negative of its image
    rare_at = {(a["image_id"], a["category_id"]) for a in full["annotations"] if a["category_id"] in RARE_IDS}
    norare = _json(world, "train_norare")
    assert not {(img["id"], c) for img in norare["images"] for c in img["neg_category_ids"]} & rare_at


def test_catalog_and_masks_in_the_loader(tmp_path, monkeypatch):
    monkeypatch.setenv("OVD_DATASETS", str(tmp_path))
    info = get_dataset("ovshapes_lt_small_train_norare")  # generates the world on first use
    assert (tmp_path / "ovshapes_lt" / "small" / "annotations" / "train_norare.json").is_file()
    assert info.novel_classes == tuple(sorted(k - 1 for k in RARE_IDS))
    assert set(info.base_classes) | set(info.novel_classes) == set(range(len(CLASS_NAMES)))
    assert get_dataset("ovshapes_lt_small_val").extra["format"] == "lvis"
    records = load_dataset(info)  # the entry says its annotations have masks
    rec = next(r for r in records if len(r.boxes) >= 2)
    assert rec.masks is not None and len(rec.masks) == len(rec.boxes)
    assert load_dataset(info, with_masks=False)[0].masks is None
    for flip in (0.0, 1.0):
        item = DetectionDataset([rec], ResizeFlipAugmentation((150,), 1000, flip_prob=flip))[0]
        masks, boxes = item["masks"], item["boxes"]
        assert masks.dtype == torch.uint8 and masks.shape == (len(boxes), *item["image"].shape[1:])
        for m, b in zip(masks, boxes, strict=True):
            ys, xs = torch.nonzero(m, as_tuple=True)
            tight = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
            assert (tight - b).abs().max() <= 1.5  # resized boxes vs resized, re-binarised masks


def test_bad_inputs(tmp_path):
    with pytest.raises(OVDError, match="unknown OV-Shapes-LT preset 'huge'"):
        lt.generate_ovshapes_lt(tmp_path, "huge")
    with pytest.raises(OVDError, match="rare_fraction"):
        lt.OVShapesLTPreset("bad", num_train=10, num_val=4, rare_fraction=0.2, common_fraction=0.1)
    with pytest.raises(OVDError, match="seed"):
        lt.generate_ovshapes_lt(tmp_path, "small", seed=-1)


def test_coco_masks_polygons_rle_and_errors(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((40, 60, 3), np.uint8))
    rle = mask_util.encode(np.asfortranarray(np.pad(np.ones((10, 20), np.uint8), ((25, 5), (35, 5)))))
    anns = [
        {"id": 1, "image_id": 1, "category_id": 2, "bbox": [10, 10, 20, 20], "iscrowd": 0,
         "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]]},  # a polygon square, x, y in [10, 30]
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 1, "segmentation": {}},  # skipped
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [35, 25, 20, 10], "iscrowd": 0,
         "segmentation": {"size": [40, 60], "counts": rle["counts"].decode("ascii")}},
    ]  # fmt: skip
    data = {
        "images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 60}],
        "annotations": anns,
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    assert load_coco_json(path, tmp_path, [1, 2])[0].masks is None  # not requested: not read
    rec = load_coco_json(path, tmp_path, [1, 2], with_masks=True)[0]
    assert len(rec.masks) == len(rec.boxes) == 2 and isinstance(rec.masks[0], list)
    item = DetectionDataset([rec], ResizeFlipAugmentation((80,), 1000, flip_prob=1.0))[0]  # 2x, flipped
    masks = item["masks"]
    assert masks.shape == (2, 80, 120)
    # the RLE rectangle (x 35..54, y 25..34) becomes x 10..49, y 50..69 after the 2x scale and the flip
    expected = torch.zeros(80, 120, dtype=torch.uint8)
    expected[50:70, 10:50] = 1
    assert torch.equal(masks[1], expected)
    ys, xs = torch.nonzero(masks[0], as_tuple=True)  # the polygon square, flipped: x in 120 - [60, 20]
    assert abs(int(xs.min()) - 60) <= 1 and abs(int(xs.max()) + 1 - 100) <= 1 and abs(int(ys.min()) - 20) <= 1
    del anns[2]["segmentation"]
    path.write_text(json.dumps(data))
    with pytest.raises(OVDError, match=r"annotations\[2\].*segmentation"):
        load_coco_json(path, tmp_path, [1, 2], with_masks=True)
    anns[2]["segmentation"] = {"size": [41, 60], "counts": "abc"}
    path.write_text(json.dumps(data))
    with pytest.raises(OVDError, match="RLE size"):
        load_coco_json(path, tmp_path, [1, 2], with_masks=True)


def test_image_labels_name_every_drawn_class(tmp_path, monkeypatch):
    """The ImageNet-LVIS stand-in: per train image, exactly the classes drawn in it (rare included)."""
    monkeypatch.setenv("OVD_DATASETS", str(tmp_path))
    info = get_dataset("ovshapes_lt_small_image_labels")  # generates the world, then derives the labels
    assert info.ann_type == "image"
    train = read_json(tmp_path / "ovshapes_lt" / "small" / "annotations" / "train.json")
    drawn: dict[int, set[int]] = {img["id"]: set() for img in train["images"]}
    for ann in train["annotations"]:
        drawn[ann["image_id"]].add(ann["category_id"])
    labels = read_json(info.ann_file_path)
    assert labels["annotations"] == [] and len(labels["images"]) == len(train["images"])
    for img in labels["images"]:
        assert img["pos_category_ids"] == sorted(drawn[img["id"]])
    assert any(set(img["pos_category_ids"]) & RARE_IDS for img in labels["images"])  # rare classes are named
    records = load_dataset(info)
    assert [r.image_id for r in records] == [i for i, c in drawn.items() if c]  # label-less images are skipped
    rec = records[0]
    assert len(rec.boxes) == 0 and sorted(rec.pos_labels + 1) == sorted(drawn[rec.image_id])
    first = next(img for img in train["images"] if img["id"] == rec.image_id)
    assert Path(rec.file_name) == info.image_root_path / first["file_name"]


def test_imagenet_split_is_class_balanced_and_separate(tmp_path, monkeypatch):
    """The ImageNet-LVIS stand-in: its own images, one class each, every class (rare ones too) equally often;
    generating it leaves the world (train/val files) untouched."""
    monkeypatch.setenv("OVD_DATASETS", str(tmp_path))
    world = lt.generate_ovshapes_lt(tmp_path, "small")
    before = (world / "annotations" / "train_norare.json").read_bytes()
    info = get_dataset("ovshapes_lt_small_imagenet")  # generated on first use
    assert info.ann_type == "image" and info.image_root_path == world / "imagenet"
    labels = read_json(info.ann_file_path)
    assert labels["annotations"] == [] and len(labels["images"]) == lt.PRESETS["small"].num_imagenet == 32
    per_class = np.bincount([c for img in labels["images"] for c in img["pos_category_ids"]], minlength=17)[1:]
    assert per_class.tolist() == [2] * 16  # 32 images / 16 classes: perfectly balanced, rare included
    assert all(len(img["pos_category_ids"]) == 1 for img in labels["images"])
    assert min(img["id"] for img in labels["images"]) == 2_000_001
    assert (world / "annotations" / "train_norare.json").read_bytes() == before
    assert labels["categories"] == read_json(world / "annotations" / "train_norare.json")["categories"]
    # each image shows its class: as many drawn instances as the allocation says, all of that class
    allocation = lt.allocate("small", 0, "imagenet")
    for img, ids in zip(labels["images"], allocation, strict=True):
        assert img["pos_category_ids"] == [ids[0] + 1] and set(ids) == {ids[0]} and 1 <= len(ids) <= 3
        assert (world / "imagenet" / img["file_name"]).is_file()
    records = load_dataset(info)
    assert len(records) == 32 and all(len(r.boxes) == 0 and len(r.pos_labels) == 1 for r in records)
    # regenerating is a no-op; the split does not enter the world's identity
    stamp = info.ann_file_path.stat().st_mtime_ns
    assert lt.generate_imagenet_split(tmp_path, "small") == info.ann_file_path
    assert info.ann_file_path.stat().st_mtime_ns == stamp
    assert "num_imagenet" not in read_json(world / "annotations" / "train_norare.json")["info"]["preset"]
    with pytest.raises(OVDError, match="no ImageNet split"):
        lt.generate_imagenet_split(tmp_path, lt.OVShapesLTPreset("none", num_train=64, num_val=32, num_imagenet=0,
                                                                 val_min_images=3))  # fmt: skip
