r"""Convert a detectron2 checkpoint of object-centric-ovd or Detic into an ovd checkpoint (ovd/compat/detectron2.py).

Example:
    python tools/convert_detectron2.py --input coco_ovd_rkd_pis_wt.pth --output models/coco_ovd_wt.pth
    python tools/demo.py --checkpoint models/coco_ovd_wt.pth --input photo.jpg --output out/ --vocabulary "cat, mug"

The preset is detected from the file's keys unless --preset is given (--list-presets shows them). The
output holds the weights, the detectron2-compatible config and the classifier's vocabulary (COCO's 80 or
LVIS's 1203 class names), and loads in Predictor, tools/demo.py, tools/export_onnx.py and as init_weights;
its config is also written beside it (OUTPUT with .yaml) for tools/train_net.py --eval-only:
    python tools/train_net.py --config-file models/coco_ovd_wt.yaml --eval-only --weights models/coco_ovd_wt.pth
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ovd.utils.cli import run_cli, setup_logging


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", help="detectron2 model_final.pth")
    p.add_argument("--output", help="the ovd checkpoint to write")
    p.add_argument("--preset", help="architecture preset (default: detected from the keys)")
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    p.add_argument("overrides", nargs="*", help="config overrides key=value stored in the checkpoint")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ovd.compat.detectron2 import PRESETS, convert
    from ovd.config import config_from_yaml, save_config
    from ovd.engine.checkpoint import save_checkpoint
    from ovd.errors import OVDError

    setup_logging()
    if args.list_presets:
        for p in PRESETS.values():
            print(f"{p.name:28s} {p.description}")
        return 0
    if not args.input or not args.output:
        raise OVDError("--input and --output are required", field="--input/--output")
    if Path(args.output).resolve() == Path(args.input).resolve():
        raise OVDError("--output would overwrite the input file", path=args.output)
    state = convert(args.input, args.preset, args.overrides)
    save_checkpoint(args.output, state)
    config_file = Path(args.output).with_suffix(".yaml")
    save_config(config_from_yaml(state["config"]), config_file)
    vocab = state["vocabulary"]
    print(f"{args.input} ({state['detectron2_preset']}, {len(state['model'])} tensors, "
          f"{len(vocab['class_names'])} classes) → {args.output} (config: {config_file})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
