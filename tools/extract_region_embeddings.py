r"""Extract CLIP embeddings of the top-K class-agnostic proposals of every image (RKD, METHOD §3.1-§3.2).

Resumable (re-run the same command after a crash) and shardable (run --shard-index 0..N-1 of
--num-shards N anywhere, same --output, then --merge; the last shard to finish merges by itself).

Example:
    python tools/extract_region_embeddings.py --dataset coco_ovd_train --proposals mavl_props.json \
        --clip-model ViT-B-32 --clip-pretrained openai --output output/rkd/coco_train
"""

from __future__ import annotations

import argparse
import logging
import sys

from ovd.config import CROP_DTYPES, RESIZE_BACKENDS, ExtractionCfg
from ovd.utils.cli import run_cli, setup_logging

DEFAULTS = ExtractionCfg()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="store directory (.npy arrays + meta.json)")
    p.add_argument("--merge", action="store_true", help="only join the finished shards' parts in --output")
    p.add_argument(
        "--dataset", action="append", help="registered dataset name, e.g. coco_ovd_train; repeated: the union of "
        "their images (e.g. coco_ovd_train and coco_captions_train, as the OV-COCO pipeline extracts)",
    )  # fmt: skip
    p.add_argument("--proposals", help="a trained ovd checkpoint (.pth) or a COCO results JSON of class-agnostic boxes")
    p.add_argument("--clip-model", help="open_clip architecture, e.g. ViT-B-32")
    p.add_argument("--clip-pretrained", help="open_clip tag (openai) or checkpoint path; omitted: random init (tests)")
    d = DEFAULTS
    p.add_argument("--k", type=int, default=d.k, help=f"regions kept per image after NMS (default: {d.k}, METHOD §3.1)")
    p.add_argument("--nms", type=float, default=d.nms_thresh, help=f"class-agnostic NMS IoU (default: {d.nms_thresh})")
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size, help=f"crops per CLIP forward (default: {d.batch_size})"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=d.num_workers,
        help=f"processes decoding and cropping images (default: {d.num_workers})",
    )
    p.add_argument(
        "--chunk-size", type=int, default=d.chunk_size, help=f"images per resumable part file (default: {d.chunk_size})"
    )
    p.add_argument("--num-shards", type=int, default=1, help="split the dataset into this many shards (default: 1)")
    p.add_argument("--shard-index", type=int, default=0, help="which shard this process extracts, 0-based")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda, for CLIP and a detector (default: auto)")
    p.add_argument("--min-size", type=int, help="detector proposals: test short side (default: its config's)")
    p.add_argument("--max-size", type=int, help="detector proposals: test long-side cap (default: its config's)")
    p.add_argument(
        "--resize-backend",
        default=d.resize_backend,
        choices=["auto", *RESIZE_BACKENDS],
        help="where crops are made: PIL in the workers, torch per crop or batched matrix products on the CLIP device "
        "(auto: batched on a GPU, pil on a CPU)",
    )
    p.add_argument(
        "--crop-dtype",
        default=d.crop_dtype,
        choices=["auto", *CROP_DTYPES],
        help="dtype of the batched backend's matrix products (auto: float16 on a GPU, within one intensity level "
        "of float32; float32 on a CPU)",
    )
    p.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    if not args.merge and not (args.dataset and args.proposals and args.clip_model):
        p.error("--dataset, --proposals and --clip-model are required unless --merge is given")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    from ovd.distill import build_proposal_source, extract_region_embeddings, merge_store, store_is_complete

    if args.merge:
        print(f"region store: {merge_store(args.output)}")
        return 0
    from ovd.clip import create_clip
    from ovd.prepare import union_records
    from ovd.runtime.device import local_device

    records, name = union_records(args.dataset)
    device = local_device(args.device)
    source = build_proposal_source(args.proposals, min_size=args.min_size, max_size=args.max_size, device=device)
    if not args.clip_pretrained:
        logging.getLogger(__name__).warning("no --clip-pretrained: the CLIP teacher is randomly initialised")
    clip = create_clip(args.clip_model, args.clip_pretrained, device=device)
    options = ExtractionCfg(
        k=args.k, nms_thresh=args.nms, batch_size=args.batch_size, num_workers=args.workers,
        chunk_size=args.chunk_size, resize_backend=args.resize_backend, crop_dtype=args.crop_dtype,
    )  # fmt: skip
    out = extract_region_embeddings(
        records, source, clip, args.output, options, num_shards=args.num_shards, shard_index=args.shard_index,
        dataset_name=name, progress=not args.no_progress,
    )  # fmt: skip
    done = "complete" if store_is_complete(out) else "waiting for the other shards (then --merge)"
    print(f"region store: {out} ({done})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
