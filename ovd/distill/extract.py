"""Batched, resumable, shardable extraction of CLIP embeddings of proposal crops (METHOD §3.1-§3.2).

Per image: the source's proposals are clipped to the image, reduced by :func:`select_top_k` (NMS,
top ``K``), each box is cropped from the **original** image and encoded with the CLIP image tower
after open_clip's own eval preprocessing (:class:`CropPreprocess`: shortest side to the input size
with bicubic resampling, centre crop, CLIP mean/std). Unlike the reference loop (one PIL crop and
one batch-1 forward at a time, exceptions swallowed), images are read in DataLoader workers, crops
of many images share one ``encode_images`` call, and every failure raises. Three resize backends
(where the crops are made):

* ``"pil"``: the workers decode, crop and resize with PIL, exactly as ``clip.preprocess`` on a PIL crop;
* ``"tensor"``: the workers decode, the crops are resized one by one on the CLIP's device, as
  ``clip.preprocess`` does to a tensor crop;
* ``"batched"``: the workers decode a task's images into one slot of shared decode buffers
  (:class:`HostRing`, page-locked on a GPU); on the CLIP's device every crop's crop + resize + centre
  crop is two batched matrix products for the whole task (:func:`batched_crop_resize`,
  :func:`resize_weights`): a fixed number of kernels per task instead of several per crop, and no
  host-device synchronisation. Same numbers as ``"tensor"`` up to float rounding in float32; the GPU
  default, float16 products, moves ~5 % of pixels by one intensity level.

Cheap proposals (a file) are selected chunk by chunk while earlier chunks are encoded, and the CLIP
weights are hashed (for the metadata) in a background thread: nothing serial precedes the first crop.

Work is split into fixed **chunks** of consecutive images of a shard; a finished chunk is written
atomically as ``<out>/parts/shard{i}-chunk{j}.npz``. A rerun skips finished chunks (after checking
they come from the same extraction), so a killed run resumes where it stopped. When every chunk of
every shard exists, the parts are merged into the store (:mod:`ovd.distill.store`). Batches never
span two chunks, so a resumed run gives the same bytes as an uninterrupted one.

Shape shorthand: ``P`` raw proposals of one image, ``K`` kept regions per image, ``B`` crops per
CLIP forward, ``D`` CLIP embedding dim, ``h x w`` CLIP input size.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ovd.clip.model import ClipBundle
from ovd.data.loader import read_record_image
from ovd.distill.proposals import FileProposals, ProposalSource, clip_to_image, select_top_k
from ovd.distill.store import (
    STORE_FORMAT,
    STORE_VERSION,
    MergeInProgressError,
    check_part,
    check_store,
    expected_parts,
    image_ids_sha256,
    merge_store,
    part_path,
    shard_chunks,
    store_is_complete,
    write_part,
)
from ovd.errors import OVDError
from ovd.structures import ImageRecord

logger = logging.getLogger(__name__)

DEFAULT_K = 5  # METHOD §3.1: top_N = 5 proposals per image
DEFAULT_NMS_THRESH = 0.5  # METHOD §3.1: class-agnostic NMS at IoU 0.5
_PIL_RESAMPLE = {
    T.InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
    T.InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
}
RESIZE_BACKENDS = ("pil", "tensor", "batched")
"""Where crops are made: PIL in the DataLoader workers, torch per crop on the CLIP's device, or batched
matrix products on the CLIP's device."""
_WORKER_MODE = {"pil": "crops", "tensor": "decode", "batched": "stack"}  # what the workers hand over (_CropDataset)
_FILTER_SUPPORT = {"bicubic": 2.0, "bilinear": 1.0}  # half-width of the resampling kernel at scale 1
_BICUBIC_A = -0.5  # the antialiased bicubic kernel of PIL and torch (``antialias=True``) uses a = -0.5
_CROP_DTYPES = ("float32", "float16")  # of the batched backend's matrix products
_RING_BUDGET_BYTES = 1 << 30  # at most 1 GiB of decode buffers (HostRing); a larger task goes through the queue
_PREFETCH = 2  # tasks in flight per DataLoader worker (its default prefetch_factor)
_PASS_THROUGH = ("MaybeConvertMode", "MaybeToTensor", "ToTensor", "_convert_to_rgb")  # no-ops on RGB crops


# --------------------------------------------------------------------------------------------------
# Crop preprocessing: open_clip's eval transform, applied to a box of a decoded image
# --------------------------------------------------------------------------------------------------


def crop_box_pixels(box: np.ndarray, height: int, width: int) -> tuple[int, int, int, int]:
    """Integer crop rectangle ``(x0, y0, x1, y1)`` of an xyxy box: corners rounded half up, at least
    1 px wide and high, inside the image. Integer boxes are cropped exactly as ``PIL.Image.crop``."""
    x0 = min(max(math.floor(float(box[0]) + 0.5), 0), width - 1)
    y0 = min(max(math.floor(float(box[1]) + 0.5), 0), height - 1)
    x1 = min(max(math.floor(float(box[2]) + 0.5), x0 + 1), width)
    y1 = min(max(math.floor(float(box[3]) + 0.5), y0 + 1), height)
    return x0, y0, x1, y1


@dataclass(frozen=True)
class CropPreprocess:
    """open_clip's eval transform (``Resize(short) → CenterCrop → ToTensor → Normalize``) as data.

    Attributes:
        resize: length of the shorter side after resizing, pixels.
        crop_size: ``(h, w)`` of the centre crop = the CLIP input size.
        interpolation: ``"bicubic"`` or ``"bilinear"`` (PIL's antialiased filters, as torchvision uses
            on PIL images).
        mean, std: per-channel RGB normalisation on the 0-1 scale.
    """

    resize: int
    crop_size: tuple[int, int]
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_clip(cls, clip: ClipBundle) -> CropPreprocess:
        """Read the parameters off ``clip.preprocess``.

        Raises:
            OVDError: the transform is not a ``Resize(int) + CenterCrop + Normalize`` pipeline (e.g.
                open_clip's ``squash``/``longest`` resize modes), so it cannot be reproduced exactly.
        """
        resize = crop = mean = std = interp = None
        for t in getattr(clip.preprocess, "transforms", []):
            if isinstance(t, T.Resize):
                size = [t.size] if isinstance(t.size, int) else list(t.size)
                if len(size) != 1 or t.max_size is not None or t.interpolation not in _PIL_RESAMPLE:
                    raise OVDError(f"unsupported CLIP resize {t!r}: only shortest-side bicubic/bilinear resizes")
                resize, interp = int(size[0]), t.interpolation.value
            elif isinstance(t, T.CenterCrop):
                crop = (int(t.size[0]), int(t.size[1]))
            elif isinstance(t, T.Normalize):
                mean, std = tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std)
            elif type(t).__name__ not in _PASS_THROUGH and getattr(t, "__name__", "") not in _PASS_THROUGH:
                raise OVDError(f"unsupported transform {t!r} in the CLIP preprocess of {clip.model_name}")
        if resize is None or crop is None or mean is None or std is None:
            raise OVDError(f"the CLIP preprocess of {clip.model_name} is not Resize + CenterCrop + Normalize")
        if max(crop) > resize or crop != tuple(clip.image_size):
            raise OVDError(f"centre crop {crop} does not fit resize {resize} / CLIP input {clip.image_size}")
        return cls(resize, crop, interp, mean, std)

    def to_json(self) -> dict[str, Any]:
        return {
            "resize": self.resize,
            "crop_size": list(self.crop_size),
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """``(w, h)`` after the shortest-side resize, truncated exactly as torchvision does."""
        if width <= height:
            return self.resize, int(self.resize * height / width)
        return int(self.resize * width / height), self.resize

    def crop_offsets(self, width: int, height: int) -> tuple[int, int]:
        """``(top, left)`` of the centre crop of a ``width x height`` resized crop, as torchvision's
        ``center_crop`` (Python's round: ties to even)."""
        ch, cw = self.crop_size
        return int(round((height - ch) / 2.0)), int(round((width - cw) / 2.0))

    def crop_resize(self, image: Image.Image, rect: tuple[int, int, int, int]) -> np.ndarray:
        """Crop ``rect`` from ``image`` and apply resize + centre crop.

        Returns:
            ``uint8[h, w, 3]``, equal to ``clip.preprocess(image.crop(rect))`` before ToTensor/Normalize.
        """
        crop = image.crop(rect)
        w, h = crop.size
        nw, nh = self.resized_size(w, h)
        if (nw, nh) != (w, h):  # torchvision skips a resize to the same size
            crop = crop.resize((nw, nh), _PIL_RESAMPLE[T.InterpolationMode(self.interpolation)])
        ch, cw = self.crop_size
        top, left = self.crop_offsets(nw, nh)
        return np.asarray(crop)[top : top + ch, left : left + cw]

    def crop_resize_tensor(self, image: Tensor, rect: tuple[int, int, int, int]) -> Tensor:
        """The same on a ``float Tensor[3, H, W]`` RGB image with values 0-255, on any device.

        This is what ``clip.preprocess`` does to a ``uint8`` tensor crop (torchvision's tensor
        resize: antialiased bicubic ``F.interpolate``, clamped and rounded to integers), which
        differs from the PIL path by about one intensity level (PIL rounds between its two passes).

        Returns:
            ``float Tensor[3, h, w]`` with integer values in ``[0, 255]``.
        """
        x0, y0, x1, y1 = rect
        crop = image[:, y0:y1, x0:x1]  # (3, h0, w0) view
        w, h = x1 - x0, y1 - y0
        nw, nh = self.resized_size(w, h)
        if (nw, nh) != (w, h):
            crop = F.interpolate(crop[None], size=(nh, nw), mode=self.interpolation, antialias=True)[0]  # (3, nh, nw)
            crop = crop.clamp(0, 255).round()
        ch, cw = self.crop_size
        top, left = self.crop_offsets(nw, nh)
        return crop[:, top : top + ch, left : left + cw]  # (3, h, w)


def _resample_filter(x: Tensor, interpolation: str) -> Tensor:
    """The antialiased resampling kernel (PIL's, which torch's ``antialias=True`` reproduces)."""
    x = x.abs()
    if interpolation == "bilinear":
        return (1.0 - x).clamp_(min=0.0)
    a = _BICUBIC_A
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0  # |x| < 1
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a  # 1 <= |x| < 2
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def resize_weights(
    start: Tensor, length: Tensor, resized: Tensor, offset: Tensor, out_len: int, image_len: int, interpolation: str
) -> Tensor:
    """One axis of crop → antialiased resize → centre crop as a matrix on the image axis.

    Crop ``n`` takes pixels ``[start, start + length)`` of an axis of ``image_len`` pixels, resizes
    them to ``resized`` pixels and keeps ``[offset, offset + out_len)`` of the result. Output pixel
    ``o`` is then ``sum_s W[n, o, s] * image[s]``. The weights are those of torch's antialiased
    ``F.interpolate`` (= PIL's resampling before its uint8 rounding): for resized pixel ``r``, centre
    ``c = scale * (r + 0.5)`` with ``scale = length / resized``, kernel support ``support * max(scale, 1)``
    truncated to the crop, taps ``kernel((j - c + 0.5) / max(scale, 1))`` normalised to sum 1; a
    resize to the same length is the identity.

    Args:
        start, length, resized, offset: ``int64 Tensor[n]`` per crop, on the output's device.
        out_len: output pixels per crop (the CLIP input side).
        image_len: pixels of the image axis.
        interpolation: ``"bicubic"`` or ``"bilinear"``.

    Returns:
        ``float32 Tensor[n, out_len, image_len]``.
    """
    device = start.device
    scale = (length.double() / resized.double()).float()[:, None]  # (n, 1)
    up = scale >= 1.0
    support = torch.where(
        up, _FILTER_SUPPORT[interpolation] * scale, torch.full_like(scale, _FILTER_SUPPORT[interpolation])
    )
    invscale = torch.where(up, 1.0 / scale, torch.ones_like(scale))
    r = offset[:, None] + torch.arange(out_len, device=device)  # (n, out_len) resized pixel index
    center = scale * (r.float() + 0.5)  # (n, out_len)
    lo = torch.floor(center - support + 0.5).clamp_(min=0.0)[:, :, None]  # (n, out_len, 1) first tap
    hi = torch.minimum(torch.floor(center + support + 0.5), length[:, None].float())[:, :, None]  # one past last
    j = (torch.arange(image_len, device=device)[None] - start[:, None]).float()[:, None, :]  # (n, 1, S) crop coords
    w = _resample_filter((j - center[:, :, None] + 0.5) * invscale[:, :, None], interpolation)  # (n, out_len, S)
    w = w * ((j >= lo) & (j < hi))
    return w / w.sum(dim=2, keepdim=True)


def crop_rects(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """:func:`crop_box_pixels` of every row of ``boxes`` (``float[n, 4]``) → ``int64[n, 4]``."""
    return np.array([crop_box_pixels(b, height, width) for b in boxes], dtype=np.int64).reshape(-1, 4)


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """A small host tensor on ``device`` without waiting: a pageable copy to a GPU would wait for every
    kernel queued before it (the CLIP forward), so it is pinned first."""
    return (t.pin_memory() if device.type == "cuda" else t).to(device, non_blocking=True)


def pad_stack(images: Sequence[np.ndarray]) -> np.ndarray:
    """``uint8[H_i, W_i, 3]`` images → one zero-padded ``uint8[N, max H, max W, 3]`` batch."""
    h = max(im.shape[0] for im in images)
    w = max(im.shape[1] for im in images)
    out = np.zeros((len(images), h, w, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        out[i, : im.shape[0], : im.shape[1]] = im
    return out


@dataclass(frozen=True)
class CropPlan:
    """Host-side parameters of one :func:`batched_crop_resize` call (cheap to make in a worker).

    Attributes:
        params: ``int64[8, N*K]`` per crop slot: ``y0, h, resized h, top, x0, w, resized w, left``.
        keep: ``int64[c]`` the slots that hold a crop, in image then rectangle order.
        k: slots per image (the most rectangles of one image).
    """

    params: np.ndarray
    keep: np.ndarray
    k: int


def plan_crops(rects: Sequence[np.ndarray], preprocess: CropPreprocess) -> CropPlan:
    """The :class:`CropPlan` of ``rects`` (per image, ``int64[k_i, 4]`` crop rectangles ``x0, y0, x1, y1``)."""
    counts = [len(r) for r in rects]
    k = max(counts, default=0)
    slots = np.zeros((len(rects), k, 4), dtype=np.int64)  # (N, K, 4); empty slots get a 1x1 rectangle, dropped
    slots[:, :, 2:] = 1
    for i, r in enumerate(rects):
        slots[i, : len(r)] = r
    slots = slots.reshape(-1, 4)  # (N*K, 4)
    w, h = slots[:, 2] - slots[:, 0], slots[:, 3] - slots[:, 1]
    resized = [preprocess.resized_size(int(a), int(b)) for a, b in zip(w, h, strict=True)]
    nw, nh = np.array(resized, dtype=np.int64).reshape(-1, 2).T
    offsets = [preprocess.crop_offsets(int(a), int(b)) for a, b in zip(nw, nh, strict=True)]
    top, left = np.array(offsets, dtype=np.int64).reshape(-1, 2).T
    params = np.stack([slots[:, 1], h, nh, top, slots[:, 0], w, nw, left]).astype(np.int64)  # (8, N*K)
    keep = np.array([i * k + j for i, c in enumerate(counts) for j in range(c)], dtype=np.int64)  # (c,)
    return CropPlan(params, keep, k)


def batched_crop_resize(
    batch: Tensor,
    rects: Sequence[np.ndarray] | None,
    preprocess: CropPreprocess,
    *,
    bgr: bool = False,
    plan: CropPlan | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """:meth:`CropPreprocess.crop_resize_tensor` of up to ``K`` rectangles in each of ``N`` images, as
    two batched matrix products over the whole batch (a fixed number of kernels per call, whatever
    ``N`` and ``K``): the image rows are contracted with the row weights of every crop slot of the image
    (:func:`resize_weights`), then each slot's result with its column weights. Weights are zero outside
    a crop's rectangle, so padding is never read (its values need not even be zero). The per-crop
    parameters reach the device in one pinned, asynchronous copy: nothing waits for the device.

    Args:
        batch: ``Tensor[N, H, W, 3]`` (``uint8`` or float, values 0-255), images padded to one size,
            on any device.
        rects: per image, ``int64[k_i, 4]`` integer crop rectangles ``(x0, y0, x1, y1)`` inside it;
            ignored when ``plan`` (:func:`plan_crops` of them, made elsewhere) is given.
        bgr: the batch's channels are BGR (OpenCV's order); the crops are returned RGB.
        dtype: of the two matrix products. ``torch.float16`` (tensor cores on a GPU, ~10x the float32
            throughput) rounds the weights and the row pass to 11 significant bits: ~5 % of output
            pixels then differ from float32 by one intensity level (CLIP embedding cosine > 0.99999;
            tests/distill/test_extract.py).

    Returns:
        ``float Tensor[sum k_i, 3, h, w]`` RGB with integer values in ``[0, 255]``, in image then rectangle order.
    """
    ch, cw = preprocess.crop_size
    n, height, width = (int(v) for v in batch.shape[:3])
    device = batch.device
    if plan is None:
        if rects is None or len(rects) != n:
            raise ValueError(f"{0 if rects is None else len(rects)} rectangle lists for {n} images")
        plan = plan_crops(rects, preprocess)
    if plan.params.shape[1] != n * plan.k:
        raise ValueError(f"a crop plan for {plan.params.shape[1]} slots used on {n} images x {plan.k} slots")
    if len(plan.keep) == 0:
        return torch.zeros((0, 3, ch, cw), device=device)
    k = plan.k
    params = _to_device(torch.from_numpy(np.concatenate([plan.params.reshape(-1), plan.keep])), device)
    y0, hh, rh, top_t, x0, ww, rw, left_t = params[: 8 * n * k].view(8, n * k)  # 8 x (N*K,)
    keep = params[8 * n * k :]  # (c,)
    interp = preprocess.interpolation
    wy = resize_weights(y0, hh, rh, top_t, ch, height, interp).to(dtype)  # (N*K, h, H)
    wx = resize_weights(x0, ww, rw, left_t, cw, width, interp).to(dtype)  # (N*K, w, W)
    image = batch.permute(0, 1, 3, 2).to(dtype).contiguous().view(n, height, 3 * width)  # (N, H, 3*W) rows of C x W
    rows = torch.bmm(wy.view(n, k * ch, height), image)  # (N, K*h, 3*W)
    out = torch.bmm(rows.view(n * k, ch * 3, width), wx.transpose(1, 2)).float()  # (N*K, h*3, w)
    out = out.view(n * k, ch, 3, cw).permute(0, 2, 1, 3)  # (N*K, 3, h, w)
    out = out[keep]  # (sum k_i, 3, h, w)
    if bgr:
        out = out.flip(1)
    return out.clamp_(0, 255).round_()


class CropEncoder:
    """Crops → L2-normalised ``float16 Tensor[B, D]`` CLIP embeddings, left on the CLIP's device.

    Crops are ``uint8 Tensor[B, h, w, 3]`` (PIL backend, from the workers) or ``float Tensor[B, 3, h, w]``
    with integer values 0-255 (tensor backend); both then get ToTensor's ``/ 255`` and Normalize.
    """

    def __init__(self, clip: ClipBundle, preprocess: CropPreprocess) -> None:
        self.clip = clip
        device = clip.device
        self.mean = torch.tensor(preprocess.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocess.std, device=device).view(1, 3, 1, 1)

    def __call__(self, crops: Tensor) -> Tensor:
        x = crops.to(self.mean.device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = x.permute(0, 3, 1, 2).contiguous().float()  # (B, 3, h, w)
        x = x.div(255).sub_(self.mean).div_(self.std)  # ToTensor + Normalize
        emb = self.clip.encode_images(x)  # (B, D)
        return F.normalize(emb, dim=1).half()  # (B, D)


# --------------------------------------------------------------------------------------------------
# DataLoader datasets (run in workers)
# --------------------------------------------------------------------------------------------------


def _decode(rec: ImageRecord, *, rgb: bool = True) -> np.ndarray:
    """A record's image; BGR (``rgb=False``) skips a full-image channel flip: crops are flipped
    after resizing instead."""
    return read_record_image(rec, rgb=rgb)


def _error(e: OVDError) -> tuple[str, str | None, str | None]:
    return (e.reason, e.path, e.field)


class _ImageDataset(Dataset):
    """``dataset[i]`` → ``{"image": uint8[H, W, 3] or None, "error": ...}`` for proposal sources."""

    def __init__(self, records: Sequence[ImageRecord]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            return {"image": _decode(self.records[i]), "error": None}
        except OVDError as e:
            return {"image": None, "error": _error(e)}


class HostRing:
    """Fixed host buffers that DataLoader workers decode into and the device copies from.

    ``num_slots`` slots of ``slot_bytes`` in one shared-memory block, created before the workers start
    (so forked and spawned workers alike write into it); on a GPU the block is page-locked in place
    (``cudaHostRegister``), so a slot reaches the device in one asynchronous DMA copy. Compared with
    returning each task's images through the DataLoader's queue, this saves a fresh shared-memory
    segment per task (its page faults in both processes) and the main process's copy into pinned
    memory, which otherwise bound a host-limited extraction (RESULTS, extraction sections 5 and 7).

    Slot reuse is safe when at most ``num_slots - 2`` tasks are outstanding: :func:`_encode_chunks`
    waits, before taking item ``i`` off the loader, for the copy of item ``i - 2``.
    """

    def __init__(self, num_slots: int, slot_bytes: int, device: torch.device) -> None:
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self.buffer = torch.empty(num_slots * slot_bytes, dtype=torch.uint8).share_memory_()  # (S * bytes,)
        self.pinned = False
        if device.type == "cuda" and self.buffer.numel():
            rc = torch.cuda.cudart().cudaHostRegister(self.buffer.data_ptr(), self.buffer.numel(), 0)
            self.pinned = int(rc) == 0
            if not self.pinned:
                logger.warning("could not page-lock the %d MB decode buffers (%s)", self.buffer.numel() >> 20, rc)

    def view(self, slot: int, shape: tuple[int, ...]) -> Tensor:
        """Slot ``slot`` as a ``uint8 Tensor[shape]`` (a view: no copy)."""
        n = math.prod(shape)
        start = (slot % self.num_slots) * self.slot_bytes
        return self.buffer[start : start + n].view(shape)

    def close(self) -> None:
        """Unpin the block; every copy from it must be finished."""
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())
            self.pinned = False


class _CropDataset(Dataset):
    """``dataset[(item_index, {p0: boxes, p1: boxes, ...})]`` → the crops (or images) of those record
    positions' boxes (``float32[K_i, 4]``), in position then box order; images without boxes are not
    decoded. Each item also carries ``positions`` and ``boxes`` back.

    ``mode``: ``"crops"`` (PIL backend): ``crops`` = ``uint8 Tensor[c, h, w, 3]``; ``"decode"`` (tensor
    backend): ``images`` = BGR ``uint8 Tensor[H, W, 3]``; ``"stack"`` (batched backend): the BGR images
    padded into one ``uint8[n, H, W, 3]`` batch, written into slot ``item_index`` of ``ring``
    (``slot`` = its shape) or, when it does not fit or there is no ring, returned as ``batch``; with
    ``plan``, the :class:`CropPlan` of the batch.
    """

    def __init__(
        self, records: Sequence[ImageRecord], preprocess: CropPreprocess, mode: str, ring: HostRing | None = None
    ) -> None:
        self.records = records
        self.preprocess = preprocess
        self.mode = mode
        self.ring = ring

    def __getitem__(self, task: tuple[int, dict[int, np.ndarray]]) -> dict[str, Any]:
        item_index, boxes = task
        head = {"positions": list(boxes), "boxes": boxes}
        if self.mode != "crops":
            with_boxes = [p for p, b in boxes.items() if len(b)]
            try:
                images = [_decode(self.records[p], rgb=False) for p in with_boxes]
            except OVDError as e:
                return {**head, "images": [], "error": _error(e)}
            if self.mode == "stack":
                return {**head, "error": None, **self._stack(item_index, boxes, with_boxes, images)}
            return {**head, "images": [torch.from_numpy(im) for im in images], "error": None}
        ch, cw = self.preprocess.crop_size
        out = np.empty((sum(len(b) for b in boxes.values()), ch, cw, 3), dtype=np.uint8)  # (c, h, w, 3)
        i = 0
        try:
            for p, image_boxes in boxes.items():
                if len(image_boxes) == 0:
                    continue
                rec = self.records[p]
                # resampling treats channels independently: crop and resize BGR, flip the small result
                image = Image.fromarray(_decode(rec, rgb=False))
                for box in image_boxes:
                    bgr = self.preprocess.crop_resize(image, crop_box_pixels(box, rec.height, rec.width))
                    out[i] = bgr[:, :, ::-1]  # (h, w, 3) RGB
                    i += 1
        except OVDError as e:
            return {**head, "crops": torch.zeros(0), "error": _error(e)}
        return {**head, "crops": torch.from_numpy(out), "error": None}

    def _stack(
        self, item_index: int, boxes: dict[int, np.ndarray], with_boxes: list[int], images: list[np.ndarray]
    ) -> dict[str, Any]:
        rects = [crop_rects(boxes[p], self.records[p].height, self.records[p].width) for p in with_boxes]
        plan = plan_crops(rects, self.preprocess)
        if not images:
            return {"batch": torch.zeros((0, 1, 1, 3), dtype=torch.uint8), "plan": plan}
        shape = (len(images), max(im.shape[0] for im in images), max(im.shape[1] for im in images), 3)
        if self.ring is None or math.prod(shape) > self.ring.slot_bytes:
            return {"batch": torch.from_numpy(pad_stack(images)), "plan": plan}
        slot = self.ring.view(item_index, shape).numpy()  # (n, H, W, 3); padding is left as is (never read)
        for i, im in enumerate(images):
            slot[i, : im.shape[0], : im.shape[1]] = im
        return {"slot": shape, "plan": plan}


def _worker_init(worker_id: int) -> None:
    del worker_id
    cv2.setNumThreads(0)  # one decode thread per worker: parallelism comes from the workers
    torch.set_num_threads(1)


def _raise(error: tuple[str, str | None, str | None]) -> None:
    reason, path, field = error
    raise OVDError(reason, path=path, field=field)


def _loader(dataset: Dataset, sampler: Any, num_workers: int, batch_size: int | None, pin: bool) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=list if batch_size is not None else None,
        num_workers=num_workers,
        prefetch_factor=_PREFETCH if num_workers else None,  # HostRing's slot count relies on it
        worker_init_fn=_worker_init,
        pin_memory=pin,
    )


# --------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------


@dataclass
class _Chunk:
    index: int  # chunk index within the shard
    positions: range  # record positions
    boxes: list[np.ndarray] | None = None  # kept boxes per image, float32[K_i, 4]


def weights_sha256(model: torch.nn.Module) -> str:
    """Fingerprint of a model's weights: SHA-256 over its state dict (names, dtypes, shapes, bytes).
    Weights on a GPU come to the host in one copy (one copy per tensor would cost ~1 s for ViT-B)."""
    digest = hashlib.sha256()
    items = sorted(model.state_dict().items())
    flat = [t.detach().contiguous().reshape(-1).view(torch.uint8) for _, t in items]
    on_host = all(f.device.type == "cpu" for f in flat)
    data = (
        flat
        if on_host or not flat
        else torch.cat([f.to(flat[0].device) for f in flat]).cpu().split([f.numel() for f in flat])
    )
    for (name, t), b in zip(items, data, strict=True):
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(b.numpy().tobytes())
    return digest.hexdigest()


class _WeightsHash:
    """:func:`weights_sha256` of a model in a background thread (hashlib releases the GIL)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seconds = 0.0
        self._digest: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(model,), daemon=True)
        self._thread.start()

    def _run(self, model: torch.nn.Module) -> None:
        start = time.perf_counter()
        try:
            self._digest = weights_sha256(model)
        except BaseException as e:  # re-raised by result()
            self._error = e
        self.seconds = time.perf_counter() - start

    def result(self) -> str:
        """The digest (waits for it); the thread's exception, if any, is raised here."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._digest is not None
        return self._digest


def _run_metadata(
    records: Sequence[ImageRecord],
    source: ProposalSource,
    clip: ClipBundle,
    preprocess: CropPreprocess,
    *,
    k: int,
    nms_thresh: float,
    dataset_name: str,
    resize_backend: str,
    crop_dtype: str,
    weights_digest: str,
) -> dict[str, Any]:
    ids = np.array([r.image_id for r in records], dtype=np.int64)
    crop = {**preprocess.to_json(), "backend": resize_backend}
    if resize_backend == "batched":
        crop["matmul_dtype"] = crop_dtype
    return {
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        "dataset": dataset_name,
        "num_images": len(records),
        "k": k,
        "embed_dim": clip.embed_dim,
        "nms_thresh": nms_thresh,
        "clip": {
            "model": clip.model_name,
            "pretrained": clip.pretrained,
            "checkpoint_sha256": clip.checkpoint_sha256,
            "weights_sha256": weights_digest,
        },
        "crop_preprocess": crop,
        "proposals": source.describe(),
        "image_ids_sha256": image_ids_sha256(ids),
    }


def _keep(
    source_out: Sequence[tuple[np.ndarray, np.ndarray]],
    records: Sequence[ImageRecord],
    *,
    k: int,
    nms_thresh: float,
    path: str | None = None,
) -> list[np.ndarray]:
    """Clip and select (:func:`select_top_k`) each image's proposals; ``path``: the proposal file, for errors."""
    if len(source_out) != len(records):
        raise OVDError(f"the proposal source returned {len(source_out)} results for {len(records)} images", path=path)
    kept = []
    for (boxes, scores), rec in zip(source_out, records, strict=True):
        try:
            boxes = clip_to_image(np.asarray(boxes, dtype=np.float32).reshape(-1, 4), rec.height, rec.width)  # (P, 4)
            kept.append(select_top_k(boxes, scores, nms_thresh=nms_thresh, k=k)[0])  # (K_i, 4)
        except ValueError as e:  # OVDError included
            reason = e.reason if isinstance(e, OVDError) else str(e)
            raise OVDError(f"proposals of image {rec.image_id} ({rec.file_name}): {reason}", path=path) from e
    return kept


def _propose(
    chunk: _Chunk,
    records: Sequence[ImageRecord],
    source: ProposalSource,
    *,
    k: int,
    nms_thresh: float,
    num_workers: int,
) -> None:
    recs = [records[p] for p in chunk.positions]
    if not source.needs_images:
        chunk.boxes = _keep(source(recs, None), recs, k=k, nms_thresh=nms_thresh, path=getattr(source, "path", None))
        return
    loader = _loader(_ImageDataset(recs), None, num_workers, max(1, source.images_per_call), pin=False)
    kept: list[np.ndarray] = []
    start = 0
    for batch in loader:
        for item in batch:
            if item["error"] is not None:
                _raise(item["error"])
        batch_recs = recs[start : start + len(batch)]
        kept += _keep(source(batch_recs, [item["image"] for item in batch]), batch_recs, k=k, nms_thresh=nms_thresh)
        start += len(batch)
    chunk.boxes = kept


def _shm_free_bytes() -> int | None:
    """Free bytes of ``/dev/shm`` (where shared tensors live on Linux), None where unknown."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _make_ring(
    items: list[list[int]],
    records: Sequence[ImageRecord],
    num_workers: int,
    device: torch.device,
) -> HostRing | None:
    """Decode buffers for the batched backend: one slot per task that can be in flight, sized for the
    largest padded task (all its images, as their boxes may not be known yet; within
    :data:`_RING_BUDGET_BYTES`: a larger task goes through the queue).
    None (the queue for every task) where ``/dev/shm`` is too small to hold them twice over: a shared
    block larger than the free space kills the process when written (e.g. Docker's 64 MB default)."""
    num_slots = num_workers * _PREFETCH + 2  # outstanding tasks + the item in use + one being copied
    need = 0
    for positions in items:
        sizes = [(records[p].height, records[p].width) for p in positions]
        if sizes:
            need = max(need, len(sizes) * max(h for h, _ in sizes) * max(w for _, w in sizes) * 3)
    slot_bytes = min(need, _RING_BUDGET_BYTES // num_slots)
    free = _shm_free_bytes()
    if free is not None and 2 * num_slots * slot_bytes > free:
        logger.warning(
            "/dev/shm has %d MB free, too little for %d MB of decode buffers: images go through the DataLoader",
            free >> 20, (num_slots * slot_bytes) >> 20,
        )  # fmt: skip
        return None
    return HostRing(num_slots, slot_bytes, device)


class _Transfer:
    """Moves a worker task's images to the CLIP's device; on a GPU through a side stream, so that the
    copy of the next task overlaps the CLIP forward of this one."""

    def __init__(self, ring: HostRing | None, device: torch.device) -> None:
        self.ring = ring
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.events: dict[int, Any] = {}  # item index -> its copy's CUDA event
        self.queued = 0  # tasks whose images came through the DataLoader's queue

    def before_item(self, item_index: int) -> None:
        """Wait until item ``item_index - 2``'s slot is copied: taking item ``item_index`` off the
        loader hands that slot to a worker (:class:`HostRing`)."""
        event = self.events.pop(item_index - 2, None)
        if event is not None:
            event.synchronize()

    def batch(self, item: dict[str, Any], item_index: int) -> Tensor:
        """The item's padded ``uint8 Tensor[n, H, W, 3]`` BGR batch on the device."""
        if "slot" not in item:
            self.queued += len(item["batch"]) > 0
            return item["batch"].to(self.device, non_blocking=True)
        assert self.ring is not None
        host = self.ring.view(item_index, tuple(int(v) for v in item["slot"]))  # (n, H, W, 3)
        if self.stream is None:
            return host  # a view: used up before the slot is handed out again
        with torch.cuda.stream(self.stream):
            batch = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        torch.cuda.current_stream(self.device).wait_event(event)
        batch.record_stream(torch.cuda.current_stream(self.device))
        self.events[item_index] = event
        return batch

    def close(self) -> None:
        for event in self.events.values():
            event.synchronize()
        self.events.clear()
        if self.ring is not None:
            self.ring.close()


def _item_crops(
    item: dict[str, Any],
    item_index: int,
    records: Sequence[ImageRecord],
    preprocess: CropPreprocess,
    transfer: _Transfer,
    crop_dtype: torch.dtype,
) -> Tensor:
    """The crops of one loader item: as the workers made them (PIL backend), or made here on the device
    from the images the workers read (tensor and batched backends): ``float Tensor[c, 3, h, w]``."""
    if "crops" in item:
        return item["crops"]  # (c, h, w, 3) uint8
    device = transfer.device
    if "plan" in item:  # sizes checked against the records in the worker
        batch = transfer.batch(item, item_index)  # (n, H, W, 3)
        return batched_crop_resize(batch, None, preprocess, bgr=True, plan=item["plan"], dtype=crop_dtype)
    boxes = item["boxes"]
    with_boxes = [p for p in item["positions"] if len(boxes[p])]
    crops = []
    for p, bgr in zip(with_boxes, item["images"], strict=True):
        rec = records[p]
        image = bgr.to(device, non_blocking=True).permute(2, 0, 1).flip(0).float()  # (3, H, W) RGB 0-255
        crops += [preprocess.crop_resize_tensor(image, crop_box_pixels(b, rec.height, rec.width)) for b in boxes[p]]
    if not crops:
        return torch.zeros((0, 3, *preprocess.crop_size), device=device)
    return torch.stack(crops)  # (c, 3, h, w)


def _to_host(flat: Tensor) -> tuple[Tensor, Any]:
    """Start copying ``flat`` to the host; returns the host tensor and a CUDA event (None on a CPU)."""
    if flat.device.type != "cuda":
        return flat, None
    host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
    host.copy_(flat, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def _encode_chunks(
    chunks: list[_Chunk],
    records: Sequence[ImageRecord],
    preprocess: CropPreprocess,
    encoder: CropEncoder,
    *,
    k: int,
    batch_size: int,
    num_workers: int,
    resize_backend: str,
    bar: tqdm,
    finish: Callable[[_Chunk, dict[str, np.ndarray]], None],
    host_ring: bool = True,
    crop_dtype: torch.dtype = torch.float32,
    propose: Callable[[_Chunk], None] | None = None,
) -> None:
    """Crop and encode the given chunks; call ``finish(chunk, arrays)`` per chunk.

    A chunk without boxes gets them from ``propose(chunk)`` when its first worker task is handed out
    (in this thread, while the device works on earlier chunks). Nothing here waits for the device
    except :meth:`_Transfer.before_item` (a copy queued two items earlier) and the end: a finished
    chunk's embeddings are copied to the host asynchronously and written once the copy is done, while
    later chunks run.
    """
    images_per_item = max(1, batch_size // (2 * k))  # ~half a CLIP batch per worker task
    items: list[list[int]] = []
    item_chunk: list[_Chunk] = []
    last_item: dict[int, int] = {}  # chunk list index -> its last item
    for ci, c in enumerate(chunks):
        for s in range(c.positions.start, c.positions.stop, images_per_item):
            items.append(list(range(s, min(s + images_per_item, c.positions.stop))))
            item_chunk.append(c)
        last_item[len(items) - 1] = ci

    failed: list[BaseException] = []  # a proposal error: raised once the chunks before it are written

    def tasks() -> Iterator[tuple[int, dict[int, np.ndarray]]]:
        for i, (positions, chunk) in enumerate(zip(items, item_chunk, strict=True)):
            if chunk.boxes is None:
                if propose is None:
                    raise ValueError(f"chunk {chunk.index} has no boxes and no proposal source")
                try:
                    propose(chunk)
                except Exception as e:
                    failed.append(e)
                    return
            assert chunk.boxes is not None
            yield i, {p: chunk.boxes[p - chunk.positions.start] for p in positions}

    device = encoder.mean.device
    use_ring = host_ring and resize_backend == "batched"
    ring = _make_ring(items, records, num_workers, device) if use_ring else None
    transfer = _Transfer(ring, device)
    pinned = ring is not None and ring.pinned
    dataset = _CropDataset(records, preprocess, _WORKER_MODE[resize_backend], ring)
    loader = _loader(dataset, tasks(), num_workers, None, pin=device.type == "cuda")
    pending: list[Tensor] = []
    num_pending = 0
    embeddings: list[Tensor] = []  # stay on the device until the chunk is done: no sync per batch
    unwritten: deque[tuple[_Chunk, Tensor | None, Any]] = deque()  # chunks whose embeddings are on their way
    waited = 0.0

    def write(block: bool) -> None:
        while unwritten and (block or unwritten[0][2] is None or unwritten[0][2].query()):
            chunk, flat, event = unwritten.popleft()
            if event is not None:
                event.synchronize()
            host = None if flat is None else flat.numpy()  # (sum K_i, D) float16
            finish(chunk, _chunk_arrays(chunk, records, host, k=k, dim=encoder.clip.embed_dim))

    try:
        it = iter(loader)
        for item_index in range(len(items)):
            transfer.before_item(item_index)
            start = time.perf_counter()
            item = next(it, None)
            waited += time.perf_counter() - start
            if item is None:  # the tasks stopped at a proposal error
                break
            if item["error"] is not None:
                _raise(item["error"])
            crops = _item_crops(item, item_index, records, preprocess, transfer, crop_dtype)
            pending.append(crops)
            num_pending += len(crops)
            while num_pending >= batch_size:
                crops = torch.cat(pending)  # (n, ...)
                embeddings.append(encoder(crops[:batch_size]))
                pending, num_pending = [crops[batch_size:]], num_pending - batch_size
            if item_index in last_item:  # the chunk is complete: no batch spans two chunks
                if num_pending:
                    embeddings.append(encoder(torch.cat(pending)))
                flat, event = _to_host(torch.cat(embeddings)) if embeddings else (None, None)
                unwritten.append((chunks[last_item[item_index]], flat, event))
                pending, num_pending, embeddings = [], 0, []
            write(block=False)
            bar.update(len(item["positions"]))
        write(block=True)
    finally:
        transfer.close()
    if failed:
        raise failed[0]
    logger.info(
        "encoded %d images in %d tasks; %.1f s waiting for the workers%s",
        sum(len(c.positions) for c in chunks), len(items), waited,
        f"; decode buffers {ring.num_slots} x {ring.slot_bytes / 2**20:.1f} MB (page-locked: {pinned}), "
        f"{transfer.queued} tasks too large for them" if ring else "",
    )  # fmt: skip


def _chunk_arrays(
    chunk: _Chunk, records: Sequence[ImageRecord], flat: np.ndarray | None, *, k: int, dim: int
) -> dict[str, np.ndarray]:
    n = len(chunk.positions)
    boxes = np.zeros((n, k, 4), dtype=np.float32)
    valid = np.zeros((n, k), dtype=bool)
    for i, b in enumerate(chunk.boxes):
        boxes[i, : len(b)] = b
        valid[i, : len(b)] = True
    emb = np.zeros((n, k, dim), dtype=np.float16)
    flat = np.zeros((0, dim), dtype=np.float16) if flat is None else flat  # (sum K_i, D)
    if flat.shape[0] != int(valid.sum()):
        raise RuntimeError(f"{flat.shape[0]} embeddings for {int(valid.sum())} regions")
    emb[valid] = flat  # row-major order of valid slots = crop order (image, then box)
    ids = np.array([records[p].image_id for p in chunk.positions], dtype=np.int64)
    return {"image_ids": ids, "boxes": boxes, "embeddings": emb, "valid": valid}


def extract_region_embeddings(
    records: Sequence[ImageRecord],
    source: ProposalSource,
    clip: ClipBundle,
    out_dir: str | os.PathLike[str],
    *,
    k: int = DEFAULT_K,
    nms_thresh: float = DEFAULT_NMS_THRESH,
    batch_size: int = 256,
    num_workers: int = 2,
    num_shards: int = 1,
    shard_index: int = 0,
    chunk_size: int = 512,
    dataset_name: str = "",
    progress: bool = True,
    resize_backend: str = "auto",
    host_ring: bool = True,
    crop_dtype: str = "auto",
) -> Path:
    """Extract (or resume extracting) one shard of a region store; merge when every shard is done.

    Args:
        records: all images of the dataset, in store order (every shard must get the same list).
        source: where the proposals come from.
        clip: the CLIP teacher; runs on ``clip.device``.
        out_dir: the store directory (see :mod:`ovd.distill.store`).
        k: regions kept per image after NMS (METHOD §3.1: 5).
        nms_thresh: class-agnostic NMS IoU threshold (METHOD §3.1: 0.5).
        batch_size: crops per CLIP forward.
        num_workers: DataLoader processes that decode and crop (0 = in this process).
        num_shards, shard_index: this process's contiguous share of ``records``.
        chunk_size: images per resumable unit (a part file).
        dataset_name: recorded in the metadata.
        progress: show a progress bar over images.
        resize_backend: where crops are resized. ``"pil"``: in the workers with PIL, exactly as
            ``clip.preprocess`` on a PIL crop (the reference). ``"tensor"``: the workers only decode;
            crops are resized on ``clip.device`` as ``clip.preprocess`` does on a tensor crop (within
            about one intensity level of PIL; on a GPU this takes the resizing off the CPUs).
            ``"batched"``: as ``"tensor"`` with all crops of a worker task made by batched matrix
            products (the ``"tensor"`` numbers up to float rounding; the fastest on a GPU).
            ``"auto"``: ``"batched"`` when CLIP is on a GPU, else ``"pil"``. Recorded in the metadata,
            so a resumed or sharded run must use the same backend.
        host_ring: with the batched backend, workers decode into shared buffers that are page-locked
            on a GPU (:class:`HostRing`) instead of returning the images through the DataLoader's
            queue; the same numbers either way (False: the queue, for comparison).
        crop_dtype: with the batched backend, the dtype of its matrix products: ``"float32"``,
            ``"float16"`` (within one intensity level of float32, see :func:`batched_crop_resize`),
            or ``"auto"``: float16 on a GPU (tensor cores), float32 on a CPU. Recorded in the metadata.

    Returns:
        ``out_dir``; the store is complete (openable with :class:`RegionStore`) once every shard is
        done (``store_is_complete(out_dir)``).

    Raises:
        OVDError: bad arguments, duplicate image ids, a proposal file that covers none of the images,
            an unreadable image (naming the file), or existing parts / store from a different extraction.
    """
    records = list(records)
    for name, value, low in (("k", k, 1), ("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
        if value < low:
            raise OVDError(f"{name} must be >= {low}, got {value}", field=name)
    if not 0.0 < nms_thresh <= 1.0:
        raise OVDError(f"NMS threshold must be in (0, 1], got {nms_thresh}", field="nms_thresh")
    if not records:
        raise OVDError("no images to extract region embeddings for", field="records")
    chunks = [_Chunk(j, r) for j, r in enumerate(shard_chunks(len(records), num_shards, shard_index, chunk_size))]
    ids = [int(r.image_id) for r in records]
    if len(set(ids)) != len(ids):
        raise OVDError(f"duplicate image ids in dataset {dataset_name!r}", field="records")
    if isinstance(source, FileProposals) and not source.image_ids & set(ids):
        raise OVDError(f"the proposal file has no entry for any image of dataset {dataset_name!r}", path=source.path)

    if resize_backend == "auto":
        resize_backend = "batched" if clip.device.type == "cuda" else "pil"
    if resize_backend not in RESIZE_BACKENDS:
        raise OVDError(f"unknown resize backend {resize_backend!r} (valid: auto, {', '.join(RESIZE_BACKENDS)})")
    if crop_dtype == "auto":
        crop_dtype = "float16" if clip.device.type == "cuda" else "float32"
    if crop_dtype not in _CROP_DTYPES:
        valid = ", ".join(_CROP_DTYPES)
        raise OVDError(f"unknown crop dtype {crop_dtype!r} (valid: auto, {valid})", field="crop_dtype")
    out = Path(out_dir)
    preprocess = CropPreprocess.from_clip(clip)
    start = time.perf_counter()
    weights = _WeightsHash(clip.model)  # in the background: a fresh run starts cropping meanwhile
    meta_cache: dict[str, Any] = {}

    def metadata() -> dict[str, Any]:
        if not meta_cache:
            meta_cache.update(
                _run_metadata(
                    records,
                    source,
                    clip,
                    preprocess,
                    k=k,
                    nms_thresh=nms_thresh,
                    dataset_name=dataset_name,
                    resize_backend=resize_backend,
                    crop_dtype=crop_dtype,
                    weights_digest=weights.result(),
                )  # fmt: skip
            )
        return meta_cache

    if store_is_complete(out):
        check_store(out, metadata())
        logger.info("region store %s is already complete", out)
        return out
    layout = {"num_shards": num_shards, "chunk_size": chunk_size}

    def part_meta(c: _Chunk) -> dict[str, Any]:
        part = {"shard_index": shard_index, "chunk_index": c.index, "begin": c.positions.start, "end": c.positions.stop}
        return {**metadata(), "layout": layout, "part": part}

    todo = []
    for c in chunks:
        path = part_path(out, shard_index, c.index)
        if path.is_file():
            check_part(path, part_meta(c))
        else:
            todo.append(c)
    done_images = sum(len(c.positions) for c in chunks) - sum(len(c.positions) for c in todo)
    logger.info(
        "shard %d/%d: %d chunks, %d already done; extracting %d images",
        shard_index, num_shards, len(chunks), len(chunks) - len(todo), sum(len(c.positions) for c in todo),
    )  # fmt: skip

    def finish(c: _Chunk, arrays: dict[str, np.ndarray]) -> None:
        write_part(part_path(out, shard_index, c.index), **arrays, meta=part_meta(c))

    def propose(c: _Chunk) -> None:
        _propose(c, records, source, k=k, nms_thresh=nms_thresh, num_workers=num_workers)

    encoder = CropEncoder(clip, preprocess)
    total = sum(len(c.positions) for c in chunks)
    with tqdm(total=total, initial=done_images, unit="img", desc="region embeddings", disable=not progress) as bar:
        opts = dict(
            k=k,
            batch_size=batch_size,
            num_workers=num_workers,
            resize_backend=resize_backend,
            bar=bar,
            finish=finish,
            host_ring=host_ring,
            crop_dtype=getattr(torch, crop_dtype),
        )
        if source.needs_images:  # the model sees a chunk, then its crops are encoded: resumable per chunk
            for c in todo:
                propose(c)
                _encode_chunks([c], records, preprocess, encoder, **opts)
        elif todo:  # cheap proposals, made as the chunks come up: one worker pool for all chunks
            _encode_chunks(todo, records, preprocess, encoder, propose=propose, **opts)
    metadata()  # the weights hash is known, whatever was done
    encoded = time.perf_counter()
    logger.info("proposals, crops and encoding: %.1f s (weights hash %.1f s, in the background)",
                encoded - start, weights.seconds)  # fmt: skip

    wanted = expected_parts(out, len(records), num_shards, chunk_size)
    missing = [p for p in wanted if not p.is_file()]
    if store_is_complete(out):
        return out
    if missing:
        logger.info("shard %d done; %d parts of other shards missing, not merging yet", shard_index, len(missing))
        return out
    try:
        merge_store(out)
    except MergeInProgressError as e:
        logger.info("not merging: %s", e)
    logger.info("merged the store in %.1f s", time.perf_counter() - encoded)
    return out
