r"""Serve a web page to try any vocabulary on your own images (Gradio; ``pip install -e ".[web]"``).

Binds 127.0.0.1 (this machine only) unless --host says otherwise, creates no public share link, sends
no analytics and fetches nothing from the internet.

Example:
    python tools/web_demo.py          # the main job's checkpoints: output/ovshapes/*/model_final.pth
    python tools/web_demo.py --checkpoint output/ovshapes/base/model_final.pth \
        --checkpoint output/ovshapes/rkd_pis_wt/model_final.pth --onnx ovshapes.onnx --port 7860
"""

from __future__ import annotations

import argparse
import sys

from ovd.app.models import DEFAULT_CHECKPOINT_GLOB, ModelZoo, discover_checkpoints, model_sources
from ovd.app.page import DEFAULT_HOST, DEFAULT_PORT, launch
from ovd.data.catalog import get_dataset
from ovd.errors import OVDError
from ovd.utils.cli import run_cli, setup_logging

# Example images shown under the upload: the first few of this dataset, when it has been generated.
EXAMPLES_DATASET = "ovshapes_val"
NUM_EXAMPLES = 4


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        help=f"a model_final.pth (repeatable). Default, with no --onnx either: {DEFAULT_CHECKPOINT_GLOB}",
    )
    p.add_argument("--onnx", action="append", default=[], help="a model exported by tools/export_onnx.py (repeatable)")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default: {DEFAULT_HOST}, this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto for the checkpoints (default: cpu)")
    p.add_argument("--clip-pretrained", help="CLIP text-encoder weights for new names (default: each checkpoint's)")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p.parse_args(argv)


def example_images() -> list[str]:
    folder = get_dataset(EXAMPLES_DATASET, prepare=False).image_root_path
    return [str(p) for p in sorted(folder.glob("*.png"))[:NUM_EXAMPLES]] if folder.is_dir() else []


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    checkpoints = args.checkpoint
    if not checkpoints and not args.onnx:
        checkpoints = discover_checkpoints()
        if not checkpoints:
            raise OVDError(
                f"no checkpoint matches {DEFAULT_CHECKPOINT_GLOB}: run the README's first command, or pass "
                "--checkpoint / --onnx",
                field="--checkpoint",
            )
    zoo = ModelZoo(model_sources(checkpoints, args.onnx), device=args.device, clip_pretrained=args.clip_pretrained)
    print(f"serving {', '.join(zoo.names)} on http://{args.host}:{args.port} (Ctrl-C stops)")
    launch(zoo, host=args.host, port=args.port, examples=example_images())
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
