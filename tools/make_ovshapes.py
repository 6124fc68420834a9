"""Generate an OV-Shapes world (synthetic OV-COCO in miniature) and print what was written.

python tools/make_ovshapes.py --preset small --seed 0
python tools/make_ovshapes.py --preset default --root datasets --split heart,ring,key
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from ovd.data import ovshapes
from ovd.data.catalog import datasets_root
from ovd.errors import OVDError
from ovd.utils.io import read_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default", help=f"one of {', '.join(sorted(ovshapes.PRESETS))}")
    parser.add_argument("--seed", type=int, default=0, help="non-negative seed (same seed, same bytes)")
    parser.add_argument("--root", type=Path, default=None, help="datasets root (default: $OVD_DATASETS or ./datasets)")
    parser.add_argument(
        "--split",
        "--novel",
        dest="novel",
        default=None,
        help=f"comma-separated novel class names (default: {','.join(ovshapes.DEFAULT_NOVEL)})",
    )
    parser.add_argument("--workers", type=int, default=None, help="processes drawing images (default: up to 2)")
    parser.add_argument("--overwrite", action="store_true", help="replace a world made with other settings")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    novel = None if args.novel is None else [n.strip() for n in args.novel.split(",") if n.strip()]
    start = time.perf_counter()
    try:
        folder = ovshapes.generate_ovshapes(
            args.root or datasets_root(),
            args.preset,
            args.seed,
            novel,
            workers=args.workers,
            overwrite=args.overwrite,
        )
    except OVDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start

    ann = folder / "annotations"
    train, val, caps = (read_json(ann / f) for f in ("train.json", "val.json", "captions_train.json"))
    novel_names = [c["name"] for c in train["categories"] if c["split"] == "novel"]
    print(f"OV-Shapes {args.preset!r} seed {args.seed} in {folder} ({seconds:.1f} s)")
    print(f"  novel ({len(novel_names)}): {', '.join(novel_names)}")
    print(f"  {ann / 'train.json'}: {len(train['images'])} images, {len(train['annotations'])} base boxes")
    print(f"  {ann / 'val.json'}: {len(val['images'])} images, {len(val['annotations'])} boxes (all classes)")
    print(f"  {ann / 'captions_train.json'}: {len(caps['annotations'])} captions")
    print(f"  images: {folder / 'train'}/*.png, {folder / 'val'}/*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
