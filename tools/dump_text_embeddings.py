r"""Write CLIP text embeddings of a vocabulary to ``OUTPUT.npy`` plus a ``OUTPUT.json`` sidecar.

Example (the reference COCO classifier, METHOD §2.1):
    python tools/dump_text_embeddings.py --model ViT-B-32 --pretrained openai \
        --vocabulary coco_ovd_val --output datasets/zeroshot_weights/coco_vitb32_photo
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ovd.clip import DEFAULT_TEMPLATES, ENSEMBLE_TEMPLATES, ClipSpec, get_or_build_text_embeddings
from ovd.data.catalog import get_dataset
from ovd.errors import OVDError

TEMPLATE_SETS = {"default": DEFAULT_TEMPLATES, "ensemble": ENSEMBLE_TEMPLATES}


def read_vocabulary(value: str) -> tuple[str, ...]:
    """A text file (one name per line), a comma-separated list, or a catalog dataset name."""
    path = Path(value)
    if path.is_file():
        return tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if "," in value:
        return tuple(name.strip() for name in value.split(",") if name.strip())
    if path.suffix == ".txt":
        raise OVDError("vocabulary file not found", path=path)
    return tuple(get_dataset(value, prepare=False).class_names)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="open_clip architecture, e.g. ViT-B-32 or ovd-tiny")
    p.add_argument("--pretrained", help="open_clip tag (e.g. openai) or checkpoint file; omit: random init")
    p.add_argument(
        "--vocabulary",
        required=True,
        help="catalog dataset name, text file with one class name per line, or comma-separated list "
        "(one name needs a trailing comma: 'cat,')",
    )
    p.add_argument(
        "--templates",
        choices=sorted(TEMPLATE_SETS),
        default="default",
        help="'default': 'a photo of a {}' (reference); 'ensemble': CLIP's 7 ImageNet prompts",
    )
    p.add_argument("--output", required=True, help="writes PATH.npy + PATH.json (kept if already up to date)")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="dtype on disk")
    p.add_argument("--device", default="cpu", help="torch device for the text encoder, e.g. cuda")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ovd").setLevel(logging.INFO)  # open_clip logs its INFO chatter on the root logger
    try:
        names = read_vocabulary(args.vocabulary)
        result = get_or_build_text_embeddings(
            args.output,
            ClipSpec(args.model, args.pretrained),
            names,
            TEMPLATE_SETS[args.templates],
            dtype=args.dtype,
            device=args.device,
        )
    except OVDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.getLogger("ovd.tools.dump_text_embeddings").info("%d×%d → %s", result.num_classes, result.dim, result.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
