"""Loading pseudo-label JSONs: ``load_coco_json(..., ann_type="pseudo")`` (PIS, METHOD §4.2-4.3)."""

import json

import numpy as np
import pytest
from pycocotools.coco import COCO

from ovd.data.coco import ANN_TYPES, load_coco_json
from ovd.errors import OVDError
from ovd.pis import pseudo_label_json
from ovd.structures import ImageRecord

CATS = [{"id": 10, "name": "a"}, {"id": 20, "name": "b"}, {"id": 30, "name": "c"}]
IDS = [10, 20, 30]


def _file(tmp_path, data, name="pseudo.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _data():
    return {
        "images": [
            {"id": 1, "file_name": "1.png", "height": 40, "width": 50, "pos_category_ids": [30, 10]},
            {"id": 2, "file_name": "2.png", "height": 40, "width": 50, "pos_category_ids": [20]},  # no box
            {"id": 3, "file_name": "3.png", "height": 40, "width": 50, "pos_category_ids": []},  # no label
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 10, "bbox": [2, 3, 4, 5], "score": 0.9, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 30, "bbox": [40, 30, 20, 20], "score": 0.8, "iscrowd": 0},
        ],
        "categories": CATS,
    }


def test_pseudo_records_by_hand(tmp_path):
    assert "pseudo" in ANN_TYPES
    recs = load_coco_json(_file(tmp_path, _data()), tmp_path / "img", IDS, ann_type="pseudo")
    assert [r.image_id for r in recs] == [1, 2]  # image 3 has no label: dropped
    a, b = recs
    assert a.ann_type == "pseudo" and a.file_name == str((tmp_path / "img" / "1.png").resolve())
    # xywh (2, 3, 4, 5) → xyxy (2, 3, 6, 8); (40, 30, 20, 20) → (40, 30, 60, 50), clipped to the 50×40 image
    np.testing.assert_array_equal(a.boxes, np.array([[2, 3, 6, 8], [40, 30, 50, 40]], np.float32))
    assert a.boxes.dtype == np.float32 and a.labels.tolist() == [0, 2]
    assert a.pos_labels.tolist() == [2, 0]  # contiguous ids of pos_category_ids, in the file's order
    assert b.boxes.shape == (0, 4) and b.labels.tolist() == [] and b.pos_labels.tolist() == [1]  # no box: kept


def test_box_and_image_types_read_the_same_file_as_before(tmp_path):
    path = _file(tmp_path, _data())
    image = load_coco_json(path, tmp_path, IDS, ann_type="image")
    assert [(r.image_id, r.pos_labels.tolist(), len(r.boxes)) for r in image] == [(1, [2, 0], 0), (2, [1], 0)]
    assert all(r.ann_type == "image" for r in image)
    box = load_coco_json(path, tmp_path, IDS, ann_type="box")
    assert [len(r.boxes) for r in box] == [2, 0, 0] and box[0].pos_labels.tolist() == []


def test_round_trip_from_pseudo_label_json(tmp_path):
    rec = ImageRecord(7, str(tmp_path / "img" / "7.png"), 50, 60, pos_labels=np.array([0, 1, 2]))
    found = {0: (np.array([1.5, 2.0, 11.5, 22.0], np.float32), 0.91), 2: (np.array([-3, 4, 30, 45], np.float32), 0.7)}
    path = _file(tmp_path, pseudo_label_json([rec], [found], CATS, IDS, tmp_path / "img"))
    coco = COCO(str(path))
    bboxes = [a["bbox"] for a in coco.loadAnns(coco.getAnnIds(imgIds=[7]))]
    assert bboxes == [[1.5, 2.0, 10.0, 20.0], [0.0, 4.0, 30.0, 41.0]]  # xywh, clipped to the 60×50 image
    (back,) = load_coco_json(path, tmp_path / "img", IDS, ann_type="pseudo")
    assert back.image_id == 7 and back.file_name == rec.file_name
    np.testing.assert_allclose(back.boxes, [[1.5, 2.0, 11.5, 22.0], [0.0, 4.0, 30.0, 45.0]])  # x1 clipped at 0
    assert back.labels.tolist() == [0, 2] and back.pos_labels.tolist() == [0, 2]  # label 1 got no box


def test_empty_pseudo_file(tmp_path):
    path = _file(tmp_path, pseudo_label_json([], [], CATS, IDS, tmp_path))
    assert load_coco_json(path, tmp_path, IDS, ann_type="pseudo") == []
    assert COCO(str(path)).getImgIds() == []


def test_a_box_outside_the_images_labels_is_rejected(tmp_path):
    data = _data()
    data["annotations"][0]["image_id"] = 2
    with pytest.raises(OVDError, match=r"pseudo.json: images\[id=2\]: pseudo boxes of classes \[0\]"):
        load_coco_json(_file(tmp_path, data), tmp_path, IDS, ann_type="pseudo")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d["annotations"][1].update(bbox=[1, 2, 3]), r"annotations\[1\]\.bbox: expected 4 numbers, got 3"),
        (lambda d: d["annotations"][0].update(image_id=9), r"annotations\[0\]\.image_id: 9 is not in images"),
        (lambda d: d["images"][1].update(pos_category_ids=[99]), r"images\[1\]\.pos_category_ids\[0\]: 99"),
        (lambda d: d.pop("annotations"), "<top level>: missing key 'annotations'"),
        (lambda d: [img.pop("pos_category_ids") for img in d["images"]], "no image has 'pos_category_ids'"),
    ],
)
def test_malformed_pseudo_files(tmp_path, edit, match):
    data = _data()
    edit(data)
    with pytest.raises(OVDError, match=match) as e:
        load_coco_json(_file(tmp_path, data), tmp_path, IDS, ann_type="pseudo")
    assert "pseudo.json" in str(e.value)


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(OVDError, match="none.json: file not found"):
        load_coco_json(tmp_path / "none.json", tmp_path, IDS, ann_type="pseudo")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(OVDError, match="bad.json: malformed JSON"):
        load_coco_json(tmp_path / "bad.json", tmp_path, IDS, ann_type="pseudo")
