"""The evaluator interface: chosen by the catalog's ``evaluator`` field, same three steps for every metric."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from ovd.data.catalog import DatasetInfo, get_dataset
from ovd.errors import OVDError
from ovd.evaluation.evaluator import COCOOVDEvaluator, LVISEvaluator, build_evaluator

# Two 100x100 images, class 1 (base) on image 1 and class 2 (novel) on image 2.
GT = {
    "images": [{"id": 1, "height": 100, "width": 100}, {"id": 2, "height": 100, "width": 100}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600},
        {"id": 2, "image_id": 2, "category_id": 2, "bbox": [20, 20, 50, 30], "area": 1500},
    ],
    "categories": [{"id": 1, "name": "a", "frequency": "f"}, {"id": 2, "name": "b", "frequency": "r"}],
}
BASE_ONLY = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.9}]  # novel missed
INFO = DatasetInfo("toy", "img", "toy.json", ("a", "b"), (1, 2), base_classes=(0,), novel_classes=(1,))


def test_builtin_entries_name_their_evaluator() -> None:
    assert isinstance(build_evaluator(get_dataset("ovshapes_small_val", prepare=False), gt=GT), COCOOVDEvaluator)
    assert isinstance(build_evaluator(get_dataset("ovshapes_lt_small_val", prepare=False), gt=GT), LVISEvaluator)
    assert get_dataset("lvis_v1_val", prepare=False).evaluator == "lvis"
    assert get_dataset("coco_ovd_val", prepare=False).evaluator == "coco_ovd"


def test_coco_ovd_evaluator_base_perfect_novel_missed(tmp_path) -> None:
    evaluator = build_evaluator(INFO, gt=GT)
    metrics = evaluator.evaluate(BASE_ONLY)
    # the base box matches exactly (AP50 = 100); the novel GT has no detection (AP50 = 0)
    assert metrics["AP50_base"] == pytest.approx(100.0) and metrics["AP50_novel"] == pytest.approx(0.0)
    assert metrics["AP50_all"] == pytest.approx(50.0)  # mean over the two classes with GT
    path = evaluator.write_report(metrics, tmp_path, detections=BASE_ONLY)
    assert json.loads(path.read_text())["AP50_base"] == pytest.approx(100.0)
    assert "| b | 2 | novel | 1 | 0.0 |" in (tmp_path / "per_class.md").read_text()
    assert len(json.loads((tmp_path / "detections.json").read_text())) == 1


def test_lvis_evaluator_by_field(tmp_path) -> None:
    evaluator = build_evaluator(replace(INFO, evaluator="lvis"), gt=GT)
    metrics = evaluator.evaluate(BASE_ONLY)
    # the frequent class is found exactly (AP = 100), the rare one is not (AP = 0)
    assert metrics["bbox"]["APf"] == pytest.approx(100.0) and metrics["bbox"]["APr"] == pytest.approx(0.0)
    evaluator.write_report(metrics, tmp_path, detections=BASE_ONLY)
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "detections.json").is_file()


def test_unknown_evaluator_and_masks_without_gt_segmentation() -> None:
    with pytest.raises(OVDError, match="unknown evaluator 'voc'.*valid: coco_ovd, lvis"):
        build_evaluator(replace(INFO, evaluator="voc"), gt=GT)
    assert build_evaluator(INFO, gt=GT, masks=True).iou_types == ("bbox",)  # GT has no masks: box AP only
    segm_gt = {**GT, "annotations": [{**a, "segmentation": [[0, 0, 1, 0, 1, 1]]} for a in GT["annotations"]]}
    assert build_evaluator(INFO, gt=segm_gt, masks=True).iou_types == ("bbox", "segm")
