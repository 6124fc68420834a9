"""Crop geometry and resize kernels of region extraction: pure functions of boxes, images and tensors.

open_clip's eval transform (shortest side to the CLIP input size, centre crop) applied to a box of a
decoded image, three ways that give the same pixels: :meth:`CropPreprocess.crop_resize` (PIL, exactly
``clip.preprocess`` on a PIL crop), :meth:`CropPreprocess.crop_resize_tensor` (torch, per crop, as
``clip.preprocess`` on a tensor crop) and :func:`batched_crop_resize` (every crop of a batch of images
as two batched matrix products, :func:`resize_weights`). Nothing here reads files or keeps state.

Shape shorthand: ``N`` images of a batch (padded to ``H x W``), ``K`` crop slots per image, ``c`` crops,
``h x w`` CLIP input size, ``S`` pixels of an image axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torch import Tensor

from ovd.clip.model import ClipBundle
from ovd.errors import OVDError

_PIL_RESAMPLE = {
    T.InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
    T.InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
}
_FILTER_SUPPORT = {"bicubic": 2.0, "bilinear": 1.0}  # half-width of the resampling kernel at scale 1
_BICUBIC_A = -0.5  # the antialiased bicubic kernel of PIL and torch (``antialias=True``) uses a = -0.5
_PASS_THROUGH = ("MaybeConvertMode", "MaybeToTensor", "ToTensor", "_convert_to_rgb")  # no-ops on RGB crops


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
