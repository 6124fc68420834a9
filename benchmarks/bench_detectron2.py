"""CPU inference of a converted detectron2 R50-C4 (ovd.compat.detectron2 preset) against ovd's own R50-C4.

    python benchmarks/bench_detectron2.py --repeats 5 --threads 2 --output results/detectron2_c4.md

Both models get the same weights and vocabulary (the two architectures have the same parameters): the
informative random detectron2 model of the parity tests (tests/compat/data, converted by
ovd.compat.detectron2); plainly random weights make activations explode, and such numbers (denormals,
thousands of tied scores above the threshold) time the arithmetic's corner cases rather than the model.
The converted one uses the detectron2-compatible options (MSRA stride-in-1x1 ResNet, BGR input, no
padding, detectron2 anchors, NMS on logits, ROIAlignV2), ovd's own is configs/coco/base.yaml. Each repeat times one
800 x 1333 photo (scikit-image's chelsea, resized) through each model in turn (interleaved, so host load
hits both alike), after a warm-up; the table gives medians and the ratio converted / ovd.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
from functools import partial
from pathlib import Path

import skimage.data
import torch
import torch.nn.functional as F
from machine import emit_report, header, row, table_header  # benchmarks/ (scripts run from this folder's path)
from timing import timed_interleaved

from ovd.compat.detectron2 import PRESETS, convert_state_dict, preset_config
from ovd.config import load_config
from ovd.modeling.build import build_model

REPO = Path(__file__).resolve().parents[1]


def parity_checkpoint() -> dict:
    """The converted R50-C4 of tests/compat/test_detectron2_parity.py (informative random weights)."""
    spec = importlib.util.spec_from_file_location("parity", REPO / "tests/compat/test_detectron2_parity.py")
    parity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parity)
    state, _ = parity.detectron2_state("c4")
    return convert_state_dict(state, PRESETS["ovd_coco_r50_c4"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    ap.add_argument("--output", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ckpt = parity_checkpoint()
    emb = ckpt["vocabulary"]["embeddings"]
    models = {
        "ovd R50-C4 (configs/coco/base.yaml)": load_config(
            REPO / "configs/coco/base.yaml", ["model.backbone.weights="]
        ),
        "converted R50-C4 (preset ovd_coco_r50_c4)": preset_config(PRESETS["ovd_coco_r50_c4"]),
    }
    built = {name: build_model(cfg, class_embeddings=emb).eval() for name, cfg in models.items()}
    for model in built.values():
        model.load_state_dict(ckpt["model"])
    photo = torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1).float()[None]
    image = F.interpolate(photo, size=tuple(args.size), mode="bilinear").round().clamp(0, 255).byte()[0]
    with torch.no_grad():
        counts = {name: len(model([image])[0]) for name, model in built.items()}  # warm-up
        times, _ = timed_interleaved({name: partial(model, [image]) for name, model in built.items()}, 0, args.repeats)
    base = statistics.median(times[next(iter(times))])
    details = (
        f"Image {args.size[0]}x{args.size[1]}, 1000 proposals per image, the same weights in both; medians of "
        f"{args.repeats} interleaved calls after one warm-up."
    )
    lines = header("", details, threads=args.threads)
    lines += table_header(["model", "median (s)", "min (s)", "max (s)", "/ ovd R50-C4", "detections"], "lrrrrr")
    for name, t in times.items():
        med = statistics.median(t)
        lines.append(row(name, f"{med:.2f}", f"{min(t):.2f}", f"{max(t):.2f}", f"**{med / base:.3f}x**", counts[name]))
    emit_report(lines, args.output)


if __name__ == "__main__":
    main()
