"""Pseudo boxes for image-level labels (METHOD §4.2): CLIP-scored proposals, file boxes, the JSON."""

import json
import pickle

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from ovd.data.catalog import DatasetInfo
from ovd.data.coco import load_coco_json
from ovd.distill.store import RegionStore, write_region_store
from ovd.errors import OVDError
from ovd.pis import ClipScoredProposals, FileBoxes, generate_pseudo_labels, pseudo_label_json
from ovd.structures import ImageRecord

# three classes along the axes of a 3-d embedding space
TEXT = torch.eye(3)


def _store(tmp_path):
    boxes = np.array([[[0, 0, 10, 10], [5, 5, 30, 40], [1, 2, 3, 4]], [[0, 0, 8, 8], [0, 0, 0, 0], [0, 0, 0, 0]]])
    emb = np.array(
        [
            [[1.0, 0.1, 0.0], [0.2, 1.0, 0.9], [0.0, 0.0, 1.0]],  # image 7: class 0, 1 (and 2), 2
            [[0.6, 0.8, 0.0], [0, 0, 0], [0, 0, 0]],  # image 8: ambiguous between 0 and 1
        ]
    )
    emb = emb / np.maximum(np.linalg.norm(emb, axis=2, keepdims=True), 1e-9)
    valid = np.array([[True, True, True], [True, False, False]])
    write_region_store(tmp_path / "store", image_ids=np.array([7, 8]), boxes=boxes.astype(np.float32),
                       embeddings=emb, valid=valid, metadata={"dataset": "toy"})  # fmt: skip
    return RegionStore.open(tmp_path / "store")


def _rec(image_id, labels):
    return ImageRecord(image_id, f"/img/{image_id}.png", 50, 60, pos_labels=np.array(labels, dtype=np.int64))


def test_argmax_and_threshold_by_hand(tmp_path):
    store = _store(tmp_path)
    cos = ClipScoredProposals(store, TEXT, score="cosine", threshold=0.5)
    out = cos(_rec(7, [0, 1, 2]))
    assert sorted(out) == [0, 1, 2]
    np.testing.assert_array_equal(out[0][0], [0, 0, 10, 10])
    np.testing.assert_array_equal(out[1][0], [5, 5, 30, 40])
    np.testing.assert_array_equal(out[2][0], [1, 2, 3, 4])  # cos 1.0 beats region 1's 0.67
    assert out[0][1] == pytest.approx(1 / np.sqrt(1.01), rel=1e-3)
    # image 8's only region: cosine 0.6 with class 0, 0.8 with class 1
    assert sorted(ClipScoredProposals(store, TEXT, score="cosine", threshold=0.7)(_rec(8, [0, 1]))) == [1]
    soft = ClipScoredProposals(store, TEXT, score="softmax", threshold=0.5, logit_scale=10.0)
    p = torch.softmax(10.0 * torch.tensor([0.6, 0.8, 0.0]), 0)
    assert soft(_rec(8, [0, 1]))[1][1] == pytest.approx(float(p[1]), rel=1e-3)
    assert 0 not in soft(_rec(8, [0, 1]))  # it looks more like class 1
    assert soft(_rec(8, [])) == {}


def test_missing_image_and_dim_mismatch(tmp_path):
    store = _store(tmp_path)
    with pytest.raises(OVDError, match="no stored regions"):
        ClipScoredProposals(store, TEXT)(_rec(99, [0]))
    with pytest.raises(OVDError, match="do not match"):
        ClipScoredProposals(store, torch.eye(4))
    with pytest.raises(OVDError, match="unknown score"):
        ClipScoredProposals(store, TEXT, score="max")


def test_json_loads_in_pycocotools_and_round_trips(tmp_path):
    recs = [_rec(7, [0, 2]), _rec(8, [1])]
    found = [{0: (np.array([1, 2, 11, 22], np.float32), 0.9), 2: (np.array([0, 0, 70, 5], np.float32), 0.8)}, {}]
    cats = [{"id": 10, "name": "a"}, {"id": 20, "name": "b"}, {"id": 30, "name": "c"}]
    data = pseudo_label_json(recs, found, cats, [10, 20, 30], "/img")
    assert [im["id"] for im in data["images"]] == [7]  # image 8 got no box: dropped
    assert data["images"][0]["pos_category_ids"] == [10, 30]
    assert data["annotations"][0]["bbox"] == [1.0, 2.0, 10.0, 20.0]  # xywh
    assert data["annotations"][1]["bbox"] == [0.0, 0.0, 60.0, 5.0]  # clipped to the 60-px width
    path = tmp_path / "pseudo.json"
    path.write_text(json.dumps(data))
    coco = COCO(str(path))
    assert len(coco.getAnnIds(imgIds=[7])) == 2
    (rec,) = load_coco_json(path, "/img", [10, 20, 30], ann_type="pseudo")
    np.testing.assert_allclose(rec.boxes, [[1, 2, 11, 22], [0, 0, 60, 5]])
    assert rec.labels.tolist() == [0, 2] and rec.pos_labels.tolist() == [0, 2] and rec.ann_type == "pseudo"


def test_pseudo_json_with_a_box_outside_its_labels_is_rejected(tmp_path):
    data = {"images": [{"id": 1, "file_name": "a.png", "height": 10, "width": 10, "pos_category_ids": [1]}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [0, 0, 5, 5]}],
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}  # fmt: skip
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(OVDError, match="not among its pos_category_ids"):
        load_coco_json(path, "/img", [1, 2], ann_type="pseudo")


def test_file_boxes_pickles_and_results(tmp_path):
    folder = tmp_path / "mavl"
    folder.mkdir()
    with open(folder / "7.pkl", "wb") as f:
        pickle.dump({10: ([[1, 1, 5, 5]], [0.97]), 30: ([[2, 2, 9, 9]], [0.5]), "salient": ([[0, 0, 1, 1]], [1.0])}, f)
    src = FileBoxes(folder, [10, 20, 30], threshold=0.95)
    out = src(_rec(7, [0, 2]))
    assert list(out) == [0] and out[0][1] == pytest.approx(0.97)
    with pytest.raises(OVDError, match="no pseudo-box file"):
        src(_rec(8, [0]))
    results = tmp_path / "dets.json"
    results.write_text(json.dumps([
        {"image_id": 7, "category_id": 20, "bbox": [0, 0, 4, 4], "score": 0.96},
        {"image_id": 7, "category_id": 20, "bbox": [1, 1, 4, 4], "score": 0.99},
    ]))  # fmt: skip
    out = FileBoxes(results, [10, 20, 30])(_rec(7, [1]))
    np.testing.assert_array_equal(out[1][0], [1, 1, 5, 5])
    with pytest.raises(OVDError, match="not found"):
        FileBoxes(tmp_path / "none", [10])


def test_generate_pseudo_labels_end_to_end(tmp_path):
    store = _store(tmp_path)
    tags = {"images": [{"id": 7, "file_name": "7.png", "height": 50, "width": 60, "pos_category_ids": [10, 30]},
                       {"id": 8, "file_name": "8.png", "height": 50, "width": 60, "pos_category_ids": [10]}],
            "annotations": [],
            "categories": [{"id": 10, "name": "a"}, {"id": 20, "name": "b"}, {"id": 30, "name": "c"}]}  # fmt: skip
    (tmp_path / "tags.json").write_text(json.dumps(tags))
    info = DatasetInfo(
        "toy", str(tmp_path), str(tmp_path / "tags.json"), ("a", "b", "c"), (10, 20, 30), ann_type="image"
    )
    stats = generate_pseudo_labels(info, ClipScoredProposals(store, TEXT, score="cosine", threshold=0.7),
                                   tmp_path / "out.json", progress=False)  # fmt: skip
    assert stats["images"] == 1 and stats["boxes"] == 2 and stats["per_class"] == {"a": 1, "b": 0, "c": 1}
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["images"][0]["file_name"] == "7.png"
