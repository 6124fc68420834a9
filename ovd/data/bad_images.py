"""Training images that cannot be read: the ``skip`` policy of ``data.bad_images`` (see
:mod:`ovd.engine.bad_images` for the up-front check and the cap)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

from ovd.errors import OVDError
from ovd.structures import ImageRecord

logger = logging.getLogger(__name__)


def first_readable(
    records: Sequence[ImageRecord], idx: int, read: Callable[[ImageRecord], np.ndarray], *, skip: bool
) -> tuple[ImageRecord, np.ndarray, list[str]]:
    """``(record, image, skipped files)``: ``records[idx]`` read with ``read``; with ``skip``, an image
    that cannot be read (:class:`OVDError`) is replaced by the next readable one, cyclically.

    Raises:
        OVDError: the image cannot be read and ``skip`` is off, or no image can be read.
    """
    skipped: list[str] = []
    for step in range(len(records)):
        rec = records[(idx + step) % len(records)]
        try:
            return rec, read(rec), skipped
        except OVDError as e:
            if not skip:
                raise
            logger.warning("data.bad_images=skip: skipping %s (%s)", rec.file_name, e.reason)
            skipped.append(rec.file_name)
    raise OVDError("no training image can be read", path=records[idx].file_name)
