"""One evaluator interface: ``evaluate(detections) -> metrics``, chosen by the dataset's catalog metadata.

As detectron2's ``DatasetEvaluator`` chosen by ``evaluator_type``: every catalog entry names its metric
in :attr:`ovd.data.catalog.DatasetInfo.evaluator` (``"coco_ovd"`` or ``"lvis"``), and
:func:`build_evaluator` turns a dataset into a :class:`DatasetEvaluator` holding its ground truth. The
caller predicts, then ``metrics = evaluator.evaluate(detections)``, adds what it wants (the dataset name,
region fidelity) and calls ``evaluator.write_report(metrics, output_dir, detections=detections)``: the
same three steps whatever the metric.

Detections are COCO results: ``{image_id, category_id (dataset id), bbox: [x, y, w, h], score,
segmentation? (compressed RLE)}`` in original-image pixels.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from ovd.data.catalog import DatasetInfo, get_dataset
from ovd.errors import OVDError
from ovd.evaluation.coco_ovd import evaluate_ovd, format_table, write_report
from ovd.evaluation.common import IOU_TYPES
from ovd.evaluation.lvis_eval import MAX_DETS, evaluate_lvis, format_lvis_table, write_lvis_report
from ovd.utils.io import read_json, write_json

logger = logging.getLogger(__name__)

Detections = Sequence[Mapping[str, Any]]


class DatasetEvaluator(ABC):
    """Scores the detections of one dataset (its ground truth is held by the evaluator).

    Attributes:
        name: the catalog's ``evaluator`` value this class implements.
        iou_types: ``("bbox",)`` or ``("bbox", "segm")`` (mask AP too).
    """

    name: ClassVar[str]

    def __init__(self, gt: Mapping[str, Any], *, iou_types: Sequence[str] = ("bbox",)) -> None:
        iou_types = tuple(iou_types)
        if (
            "bbox" not in iou_types
            or any(t not in IOU_TYPES for t in iou_types)
            or len(set(iou_types)) != len(iou_types)
        ):
            raise OVDError(f"expected 'bbox' and optionally 'segm', got {iou_types!r}", field="iou_types")
        self.gt = gt
        self.iou_types = iou_types

    @abstractmethod
    def evaluate(self, detections: Detections) -> dict[str, Any]:
        """The metrics dict (JSON-serialisable, numbers in percent) of ``detections``."""

    @abstractmethod
    def format_table(self, metrics: Mapping[str, Any]) -> str:
        """Markdown of :meth:`evaluate`'s output: the summary, then one row per class."""

    @abstractmethod
    def write_report(
        self, metrics: Mapping[str, Any], output_dir: str | os.PathLike[str], *, detections: Detections | None = None
    ) -> Path:
        """Write ``metrics.json``, ``per_class.md`` and (given) ``detections.json`` atomically; returns the first."""


class COCOOVDEvaluator(DatasetEvaluator):
    """The OV-COCO metric (:func:`ovd.evaluation.coco_ovd.evaluate_ovd`): AP50 novel / base / all.

    Mask AP (``"segm"`` in ``iou_types``) goes to ``metrics["segm"]`` beside the box metrics at the top.
    """

    name = "coco_ovd"

    def __init__(
        self,
        gt: Mapping[str, Any],
        *,
        base_category_ids: Sequence[int],
        novel_category_ids: Sequence[int],
        iou_types: Sequence[str] = ("bbox",),
        backend: str = "faster",
    ) -> None:
        super().__init__(gt, iou_types=iou_types)
        self.split = {"base_category_ids": list(base_category_ids), "novel_category_ids": list(novel_category_ids)}
        self.backend = backend

    def evaluate(self, detections: Detections) -> dict[str, Any]:
        metrics = evaluate_ovd(self.gt, detections, backend=self.backend, **self.split)  # type: ignore[arg-type]
        if "segm" in self.iou_types:
            masks = evaluate_ovd(self.gt, detections, backend=self.backend, iou_type="segm", **self.split)  # type: ignore[arg-type]
            metrics["segm"] = {k: v for k, v in masks.items() if k not in ("backend", "num_images")}
        return metrics

    def format_table(self, metrics: Mapping[str, Any]) -> str:
        return format_table(dict(metrics))

    def write_report(
        self, metrics: Mapping[str, Any], output_dir: str | os.PathLike[str], *, detections: Detections | None = None
    ) -> Path:
        return write_report(dict(metrics), output_dir, detections=detections)


class LVISEvaluator(DatasetEvaluator):
    """The federated LVIS metric (:func:`ovd.evaluation.lvis_eval.evaluate_lvis`): AP, APr / APc / APf per IoU type
    (``metrics["bbox"]``, ``metrics["segm"]``), at most ``max_dets`` detections per image."""

    name = "lvis"

    def __init__(
        self, gt: Mapping[str, Any], *, iou_types: Sequence[str] = ("bbox",), max_dets: int = MAX_DETS
    ) -> None:
        super().__init__(gt, iou_types=iou_types)
        self.max_dets = max_dets

    def evaluate(self, detections: Detections) -> dict[str, Any]:
        return evaluate_lvis(self.gt, detections, self.iou_types, max_dets=self.max_dets)

    def format_table(self, metrics: Mapping[str, Any]) -> str:
        return format_lvis_table(metrics)

    def write_report(
        self, metrics: Mapping[str, Any], output_dir: str | os.PathLike[str], *, detections: Detections | None = None
    ) -> Path:
        path = write_lvis_report(metrics, output_dir)
        if detections is not None:
            write_json(Path(output_dir) / "detections.json", list(detections), indent=None)
        return path


def _coco_ovd(info: DatasetInfo, gt: Mapping[str, Any], iou_types: Sequence[str]) -> DatasetEvaluator:
    return COCOOVDEvaluator(
        gt,
        base_category_ids=[info.category_ids[i] for i in info.base_classes],
        novel_category_ids=[info.category_ids[i] for i in info.novel_classes],
        iou_types=iou_types,
    )


def _lvis(info: DatasetInfo, gt: Mapping[str, Any], iou_types: Sequence[str]) -> DatasetEvaluator:
    return LVISEvaluator(gt, iou_types=iou_types)


EVALUATORS: dict[str, Callable[[DatasetInfo, Mapping[str, Any], Sequence[str]], DatasetEvaluator]] = {
    COCOOVDEvaluator.name: _coco_ovd,
    LVISEvaluator.name: _lvis,
}
"""``DatasetInfo.evaluator`` value → the function building that evaluator from a catalog entry and its GT."""


def build_evaluator(
    dataset: str | DatasetInfo, *, masks: bool = False, gt: Mapping[str, Any] | None = None
) -> DatasetEvaluator:
    """The evaluator of a catalog dataset, chosen by its ``evaluator`` field.

    Args:
        dataset: a catalog name or entry (a name is looked up with :func:`ovd.data.catalog.get_dataset`).
        masks: also score masks (a Mask R-CNN); dropped with a warning when some GT annotation has no
            ``segmentation``.
        gt: the loaded annotation file; read from ``ann_file`` when not given.

    Raises:
        OVDError: an unknown dataset, or an ``evaluator`` value that names no evaluator (the message
            lists the valid ones).
    """
    info = get_dataset(dataset) if isinstance(dataset, str) else dataset
    kind = info.evaluator
    if kind not in EVALUATORS:
        raise OVDError(
            f"unknown evaluator {kind!r} (valid: {', '.join(sorted(EVALUATORS))})",
            field=f"catalog[{info.name}].evaluator",
        )
    gt = read_json(info.ann_file_path) if gt is None else gt
    if masks and not all("segmentation" in a for a in gt.get("annotations", [])):
        logger.warning("%s has annotations without a segmentation: mask AP is not computed", info.name)
        masks = False
    return EVALUATORS[kind](info, gt, ("bbox", "segm") if masks else ("bbox",))
