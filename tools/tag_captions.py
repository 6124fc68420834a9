r"""Tag captions with class names: COCO-captions JSON → image-label JSON (PIS, METHOD §4.1).

Each image's captions are joined; a class is a tag when its name or a synonym occurs as whole words
(regular plurals too, see ovd/data/captions.py). Images with no tag are dropped.

Examples:
    python tools/tag_captions.py --captions datasets/coco/annotations/captions_train2017.json \
        --categories datasets/coco/annotations/instances_val2017.json \
        --synonyms coco --output datasets/coco/annotations/captions_train2017_tags_allcaps.json
    python tools/tag_captions.py --dataset coco_captions_train   # the same, paths from the catalog
    python tools/tag_captions.py --dataset ovshapes_captions      # (re)writes the catalog entry's file
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ovd.data.captions import SYNONYM_TABLES, category_synonyms, synonym_table, tag_captions, tag_counts
from ovd.errors import OVDError
from ovd.utils.cli import run_cli
from ovd.utils.io import read_json, write_json

logger = logging.getLogger("ovd.tools.tag_captions")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", help="a catalog image-label dataset whose tags file is (re)written from its captions")
    p.add_argument("--captions", help="COCO-captions JSON (images + annotations with 'caption')")
    p.add_argument("--categories", help="JSON with a 'categories' list (e.g. instances_val2017.json)")
    p.add_argument("--synonyms", help=f"a packaged table ({', '.join(SYNONYM_TABLES)}) or a JSON {{category_id: "
                   "[names]}; default: the dataset's table, else the categories' names and synonyms")  # fmt: skip
    p.add_argument("--no-plurals", action="store_true", help="match names only in their given form")
    p.add_argument(
        "--no-longest-match",
        action="store_true",
        help="also match a name inside a found longer one ('dog' in 'hot dog'), as the reference does",
    )
    p.add_argument("--output", help="where to write the image-label JSON (default with --dataset: its file)")
    return p.parse_args(argv)


def _categories(path: str) -> list[dict]:
    data = read_json(path)
    cats = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(cats, list):
        raise OVDError("no 'categories' list", path=path, field="categories")
    return cats


def _synonyms(arg: str | None, default: str | None) -> dict[int, list[str]] | None:
    name = arg or default
    if name is None:
        return None
    if name in SYNONYM_TABLES or not Path(name).suffix:
        return synonym_table(name)
    raw = read_json(name)
    if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
        raise OVDError("expected {category_id: [names]}", path=name)
    try:
        return {int(k): list(v) for k, v in raw.items()}
    except ValueError as e:
        raise OVDError(f"keys must be category ids ({e})", path=name) from e


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    table = None
    if args.dataset and not args.categories:  # the catalog entry's vocabulary: the file records its provenance
        from ovd.data.catalog import get_dataset
        from ovd.prepare import make_caption_tags, makes_caption_tags

        info = get_dataset(args.dataset)  # generates a built-in world when missing
        if not makes_caption_tags(info):
            raise OVDError(f"dataset {args.dataset!r} names no captions file", field="--dataset")
        given = args.synonyms if args.synonyms in SYNONYM_TABLES else _synonyms(args.synonyms, None)
        data = make_caption_tags(
            info, args.output, synonyms=given, plurals=not args.no_plurals, longest_match=not args.no_longest_match
        )
        logger.info("%d tagged images -> %s", len(data["images"]), args.output or info.ann_file_path)
        return 0
    if args.dataset:
        from ovd.data.catalog import get_dataset

        info = get_dataset(args.dataset)
        if "captions" not in info.extra:
            raise OVDError(f"dataset {args.dataset!r} names no captions file", field="--dataset")
        captions_path = str(info.resolve(info.extra["captions"]))
        categories = _categories(args.categories)
        output = args.output or str(info.ann_file_path)
        table = info.extra.get("synonyms")
    else:
        if not (args.captions and args.categories and args.output):
            raise OVDError("give --dataset, or --captions, --categories and --output", field="arguments")
        captions_path, output = args.captions, args.output
        categories = _categories(args.categories)
    synonyms = _synonyms(args.synonyms, table)
    if synonyms is None:
        synonyms = category_synonyms(categories, path=args.categories)
    data = tag_captions(read_json(captions_path), categories, synonyms=synonyms, plurals=not args.no_plurals,
                        longest_match=not args.no_longest_match, path=captions_path)  # fmt: skip
    write_json(output, data)
    names = {int(c["id"]): c["name"] for c in categories}
    logger.info("%d tagged images -> %s", len(data["images"]), output)
    for cid, n in sorted(tag_counts(data).items(), key=lambda kv: -kv[1]):
        logger.info("  %-20s %d images", names[cid], n)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
