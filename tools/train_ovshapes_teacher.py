r"""Train the OV-Shapes CLIP teacher (a tiny open_clip model) and print its zero-shot accuracy.

Example (the default teacher, at the path the OV-Shapes configs expect):
    python tools/train_ovshapes_teacher.py --output datasets/ovshapes/teacher/ovshapes-clip.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import torch

from ovd.clip.teacher import TeacherConfig, teacher_path, train_teacher
from ovd.errors import OVDError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = TeacherConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, help="checkpoint .pt (default: <datasets root>/" + "ovshapes/teacher/"
                   "ovshapes-clip.pt); the JSON sidecar goes next to it")  # fmt: skip
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="crops per step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate")
    p.add_argument("--num-train-crops", type=int, default=d.num_train_crops, help="training crops rendered")
    p.add_argument("--num-eval-crops", type=int, default=d.num_eval_crops, help="held-out crops for accuracy")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of crops, init and batch order")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the time budget assumes 2)")
    p.add_argument("--workers", type=int, default=2, help="crop render processes (results do not change)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ovd").setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    try:
        overrides = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "num_train_crops",
                                                   "num_eval_crops", "seed")}  # fmt: skip
        cfg = dataclasses.replace(TeacherConfig(), **overrides)
        output = args.output or teacher_path()
        record = train_teacher(cfg, output, progress=not args.no_progress, workers=args.workers)
    except OVDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    acc = record["accuracy"]
    print(f"zero-shot top-1 ({', '.join(cfg.eval_templates)!r} over {len(record['class_names'])} classes, "
          f"{acc['num']} held-out crops): all {acc['top1']:.2f}%  base {acc['top1_base']:.2f}%  "
          f"novel {acc['top1_novel']:.2f}%  [{record['seconds']['total']:.0f}s] -> {output}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
