"""Parts of a region store: resumable, shardable extraction writes each finished chunk of a shard as
``<store>/parts/shard{i}-chunk{j}.npz`` (arrays + its metadata); :func:`merge_store` joins them into the
store's arrays, writes ``meta.json`` and removes the parts (:mod:`ovd.distill.store`).

Shape shorthand: ``N`` images, ``K`` regions per image (slots), ``D`` CLIP embedding dim.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ovd.data.sampling import shard_range
from ovd.distill.store_format import (
    ARRAY_FILES,
    LOCK_FILE,
    PARTS_DIR,
    STORE_FORMAT,
    ArrayWriter,
    MergeInProgressError,
    check_arrays,
    content_key,
    describe_mismatch,
    image_ids_sha256,
    store_is_complete,
    utc_now,
)
from ovd.errors import OVDError
from ovd.utils.io import atomic_write
from ovd.utils.lock import create_pid_lock

logger = logging.getLogger(__name__)


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
    check_arrays(boxes, embeddings, valid, image_ids)
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
            check_arrays(data["boxes"], data["embeddings"], data["valid"], data["image_ids"])
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
            f"part was written by a different extraction ({describe_mismatch(a, b)}); use another output "
            "directory or delete the parts to start over",
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
        writer = ArrayWriter(out, n, ref["k"], ref["embed_dim"])
        try:
            ids = np.empty(n, dtype=np.int64)
            per_image = np.zeros(n, dtype=np.int64)
            for p in wanted:
                meta, data = read_part(p)
                key = {k: v for k, v in content_key(meta).items() if k != "part"}
                if key != ref_key:
                    raise OVDError(
                        f"part comes from a different extraction than {wanted[0].name} "
                        f"({describe_mismatch(key, ref_key)})",
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
                created=utc_now(),
            )
            writer.commit(final)
        except BaseException:
            writer.abort()
            raise
        shutil.rmtree(parts_dir)
    logger.info("merged %d parts into %s (%d images, %d regions)", len(wanted), out, n, final["num_regions"])
    return out
