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
from ovd.data.transforms import ResizeFlipAugmentation
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
def region_fidelity(
    model: OpenVocabDetector,
    records: Sequence[ImageRecord],
    teacher: RegionStore,
    text_embeddings: Tensor,
    *,
    base_classes: Sequence[int],
    novel_classes: Sequence[int],
    augmentation: ResizeFlipAugmentation,
) -> dict[str, float | None]:
    """Student-vs-teacher statistics on the stored ground-truth regions of ``records``.

    Args:
        model: the detector (its RoI feature extractor and classifier projection make the student).
        teacher: CLIP embeddings of the records' ground-truth boxes (a store made with
            :class:`GroundTruthProposals`).
        text_embeddings: ``Tensor[C, D]`` class embeddings of the vocabulary.
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
        params = augmentation.sample(rec.height, rec.width, np.random.default_rng(0))
        image = torch.from_numpy(np.ascontiguousarray(params.apply_image(read_record_image(rec))))
        batch = model.preprocess([image.permute(2, 0, 1)])
        feats = model.features(batch)
        student_boxes = torch.from_numpy(params.apply_boxes(boxes)).to(model.device)
        s = F.normalize(model.roi_heads.region_embeddings(feats, [student_boxes], batch.image_sizes).float(), dim=1)
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
