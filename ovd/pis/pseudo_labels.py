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

The output (:func:`pseudo_label_json`) is a standard COCO JSON that pycocotools loads::

    {"images": [{"id", "file_name", "height", "width", "pos_category_ids": [dataset ids of the labels
                 that got a box, sorted]}, ...],
     "annotations": [{"id" (1..), "image_id", "category_id", "bbox": [x, y, w, h] (pixels, clipped
                      to the image), "area": w * h, "score", "iscrowd": 0}, ...],  # one per (image, label)
     "categories": [the dataset's categories, as given]}

Labels whose box was rejected (score at or below the threshold, or a box thinner than
``min_side`` px after clipping) are left out of ``pos_category_ids``, and images left with no label
are dropped, as the reference drops them (METHOD §4.2). ``ovd.data.coco.load_coco_json(...,
ann_type="pseudo")`` reads the file back.

Shape shorthand: ``K`` stored regions of an image, ``C`` classes, ``D`` CLIP embedding dim.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ovd.data.catalog import DatasetInfo
from ovd.data.loader import MIN_BOX_SIDE_PX
from ovd.errors import OVDError
from ovd.structures import ImageRecord
from ovd.utils.io import load_plain_pickle, read_json, write_json

logger = logging.getLogger(__name__)

SCORES = ("softmax", "cosine")
"""Scores of :class:`ClipScoredProposals`."""

DEFAULT_CLIP_SCORE = "softmax"
DEFAULT_CLIP_THRESHOLD = 0.3  # softmax probability of the label among the vocabulary; ours, not the reference's
DEFAULT_LOGIT_SCALE = 100.0  # CLIP's learnt logit scale (exp(4.6052))
DEFAULT_FILE_THRESHOLD = 0.95  # MAVL top-1 score threshold on COCO (METHOD §4.2)

PseudoBoxes = dict[int, tuple[np.ndarray, float]]
"""``{contiguous label: (float32[4] xyxy box in original-image pixels, score)}`` of one image."""


class PseudoBoxSource(Protocol):
    """Proposes one box per image-level label."""

    def check(self, records: Sequence[ImageRecord]) -> None:
        """Raise :class:`OVDError` when some records cannot be served (before any work is done)."""
        ...

    def __call__(self, record: ImageRecord) -> PseudoBoxes:
        """The boxes of the labels of ``record.pos_labels`` that get one (those at or below the
        threshold are left out)."""
        ...


class ClipScoredProposals:
    """The stored proposal whose CLIP embedding best matches the label's text embedding.

    For label ``c`` of an image with regions ``r_1..r_K`` (unit embeddings ``e_k``) and unit class
    text embeddings ``t_1..t_C``: ``k* = argmax_k score(k, c)``; the label keeps ``box[k*]`` when
    ``score(k*, c) > threshold``. With ``score="cosine"``, ``score(k, c) = e_k · t_c``; with
    ``score="softmax"``, ``score(k, c) = softmax_c'(s · e_k · t_c')[c]``, the label's probability among
    **all** ``C`` classes of the dataset's vocabulary, so a region that looks more like another class
    loses (it also makes one threshold mean the same for every class).

    Args:
        store: a region store (path or :class:`ovd.distill.store.RegionStore`) covering the images.
        class_embeddings: ``Tensor[C, D]`` CLIP text embeddings of the dataset's classes in
            contiguous-id order (the same CLIP as the store's image embeddings); normalised here.
        score: ``"softmax"`` or ``"cosine"`` (above).
        threshold: a label keeps its best region only when the score exceeds this.
        logit_scale: ``s`` of the softmax.
    """

    def __init__(
        self,
        store: Any,
        class_embeddings: Tensor,
        *,
        score: str = DEFAULT_CLIP_SCORE,
        threshold: float = DEFAULT_CLIP_THRESHOLD,
        logit_scale: float = DEFAULT_LOGIT_SCALE,
    ) -> None:
        from ovd.distill.store import RegionStore

        if score not in SCORES:
            raise OVDError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}", field="score")
        self.store = RegionStore.open(store) if isinstance(store, (str, os.PathLike)) else store
        emb = torch.as_tensor(class_embeddings, dtype=torch.float32)
        if emb.ndim != 2 or emb.shape[1] != self.store.embed_dim:
            raise OVDError(
                f"class embeddings of shape {tuple(emb.shape)} do not match the store's dim {self.store.embed_dim}",
                path=str(self.store.path),
                field="class_embeddings",
            )
        self.text = F.normalize(emb, dim=1)  # (C, D)
        self.score = score
        self.threshold = threshold
        self.logit_scale = logit_scale

    @property
    def num_classes(self) -> int:
        return int(self.text.shape[0])

    def scores(self, embeddings: np.ndarray) -> Tensor:
        """``float[K, D]`` region embeddings → ``Tensor[K, C]`` scores of every class."""
        cos = F.normalize(torch.as_tensor(embeddings, dtype=torch.float32), dim=1) @ self.text.T  # (K, C)
        return (self.logit_scale * cos).softmax(dim=1) if self.score == "softmax" else cos

    def check(self, records: Sequence[ImageRecord]) -> None:
        """Every record's image is in the store and its labels are in the vocabulary."""
        missing = self.store.missing(int(r.image_id) for r in records)
        if missing:
            raise OVDError(
                f"{len(missing)} of {len(records)} images have no stored regions (e.g. image ids {missing[:5]}); "
                "extract regions for this dataset's images",
                path=str(self.store.path),
            )
        for r in records:
            labels = np.asarray(r.pos_labels)
            if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise OVDError(f"image {r.image_id}: label outside 0..{self.num_classes - 1}", field="pos_labels")

    def __call__(self, record: ImageRecord) -> PseudoBoxes:
        if int(record.image_id) not in self.store:
            raise OVDError(f"image {record.image_id} has no stored regions", path=str(self.store.path))
        boxes, emb = self.store.lookup(int(record.image_id))  # (K, 4), (K, D): valid regions only
        labels = np.asarray(record.pos_labels, dtype=np.int64)  # (L,)
        if len(boxes) == 0 or labels.size == 0:
            return {}
        scores = self.scores(emb)[:, torch.from_numpy(labels)]  # (K, L)
        best_score, best = scores.max(dim=0)  # (L,), (L,)
        return {
            int(c): (boxes[int(k)].astype(np.float32), float(s))
            for c, k, s in zip(labels.tolist(), best.tolist(), best_score.tolist(), strict=True)
            if s > self.threshold
        }


class FileBoxes:
    """Class-specific boxes read from files, kept above a score threshold.

    Args:
        path: a folder of per-image pickles ``<file stem>.pkl`` holding ``{category_id: ([box_xyxy],
            [score])}`` (MAVL's format, METHOD §4.2; the first box is the top-1, a ``"salient"`` key
            and categories outside the vocabulary are ignored), or a COCO results JSON (``image_id``,
            ``category_id``, ``bbox`` xywh, ``score``): the best box per (image, category) is used.
            Boxes are in original-image pixels.
        category_ids: dataset category id of each contiguous id.
        threshold: keep a box when its score exceeds this (reference: 0.95 on COCO).
    """

    def __init__(
        self, path: str | os.PathLike[str], category_ids: Sequence[int], *, threshold: float = DEFAULT_FILE_THRESHOLD
    ) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise OVDError("pseudo-box file or folder not found", path=self.path)
        self.contiguous = {int(c): k for k, c in enumerate(category_ids)}
        self.threshold = threshold
        self._results: dict[int, PseudoBoxes] | None = None
        if self.path.is_file():
            self._results = self._read_results(self.path)

    def _read_results(self, path: Path) -> dict[int, PseudoBoxes]:
        try:
            dets = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise OVDError(f"cannot read detections JSON: {e}", path=path) from e
        if not isinstance(dets, list):
            raise OVDError("expected a COCO results list", path=path, field="<top level>")
        out: dict[int, PseudoBoxes] = {}
        for i, d in enumerate(dets):
            try:
                image_id, cid, score = int(d["image_id"]), int(d["category_id"]), float(d["score"])
                x, y, w, h = (float(v) for v in d["bbox"])
            except (KeyError, TypeError, ValueError) as e:
                raise OVDError("needs image_id, category_id, bbox [x, y, w, h] and score", path=path,
                               field=f"[{i}]") from e  # fmt: skip
            if cid not in self.contiguous:
                raise OVDError(f"unknown category id {cid}", path=path, field=f"[{i}].category_id")
            label = self.contiguous[cid]
            per_image = out.setdefault(image_id, {})
            if label not in per_image or score > per_image[label][1]:
                per_image[label] = (np.array([x, y, x + w, y + h], dtype=np.float32), score)
        return out

    def _pickle_path(self, record: ImageRecord) -> Path:
        return self.path / f"{Path(record.file_name).stem}.pkl"

    def _read_pickle(self, record: ImageRecord) -> PseudoBoxes:
        path = self._pickle_path(record)
        if not path.is_file():
            raise OVDError(f"no pseudo-box file for image {record.image_id}", path=path)
        raw = load_plain_pickle(path)  # numpy arrays, numbers, strings, containers only: no code runs
        if not isinstance(raw, Mapping):
            raise OVDError(f"expected a dict {{category_id: ([box], [score])}}, got {type(raw).__name__}", path=path)
        out: PseudoBoxes = {}
        for key, value in raw.items():
            if key == "salient":
                continue
            try:
                cid = int(key)
            except (TypeError, ValueError) as e:
                raise OVDError("keys must be category ids (or 'salient')", path=path, field=f"[{key!r}]") from e
            if cid not in self.contiguous:
                continue
            try:
                boxes, scores = value
                if not len(boxes):
                    continue
                box = np.asarray(boxes[0], dtype=np.float32).reshape(4)
                score = float(scores[0])
            except (TypeError, ValueError, IndexError) as e:
                raise OVDError("expected ([box_xyxy, ...], [score, ...])", path=path, field=f"[{key!r}]") from e
            out[self.contiguous[cid]] = (box, score)
        return out

    def check(self, records: Sequence[ImageRecord]) -> None:
        """With a pickle folder, every record has its pickle (a results JSON may skip images)."""
        if self._results is not None:
            return
        missing = [r for r in records if not self._pickle_path(r).is_file()]
        if missing:
            raise OVDError(
                f"{len(missing)} of {len(records)} images have no pseudo-box pickle (e.g. "
                f"{self._pickle_path(missing[0]).name})",
                path=self.path,
            )

    def __call__(self, record: ImageRecord) -> PseudoBoxes:
        found = self._results.get(int(record.image_id), {}) if self._results is not None else self._read_pickle(record)
        labels = set(np.asarray(record.pos_labels).tolist())
        return {k: v for k, v in found.items() if k in labels and v[1] > self.threshold}


def pseudo_label_json(
    records: Sequence[ImageRecord],
    boxes: Sequence[Mapping[int, tuple[np.ndarray, float]]],
    categories: Sequence[Mapping[str, Any]],
    category_ids: Sequence[int],
    image_root: str | os.PathLike[str],
    *,
    min_side: float = MIN_BOX_SIDE_PX,
) -> dict[str, Any]:
    """The COCO JSON of the pseudo labels (format in the module docstring).

    Args:
        records: the image-labelled images.
        boxes: per record, ``{label: (xyxy box, score)}``.
        categories: the dataset's COCO categories, written as they are.
        category_ids: dataset category id of each contiguous id.
        image_root: the folder the records' file names are made relative to.
        min_side: a box narrower or shorter than this (px, after clipping to the image) is rejected.
    """
    root = Path(image_root).resolve()
    images, annotations = [], []
    rejected = 0
    for rec, found in zip(records, boxes, strict=True):
        kept = []
        for k in sorted(found):
            box, score = found[k]
            x1, y1, x2, y2 = (float(v) for v in box)
            x1, y1 = max(0.0, min(x1, rec.width)), max(0.0, min(y1, rec.height))
            x2, y2 = max(x1, min(x2, rec.width)), max(y1, min(y2, rec.height))
            if x2 - x1 < min_side or y2 - y1 < min_side:
                rejected += 1
                continue
            kept.append((k, [x1, y1, x2 - x1, y2 - y1], float(score)))
        if not kept:
            continue
        try:
            file_name = str(Path(rec.file_name).resolve().relative_to(root))
        except ValueError:
            file_name = rec.file_name
        images.append(
            {"id": int(rec.image_id), "file_name": file_name, "height": rec.height, "width": rec.width,
             "pos_category_ids": [int(category_ids[k]) for k, _, _ in kept]}
        )  # fmt: skip
        for k, xywh, score in kept:
            annotations.append(
                {"id": len(annotations) + 1, "image_id": int(rec.image_id), "category_id": int(category_ids[k]),
                 "bbox": xywh, "area": xywh[2] * xywh[3], "score": round(score, 6), "iscrowd": 0}
            )  # fmt: skip
    if rejected:
        logger.warning("%d pseudo boxes thinner than %g px after clipping were rejected", rejected, min_side)
    return {"images": images, "annotations": annotations, "categories": [dict(c) for c in categories]}


def image_label_info(tags: str | os.PathLike[str], image_root: str | os.PathLike[str]) -> DatasetInfo:
    """A catalog entry for an image-label JSON outside the catalog (vocabulary = its ``categories``)."""
    path = Path(tags)
    data = read_json(path)
    cats = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(cats, list) or not cats:
        raise OVDError("expected a non-empty 'categories' list", path=path, field="categories")
    for i, c in enumerate(cats):
        if not isinstance(c, Mapping) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise OVDError("a category needs an integer 'id' and a string 'name'", path=path, field=f"categories[{i}]")
    return DatasetInfo(
        name=path.stem,
        image_root=str(Path(image_root).resolve()),
        ann_file=str(path.resolve()),
        class_names=tuple(c["name"] for c in cats),
        category_ids=tuple(c["id"] for c in cats),
        ann_type="image",
    )


def generate_pseudo_labels(
    info: DatasetInfo, source: PseudoBoxSource, output: str | os.PathLike[str], *, progress: bool = True
) -> dict[str, Any]:
    """Pseudo-label the image-label dataset ``info`` with ``source`` and write the JSON atomically.

    Returns:
        ``{"images": n images kept, "labels": n image-level labels in, "boxes": n boxes out,
        "per_class": {class name: n boxes}}``.
    """
    from ovd.data.coco import load_dataset

    if info.ann_type not in ("image", "pseudo"):
        raise OVDError(f"{info.name!r} has no image-level labels (ann_type {info.ann_type!r})", field="dataset")
    records = load_dataset(info)
    source.check(records)
    found = [source(r) for r in tqdm(records, desc="pseudo labels", unit="img", disable=not progress)]
    raw = read_json(info.ann_file_path)
    categories = raw.get("categories") if isinstance(raw, dict) else None
    if not isinstance(categories, list):
        categories = [{"id": int(c), "name": n} for c, n in zip(info.category_ids, info.class_names, strict=True)]
    data = pseudo_label_json(records, found, categories, info.category_ids, info.image_root_path)
    write_json(output, data)
    contiguous = {int(c): k for k, c in enumerate(info.category_ids)}
    per_class = {n: 0 for n in info.class_names}
    for ann in data["annotations"]:
        per_class[info.class_names[contiguous[ann["category_id"]]]] += 1
    stats = {
        "images": len(data["images"]),
        "labels": int(sum(len(r.pos_labels) for r in records)),
        "boxes": len(data["annotations"]),
        "per_class": per_class,
    }
    logger.info("%d of %d labels got a pseudo box, in %d of %d images -> %s", stats["boxes"], stats["labels"],
                stats["images"], len(records), output)  # fmt: skip
    return stats
