"""Pseudo boxes for image-level labels (METHOD §4.2): CLIP-scored proposals, file boxes, the JSON."""

import json
import math
import pickle

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from ovd.data.catalog import DatasetInfo
from ovd.distill.store import RegionStore, write_region_store
from ovd.errors import OVDError
from ovd.pis import ClipScoredProposals, FileBoxes, generate_pseudo_labels, image_label_info, pseudo_label_json
from ovd.structures import ImageRecord

# three classes along the axes of a 3-d embedding space: cos(region, class c) = region's unit vector [c]
TEXT = torch.eye(3)


def _store(tmp_path):
    boxes = np.array(
        [
            [[0, 0, 10, 10], [5, 5, 30, 40], [1, 2, 3, 4]],
            [[0, 0, 8, 8], [0, 0, 50, 50], [0, 0, 0, 0]],
            [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
        ]
    )
    emb = np.array(
        [
            [[1.0, 0.1, 0.0], [0.2, 1.0, 0.9], [0.0, 0.0, 1.0]],  # image 7: best for class 0, 1, 2
            [[0.6, 0.8, 0.0], [1.0, 0, 0], [0, 0, 0]],  # image 8: one region, between 0 and 1; row 1 is padding
            [[0, 0, 0], [0, 0, 0], [0, 0, 0]],  # image 9: no region
        ]
    )
    emb = emb / np.maximum(np.linalg.norm(emb, axis=2, keepdims=True), 1e-9)
    valid = np.array([[True, True, True], [True, False, False], [False, False, False]])
    write_region_store(tmp_path / "store", image_ids=np.array([7, 8, 9]), boxes=boxes.astype(np.float32),
                       embeddings=emb, valid=valid, metadata={"dataset": "toy"})  # fmt: skip
    return RegionStore.open(tmp_path / "store")


def _rec(image_id, labels, file_name=None):
    return ImageRecord(image_id, file_name or f"/img/{image_id}.png", 50, 60, pos_labels=np.array(labels, np.int64))


def test_cosine_argmax_by_hand(tmp_path):
    store = _store(tmp_path)
    out = ClipScoredProposals(store, TEXT, score="cosine", threshold=0.5)(_rec(7, [0, 1, 2]))
    # unit regions of image 7: r0 = (1, .1, 0)/√1.01, r1 = (.2, 1, .9)/√1.85, r2 = (0, 0, 1)
    # class 0: r0 .995 > r1 .147; class 1: r1 .735 > r0 .0995; class 2: r2 1.0 > r1 .662
    assert sorted(out) == [0, 1, 2]
    np.testing.assert_array_equal(out[0][0], [0, 0, 10, 10])
    np.testing.assert_array_equal(out[1][0], [5, 5, 30, 40])
    np.testing.assert_array_equal(out[2][0], [1, 2, 3, 4])
    assert out[0][1] == pytest.approx(1 / math.sqrt(1.01), rel=1e-3)
    assert out[1][1] == pytest.approx(1 / math.sqrt(1.85), rel=1e-3)
    assert out[0][0].dtype == np.float32
    # only the labels of the record are looked at
    assert sorted(ClipScoredProposals(store, TEXT, score="cosine", threshold=0.5)(_rec(7, [1]))) == [1]


def test_threshold_is_strict(tmp_path):
    store = _store(tmp_path)
    # image 8's only valid region has cosine .6 with class 0 and .8 with class 1
    assert sorted(ClipScoredProposals(store, TEXT, score="cosine", threshold=0.7)(_rec(8, [0, 1]))) == [1]
    assert ClipScoredProposals(store, TEXT, score="cosine", threshold=0.9)(_rec(8, [0, 1])) == {}
    # class 2 on image 7: r2 = (0, 0, 1) has cosine exactly 1 (exact in float16): kept above .999, not above 1
    assert 2 in ClipScoredProposals(store, TEXT, score="cosine", threshold=0.999)(_rec(7, [2]))
    assert ClipScoredProposals(store, TEXT, score="cosine", threshold=1.0)(_rec(7, [2])) == {}


def test_padded_rows_never_win(tmp_path):
    store = _store(tmp_path)
    # image 8's padding row 1 holds (1, 0, 0), a perfect class-0 match; it is not valid so it is never used
    out = ClipScoredProposals(store, TEXT, score="cosine", threshold=0.0)(_rec(8, [0]))
    np.testing.assert_array_equal(out[0][0], [0, 0, 8, 8])
    assert out[0][1] == pytest.approx(0.6, rel=1e-3)


def test_softmax_over_the_vocabulary_by_hand(tmp_path):
    store = _store(tmp_path)
    soft = ClipScoredProposals(store, TEXT, score="softmax", threshold=0.5, logit_scale=10.0)
    # image 8: logits 10 · (.6, .8, 0) = (6, 8, 0) → p1 = 1 / (1 + e^-2 + e^-8) = .88055, p0 = e^-2 · p1 = .11917
    # (abs 1e-3: the store keeps float16 embeddings, the ×10 scale magnifies their rounding)
    out = soft(_rec(8, [0, 1]))
    assert list(out) == [1]  # the region looks more like class 1, so class 0 loses it
    assert out[1][1] == pytest.approx(1 / (1 + math.exp(-2) + math.exp(-8)), abs=1e-3)
    low = ClipScoredProposals(store, TEXT, score="softmax", threshold=0.1, logit_scale=10.0)(_rec(8, [0]))
    assert low[0][1] == pytest.approx(math.exp(-2) / (1 + math.exp(-2) + math.exp(-8)), abs=1e-3)
    np.testing.assert_allclose(
        soft.scores(np.array([[0.6, 0.8, 0.0]])).numpy(), torch.softmax(torch.tensor([[6.0, 8.0, 0.0]]), 1).numpy()
    )


def test_empty_inputs(tmp_path):
    store = _store(tmp_path)
    src = ClipScoredProposals(store, TEXT)
    assert src(_rec(8, [])) == {}  # no labels
    assert src(_rec(9, [0, 1])) == {}  # no stored region
    src.check([])
    data = pseudo_label_json([], [], [{"id": 1, "name": "a"}], [1], "/img")
    assert data == {"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}


def test_clip_source_bad_inputs(tmp_path):
    store = _store(tmp_path)
    with pytest.raises(OVDError, match="store: image 99 has no stored regions"):
        ClipScoredProposals(store, TEXT)(_rec(99, [0]))
    with pytest.raises(OVDError, match=r"1 of 2 images have no stored regions \(e\.g\. image ids \[99\]\)"):
        ClipScoredProposals(store, TEXT).check([_rec(7, [0]), _rec(99, [0])])
    with pytest.raises(OVDError, match=r"label outside 0\.\.2"):
        ClipScoredProposals(store, TEXT).check([_rec(7, [3])])
    with pytest.raises(OVDError, match="class_embeddings: .* do not match the store's dim 3"):
        ClipScoredProposals(store, torch.eye(4))
    with pytest.raises(OVDError, match="unknown score 'max'"):
        ClipScoredProposals(store, TEXT, score="max")
    with pytest.raises(OVDError, match="none"):
        ClipScoredProposals(tmp_path / "none", TEXT)


def test_pseudo_label_json_format_and_pycocotools(tmp_path):
    recs = [_rec(7, [0, 2]), _rec(8, [1]), _rec(9, [1])]
    found = [
        {0: (np.array([1, 2, 11, 22], np.float32), 0.9), 2: (np.array([0, 0, 70, 5], np.float32), 0.8)},
        {},  # no label got a box: the image is dropped
        {1: (np.array([5, 5, 5.5, 30], np.float32), 0.9)},  # 0.5 px wide: rejected, so image 9 is dropped too
    ]
    cats = [{"id": 10, "name": "a"}, {"id": 20, "name": "b"}, {"id": 30, "name": "c"}]
    data = pseudo_label_json(recs, found, cats, [10, 20, 30], "/img")
    assert data["images"] == [{"id": 7, "file_name": "7.png", "height": 50, "width": 60, "pos_category_ids": [10, 30]}]
    # xyxy (1, 2, 11, 22) → xywh (1, 2, 10, 20), area 200; (0, 0, 70, 5) is clipped to the 60-px width
    assert data["annotations"] == [
        {"id": 1, "image_id": 7, "category_id": 10, "bbox": [1.0, 2.0, 10.0, 20.0], "area": 200.0, "score": 0.9,
         "iscrowd": 0},
        {"id": 2, "image_id": 7, "category_id": 30, "bbox": [0.0, 0.0, 60.0, 5.0], "area": 300.0, "score": 0.8,
         "iscrowd": 0},
    ]  # fmt: skip
    assert data["categories"] == cats
    path = tmp_path / "pseudo.json"
    path.write_text(json.dumps(data))
    coco = COCO(str(path))
    assert coco.getAnnIds(imgIds=[7]) == [1, 2] and coco.loadAnns([2])[0]["bbox"] == [0.0, 0.0, 60.0, 5.0]
    assert coco.getCatIds() == [10, 20, 30]


def test_file_boxes_from_pickles(tmp_path):
    folder = tmp_path / "mavl"
    folder.mkdir()
    with open(folder / "7.pkl", "wb") as f:
        pickle.dump({10: ([[1, 1, 5, 5]], [0.97]), 30: ([[2, 2, 9, 9]], [0.5]), 40: ([[0, 0, 2, 2]], [1.0]),
                     20: ([], []), "salient": ([[0, 0, 1, 1]], [1.0])}, f)  # fmt: skip
    src = FileBoxes(folder, [10, 20, 30], threshold=0.95)
    src.check([_rec(7, [0])])
    out = src(_rec(7, [0, 1, 2]))  # 30 is below .95, 20 has no box, 40 is not in the vocabulary
    assert list(out) == [0] and out[0][1] == pytest.approx(0.97)
    np.testing.assert_array_equal(out[0][0], [1, 1, 5, 5])
    assert FileBoxes(folder, [10, 20, 30], threshold=0.97)(_rec(7, [0])) == {}  # strict
    assert sorted(FileBoxes(folder, [10, 20, 30], threshold=0.4)(_rec(7, [0, 2]))) == [0, 2]
    with pytest.raises(OVDError, match="no pseudo-box file for image 8"):
        src(_rec(8, [0]))
    with pytest.raises(OVDError, match=r"1 of 2 images have no pseudo-box pickle \(e\.g\. 8\.pkl\)"):
        src.check([_rec(7, [0]), _rec(8, [0])])


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (pickle.dumps([1, 2]), "expected a dict"),
        (pickle.dumps({10: "oops"}), r"\[10\]: expected \(\[box_xyxy"),
        (pickle.dumps({10: ([[1, 2, 3]], [0.99])}), r"\[10\]: expected"),
        (pickle.dumps({"dog": ([[1, 2, 3, 4]], [0.99])}), r"\['dog'\]: keys must be category ids"),
        (b"not a pickle", "cannot read pickle"),
    ],
)
def test_file_boxes_bad_pickles(tmp_path, content, match):
    (tmp_path / "7.pkl").write_bytes(content)
    with pytest.raises(OVDError, match=match) as e:
        FileBoxes(tmp_path, [10])(_rec(7, [0]))
    assert "7.pkl" in str(e.value)


def test_file_boxes_from_a_results_json(tmp_path):
    results = tmp_path / "dets.json"
    results.write_text(json.dumps([
        {"image_id": 7, "category_id": 20, "bbox": [0, 0, 4, 4], "score": 0.96},
        {"image_id": 7, "category_id": 20, "bbox": [1, 1, 4, 4], "score": 0.99},  # the best of the two
        {"image_id": 7, "category_id": 10, "bbox": [1, 1, 4, 4], "score": 0.5},
    ]))  # fmt: skip
    src = FileBoxes(results, [10, 20, 30])  # the reference's 0.95
    src.check([_rec(8, [0])])  # images without detections get no box, they are no error
    out = src(_rec(7, [0, 1]))
    assert list(out) == [1] and out[1][1] == pytest.approx(0.99)
    np.testing.assert_array_equal(out[1][0], [1, 1, 5, 5])  # xywh → xyxy
    assert src(_rec(8, [0])) == {}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "cannot read detections JSON"),
        ('{"image_id": 1}', "<top level>: expected a COCO results list"),
        ('[{"image_id": 1, "category_id": 10, "bbox": [1, 2, 3], "score": 1}]', r"\[0\]: needs image_id"),
        ('[{"image_id": 1, "category_id": 10, "score": 1}]', r"\[0\]: needs image_id"),
        ('[{"image_id": 1, "category_id": 99, "bbox": [1, 2, 3, 4], "score": 1}]', r"\[0\]\.category_id: unknown"),
    ],
)
def test_file_boxes_bad_results(tmp_path, text, match):
    path = tmp_path / "dets.json"
    path.write_text(text)
    with pytest.raises(OVDError, match=match) as e:
        FileBoxes(path, [10])
    assert "dets.json" in str(e.value)


def test_file_boxes_missing_path(tmp_path):
    with pytest.raises(OVDError, match="none: pseudo-box file or folder not found"):
        FileBoxes(tmp_path / "none", [10])


def _tags(tmp_path):
    tags = {"images": [{"id": 7, "file_name": "7.png", "height": 50, "width": 60, "pos_category_ids": [10, 30]},
                       {"id": 8, "file_name": "8.png", "height": 50, "width": 60, "pos_category_ids": [10]}],
            "annotations": [],
            "categories": [{"id": 10, "name": "a"}, {"id": 20, "name": "b"}, {"id": 30, "name": "c"}]}  # fmt: skip
    path = tmp_path / "tags.json"
    path.write_text(json.dumps(tags))
    return path


def test_generate_pseudo_labels_end_to_end(tmp_path):
    store = _store(tmp_path)
    info = image_label_info(_tags(tmp_path), tmp_path)
    assert info.class_names == ("a", "b", "c") and info.category_ids == (10, 20, 30) and info.ann_type == "image"
    # image 7: class a → r0 (.995), class c → r2 (1.0); image 8: class a → .6, below .7: dropped
    stats = generate_pseudo_labels(info, ClipScoredProposals(store, TEXT, score="cosine", threshold=0.7),
                                   tmp_path / "out.json", progress=False)  # fmt: skip
    assert stats == {"images": 1, "labels": 3, "boxes": 2, "per_class": {"a": 1, "b": 0, "c": 1}}
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["images"] == [{"id": 7, "file_name": "7.png", "height": 50, "width": 60, "pos_category_ids": [10, 30]}]
    assert [a["bbox"] for a in out["annotations"]] == [[0.0, 0.0, 10.0, 10.0], [1.0, 2.0, 2.0, 2.0]]


def test_generate_pseudo_labels_bad_inputs(tmp_path):
    store = _store(tmp_path)
    tags = _tags(tmp_path)
    data = json.loads(tags.read_text())
    data["images"][1]["id"] = 99
    tags.write_text(json.dumps(data))
    info = image_label_info(tags, tmp_path)
    with pytest.raises(OVDError, match="1 of 2 images have no stored regions"):
        generate_pseudo_labels(info, ClipScoredProposals(store, TEXT), tmp_path / "out.json", progress=False)
    assert not (tmp_path / "out.json").exists()
    boxes = DatasetInfo("boxes", str(tmp_path), str(tags), ("a", "b", "c"), (10, 20, 30), ann_type="box")
    with pytest.raises(OVDError, match="has no image-level labels"):
        generate_pseudo_labels(boxes, ClipScoredProposals(store, TEXT), tmp_path / "out.json", progress=False)
    tags.write_text(json.dumps({"images": [], "categories": [{"id": 1}]}))
    with pytest.raises(OVDError, match=r"tags.json: categories\[0\]"):
        image_label_info(tags, tmp_path)
    tags.write_text("{")
    with pytest.raises(OVDError, match="tags.json: malformed JSON"):
        image_label_info(tags, tmp_path)


def _tool(name):
    from importlib import util
    from pathlib import Path

    spec = util.spec_from_file_location(name, Path(__file__).parents[2] / "tools" / f"{name}.py")
    module = util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generate_pseudo_labels_tool_with_tags_and_a_random_clip(tmp_path, monkeypatch, capsys):
    from ovd.utils.cli import run_cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(2, 3, 64))  # ovd-tiny's embedding dim
    emb /= np.linalg.norm(emb, axis=2, keepdims=True)
    boxes = np.tile(np.array([[0, 0, 10, 10], [5, 5, 30, 40], [1, 2, 3, 4]], np.float32), (2, 1, 1))
    write_region_store(tmp_path / "store", image_ids=np.array([7, 8]), boxes=boxes, embeddings=emb,
                       valid=np.ones((2, 3), bool), metadata={"dataset": "toy"})  # fmt: skip
    tool = _tool("generate_pseudo_labels")
    out = tmp_path / "pseudo.json"
    args = ["--tags", str(_tags(tmp_path)), "--image-root", str(tmp_path), "--region-store", str(tmp_path / "store"),
            "--clip-model", "ovd-tiny", "--score", "cosine", "--threshold", "-1.01", "--no-progress",
            "--output", str(out)]  # fmt: skip
    assert run_cli(tool.main, args) == 0
    data = json.loads(out.read_text())  # cosine >= -1 > -1.01: every label gets its best region
    assert [(im["id"], im["pos_category_ids"]) for im in data["images"]] == [(7, [10, 30]), (8, [10])]
    assert len(data["annotations"]) == 3 and (tmp_path / "pseudo_text.npy").is_file()
    assert run_cli(tool.main, ["--tags", str(_tags(tmp_path)), "--dataset", "x", "--output", str(out)]) == 2
    assert "either --dataset or --tags" in capsys.readouterr().err
    assert run_cli(tool.main, ["--tags", str(_tags(tmp_path)), "--output", str(out)]) == 2
    assert "--tags needs --image-root" in capsys.readouterr().err
    missing = ["--tags", str(_tags(tmp_path)), "--image-root", str(tmp_path), "--source", "file", "--boxes",
               str(tmp_path / "mavl"), "--output", str(out)]  # fmt: skip
    assert run_cli(tool.main, missing) == 2
    assert "mavl: pseudo-box file or folder not found" in capsys.readouterr().err
