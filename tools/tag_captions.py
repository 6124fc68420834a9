r"""Tag captions with class names: COCO-captions JSON → image-label JSON (PIS, METHOD §4.1).

Each image's captions are joined; a class is a tag when its name or a synonym occurs as whole words
(regular plurals too). Images with no tag are dropped.

Examples:
    python tools/tag_captions.py --captions datasets/coco/annotations/captions_train2017.json \
        --categories datasets/coco/annotations/instances_val2017.json \
        --synonyms coco --output datasets/coco/annotations/captions_train2017_tags_allcaps.json
    python tools/tag_captions.py --dataset ovshapes_captions   # writes the catalog entry's file
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter

from ovd.data.captions import category_synonyms, tag_captions
from ovd.errors import OVDError
from ovd.utils.cli import run_cli
from ovd.utils.io import read_json, write_json

logger = logging.getLogger("ovd.tools.tag_captions")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", help="a catalog image-label dataset whose tags file is (re)written from its captions")
    p.add_argument("--captions", help="COCO-captions JSON (images + annotations with 'caption')")
    p.add_argument("--categories", help="JSON with a 'categories' list (e.g. instances_val2017.json)")
    p.add_argument("--synonyms", help="'coco' (the packaged COCO synonyms table) or a JSON {category_id: [names]}")
    p.add_argument("--no-plurals", action="store_true", help="match names only in their given form")
    p.add_argument("--output", help="where to write the image-label JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.dataset:
        from ovd.data.catalog import get_dataset

        info = get_dataset(args.dataset)  # generates a built-in world when missing
        if "captions" not in info.extra:
            raise OVDError(f"dataset {args.dataset!r} names no captions file", field="--dataset")
        captions_path = str(info.resolve(info.extra["captions"]))
        categories = [{"id": c, "name": n} for c, n in zip(info.category_ids, info.class_names, strict=True)]
        train = info.resolve(info.extra["captions"]).parent / "train.json"
        if train.is_file():
            categories = read_json(train)["categories"]
        output = args.output or str(info.ann_file_path)
    else:
        if not (args.captions and args.categories and args.output):
            raise OVDError("give --dataset, or --captions, --categories and --output", field="arguments")
        captions_path, output = args.captions, args.output
        cat_file = read_json(args.categories)
        categories = cat_file.get("categories") if isinstance(cat_file, dict) else None
        if not isinstance(categories, list):
            raise OVDError("no 'categories' list", path=args.categories, field="categories")
    synonyms = None
    if args.synonyms == "coco":
        from ovd.data.builtin import coco_synonyms

        synonyms = coco_synonyms()
    elif args.synonyms:
        raw = read_json(args.synonyms)
        if not isinstance(raw, dict):
            raise OVDError("expected {category_id: [names]}", path=args.synonyms)
        synonyms = {int(k): list(v) for k, v in raw.items()}
    if synonyms is not None:
        known = {int(c["id"]) for c in categories}
        missing = sorted(known - set(synonyms))
        if missing:
            raise OVDError(f"no synonyms for category ids {missing[:5]}", path=args.synonyms, field="synonyms")
    else:
        synonyms = category_synonyms(categories, path=args.categories)
    data = tag_captions(read_json(captions_path), categories, synonyms=synonyms, plurals=not args.no_plurals,
                        path=captions_path)  # fmt: skip
    write_json(output, data)
    counts = Counter(c for img in data["images"] for c in img["pos_category_ids"])
    names = {int(c["id"]): c["name"] for c in categories}
    logger.info("%d tagged images -> %s", len(data["images"]), output)
    for cid, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        logger.info("  %-20s %d images", names.get(cid, cid), n)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
