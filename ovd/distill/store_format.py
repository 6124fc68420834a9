"""The region store's format (:mod:`ovd.distill.store`): file names, metadata keys, how metadata is compared,
array checks and the writer that puts the final arrays in place (``meta.json`` last).

Shape shorthand: ``N`` images, ``K`` regions per image (slots), ``D`` CLIP embedding dim.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ovd.errors import OVDError
from ovd.utils.io import write_json

STORE_FORMAT = "ovd-region-store"
STORE_VERSION = 1
META_FILE = "meta.json"
PARTS_DIR = "parts"
LOCK_FILE = "merge.lock"
ARRAY_FILES = {
    "boxes": "boxes.npy",
    "embeddings": "embeddings.npy",
    "valid": "valid.npy",
    "image_ids": "image_ids.npy",
}
_STATS_KEYS = ("created", "num_regions", "num_images_without_regions")  # describe a result, not its inputs
WEIGHTS_DIR = "region_weights"
WEIGHTS_KEY = "region_weights"  # meta.json: {name: how}; derived from the arrays, not part of their content


class MergeInProgressError(OVDError):
    """Another process holds the merge lock of a store."""


# --------------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------------


def image_ids_sha256(image_ids: np.ndarray) -> str:
    """Fingerprint of an ordered image-id list (SHA-256 of its little-endian int64 bytes)."""
    return hashlib.sha256(np.ascontiguousarray(image_ids, dtype="<i8").tobytes()).hexdigest()


def content_key(meta: dict[str, Any]) -> dict[str, Any]:
    """The part of store/part metadata that determines the arrays' content.

    Drops result statistics, the creation time and file paths (the same weights or proposals at
    another path give the same store), so stores made on different machines compare equal.
    """
    key = {k: v for k, v in meta.items() if k not in (*_STATS_KEYS, WEIGHTS_KEY)}
    if isinstance(key.get("clip"), dict):
        key["clip"] = {k: v for k, v in key["clip"].items() if k in ("model", "weights_sha256")}
    if isinstance(key.get("proposals"), dict):
        key["proposals"] = {k: v for k, v in key["proposals"].items() if k != "path"}
    return key


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def describe_mismatch(found: dict[str, Any], expected: dict[str, Any]) -> str:
    keys = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
    return ", ".join(f"{k}: {found.get(k)!r} vs {expected.get(k)!r}" for k in keys[:4])


def store_is_complete(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a finished store (its ``meta.json`` exists)."""
    return (Path(path) / META_FILE).is_file()


class ArrayWriter:
    """Final arrays written as memory-mapped temp files, renamed into place by :meth:`commit`."""

    def __init__(self, out: Path, n: int, k: int, d: int) -> None:
        self.out = out
        specs = {
            "boxes": (np.float32, (n, k, 4)),
            "embeddings": (np.float16, (n, k, d)),
            "valid": (np.bool_, (n, k)),
            "image_ids": (np.int64, (n,)),
        }
        self.tmp: dict[str, str] = {}
        self.arrays: dict[str, np.ndarray] = {}
        try:
            for name, (dtype, shape) in specs.items():
                fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".npy", dir=out)
                os.close(fd)
                self.tmp[name] = tmp
                self.arrays[name] = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        except BaseException:
            self.abort()
            raise

    def write(self, begin: int, arrays: dict[str, np.ndarray]) -> None:
        for name, arr in arrays.items():
            self.arrays[name][begin : begin + len(arr)] = arr

    def commit(self, meta: dict[str, Any]) -> None:
        for arr in self.arrays.values():
            arr.flush()
        self.arrays.clear()
        for name, tmp in self.tmp.items():
            os.replace(tmp, self.out / ARRAY_FILES[name])
        self.tmp.clear()
        write_json(self.out / META_FILE, meta)  # last: its presence marks the store complete

    def abort(self) -> None:
        self.arrays.clear()
        for tmp in self.tmp.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self.tmp.clear()


def check_arrays(boxes: np.ndarray, embeddings: np.ndarray, valid: np.ndarray, image_ids: np.ndarray) -> None:
    n, k = valid.shape
    if boxes.shape != (n, k, 4) or embeddings.shape[:2] != (n, k) or embeddings.ndim != 3 or image_ids.shape != (n,):
        raise OVDError(
            f"inconsistent shapes: boxes {list(boxes.shape)}, embeddings {list(embeddings.shape)}, "
            f"valid {list(valid.shape)}, image_ids {list(image_ids.shape)}"
        )


def region_stats(valid: np.ndarray) -> dict[str, int]:
    per_image = valid.sum(axis=1)  # (N,)
    return {"num_regions": int(per_image.sum()), "num_images_without_regions": int((per_image == 0).sum())}
