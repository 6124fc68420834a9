"""Tests for the OV-COCO evaluation (METHOD §6.4, §10 item 15), on hand-made GT with known AP.

pycocotools divides by ``tp + fp + eps`` where faster-coco-eval divides by ``tp + fp``, so the two
agree to ~1e-13 %, not bit for bit: numbers are compared with ``pytest.approx(abs=TOL)``.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from ovd.errors import OVDError
from ovd.evaluation.coco_ovd import evaluate_ovd, format_table, write_report

BACKENDS = ["faster", "pycocotools"]
TOL = 1e-9  # percent

# Split used by the hand-made set: base {1, 3}, novel {5}; 7 is "other" with GT, 9 has no GT.
BASE, NOVEL = [1, 3], [5]


def _gt(annotations: list[dict], num_images: int = 2, cat_ids: tuple[int, ...] = (1, 3, 5, 7, 9)) -> dict:
    return {
        "images": [{"id": i + 1, "width": 100, "height": 100} for i in range(num_images)],
        "annotations": [{"id": i + 1, "iscrowd": 0, **a} for i, a in enumerate(annotations)],
        "categories": [{"id": c, "name": f"cat{c}"} for c in cat_ids],
    }


def _ann(image_id: int, category_id: int, bbox: list[float]) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "area": bbox[2] * bbox[3]}


def _det(image_id: int, category_id: int, bbox: list[float], score: float) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


@pytest.fixture
def base_perfect_novel_missed() -> tuple[dict, list[dict]]:
    """Two images. Base classes 1, 3 and other class 7 are found exactly; novel class 5 is missed."""
    anns = [
        _ann(1, 1, [10, 10, 30, 30]),
        _ann(1, 5, [50, 50, 40, 40]),
        _ann(2, 3, [0, 0, 20, 40]),
        _ann(2, 1, [60, 10, 30, 20]),
        _ann(2, 7, [5, 60, 30, 30]),
    ]
    dets = [
        _det(1, 1, [10, 10, 30, 30], 0.9),
        _det(2, 3, [0, 0, 20, 40], 0.8),
        _det(2, 1, [60, 10, 30, 20], 0.7),
        _det(2, 7, [5, 60, 30, 30], 0.6),
        _det(1, 5, [0, 60, 20, 20], 0.95),  # novel detection in the wrong place (IoU 0): a false positive
        _det(1, 9, [0, 0, 10, 10], 0.5),  # class 9 has no GT: ignored, as in COCOeval
    ]
    return _gt(anns), dets


@pytest.mark.parametrize("backend", BACKENDS)
def test_base_perfect_novel_missed(backend, base_perfect_novel_missed):
    gt, dets = base_perfect_novel_missed
    gt_before, dets_before = copy.deepcopy(gt), copy.deepcopy(dets)
    m = evaluate_ovd(gt, dets, base_category_ids=BASE, novel_category_ids=NOVEL, backend=backend)
    # Exact boxes (IoU 1) give precision 1 at every recall and IoU threshold: AP50 = AP = 100.
    assert m["AP50_base"] == pytest.approx(100.0, abs=TOL)
    assert m["AP50_novel"] == pytest.approx(0.0, abs=TOL)
    # AP50_all is over the 4 classes with GT (1, 3, 5, 7), not just base + novel: 3 * 100 / 4.
    assert m["AP50_all"] == pytest.approx(75.0, abs=TOL)
    assert m["AP50"] == m["AP50_all"]
    assert m["AP"] == pytest.approx(75.0, abs=TOL)
    assert m["AP75"] == pytest.approx(75.0, abs=TOL)
    assert m["num_images"] == 2
    assert m["num_detections"] == 6
    assert m["num_classes_with_gt"] == {"base": 2, "novel": 1, "all": 4}
    rows = {c["category_id"]: c for c in m["per_class"]}
    assert [c["category_id"] for c in m["per_class"]] == [1, 3, 5, 7, 9]
    assert {k: rows[k]["split"] for k in rows} == {1: "base", 3: "base", 5: "novel", 7: "other", 9: "other"}
    assert {k: rows[k]["num_gt"] for k in rows} == {1: 2, 3: 1, 5: 1, 7: 1, 9: 0}
    assert rows[1]["name"] == "cat1"
    assert rows[5]["AP50"] == pytest.approx(0.0, abs=TOL)
    assert rows[9]["AP50"] is None and rows[9]["AP"] is None  # no GT: excluded, reported as null
    json.dumps(m)  # JSON-serialisable
    assert gt == gt_before and dets == dets_before  # inputs left untouched


@pytest.mark.parametrize("backend", BACKENDS)
def test_false_positive_ranked_above_true_positive(backend):
    # One class, 2 GT (one per image); detections by score: TP (0.9), FP (0.8), TP (0.7).
    #   cumulative TP [1, 1, 2], FP [0, 1, 1] -> recall [.5, .5, 1], precision [1, 1/2, 2/3]
    #   interpolated (max to the right): [1, 2/3, 2/3]
    # COCO's 101 recall thresholds r = 0, .01, ..., 1 take the first point with recall >= r:
    #   r in [0, .50] (51 points) -> 1;  r in [.51, 1] (50 points) -> 2/3
    #   AP50 = (51 * 1 + 50 * 2/3) / 101 = 84.333... / 101 = 83.4983...%
    # Boxes are exact (IoU 1), so every IoU threshold gives the same value: AP = AP75 = AP50.
    gt = _gt([_ann(1, 1, [10, 10, 20, 20]), _ann(2, 1, [30, 30, 40, 20])], cat_ids=(1, 5))
    dets = [
        _det(1, 1, [10, 10, 20, 20], 0.9),
        _det(1, 1, [60, 60, 20, 20], 0.8),  # IoU 0 with the GT of image 1
        _det(2, 1, [30, 30, 40, 20], 0.7),
    ]
    expected = (51 + 50 * 2 / 3) / 101 * 100
    m = evaluate_ovd(gt, dets, base_category_ids=[1], novel_category_ids=[5], backend=backend)
    assert m["AP50_base"] == pytest.approx(expected, abs=TOL)
    assert m["AP"] == pytest.approx(expected, abs=TOL)
    assert m["AP75"] == pytest.approx(expected, abs=TOL)
    assert m["AP50_novel"] is None  # no novel class has GT


@pytest.mark.parametrize("backend", BACKENDS)
def test_iou_between_thresholds(backend):
    # GT [0, 0, 10, 10], detection [0, 0, 10, 15]: IoU = 100 / 150 = 0.667.
    # Matched at IoU thresholds .50, .55, .60, .65 (4 of the 10), missed from .70 on:
    #   AP50 = 100, AP75 = 0, AP = 4 * 100 / 10 = 40.
    gt = _gt([_ann(1, 1, [0, 0, 10, 10])], num_images=1, cat_ids=(1, 5))
    dets = [_det(1, 1, [0, 0, 10, 15], 0.5)]
    m = evaluate_ovd(gt, dets, base_category_ids=[1], novel_category_ids=[5], backend=backend)
    assert m["AP50"] == pytest.approx(100.0, abs=TOL)
    assert m["AP75"] == pytest.approx(0.0, abs=TOL)
    assert m["AP"] == pytest.approx(40.0, abs=TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_dets_truncates_per_image(backend):
    # Two GT of class 1 in one image, both found, but only the top-scoring detection is kept:
    # recall 1/2 at precision 1 -> thresholds r in [0, .5] (51 of 101) -> AP50 = 51/101 = 50.495%.
    gt = _gt([_ann(1, 1, [0, 0, 10, 10]), _ann(1, 1, [50, 50, 10, 10])], num_images=1, cat_ids=(1, 5))
    dets = [_det(1, 1, [0, 0, 10, 10], 0.9), _det(1, 1, [50, 50, 10, 10], 0.8)]
    m = evaluate_ovd(gt, dets, base_category_ids=[1], novel_category_ids=[5], backend=backend, max_dets=1)
    assert m["AP50"] == pytest.approx(51 / 101 * 100, abs=TOL)
    m = evaluate_ovd(gt, dets, base_category_ids=[1], novel_category_ids=[5], backend=backend, max_dets=2)
    assert m["AP50"] == pytest.approx(100.0, abs=TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_detections(backend, base_perfect_novel_missed):
    gt, _ = base_perfect_novel_missed
    m = evaluate_ovd(gt, [], base_category_ids=BASE, novel_category_ids=NOVEL, backend=backend)
    assert m["num_detections"] == 0
    for key in ("AP50_base", "AP50_novel", "AP50_all", "AP", "AP75"):
        assert m[key] == 0.0
    rows = {c["category_id"]: c for c in m["per_class"]}
    assert rows[7]["AP50"] == 0.0  # has GT: 0
    assert rows[9]["AP50"] is None  # no GT: undefined


def _synthetic(seed: int, num_images: int = 50, num_classes: int = 10) -> tuple[dict, list[dict]]:
    """Random GT boxes; detections = jittered GT (80% of them) + random false positives, random scores."""
    rng = np.random.default_rng(seed)
    cat_ids = [2 * c + 1 for c in range(num_classes)]  # non-contiguous dataset ids
    anns, dets = [], []
    for image_id in range(1, num_images + 1):
        for _ in range(rng.integers(0, 6)):
            cat = int(rng.choice(cat_ids[:-1]))  # the last class has no GT
            box = np.concatenate([rng.uniform(0, 500, 2), rng.uniform(4, 200, 2)])
            anns.append(_ann(image_id, cat, box.tolist()))
            if rng.random() < 0.8:
                jitter = rng.normal(0, 0.1, 4) * box[[2, 3, 2, 3]]
                dets.append(_det(image_id, cat, np.abs(box + jitter).tolist(), float(rng.random())))
        for _ in range(rng.integers(0, 8)):
            box = np.concatenate([rng.uniform(0, 500, 2), rng.uniform(4, 200, 2)])
            dets.append(_det(image_id, int(rng.choice(cat_ids)), box.tolist(), float(rng.random())))
    return _gt(anns, num_images=num_images, cat_ids=tuple(cat_ids)), dets


def test_backends_agree_on_random_set():
    gt, dets = _synthetic(seed=0)
    kwargs = dict(base_category_ids=[1, 3, 5, 7, 9, 11], novel_category_ids=[13, 15, 17])
    fast = evaluate_ovd(gt, dets, backend="faster", **kwargs)
    ref = evaluate_ovd(gt, dets, backend="pycocotools", **kwargs)
    assert 0 < ref["AP50_all"] < 100 and 0 < ref["AP50_novel"] < 100  # a non-trivial case
    for key in ("AP50_novel", "AP50_base", "AP50_all", "AP", "AP50", "AP75", "APs", "APm", "APl"):
        assert fast[key] == pytest.approx(ref[key], abs=TOL), key
    assert len(fast["per_class"]) == len(ref["per_class"]) == 10
    for f, r in zip(fast["per_class"], ref["per_class"], strict=True):
        assert (f["category_id"], f["split"], f["num_gt"]) == (r["category_id"], r["split"], r["num_gt"])
        if r["AP50"] is None:
            assert f["AP50"] is None and f["AP"] is None
        else:
            assert f["AP50"] == pytest.approx(r["AP50"], abs=TOL)
            assert f["AP"] == pytest.approx(r["AP"], abs=TOL)
    # AP50_novel is the mean of the novel classes' per-class AP50 (METHOD §10.15).
    novel = [c["AP50"] for c in ref["per_class"] if c["split"] == "novel"]
    assert ref["AP50_novel"] == pytest.approx(float(np.mean(novel)), abs=TOL)


def test_gt_from_file(tmp_path, base_perfect_novel_missed):
    gt, dets = base_perfect_novel_missed
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    m = evaluate_ovd(path, dets, base_category_ids=BASE, novel_category_ids=NOVEL)
    assert m["AP50_base"] == pytest.approx(100.0, abs=TOL)


@pytest.mark.parametrize(
    ("index", "change", "field"),
    [
        (2, {"category_id": 4}, "detections[2].category_id"),
        (3, {"image_id": 99}, "detections[3].image_id"),
        (1, {"bbox": [1, 2, 3]}, "detections[1].bbox"),
        (0, {"bbox": [1, 2, 3, float("nan")]}, "detections[0].bbox"),
        (0, {"score": "high"}, "detections[0].score"),
    ],
)
def test_bad_detection_names_the_field(base_perfect_novel_missed, index, change, field):
    gt, dets = base_perfect_novel_missed
    dets[index] = {**dets[index], **change}
    with pytest.raises(OVDError) as err:
        evaluate_ovd(gt, dets, base_category_ids=BASE, novel_category_ids=NOVEL)
    assert err.value.field == field
    assert field in str(err.value)


def test_missing_detection_key(base_perfect_novel_missed):
    gt, dets = base_perfect_novel_missed
    del dets[4]["score"]
    with pytest.raises(OVDError, match=r"detections\[4\]\.score"):
        evaluate_ovd(gt, dets, base_category_ids=BASE, novel_category_ids=NOVEL)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(base_category_ids=[1, 2], novel_category_ids=[5]), "base_category_ids[1]"),
        (dict(base_category_ids=[1], novel_category_ids=[5, 100]), "novel_category_ids[1]"),
        (dict(base_category_ids=[1, 5], novel_category_ids=[5]), "novel_category_ids[0]"),
        (dict(base_category_ids=[1], novel_category_ids=[5], backend="detectron2"), "backend"),
        (dict(base_category_ids=[1], novel_category_ids=[5], max_dets=0), "max_dets"),
    ],
)
def test_bad_arguments(base_perfect_novel_missed, kwargs, field):
    gt, dets = base_perfect_novel_missed
    with pytest.raises(OVDError) as err:
        evaluate_ovd(gt, dets, **kwargs)
    assert err.value.field == field


def test_bad_gt_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(OVDError, match="file not found"):
        evaluate_ovd(missing, [], base_category_ids=[1], novel_category_ids=[])
    gt = _gt([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10]}], num_images=1)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    with pytest.raises(OVDError) as err:
        evaluate_ovd(path, [], base_category_ids=[1], novel_category_ids=[])
    assert err.value.path == str(path) and err.value.field == "annotations[0].bbox"


def test_bad_gt_dict_and_detections_type(base_perfect_novel_missed):
    gt, dets = base_perfect_novel_missed
    with pytest.raises(OVDError) as err:
        evaluate_ovd({**gt, "images": gt["images"] * 2}, dets, base_category_ids=BASE, novel_category_ids=NOVEL)
    assert err.value.field == "images[2].id"  # duplicate image id
    with pytest.raises(OVDError) as err:
        evaluate_ovd(gt, "results.json", base_category_ids=BASE, novel_category_ids=NOVEL)
    assert err.value.field == "detections"


def test_write_report(tmp_path, base_perfect_novel_missed):
    gt, dets = base_perfect_novel_missed
    dets[0] = {**dets[0], "score": np.float32(0.9), "image_id": np.int64(1)}  # numpy scalars are fine
    m = evaluate_ovd(gt, dets, base_category_ids=BASE, novel_category_ids=NOVEL)
    out = tmp_path / "eval"
    path = write_report(m, out, detections=dets)
    assert path == out / "metrics.json"
    assert json.loads(path.read_text()) == m
    saved = json.loads((out / "detections.json").read_text())
    assert len(saved) == 6 and saved[0]["image_id"] == 1 and saved[0]["score"] == pytest.approx(0.9)
    table = (out / "per_class.md").read_text()
    assert table == format_table(m)
    assert "| AP50_novel | 0.0 |" in table and "| AP50_base | 100.0 |" in table
    assert "| cat9 | 9 | other | 0 | - | - |" in table
    # Without detections, no detections.json; a rerun overwrites in place.
    out2 = tmp_path / "eval2"
    write_report(m, out2)
    assert sorted(p.name for p in out2.iterdir()) == ["metrics.json", "per_class.md"]
