"""Worker I/O of region extraction: DataLoader datasets that decode (and crop) images in worker processes,
the shared decode buffers they write into (:class:`HostRing`, page-locked on a GPU), the copy of a task's
images to the CLIP's device (:class:`Transfer`), and the proposals of a chunk of images (:func:`propose_chunk`).

Errors raised in a worker travel back as ``(reason, path, field)`` and are raised again in the main process
(:func:`raise_worker_error`): an unreadable image names its file.

Shape shorthand: ``P`` raw proposals of one image, ``K`` kept regions per image, ``c`` crops of a task,
``h x w`` CLIP input size.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ovd.data.loader import read_record_image
from ovd.distill.crops import CropPreprocess, batched_crop_resize, crop_box_pixels, crop_rects, pad_stack, plan_crops
from ovd.distill.proposals import ProposalSource, clip_to_image, select_top_k
from ovd.errors import OVDError
from ovd.structures import ImageRecord

logger = logging.getLogger(__name__)

WORKER_MODE = {"pil": "crops", "tensor": "decode", "batched": "stack"}  # what the workers hand over (CropDataset)
_RING_BUDGET_BYTES = 1 << 30  # at most 1 GiB of decode buffers (HostRing); a larger task goes through the queue
_PREFETCH = 2  # tasks in flight per DataLoader worker (its default prefetch_factor)


def _decode(rec: ImageRecord, *, rgb: bool = True) -> np.ndarray:
    """A record's image; BGR (``rgb=False``) skips a full-image channel flip: crops are flipped
    after resizing instead."""
    return read_record_image(rec, rgb=rgb)


def _error(e: OVDError) -> tuple[str, str | None, str | None]:
    return (e.reason, e.path, e.field)


class _ImageDataset(Dataset):
    """``dataset[i]`` → ``{"image": uint8[H, W, 3] or None, "error": ...}`` for proposal sources."""

    def __init__(self, records: Sequence[ImageRecord]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            return {"image": _decode(self.records[i]), "error": None}
        except OVDError as e:
            return {"image": None, "error": _error(e)}


class HostRing:
    """Fixed host buffers that DataLoader workers decode into and the device copies from.

    ``num_slots`` slots of ``slot_bytes`` in one shared-memory block, created before the workers start
    (so forked and spawned workers alike write into it); on a GPU the block is page-locked in place
    (``cudaHostRegister``), so a slot reaches the device in one asynchronous DMA copy. Compared with
    returning each task's images through the DataLoader's queue, this saves a fresh shared-memory
    segment per task (its page faults in both processes) and the main process's copy into pinned
    memory, which otherwise bound a host-limited extraction (RESULTS, extraction sections 5 and 7).

    Slot reuse is safe when at most ``num_slots - 2`` tasks are outstanding: :mod:`ovd.distill.extract`
    waits, before taking item ``i`` off the loader, for the copy of item ``i - 2``.
    """

    def __init__(self, num_slots: int, slot_bytes: int, device: torch.device) -> None:
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self.buffer = torch.empty(num_slots * slot_bytes, dtype=torch.uint8).share_memory_()  # (S * bytes,)
        self.pinned = False
        if device.type == "cuda" and self.buffer.numel():
            rc = torch.cuda.cudart().cudaHostRegister(self.buffer.data_ptr(), self.buffer.numel(), 0)
            self.pinned = int(rc) == 0
            if not self.pinned:
                logger.warning("could not page-lock the %d MB decode buffers (%s)", self.buffer.numel() >> 20, rc)

    def view(self, slot: int, shape: tuple[int, ...]) -> Tensor:
        """Slot ``slot`` as a ``uint8 Tensor[shape]`` (a view: no copy)."""
        n = math.prod(shape)
        start = (slot % self.num_slots) * self.slot_bytes
        return self.buffer[start : start + n].view(shape)

    def close(self) -> None:
        """Unpin the block; every copy from it must be finished."""
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())
            self.pinned = False


class CropDataset(Dataset):
    """``dataset[(item_index, {p0: boxes, p1: boxes, ...})]`` → the crops (or images) of those record
    positions' boxes (``float32[K_i, 4]``), in position then box order; images without boxes are not
    decoded. Each item also carries ``positions`` and ``boxes`` back.

    ``mode``: ``"crops"`` (PIL backend): ``crops`` = ``uint8 Tensor[c, h, w, 3]``; ``"decode"`` (tensor
    backend): ``images`` = BGR ``uint8 Tensor[H, W, 3]``; ``"stack"`` (batched backend): the BGR images
    padded into one ``uint8[n, H, W, 3]`` batch, written into slot ``item_index`` of ``ring``
    (``slot`` = its shape) or, when it does not fit or there is no ring, returned as ``batch``; with
    ``plan``, the :class:`CropPlan` of the batch.
    """

    def __init__(
        self, records: Sequence[ImageRecord], preprocess: CropPreprocess, mode: str, ring: HostRing | None = None
    ) -> None:
        self.records = records
        self.preprocess = preprocess
        self.mode = mode
        self.ring = ring

    def __getitem__(self, task: tuple[int, dict[int, np.ndarray]]) -> dict[str, Any]:
        item_index, boxes = task
        head = {"positions": list(boxes), "boxes": boxes}
        if self.mode != "crops":
            with_boxes = [p for p, b in boxes.items() if len(b)]
            try:
                images = [_decode(self.records[p], rgb=False) for p in with_boxes]
            except OVDError as e:
                return {**head, "images": [], "error": _error(e)}
            if self.mode == "stack":
                return {**head, "error": None, **self._stack(item_index, boxes, with_boxes, images)}
            return {**head, "images": [torch.from_numpy(im) for im in images], "error": None}
        ch, cw = self.preprocess.crop_size
        out = np.empty((sum(len(b) for b in boxes.values()), ch, cw, 3), dtype=np.uint8)  # (c, h, w, 3)
        i = 0
        try:
            for p, image_boxes in boxes.items():
                if len(image_boxes) == 0:
                    continue
                rec = self.records[p]
                # resampling treats channels independently: crop and resize BGR, flip the small result
                image = Image.fromarray(_decode(rec, rgb=False))
                for box in image_boxes:
                    bgr = self.preprocess.crop_resize(image, crop_box_pixels(box, rec.height, rec.width))
                    out[i] = bgr[:, :, ::-1]  # (h, w, 3) RGB
                    i += 1
        except OVDError as e:
            return {**head, "crops": torch.zeros(0), "error": _error(e)}
        return {**head, "crops": torch.from_numpy(out), "error": None}

    def _stack(
        self, item_index: int, boxes: dict[int, np.ndarray], with_boxes: list[int], images: list[np.ndarray]
    ) -> dict[str, Any]:
        rects = [crop_rects(boxes[p], self.records[p].height, self.records[p].width) for p in with_boxes]
        plan = plan_crops(rects, self.preprocess)
        if not images:
            return {"batch": torch.zeros((0, 1, 1, 3), dtype=torch.uint8), "plan": plan}
        shape = (len(images), max(im.shape[0] for im in images), max(im.shape[1] for im in images), 3)
        if self.ring is None or math.prod(shape) > self.ring.slot_bytes:
            return {"batch": torch.from_numpy(pad_stack(images)), "plan": plan}
        slot = self.ring.view(item_index, shape).numpy()  # (n, H, W, 3); padding is left as is (never read)
        for i, im in enumerate(images):
            slot[i, : im.shape[0], : im.shape[1]] = im
        return {"slot": shape, "plan": plan}


def _worker_init(worker_id: int) -> None:
    del worker_id
    cv2.setNumThreads(0)  # one decode thread per worker: parallelism comes from the workers
    torch.set_num_threads(1)


def raise_worker_error(error: tuple[str, str | None, str | None]) -> None:
    reason, path, field = error
    raise OVDError(reason, path=path, field=field)


def make_loader(dataset: Dataset, sampler: Any, num_workers: int, batch_size: int | None, pin: bool) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=list if batch_size is not None else None,
        num_workers=num_workers,
        prefetch_factor=_PREFETCH if num_workers else None,  # HostRing's slot count relies on it
        worker_init_fn=_worker_init,
        pin_memory=pin,
    )


@dataclass
class Chunk:
    index: int  # chunk index within the shard
    positions: range  # record positions
    boxes: list[np.ndarray] | None = None  # kept boxes per image, float32[K_i, 4]


def _keep(
    source_out: Sequence[tuple[np.ndarray, np.ndarray]],
    records: Sequence[ImageRecord],
    *,
    k: int,
    nms_thresh: float,
    path: str | None = None,
) -> list[np.ndarray]:
    """Clip and select (:func:`select_top_k`) each image's proposals; ``path``: the proposal file, for errors."""
    if len(source_out) != len(records):
        raise OVDError(f"the proposal source returned {len(source_out)} results for {len(records)} images", path=path)
    kept = []
    for (boxes, scores), rec in zip(source_out, records, strict=True):
        try:
            boxes = clip_to_image(np.asarray(boxes, dtype=np.float32).reshape(-1, 4), rec.height, rec.width)  # (P, 4)
            kept.append(select_top_k(boxes, scores, nms_thresh=nms_thresh, k=k)[0])  # (K_i, 4)
        except ValueError as e:  # OVDError included
            reason = e.reason if isinstance(e, OVDError) else str(e)
            raise OVDError(f"proposals of image {rec.image_id} ({rec.file_name}): {reason}", path=path) from e
    return kept


def propose_chunk(
    chunk: Chunk,
    records: Sequence[ImageRecord],
    source: ProposalSource,
    *,
    k: int,
    nms_thresh: float,
    num_workers: int,
) -> None:
    recs = [records[p] for p in chunk.positions]
    if not source.needs_images:
        chunk.boxes = _keep(source(recs, None), recs, k=k, nms_thresh=nms_thresh, path=getattr(source, "path", None))
        return
    loader = make_loader(_ImageDataset(recs), None, num_workers, max(1, source.images_per_call), pin=False)
    kept: list[np.ndarray] = []
    start = 0
    for batch in loader:
        for item in batch:
            if item["error"] is not None:
                raise_worker_error(item["error"])
        batch_recs = recs[start : start + len(batch)]
        kept += _keep(source(batch_recs, [item["image"] for item in batch]), batch_recs, k=k, nms_thresh=nms_thresh)
        start += len(batch)
    chunk.boxes = kept


def _shm_free_bytes() -> int | None:
    """Free bytes of ``/dev/shm`` (where shared tensors live on Linux), None where unknown."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def make_ring(
    items: list[list[int]],
    records: Sequence[ImageRecord],
    num_workers: int,
    device: torch.device,
) -> HostRing | None:
    """Decode buffers for the batched backend: one slot per task that can be in flight, sized for the
    largest padded task (all its images, as their boxes may not be known yet; within
    :data:`_RING_BUDGET_BYTES`: a larger task goes through the queue).
    None (the queue for every task) where ``/dev/shm`` is too small to hold them twice over: a shared
    block larger than the free space kills the process when written (e.g. Docker's 64 MB default)."""
    num_slots = num_workers * _PREFETCH + 2  # outstanding tasks + the item in use + one being copied
    need = 0
    for positions in items:
        sizes = [(records[p].height, records[p].width) for p in positions]
        if sizes:
            need = max(need, len(sizes) * max(h for h, _ in sizes) * max(w for _, w in sizes) * 3)
    slot_bytes = min(need, _RING_BUDGET_BYTES // num_slots)
    free = _shm_free_bytes()
    if free is not None and 2 * num_slots * slot_bytes > free:
        logger.warning(
            "/dev/shm has %d MB free, too little for %d MB of decode buffers: images go through the DataLoader",
            free >> 20, (num_slots * slot_bytes) >> 20,
        )  # fmt: skip
        return None
    return HostRing(num_slots, slot_bytes, device)


class Transfer:
    """Moves a worker task's images to the CLIP's device; on a GPU through a side stream, so that the
    copy of the next task overlaps the CLIP forward of this one."""

    def __init__(self, ring: HostRing | None, device: torch.device) -> None:
        self.ring = ring
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.events: dict[int, Any] = {}  # item index -> its copy's CUDA event
        self.queued = 0  # tasks whose images came through the DataLoader's queue

    def before_item(self, item_index: int) -> None:
        """Wait until item ``item_index - 2``'s slot is copied: taking item ``item_index`` off the
        loader hands that slot to a worker (:class:`HostRing`)."""
        event = self.events.pop(item_index - 2, None)
        if event is not None:
            event.synchronize()

    def batch(self, item: dict[str, Any], item_index: int) -> Tensor:
        """The item's padded ``uint8 Tensor[n, H, W, 3]`` BGR batch on the device."""
        if "slot" not in item:
            self.queued += len(item["batch"]) > 0
            return item["batch"].to(self.device, non_blocking=True)
        assert self.ring is not None
        host = self.ring.view(item_index, tuple(int(v) for v in item["slot"]))  # (n, H, W, 3)
        if self.stream is None:
            return host  # a view: used up before the slot is handed out again
        with torch.cuda.stream(self.stream):
            batch = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        torch.cuda.current_stream(self.device).wait_event(event)
        batch.record_stream(torch.cuda.current_stream(self.device))
        self.events[item_index] = event
        return batch

    def close(self) -> None:
        for event in self.events.values():
            event.synchronize()
        self.events.clear()
        if self.ring is not None:
            self.ring.close()


def item_crops(
    item: dict[str, Any],
    item_index: int,
    records: Sequence[ImageRecord],
    preprocess: CropPreprocess,
    transfer: Transfer,
    crop_dtype: torch.dtype,
) -> Tensor:
    """The crops of one loader item: as the workers made them (PIL backend), or made here on the device
    from the images the workers read (tensor and batched backends): ``float Tensor[c, 3, h, w]``."""
    if "crops" in item:
        return item["crops"]  # (c, h, w, 3) uint8
    device = transfer.device
    if "plan" in item:  # sizes checked against the records in the worker
        batch = transfer.batch(item, item_index)  # (n, H, W, 3)
        return batched_crop_resize(batch, None, preprocess, bgr=True, plan=item["plan"], dtype=crop_dtype)
    boxes = item["boxes"]
    with_boxes = [p for p in item["positions"] if len(boxes[p])]
    crops = []
    for p, bgr in zip(with_boxes, item["images"], strict=True):
        rec = records[p]
        image = bgr.to(device, non_blocking=True).permute(2, 0, 1).flip(0).float()  # (3, H, W) RGB 0-255
        crops += [preprocess.crop_resize_tensor(image, crop_box_pixels(b, rec.height, rec.width)) for b in boxes[p]]
    if not crops:
        return torch.zeros((0, 3, *preprocess.crop_size), device=device)
    return torch.stack(crops)  # (c, 3, h, w)


def to_host(flat: Tensor) -> tuple[Tensor, Any]:
    """Start copying ``flat`` to the host; returns the host tensor and a CUDA event (None on a CPU)."""
    if flat.device.type != "cuda":
        return flat, None
    host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
    host.copy_(flat, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event
