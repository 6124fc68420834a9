"""Batched, resumable, shardable extraction of CLIP embeddings of proposal crops (METHOD §3.1-§3.2).

Per image: the source's proposals are clipped to the image, reduced by :func:`select_top_k` (NMS,
top ``K``), each box is cropped from the **original** image and encoded with the CLIP image tower
after open_clip's own eval preprocessing (:class:`CropPreprocess`: shortest side to the input size
with bicubic resampling, centre crop, CLIP mean/std). Unlike the reference loop (one PIL crop and
one batch-1 forward at a time, exceptions swallowed), images are read in DataLoader workers, crops
of many images share one ``encode_images`` call, and every failure raises. Three resize backends
(where the crops are made):

* ``"pil"``: the workers decode, crop and resize with PIL, exactly as ``clip.preprocess`` on a PIL crop;
* ``"tensor"``: the workers decode, the crops are resized one by one on the CLIP's device, as
  ``clip.preprocess`` does to a tensor crop;
* ``"batched"``: the workers decode a task's images into one slot of shared decode buffers
  (:class:`~ovd.distill.extract_io.HostRing`, page-locked on a GPU); on the CLIP's device every crop's
  crop + resize + centre crop is two batched matrix products for the whole task
  (:func:`~ovd.distill.crops.batched_crop_resize`, :func:`~ovd.distill.crops.resize_weights`): a fixed
  number of kernels per task instead of several per crop, and no host-device synchronisation. Same numbers
  as ``"tensor"`` up to float rounding in float32; the GPU default, float16 products, moves ~5 % of pixels by
  one intensity level.

Cheap proposals (a file) are selected chunk by chunk while earlier chunks are encoded, and the CLIP
weights are hashed (for the metadata) in a background thread: nothing serial precedes the first crop.

Work is split into fixed **chunks** of consecutive images of a shard; a finished chunk is written
atomically as ``<out>/parts/shard{i}-chunk{j}.npz``. A rerun skips finished chunks (after checking
they come from the same extraction), so a killed run resumes where it stopped. When every chunk of
every shard exists, the parts are merged into the store (:mod:`ovd.distill.store`). Batches never
span two chunks, so a resumed run gives the same bytes as an uninterrupted one.

This module is the orchestration; the crop geometry and resize kernels are :mod:`ovd.distill.crops`,
the worker / decode / host-buffer I/O :mod:`ovd.distill.extract_io`, and the options (with their
defaults, written once) :class:`ovd.config.ExtractionCfg`.

Shape shorthand: ``P`` raw proposals of one image, ``K`` kept regions per image, ``B`` crops per
CLIP forward, ``D`` CLIP embedding dim, ``h x w`` CLIP input size.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from ovd.clip.model import ClipBundle
from ovd.config import CROP_DTYPES, RESIZE_BACKENDS, ExtractionCfg
from ovd.distill.crops import CropPreprocess
from ovd.distill.extract_io import (
    WORKER_MODE,
    Chunk,
    CropDataset,
    Transfer,
    item_crops,
    make_loader,
    make_ring,
    propose_chunk,
    raise_worker_error,
    to_host,
)
from ovd.distill.proposals import FileProposals, ProposalSource
from ovd.distill.store import (
    STORE_FORMAT,
    STORE_VERSION,
    MergeInProgressError,
    check_part,
    check_store,
    expected_parts,
    image_ids_sha256,
    merge_store,
    part_path,
    shard_chunks,
    store_is_complete,
    write_part,
)
from ovd.errors import OVDError
from ovd.structures import ImageRecord

__all__ = ["CropEncoder", "extract_region_embeddings", "weights_sha256"]

logger = logging.getLogger(__name__)


class CropEncoder:
    """Crops → L2-normalised ``float16 Tensor[B, D]`` CLIP embeddings, left on the CLIP's device.

    Crops are ``uint8 Tensor[B, h, w, 3]`` (PIL backend, from the workers) or ``float Tensor[B, 3, h, w]``
    with integer values 0-255 (tensor backend); both then get ToTensor's ``/ 255`` and Normalize.
    """

    def __init__(self, clip: ClipBundle, preprocess: CropPreprocess) -> None:
        self.clip = clip
        device = clip.device
        self.mean = torch.tensor(preprocess.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocess.std, device=device).view(1, 3, 1, 1)

    def __call__(self, crops: Tensor) -> Tensor:
        x = crops.to(self.mean.device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = x.permute(0, 3, 1, 2).contiguous().float()  # (B, 3, h, w)
        x = x.div(255).sub_(self.mean).div_(self.std)  # ToTensor + Normalize
        emb = self.clip.encode_images(x)  # (B, D)
        return F.normalize(emb, dim=1).half()  # (B, D)


def weights_sha256(model: torch.nn.Module) -> str:
    """Fingerprint of a model's weights: SHA-256 over its state dict (names, dtypes, shapes, bytes).
    Weights on a GPU come to the host in one copy (one copy per tensor would cost ~1 s for ViT-B)."""
    digest = hashlib.sha256()
    items = sorted(model.state_dict().items())
    flat = [t.detach().contiguous().reshape(-1).view(torch.uint8) for _, t in items]
    on_host = all(f.device.type == "cpu" for f in flat)
    data = (
        flat
        if on_host or not flat
        else torch.cat([f.to(flat[0].device) for f in flat]).cpu().split([f.numel() for f in flat])
    )
    for (name, t), b in zip(items, data, strict=True):
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(b.numpy().tobytes())
    return digest.hexdigest()


class _WeightsHash:
    """:func:`weights_sha256` of a model in a background thread (hashlib releases the GIL)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seconds = 0.0
        self._digest: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(model,), daemon=True)
        self._thread.start()

    def _run(self, model: torch.nn.Module) -> None:
        start = time.perf_counter()
        try:
            self._digest = weights_sha256(model)
        except BaseException as e:  # re-raised by result()
            self._error = e
        self.seconds = time.perf_counter() - start

    def result(self) -> str:
        """The digest (waits for it); the thread's exception, if any, is raised here."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._digest is not None
        return self._digest


def _run_metadata(
    records: Sequence[ImageRecord],
    source: ProposalSource,
    clip: ClipBundle,
    preprocess: CropPreprocess,
    *,
    k: int,
    nms_thresh: float,
    dataset_name: str,
    resize_backend: str,
    crop_dtype: str,
    weights_digest: str,
) -> dict[str, Any]:
    ids = np.array([r.image_id for r in records], dtype=np.int64)
    crop = {**preprocess.to_json(), "backend": resize_backend}
    if resize_backend == "batched":
        crop["matmul_dtype"] = crop_dtype
    return {
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        "dataset": dataset_name,
        "num_images": len(records),
        "k": k,
        "embed_dim": clip.embed_dim,
        "nms_thresh": nms_thresh,
        "clip": {
            "model": clip.model_name,
            "pretrained": clip.pretrained,
            "checkpoint_sha256": clip.checkpoint_sha256,
            "weights_sha256": weights_digest,
        },
        "crop_preprocess": crop,
        "proposals": source.describe(),
        "image_ids_sha256": image_ids_sha256(ids),
    }


def _encode_chunks(
    chunks: list[Chunk],
    records: Sequence[ImageRecord],
    preprocess: CropPreprocess,
    encoder: CropEncoder,
    *,
    k: int,
    batch_size: int,
    num_workers: int,
    resize_backend: str,
    bar: tqdm,
    finish: Callable[[Chunk, dict[str, np.ndarray]], None],
    host_ring: bool = True,
    crop_dtype: torch.dtype = torch.float32,
    propose: Callable[[Chunk], None] | None = None,
) -> None:
    """Crop and encode the given chunks; call ``finish(chunk, arrays)`` per chunk.

    A chunk without boxes gets them from ``propose(chunk)`` when its first worker task is handed out
    (in this thread, while the device works on earlier chunks). Nothing here waits for the device
    except :meth:`Transfer.before_item` (a copy queued two items earlier) and the end: a finished
    chunk's embeddings are copied to the host asynchronously and written once the copy is done, while
    later chunks run.
    """
    images_per_item = max(1, batch_size // (2 * k))  # ~half a CLIP batch per worker task
    items: list[list[int]] = []
    item_chunk: list[Chunk] = []
    last_item: dict[int, int] = {}  # chunk list index -> its last item
    for ci, c in enumerate(chunks):
        for s in range(c.positions.start, c.positions.stop, images_per_item):
            items.append(list(range(s, min(s + images_per_item, c.positions.stop))))
            item_chunk.append(c)
        last_item[len(items) - 1] = ci

    failed: list[BaseException] = []  # a proposal error: raised once the chunks before it are written

    def tasks() -> Iterator[tuple[int, dict[int, np.ndarray]]]:
        for i, (positions, chunk) in enumerate(zip(items, item_chunk, strict=True)):
            if chunk.boxes is None:
                if propose is None:
                    raise ValueError(f"chunk {chunk.index} has no boxes and no proposal source")
                try:
                    propose(chunk)
                except Exception as e:
                    failed.append(e)
                    return
            assert chunk.boxes is not None
            yield i, {p: chunk.boxes[p - chunk.positions.start] for p in positions}

    device = encoder.mean.device
    use_ring = host_ring and resize_backend == "batched"
    ring = make_ring(items, records, num_workers, device) if use_ring else None
    transfer = Transfer(ring, device)
    pinned = ring is not None and ring.pinned
    dataset = CropDataset(records, preprocess, WORKER_MODE[resize_backend], ring)
    loader = make_loader(dataset, tasks(), num_workers, None, pin=device.type == "cuda")
    pending: list[Tensor] = []
    num_pending = 0
    embeddings: list[Tensor] = []  # stay on the device until the chunk is done: no sync per batch
    unwritten: deque[tuple[Chunk, Tensor | None, Any]] = deque()  # chunks whose embeddings are on their way
    waited = 0.0

    def write(block: bool) -> None:
        while unwritten and (block or unwritten[0][2] is None or unwritten[0][2].query()):
            chunk, flat, event = unwritten.popleft()
            if event is not None:
                event.synchronize()
            host = None if flat is None else flat.numpy()  # (sum K_i, D) float16
            finish(chunk, _chunk_arrays(chunk, records, host, k=k, dim=encoder.clip.embed_dim))

    try:
        it = iter(loader)
        for item_index in range(len(items)):
            transfer.before_item(item_index)
            start = time.perf_counter()
            item = next(it, None)
            waited += time.perf_counter() - start
            if item is None:  # the tasks stopped at a proposal error
                break
            if item["error"] is not None:
                raise_worker_error(item["error"])
            crops = item_crops(item, item_index, records, preprocess, transfer, crop_dtype)
            pending.append(crops)
            num_pending += len(crops)
            while num_pending >= batch_size:
                crops = torch.cat(pending)  # (n, ...)
                embeddings.append(encoder(crops[:batch_size]))
                pending, num_pending = [crops[batch_size:]], num_pending - batch_size
            if item_index in last_item:  # the chunk is complete: no batch spans two chunks
                if num_pending:
                    embeddings.append(encoder(torch.cat(pending)))
                flat, event = to_host(torch.cat(embeddings)) if embeddings else (None, None)
                unwritten.append((chunks[last_item[item_index]], flat, event))
                pending, num_pending, embeddings = [], 0, []
            write(block=False)
            bar.update(len(item["positions"]))
        write(block=True)
    finally:
        transfer.close()
    if failed:
        raise failed[0]
    logger.info(
        "encoded %d images in %d tasks; %.1f s waiting for the workers%s",
        sum(len(c.positions) for c in chunks), len(items), waited,
        f"; decode buffers {ring.num_slots} x {ring.slot_bytes / 2**20:.1f} MB (page-locked: {pinned}), "
        f"{transfer.queued} tasks too large for them" if ring else "",
    )  # fmt: skip


def _chunk_arrays(
    chunk: Chunk, records: Sequence[ImageRecord], flat: np.ndarray | None, *, k: int, dim: int
) -> dict[str, np.ndarray]:
    n = len(chunk.positions)
    boxes = np.zeros((n, k, 4), dtype=np.float32)
    valid = np.zeros((n, k), dtype=bool)
    for i, b in enumerate(chunk.boxes):
        boxes[i, : len(b)] = b
        valid[i, : len(b)] = True
    emb = np.zeros((n, k, dim), dtype=np.float16)
    flat = np.zeros((0, dim), dtype=np.float16) if flat is None else flat  # (sum K_i, D)
    if flat.shape[0] != int(valid.sum()):
        raise RuntimeError(f"{flat.shape[0]} embeddings for {int(valid.sum())} regions")
    emb[valid] = flat  # row-major order of valid slots = crop order (image, then box)
    ids = np.array([records[p].image_id for p in chunk.positions], dtype=np.int64)
    return {"image_ids": ids, "boxes": boxes, "embeddings": emb, "valid": valid}


def extract_region_embeddings(
    records: Sequence[ImageRecord],
    source: ProposalSource,
    clip: ClipBundle,
    out_dir: str | os.PathLike[str],
    options: ExtractionCfg | None = None,
    *,
    num_shards: int = 1,
    shard_index: int = 0,
    dataset_name: str = "",
    progress: bool = True,
) -> Path:
    """Extract (or resume extracting) one shard of a region store; merge when every shard is done.

    Args:
        records: all images of the dataset, in store order (every shard must get the same list).
        source: where the proposals come from.
        clip: the CLIP teacher; runs on ``clip.device``.
        out_dir: the store directory (see :mod:`ovd.distill.store`).
        options: K, NMS, batch and worker sizes, chunk size, resize backend, host ring and crop dtype
            (:class:`ovd.config.ExtractionCfg`, documented there; None = its defaults). ``"auto"`` backend:
            ``"batched"`` when CLIP is on a GPU, else ``"pil"``; ``"auto"`` crop dtype: float16 on a GPU,
            float32 on a CPU. The backend, K, NMS and (batched) crop dtype are recorded in the metadata, so
            a resumed or sharded run must use the same.
        num_shards, shard_index: this process's contiguous share of ``records``.
        dataset_name: recorded in the metadata.
        progress: show a progress bar over images.

    Returns:
        ``out_dir``; the store is complete (openable with :class:`RegionStore`) once every shard is
        done (``store_is_complete(out_dir)``).

    Raises:
        OVDError: bad arguments, duplicate image ids, a proposal file that covers none of the images,
            an unreadable image (naming the file), or existing parts / store from a different extraction.
    """
    opts = ExtractionCfg() if options is None else options
    k, nms_thresh, num_workers = opts.k, opts.nms_thresh, opts.num_workers
    records = list(records)
    for name, value, low in (("k", k, 1), ("batch_size", opts.batch_size, 1), ("num_workers", num_workers, 0)):
        if value < low:
            raise OVDError(f"{name} must be >= {low}, got {value}", field=name)
    if not 0.0 < nms_thresh <= 1.0:
        raise OVDError(f"NMS threshold must be in (0, 1], got {nms_thresh}", field="nms_thresh")
    if not records:
        raise OVDError("no images to extract region embeddings for", field="records")
    chunk_ranges = shard_chunks(len(records), num_shards, shard_index, opts.chunk_size)
    chunks = [Chunk(j, r) for j, r in enumerate(chunk_ranges)]
    ids = [int(r.image_id) for r in records]
    if len(set(ids)) != len(ids):
        raise OVDError(f"duplicate image ids in dataset {dataset_name!r}", field="records")
    if isinstance(source, FileProposals) and not source.image_ids & set(ids):
        raise OVDError(f"the proposal file has no entry for any image of dataset {dataset_name!r}", path=source.path)

    on_gpu = clip.device.type == "cuda"
    resize_backend = ("batched" if on_gpu else "pil") if opts.resize_backend == "auto" else opts.resize_backend
    if resize_backend not in RESIZE_BACKENDS:
        raise OVDError(f"unknown resize backend {resize_backend!r} (valid: auto, {', '.join(RESIZE_BACKENDS)})")
    crop_dtype = ("float16" if on_gpu else "float32") if opts.crop_dtype == "auto" else opts.crop_dtype
    if crop_dtype not in CROP_DTYPES:
        valid = ", ".join(CROP_DTYPES)
        raise OVDError(f"unknown crop dtype {crop_dtype!r} (valid: auto, {valid})", field="crop_dtype")
    out = Path(out_dir)
    preprocess = CropPreprocess.from_clip(clip)
    start = time.perf_counter()
    weights = _WeightsHash(clip.model)  # in the background: a fresh run starts cropping meanwhile
    meta_cache: dict[str, Any] = {}

    def metadata() -> dict[str, Any]:
        if not meta_cache:
            meta_cache.update(
                _run_metadata(
                    records,
                    source,
                    clip,
                    preprocess,
                    k=k,
                    nms_thresh=nms_thresh,
                    dataset_name=dataset_name,
                    resize_backend=resize_backend,
                    crop_dtype=crop_dtype,
                    weights_digest=weights.result(),
                )  # fmt: skip
            )
        return meta_cache

    if store_is_complete(out):
        check_store(out, metadata())
        logger.info("region store %s is already complete", out)
        return out
    layout = {"num_shards": num_shards, "chunk_size": opts.chunk_size}

    def part_meta(c: Chunk) -> dict[str, Any]:
        part = {"shard_index": shard_index, "chunk_index": c.index, "begin": c.positions.start, "end": c.positions.stop}
        return {**metadata(), "layout": layout, "part": part}

    todo = []
    for c in chunks:
        path = part_path(out, shard_index, c.index)
        if path.is_file():
            check_part(path, part_meta(c))
        else:
            todo.append(c)
    done_images = sum(len(c.positions) for c in chunks) - sum(len(c.positions) for c in todo)
    logger.info(
        "shard %d/%d: %d chunks, %d already done; extracting %d images",
        shard_index, num_shards, len(chunks), len(chunks) - len(todo), sum(len(c.positions) for c in todo),
    )  # fmt: skip

    def finish(c: Chunk, arrays: dict[str, np.ndarray]) -> None:
        write_part(part_path(out, shard_index, c.index), **arrays, meta=part_meta(c))

    def propose(c: Chunk) -> None:
        propose_chunk(c, records, source, k=k, nms_thresh=nms_thresh, num_workers=num_workers)

    encoder = CropEncoder(clip, preprocess)
    total = sum(len(c.positions) for c in chunks)
    with tqdm(total=total, initial=done_images, unit="img", desc="region embeddings", disable=not progress) as bar:
        run = dict(
            k=k,
            batch_size=opts.batch_size,
            num_workers=num_workers,
            resize_backend=resize_backend,
            bar=bar,
            finish=finish,
            host_ring=opts.host_ring,
            crop_dtype=getattr(torch, crop_dtype),
        )
        if source.needs_images:  # the model sees a chunk, then its crops are encoded: resumable per chunk
            for c in todo:
                propose(c)
                _encode_chunks([c], records, preprocess, encoder, **run)
        elif todo:  # cheap proposals, made as the chunks come up: one worker pool for all chunks
            _encode_chunks(todo, records, preprocess, encoder, propose=propose, **run)
    metadata()  # the weights hash is known, whatever was done
    encoded = time.perf_counter()
    logger.info("proposals, crops and encoding: %.1f s (weights hash %.1f s, in the background)",
                encoded - start, weights.seconds)  # fmt: skip

    wanted = expected_parts(out, len(records), num_shards, opts.chunk_size)
    missing = [p for p in wanted if not p.is_file()]
    if store_is_complete(out):
        return out
    if missing:
        logger.info("shard %d done; %d parts of other shards missing, not merging yet", shard_index, len(missing))
        return out
    try:
        merge_store(out)
    except MergeInProgressError as e:
        logger.info("not merging: %s", e)
    logger.info("merged the store in %.1f s", time.perf_counter() - encoded)
    return out
