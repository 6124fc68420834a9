r"""Pseudo boxes for image-level labels (PIS, METHOD §4.2): one box per (image, label), as COCO JSON.

Sources:
  clip  the image's stored class-agnostic regions (tools/extract_region_embeddings.py) scored against
        the label's CLIP text embedding; the best region is kept above --threshold (default).
  file  class-specific boxes made elsewhere (MAVL per-image pickles or a COCO results JSON), kept
        above --threshold (the reference's 0.95).

Examples:
    python tools/generate_pseudo_labels.py --dataset coco_captions_train --source clip \
        --region-store datasets/regions/coco_ovd_train_vitb32 --clip-model ViT-B-32 --clip-pretrained openai \
        --output datasets/coco/annotations/captions_train2017_tags_allcaps_pseudo.json
    python tools/generate_pseudo_labels.py --dataset coco_captions_train --source file \
        --boxes datasets/MAVL_proposals/coco_props/class_specific --threshold 0.95 --output ...
"""

from __future__ import annotations

import argparse
import logging
import sys

from ovd.errors import OVDError
from ovd.utils.cli import run_cli

logger = logging.getLogger("ovd.tools.generate_pseudo_labels")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="catalog image-label dataset (caption tags, ImageNet labels)")
    p.add_argument("--source", choices=["clip", "file"], default="clip")
    p.add_argument("--region-store", help="clip: the region store of the dataset's images")
    p.add_argument("--clip-model", help="clip: open_clip architecture of the store's embeddings")
    p.add_argument("--clip-pretrained", help="clip: its tag or checkpoint file")
    p.add_argument("--score", choices=["softmax", "cosine"], default="softmax", help="clip: region score")
    p.add_argument("--logit-scale", type=float, default=100.0, help="clip: softmax scale (CLIP's is 100)")
    p.add_argument("--boxes", help="file: folder of per-image pickles or a COCO results JSON")
    p.add_argument("--threshold", type=float, help="keep a box when its score exceeds this (clip 0.3, file 0.95)")
    p.add_argument("--output", required=True, help="the pseudo-label COCO JSON to write")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ovd.data.catalog import get_dataset
    from ovd.pis import ClipScoredProposals, FileBoxes, generate_pseudo_labels

    info = get_dataset(args.dataset)
    if args.source == "clip":
        if not (args.region_store and args.clip_model):
            raise OVDError("--source clip needs --region-store and --clip-model", field="--region-store")
        from pathlib import Path

        from ovd.clip import ClipSpec, get_or_build_text_embeddings

        emb = get_or_build_text_embeddings(
            Path(args.output).with_name(Path(args.output).stem + "_text"),
            ClipSpec.resolve(args.clip_model, args.clip_pretrained),
            list(info.class_names),
        ).embeddings
        threshold = 0.3 if args.threshold is None else args.threshold
        source = ClipScoredProposals(args.region_store, emb, score=args.score, threshold=threshold,
                                     logit_scale=args.logit_scale)  # fmt: skip
    else:
        if not args.boxes:
            raise OVDError("--source file needs --boxes", field="--boxes")
        source = FileBoxes(args.boxes, info.category_ids, threshold=0.95 if args.threshold is None else args.threshold)
    stats = generate_pseudo_labels(info, source, args.output)
    logger.info("%d of %d labels got a box, in %d images -> %s", stats["boxes"], stats["labels"], stats["images"],
                args.output)  # fmt: skip
    for name, n in stats["per_class"].items():
        logger.info("  %-20s %d", name, n)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
