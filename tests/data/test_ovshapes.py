"""OV-Shapes: determinism, tight boxes, the OV-COCO protocol, captions, catalog, crops, bad input."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_util

from ovd.data import ovshapes, ovshapes_render
from ovd.data.catalog import get_dataset
from ovd.data.ovshapes import CLASS_NAMES, CLASSES, DEFAULT_NOVEL, OVShapesPreset, generate_ovshapes
from ovd.errors import OVDError
from ovd.utils.io import read_json

TINY = OVShapesPreset("tiny", num_train=6, num_val=4)

# pycocotools' C decoder trips a numpy-2 copy-keyword deprecation; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _checksums(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _term_pattern(term: str) -> re.Pattern[str]:
    return re.compile(r"\b" + re.escape(term) + r"(?:s|es)?\b")


_PATTERNS = [[_term_pattern(t) for t in c.terms] for c in CLASSES]


def _classes_named(text: str) -> set[int]:
    """Classes a caption names (singular or plural, word-bounded), parsed with the synonym lists."""
    return {k for k, patterns in enumerate(_PATTERNS) if any(p.search(text) for p in patterns)}


def _tags_method_41(text: str) -> set[int]:
    """METHOD §4.1: a class is a tag if ' ' + synonym + ' ' is in the text, or it starts/ends with it."""
    return {
        k
        for k, c in enumerate(CLASSES)
        if any(f" {s} " in text or text.startswith(f"{s} ") or text.endswith(f" {s}") for s in c.terms)
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_ovshapes(tmp_path_factory.mktemp("ovs"), "small", seed=0)


@pytest.fixture(scope="module")
def train(small: Path) -> dict:
    return read_json(small / "annotations" / "train.json")


@pytest.fixture(scope="module")
def val(small: Path) -> dict:
    return read_json(small / "annotations" / "val.json")


def test_layout_and_categories(small: Path, train: dict, val: dict) -> None:
    assert len(list((small / "train").glob("*.png"))) == 48
    assert len(list((small / "val").glob("*.png"))) == 24
    assert not list(small.rglob("*.tmp"))  # no leftovers of the atomic writes
    for data in (train, val):
        cats = data["categories"]
        assert [c["id"] for c in cats] == list(range(1, len(CLASSES) + 1))
        assert [c["name"] for c in cats] == list(CLASS_NAMES)
        assert {c["name"] for c in cats if c["split"] == "novel"} == set(DEFAULT_NOVEL)
        assert all(c["synonyms"][0] == c["name"] and len(c["synonyms"]) >= 3 for c in cats)
    assert len(CLASSES) >= 16 and len(DEFAULT_NOVEL) == 6
    sizes = {(im["height"], im["width"]) for im in train["images"]}
    assert len(sizes) > 10 and all(224 <= s <= 288 for hw in sizes for s in hw)


def test_same_seed_is_byte_identical(small: Path, tmp_path: Path) -> None:
    again = generate_ovshapes(tmp_path, "small", seed=0)
    assert _checksums(again) == _checksums(small)


def test_different_seed_differs(tmp_path: Path) -> None:
    a = generate_ovshapes(tmp_path / "a", TINY, seed=0)
    b = generate_ovshapes(tmp_path / "b", TINY, seed=1)
    ca, cb = _checksums(a), _checksums(b)
    assert ca.keys() == cb.keys()
    assert ca["train/train_000000.png"] != cb["train/train_000000.png"]
    assert ca["annotations/val.json"] != cb["annotations/val.json"]


def test_worker_count_does_not_change_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ovshapes_render, "PARALLEL_MIN_IMAGES", 1)
    one = generate_ovshapes(tmp_path / "one", TINY, seed=3, workers=1)
    two = generate_ovshapes(tmp_path / "two", TINY, seed=3, workers=2)
    assert _checksums(one) == _checksums(two)


def test_draw_mask_hand_checked() -> None:
    # unit square [-1, 1]^2 scaled by 10 around (50, 40) → pixel edges x in [40, 60], y in [30, 50]
    square = CLASSES[CLASS_NAMES.index("square")]
    mask = square.draw_mask(np.array([[10.0, 0, 50], [0, 10, 40]]), 100, 100)
    assert mask.sum() == 20 * 20
    assert ovshapes_render.tight_box(mask) == (40, 30, 60, 50)
    # the same square turned 45°: a diamond of half-diagonal 10·√2 ≈ 14.1 px and area 400
    c, s = np.cos(np.pi / 4) * 10, np.sin(np.pi / 4) * 10
    diamond = square.draw_mask(np.array([[c, -s, 50], [s, c, 50]]), 100, 100)
    assert abs(int(diamond.sum()) - 400) <= 24  # rim pixels cut exactly in half count as inside
    assert ovshapes_render.tight_box(diamond) == (36, 36, 64, 64)  # 50 ± 14.14, pixels at least half inside
    # a ring has a hole at its centre, a circle does not
    ring, circle = (CLASSES[CLASS_NAMES.index(n)] for n in ("ring", "circle"))
    affine = np.array([[20.0, 0, 50], [0, 20, 50]])
    assert ring.draw_mask(affine, 100, 100)[50, 50] == 0
    assert circle.draw_mask(affine, 100, 100)[50, 50] == 1


def test_boxes_are_tight_on_masks(small: Path, val: dict) -> None:
    by_image: dict[int, list[dict]] = {}
    for ann in val["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
        mask = mask_util.decode(ann["segmentation"])
        x, y, w, h = ann["bbox"]
        x1, y1, x2, y2 = int(x), int(y), int(x + w), int(y + h)
        assert (x1, y1, x2, y2) == ovshapes_render.tight_box(mask)
        # every box edge touches a mask pixel, nothing lies outside
        assert mask[y1, x1:x2].any() and mask[y2 - 1, x1:x2].any()
        assert mask[y1:y2, x1].any() and mask[y1:y2, x2 - 1].any()
        assert ann["area"] == mask.sum() and mask[y1:y2, x1:x2].sum() == mask.sum()
        assert np.allclose(mask_util.toBbox(ann["segmentation"]), ann["bbox"])
        assert 8 <= max(w, h) <= 288
    # re-render three images: pixels equal the PNG, masks equal the stored segmentation
    for index, image in enumerate(val["images"][:3]):
        pixels, objects, _ = ovshapes.render_image("small", 0, "val", index)
        png = cv2.imread(str(small / "val" / image["file_name"]), cv2.IMREAD_COLOR)[:, :, ::-1]
        assert np.array_equal(png, pixels)
        anns = by_image[image["id"]]
        assert len(anns) == len(objects)
        for ann, obj in zip(anns, objects, strict=True):
            assert np.array_equal(mask_util.decode(ann["segmentation"]), obj["mask"])
            assert ann["category_id"] == obj["class_id"] + 1 and ann["color"] == obj["colour"]


def test_overlap_is_limited(val: dict) -> None:
    by_image: dict[int, list[list[float]]] = {}
    for ann in val["annotations"]:
        x, y, w, h = ann["bbox"]
        by_image.setdefault(ann["image_id"], []).append([x, y, x + w, y + h])
    for boxes in by_image.values():
        for i in range(len(boxes)):
            for j in range(i):
                assert ovshapes_render.box_iou(boxes[i], boxes[j]) <= 0.3 + 1e-9


def test_train_has_no_novel_box_but_novel_objects(train: dict) -> None:
    novel_ids = {c["id"] for c in train["categories"] if c["split"] == "novel"}
    assert train["annotations"] and not any(a["category_id"] in novel_ids for a in train["annotations"])
    annotated = {a["image_id"] for a in train["annotations"]}
    assert annotated == {im["id"] for im in train["images"]}  # every train image has a base box
    with_novel = 0
    for index in range(len(train["images"])):
        _, objects, _ = ovshapes.render_image("small", 0, "train", index)
        with_novel += any(o["class_id"] + 1 in novel_ids for o in objects)
    assert with_novel / len(train["images"]) >= 0.4


def test_val_has_all_classes(val: dict) -> None:
    assert {a["category_id"] for a in val["annotations"]} == set(range(1, len(CLASSES) + 1))


def test_captions_name_exactly_the_objects(small: Path, train: dict) -> None:
    caps = read_json(small / "annotations" / "captions_train.json")
    assert [im["id"] for im in caps["images"]] == [im["id"] for im in train["images"]]
    by_image: dict[int, list[str]] = {}
    for ann in caps["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann["caption"])
    for index, image in enumerate(train["images"]):
        _, objects, _ = ovshapes.render_image("small", 0, "train", index)
        present = {o["class_id"] for o in objects}
        captions = by_image[image["id"]]
        assert len(captions) == 2
        for caption in captions:
            assert _classes_named(caption) == present, caption
            assert caption == caption.strip() and not re.search(r"[.,;:!?]", caption)
        assert _tags_method_41(" ".join(captions)) == present  # the §4.1 tagger finds every object


def test_class_terms_do_not_collide() -> None:
    for k, patterns in enumerate(_PATTERNS):
        for j, other in enumerate(CLASSES):
            if j != k:
                assert not any(p.search(t) for p in patterns for t in other.terms), (
                    CLASS_NAMES[k],
                    other.name,
                )
    for colour in ovshapes.PALETTE:
        assert not _classes_named(colour)
    assert ovshapes.plural("cross") == "crosses" and ovshapes.plural("lightning bolt") == "lightning bolts"


def test_caption_for() -> None:
    rng = np.random.default_rng(0)
    prompts = [ovshapes.caption_for("crescent", "orange", rng) for _ in range(40)]
    assert all(_classes_named(p) == {CLASS_NAMES.index("crescent")} for p in prompts)
    assert any("moon" in p for p in prompts) and any("orange" in p for p in prompts)
    assert not any(re.search(r"\ba [aeiou]", p) for p in prompts)
    assert all("None" not in ovshapes.caption_for("star", None, rng) for _ in range(20))


def test_catalog_prepares_on_first_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OVD_DATASETS", str(tmp_path))
    try:
        get_dataset("ovshapes_small_train", prepare=False)
    except OVDError:  # the built-in list does not call register_ovshapes yet
        ovshapes.register_ovshapes()
    info = get_dataset("ovshapes_small_train")
    assert info.ann_file_path == tmp_path / "ovshapes/small/annotations/train.json"
    assert info.ann_file_path.is_file() and info.image_root_path.is_dir()
    assert info.resolve(info.extra["captions"]).is_file()
    assert info.class_names == CLASS_NAMES and info.category_ids == tuple(range(1, len(CLASSES) + 1))
    assert {CLASS_NAMES[k] for k in info.novel_classes} == set(DEFAULT_NOVEL)
    assert sorted(info.base_classes + info.novel_classes) == list(range(len(CLASSES)))
    val = get_dataset("ovshapes_small_val")  # already generated: no second generation
    assert val.ann_file_path.is_file()
    assert get_dataset("ovshapes_val", prepare=False).ann_file == "ovshapes/default/annotations/val.json"


def test_complete_folder_is_skipped_and_incomplete_redone(tmp_path: Path) -> None:
    folder = generate_ovshapes(tmp_path, TINY, seed=0)
    train_json = folder / "annotations" / "train.json"
    stamp = train_json.stat().st_mtime_ns
    assert generate_ovshapes(tmp_path, TINY, seed=0) == folder
    assert train_json.stat().st_mtime_ns == stamp
    before = _checksums(folder)
    train_json.unlink()  # as if killed before the last write
    generate_ovshapes(tmp_path, TINY, seed=0)
    assert _checksums(folder) == before
    with pytest.raises(OVDError, match="another OV-Shapes world"):
        generate_ovshapes(tmp_path, TINY, seed=1)
    assert generate_ovshapes(tmp_path, TINY, seed=1, overwrite=True) == folder


def test_custom_novel_split(tmp_path: Path) -> None:
    folder = generate_ovshapes(tmp_path, TINY, seed=0, novel=["circle", "star"])
    train = read_json(folder / "annotations" / "train.json")
    novel = {c["id"] for c in train["categories"] if c["split"] == "novel"}
    assert novel == {CLASS_NAMES.index("circle") + 1, CLASS_NAMES.index("star") + 1}
    assert not any(a["category_id"] in novel for a in train["annotations"])


def test_render_object_crops() -> None:
    images, class_ids, captions = ovshapes.render_object_crops(24, seed=5, size=48)
    assert images.shape == (24, 48, 48, 3) and images.dtype == np.uint8
    assert class_ids.shape == (24,) and class_ids.dtype == np.int64
    assert len(captions) == 24 and len(set(class_ids.tolist())) > 8
    for k, caption in zip(class_ids, captions, strict=True):
        assert _classes_named(caption) == {int(k)}, caption
    again = ovshapes.render_object_crops(24, seed=5, size=48)
    assert np.array_equal(again[0], images) and again[2] == captions
    other = ovshapes.render_object_crops(24, seed=6, size=48)
    assert not np.array_equal(other[0], images)
    assert images.std() > 10  # not blank
    _, only, _ = ovshapes.render_object_crops(8, seed=0, classes=["key", "bell"])
    assert set(only.tolist()) <= {CLASS_NAMES.index("key"), CLASS_NAMES.index("bell")}


def test_bad_input_names_the_valid_choices(tmp_path: Path) -> None:
    with pytest.raises(OVDError, match=r"unknown OV-Shapes preset 'huge' \(valid: default, dev, small\)"):
        generate_ovshapes(tmp_path, "huge")
    with pytest.raises(OVDError, match=r"unknown OV-Shapes class 'dragon' \(valid: circle, square"):
        generate_ovshapes(tmp_path, "small", novel=["star", "dragon"])
    with pytest.raises(OVDError, match="unknown OV-Shapes class 'dragon'"):
        ovshapes.render_object_crops(2, 0, classes=["dragon"])
    with pytest.raises(OVDError, match="unknown OV-Shapes class"):
        ovshapes.caption_for("dragon", "red", np.random.default_rng(0))
    with pytest.raises(OVDError, match="seed must be a non-negative int"):
        generate_ovshapes(tmp_path, "small", seed=-1)
    with pytest.raises(OVDError, match="must stay base"):
        generate_ovshapes(tmp_path, "small", novel=list(CLASS_NAMES))
    with pytest.raises(OVDError, match="objects_per_image"):
        OVShapesPreset("bad", num_train=1, num_val=1, objects_per_image=(3, 2))
    assert not (tmp_path / "ovshapes").exists()  # nothing was written


def test_dev_split_is_another_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``ovshapes_dev`` (for choosing recipes) is the val split of a world drawn with another seed, so
    it shares no image with ``ovshapes_val``; generation is stubbed to the small preset's sizes."""
    monkeypatch.setenv("OVD_DATASETS", str(tmp_path))
    monkeypatch.setitem(ovshapes.PRESETS, "dev", OVShapesPreset("dev", num_train=1, num_val=6))
    monkeypatch.setitem(ovshapes.PRESETS, "default", OVShapesPreset("default", num_train=2, num_val=6))
    ovshapes.register_ovshapes()
    dev, val = get_dataset("ovshapes_dev"), get_dataset("ovshapes_val")
    assert dev.ann_file_path == tmp_path / "ovshapes/dev/annotations/val.json"
    assert read_json(dev.ann_file_path)["info"]["seed"] == ovshapes.DEV_SEED != 0
    assert dev.class_names == val.class_names and dev.novel_classes == val.novel_classes
    dev_images = {p.read_bytes() for p in dev.image_root_path.glob("*.png")}
    val_images = {p.read_bytes() for p in val.image_root_path.glob("*.png")}
    assert len(dev_images) == 6 and not dev_images & val_images
