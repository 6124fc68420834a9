"""Benchmark: one training step of the OV-Shapes detector and of its CLIP teacher (session 8).

Detector: the recipe (`configs/ovshapes/base.yaml`: FPN 64 channels, 128 sampled RoIs per image, RPN
600 → 300 boxes before/after NMS, short side uniform in [224, 288] per image, so a batch of 8 is
zero-padded to its largest image) against the cheaper candidates tried on the dev split in session 8
(one short side of {224, 256, 288} per batch, 64 RoIs, RPN 300 → 150; and the same with FPN 32), and
the recipe under bfloat16 autocast (`solver.amp_dtype=bfloat16`, session 9; fast where the CPU has
AVX512-BF16 or AMX). All
read the same OV-Shapes training images in the same order through the real data loader (batches cached
first, loading excluded); forward + backward + SGD step, variants interleaved round by round in one
process; medians.

Teacher: a step of `ovd.clip.teacher` training (128 augmented 32-px crops + their texts, CLIP loss,
AdamW) with the per-tensor AdamW and contiguous tensors (before session 8) against fused AdamW and
channels-last convolutions (now).

    python benchmarks/bench_ovshapes_step.py --threads 1 2 --output benchmarks/results/ovshapes_step.md
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from pathlib import Path

import torch
from machine import emit_report, header, row, table_header  # benchmarks/ (scripts run from this folder's path)
from timing import timed_interleaved

from ovd.config import load_config
from ovd.engine.sources import build_source_loader, train_sources
from ovd.engine.trainer import amp_dtype, build_optimizer
from ovd.modeling.build import build_model

BASE = Path(__file__).resolve().parents[1] / "configs" / "ovshapes" / "base.yaml"
CANDIDATE = [  # session 8's cheaper step (dev split: PIS ~9 novel AP50 lower, from the 64 RoIs; not adopted)
    "input.min_size_train=[224,256,288]",
    "input.min_size_train_sampling=choice",
    "input.size_per_batch=true",
    "model.roi_heads.batch_size_per_image=64",
    "model.rpn.pre_nms_top_n_train=300",
    "model.rpn.post_nms_top_n_train=150",
]
VARIANTS = {
    "recipe": [],
    "per-batch sizes, 64 RoIs, RPN 300/150": CANDIDATE,
    "the same + FPN 32": [*CANDIDATE, "model.backbone.fpn_channels=32"],
    "recipe, bfloat16 autocast": ["solver.amp=true", "solver.amp_dtype=bfloat16"],  # session 9 (opt-in)
}


def detector_steps(overrides: list[str], num_batches: int):
    """(A closure running one training step per cached batch, its number of steps), mean padded pixels per image."""
    cfg = load_config(BASE, ["clip.pretrained=", "data.num_workers=0", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg, class_embeddings=torch.nn.functional.normalize(torch.randn(16, 64), dim=1)).train()
    optimizer = build_optimizer(cfg.solver, model)
    loader = build_source_loader(cfg, train_sources(cfg, 1), 0)
    batches = list(itertools.islice(iter(loader), num_batches))
    padded = []
    for batch in batches:
        h = max(d["image"].shape[1] for d in batch)
        w = max(d["image"].shape[2] for d in batch)
        padded.append((-(-h // 32) * 32) * (-(-w // 32) * 32))
    inputs = [([d["image"] for d in b], [{"boxes": d["boxes"], "labels": d["labels"]} for d in b]) for b in batches]

    dtype = amp_dtype(cfg.solver, torch.device("cpu"))  # as the trainer: None = float32

    def run() -> None:
        for images, targets in inputs:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                losses = model(images, targets)
            sum(v.float() for v in losses.values()).backward()
            optimizer.step()

    return (run, len(inputs)), statistics.mean(padded)


def teacher_step(after: bool):
    """(A closure running 5 teacher training steps, 5)."""
    from ovd.clip import create_clip
    from ovd.clip.teacher import TeacherConfig, augment, contrastive_loss, normalize, param_groups

    cfg = TeacherConfig()
    torch.manual_seed(0)
    clip = create_clip(cfg.model_name)
    model = clip.model.train()
    if after:
        model.visual.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, fused=after)
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (cfg.batch_size, 32, 32, 3), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 16, (cfg.batch_size,), generator=gen)
    tokens = clip.tokenizer([f"a photo of a shape number {i}" for i in range(cfg.batch_size + 16)])
    text_labels = torch.cat([labels, torch.arange(16)])

    def run() -> None:
        for _ in range(5):
            x = normalize(augment(pixels.permute(0, 3, 1, 2).float().div(255.0), cfg, gen), clip)
            if after:
                x = x.contiguous(memory_format=torch.channels_last)
            image_features, text_features, scale = model(x, tokens)
            loss = contrastive_loss(image_features, text_features, scale, labels, text_labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return run, 5


def interleaved(runs: dict[str, tuple], rounds: int) -> dict[str, float]:
    """Median seconds per step of each ``(closure, steps)`` over interleaved rounds, after one warm-up."""
    times, _ = timed_interleaved({k: run for k, (run, _) in runs.items()}, 1, rounds)
    return {k: statistics.median(times[k]) / steps for k, (_, steps) in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to measure")
    parser.add_argument("--batches", type=int, default=12, help="cached detector batches per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (the median is reported)")
    parser.add_argument("--output", default="", help="also write the markdown report here")
    args = parser.parse_args()

    detector, pixels = {}, {}
    for name, overrides in VARIANTS.items():
        detector[name], pixels[name] = detector_steps(overrides, args.batches)
    teacher = {"before session 8 (per-tensor AdamW, contiguous)": teacher_step(False),
               "now (fused AdamW, channels-last)": teacher_step(True)}  # fmt: skip
    details = [
        f"- Detector: {args.batches} real batches of 8 OV-Shapes training images (the same images for every "
        f"variant), forward + backward + SGD step, medians of {args.rounds} interleaved rounds. Mean padded "
        "pixels per image: " + ", ".join(f"{k} {v:,.0f}" for k, v in pixels.items()) + ".",
        "- Teacher: one step on 128 crops (mean of 5 steps), medians of the interleaved rounds.",
    ]
    title = "OV-Shapes training steps: detector variants and the CLIP teacher"
    lines = header(title, "\n".join(details), level=2)
    lines += table_header(["threads", "model", "variant", "step (ms)", "speed-up vs the first row"], "rllrr")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for label, runs in (("detector", detector), ("teacher", teacher)):
            medians = interleaved(runs, args.rounds)
            first = next(iter(medians.values()))
            for name, t in medians.items():
                lines.append(row(threads, label, name, f"{t * 1e3:.0f}", f"{first / t:.2f}×"))
    emit_report(lines, args.output)


if __name__ == "__main__":
    main()
