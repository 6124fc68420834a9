"""Benchmark: pasting Mask R-CNN masks into the image, torchvision's ``paste_masks_in_image`` vs ovd's.

The LVIS protocol keeps 300 detections per image, each with a 28x28 mask that evaluation pastes into the
image before RLE encoding. Both functions get the same masks and boxes (random boxes inside the image, 2-150
px, plus one whole-image box); outputs are checked bit-identical, then timed interleaved (medians).

    python benchmarks/bench_paste.py --output benchmarks/results/paste.md
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial

import torch
from machine import emit_report, header, row, table_header  # benchmarks/ (scripts run from this folder's path)
from timing import timed_interleaved
from torchvision.models.detection.roi_heads import paste_masks_in_image

from ovd.modeling.mask_head import paste_masks


def inputs(num: int, height: int, width: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    xy = torch.rand(num, 2, generator=gen) * min(height, width)
    boxes = torch.cat([xy, xy + 2 + torch.rand(num, 2, generator=gen) * 148], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    boxes[0] = torch.tensor([0.0, 0.0, width, height])
    return torch.rand(num, 1, 28, 28, generator=gen), boxes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=300, help="masks per image")
    parser.add_argument("--sizes", nargs="+", default=["256x256", "800x1200"], help="HxW image sizes")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    details = f"{args.num} masks per image, median of {args.reps} interleaved runs."
    lines = header("Mask pasting: torchvision vs ovd", details, threads=args.threads)
    lines += table_header(["image", "torchvision (ms)", "ovd (ms)", "speed-up", "identical"], "lrrrl")
    gen = torch.Generator().manual_seed(0)
    for spec in args.sizes:
        height, width = (int(v) for v in spec.split("x"))
        masks, boxes = inputs(args.num, height, width, gen)
        size = (height, width)
        same = torch.equal(paste_masks(masks, boxes, size), paste_masks_in_image(masks, boxes, size)[:, 0])
        fns = {"tv": partial(paste_masks_in_image, masks, boxes, size), "ovd": partial(paste_masks, masks, boxes, size)}
        times, _ = timed_interleaved(fns, 0, args.reps)
        tv, ours = statistics.median(times["tv"]), statistics.median(times["ovd"])
        lines.append(row(f"{height}x{width}", f"{tv * 1e3:.1f}", f"{ours * 1e3:.1f}", f"{tv / ours:.2f}x", same))
    emit_report(lines, args.output)


if __name__ == "__main__":
    main()
