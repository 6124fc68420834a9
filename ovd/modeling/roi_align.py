"""RoIAlign with a fast CPU backward pass.

The forward pass is torchvision's ``roi_align`` (bit-identical outputs). On CPU, torchvision's backward
kernel recomputes every sample's bilinear weights once per channel and adds one value at a time; on the
OV-Shapes detector it was 27 % of a training step (190 ms of 700 on one core). RoIAlign's weights
factorise into a row and a column operator per region (:func:`axis_weights`), so the gradient of a
region's window of the feature map is ``Wyᵀ · grad_out[r] · Wx``: two batched matmuls over all regions
and channels, then one ``index_add_`` of the windows into the map. The sampling grid, the beyond-the-map
rule and the edge clamping follow torchvision's kernel (``roi_align_kernel.cpp``), so gradients agree
with it to float rounding (the tests compare both and check hand values). On CUDA, or without
gradients, torchvision's op runs as is.

:class:`MultiScaleRoIAlign` is torchvision's pooler (same level mapping, scales and output) with each
level's RoIAlign routed through :func:`roi_align`; :class:`RoIAlign` likewise.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable
from torchvision.ops import MultiScaleRoIAlign as _TVMultiScaleRoIAlign
from torchvision.ops import roi_align as tv_roi_align
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales


def axis_weights(starts: Tensor, lengths: Tensor, bins: int, grid: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """RoIAlign's bilinear weights along one axis, summed over each bin's samples and divided by their count.

    RoIAlign's weights factorise: sample ``(iy, ix)`` of bin ``(i, j)`` reads pixel ``(y, x)`` with weight
    ``wy(iy, y) · wx(ix, x) / (grid_h · grid_w)``, and a sample beyond the map on either axis counts zero
    on both. So ``out[r, :, i, j] = Σ_y Σ_x Wy[r, i, y] · Wx[r, j, x] · F[b_r, :, y0_r + y, x0_r + x]``.

    Args:
        starts, lengths: ``Tensor[R]`` region start and length on this axis, in feature pixels.
        bins: bins along the axis (``ph`` or ``pw``).
        grid: ``Tensor[R]`` long, samples per bin along the axis (≥ 0).
        size: feature-map length along the axis.

    Returns:
        ``(W, first)``: ``Tensor[R, bins, K]`` weights over a window of ``K`` pixels starting at ``first``
        (``Tensor[R]`` long); window pixels beyond the map have zero weight.
    """
    num, device, dtype = starts.shape[0], starts.device, starts.dtype
    roi = torch.repeat_interleave(torch.arange(num, device=device), grid)  # (S,) one per (region, sample)
    local = torch.arange(roi.numel(), device=device) - (torch.cumsum(grid, 0) - grid)[roi]
    step = lengths[roi] / bins  # (S,) bin size
    gridf = grid[roi].to(dtype)
    # torchvision's expression: start + bin · size + (i + .5) · size / grid
    coord = starts[roi, None] + torch.arange(bins, device=device, dtype=dtype) * step[:, None]
    coord = coord + ((local.to(dtype) + 0.5) * step / gridf)[:, None]  # (S, bins)
    inside = (coord >= -1.0) & (coord <= size)  # beyond [-1, size] a sample counts zero
    c = coord.clamp(min=0.0)
    low = c.long()  # floor (c >= 0)
    at_edge = low >= size - 1  # the last pixel takes the whole weight
    low = torch.where(at_edge, size - 1, low)
    high = torch.where(at_edge, size - 1, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(c), c - low.to(dtype))
    scale = inside.to(dtype) / gridf[:, None]  # (S, bins)
    first = torch.full((num,), size - 1, dtype=torch.long, device=device)
    if roi.numel() == 0:
        return torch.zeros(num, bins, 1, dtype=dtype, device=device), first
    first = first.scatter_reduce(0, roi, low.amin(dim=1), reduce="amin")  # (R,)
    width = int((high - first[roi, None]).max()) + 1
    out = torch.zeros(num, bins, width, dtype=dtype, device=device)
    rows = roi[:, None] * bins + torch.arange(bins, device=device)  # (S, bins) flat (region, bin)
    flat = out.view(num * bins, width)
    flat.index_put_((rows, low - first[roi, None]), (1.0 - frac) * scale, accumulate=True)
    flat.index_put_((rows, high - first[roi, None]), frac * scale, accumulate=True)
    return out, first


def _grid(length: Tensor, bins: int, sampling_ratio: int) -> Tensor:
    if sampling_ratio > 0:
        return torch.full_like(length, sampling_ratio, dtype=torch.long)
    return torch.ceil(length / bins).long()  # adaptive: ceil(region size / bins)


WINDOW_GROUPS = 4
"""The backward pass sorts the regions by area into this many equal groups; a group's windows are padded
to its largest (a speed setting: the gradient is the same up to float rounding)."""


def roi_align_backward(
    grad_out: Tensor,
    rois: Tensor,
    feature_shape: tuple[int, int, int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """Gradient of RoIAlign w.r.t. its input: ``Tensor[N, Ch, H, W]`` from ``grad_out: Tensor[R, Ch, ph, pw]``.

    Each region's window gradient is ``Wyᵀ · grad_out[r] · Wx`` (two batched matmuls, :func:`axis_weights`),
    then the windows are added into the feature map. Windows are padded to the largest of their group;
    regions are grouped by size so that a few large ones do not pad all the others.
    """
    n, ch, height, width = feature_shape
    num, _, ph, pw = grad_out.shape
    grad = grad_out.new_zeros((n, height, width, ch))
    if num == 0:
        return grad.permute(0, 3, 1, 2)
    rois = rois.to(grad_out.dtype)
    offset = 0.5 if aligned else 0.0
    x0 = rois[:, 1] * spatial_scale - offset  # (R,)
    y0 = rois[:, 2] * spatial_scale - offset
    roi_w = rois[:, 3] * spatial_scale - offset - x0
    roi_h = rois[:, 4] * spatial_scale - offset - y0
    if not aligned:  # legacy mode: regions of at least one feature pixel
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    image = rois[:, 0].long()
    flat = grad.view(-1, ch)
    for idx in torch.argsort(roi_h * roi_w).tensor_split(min(WINDOW_GROUPS, num)):
        wy, fy = axis_weights(y0[idx], roi_h[idx], ph, _grid(roi_h[idx], ph, sampling_ratio), height)  # (G, ph, Kh)
        wx, fx = axis_weights(x0[idx], roi_w[idx], pw, _grid(roi_w[idx], pw, sampling_ratio), width)  # (G, pw, Kw)
        g, kh, kw = idx.numel(), wy.shape[2], wx.shape[2]
        # channels last throughout, so that the windows are added into the map without a transpose
        go = grad_out[idx].permute(0, 2, 3, 1).reshape(g * ph, pw, ch)  # (G·ph, pw, Ch)
        wxt = wx.transpose(1, 2)[:, None].expand(g, ph, kw, pw).reshape(g * ph, kw, pw)  # (G·ph, Kw, pw)
        t = torch.bmm(wxt, go).view(g, ph, kw * ch)  # (G, ph, Kw·Ch)
        win = torch.bmm(wy.transpose(1, 2), t)  # (G, Kh, Kw·Ch)
        ys = (fy[:, None] + torch.arange(kh, device=fy.device)).clamp(max=height - 1)  # (G, Kh) past the map: weight 0
        xs = (fx[:, None] + torch.arange(kw, device=fx.device)).clamp(max=width - 1)  # (G, Kw)
        pix = (image[idx, None, None] * height + ys[:, :, None]) * width + xs[:, None, :]  # (G, Kh, Kw)
        flat.index_add_(0, pix.reshape(-1), win.view(-1, ch))
    return grad.permute(0, 3, 1, 2)


class _RoIAlignFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        features: Tensor,
        rois: Tensor,
        output_size: tuple[int, int],
        spatial_scale: float,
        sampling_ratio: int,
        aligned: bool,
    ) -> Tensor:
        ctx.save_for_backward(rois)
        ctx.params = (tuple(features.shape), spatial_scale, sampling_ratio, aligned)  # type: ignore[attr-defined]
        return tv_roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (rois,) = ctx.saved_tensors  # type: ignore[attr-defined]
        shape, spatial_scale, sampling_ratio, aligned = ctx.params  # type: ignore[attr-defined]
        grad = roi_align_backward(grad_out, rois, shape, spatial_scale, sampling_ratio, aligned)
        return grad.contiguous(), None, None, None, None, None


def roi_align(
    features: Tensor,
    rois: Tensor,
    output_size: tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """``torchvision.ops.roi_align`` (``rois`` as a ``Tensor[R, 5]``), with the window-matmul backward on CPU."""
    if features.device.type == "cpu" and features.requires_grad and torch.is_grad_enabled():
        return _RoIAlignFunction.apply(features, rois, output_size, spatial_scale, sampling_ratio, aligned)
    return tv_roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)


class MultiScaleRoIAlign(_TVMultiScaleRoIAlign):
    """torchvision's multi-level pooler (level mapping, inferred scales) over :func:`roi_align`; ``aligned``
    pools with the half-pixel offset (detectron2's ROIAlignV2), torchvision's pooler is unaligned."""

    def __init__(self, *args, aligned: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.aligned = aligned

    def forward(  # type: ignore[override]
        self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        levels_in = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                levels_in, image_shapes, self.canonical_scale, self.canonical_level
            )
        rois = _convert_to_roi_format(boxes)  # (R, 5)
        size = self.output_size
        first = levels_in[0]
        if len(levels_in) == 1:
            return roi_align(first, rois, size, self.scales[0], self.sampling_ratio, self.aligned)
        levels = self.map_levels(boxes)  # (R,)
        result = first.new_zeros((rois.shape[0], first.shape[1], *size))  # (R, Ch, ph, pw)
        for level, (feature, scale) in enumerate(zip(levels_in, self.scales, strict=True)):
            idx = torch.where(levels == level)[0]
            pooled = roi_align(feature, rois[idx], size, scale, self.sampling_ratio, self.aligned)
            result[idx] = pooled.to(result.dtype)
        return result


class RoIAlign(torch.nn.Module):
    """``torchvision.ops.RoIAlign`` over :func:`roi_align` (boxes as ``list[Tensor[K, 4]]`` or ``Tensor[R, 5]``)."""

    def __init__(self, output_size: int, spatial_scale: float, sampling_ratio: int, aligned: bool = False) -> None:
        super().__init__()
        self.output_size = (output_size, output_size)
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, features: Tensor, boxes: Tensor | list[Tensor]) -> Tensor:
        rois = _convert_to_roi_format(boxes) if isinstance(boxes, list) else boxes
        return roi_align(features, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)


def fpn_pooler(
    resolution: int,
    sampling_ratio: int,
    *,
    min_level: int = 2,
    canonical_box_size: int = 224,
    canonical_level: int = 4,
    aligned: bool = False,
) -> MultiScaleRoIAlign:
    """The box and mask heads' RoIAlign over ``p{min_level}``–``p5``: ``Tensor[R, Ch, S, S]``, ``S = resolution``.

    A box of side ``canonical_box_size`` is pooled from level ``canonical_level`` (FPN paper, eq. 1).
    """
    return MultiScaleRoIAlign(
        [f"p{k}" for k in range(min_level, 6)],
        resolution,
        sampling_ratio,
        canonical_scale=canonical_box_size,
        canonical_level=canonical_level,
        aligned=aligned,
    )
