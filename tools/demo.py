r"""Detect objects of any vocabulary in an image, a folder of images, a video or a webcam.

Writes annotated images (same names) or ``<stem>_annotated.mp4`` (a camera: ``webcam<N>_annotated.mp4``,
recorded until --max-frames or Ctrl-C), and ``OUTPUT/detections.json``.

Example:
    python tools/demo.py --checkpoint output/ovshapes/base/model_final.pth --input photo.png \
        --output out/ --vocabulary "star, moon, tree"
    python tools/demo.py --checkpoint C --input webcam:0 --output out/ --max-frames 300
    python tools/demo.py --onnx model.onnx --input photo.png --output out/   # tools/export_onnx.py
"""

from __future__ import annotations

import argparse
import sys

from ovd.demo import input_kind, parse_vocabulary, run_demo
from ovd.errors import OVDError
from ovd.predictor import Predictor
from ovd.utils.cli import run_cli, setup_logging


def confidence(value: str) -> float:
    try:
        threshold = float(value)
    except ValueError:
        threshold = float("nan")
    if not 0.0 <= threshold <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value!r}")
    return threshold


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="model_final.pth written by tools/train_net.py")
    model.add_argument("--onnx", help="a model exported by tools/export_onnx.py (run with onnxruntime; its vocabulary)")
    p.add_argument(
        "--input",
        required=True,
        help="an image, a folder of images, a video (.mp4/.avi/.mov/.mkv), or webcam[:N] (OpenCV camera N, default 0)",
    )
    p.add_argument("--output", required=True, help="folder for the annotated files and detections.json")
    p.add_argument(
        "--vocabulary",
        help="a registered dataset name (e.g. ovshapes_val), or comma-separated class names ('star, moon'); "
        "any other text is one class name. Default: the checkpoint's vocabulary",
    )
    p.add_argument(
        "--confidence", type=confidence, default=0.3, help="minimum score of a shown detection, 0-1 (default: 0.3)"
    )
    p.add_argument(
        "--max-frames", type=int, help="stop a video or camera after this many frames (a camera: else Ctrl-C)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (auto: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    input_kind(args.input)  # fail on a missing input before loading the model
    vocabulary = parse_vocabulary(args.vocabulary) if args.vocabulary is not None else None
    if args.onnx is not None:
        if vocabulary is not None:
            raise OVDError("an exported model detects the vocabulary it was exported with", field="--vocabulary")
        from ovd.export import OnnxDetector

        predictor = OnnxDetector(args.onnx, confidence=args.confidence)
    else:
        predictor = Predictor(args.checkpoint, confidence=args.confidence, device=args.device)
        if vocabulary is not None:
            predictor.set_vocabulary(vocabulary)
    summary = run_demo(predictor, args.input, args.output, progress=not args.no_progress, max_frames=args.max_frames)
    outputs = summary["outputs"]
    annotated = outputs[0] if len(outputs) == 1 else f"{args.output} ({len(outputs)} annotated images)"
    print(
        f"{summary['num_detections']} detections on {summary['num_images']} "
        f"{'frames' if summary['kind'] in ('video', 'camera') else 'images'} → {annotated}, {summary['detections']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
