r"""Export a trained checkpoint and a vocabulary to one ONNX file (any image size; see ovd/export.py).

Example:
    python tools/export_onnx.py --checkpoint output/ovshapes/rkd_pis_wt/model_final.pth \
        --vocabulary "star, moon, tree" --output ovshapes.onnx

Then, without the checkpoint or CLIP: ``ovd.export.OnnxDetector("ovshapes.onnx")("photo.png")``, or any
ONNX runtime on a ``uint8[3, H, W]`` RGB image resized to the stored test scale. Unless --no-check, the
exported file is run with onnxruntime on a random image and compared with the checkpoint's detections.
"""

from __future__ import annotations

import argparse
import sys

from ovd.utils.cli import run_cli, setup_logging


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model_final.pth written by tools/train_net.py")
    p.add_argument("--output", required=True, help="the .onnx file to write")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    p.add_argument(
        "--vocabulary",
        help="a registered dataset name, or comma-separated class names ('star, moon'); default: the checkpoint's",
    )
    p.add_argument(
        "--confidence", type=float, help="score threshold baked into the graph (default: the config's test threshold)"
    )
    p.add_argument("--example-size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"),
                   help="size of the random image the graph is traced with (default: 480 640)")  # fmt: skip
    p.add_argument("--size-range", type=int, nargs=2, default=(32, 4096), metavar=("MIN", "MAX"),
                   help="smallest and largest image side the graph accepts (default: 32 4096)")  # fmt: skip
    p.add_argument("--no-check", action="store_true", help="do not compare onnxruntime with PyTorch after exporting")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ovd.demo import parse_vocabulary
    from ovd.export import check_export, export_onnx
    from ovd.predictor import Predictor

    setup_logging(args.verbose)
    predictor = Predictor(args.checkpoint, confidence=args.confidence, device="cpu")
    if args.vocabulary is not None:
        predictor.set_vocabulary(parse_vocabulary(args.vocabulary))
    cfg = predictor.cfg.input
    path = export_onnx(
        predictor.model, args.output, class_names=predictor.class_names, min_size_test=cfg.min_size_test,
        max_size_test=cfg.max_size_test, example_size=tuple(args.example_size), size_range=tuple(args.size_range),
    )  # fmt: skip
    print(f"exported {len(predictor.class_names)} classes → {path}")
    if not args.no_check:
        report = check_export(predictor, path)
        print(
            f"onnxruntime vs PyTorch on a random {report['size'][0]}x{report['size'][1]} image: "
            f"{report['matched']} of {report['torch']} detections identical (onnxruntime: {report['onnx']})"
        )
        if report["matched"] != report["torch"] or report["onnx"] != report["torch"]:
            print("warning: the exported model's detections differ from PyTorch's", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
