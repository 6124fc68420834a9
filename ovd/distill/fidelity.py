"""How faithfully the student's region embeddings follow the CLIP teacher (beyond the reference,
after Stanton et al., "Does Knowledge Distillation Really Work?").

On held-out regions (the ground-truth boxes of the evaluation set) it reports, separately for base
and novel classes: the mean cosine between student and teacher embeddings, the top-1 agreement of
their zero-shot classifications over the vocabulary, and each one's top-1 accuracy.

Shape shorthand: ``K`` regions of an image, ``D`` CLIP dim, ``C`` classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ovd.data.loader import read_record_image
from ovd.data.transforms import ResizeFlipAugmentation, TransformParams
from ovd.distill.proposals import Proposals, ProposalSource
from ovd.distill.store import RegionStore
from ovd.modeling.detector import OpenVocabDetector
from ovd.structures import ImageRecord

KEEP_ALL_NMS = 1.0  # NMS threshold that suppresses nothing: every ground-truth box is a region


class GroundTruthProposals(ProposalSource):
    """The records' own boxes, each with score 1: held-out regions with known classes."""

    needs_images = False
    images_per_call = 64

    def __call__(self, records: Sequence[ImageRecord], images: Sequence[np.ndarray] | None = None) -> list[Proposals]:
        return [(r.boxes.astype(np.float32), np.ones(len(r.boxes), np.float32)) for r in records]

    def describe(self) -> dict[str, Any]:
        return {"kind": "ground_truth"}


def _labels_of(stored: np.ndarray, record: ImageRecord) -> np.ndarray:
    """Class of each stored box: the ground-truth box it was copied from (``int64[K]``)."""
    dist = np.abs(stored[:, None, :] - record.boxes[None, :, :]).sum(-1)  # (K, N)
    return record.labels[dist.argmin(1)]


@torch.no_grad()
def student_embeddings(
    model: OpenVocabDetector,
    features: dict[str, Tensor],
    boxes: np.ndarray,
    params: TransformParams,
    image_size: tuple[int, int],
) -> Tensor:
    """Unit student embeddings ``Tensor[K, D]`` of one image's stored ``boxes`` (``float32[K, 4]``,
    original pixels) from its features (a batch of that one image, transformed by ``params``)."""
    student_boxes = torch.from_numpy(params.apply_boxes(boxes)).to(model.device)
    return F.normalize(model.roi_heads.region_embeddings(features, [student_boxes], [image_size]).float(), dim=1)


class FidelityCollector:
    """Student embeddings of the teacher's regions, taken from the features of the evaluation's own
    forward passes (``ovd.engine.evaluate.predict_dataset(on_features=...)``, one image per batch: the
    same features :func:`region_fidelity` computes, without a second pass over the images)."""

    def __init__(self, model: OpenVocabDetector, teacher: RegionStore) -> None:
        self.model = model
        self.teacher = teacher
        self.students: dict[int, Tensor] = {}

    def __call__(self, items: Sequence[dict[str, Any]], features: dict[str, Tensor]) -> None:
        if len(items) != 1:
            raise ValueError("FidelityCollector needs one image per batch")
        item = items[0]
        boxes, _ = self.teacher.lookup(int(item["image_id"]))  # (K, 4)
        if len(boxes):
            size = (int(item["image"].shape[-2]), int(item["image"].shape[-1]))
            self.students[int(item["image_id"])] = student_embeddings(self.model, features, boxes, item["params"], size)


@torch.no_grad()
def region_fidelity(
    model: OpenVocabDetector,
    records: Sequence[ImageRecord],
    teacher: RegionStore,
    text_embeddings: Tensor,
    *,
    base_classes: Sequence[int],
    novel_classes: Sequence[int],
    augmentation: ResizeFlipAugmentation,
    students: dict[int, Tensor] | None = None,
) -> dict[str, float | None]:
    """Student-vs-teacher statistics on the stored ground-truth regions of ``records``.

    Args:
        model: the detector (its RoI feature extractor and classifier projection make the student).
        teacher: CLIP embeddings of the records' ground-truth boxes (a store made with
            :class:`GroundTruthProposals`).
        text_embeddings: ``Tensor[C, D]`` class embeddings of the vocabulary.
        students: image id → unit student embeddings ``Tensor[K, D]`` already computed (a
            :class:`FidelityCollector`'s); None = run the model here, one image at a time.
    Returns:
        ``fidelity_{cosine,agreement,student_acc,teacher_acc}_{base,novel}`` (percent for the last
        three, ``None`` where a split has no region) and ``fidelity_regions_{base,novel}``.
    """
    was_training = model.training
    model.eval()
    text = F.normalize(text_embeddings.float().to(model.device), dim=1)  # (C, D)
    cos, agree, s_ok, t_ok, labels = [], [], [], [], []
    for rec in records:
        boxes, t_emb = teacher.lookup(int(rec.image_id))  # (K, 4), (K, D)
        if len(boxes) == 0:
            continue
        if students is not None:
            s = students[int(rec.image_id)].to(model.device)  # (K, D)
        else:
            params = augmentation.sample(rec.height, rec.width, np.random.default_rng(0))
            image = torch.from_numpy(np.ascontiguousarray(params.apply_image(read_record_image(rec))))
            batch = model.preprocess([image.permute(2, 0, 1)])
            s = student_embeddings(model, model.features(batch), boxes, params, batch.image_sizes[0])
        t = F.normalize(torch.from_numpy(np.asarray(t_emb, np.float32)).to(model.device), dim=1)  # (K, D)
        y = torch.from_numpy(_labels_of(boxes, rec)).to(model.device)  # (K,)
        s_cls, t_cls = (s @ text.T).argmax(1), (t @ text.T).argmax(1)  # (K,)
        cos.append((s * t).sum(1))
        agree.append(s_cls == t_cls)
        s_ok.append(s_cls == y)
        t_ok.append(t_cls == y)
        labels.append(y)
    model.train(was_training)
    out: dict[str, float | None] = {}
    if not labels:
        return out
    y = torch.cat(labels)
    for split, ids in (("base", base_classes), ("novel", novel_classes)):
        mask = torch.isin(y, torch.as_tensor(list(ids), device=y.device, dtype=torch.int64))
        n = int(mask.sum())
        out[f"fidelity_regions_{split}"] = n
        for name, values, scale in (
            ("cosine", cos, 1.0),
            ("agreement", agree, 100.0),
            ("student_acc", s_ok, 100.0),
            ("teacher_acc", t_ok, 100.0),
        ):
            v = torch.cat(values)[mask].float()
            out[f"fidelity_{name}_{split}"] = round(scale * v.mean().item(), 4) if n else None
    return out


def teacher_store_path(output_dir: Path, dataset: str) -> Path:
    return output_dir / "fidelity_regions" / dataset
