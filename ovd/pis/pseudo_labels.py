"""Pseudo boxes for image-level labels (PIS, METHOD §4.2).

For each image with image-level labels (caption tags, ImageNet classes) and each label, a source
proposes **one** box with a score; the label keeps it when the score exceeds the source's threshold.
Two sources share the :class:`PseudoBoxSource` interface:

* :class:`ClipScoredProposals` (default): the image's stored class-agnostic proposals with their CLIP
  image embeddings (the RKD region store, :mod:`ovd.distill.store`) are scored against the label's
  CLIP text embedding; the best proposal wins. It replaces MAVL, which is unavailable and whose
  training data covered the novel classes (METHOD §9.1).
* :class:`FileBoxes`: class-specific boxes made elsewhere (e.g. MAVL's top-1 box per query, METHOD
  §4.2: per-image pickles ``{category_id: ([box_xyxy], [score])}``, or a COCO results JSON), kept above
  a threshold (the reference's 0.95).

The output (:func:`pseudo_label_json`) is a standard COCO JSON that pycocotools loads: the images
with ``pos_category_ids`` = the labels that got a box (images left with none are dropped, as the
reference drops them, METHOD §4.2), one annotation per (image, label) with an **xywh** ``bbox``, its
``score``, ``area`` and ``iscrowd: 0``, and the categories. ``ovd.data.coco.load_coco_json(...,
ann_type="pseudo")`` reads it back.

Shape shorthand: ``K`` stored regions of an image, ``C`` classes, ``D`` CLIP embedding dim.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ovd.data.catalog import DatasetInfo
from ovd.errors import OVDError
from ovd.structures import ImageRecord
from ovd.utils.io import write_json

SCORES = ("softmax", "cosine")


class PseudoBoxSource(Protocol):
    """Proposes one box per image-level label."""

    def __call__(self, record: ImageRecord) -> dict[int, tuple[np.ndarray, float]]:
        """``{contiguous label: (float32[4] xyxy box in original pixels, score)}`` for the labels of
        ``record.pos_labels`` that get a box (those below the threshold are left out)."""
        ...


class ClipScoredProposals:
    """The stored proposal whose CLIP embedding best matches the label's text embedding.

    Args:
        store: a region store (path or :class:`ovd.distill.store.RegionStore`) covering the images.
        class_embeddings: ``Tensor[C, D]`` CLIP text embeddings of the dataset's classes (the same
            CLIP as the store's image embeddings).
        score: ``"softmax"``: the label's probability among all ``C`` classes, ``softmax(s · cos)``
            over the vocabulary, so a region that looks more like another class loses; ``"cosine"``:
            the raw cosine similarity.
        threshold: a label keeps its best region only when the score exceeds this.
        logit_scale: ``s`` of the softmax (CLIP's learnt scale is 100).
    """

    def __init__(
        self,
        store: Any,
        class_embeddings: Tensor,
        *,
        score: str = "softmax",
        threshold: float = 0.3,
        logit_scale: float = 100.0,
    ) -> None:
        from ovd.distill.store import RegionStore

        if score not in SCORES:
            raise OVDError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}", field="score")
        self.store = RegionStore.open(store) if isinstance(store, (str, os.PathLike)) else store
        emb = torch.as_tensor(class_embeddings, dtype=torch.float32)
        if emb.ndim != 2 or emb.shape[1] != self.store.embed_dim:
            raise OVDError(
                f"class embeddings of shape {tuple(emb.shape)} do not match the store's dim {self.store.embed_dim}",
                field="class_embeddings",
            )
        self.text = F.normalize(emb, dim=1)  # (C, D)
        self.score = score
        self.threshold = threshold
        self.logit_scale = logit_scale

    def scores(self, embeddings: np.ndarray) -> Tensor:
        """``float[K, D]`` region embeddings → ``Tensor[K, C]`` scores of every class."""
        cos = F.normalize(torch.as_tensor(embeddings, dtype=torch.float32), dim=1) @ self.text.T  # (K, C)
        return (self.logit_scale * cos).softmax(dim=1) if self.score == "softmax" else cos

    def __call__(self, record: ImageRecord) -> dict[int, tuple[np.ndarray, float]]:
        if int(record.image_id) not in self.store:
            raise OVDError(f"image {record.image_id} has no stored regions", path=str(self.store.path))
        boxes, emb = self.store.lookup(int(record.image_id))  # (K, 4), (K, D)
        if len(boxes) == 0:
            return {}
        scores = self.scores(emb)  # (K, C)
        out = {}
        for label in np.asarray(record.pos_labels).tolist():
            best = int(scores[:, label].argmax())
            value = float(scores[best, label])
            if value > self.threshold:
                out[int(label)] = (boxes[best].astype(np.float32), value)
        return out


class FileBoxes:
    """Class-specific boxes read from files, kept above a score threshold.

    Args:
        path: a folder of per-image pickles ``<file stem>.pkl`` holding ``{category_id: ([box_xyxy],
            [score])}`` (MAVL's format, METHOD §4.2), or a COCO results JSON (``image_id``,
            ``category_id``, ``bbox`` xywh, ``score``): the best box per (image, category) is used.
        category_ids: dataset category id of each contiguous id.
        threshold: keep a box when its score exceeds this (reference: 0.95 on COCO).
    """

    def __init__(self, path: str | os.PathLike[str], category_ids: Sequence[int], *, threshold: float = 0.95) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise OVDError("pseudo-box file or folder not found", path=self.path)
        self.contiguous = {int(c): k for k, c in enumerate(category_ids)}
        self.threshold = threshold
        self._results: dict[int, dict[int, tuple[np.ndarray, float]]] | None = None
        if self.path.is_file():
            self._results = self._read_results(self.path)

    def _read_results(self, path: Path) -> dict[int, dict[int, tuple[np.ndarray, float]]]:
        try:
            dets = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise OVDError(f"cannot read detections JSON: {e}", path=path) from e
        if not isinstance(dets, list):
            raise OVDError("expected a COCO results list", path=path)
        out: dict[int, dict[int, tuple[np.ndarray, float]]] = {}
        for i, d in enumerate(dets):
            try:
                image_id, cid, (x, y, w, h), score = int(d["image_id"]), int(d["category_id"]), d["bbox"], d["score"]
            except (KeyError, TypeError, ValueError) as e:
                raise OVDError("needs image_id, category_id, bbox [x, y, w, h] and score", path=path,
                               field=f"[{i}]") from e  # fmt: skip
            if cid not in self.contiguous:
                raise OVDError(f"unknown category id {cid}", path=path, field=f"[{i}].category_id")
            label = self.contiguous[cid]
            per_image = out.setdefault(image_id, {})
            if label not in per_image or score > per_image[label][1]:
                per_image[label] = (np.array([x, y, x + w, y + h], dtype=np.float32), float(score))
        return out

    def _read_pickle(self, record: ImageRecord) -> dict[int, tuple[np.ndarray, float]]:
        path = self.path / f"{Path(record.file_name).stem}.pkl"
        if not path.is_file():
            raise OVDError(f"no pseudo-box file for image {record.image_id}", path=path)
        try:
            with open(path, "rb") as f:
                raw = pickle.load(f)  # noqa: S301 (the user's own MAVL outputs)
        except Exception as e:
            raise OVDError(f"cannot read pseudo-box pickle ({type(e).__name__})", path=path) from e
        out = {}
        for key, value in dict(raw).items():
            if key == "salient" or int(key) not in self.contiguous:
                continue
            boxes, scores = value
            if len(boxes):
                out[self.contiguous[int(key)]] = (np.asarray(boxes[0], dtype=np.float32), float(scores[0]))
        return out

    def __call__(self, record: ImageRecord) -> dict[int, tuple[np.ndarray, float]]:
        found = self._results.get(int(record.image_id), {}) if self._results is not None else self._read_pickle(record)
        labels = set(np.asarray(record.pos_labels).tolist())
        return {k: v for k, v in found.items() if k in labels and v[1] > self.threshold}


def pseudo_label_json(
    records: Sequence[ImageRecord],
    boxes: Sequence[Mapping[int, tuple[np.ndarray, float]]],
    categories: Sequence[Mapping[str, Any]],
    category_ids: Sequence[int],
    image_root: str | os.PathLike[str],
) -> dict[str, Any]:
    """The COCO JSON of the pseudo labels (see the module docstring).

    Args:
        records: the image-labelled images.
        boxes: per record, ``{label: (xyxy box, score)}``.
        categories: the dataset's COCO categories, written as they are.
        category_ids: dataset category id of each contiguous id.
        image_root: the folder the records' file names are made relative to.
    """
    root = Path(image_root).resolve()
    images, annotations = [], []
    for rec, found in zip(records, boxes, strict=True):
        if not found:
            continue
        try:
            file_name = str(Path(rec.file_name).resolve().relative_to(root))
        except ValueError:
            file_name = rec.file_name
        labels = sorted(found)
        images.append(
            {"id": int(rec.image_id), "file_name": file_name, "height": rec.height, "width": rec.width,
             "pos_category_ids": [int(category_ids[k]) for k in labels]}
        )  # fmt: skip
        for k in labels:
            box, score = found[k]
            x1, y1, x2, y2 = (float(v) for v in box)
            x1, y1 = max(0.0, min(x1, rec.width)), max(0.0, min(y1, rec.height))
            x2, y2 = max(x1, min(x2, rec.width)), max(y1, min(y2, rec.height))
            annotations.append(
                {"id": len(annotations) + 1, "image_id": int(rec.image_id), "category_id": int(category_ids[k]),
                 "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "score": round(score, 6),
                 "iscrowd": 0}
            )  # fmt: skip
    return {"images": images, "annotations": annotations, "categories": [dict(c) for c in categories]}


def generate_pseudo_labels(
    info: DatasetInfo, source: PseudoBoxSource, output: str | os.PathLike[str], *, progress: bool = True
) -> dict[str, Any]:
    """Pseudo-label the image-label dataset ``info`` with ``source`` and write the JSON atomically.

    Returns:
        ``{"images": n with a box, "labels": n labels in, "boxes": n boxes out, "per_class": {name: n}}``.
    """
    from ovd.data.coco import load_dataset
    from ovd.utils.io import read_json

    if info.ann_type not in ("image", "pseudo"):
        raise OVDError(f"{info.name!r} has no image-level labels (ann_type {info.ann_type!r})", field="dataset")
    records = load_dataset(info)
    found = [source(r) for r in tqdm(records, desc="pseudo labels", unit="img", disable=not progress)]
    raw = read_json(info.ann_file_path)
    categories = raw.get("categories") if isinstance(raw, dict) else None
    if not isinstance(categories, list):
        categories = [{"id": int(c), "name": n} for c, n in zip(info.category_ids, info.class_names, strict=True)]
    data = pseudo_label_json(records, found, categories, info.category_ids, info.image_root_path)
    write_json(output, data)
    per_class = {n: 0 for n in info.class_names}
    for f in found:
        for k in f:
            per_class[info.class_names[k]] += 1
    return {
        "images": len(data["images"]),
        "labels": int(sum(len(r.pos_labels) for r in records)),
        "boxes": len(data["annotations"]),
        "per_class": per_class,
    }
