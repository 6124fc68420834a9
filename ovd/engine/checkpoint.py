"""The trainer's checkpoints: atomic saves, a ``last_checkpoint`` pointer, and resumption after a crash.

The file format itself (safe ``torch.load(weights_only=True)`` reading, writing, upgrading earlier
layouts, loading weights with clear mismatch errors) is :mod:`ovd.runtime.checkpoint`; its names are
re-exported here for the tools and tests that import them from this module.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from ovd.errors import OVDError
from ovd.runtime.checkpoint import (
    UPGRADE_COMMAND,
    is_intact,
    load_checkpoint,
    load_model_state,
    plain_state_errors,
    to_plain,
    upgrade_checkpoint,
    write_checkpoint,
)
from ovd.utils.io import DiskFullError, atomic_open

__all__ = [
    "LAST_CHECKPOINT",
    "UPGRADE_COMMAND",
    "is_intact",
    "last_checkpoint",
    "load_checkpoint",
    "load_model_state",
    "plain_state_errors",
    "remove_partial_checkpoints",
    "save_checkpoint",
    "to_plain",
    "upgrade_checkpoint",
]

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last_checkpoint"  # text file in the output dir naming the newest checkpoint
_CHECKPOINT_NAME = re.compile(r"model_(\d+|final)\.pth")


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write ``state`` atomically (:func:`ovd.runtime.checkpoint.write_checkpoint`), then point
    ``last_checkpoint`` at it.

    Raises:
        OVDError: ``state`` holds a non-plain object (it could not be loaded back safely), or the disk
            is full (the previous checkpoint and pointer are left as they were).
    """
    path = Path(path)
    try:
        write_checkpoint(path, state)
        with atomic_open(path.parent / LAST_CHECKPOINT) as f:
            f.write(path.name)
    except DiskFullError as e:
        previous = last_checkpoint(path.parent)
        raise OVDError(
            f"disk full while writing the checkpoint; nothing was replaced (last complete checkpoint: "
            f"{previous.name if previous else 'none'}); free space and rerun with --resume",
            path=path,
        ) from e


def remove_partial_checkpoints(output_dir: str | os.PathLike[str]) -> int:
    """Delete the temporary files of checkpoint writes that a killed run left (``.model_*.tmp``; never
    read); call it only while holding the folder's lock. Returns how many were removed."""
    partial = list(Path(output_dir).glob(".model_*.pth.*.tmp"))
    for p in partial:
        p.unlink(missing_ok=True)
    return len(partial)


def _iteration(path: Path) -> float:
    m = _CHECKPOINT_NAME.fullmatch(path.name)
    return float("inf") if m and m.group(1) == "final" else float(m.group(1)) if m else -1.0


def last_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint of a run, or ``None``.

    A ``last_checkpoint`` pointer naming a missing or truncated file falls back, with a warning, to the
    newest intact ``model_*.pth`` of the folder.
    """
    out = Path(output_dir)
    pointer = out / LAST_CHECKPOINT
    if not pointer.is_file():
        return None
    path = out / pointer.read_text().strip()
    if path.is_file() and is_intact(path):
        return path
    intact = sorted((p for p in out.glob("model_*.pth") if _iteration(p) >= 0 and is_intact(p)), key=_iteration)
    fallback = intact[-1] if intact else None
    logger.warning(
        "%s names %s, which is missing or truncated; resuming from %s",
        pointer,
        path.name,
        fallback.name if fallback else "scratch (no intact checkpoint)",
    )
    return fallback
