"""Training images that are missing or cannot be decoded: checked before iteration 0, and a policy
(``data.bad_images``: ``error`` or ``skip``, capped by ``data.max_bad_images``) for the rest."""

from __future__ import annotations

import logging
import os

from ovd.config import BAD_IMAGE_POLICIES, Config
from ovd.errors import OVDError
from ovd.structures import ImageRecord

logger = logging.getLogger(__name__)


def existing_images(cfg: Config, dataset: str, records: list[ImageRecord], where: str) -> list[ImageRecord]:
    """``records`` whose image files exist: all of them, or (``data.bad_images=skip``) the others dropped.

    Raises:
        OVDError: files are missing (policy ``error``, or more than ``data.max_bad_images``), counting
            them and naming the first few.
    """
    if cfg.data.bad_images not in BAD_IMAGE_POLICIES:
        raise OVDError(
            f"unknown {cfg.data.bad_images!r} (valid: {', '.join(BAD_IMAGE_POLICIES)})", field="data.bad_images"
        )
    missing = [r for r in records if not os.path.isfile(r.file_name)]
    if not missing:
        return records
    names = ", ".join(r.file_name for r in missing[:3])
    if cfg.data.bad_images == "error" or len(missing) > cfg.data.max_bad_images:
        raise OVDError(
            f"{len(missing)} of {len(records)} images of training dataset {dataset!r} are missing (e.g. {names}); "
            f"fix the image folder, or set data.bad_images=skip (at most data.max_bad_images="
            f"{cfg.data.max_bad_images}) to train without them",
            field=f"{where}.dataset",
        )
    logger.warning(
        "data.bad_images=skip: %d images of %s are missing and dropped (e.g. %s)", len(missing), dataset, names
    )
    return [r for r in records if os.path.isfile(r.file_name)]


def count_skipped(batch: list[dict], so_far: int, cap: int) -> int:
    """Unreadable images replaced in ``batch``; more than ``cap`` in the run is an error naming one."""
    skipped = [f for b in batch for f in b.get("skipped_images", ())]
    if so_far + len(skipped) > cap:
        raise OVDError(
            f"more than data.max_bad_images={cap} unreadable training images (the last: {skipped[-1]})",
            field="data.max_bad_images",
        )
    return len(skipped)
