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

import contextlib
import copy
import datetime
import hashlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ovd.data.loader import shard_range
from ovd.errors import OVDError
from ovd.utils.io import atomic_write, read_json, write_json
from ovd.utils.lock import create_pid_lock

logger = logging.getLogger(__name__)

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


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _describe_mismatch(found: dict[str, Any], expected: dict[str, Any]) -> str:
    keys = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
    return ", ".join(f"{k}: {found.get(k)!r} vs {expected.get(k)!r}" for k in keys[:4])


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def store_is_complete(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a finished store (its ``meta.json`` exists)."""
    return (Path(path) / META_FILE).is_file()


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


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


class _ArrayWriter:
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


def _check_arrays(boxes: np.ndarray, embeddings: np.ndarray, valid: np.ndarray, image_ids: np.ndarray) -> None:
    n, k = valid.shape
    if boxes.shape != (n, k, 4) or embeddings.shape[:2] != (n, k) or embeddings.ndim != 3 or image_ids.shape != (n,):
        raise OVDError(
            f"inconsistent shapes: boxes {list(boxes.shape)}, embeddings {list(embeddings.shape)}, "
            f"valid {list(valid.shape)}, image_ids {list(image_ids.shape)}"
        )


def _stats(valid: np.ndarray) -> dict[str, int]:
    per_image = valid.sum(axis=1)  # (N,)
    return {"num_regions": int(per_image.sum()), "num_images_without_regions": int((per_image == 0).sum())}


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
    _check_arrays(boxes, embeddings, valid, image_ids)
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
        **_stats(valid),
        "created": _now(),
    }
    writer = _ArrayWriter(out, n, k, d)
    try:
        writer.write(0, {"boxes": boxes, "embeddings": embeddings, "valid": valid, "image_ids": image_ids})
        writer.commit(meta)
    except BaseException:
        writer.abort()
        raise
    return out


# --------------------------------------------------------------------------------------------------
# Parts: resumable, shardable extraction
# --------------------------------------------------------------------------------------------------


def part_path(store: str | os.PathLike[str], shard_index: int, chunk_index: int) -> Path:
    """File of one finished chunk of one shard."""
    return Path(store) / PARTS_DIR / f"shard{shard_index}-chunk{chunk_index}.npz"


def shard_chunks(num_images: int, num_shards: int, shard_index: int, chunk_size: int) -> list[range]:
    """The chunks (ranges of record positions) of one shard: its contiguous range, cut every ``chunk_size``."""
    if chunk_size < 1:
        raise OVDError(f"chunk_size must be >= 1, got {chunk_size}", field="chunk_size")
    shard = shard_range(num_images, shard_index, num_shards)
    return [range(b, min(b + chunk_size, shard.stop)) for b in range(shard.start, shard.stop, chunk_size)]


def write_part(
    path: Path,
    *,
    image_ids: np.ndarray,
    boxes: np.ndarray,
    embeddings: np.ndarray,
    valid: np.ndarray,
    meta: dict[str, Any],
) -> None:
    """Write one chunk's arrays and metadata atomically (an ``.npz``; the metadata as a JSON string)."""
    _check_arrays(boxes, embeddings, valid, image_ids)
    text = np.array(json.dumps(meta, sort_keys=True))
    atomic_write(
        path,
        lambda tmp: np.savez(tmp, image_ids=image_ids, boxes=boxes, embeddings=embeddings, valid=valid, meta=text),
    )


def read_part(path: Path, *, arrays: bool = True) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Metadata (and, with ``arrays``, the arrays) of a part file.

    Raises:
        OVDError: unreadable file or missing entries, naming the file.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"][()]))
            data = {name: z[name] for name in ARRAY_FILES} if arrays else {}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # a cut file is not a zip
        raise OVDError(f"unreadable part file ({type(e).__name__}: {e}); delete it to recompute", path=path) from e
    if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT:
        raise OVDError("not a region-store part file", path=path)
    if data:
        try:
            _check_arrays(data["boxes"], data["embeddings"], data["valid"], data["image_ids"])
        except OVDError as e:
            raise OVDError(e.reason, path=path) from e
        part = meta.get("part", {})
        n, k, d = part.get("end", 0) - part.get("begin", 0), meta.get("k"), meta.get("embed_dim")
        if data["embeddings"].shape != (n, k, d) or data["embeddings"].dtype != np.float16:
            raise OVDError(f"arrays do not match its metadata (expected {n} images, K={k}, D={d})", path=path)
    return meta, data


def check_part(path: Path, expected: dict[str, Any]) -> None:
    """Raise if an existing part was written by a different run (other model, proposals, K, layout, ...).

    Raises:
        OVDError: naming the file and the first differing entries.
    """
    found, _ = read_part(path, arrays=False)
    a, b = content_key(found), content_key(expected)
    if a != b:
        raise OVDError(
            f"part was written by a different extraction ({_describe_mismatch(a, b)}); use another output "
            "directory or delete the parts to start over",
            path=path,
        )


def check_store(path: str | os.PathLike[str], expected: dict[str, Any]) -> None:
    """Raise unless the complete store at ``path`` was made by the extraction ``expected`` describes (same
    content key: CLIP model and weights, proposals, images, K, NMS, crop preprocessing).

    Raises:
        OVDError: naming the store and the first differing entries.
    """
    a, b = content_key(RegionStore.open(path).metadata), content_key(expected)
    if a != b:
        raise OVDError(
            f"holds a finished region store of a different extraction ({_describe_mismatch(a, b)}); choose "
            "another output, or delete the store to extract it again",
            path=path,
        )


def expected_parts(store: str | os.PathLike[str], num_images: int, num_shards: int, chunk_size: int) -> list[Path]:
    """Every part file a finished extraction with this layout has, in image order."""
    return [
        part_path(store, s, j)
        for s in range(num_shards)
        for j in range(len(shard_chunks(num_images, num_shards, s, chunk_size)))
    ]


@contextlib.contextmanager
def _merge_lock(out: Path):
    lock = out / LOCK_FILE
    try:
        fd = create_pid_lock(lock)  # a lock left by a killed merge is replaced
    except FileExistsError as e:
        raise MergeInProgressError(
            f"another process is merging this store (or a merge crashed: delete {LOCK_FILE} if none runs)",
            path=out,
        ) from e
    try:
        os.close(fd)
        yield
    finally:
        lock.unlink(missing_ok=True)


def merge_store(path: str | os.PathLike[str]) -> Path:
    """Join the part files of all shards into the final arrays, write ``meta.json``, remove the parts.

    A store that is already complete is returned as is.

    Raises:
        OVDError: no parts, parts of different extractions, or missing parts (listing some).
        MergeInProgressError: another process holds the merge lock.
    """
    out = Path(path)
    if store_is_complete(out):
        return out
    parts_dir = out / PARTS_DIR
    files = sorted(parts_dir.glob("shard*-chunk*.npz")) if parts_dir.is_dir() else []
    if not files:
        raise OVDError("nothing to merge: no part files (run the extraction first)", path=parts_dir)
    ref, _ = read_part(files[0], arrays=False)
    layout = ref.get("layout", {})
    n = ref.get("num_images")
    if not isinstance(n, int) or not isinstance(layout, dict):
        raise OVDError("part metadata lacks num_images/layout", path=files[0])
    wanted = expected_parts(out, n, layout.get("num_shards", 1), layout.get("chunk_size", 1))
    missing = [p for p in wanted if not p.is_file()]
    if missing:
        names = ", ".join(p.name for p in missing[:5])
        raise OVDError(
            f"{len(missing)} of {len(wanted)} parts missing (e.g. {names}); finish those shards first",
            path=parts_dir,
        )
    extra = sorted(set(files) - set(wanted))
    if extra:
        raise OVDError(f"unexpected part files for this layout (e.g. {extra[0].name})", path=parts_dir)
    with _merge_lock(out):
        if store_is_complete(out):  # another process finished the merge while we checked
            return out
        ref_key = {k: v for k, v in content_key(ref).items() if k != "part"}
        writer = _ArrayWriter(out, n, ref["k"], ref["embed_dim"])
        try:
            ids = np.empty(n, dtype=np.int64)
            per_image = np.zeros(n, dtype=np.int64)
            for p in wanted:
                meta, data = read_part(p)
                key = {k: v for k, v in content_key(meta).items() if k != "part"}
                if key != ref_key:
                    raise OVDError(
                        f"part comes from a different extraction than {wanted[0].name} "
                        f"({_describe_mismatch(key, ref_key)})",
                        path=p,
                    )
                begin = meta["part"]["begin"]
                writer.write(begin, data)
                ids[begin : begin + len(data["image_ids"])] = data["image_ids"]
                per_image[begin : begin + len(data["image_ids"])] = data["valid"].sum(axis=1)
            if image_ids_sha256(ids) != ref["image_ids_sha256"]:
                raise OVDError("merged image ids do not match the dataset the parts were made from", path=parts_dir)
            final = {k: v for k, v in copy.deepcopy(ref).items() if k not in ("layout", "part")}
            final.update(
                num_regions=int(per_image.sum()),
                num_images_without_regions=int((per_image == 0).sum()),
                created=_now(),
            )
            writer.commit(final)
        except BaseException:
            writer.abort()
            raise
        shutil.rmtree(parts_dir)
    logger.info("merged %d parts into %s (%d images, %d regions)", len(wanted), out, n, final["num_regions"])
    return out
