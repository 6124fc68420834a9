"""Run a detector over a dataset and score it with the dataset's metric: OV-COCO (novel / base AP50) or
LVIS (APr / APc / APf), chosen by its catalog entry; boxes, and masks for a Mask R-CNN."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_util
from torch import nn
from tqdm import tqdm

from ovd.config import Config
from ovd.data.catalog import DatasetInfo
from ovd.data.coco import load_dataset
from ovd.data.loader import build_test_loader
from ovd.data.transforms import ResizeFlipAugmentation
from ovd.engine import distributed as dist
from ovd.evaluation.evaluator import build_evaluator
from ovd.modeling.mask_head import paste
from ovd.structures import Detections

logger = logging.getLogger(__name__)

MASK_THRESHOLD = 0.5
"""A pasted mask probability ≥ this is object (detectron2 and torchvision Mask R-CNN)."""
PASTE_CHUNK = 64
"""Detections pasted into the image at once: bounds memory to ``PASTE_CHUNK × H × W`` floats."""


def test_augmentation(cfg: Config) -> ResizeFlipAugmentation:
    return ResizeFlipAugmentation((cfg.input.min_size_test,), cfg.input.max_size_test, flip_prob=0.0)


def encode_masks(
    det: Detections, boxes: torch.Tensor, image_size: tuple[int, int], paste_style: str = "torchvision"
) -> list[dict[str, Any]]:
    """Compressed COCO RLEs of a Mask R-CNN's detections, pasted into the original image.

    Args:
        det: detections with ``masks`` ``Tensor[N, 1, M, M]`` (box-relative probabilities).
        boxes: ``Tensor[N, 4]`` the same boxes in original-image pixels.
        image_size: ``(H, W)`` of the original image.
        paste_style: ``model.mask.paste`` (:func:`ovd.modeling.mask_head.paste`).

    Returns:
        ``N`` dicts ``{"size": [H, W], "counts": str}``: the pasted masks at :data:`MASK_THRESHOLD`.
    """
    assert det.masks is not None
    out: list[dict[str, Any]] = []
    for start in range(0, len(det), PASTE_CHUNK):
        chunk = slice(start, start + PASTE_CHUNK)
        pasted = paste(det.masks[chunk], boxes[chunk].to(det.masks.device), image_size, paste_style)  # (n, H, W)
        binary = (pasted >= MASK_THRESHOLD).to(torch.uint8).cpu().numpy()  # (n, H, W)
        for rle in mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0))):
            out.append({"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")})
    return out


@torch.no_grad()
def predict_dataset(
    model: nn.Module,
    info: DatasetInfo,
    cfg: Config,
    *,
    progress: bool = True,
    on_features: Callable[[list[dict[str, Any]], dict[str, torch.Tensor]], None] | None = None,
) -> list[dict[str, Any]]:
    """Detections on every image of ``info`` as COCO results (original-image ``xywh``, dataset
    category ids, and a compressed-RLE ``segmentation`` when the model predicts masks), gathered from
    all ranks. ``on_features(batch items, backbone features)`` is called after each batch's forward."""
    records = load_dataset(info, with_masks=False)  # ground-truth masks are not needed to predict
    loader = build_test_loader(
        records,
        test_augmentation(cfg),
        batch_size=cfg.test.batch_size,
        num_workers=cfg.data.num_workers,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
    )
    was_training = model.training
    model.eval()
    results: list[dict[str, Any]] = []
    cat_ids = info.category_ids
    bar = tqdm(loader, desc=f"eval {info.name}", disable=not (progress and dist.is_main_process()), unit="batch")
    captured: list[dict[str, torch.Tensor]] = []  # the backbone's output of the forward below: not run twice
    hook = None if on_features is None else model.backbone.register_forward_hook(lambda m, a, o: captured.append(o))
    for batch in bar:
        captured.clear()
        outputs = model([b["image"] for b in batch])
        if on_features is not None:
            on_features(batch, captured[0])
        for item, det in zip(batch, outputs, strict=True):
            boxes = torch.as_tensor(item["params"].inverse_boxes(det.boxes.float().cpu().numpy()))  # (N, 4)
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
            segms = (
                encode_masks(det, boxes, item["orig_size"], cfg.model.mask.paste)
                if det.masks is not None
                else [None] * len(det)
            )
            for box, score, label, segm in zip(xywh, det.scores.tolist(), det.labels.tolist(), segms, strict=True):
                result = {
                    "image_id": int(item["image_id"]),
                    "category_id": int(cat_ids[label]),
                    "bbox": box,
                    "score": score,
                }
                if segm is not None:
                    result["segmentation"] = segm
                results.append(result)
    if hook is not None:
        hook.remove()
    model.train(was_training)
    gathered = dist.all_gather_objects(results)
    return [r for part in gathered for r in part]


def _fidelity_teacher(model: nn.Module, info: DatasetInfo, cfg: Config, output_dir: Path) -> tuple[list, Any]:
    """``(records with boxes, RegionStore)``: CLIP embeddings of ``info``'s ground-truth boxes, extracted
    into ``output_dir/fidelity_regions`` the first time."""
    from ovd.clip import create_clip
    from ovd.config import ExtractionCfg
    from ovd.distill.extract import extract_region_embeddings
    from ovd.distill.fidelity import KEEP_ALL_NMS, GroundTruthProposals
    from ovd.distill.store import RegionStore, store_is_complete

    records = [r for r in load_dataset(info) if len(r.boxes)]
    path = output_dir / "fidelity_regions"
    if not store_is_complete(path):
        clip = create_clip(cfg.clip.model, cfg.clip.pretrained or None, device=model.device)
        extract_region_embeddings(
            records,
            GroundTruthProposals(),
            clip,
            path,
            ExtractionCfg(
                k=max(len(r.boxes) for r in records), nms_thresh=KEEP_ALL_NMS, num_workers=cfg.data.num_workers
            ),
            dataset_name=info.name,
            progress=False,
        )
    return records, RegionStore.open(path)


def _fidelity(
    model: nn.Module, info: DatasetInfo, cfg: Config, output_dir: Path, collector: Any = None
) -> dict[str, Any]:
    """Region fidelity of the student (see :mod:`ovd.distill.fidelity`) on ``info``'s ground truth;
    with a ``FidelityCollector`` filled during prediction, from its embeddings (no second pass)."""
    from ovd.distill.fidelity import region_fidelity

    records, store = _fidelity_teacher(model, info, cfg, output_dir)
    return region_fidelity(
        model,
        records,
        store,
        model.roi_heads.classifier.vocabulary[:-1],
        base_classes=info.base_classes,
        novel_classes=info.novel_classes,
        augmentation=test_augmentation(cfg),
        students=None if collector is None else collector.students,
    )


def evaluate(model: nn.Module, info: DatasetInfo, cfg: Config, output_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Predict, score and write ``metrics.json``, the per-class table and the detections under
    ``output_dir`` (rank 0). Returns the metrics on every rank.

    The metric is the dataset's own (its catalog ``evaluator`` field, :func:`ovd.evaluation.evaluator.build_evaluator`):
    ``coco_ovd``, the OV-COCO metric (novel / base / all AP50), or ``lvis``, the federated LVIS metric
    with APr / APc / APf (at most 300 detections per image). A model with a mask head is also scored on
    masks: ``metrics["segm"]`` beside the box metrics (``metrics["bbox"]`` for LVIS, the top level for
    OV-COCO). With ``test.region_fidelity`` the student's region fidelity is added to the metrics.
    """
    collector = None
    if cfg.test.region_fidelity and dist.get_world_size() == 1 and cfg.test.batch_size == 1:
        # the student's region embeddings come from the prediction pass's own features (same images,
        # same test transform, one image per batch): identical numbers, one backbone pass instead of two
        from ovd.distill.fidelity import FidelityCollector

        collector = FidelityCollector(model, _fidelity_teacher(model, info, cfg, Path(output_dir))[1])
    detections = predict_dataset(model, info, cfg, on_features=collector)
    metrics: dict[str, Any] = {}
    if dist.is_main_process():
        out = Path(output_dir)
        segm = getattr(model.roi_heads, "mask_head", None) is not None  # a Mask R-CNN: mask AP too
        evaluator = build_evaluator(info, masks=segm)
        metrics = evaluator.evaluate(detections)
        metrics["dataset"] = info.name
        if cfg.test.region_fidelity:
            metrics |= _fidelity(model, info, cfg, out, collector)
        path = evaluator.write_report(metrics, out, detections=detections)
        logger.info("evaluation of %s:\n%s\nwritten to %s", info.name, evaluator.format_table(metrics), path)
    return dist.all_gather_objects(metrics)[0]
