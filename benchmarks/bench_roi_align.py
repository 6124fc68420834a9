"""Benchmark: ovd's RoIAlign CPU backward (``ovd.modeling.roi_align``) against torchvision's, side by side.

Two measurements, both interleaved in rounds (alternating which goes first) in one process so that the
machine's noise hits both alike; the figure is the median of the repetitions:

1. the op alone: backward of one RoIAlign call per FPN level (p3–p5, 64 channels, 7x7 bins, adaptive
   sampling) on the regions the OV-Shapes detector pools in one training step (8 images of 256 px, 128
   sampled regions each: boxes of 16–120 px around the objects, mapped to levels as the detector does);
2. one training step (forward + backward) of the OV-Shapes base detector (configs/ovshapes/base.yaml) on
   8 random 256-px images with 4 boxes each, with the pooler's RoIAlign switched between the two.

Gradients are checked equal (to float rounding) before timing.

    python benchmarks/bench_roi_align.py --threads 1 2 --output benchmarks/results/roi_align.md
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

import torch
from machine import emit_report, header, row, table_header  # benchmarks/ (scripts run from this folder's path)
from timing import timed_interleaved
from torchvision.ops import roi_align as tv_roi_align

import ovd.modeling.roi_align as ovd_roi_align
from ovd.config import load_config
from ovd.modeling.build import build_model

NUM_IMAGES, IMAGE_SIZE, CHANNELS = 8, 256, 64
LEVELS = {3: 8, 4: 16, 5: 32}  # FPN level -> stride
CANONICAL_SIZE, CANONICAL_LEVEL = 64, 4  # configs/ovshapes/base.yaml


def _torchvision(features, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False):
    return tv_roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)


def _level_inputs(gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """(features, rois, scale) per level for one step's 8 × 128 regions (OV-Shapes object sizes)."""
    num = NUM_IMAGES * 128
    side = torch.empty(num).uniform_(math.log(16.0), math.log(120.0), generator=gen).exp()  # log-uniform px
    aspect = torch.exp(torch.empty(num).uniform_(-0.7, 0.7, generator=gen))
    w, h = side * aspect.sqrt(), side / aspect.sqrt()
    cx = torch.rand(num, generator=gen) * IMAGE_SIZE
    cy = torch.rand(num, generator=gen) * IMAGE_SIZE
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1).clamp(0, IMAGE_SIZE)
    batch = torch.arange(num) // 128
    rois = torch.cat([batch[:, None].float(), boxes], 1)
    scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    level = torch.floor(CANONICAL_LEVEL + torch.log2(scale / CANONICAL_SIZE + 1e-6)).clamp(3, 5)
    out = []
    for k, stride in LEVELS.items():
        feats = torch.randn(NUM_IMAGES, CHANNELS, IMAGE_SIZE // stride, IMAGE_SIZE // stride, generator=gen)
        out.append((feats, rois[level == k], 1.0 / stride))
    return out


def bench_op(reps: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    inputs = _level_inputs(gen)
    grads = [torch.randn(r.shape[0], CHANNELS, 7, 7, generator=gen) for _, r, _ in inputs]

    def run(fn):
        out = []
        for (f, r, s), g in zip(inputs, grads, strict=True):
            x = f.clone().requires_grad_()
            fn(x, r, (7, 7), s, 0, False).backward(g)
            out.append(x.grad)
        return out

    for a, b in zip(run(_torchvision), run(ovd_roi_align.roi_align), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    fns = {"torchvision": lambda: run(_torchvision), "ovd": lambda: run(ovd_roi_align.roi_align)}
    times, _ = timed_interleaved(fns, 0, reps)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_step(reps: int) -> dict[str, float]:
    cfg = load_config(Path(__file__).parents[1] / "configs" / "ovshapes" / "base.yaml", ["clip.pretrained="])
    torch.manual_seed(0)
    model = build_model(cfg, class_embeddings=torch.randn(16, 64)).train()
    gen = torch.Generator().manual_seed(0)
    images = [
        torch.randint(0, 255, (3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8, generator=gen) for _ in range(NUM_IMAGES)
    ]
    targets = []
    for _ in range(NUM_IMAGES):
        xy = torch.rand(4, 2, generator=gen) * 150
        wh = 16 + torch.rand(4, 2, generator=gen) * 100
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(0, 10, (4,), generator=gen)})
    original = ovd_roi_align.roi_align

    def step() -> None:
        torch.manual_seed(0)
        model.zero_grad(set_to_none=True)
        sum(model(images, targets).values()).backward()

    def with_op(fn):
        def run() -> None:
            ovd_roi_align.roi_align = fn  # what MultiScaleRoIAlign.forward calls
            step()

        return run

    try:
        for _ in range(2):
            step()  # warm-up
        times, _ = timed_interleaved({"torchvision": with_op(_torchvision), "ovd": with_op(original)}, 0, reps)
    finally:
        ovd_roi_align.roi_align = original
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--output", default="", help="markdown report path (printed too)")
    args = parser.parse_args()
    details = f"Median of {args.reps} interleaved repetitions; threads per row in the table."
    lines = header("RoIAlign backward on CPU: torchvision vs ovd", details)
    lines += table_header(["threads", "measurement", "torchvision (ms)", "ovd (ms)", "speed-up"], "lllll")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for label, result in (
            ("RoIAlign forward + backward, p3-p5", bench_op(args.reps)),
            ("training step (forward + backward)", bench_step(args.reps)),
        ):
            tv, ours = result["torchvision"], result["ovd"]
            lines.append(row(threads, label, f"{tv * 1e3:.1f}", f"{ours * 1e3:.1f}", f"{tv / ours:.2f}x"))
    emit_report(lines, args.output)


if __name__ == "__main__":
    main()
