"""The region-embedding store: CLIP embeddings of ``K`` proposals per image, as memory-mapped arrays.

One store per (dataset, proposal source, CLIP model) is a directory::

    <store>/boxes.npy        float32[N, K, 4]  xyxy proposals in original-image pixels (0 where invalid)
    <store>/embeddings.npy   float16[N, K, D]  L2-normalised CLIP image embeddings (0 where invalid)
    <store>/valid.npy        bool[N, K]        which slots hold a region; valid slots come first
    <store>/image_ids.npy    int64[N]          dataset image id of each row
    <store>/meta.json        what produced it (see below); written last
    <store>/region_weights/<name>.npy  float32[N, K]  optional per-region distillation weights

Rows follow the dataset's record order; the regions of a row are sorted by descending proposal
score. ``meta.json`` holds ``format``/``version``, ``dataset``, ``num_images``, ``k``, ``embed_dim``,
``nms_thresh``, ``clip`` (``model``, ``pretrained``, ``checkpoint_sha256``, ``weights_sha256`` of the
state dict), ``crop_preprocess``, ``proposals`` (the source's ``kind``, ``path``, ``sha256``,
parameters), ``image_ids_sha256``, ``num_regions``, ``num_images_without_regions`` and ``created``;
``region_weights`` (optional) maps each weights array's name to how it was computed (teacher-aware
RKD, :mod:`ovd.distill.region_weights`). A store without weights is read as uniform weights.

**A store is complete exactly when** ``meta.json`` **exists.** Extraction writes finished chunks as
``<store>/parts/shard{i}-chunk{j}.npz`` (each with its own metadata); :func:`merge_store` joins
them into the arrays, writes ``meta.json`` and removes the parts. This replaces the reference's
one pickle per image (METHOD §3.2, §9.2 item 2).

Shape shorthand: ``N`` images, ``K`` regions per image (slots), ``D`` CLIP embedding dim.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ovd.distill.store_format import (
    ARRAY_FILES,
    LOCK_FILE,
    META_FILE,
    PARTS_DIR,
    STORE_FORMAT,
    STORE_VERSION,
    WEIGHTS_DIR,
    WEIGHTS_KEY,
    ArrayWriter,
    MergeInProgressError,
    check_arrays,
    content_key,
    describe_mismatch,
    image_ids_sha256,
    region_stats,
    store_is_complete,
    utc_now,
)
from ovd.distill.store_parts import (
    check_part,
    expected_parts,
    merge_store,
    part_path,
    read_part,
    shard_chunks,
    write_part,
)
from ovd.errors import OVDError
from ovd.utils.io import read_json

__all__ = [  # the store's whole API, with its format (store_format) and parts (store_parts)
    "ARRAY_FILES",
    "LOCK_FILE",
    "META_FILE",
    "PARTS_DIR",
    "STORE_FORMAT",
    "STORE_VERSION",
    "WEIGHTS_DIR",
    "WEIGHTS_KEY",
    "MergeInProgressError",
    "RegionStore",
    "check_part",
    "check_store",
    "content_key",
    "expected_parts",
    "image_ids_sha256",
    "merge_store",
    "part_path",
    "read_part",
    "shard_chunks",
    "store_is_complete",
    "write_part",
    "write_region_store",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def _load_array(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if not path.is_file():
        raise OVDError("region store array missing", path=path)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise OVDError(f"cannot read array ({type(e).__name__}: {e})", path=path) from e
    if arr.dtype != dtype or arr.shape != shape:
        expected = f"{np.dtype(dtype).name}{list(shape)}"
        raise OVDError(f"expected {expected}, got {arr.dtype.name}{list(arr.shape)}", path=path)
    return arr


class RegionStore:
    """Read access to a complete store (see the module docstring); arrays are memory-mapped.

    Use :meth:`open`. ``lookup`` is O(1) (a dict from image id to row) and reads only that row.
    Pickling a store (e.g. into DataLoader workers) re-opens it from its path instead of copying
    the arrays.
    """

    def __init__(
        self,
        path: Path,
        metadata: dict[str, Any],
        boxes: np.ndarray,
        embeddings: np.ndarray,
        valid: np.ndarray,
        image_ids: np.ndarray,
    ) -> None:
        self.path = path
        self.metadata = metadata
        self._boxes = boxes
        self._embeddings = embeddings
        self._valid = valid
        self.image_ids = image_ids
        self._rows = {int(i): row for row, i in enumerate(image_ids.tolist())}
        if len(self._rows) != len(image_ids):
            raise OVDError("duplicate image ids", path=path / ARRAY_FILES["image_ids"])

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> RegionStore:
        """Open and validate a store.

        Raises:
            OVDError: no store or an unfinished one (no ``meta.json``), unknown format/version, or an
                array that is missing, unreadable or of the wrong dtype/shape (naming the file).
        """
        path = Path(path)
        meta_path = path / META_FILE
        if not meta_path.is_file():
            if (path / PARTS_DIR).is_dir():
                raise OVDError(
                    f"incomplete region store: no {META_FILE} (extraction unfinished or shards not merged; "
                    "re-run the extraction, or merge once all shards are done)",
                    path=path,
                )
            raise OVDError(f"not a region store (no {META_FILE})", path=path)
        meta = read_json(meta_path)
        if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT:
            raise OVDError(f"not an {STORE_FORMAT} metadata file", path=meta_path, field="format")
        if meta.get("version") != STORE_VERSION:
            raise OVDError(
                f"store version {meta.get('version')!r} is not supported (expected {STORE_VERSION})",
                path=meta_path,
                field="version",
            )
        for key in ("num_images", "k", "embed_dim"):
            if not isinstance(meta.get(key), int) or meta[key] < 0:
                raise OVDError(f"expected a non-negative integer, got {meta.get(key)!r}", path=meta_path, field=key)
        n, k, d = meta["num_images"], meta["k"], meta["embed_dim"]
        return cls(
            path,
            meta,
            boxes=_load_array(path / ARRAY_FILES["boxes"], np.dtype(np.float32), (n, k, 4)),
            embeddings=_load_array(path / ARRAY_FILES["embeddings"], np.dtype(np.float16), (n, k, d)),
            valid=_load_array(path / ARRAY_FILES["valid"], np.dtype(np.bool_), (n, k)),
            image_ids=np.asarray(_load_array(path / ARRAY_FILES["image_ids"], np.dtype(np.int64), (n,))),
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (RegionStore.open, (str(self.path),))

    def __len__(self) -> int:
        return len(self.image_ids)

    def __contains__(self, image_id: object) -> bool:
        return isinstance(image_id, (int, np.integer)) and int(image_id) in self._rows

    @property
    def k(self) -> int:
        return int(self.metadata["k"])

    @property
    def embed_dim(self) -> int:
        return int(self.metadata["embed_dim"])

    def lookup(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        """The valid regions of one image.

        Returns:
            ``(float32[k, 4] xyxy boxes in original-image pixels, float32[k, D] unit embeddings)``,
            ``k <= K`` by descending proposal score. An image that is not in the store (see
            :meth:`missing`) or has no regions gives ``k = 0``; the caller decides what that means.
        """
        row = self._rows.get(int(image_id))
        if row is None:
            return np.zeros((0, 4), dtype=np.float32), np.zeros((0, self.embed_dim), dtype=np.float32)
        mask = np.asarray(self._valid[row])  # (K,)
        boxes = np.array(self._boxes[row][mask], dtype=np.float32)  # (k, 4)
        emb = np.asarray(self._embeddings[row][mask], dtype=np.float32)  # (k, D)
        return boxes, emb

    def missing(self, image_ids: Iterable[int]) -> list[int]:
        """The ids among ``image_ids`` that have no row in the store, in the given order."""
        return [int(i) for i in image_ids if int(i) not in self._rows]

    def locate(self, image_id: int) -> tuple[int, int] | None:
        """``(row, k)``: the row of ``image_id`` in the arrays and its number of valid regions (the
        first ``k`` slots); None when the image is not in the store."""
        row = self._rows.get(int(image_id))
        return None if row is None else (row, int(np.count_nonzero(self._valid[row])))

    def region_weights(self, name: str) -> np.ndarray | None:
        """The stored weights array ``name`` (``float32[N, K]``, memory-mapped), or None when the store
        has none of that name (an older store, or weights not computed yet: the caller computes them)."""
        if name not in (self.metadata.get(WEIGHTS_KEY) or {}):
            return None
        n, k = self._valid.shape
        return _load_array(self.path / WEIGHTS_DIR / f"{name}.npy", np.dtype(np.float32), (n, k))


def write_region_store(
    path: str | os.PathLike[str],
    *,
    image_ids: np.ndarray,
    boxes: np.ndarray,
    embeddings: np.ndarray,
    valid: np.ndarray,
    metadata: dict[str, Any],
) -> Path:
    """Write a complete store in one go (arrays first, ``meta.json`` last).

    Args:
        path: the store directory (created if needed; an existing store there is replaced).
        image_ids: ``int64[N]``, unique.
        boxes: ``float32[N, K, 4]`` xyxy original-image pixels.
        embeddings: ``[N, K, D]`` unit-norm embeddings (stored as float16).
        valid: ``bool[N, K]``.
        metadata: provenance entries (``dataset``, ``clip``, ``proposals``, ``nms_thresh``, ...);
            ``format``, ``version``, ``num_images``, ``k``, ``embed_dim``, statistics and ``created``
            are filled in.

    Returns:
        The store directory.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    image_ids = np.asarray(image_ids, dtype=np.int64)
    valid = np.asarray(valid, dtype=bool)
    boxes = np.asarray(boxes, dtype=np.float32)
    embeddings = np.asarray(embeddings, dtype=np.float16)
    check_arrays(boxes, embeddings, valid, image_ids)
    n, k, d = embeddings.shape
    if len(np.unique(image_ids)) != n:
        raise OVDError("duplicate image ids", field="image_ids")
    (out / META_FILE).unlink(missing_ok=True)  # the old store stops being complete before it changes
    meta = {
        **metadata,
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        "num_images": n,
        "k": k,
        "embed_dim": d,
        "image_ids_sha256": image_ids_sha256(image_ids),
        **region_stats(valid),
        "created": utc_now(),
    }
    writer = ArrayWriter(out, n, k, d)
    try:
        writer.write(0, {"boxes": boxes, "embeddings": embeddings, "valid": valid, "image_ids": image_ids})
        writer.commit(meta)
    except BaseException:
        writer.abort()
        raise
    return out


def check_store(path: str | os.PathLike[str], expected: dict[str, Any]) -> None:
    """Raise unless the complete store at ``path`` was made by the extraction ``expected`` describes (same
    content key: CLIP model and weights, proposals, images, K, NMS, crop preprocessing).

    Raises:
        OVDError: naming the store and the first differing entries.
    """
    a, b = content_key(RegionStore.open(path).metadata), content_key(expected)
    if a != b:
        raise OVDError(
            f"holds a finished region store of a different extraction ({describe_mismatch(a, b)}); choose "
            "another output, or delete the store to extract it again",
            path=path,
        )
