"""COCO-format loading: exact box conversion, id mapping, and one clear error per malformed field."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ovd.data.catalog import DatasetInfo
from ovd.data.coco import category_image_counts, category_instance_counts, load_coco_json, load_dataset
from ovd.errors import OVDError
from ovd.structures import ImageRecord

# Vocabulary: dataset id 9 -> contiguous 0, 2 -> 1, 5 -> 2 (position in the tuple, not sorted).
VOCAB = (9, 2, 5)

BOX_JSON: dict[str, Any] = {
    "images": [
        {"id": 1, "file_name": "a.jpg", "height": 480, "width": 640},
        {"id": 2, "file_name": "sub/b.jpg", "height": 100, "width": 200},
        {"id": 3, "file_name": "c.jpg", "height": 50, "width": 50},
    ],
    "annotations": [
        {"id": 10, "image_id": 1, "category_id": 5, "bbox": [10, 20, 30, 40], "iscrowd": 0},
        {"id": 11, "image_id": 1, "category_id": 9, "bbox": [0.5, 1.25, 2.5, 3.75]},
        # crowd: skipped, even though its box overflows the image
        {"id": 12, "image_id": 2, "category_id": 5, "bbox": [100, 0, 150, 100], "iscrowd": 1},
        # extends past the right/bottom border: clipped to the image
        {"id": 13, "image_id": 2, "category_id": 9, "bbox": [190, 90, 20, 20]},
        {"id": 14, "image_id": 1, "category_id": 9, "bbox": [100, 100, 1, 1]},
    ],
    "categories": [{"id": 5, "name": "five"}, {"id": 9, "name": "nine"}],
}

IMAGE_JSON: dict[str, Any] = {
    "images": [
        {"id": 1, "file_name": "a.jpg", "height": 480, "width": 640, "pos_category_ids": [5, 9, 5]},
        {"id": 2, "file_name": "b.jpg", "height": 100, "width": 200, "pos_category_ids": []},
        {"id": 3, "file_name": "c.jpg", "height": 50, "width": 50},
        {"id": 4, "file_name": "d.jpg", "height": 50, "width": 60, "pos_category_ids": [2]},
    ],
    "annotations": [{"id": 1, "image_id": 1, "caption": "a cat"}],
    "categories": [{"id": 2}, {"id": 5}, {"id": 9}],
}


def _write(tmp_path: Path, data: Any, name: str = "ann.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_box_records_exact_values(tmp_path: Path) -> None:
    ann = _write(tmp_path, BOX_JSON)
    recs = load_coco_json(ann, tmp_path / "images", VOCAB)
    assert [r.image_id for r in recs] == [1, 2, 3]  # image without boxes is kept
    r1, r2, r3 = recs
    assert r1.file_name == os.path.abspath(tmp_path / "images" / "a.jpg")
    assert r2.file_name == os.path.abspath(tmp_path / "images" / "sub" / "b.jpg")
    assert (r1.height, r1.width) == (480, 640)
    # xywh [10,20,30,40] -> xyxy [10,20,40,60]; [0.5,1.25,2.5,3.75] -> [0.5,1.25,3,5]
    expected = np.array([[10, 20, 40, 60], [0.5, 1.25, 3, 5], [100, 100, 101, 101]], dtype=np.float32)
    assert r1.boxes.dtype == np.float32 and r1.labels.dtype == np.int64
    np.testing.assert_array_equal(r1.boxes, expected)
    np.testing.assert_array_equal(r1.labels, [2, 0, 0])  # 5 -> 2, 9 -> 0
    # crowd skipped; [190,90,20,20] -> [190,90,210,110] clipped to the 200x100 image
    np.testing.assert_array_equal(r2.boxes, [[190, 90, 200, 100]])
    np.testing.assert_array_equal(r2.labels, [0])
    assert r3.boxes.shape == (0, 4) and r3.labels.shape == (0,)
    assert all(r.ann_type == "box" and r.pos_labels.shape == (0,) for r in recs)


def test_filter_empty(tmp_path: Path) -> None:
    recs = load_coco_json(_write(tmp_path, BOX_JSON), tmp_path, VOCAB, filter_empty=True)
    assert [r.image_id for r in recs] == [1, 2]


def test_image_label_records(tmp_path: Path) -> None:
    recs = load_coco_json(_write(tmp_path, IMAGE_JSON), tmp_path, VOCAB, ann_type="image")
    # images 2 (empty list) and 3 (no key) are dropped
    assert [r.image_id for r in recs] == [1, 4]
    np.testing.assert_array_equal(recs[0].pos_labels, [2, 0])  # [5, 9, 5] -> deduplicated [2, 0]
    np.testing.assert_array_equal(recs[1].pos_labels, [1])
    assert recs[0].pos_labels.dtype == np.int64
    assert all(r.ann_type == "image" and r.boxes.shape == (0, 4) for r in recs)


def test_image_type_on_box_file_is_an_error(tmp_path: Path) -> None:
    ann = _write(tmp_path, BOX_JSON)
    with pytest.raises(OVDError, match="pos_category_ids") as e:
        load_coco_json(ann, tmp_path, VOCAB, ann_type="image")
    assert str(ann) in str(e.value)


def test_empty_file_lists(tmp_path: Path) -> None:
    ann = _write(tmp_path, {"images": [], "annotations": [], "categories": []})
    assert load_coco_json(ann, tmp_path, VOCAB) == []
    assert load_coco_json(ann, tmp_path, VOCAB, ann_type="image") == []


def test_no_categories_key_checks_against_vocabulary(tmp_path: Path) -> None:
    data = copy.deepcopy(BOX_JSON)
    del data["categories"]
    assert len(load_coco_json(_write(tmp_path, data), tmp_path, VOCAB)) == 3
    data["annotations"][0]["category_id"] = 7
    with pytest.raises(OVDError, match=r"annotations\[0\]\.category_id: 7 is not in the dataset's vocabulary"):
        load_coco_json(_write(tmp_path, data), tmp_path, VOCAB)


def test_load_dataset_uses_info(tmp_path: Path) -> None:
    ann = _write(tmp_path, IMAGE_JSON)
    info = DatasetInfo(
        name="tiny_tags",
        image_root=str(tmp_path / "imgs"),
        ann_file=str(ann),
        class_names=("nine", "two", "five"),
        category_ids=VOCAB,
        ann_type="image",
    )
    recs = load_dataset(info)
    assert [r.image_id for r in recs] == [1, 4]
    assert recs[0].file_name == os.path.abspath(tmp_path / "imgs" / "a.jpg")


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(d: dict[str, Any]) -> None:
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value

    return edit


def _delete(path: list[Any]) -> Callable[[dict[str, Any]], None]:
    def edit(d: dict[str, Any]) -> None:
        for k in path[:-1]:
            d = d[k]
        del d[path[-1]]

    return edit


MALFORMED = [
    # (edit, ann_type, expected message fragment: "field: reason")
    (_delete(["images"]), "box", "missing key 'images'"),
    (_delete(["annotations"]), "box", "missing key 'annotations'"),
    (_set(["images"], {"a": 1}), "box", "images: expected a list, got dict"),
    (_delete(["images", 1, "file_name"]), "box", "images[1]: missing key 'file_name'"),
    (_delete(["images", 2, "id"]), "box", "images[2]: missing key 'id'"),
    (_set(["images", 0, "height"], 0), "box", "images[0].height: expected a positive integer, got 0"),
    (_set(["images", 0, "width"], "640"), "box", "images[0].width: expected a positive integer"),
    (_set(["images", 2, "id"], 1), "box", "images[2].id: duplicate image id 1"),
    (_set(["images", 0, "file_name"], ""), "box", "images[0].file_name: expected a non-empty string"),
    (_set(["annotations", 4, "bbox"], [1, 2, 3]), "box", "annotations[4].bbox: expected 4 numbers, got 3"),
    (_set(["annotations", 1, "bbox"], "1 2 3 4"), "box", "annotations[1].bbox: expected 4 numbers, got str"),
    (_set(["annotations", 1, "bbox"], [1, 2, "3", 4]), "box", "annotations[1].bbox: expected 4 numbers"),
    (
        _set(["annotations", 0, "bbox"], [1, 2, 0, 5]),
        "box",
        "annotations[0].bbox: non-positive size (w=0, h=5)",
    ),
    (
        _set(["annotations", 0, "bbox"], [1, 2, 3, -1]),
        "box",
        "annotations[0].bbox: non-positive size (w=3, h=-1)",
    ),
    (
        _set(["annotations", 0, "bbox"], [700, 2, 3, 4]),
        "box",
        "annotations[0].bbox: box [700, 2, 3, 4] lies outside",
    ),
    (
        _set(["annotations", 3, "category_id"], 999),
        "box",
        "annotations[3].category_id: 999 is not in categories",
    ),
    # 2 is in the vocabulary but not in this file's categories
    (_set(["annotations", 3, "category_id"], 2), "box", "annotations[3].category_id: 2 is not in categories"),
    (_set(["annotations", 1, "image_id"], 55), "box", "annotations[1].image_id: 55 is not in images"),
    (_delete(["annotations", 0, "bbox"]), "box", "annotations[0]: missing key 'bbox'"),
    (_set(["annotations", 2], [1, 2]), "box", "annotations[2]: expected an object, got list"),
    (_set(["categories", 1, "id"], 7), "box", "categories[1].id: 7 is not in the dataset's vocabulary"),
    (_delete(["categories", 0, "id"]), "box", "categories[0]: missing key 'id'"),
    (
        _set(["images", 0, "pos_category_ids"], [5, 999]),
        "image",
        "images[0].pos_category_ids[1]: 999 is not in",
    ),
    (_set(["images", 0, "pos_category_ids"], 5), "image", "images[0].pos_category_ids: expected a list"),
]


@pytest.mark.parametrize(("edit", "ann_type", "fragment"), MALFORMED)
def test_malformed_input_names_file_and_field(
    tmp_path: Path, edit: Callable[[dict[str, Any]], None], ann_type: str, fragment: str
) -> None:
    data = copy.deepcopy(BOX_JSON if ann_type == "box" else IMAGE_JSON)
    edit(data)
    ann = _write(tmp_path, data)
    with pytest.raises(OVDError) as e:
        load_coco_json(ann, tmp_path, VOCAB, ann_type=ann_type)
    msg = str(e.value)
    assert msg.startswith(f"{ann}: "), msg
    assert fragment in msg, msg


def test_top_level_not_an_object(tmp_path: Path) -> None:
    ann = _write(tmp_path, [1, 2])
    with pytest.raises(OVDError, match="expected a JSON object") as e:
        load_coco_json(ann, tmp_path, VOCAB)
    assert str(ann) in str(e.value)


def test_malformed_json_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(OVDError, match="malformed JSON") as e:
        load_coco_json(bad, tmp_path, VOCAB)
    assert str(bad) in str(e.value)
    with pytest.raises(OVDError, match="file not found") as e:
        load_coco_json(tmp_path / "nope.json", tmp_path, VOCAB)
    assert "nope.json" in str(e.value)


def test_bad_ann_type_and_duplicate_vocabulary(tmp_path: Path) -> None:
    ann = _write(tmp_path, BOX_JSON)
    with pytest.raises(OVDError, match="ann_type"):
        load_coco_json(ann, tmp_path, VOCAB, ann_type="mask")
    with pytest.raises(OVDError, match="appears twice"):
        load_coco_json(ann, tmp_path, (9, 5, 9))


def _rec(labels: list[int]) -> ImageRecord:
    n = len(labels)
    return ImageRecord(
        image_id=0,
        file_name="x.jpg",
        height=10,
        width=10,
        boxes=np.tile(np.array([[0, 0, 5, 5]], dtype=np.float32), (n, 1)),
        labels=np.array(labels, dtype=np.int64),
    )


def test_category_counts_hand_case() -> None:
    recs = [_rec([0, 0, 2]), _rec([2]), _rec([]), _rec([0, 3])]
    # images containing class c: c0 in images 0,3; c1 nowhere; c2 in 0,1; c3 in 3
    np.testing.assert_array_equal(category_image_counts(recs, 4), [2, 0, 2, 1])
    # boxes per class: c0: 2+1, c2: 1+1, c3: 1
    np.testing.assert_array_equal(category_instance_counts(recs, 4), [3, 0, 2, 1])
    assert category_image_counts(recs, 4).dtype == np.int64
    np.testing.assert_array_equal(category_image_counts([], 3), [0, 0, 0])
    np.testing.assert_array_equal(category_instance_counts([], 3), [0, 0, 0])


def test_category_counts_from_loaded_file(tmp_path: Path) -> None:
    recs = load_coco_json(_write(tmp_path, BOX_JSON), tmp_path, VOCAB)
    # image 1: labels [2, 0, 0]; image 2: [0]; image 3: none
    np.testing.assert_array_equal(category_image_counts(recs, 3), [2, 0, 1])
    np.testing.assert_array_equal(category_instance_counts(recs, 3), [3, 0, 1])


def test_category_counts_label_out_of_range() -> None:
    with pytest.raises(OVDError, match="label 3 outside 0..2"):
        category_image_counts([_rec([3])], 3)
    with pytest.raises(OVDError, match="label -1 outside"):
        category_instance_counts([_rec([-1])], 3)


def test_fast_and_checked_box_readers_agree(tmp_path: Path) -> None:
    # Well-formed files take a vectorised path; the entry-by-entry path (used to report errors)
    # must read them identically.
    from ovd.data import coco

    images = [
        {"image_id": img["id"], "file_name": img["file_name"], "height": img["height"], "width": img["width"]}
        for img in BOX_JSON["images"]
    ]
    position = {img["image_id"]: i for i, img in enumerate(images)}
    vocab = {cid: i for i, cid in enumerate(VOCAB)}
    chk = coco._Checker(tmp_path / "x.json")
    for file_cats in ({5, 9}, None):
        fast = coco._read_boxes_fast(BOX_JSON["annotations"], images, vocab, file_cats)
        slow = coco._read_boxes_checked(BOX_JSON["annotations"], images, position, vocab, file_cats, chk)
        assert fast is not None
        for a, b in zip(fast, slow, strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(fast.image_pos, [0, 0, 1, 0])
        np.testing.assert_array_equal(fast.labels, [2, 0, 0, 0])
    bad = copy.deepcopy(BOX_JSON["annotations"])
    bad[0]["bbox"] = [1, 2, 0, 5]
    assert coco._read_boxes_fast(bad, images, vocab, None) is None
