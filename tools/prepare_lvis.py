r"""Derived OV-LVIS files (METHOD §6.2, §4.1): the norare split, category info, ImageNet-LVIS labels.

Examples (paths default to $OVD_DATASETS, i.e. ./datasets):
    python tools/prepare_lvis.py norare            # lvis/lvis_v1_train.json -> lvis_v1_train_norare{,_cat_info}.json
    python tools/prepare_lvis.py cat-info --ann datasets/coco/zero-shot/instances_train2017_seen_2_oriorder.json
    python tools/prepare_lvis.py imagenet --wnids imagenet_lvis_wnid_map.txt   # "wnid lvis_id|name|synset" lines
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ovd.data import lvis
from ovd.data.catalog import datasets_root
from ovd.utils.cli import run_cli, setup_logging
from ovd.utils.io import read_json, write_json

log = logging.getLogger("ovd.tools.prepare_lvis")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    root = datasets_root()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    n = sub.add_parser("norare", help="remove rare-class annotations and count the remaining categories")
    n.add_argument("--train", type=Path, default=root / lvis.LVIS_TRAIN, help="lvis_v1_train.json")
    n.add_argument("--output", type=Path, default=root / lvis.LVIS_TRAIN_NORARE, help="norare file to write")
    n.add_argument("--cat-info", type=Path, default=root / lvis.LVIS_CAT_INFO, help="category info to write")
    c = sub.add_parser("cat-info", help="image and instance counts per category of any COCO/LVIS file")
    c.add_argument("--ann", type=Path, required=True, help="the annotation JSON to count")
    c.add_argument("--output", type=Path, help="default: <ann without .json>_cat_info.json")
    i = sub.add_parser("imagenet", help="ImageNet-LVIS image labels from a folder of wnid/*.JPEG")
    i.add_argument("--image-root", type=Path, default=root / lvis.IMAGENET_LVIS_ROOT, help="folder of wnid folders")
    i.add_argument("--wnids", required=True, help="wnid -> LVIS category: JSON object or 'wnid id|name|synset' lines")
    i.add_argument(
        "--categories", type=Path, default=root / lvis.LVIS_VAL, help="LVIS JSON or category-info file (categories)"
    )
    i.add_argument("--output", type=Path, default=root / lvis.IMAGENET_LVIS_INFO, help="image-label file to write")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    if args.command == "norare":
        data = read_json(args.train)
        norare = lvis.make_norare(data, path=str(args.train))
        write_json(args.output, norare, indent=None)
        write_json(args.cat_info, lvis.category_info(norare, path=str(args.output)))
        log.info("%d images, %d annotations -> %s", len(norare["images"]), len(norare["annotations"]), args.output)
        log.info("category info -> %s", args.cat_info)
    elif args.command == "cat-info":
        output = args.output or args.ann.with_name(args.ann.stem + "_cat_info.json")
        write_json(output, lvis.category_info(read_json(args.ann), path=str(args.ann)))
        log.info("category info -> %s", output)
    else:
        cats = lvis.read_categories(args.categories)
        info = lvis.imagenet_lvis_json(args.image_root, args.wnids, cats)
        write_json(args.output, info, indent=None)
        log.info("%d images -> %s", len(info["images"]), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
