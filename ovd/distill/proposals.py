"""Class-agnostic proposal sources for region distillation (METHOD §3.1, §9.2 item 8).

A :class:`ProposalSource` turns images into scored boxes in **original-image pixels**; the store
keeps the top ``K`` of them after class-agnostic NMS (:func:`select_top_k`). Two sources ship:

* :class:`DetectorProposals`: a trained ``ovd`` checkpoint's RPN boxes refined by its box regressor
  (:meth:`OpenVocabDetector.propose`), run at the checkpoint's test-time resolution;
* :class:`FileProposals`: a COCO results JSON (``[{image_id, bbox: xywh, score}, ...]``) written by any
  class-agnostic proposer, e.g. MAVL's boxes exported once.

:func:`build_proposal_source` picks one from a path (``.pth``/``.pt`` checkpoint or ``.json`` file).

Shape shorthand: ``P`` raw proposals of one image, ``K`` kept proposals of one image.
"""

from __future__ import annotations

import abc
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_convert, clip_boxes_to_image, nms

from ovd.clip.model import file_sha256
from ovd.data.loader import MIN_BOX_SIDE_PX
from ovd.errors import OVDError
from ovd.structures import ImageRecord
from ovd.utils.io import read_json

logger = logging.getLogger(__name__)

Proposals = tuple[np.ndarray, np.ndarray]
"""``(float32[P, 4] xyxy boxes in original-image pixels, float32[P] scores)`` of one image."""

CHECKPOINT_SUFFIXES = (".pth", ".pt")
"""Suffixes :func:`build_proposal_source` reads as an ``ovd`` detector checkpoint."""

RESULTS_SUFFIXES = (".json",)
"""Suffixes :func:`build_proposal_source` reads as a COCO results file."""

DEFAULT_DETECTOR_IMAGES_PER_CALL = 4  # decoded images per call; does not change the boxes


def _empty() -> Proposals:
    return np.zeros((0, 4), dtype=np.float32), np.zeros((0,), dtype=np.float32)


class ProposalSource(abc.ABC):
    """Something that proposes class-agnostic boxes for images.

    Attributes:
        needs_images: whether :meth:`__call__` reads the pixels. When False the caller passes
            ``images=None`` and never decodes images for it.
        images_per_call: how many images the caller should pass per call (a memory bound for
            sources that run a model; results do not depend on it).
    """

    needs_images: bool = True
    images_per_call: int = 1

    @abc.abstractmethod
    def __call__(self, records: Sequence[ImageRecord], images: Sequence[np.ndarray] | None) -> list[Proposals]:
        """Propose boxes for a batch of images.

        Args:
            records: the images' records (``image_id``, ``height``, ``width``).
            images: ``uint8[H, W, 3]`` RGB arrays of the same images in original resolution, or
                None when :attr:`needs_images` is False.

        Returns:
            One ``(float32[P, 4] xyxy original-image pixels, float32[P] scores)`` per record; ``P``
            may be 0 and boxes need not be clipped, sorted or de-duplicated.
        """

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-serialisable provenance: ``kind``, ``path``, ``sha256`` of the file, parameters.

        Everything except ``path`` identifies the proposals: two runs whose descriptions differ only
        in ``path`` produce the same boxes.
        """


def clip_to_image(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Clip ``float32[P, 4]`` xyxy boxes to ``[0, width] x [0, height]``."""
    out = clip_boxes_to_image(torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)), (height, width))
    return out.numpy()


def select_top_k(boxes: np.ndarray, scores: np.ndarray, *, nms_thresh: float, k: int) -> Proposals:
    """Keep the ``k`` best boxes after class-agnostic NMS (METHOD §3.1: NMS 0.5, then top 5).

    Boxes narrower or shorter than :data:`~ovd.data.loader.MIN_BOX_SIDE_PX` are dropped first (they
    cannot be cropped). Then :func:`torchvision.ops.nms` removes every box whose IoU with a
    higher-scoring kept box is ``> nms_thresh`` (continuous areas; MAVL's own NMS adds 1 px to
    widths and heights, METHOD §3.1), and the first ``k`` survivors by descending score are kept.

    Args:
        boxes: ``float32[P, 4]`` xyxy.
        scores: ``float32[P]``.
        nms_thresh: IoU threshold in ``(0, 1]`` (1 suppresses nothing).
        k: number of boxes to keep, ``>= 1``.

    Returns:
        ``(float32[K', 4], float32[K'])`` with ``K' <= k``, sorted by descending score.

    Raises:
        OVDError: bad shapes, non-finite values, or out-of-range ``nms_thresh`` / ``k``.
    """
    if not 0.0 < nms_thresh <= 1.0:
        raise OVDError(f"NMS threshold must be in (0, 1], got {nms_thresh}", field="nms_thresh")
    if k < 1:
        raise OVDError(f"k must be >= 1, got {k}", field="k")
    boxes = np.asarray(boxes, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != (boxes.shape[0],):
        raise OVDError(f"expected boxes [P, 4] and scores [P], got {list(boxes.shape)} and {list(scores.shape)}")
    if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
        raise OVDError("proposal boxes or scores contain NaN or infinity")
    wh = boxes[:, 2:] - boxes[:, :2]  # (P, 2)
    keep = (wh >= MIN_BOX_SIDE_PX).all(axis=1)  # (P,)
    boxes, scores = boxes[keep], scores[keep]
    if boxes.shape[0] == 0:
        return _empty()
    order = nms(torch.from_numpy(boxes), torch.from_numpy(scores), nms_thresh)[:k].numpy()  # (K',) by score
    return np.ascontiguousarray(boxes[order]), np.ascontiguousarray(scores[order])


# --------------------------------------------------------------------------------------------------
# Precomputed proposals in a COCO results file
# --------------------------------------------------------------------------------------------------


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class FileProposals(ProposalSource):
    """Proposals read from a COCO results JSON: ``[{"image_id", "bbox": [x, y, w, h], "score"}, ...]``.

    ``bbox`` is in original-image pixels; ``category_id`` and any other keys are ignored (the boxes
    are treated as class-agnostic). An image without entries has no proposals.

    Args:
        path: the JSON file.

    Raises:
        OVDError: missing or malformed file, or a malformed entry (naming the file and the entry,
            e.g. ``props.json: [12].bbox: expected 4 numbers, got 3``).
    """

    needs_images = False

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        data = read_json(self.path)
        if not isinstance(data, list):
            raise OVDError(f"expected a list of COCO result entries, got a JSON {type(data).__name__}", path=self.path)
        ids = np.empty(len(data), dtype=np.int64)
        xywh = np.empty((len(data), 4), dtype=np.float64)
        scores = np.empty(len(data), dtype=np.float64)
        for i, entry in enumerate(data):
            ids[i], xywh[i], scores[i] = self._parse(entry, i)
        self.sha256 = file_sha256(self.path)
        xyxy = box_convert(torch.from_numpy(xywh), "xywh", "xyxy").numpy().astype(np.float32)  # (P, 4)
        order = np.argsort(ids, kind="stable")  # group by image, keeping the file's order inside a group
        ids, xyxy, scores32 = ids[order], xyxy[order], scores[order].astype(np.float32)
        uniq, starts = np.unique(ids, return_index=True)
        ends = np.append(starts[1:], len(ids))
        self._by_image: dict[int, Proposals] = {
            int(i): (xyxy[s:e], scores32[s:e]) for i, s, e in zip(uniq.tolist(), starts, ends, strict=True)
        }
        logger.info("read %d proposals of %d images from %s", len(data), len(self._by_image), self.path)

    def _parse(self, entry: Any, i: int) -> tuple[int, list[float], float]:
        def fail(field: str, reason: str) -> OVDError:
            return OVDError(reason, path=self.path, field=f"[{i}]{field}")

        if not isinstance(entry, dict):
            raise fail("", f"expected an object, got {type(entry).__name__}")
        for key in ("image_id", "bbox", "score"):
            if key not in entry:
                raise fail("", f"missing key {key!r}")
        image_id, bbox, score = entry["image_id"], entry["bbox"], entry["score"]
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            raise fail(".image_id", f"expected an integer id, got {image_id!r}")
        if not isinstance(bbox, list) or len(bbox) != 4:
            got = len(bbox) if isinstance(bbox, list) else type(bbox).__name__
            raise fail(".bbox", f"expected 4 numbers [x, y, w, h], got {got}")
        if not all(_is_number(v) and math.isfinite(v) for v in bbox):
            raise fail(".bbox", f"expected 4 finite numbers, got {bbox!r}")
        if bbox[2] < 0 or bbox[3] < 0:
            raise fail(".bbox", f"negative width or height in {bbox!r}")
        if not _is_number(score) or not math.isfinite(score):
            raise fail(".score", f"expected a finite number, got {score!r}")
        return image_id, bbox, float(score)

    @property
    def image_ids(self) -> set[int]:
        """Ids of the images that have at least one entry."""
        return set(self._by_image)

    def __call__(self, records: Sequence[ImageRecord], images: Sequence[np.ndarray] | None = None) -> list[Proposals]:
        out = []
        for rec in records:
            boxes, scores = self._by_image.get(int(rec.image_id), _empty())
            out.append((boxes.copy(), scores.copy()))
        return out

    def describe(self) -> dict[str, Any]:
        return {"kind": "file", "path": str(self.path.resolve()), "sha256": self.sha256}


# --------------------------------------------------------------------------------------------------
# Proposals of a trained ovd detector
# --------------------------------------------------------------------------------------------------


class DetectorProposals(ProposalSource):
    """Class-agnostic boxes of a trained ``ovd`` checkpoint (:meth:`OpenVocabDetector.propose`).

    Each image is resized as at test time (shortest edge ``min_size``, long side capped at
    ``max_size``, no flip), the detector proposes boxes (RPN boxes refined by the class-agnostic box
    regressor, scored by RPN objectness), and the boxes are mapped back to original-image pixels
    with :meth:`TransformParams.inverse_boxes`, as evaluation does.

    Args:
        checkpoint_path: a checkpoint written by ``ovd``'s trainer (it holds its config).
        min_size, max_size: test-time resize; None takes ``input.min_size_test`` /
            ``input.max_size_test`` of the checkpoint's config.
        device: where to run the detector (``"cpu"``, ``"cuda"``, ``"auto"``).
        images_per_call: decoded images handed over per call (the detector still runs one image per
            forward, so that an image's boxes do not depend on its batch).

    Raises:
        OVDError: missing, unreadable or non-``ovd`` checkpoint, or weights that do not fit its config.
    """

    needs_images = True

    def __init__(
        self,
        checkpoint_path: str | os.PathLike[str],
        *,
        min_size: int | None = None,
        max_size: int | None = None,
        device: str | torch.device = "cpu",
        images_per_call: int = DEFAULT_DETECTOR_IMAGES_PER_CALL,
    ) -> None:
        from ovd.data.transforms import ResizeFlipAugmentation
        from ovd.runtime.detector import load_trained_detector

        self.path = Path(checkpoint_path)
        loaded = load_trained_detector(self.path, device=device)
        cfg = loaded.cfg
        self.min_size = int(min_size if min_size is not None else cfg.input.min_size_test)
        self.max_size = int(max_size if max_size is not None else cfg.input.max_size_test)
        self.augmentation = ResizeFlipAugmentation((self.min_size,), self.max_size, flip_prob=0.0)
        if images_per_call < 1:
            raise OVDError(f"images_per_call must be >= 1, got {images_per_call}", field="images_per_call")
        self.images_per_call = images_per_call
        self.device = loaded.model.device
        self.model = loaded.model
        self.sha256 = file_sha256(self.path)

    @torch.no_grad()
    def __call__(self, records: Sequence[ImageRecord], images: Sequence[np.ndarray] | None) -> list[Proposals]:
        if images is None or len(images) != len(records):
            raise ValueError("DetectorProposals needs one decoded image per record")
        if not records:
            return []
        rng = np.random.default_rng(0)  # the test augmentation is deterministic; the rng is unused
        out = []
        for img in images:
            # one image per forward: images batched together are padded to a common size, which
            # changes the features near the borders and so the boxes
            p = self.augmentation.sample(img.shape[0], img.shape[1], rng)
            tensor = torch.from_numpy(p.apply_image(img)).permute(2, 0, 1)  # (3, h, w)
            boxes, scores = self.model.propose([tensor])[0]  # (P, 4) resized-image pixels, (P,)
            orig = p.inverse_boxes(boxes.float().cpu().numpy())  # (P, 4) original-image pixels
            out.append((orig.astype(np.float32), scores.float().cpu().numpy().astype(np.float32)))
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "detector",
            "path": str(self.path.resolve()),
            "sha256": self.sha256,
            "min_size": self.min_size,
            "max_size": self.max_size,
        }


def build_proposal_source(
    spec: str | os.PathLike[str],
    *,
    min_size: int | None = None,
    max_size: int | None = None,
    device: str | torch.device = "cpu",
) -> ProposalSource:
    """A proposal source from a path: a ``.pth``/``.pt`` detector checkpoint or a ``.json`` results file.

    Args:
        spec: the path.
        min_size, max_size, device: passed to :class:`DetectorProposals` (ignored for files).

    Raises:
        OVDError: the file is missing or has another suffix.
    """
    path = Path(spec)
    if not path.is_file():
        raise OVDError("proposal source not found", path=path)
    suffix = path.suffix.lower()
    if suffix in CHECKPOINT_SUFFIXES:
        return DetectorProposals(path, min_size=min_size, max_size=max_size, device=device)
    if suffix in RESULTS_SUFFIXES:
        return FileProposals(path)
    valid = ", ".join(CHECKPOINT_SUFFIXES + RESULTS_SUFFIXES)
    raise OVDError(
        f"cannot tell the proposal source from the suffix {path.suffix!r} (expected one of {valid})", path=path
    )
