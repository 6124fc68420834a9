"""Datasets and data loaders for training and inference: decoding, augmentation, targets and the
``DataLoader`` built around the samplers of :mod:`ovd.data.sampling` (which define the data order,
a pure function of ``(seed, rank, world_size)``, and its exact resumption).

Shape shorthand: ``N`` boxes of one image, ``L`` image-level labels, ``H x W`` transformed size.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_util
from torch.utils.data import DataLoader, Dataset

from ovd.data.bad_images import first_readable
from ovd.data.sampling import (
    GroupedBatchSampler,
    InferenceSampler,
    short_side_rng,
)
from ovd.data.transforms import ResizeFlipAugmentation, TransformParams
from ovd.errors import OVDError
from ovd.structures import ImageRecord

__all__ = [
    "MASK_BINARIZE_THRESHOLD",
    "MIN_BOX_SIDE_PX",
    "DetectionDataset",
    "RegionLookup",
    "WeightedRegionLookup",
    "build_test_loader",
    "build_train_loader",
    "collate_list",
    "decode_masks",
    "read_image_bgr",
    "read_image_rgb",
    "read_record_image",
    "seed_worker",
]

logger = logging.getLogger(__name__)

# Boxes narrower or shorter than this (pixels, after resize/flip/clip) are dropped with their label.
# detectron2's filter_empty_instances uses 1e-5; one pixel also removes slivers left by clipping.
MIN_BOX_SIDE_PX = 1.0

# A resized mask pixel (bilinear on 0/1) is object when its value reaches this (detectron2 pastes and
# crops masks with the same 0.5 rule).
MASK_BINARIZE_THRESHOLD = 0.5


# --------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------


def read_image_bgr(file_name: str) -> np.ndarray:
    """Decode an image file into ``uint8[H, W, 3]`` BGR (OpenCV's order).

    Raises:
        OVDError: the file is missing, unreadable or not a decodable image.
    """
    path = Path(file_name)
    if not path.is_file():
        raise OVDError("image file not found", path=path)
    try:
        buf = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise OVDError(f"cannot read image file ({e})", path=path) from e
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if img is None:
        raise OVDError("cannot decode image (corrupt or unsupported format)", path=path)
    return img


def read_image_rgb(file_name: str) -> np.ndarray:
    """Decode an image file into ``uint8[H, W, 3]`` RGB (errors as :func:`read_image_bgr`)."""
    return cv2.cvtColor(read_image_bgr(file_name), cv2.COLOR_BGR2RGB)


def read_record_image(rec: ImageRecord, *, rgb: bool = True) -> np.ndarray:
    """Decode a record's image (RGB, or BGR with ``rgb=False``) and check its size against the record.

    Raises:
        OVDError: as :func:`read_image_bgr`, or the decoded size differs from the annotation's.
    """
    img = read_image_rgb(rec.file_name) if rgb else read_image_bgr(rec.file_name)
    if img.shape[:2] != (rec.height, rec.width):
        raise OVDError(
            f"decoded image is {img.shape[0]}x{img.shape[1]} (HxW) but the annotation file says "
            f"{rec.height}x{rec.width}",
            path=rec.file_name,
        )
    return img


class DetectionDataset(Dataset):
    """Decodes and augments :class:`ImageRecord` s.

    ``dataset[i]`` or ``dataset[(i, sample_seed)]`` returns a dict:

    * ``image``: ``uint8 Tensor[3, H, W]`` RGB, transformed;
    * ``boxes``: ``float32 Tensor[N, 4]`` xyxy on the transformed image (degenerate boxes dropped);
    * ``labels``: ``int64 Tensor[N]``; ``pos_labels``: ``int64 Tensor[L]``;
    * ``masks``: ``uint8 Tensor[N, H, W]`` instance masks of the kept boxes, transformed like the
      image, only when the record has masks (:attr:`ImageRecord.masks`);
    * ``image_id`` (int), ``orig_size`` ``(h, w)``, ``params`` (:class:`TransformParams`),
      ``ann_type`` (str), ``file_name`` (str);
    * with ``regions``: ``distill_boxes`` ``float32 Tensor[K, 4]`` (the first ``num_regions`` stored
      boxes, transformed like the image) and ``distill_embeddings`` ``float32 Tensor[K, D]``; when
      ``regions`` has weights (:class:`WeightedRegionLookup`), ``distill_weights`` ``float32 Tensor[K]``.

    Args:
        records: the images.
        augmentation: sampled once per item.
        seed: with a plain int index, the augmentation is seeded by ``(seed, index)``; with
            ``(index, sample_seed)`` by ``sample_seed`` alone; with ``(index, sample_seed, size_seed)``
            the short side comes from :func:`short_side_rng` of ``size_seed`` (shared by a batch).
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        augmentation: ResizeFlipAugmentation,
        *,
        seed: int = 0,
        regions: RegionLookup | None = None,
        num_regions: int = 0,
        skip_bad_images: bool = False,
    ):
        self.records = records
        self.augmentation = augmentation
        self.seed = seed
        self.regions = regions
        self.num_regions = num_regions
        self.skip_bad_images = skip_bad_images

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int] | tuple[int, int, int]) -> dict[str, Any]:
        short_rng = None
        if isinstance(key, tuple):
            idx, seed = key[0], key[1]
            rng = np.random.default_rng(seed)
            if len(key) == 3:
                short_rng = short_side_rng(key[2])
        else:
            idx = key
            rng = np.random.default_rng((self.seed, idx))
        rec, img, skipped = first_readable(self.records, idx, read_record_image, skip=self.skip_bad_images)
        params = self.augmentation.sample(rec.height, rec.width, rng, short_rng)
        img = params.apply_image(img)  # (H, W, 3)
        boxes = params.apply_boxes(rec.boxes)  # (N, 4)
        keep = _non_degenerate(boxes)
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),  # (3, H, W)
            "boxes": torch.from_numpy(boxes[keep]),
            "labels": torch.from_numpy(np.asarray(rec.labels, dtype=np.int64)[keep]),
            "pos_labels": torch.from_numpy(np.asarray(rec.pos_labels, dtype=np.int64).copy()),
            "image_id": int(rec.image_id),
            "orig_size": (rec.height, rec.width),
            "params": params,
            "ann_type": rec.ann_type,
            "file_name": rec.file_name,
        }
        if skipped:
            item["skipped_images"] = skipped
        if rec.masks is not None:
            item["masks"] = torch.from_numpy(decode_masks(rec.masks, rec.height, rec.width, params, keep))
        if self.regions is not None:
            # stored CLIP regions follow exactly the image's geometric transform (METHOD §3.3)
            r_boxes, r_emb = self.regions.lookup(int(rec.image_id))
            r_boxes = params.apply_boxes(r_boxes[: self.num_regions])  # (K, 4)
            r_keep = _non_degenerate(r_boxes)
            item["distill_boxes"] = torch.from_numpy(r_boxes[r_keep])
            item["distill_embeddings"] = torch.from_numpy(np.asarray(r_emb[: self.num_regions], np.float32)[r_keep])
            if isinstance(self.regions, WeightedRegionLookup):
                r_weights = self.regions.lookup_weights(int(rec.image_id))[: self.num_regions]  # (K,)
                item["distill_weights"] = torch.from_numpy(np.asarray(r_weights, np.float32)[r_keep])
        return item


def decode_masks(
    segmentations: Sequence[dict | list], height: int, width: int, params: TransformParams, keep: np.ndarray
) -> np.ndarray:
    """Decode COCO segmentations and transform them like the image.

    Args:
        segmentations: ``N`` RLE dicts or polygon lists in original-image pixels.
        height, width: the original image size.
        params: the image's sampled resize + flip.
        keep: ``bool[N]``, the boxes kept (their masks are returned, in order).

    Returns:
        ``uint8[K, out_h, out_w]`` of zeros and ones, ``K = keep.sum()``: bilinear resize of each 0/1
        mask, binarised at :data:`MASK_BINARIZE_THRESHOLD`, then the flip.
    """
    if len(segmentations) != len(keep):
        raise OVDError(f"{len(segmentations)} masks for {len(keep)} boxes")
    out = np.zeros((int(keep.sum()), params.out_h, params.out_w), dtype=np.uint8)
    for j, i in enumerate(np.flatnonzero(keep)):
        segm = segmentations[i]
        if isinstance(segm, list):  # polygons → one RLE
            rle = mask_util.merge(mask_util.frPyObjects(segm, height, width))
        elif isinstance(segm.get("counts"), list):  # uncompressed RLE
            rle = mask_util.frPyObjects(segm, height, width)
        else:
            rle = {"size": segm["size"], "counts": segm["counts"]}
        mask = mask_util.decode(rle).astype(np.float32)  # (H, W) of 0/1
        out[j] = params.apply_image(mask) >= MASK_BINARIZE_THRESHOLD  # (out_h, out_w)
    return out


def _non_degenerate(boxes: np.ndarray) -> np.ndarray:
    """``bool[N]``: boxes whose sides are at least ``MIN_BOX_SIDE_PX``."""
    return ((boxes[:, 2] - boxes[:, 0]) >= MIN_BOX_SIDE_PX) & ((boxes[:, 3] - boxes[:, 1]) >= MIN_BOX_SIDE_PX)


class RegionLookup(Protocol):
    """Anything that returns the stored regions of an image: ``float32[K, 4]`` original-image boxes
    and ``[K, D]`` embeddings (e.g. :class:`ovd.distill.store.RegionStore`)."""

    def lookup(self, image_id: int) -> tuple[np.ndarray, np.ndarray]: ...


@runtime_checkable
class WeightedRegionLookup(RegionLookup, Protocol):
    """Stored regions with a distillation weight each: ``lookup_weights`` gives ``float32[K]`` for the
    regions ``lookup`` returns (e.g. :class:`ovd.distill.region_weights.WeightedRegions`)."""

    def lookup_weights(self, image_id: int) -> np.ndarray: ...


def collate_list(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep a batch as a list of per-image dicts (the detector pads the images itself)."""
    return list(batch)


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed ``numpy`` and ``random`` from the worker's torch seed."""
    del worker_id
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)
    cv2.setNumThreads(0)  # avoid oversubscription: parallelism comes from the workers


def build_train_loader(
    records: Sequence[ImageRecord],
    augmentation: ResizeFlipAugmentation,
    *,
    batch_size: int,
    seed: int,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    start_iter: int = 0,
    regions: RegionLookup | None = None,
    num_regions: int = 0,
    size_per_batch: bool = False,
    skip_bad_images: bool = False,
) -> DataLoader:
    """Infinite training loader yielding ``list[dict]`` batches (see :class:`DetectionDataset`).

    Args:
        records: training images.
        augmentation: training augmentation.
        batch_size: images per batch on this rank.
        seed: data-order and augmentation seed, shared by all ranks.
        num_workers: decoding processes (0 = in the main process).
        rank, world_size: distributed shard.
        start_iter: batches to skip, to resume the exact data order.
        regions, num_regions: stored distillation regions added to every item (see
            :class:`DetectionDataset`).
        size_per_batch: one short side per batch (see :class:`GroupedBatchSampler`).
        skip_bad_images: replace unreadable images by the next readable one (see :class:`DetectionDataset`).
    """
    sampler = GroupedBatchSampler(
        records,
        batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        start_iter=start_iter,
        size_per_batch=size_per_batch,
    )
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        DetectionDataset(
            records, augmentation, seed=seed, regions=regions, num_regions=num_regions, skip_bad_images=skip_bad_images
        ),  # fmt: skip
        batch_sampler=sampler,
        collate_fn=collate_list,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        worker_init_fn=seed_worker,
        generator=generator,
    )


# --------------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------------


def build_test_loader(
    records: Sequence[ImageRecord],
    augmentation: ResizeFlipAugmentation,
    *,
    batch_size: int = 1,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """Loader over this rank's shard of ``records``, in order, yielding ``list[dict]`` batches.

    Use a deterministic augmentation (:meth:`ResizeFlipAugmentation.for_test`).
    """
    return DataLoader(
        DetectionDataset(records, augmentation),
        batch_size=batch_size,
        sampler=InferenceSampler(len(records), rank=rank, world_size=world_size),
        collate_fn=collate_list,
        num_workers=num_workers,
        worker_init_fn=seed_worker,
    )
