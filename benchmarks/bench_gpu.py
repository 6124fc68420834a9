"""GPU timings of the reference-size detectors: training step (fp32 vs AMP) and inference latency.

    python benchmarks/bench_gpu.py --backbone resnet50_c4 --classes 80 --size 800 1333

Random weights and inputs; numbers are medians over --repeats after --warmup iterations.
"""

from __future__ import annotations

import argparse
import functools
import statistics

import torch
from machine import emit_report, header, row, table_header  # benchmarks/ (scripts run from this folder's path)
from timing import sample

from ovd.config import load_config
from ovd.modeling.build import build_model


def _time(fn, warmup: int, repeats: int) -> float:
    return statistics.median(sample(fn, repeats, warmup, sync=torch.cuda.synchronize))


def _train_step(model, opt, scaler, images, targets, amp: bool) -> None:
    model.train()
    with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
        loss = sum(model(images, targets).values())
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


@torch.no_grad()
def _infer(model, images, amp: bool) -> None:
    model.eval()
    with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
        model(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet50_c4", help="resnet50_c4 | resnet50_fpn")
    parser.add_argument("--classes", type=int, nargs="+", default=[80, 1203], help="vocabulary sizes")
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1333], help="image height width")
    parser.add_argument("--batch", type=int, default=2, help="images per training step (reference: 2 per GPU)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed iterations")
    parser.add_argument("--repeats", type=int, default=20, help="timed iterations")
    parser.add_argument("--output", default="", help="markdown report path (printed too)")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    h, w = args.size
    details = f"Medians over {args.repeats} iterations after {args.warmup} untimed ones; random weights and inputs."
    lines = header("", details, gpu=True)
    columns = ["backbone", "classes", "mode", f"train step (ms, batch {args.batch})", "inference (ms, 1 image)"]
    lines += table_header([*columns, "peak mem (GB)"], "lrlrrr")
    for c in args.classes:
        overrides = [f"model.backbone.name={args.backbone}"]
        if args.backbone.endswith("fpn"):
            overrides += ["model.rpn.anchor_sizes=[[32],[64],[128],[256],[512]]", "model.roi_heads.pooler_resolution=7"]
        # A bias of -10 keeps random-weight sigmoid scores under the test threshold, as a trained
        # model's are for most classes; otherwise NMS over ~C×1000 random candidates dominates.
        overrides += ["model.classifier.use_bias=true", "model.classifier.bias_init=-10.0"]
        cfg = load_config(None, overrides)
        model = build_model(cfg, class_embeddings=torch.randn(c, 512)).to(dev)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
        images = [torch.randint(0, 255, (3, h, w), dtype=torch.uint8, device=dev) for _ in range(args.batch)]
        targets = [
            {
                "boxes": torch.tensor([[100.0, 120, 400, 500], [500, 200, 900, 700]], device=dev),
                "labels": torch.tensor([1, 2], device=dev),
            }
            for _ in range(args.batch)
        ]
        for amp in (False, True):
            scaler = torch.amp.GradScaler("cuda", enabled=amp)

            step = functools.partial(_train_step, model, opt, scaler, images, targets, amp)
            infer = functools.partial(_infer, model, images[:1], amp)

            step()  # cuDNN autotuning of the training and inference shapes happens here, outside the
            infer()  # peak-memory window (its trial workspaces are not the model's working set)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t_train = _time(step, args.warmup, args.repeats)
            t_infer = _time(infer, args.warmup, args.repeats)
            mem = torch.cuda.max_memory_allocated() / 1e9
            mode = "AMP fp16" if amp else "fp32"
            lines.append(row(args.backbone, c, mode, f"{t_train * 1e3:.1f}", f"{t_infer * 1e3:.1f}", f"{mem:.1f}"))
    emit_report(lines, args.output)


if __name__ == "__main__":
    main()
