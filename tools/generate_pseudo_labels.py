r"""Pseudo boxes for image-level labels (PIS, METHOD §4.2): one box per (image, label), as COCO JSON.

Sources:
  clip  the image's stored class-agnostic regions (tools/extract_region_embeddings.py) scored against
        the label's CLIP text embedding; the best region is kept above --threshold (default).
  file  class-specific boxes made elsewhere (MAVL per-image pickles or a COCO results JSON), kept
        above --threshold (the reference's 0.95).

The output keeps, per image, the labels that got a box (pos_category_ids) and one annotation (xywh
bbox, score) per such label; images left without a box are dropped. Load it as ann_type "pseudo".

Examples:
    python tools/generate_pseudo_labels.py --dataset coco_captions_train --source clip \
        --region-store datasets/regions/coco_captions_vitb32 --clip-model ViT-B-32 --clip-pretrained openai \
        --output datasets/coco/annotations/captions_train2017_tags_allcaps_pseudo.json
    python tools/generate_pseudo_labels.py --tags tags.json --image-root datasets/coco/train2017 \
        --source file --boxes datasets/MAVL_proposals/coco_props/class_specific --threshold 0.95 --output ...
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ovd.errors import OVDError
from ovd.pis.pseudo_labels import (
    DEFAULT_CLIP_SCORE,
    DEFAULT_CLIP_THRESHOLD,
    DEFAULT_FILE_THRESHOLD,
    DEFAULT_LOGIT_SCALE,
    SCORES,
)
from ovd.utils.cli import run_cli

logger = logging.getLogger("ovd.tools.generate_pseudo_labels")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", help="catalog image-label dataset (caption tags, ImageNet labels)")
    p.add_argument("--tags", help="or: an image-label JSON (pos_category_ids) outside the catalog ...")
    p.add_argument("--image-root", help="... and the folder its file names are relative to")
    p.add_argument("--source", choices=["clip", "file"], default="clip", help="where the boxes come from")
    p.add_argument("--region-store", help="clip: the region store of the dataset's images")
    p.add_argument("--clip-model", help="clip: open_clip architecture of the store's embeddings")
    p.add_argument("--clip-pretrained", help="clip: its tag or checkpoint file")
    p.add_argument("--score", choices=SCORES, default=DEFAULT_CLIP_SCORE, help="clip: region score")
    p.add_argument("--logit-scale", type=float, default=DEFAULT_LOGIT_SCALE, help="clip: softmax scale")
    p.add_argument("--boxes", help="file: folder of per-image pickles or a COCO results JSON")
    p.add_argument("--threshold", type=float, help="keep a box when its score exceeds this "
                   f"(default: clip {DEFAULT_CLIP_THRESHOLD}, file {DEFAULT_FILE_THRESHOLD})")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--output", required=True, help="the pseudo-label COCO JSON to write")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ovd.pis import ClipScoredProposals, FileBoxes, generate_pseudo_labels, image_label_info

    if bool(args.dataset) == bool(args.tags):
        raise OVDError("give either --dataset or --tags (with --image-root)", field="--dataset")
    if args.tags:
        if not args.image_root:
            raise OVDError("--tags needs --image-root", field="--image-root")
        info = image_label_info(args.tags, args.image_root)
    else:
        from ovd.data.catalog import get_dataset

        info = get_dataset(args.dataset)
    if args.source == "clip":
        if not (args.region_store and args.clip_model):
            raise OVDError("--source clip needs --region-store and --clip-model", field="--region-store")
        from ovd.clip import ClipSpec, get_or_build_text_embeddings

        out = Path(args.output)
        emb = get_or_build_text_embeddings(
            out.with_name(out.stem + "_text"), ClipSpec.resolve(args.clip_model, args.clip_pretrained), info.class_names
        ).embeddings  # (C, D)
        threshold = DEFAULT_CLIP_THRESHOLD if args.threshold is None else args.threshold
        source = ClipScoredProposals(args.region_store, emb, score=args.score, threshold=threshold,
                                     logit_scale=args.logit_scale)  # fmt: skip
    else:
        if not args.boxes:
            raise OVDError("--source file needs --boxes", field="--boxes")
        threshold = DEFAULT_FILE_THRESHOLD if args.threshold is None else args.threshold
        source = FileBoxes(args.boxes, info.category_ids, threshold=threshold)
    stats = generate_pseudo_labels(info, source, args.output, progress=not args.no_progress)
    for name, n in stats["per_class"].items():
        logger.info("  %-20s %d boxes", name, n)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
