"""LVIS evaluation (METHOD §6.4): federated rules by hand, and parity with lvis-api 0.5.3 on boxes and masks.

lvis-api divides by ``tp + fp + eps`` where faster-coco-eval divides by ``tp + fp``, so the two agree to
~1e-14 %, not bit for bit: numbers are compared with ``pytest.approx(abs=TOL)``. lvis-api is imported
without its package ``__init__`` (which pulls its matplotlib/OpenCV visualiser), and its use of
``np.float`` (removed in NumPy 2) is patched for the test only.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import logging
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from ovd.errors import OVDError
from ovd.evaluation.lvis_eval import LVISDetections, evaluate_lvis, format_lvis_table, write_lvis_report

TOL = 1e-9  # percent
KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
W, H = 160, 120  # every image; objects span the small (< 32²), medium and large (> 96²) area ranges


def _mask(box: list[int], cut: int = 0) -> np.ndarray:
    """A filled ``[x0, y0, x1, y1)`` rectangle without its top-right ``cut × cut`` corner."""
    x0, y0, x1, y1 = box
    m = np.zeros((H, W), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    if cut:
        m[y0 : y0 + cut, x1 - cut : x1] = 0
    return m


def _rle(m: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _instance(box: list[int], cut: int = 0) -> dict[str, Any]:
    """bbox ``[x, y, w, h]``, mask area and RLE of :func:`_mask`."""
    m = _mask(box, cut)
    x0, y0, x1, y1 = box
    return {"bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(m.sum()), "segmentation": _rle(m)}


# Categories: apple rare, ball common, cup / dog frequent, egg common without any GT.
CATEGORIES = [
    {"id": 1, "name": "apple", "frequency": "r"},
    {"id": 2, "name": "ball", "frequency": "c"},
    {"id": 3, "name": "cup", "frequency": "f"},
    {"id": 4, "name": "dog", "frequency": "f"},
    {"id": 5, "name": "egg", "frequency": "c"},
]


def _fixture() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Four images with federated lists; 18 detections covering every rule (see the comments)."""
    images = [
        {"id": 11, "width": W, "height": H, "neg_category_ids": [2], "not_exhaustive_category_ids": [3]},
        {"id": 12, "width": W, "height": H, "neg_category_ids": [1, 5], "not_exhaustive_category_ids": []},
        {"id": 13, "width": W, "height": H, "neg_category_ids": [], "not_exhaustive_category_ids": [4]},
        {"id": 14, "width": W, "height": H, "neg_category_ids": [3], "not_exhaustive_category_ids": []},
    ]
    gt = [
        (11, 1, [4, 4, 40, 30], 6),  # small apple (rare)
        (11, 3, [60, 20, 120, 100], 10),  # medium cup
        (12, 2, [2, 2, 22, 22], 8),
        (12, 2, [100, 10, 140, 50], 8),
        (12, 4, [10, 30, 130, 118], 20),  # large dog
        (13, 3, [0, 0, 160, 120], 30),  # large cup
        (13, 4, [20, 20, 50, 40], 0),  # small dog
    ]
    anns = [
        {"id": i + 1, "image_id": im, "category_id": c, **_instance(b, cut)} for i, (im, c, b, cut) in enumerate(gt)
    ]
    dets = [
        (11, 1, [4, 4, 40, 30], 6, 0.9),  # TP apple
        (11, 1, [7, 6, 43, 32], 6, 0.6),  # duplicate apple: FP
        (11, 3, [64, 24, 124, 104], 10, 0.8),  # cup, TP at the low IoU thresholds only
        (11, 3, [0, 80, 30, 118], 0, 0.7),  # unmatched cup; cup is not exhaustive on 11: ignored
        (11, 2, [70, 5, 90, 25], 0, 0.5),  # ball is negative on 11: FP
        (11, 4, [10, 10, 40, 40], 0, 0.95),  # dog: neither GT nor negative on 11: dropped
        (11, 5, [0, 0, 10, 10], 0, 0.4),  # egg, same: dropped
        (12, 2, [2, 2, 22, 22], 0, 0.85),  # ball, exact box; mask IoU 336 / 400 = 0.84
        (12, 2, [98, 12, 138, 52], 8, 0.85),  # ball, tied score
        (12, 4, [12, 28, 128, 116], 20, 0.75),  # TP dog (large)
        (12, 1, [50, 50, 70, 70], 0, 0.92),  # apple negative on 12: FP of the rare class, above its TP
        (12, 5, [0, 100, 20, 119], 0, 0.3),  # egg negative on 12, but egg has no GT anywhere
        (12, 2, [5, 5, 5, 15], 0, 0.97),  # zero-area box and empty mask: skipped
        (13, 3, [0, 0, 160, 120], 30, 0.55),  # TP cup (large)
        (13, 4, [22, 21, 52, 41], 0, 0.45),  # TP dog (small)
        (13, 4, [100, 60, 140, 100], 0, 0.35),  # unmatched dog; dog is not exhaustive on 13: ignored
        (14, 3, [10, 10, 50, 50], 0, 0.99),  # cup negative on 14: FP
        (14, 2, [10, 10, 50, 50], 0, 0.2),  # ball on 14: dropped
    ]
    results = []
    for im, c, box, cut, score in dets:
        inst = _instance(box, cut)
        results.append(
            {
                "image_id": im,
                "category_id": c,
                "bbox": inst["bbox"],
                "segmentation": inst["segmentation"],
                "score": score,
            }
        )
    return {"images": images, "annotations": anns, "categories": CATEGORIES}, results


@pytest.fixture
def lvis_api(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.SimpleNamespace]:
    """lvis-api's LVIS, LVISResults and LVISEval, imported without ``lvis/__init__.py``."""
    spec = importlib.util.find_spec("lvis")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(
            "lvis-api is not installed: pip install --no-deps lvis==0.5.3 (its opencv-python would be a 2nd cv2)"
        )
    monkeypatch.setattr(np, "float", float, raising=False)  # lvis-api's accumulate uses np.float
    before = {name: mod for name, mod in sys.modules.items() if name == "lvis" or name.startswith("lvis.")}
    for name in before:
        del sys.modules[name]
    package = types.ModuleType("lvis")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["lvis"] = package
    try:
        eval_module = importlib.import_module("lvis.eval")
        api = types.SimpleNamespace(
            LVIS=importlib.import_module("lvis.lvis").LVIS,
            LVISResults=importlib.import_module("lvis.results").LVISResults,
            LVISEval=eval_module.LVISEval,
        )
        logging.getLogger("lvis").setLevel(logging.ERROR)  # its "Assuming user provided the results" warning
        yield api
    finally:
        for name in [n for n in sys.modules if n == "lvis" or n.startswith("lvis.")]:
            del sys.modules[name]
        sys.modules.update(before)


def _lvis_api_results(
    api: types.SimpleNamespace, gt_path: Path, dets: list[dict], iou_type: str, max_dets: int
) -> dict:
    gt = api.LVIS(str(gt_path))
    results = copy.deepcopy(dets)
    for d in results:  # as detectron2: mask results without their box, so the mask area is used
        d.pop("bbox" if iou_type == "segm" else "segmentation")
    evaluator = api.LVISEval(gt, api.LVISResults(gt, results, max_dets=max_dets), iou_type)
    evaluator.run()
    return {k: (None if v == -1 else float(v) * 100) for k, v in evaluator.get_results().items()}


@pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning")  # inside lvis-api
@pytest.mark.parametrize("max_dets", [300, 3])
def test_parity_with_lvis_api(lvis_api: types.SimpleNamespace, tmp_path: Path, max_dets: int) -> None:
    gt, dets = _fixture()
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    # chunk_size=1: one faster-coco-eval run per class, the concatenation path
    for chunk_size in (250_000, 1):
        ours = evaluate_lvis(gt_path, dets, ("bbox", "segm"), max_dets=max_dets, chunk_size=chunk_size)
        for iou_type in ("bbox", "segm"):
            ref = _lvis_api_results(lvis_api, gt_path, dets, iou_type, max_dets)
            # lvis-api names its recall keys after its fixed Params.max_dets = 300
            keys = [(k, k) for k in KEYS] + [(f"AR{a}@{max_dets}", f"AR{a}@300") for a in ("", "s", "m", "l")]
            for key, ref_key in keys:
                if ref[ref_key] is None:
                    assert ours[iou_type][key] is None, (iou_type, key)
                else:
                    assert ours[iou_type][key] == pytest.approx(ref[ref_key], abs=TOL), (iou_type, key, chunk_size)
    # the fixture is not degenerate: box and mask AP differ, every group and size has GT
    assert ours["bbox"]["AP"] != pytest.approx(ours["segm"]["AP"])
    assert all(ours["segm"][k] is not None for k in KEYS)
    assert ours["num_classes_with_gt"] == {"r": 1, "c": 1, "f": 2, "all": 4}


def _one_class_gt(neg: list[int], not_exhaustive: list[int]) -> dict[str, Any]:
    return {
        "images": [
            {
                "id": 1,
                "width": 100,
                "height": 100,
                "neg_category_ids": [],
                "not_exhaustive_category_ids": not_exhaustive,
            },
            {"id": 2, "width": 100, "height": 100, "neg_category_ids": neg, "not_exhaustive_category_ids": []},
        ],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 20, 20], "area": 400.0}],
        "categories": [{"id": 7, "name": "cup", "frequency": "f"}, {"id": 8, "name": "yak", "frequency": "r"}],
    }


def _det(image_id: int, box: list[float], score: float, category_id: int = 7) -> dict[str, Any]:
    return {"image_id": image_id, "category_id": category_id, "bbox": box, "score": score}


def test_federated_rules_by_hand() -> None:
    tp = _det(1, [10, 10, 20, 20], 0.8)
    fp_same_image = _det(1, [60, 60, 20, 20], 0.9)
    fp_other_image = _det(2, [60, 60, 20, 20], 0.9)

    def ap(gt: dict[str, Any], dets: list[dict[str, Any]]) -> float:
        m = evaluate_lvis(gt, dets, ("bbox",))["bbox"]
        assert m["APr"] is None  # the rare class has no GT
        assert m["AP"] == m["APf"]
        return m["AP"]

    # One exact TP: precision 1 at every recall and IoU -> 100.
    assert ap(_one_class_gt([], []), [tp]) == pytest.approx(100)
    # A higher-scored FP first: precision 1/2 when recall reaches 1 -> 50 at every recall threshold.
    assert ap(_one_class_gt([], []), [tp, fp_same_image]) == pytest.approx(50)
    # The same FP in a not-exhaustive class is ignored.
    assert ap(_one_class_gt([], [7]), [tp, fp_same_image]) == pytest.approx(100)
    # On an image without the class in its GT: dropped unless the class is in its negative list.
    assert ap(_one_class_gt([], []), [tp, fp_other_image]) == pytest.approx(100)
    assert ap(_one_class_gt([7], []), [tp, fp_other_image]) == pytest.approx(50)
    # Per-image limit: with max_dets=1 only the 0.9 FP of image 1 is kept -> no TP -> 0.
    assert evaluate_lvis(_one_class_gt([], []), [tp, fp_same_image], ("bbox",), max_dets=1)["bbox"]["AP"] == 0


def test_array_input_and_report(tmp_path: Path) -> None:
    gt, dets = _fixture()
    ref = evaluate_lvis(gt, dets)
    arrays = LVISDetections.from_results(dets)
    assert len(arrays) == len(dets) and arrays.masks is not None
    halves = LVISDetections.concatenate([LVISDetections.from_results(dets[:5]), LVISDetections.from_results(dets[5:])])
    assert evaluate_lvis(gt, halves) == ref
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    assert evaluate_lvis(gt, tmp_path / "dets.json") == ref
    # 3 dropped by the federated rule, 1 of area 0, 1 of a class (egg) without GT
    assert ref["num_detections"] == 18 and ref["bbox"]["num_detections"] == ref["segm"]["num_detections"] == 13

    path = write_lvis_report(ref, tmp_path / "out")
    assert json.loads(path.read_text()) == json.loads(json.dumps(ref))
    table = (tmp_path / "out" / "per_class.md").read_text()
    assert table == format_lvis_table(ref)
    assert "| APr | " in table and "| apple | 1 | r | 1 |" in table and "| egg | 5 | c | 0 | - | - |" in table


def test_errors_name_the_field() -> None:
    gt, dets = _fixture()
    with pytest.raises(OVDError, match=r"detections\[2\]\.image_id: id 99 is not an image"):
        evaluate_lvis(gt, [*dets[:2], {**dets[2], "image_id": 99}])
    with pytest.raises(OVDError, match=r"detections\[0\]\.category_id: id 42 is not a category"):
        evaluate_lvis(gt, [{**dets[0], "category_id": 42}])
    with pytest.raises(OVDError, match=r"detections\[1\]\.score"):
        evaluate_lvis(gt, [dets[0], {**dets[1], "score": float("nan")}])
    boxes_only = [{k: v for k, v in d.items() if k != "segmentation"} for d in dets]
    with pytest.raises(OVDError, match="segm evaluation needs a 'segmentation'"):
        evaluate_lvis(gt, boxes_only)
    assert evaluate_lvis(gt, boxes_only, ("bbox",))["bbox"] == evaluate_lvis(gt, dets, ("bbox",))["bbox"]
    small = {**dets[0], "segmentation": _rle(np.ones((10, 10), np.uint8))}
    with pytest.raises(OVDError, match=r"detections\[0\]\.segmentation\.size"):
        evaluate_lvis(gt, [small])
    bad_gt = copy.deepcopy(gt)
    del bad_gt["categories"][2]["frequency"]
    with pytest.raises(OVDError, match=r"categories\[2\]\.frequency"):
        evaluate_lvis(bad_gt, dets)
    bad_gt = copy.deepcopy(gt)
    bad_gt["images"][1]["neg_category_ids"] = [77]
    with pytest.raises(OVDError, match=r"neg_category_ids\[0\]"):
        evaluate_lvis(bad_gt, dets)
    with pytest.raises(OVDError, match="iou_types"):
        evaluate_lvis(gt, dets, ("keypoints",))
    empty = evaluate_lvis(gt, [])
    assert empty["bbox"]["AP"] == 0 and empty["segm"]["APr"] == 0
