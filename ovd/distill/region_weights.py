"""Teacher-aware region distillation (beyond the reference, issue #22): per-region weights from the
CLIP teacher's own class posterior over the training vocabulary, and a filter for the regions where the
ground truth shows the teacher is wrong.

The reference distils every stored region with the same weight (METHOD §3.5). Here, for a region whose
stored unit CLIP embedding is ``t`` and the unit text embeddings of the ``C`` training classes are
``e_c``, the teacher's posterior is ``p = softmax(t·e / T)`` and its confidence

* ``max_prob``: ``max_c p_c`` (in ``[1/C, 1]``);
* ``entropy``: ``1 − H(p) / log C`` (in ``[0, 1]``);

gives the weight ``w = max(confidence, floor)`` (``uniform``: ``w = 1``).

**Contradiction filter** (optional): the region's teacher top class ``ĉ`` is a *base* class (one with
training boxes) and the region does not match a ground-truth box of class ``ĉ``: its best-matching
ground-truth box (highest IoU) overlaps it by less than ``iou_thresh`` or has another class. Base
classes are annotated exhaustively in training, so a ``ĉ`` object there would have a box: the teacher is
demonstrably wrong, and the region's weight is multiplied by ``contradiction_weight`` (0 = dropped).
The default threshold 0.5 is the box head's foreground IoU (``RoIHeadsCfg.fg_iou_thresh``): the filter
removes exactly the regions whose ``ĉ`` the box loss itself trains against. Regions the teacher calls a
novel class are never filtered (novel objects are unannotated), nor are images without ground truth.

The weights are computed once per (store, setting) from the stored embeddings and kept in the store
(``region_weights/<name>.npy``, described in its ``meta.json``: :func:`write_region_weights`).

Shape shorthand: ``N`` images, ``K`` slots, ``k`` valid regions of an image, ``C`` classes, ``D``
CLIP dim, ``G`` ground-truth boxes of an image.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou

from ovd.distill.store import META_FILE, WEIGHTS_DIR, WEIGHTS_KEY, RegionStore
from ovd.errors import OVDError
from ovd.utils.io import atomic_write, read_json, write_json

MODES = ("uniform", "max_prob", "entropy")


@dataclass(frozen=True)
class RegionWeighting:
    """How the per-region distillation weights are made (see the module docstring).

    Attributes:
        mode: ``uniform`` | ``max_prob`` | ``entropy``.
        temperature: ``T`` of the teacher's softmax over cosines (0.01 = CLIP's logit scale 100).
        floor: lower bound of a confidence weight.
        contradiction_iou: IoU below which the best-matching ground-truth box does not confirm the
            teacher's base class; 0 = no contradiction filter.
        contradiction_weight: multiplies the weight of a contradicted region (0 = drop it).
    """

    mode: str = "uniform"
    temperature: float = 0.01
    floor: float = 0.0
    contradiction_iou: float = 0.0
    contradiction_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise OVDError(f"unknown region weighting {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.temperature <= 0:
            raise OVDError(f"the teacher temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.floor <= 1.0 or not 0.0 <= self.contradiction_weight <= 1.0:
            raise OVDError("the weight floor and contradiction weight must lie in [0, 1]")
        if not 0.0 <= self.contradiction_iou <= 1.0:
            raise OVDError(f"contradiction_iou must lie in [0, 1], got {self.contradiction_iou}")

    @property
    def is_uniform(self) -> bool:
        """True when every region keeps weight 1 (the reference): nothing is computed or passed on."""
        return self.mode == "uniform" and self.contradiction_iou == 0.0


def teacher_posterior(embeddings: Tensor, text: Tensor, temperature: float) -> Tensor:
    """``softmax(n(t) · n(e)ᵀ / T)``: ``embeddings`` ``Tensor[M, D]``, ``text`` ``Tensor[C, D]`` → ``Tensor[M, C]``."""
    logits = F.normalize(embeddings.float(), dim=1) @ F.normalize(text.float(), dim=1).T  # (M, C)
    return torch.softmax(logits / temperature, dim=1)


def teacher_confidence(prob: Tensor, mode: str) -> Tensor:
    """Confidence of each posterior row ``Tensor[M, C]`` → ``Tensor[M]``: ``max_prob`` = ``max_c p_c``,
    ``entropy`` = ``1 − H(p)/log C`` (``0·log 0 = 0``), ``uniform`` = 1."""
    if mode == "uniform":
        return torch.ones(prob.shape[0], dtype=prob.dtype)
    if mode == "max_prob":
        return prob.max(dim=1).values
    if mode == "entropy":
        c = prob.shape[1]
        if c < 2:
            return torch.ones(prob.shape[0], dtype=prob.dtype)
        ent = -torch.special.xlogy(prob, prob).sum(dim=1)  # (M,)
        return (1.0 - ent / math.log(c)).clamp(0.0, 1.0)
    raise OVDError(f"unknown region weighting {mode!r}; choose one of {', '.join(MODES)}")


def contradicted(
    boxes: Tensor, top_class: Tensor, gt_boxes: Tensor, gt_labels: Tensor, is_base: Tensor, iou_thresh: float
) -> Tensor:
    """``bool[k]``: the teacher's top class is base and the best-matching ground-truth box (IoU ≥
    ``iou_thresh``, same class) does not confirm it.

    Args:
        boxes: ``Tensor[k, 4]`` xyxy regions; ``top_class``: ``int64[k]`` the teacher's argmax.
        gt_boxes: ``Tensor[G, 4]`` xyxy; ``gt_labels``: ``int64[G]`` (same pixel frame as ``boxes``).
        is_base: ``bool[C]`` classes with training boxes.
    """
    base_call = is_base[top_class]  # (k,)
    if gt_boxes.shape[0] == 0:
        return base_call
    iou = box_iou(boxes.float(), gt_boxes.float())  # (k, G)
    best_iou, best = iou.max(dim=1)  # (k,)
    confirmed = (best_iou >= iou_thresh) & (gt_labels[best] == top_class)  # (k,)
    return base_call & ~confirmed


def region_weights(
    embeddings: Tensor,
    text: Tensor,
    weighting: RegionWeighting,
    *,
    boxes: Tensor | None = None,
    ground_truth: tuple[Tensor, Tensor] | None = None,
    is_base: Tensor | None = None,
) -> Tensor:
    """Weights ``float32[k]`` of the ``k`` regions of one image.

    Args:
        embeddings: ``Tensor[k, D]`` the teacher's region embeddings; ``text``: ``Tensor[C, D]``.
        boxes: ``Tensor[k, 4]`` the regions (needed by the contradiction filter).
        ground_truth: ``(Tensor[G, 4], int64[G])`` the image's base-class boxes, or None (no filter
            for this image).
        is_base: ``bool[C]``.
    """
    prob = teacher_posterior(embeddings, text, weighting.temperature)  # (k, C)
    w = teacher_confidence(prob, weighting.mode)  # (k,)
    if weighting.mode != "uniform":
        w = w.clamp(min=weighting.floor)
    if weighting.contradiction_iou > 0 and ground_truth is not None and boxes is not None and is_base is not None:
        bad = contradicted(boxes, prob.argmax(dim=1), *ground_truth, is_base, weighting.contradiction_iou)
        w = torch.where(bad, w * weighting.contradiction_weight, w)
    return w.float()


def _sha256(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def weighting_description(
    weighting: RegionWeighting,
    text: Tensor,
    ground_truth: Mapping[int, tuple[np.ndarray, np.ndarray]] | None,
    base_classes: Sequence[int],
) -> dict[str, Any]:
    """What a weights array depends on: the setting, the vocabulary and (for the filter) the ground truth."""
    how: dict[str, Any] = {**asdict(weighting), "vocabulary_sha256": _sha256(text.float().cpu().numpy())}
    if weighting.contradiction_iou > 0:
        gt = ground_truth or {}
        ids = sorted(gt)
        how["base_classes"] = sorted(int(c) for c in base_classes)
        how["ground_truth_sha256"] = _sha256(
            np.asarray(ids, np.int64),
            *(np.asarray(gt[i][0], np.float32) for i in ids),
            *(np.asarray(gt[i][1], np.int64) for i in ids),
        )
    return how


def weights_name(how: dict[str, Any]) -> str:
    return "w_" + hashlib.sha256(json.dumps(how, sort_keys=True).encode()).hexdigest()[:16]


def compute_store_weights(
    store: RegionStore,
    text: Tensor,
    weighting: RegionWeighting,
    ground_truth: Mapping[int, tuple[np.ndarray, np.ndarray]] | None = None,
    base_classes: Sequence[int] = (),
) -> np.ndarray:
    """``float32[N, K]`` weights of every stored region (0 in empty slots), row order of the store.

    Args:
        ground_truth: ``image id → (float32[G, 4] xyxy original-image boxes, int64[G] labels)`` of the
            box-annotated images (the contradiction filter skips images not in it).
        base_classes: the classes with training boxes.
    """
    is_base = torch.zeros(text.shape[0], dtype=torch.bool)
    is_base[list(base_classes)] = True
    out = np.zeros((len(store), store.k), dtype=np.float32)
    for row, image_id in enumerate(store.image_ids.tolist()):
        boxes, emb = store.lookup(image_id)  # (k, 4), (k, D): the valid slots come first
        if len(boxes) == 0:
            continue
        gt = None
        if ground_truth is not None and image_id in ground_truth:
            g_boxes, g_labels = ground_truth[image_id]
            gt = (torch.as_tensor(np.asarray(g_boxes, np.float32)).reshape(-1, 4),
                  torch.as_tensor(np.asarray(g_labels, np.int64)))  # fmt: skip
        w = region_weights(torch.from_numpy(emb), text, weighting, boxes=torch.from_numpy(boxes),
                           ground_truth=gt, is_base=is_base)  # fmt: skip
        out[row, : len(w)] = w.numpy()
    return out


def write_region_weights(path: str | os.PathLike[str], name: str, weights: np.ndarray, how: dict[str, Any]) -> None:
    """Add (or replace) the weights array ``name`` of a complete store and record ``how`` in its metadata.

    The array is written first, then ``meta.json`` (atomically, so the store stays complete). Two
    processes adding weights at once may lose one metadata entry; that array is then recomputed on
    its next use, never read with the wrong description.

    Args:
        weights: ``float32[N, K]`` (0 where a slot is empty).
    """
    store = RegionStore.open(path)
    if weights.shape != (len(store), store.k):
        raise OVDError(f"weights {list(weights.shape)} do not match the store ({len(store)}, {store.k})", path=path)
    if not name.isidentifier():
        raise OVDError(f"invalid weights name {name!r}", path=path, field=WEIGHTS_KEY)
    target = store.path / WEIGHTS_DIR / f"{name}.npy"
    atomic_write(target, lambda tmp: np.save(tmp, np.ascontiguousarray(weights, dtype=np.float32)))
    meta = read_json(store.path / META_FILE)
    meta[WEIGHTS_KEY] = {**(meta.get(WEIGHTS_KEY) or {}), name: how}
    write_json(store.path / META_FILE, meta)


class WeightedRegions:
    """A region store plus one of its weights arrays: ``lookup`` as the store, ``lookup_weights`` the
    ``float32[k]`` weights of the same ``k`` regions. Pickles by path and name (DataLoader workers)."""

    def __init__(self, store: RegionStore, name: str) -> None:
        weights = store.region_weights(name)
        if weights is None:
            raise OVDError(f"the store has no weights {name!r}", path=store.path)
        self.store = store
        self.name = name
        self._weights = weights

    @classmethod
    def open(cls, path: str, name: str) -> WeightedRegions:
        return cls(RegionStore.open(path), name)

    def __reduce__(self) -> tuple[Any, ...]:
        return (WeightedRegions.open, (str(self.store.path), self.name))

    def lookup(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        return self.store.lookup(image_id)

    def lookup_weights(self, image_id: int) -> np.ndarray:
        where = self.store.locate(image_id)
        if where is None:
            return np.zeros(0, dtype=np.float32)
        row, k = where
        return np.array(self._weights[row, :k], dtype=np.float32)  # (k,)


def ensure_weighted_regions(
    path: str | os.PathLike[str],
    text: Tensor,
    weighting: RegionWeighting,
    ground_truth: Mapping[int, tuple[np.ndarray, np.ndarray]] | None = None,
    base_classes: Sequence[int] = (),
    *,
    write: bool = True,
) -> WeightedRegions:
    """The store at ``path`` with the weights of ``weighting``, computed and written into it the first time.

    Args:
        write: compute the weights when the store lacks them (False: another process has; they must
            be there).
    Raises:
        OVDError: ``write`` is False and the store has no such weights.
    """
    store = RegionStore.open(path)
    how = weighting_description(weighting, text, ground_truth, base_classes)
    name = weights_name(how)
    if (store.metadata.get(WEIGHTS_KEY) or {}).get(name) != how or store.region_weights(name) is None:
        if not write:
            raise OVDError(f"the store has no region weights {name!r} ({how['mode']})", path=path)
        weights = compute_store_weights(store, text, weighting, ground_truth, base_classes)
        write_region_weights(store.path, name, weights, how)
        store = RegionStore.open(path)
    return WeightedRegions(store, name)
