"""Run a detector over a dataset and score it with the OV-COCO metric."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ovd.config import Config
from ovd.data.catalog import DatasetInfo
from ovd.data.coco import load_dataset
from ovd.data.loader import build_test_loader
from ovd.data.transforms import ResizeFlipAugmentation
from ovd.engine import distributed as dist
from ovd.evaluation.coco_ovd import evaluate_ovd, format_table, write_report

logger = logging.getLogger(__name__)


def test_augmentation(cfg: Config) -> ResizeFlipAugmentation:
    return ResizeFlipAugmentation((cfg.input.min_size_test,), cfg.input.max_size_test, flip_prob=0.0)


@torch.no_grad()
def predict_dataset(model: nn.Module, info: DatasetInfo, cfg: Config, *, progress: bool = True) -> list[dict[str, Any]]:
    """Detections on every image of ``info`` as COCO results (original-image ``xywh``, dataset
    category ids), gathered from all ranks."""
    records = load_dataset(info)
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
    for batch in bar:
        outputs = model([b["image"] for b in batch])
        for item, det in zip(batch, outputs, strict=True):
            boxes = torch.as_tensor(item["params"].inverse_boxes(det.boxes.float().cpu().numpy()))  # (N, 4)
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
            for box, score, label in zip(xywh, det.scores.tolist(), det.labels.tolist(), strict=True):
                results.append(
                    {
                        "image_id": int(item["image_id"]),
                        "category_id": int(cat_ids[label]),
                        "bbox": box,
                        "score": score,
                    }
                )
    model.train(was_training)
    gathered = dist.all_gather_objects(results)
    return [r for part in gathered for r in part]


def _fidelity(model: nn.Module, info: DatasetInfo, cfg: Config, output_dir: Path) -> dict[str, Any]:
    """Region fidelity of the student (see :mod:`ovd.distill.fidelity`) on ``info``'s ground truth."""
    from ovd.clip import create_clip
    from ovd.distill.extract import extract_region_embeddings
    from ovd.distill.fidelity import KEEP_ALL_NMS, GroundTruthProposals, region_fidelity
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
            k=max(len(r.boxes) for r in records),
            nms_thresh=KEEP_ALL_NMS,
            num_workers=cfg.data.num_workers,
            dataset_name=info.name,
            progress=False,
        )
    return region_fidelity(
        model,
        records,
        RegionStore.open(path),
        model.roi_heads.classifier.vocabulary[:-1],
        base_classes=info.base_classes,
        novel_classes=info.novel_classes,
        augmentation=test_augmentation(cfg),
    )


def evaluate(model: nn.Module, info: DatasetInfo, cfg: Config, output_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Predict, score (novel / base / all AP50) and write ``metrics.json``, the per-class table and
    the detections under ``output_dir`` (rank 0). Returns the metrics on every rank."""
    detections = predict_dataset(model, info, cfg)
    metrics: dict[str, Any] = {}
    if dist.is_main_process():
        metrics = evaluate_ovd(
            info.ann_file_path,
            detections,
            base_category_ids=[info.category_ids[i] for i in info.base_classes],
            novel_category_ids=[info.category_ids[i] for i in info.novel_classes],
        )
        metrics["dataset"] = info.name
        if cfg.test.region_fidelity:
            metrics |= _fidelity(model, info, cfg, Path(output_dir))
        path = write_report(metrics, Path(output_dir), detections=detections)
        logger.info("evaluation of %s:\n%s\nwritten to %s", info.name, format_table(metrics), path)
    return dist.all_gather_objects(metrics)[0]
