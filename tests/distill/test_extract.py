"""Region-embedding extraction: parity with open_clip's per-crop preprocessing, resumption,
sharding + merge, error reporting, and the command-line tool."""

import json
from dataclasses import fields
from importlib import util
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

import ovd.distill.crops as crops_mod
import ovd.distill.extract as extract_mod
import ovd.distill.extract_io as io_mod
from ovd.clip import create_clip
from ovd.config import ExtractionCfg
from ovd.distill import (
    CropPreprocess,
    FileProposals,
    ProposalSource,
    RegionStore,
    crop_box_pixels,
    extract_region_embeddings,
    select_top_k,
    store_is_complete,
)
from ovd.distill.proposals import clip_to_image
from ovd.distill.store import META_FILE, PARTS_DIR, content_key
from ovd.errors import OVDError
from ovd.structures import ImageRecord

REPO = Path(__file__).parents[2]
ARRAYS = ("boxes.npy", "embeddings.npy", "valid.npy", "image_ids.npy")
NUM_IMAGES = 10
EMPTY_ID = 103  # image with no proposals in the file


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return create_clip("ovd-tiny", None)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Ten small generated images (PNG and JPEG, one grayscale) and a COCO results file of proposals
    for them: float and integer boxes, boxes sticking out of the image, overlapping duplicates,
    slivers, and one image without proposals."""
    root = tmp_path_factory.mktemp("distill_data")
    rng = np.random.default_rng(0)
    records, results = [], []
    for i in range(NUM_IMAGES):
        h, w = (int(v) for v in rng.integers(40, 110, 2))
        img = cv2.resize(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
        img = np.clip(img.astype(int) + rng.integers(-30, 30, img.shape), 0, 255).astype(np.uint8)
        ext = ".jpg" if i % 3 == 0 else ".png"
        path = root / f"img{i}{ext}"
        cv2.imwrite(str(path), img[:, :, 0] if i == 4 else img[:, :, ::-1])  # image 4 is grayscale
        image_id = 100 + i
        records.append(ImageRecord(image_id=image_id, file_name=str(path), height=h, width=w))
        if image_id == EMPTY_ID:
            continue
        for j in range(9):
            bw, bh = rng.uniform(1, w * 0.9), rng.uniform(1, h * 0.9)
            x, y = rng.uniform(-5, w - bw + 5), rng.uniform(-5, h - bh + 5)
            if j % 2:  # integer boxes, cropped identically by PIL
                x, y, bw, bh = (float(round(v)) for v in (x, y, bw, bh))
            results.append({"image_id": image_id, "bbox": [x, y, bw, bh], "score": float(rng.random())})
        results.append({"image_id": image_id, "bbox": [2, 2, 0.4, 20], "score": 2.0})  # sliver: dropped
    props = root / "props.json"
    props.write_text(json.dumps(results))
    return records, props


def _extract(records, props, clip, out, **kw):
    kw = {"chunk_size": 3, "batch_size": 8, "num_workers": 0, "progress": False, "dataset_name": "toy", **kw}
    options = ExtractionCfg(**{f.name: kw.pop(f.name) for f in fields(ExtractionCfg) if f.name in kw})
    source = props if isinstance(props, ProposalSource) else FileProposals(props)
    return extract_region_embeddings(records, source, clip, out, options, **kw)


def _same_bytes(a: Path, b: Path) -> None:
    for name in ARRAYS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _count_crops(monkeypatch):
    """Count the crops the CLIP encoder sees."""
    seen = []
    original = extract_mod.CropEncoder.__call__

    def counting(self, crops):
        seen.append(len(crops))
        return original(self, crops)

    monkeypatch.setattr(extract_mod.CropEncoder, "__call__", counting)
    return seen


def test_crop_preprocess_equals_torchvision_on_pil(clip):
    prep = CropPreprocess.from_clip(clip)
    assert (prep.resize, prep.crop_size, prep.interpolation) == (64, (64, 64), "bicubic")
    tv = T.Compose([T.Resize(64, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(64)])
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8))
    # down- and up-scaling, elongated both ways, exactly the input size, 1 px
    rects = [(0, 0, 130, 90), (10, 5, 40, 85), (3, 4, 120, 20), (7, 7, 71, 71), (50, 50, 51, 51), (0, 60, 64, 90)]
    for rect in rects:
        expected = np.asarray(tv(image.crop(rect)))
        np.testing.assert_array_equal(prep.crop_resize(image, rect), expected, err_msg=str(rect))
    # the tensor backend (torchvision's tensor resize) is close to PIL; PIL clamps and rounds to uint8
    # between its two passes, which matters most (single pixels off by up to ~16) on white noise
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()
    for rect in rects:
        diff = np.abs(prep.crop_resize_tensor(tensor, rect).permute(1, 2, 0).numpy() - prep.crop_resize(image, rect))
        assert diff.mean() < 0.5 and np.percentile(diff, 99) <= 4, (rect, diff.mean())
    # the batched backend's matrix products give the tensor backend's numbers (a rounding flip at most)
    # the batched backend: several images of different sizes (zero-padded into one batch, BGR), one
    # without rectangles, in one call; the tensor backend's numbers, a rounding flip at most
    small = np.array(image)[20:75, 30:]  # (55, 100, 3)
    small_rects = [(0, 0, 100, 55), (60, 10, 99, 54)]
    none = np.zeros((0, 4), dtype=np.int64)
    batch = crops_mod.pad_stack([np.array(image)[:, :, ::-1], small[:, :, ::-1], small[:, :, ::-1]])
    assert batch.shape == (3, 90, 130, 3) and not batch[1, 55:].any() and not batch[1, :, 100:].any()
    made = crops_mod.batched_crop_resize(
        torch.from_numpy(batch), [np.array(rects), none, np.array(small_rects)], prep, bgr=True
    )  # (n, 3, 64, 64)
    small_t = torch.from_numpy(small.copy()).permute(2, 0, 1).float()
    expected = [prep.crop_resize_tensor(tensor, r) for r in rects] + [
        prep.crop_resize_tensor(small_t, r) for r in small_rects
    ]
    assert made.shape == (len(expected), 3, 64, 64)
    for crop, ref in zip(made, expected, strict=True):
        diff = (crop - ref).abs()
        assert diff.max() <= 1 and diff.mean() < 1e-3, diff.max()
    rgb = crops_mod.batched_crop_resize(torch.from_numpy(batch[:1, :, :, ::-1].copy()), [np.array(rects)], prep)
    torch.testing.assert_close(rgb, made[: len(rects)])  # bgr=False on an RGB batch: the same crops
    assert crops_mod.batched_crop_resize(torch.from_numpy(batch[:1]), [none], prep).shape == (0, 3, 64, 64)
    # garbage in the padding is never read (the ring's slots are not cleared between tasks)
    dirty = batch.copy()
    dirty[1, 55:], dirty[1, :, 100:] = 255, 7
    plan = crops_mod.plan_crops([np.array(rects), none, np.array(small_rects)], prep)
    torch.testing.assert_close(
        crops_mod.batched_crop_resize(torch.from_numpy(dirty), None, prep, bgr=True, plan=plan), made
    )
    # float16 matrix products (the GPU default): one intensity level at most, on a few per cent of pixels
    half = crops_mod.batched_crop_resize(torch.from_numpy(batch), None, prep, bgr=True, plan=plan, dtype=torch.float16)
    diff = (half - made).abs()
    assert half.dtype == torch.float32 and diff.max() <= 1 and 0 < (diff > 0).float().mean() < 0.1
    # float boxes: corners rounded half up, never empty, inside the image
    assert crop_box_pixels(np.array([1.5, 2.49, 2.5, 3.51]), 10, 10) == (2, 2, 3, 4)
    assert crop_box_pixels(np.array([9.7, 0.0, 10.0, 0.2]), 10, 10) == (9, 0, 10, 1)


def test_weights_sha256_definition():
    import hashlib

    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0]]))
        model.bias.fill_(0.5)
    ref = hashlib.sha256()
    for name, t in (("bias", model.bias), ("weight", model.weight)):  # names sorted
        ref.update(f"{name}|torch.float32|{tuple(t.shape)}|".encode() + t.detach().numpy().tobytes())
    assert extract_mod.weights_sha256(model) == ref.hexdigest()


def test_resize_weights_hand_values():
    t = lambda *v: torch.tensor(v)  # noqa: E731
    # length 4 -> 2, antialiased bilinear: scale 2, support 2, taps (j + 0.5 - c) / 2 -> 3/7, 3/7, 1/7
    w = crops_mod.resize_weights(t(0), t(4), t(2), t(0), 2, 4, "bilinear")[0]  # (2, 4)
    np.testing.assert_allclose(w.numpy(), [[3 / 7, 3 / 7, 1 / 7, 0], [0, 1 / 7, 3 / 7, 3 / 7]], rtol=1e-6)
    # the same crop at image offset 3 of a 9-px axis, keeping resized pixel 1 only
    w = crops_mod.resize_weights(t(3), t(4), t(2), t(1), 1, 9, "bilinear")[0]  # (1, 9)
    np.testing.assert_allclose(w.numpy(), [[0, 0, 0, 0, 1 / 7, 3 / 7, 3 / 7, 0, 0]], rtol=1e-6, atol=1e-7)
    # same length: the identity (bicubic taps at integer offsets are 1, 0, 0)
    w = crops_mod.resize_weights(t(0), t(5), t(5), t(0), 5, 5, "bicubic")[0]
    np.testing.assert_allclose(w.numpy(), np.eye(5), atol=1e-7)
    # against torch's antialiased interpolate along one axis (down, up, same size)
    x = torch.randn(1, 1, 64, 5, generator=torch.Generator().manual_seed(0))  # (1, 1, H, 5)
    for n_in, n_out in ((37, 11), (7, 19), (64, 64)):
        for mode in ("bicubic", "bilinear"):
            ref = torch.nn.functional.interpolate(x[:, :, :n_in], size=(n_out, 5), mode=mode, antialias=True)[0, 0]
            w = crops_mod.resize_weights(t(0), t(n_in), t(n_out), t(0), n_out, n_in, mode)[0]  # (n_out, n_in)
            np.testing.assert_allclose((w @ x[0, 0, :n_in]).numpy(), ref.numpy(), atol=1e-5, err_msg=f"{n_in}->{n_out}")


@pytest.mark.parametrize("backend", ["pil", "tensor", "batched"])
def test_batched_embeddings_match_open_clip_per_crop(data, clip, tmp_path, backend):
    records, props = data
    out = _extract(
        records, props, clip, tmp_path / "store", batch_size=7, resize_backend=backend
    )  # batches span images
    store = RegionStore.open(out)
    meta = store.metadata
    assert (meta["num_images"], meta["k"], meta["embed_dim"], meta["dataset"]) == (NUM_IMAGES, 5, 64, "toy")
    assert meta["proposals"]["kind"] == "file" and meta["clip"]["model"] == "ovd-tiny"
    assert meta["crop_preprocess"]["backend"] == backend
    assert not (out / PARTS_DIR).exists()
    source = FileProposals(props)
    cosines = []
    for rec in records:
        boxes, emb = store.lookup(rec.image_id)
        raw_boxes, raw_scores = source([rec])[0]
        expected, _ = select_top_k(clip_to_image(raw_boxes, rec.height, rec.width), raw_scores, nms_thresh=0.5, k=5)
        np.testing.assert_array_equal(boxes, expected)  # clipped, NMS'd, top 5, score order
        if rec.image_id == EMPTY_ID:
            assert boxes.shape == (0, 4) and emb.shape == (0, 64)
            continue
        assert len(boxes) > 0
        pil = Image.open(rec.file_name).convert("RGB")  # the reference: PIL crop -> open_clip preprocess
        crops = torch.stack([clip.preprocess(pil.crop(tuple(b.tolist()))) for b in boxes])
        ref = torch.nn.functional.normalize(clip.encode_images(crops), dim=1).numpy()  # (k, D)
        cosines += np.sum(ref * emb, axis=1).tolist()
    assert meta["num_regions"] == len(cosines) and meta["num_images_without_regions"] == 1
    assert min(cosines) >= 0.99, min(cosines)
    assert min(cosines) >= (0.999 if backend == "pil" else 0.99)  # pil: only fp16 storage rounding differs


def test_decode_buffers_give_the_queue_s_bytes(data, clip, tmp_path, monkeypatch, caplog):
    """Batched backend: workers decoding into the shared ring of slots (reused many times: 2 workers,
    one image per task, 6 slots) give the bytes of the DataLoader-queue path; tasks too large for a
    slot (a budget below the largest task) fall back to the queue within the same run."""
    records, props = data
    kw = {"batch_size": 2, "num_workers": 2, "resize_backend": "batched"}  # k=5 -> one image per task
    queue = _extract(records, props, clip, tmp_path / "queue", host_ring=False, **kw)
    made = []
    real_ring = io_mod.HostRing

    def spy(*args, **kwargs):
        made.append(real_ring(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(io_mod, "HostRing", spy)
    ring = _extract(records, props, clip, tmp_path / "ring", **kw)
    _same_bytes(queue, ring)
    sizes = sorted(r.height * r.width * 3 for r in records if r.image_id != EMPTY_ID)
    assert [(r.num_slots, r.slot_bytes, r.pinned) for r in made] == [(6, sizes[-1], False)]  # file boxes: one pool
    # a smaller slot budget: the 4 largest images go through the queue, the other 5 through the ring
    monkeypatch.setattr(io_mod, "_RING_BUDGET_BYTES", 6 * sizes[4])
    made.clear()
    with caplog.at_level("INFO", logger="ovd.distill.extract"):
        mixed = _extract(records, props, clip, tmp_path / "mixed", **kw)
    _same_bytes(queue, mixed)
    assert [r.slot_bytes for r in made] == [sizes[4]]
    assert "decode buffers 6 x 0.0 MB (page-locked: False), 4 tasks too large for them" in caplog.text
    # a /dev/shm too small for the buffers (Docker's default): everything goes through the queue
    monkeypatch.setattr(io_mod, "_shm_free_bytes", lambda: 11 * sizes[4])
    made.clear()
    with caplog.at_level("INFO", logger="ovd.distill.extract"):
        small = _extract(records, props, clip, tmp_path / "small_shm", **kw)
    _same_bytes(queue, small)
    assert made == [] and "too little for 0 MB of decode buffers" in caplog.text


def test_crop_dtype_float16_is_recorded_and_close(data, clip, tmp_path):
    records, props = data
    ref = RegionStore.open(_extract(records, props, clip, tmp_path / "f32", resize_backend="batched"))
    half = RegionStore.open(
        _extract(records, props, clip, tmp_path / "f16", resize_backend="batched", crop_dtype="float16")
    )
    assert ref.metadata["crop_preprocess"]["matmul_dtype"] == "float32"  # "auto" on a CPU
    assert half.metadata["crop_preprocess"]["matmul_dtype"] == "float16"
    assert content_key(ref.metadata) != content_key(half.metadata)  # a resumed run cannot mix the two
    for rec in records:
        a, b = ref.lookup(rec.image_id)[1].astype(np.float32), half.lookup(rec.image_id)[1].astype(np.float32)
        assert a.shape == b.shape and (a.size == 0 or (a * b).sum(axis=1).min() > 0.999)
    pil = RegionStore.open(_extract(records, props, clip, tmp_path / "pil", resize_backend="pil"))
    assert "matmul_dtype" not in pil.metadata["crop_preprocess"]  # only the batched backend has matrix products
    with pytest.raises(OVDError, match="unknown crop dtype 'bfloat16'") as info:
        _extract(records, props, clip, tmp_path / "bad", resize_backend="batched", crop_dtype="bfloat16")
    assert info.value.field == "crop_dtype"


def test_file_proposals_are_made_as_chunks_come_up(data, clip, tmp_path, monkeypatch):
    """File proposals (NMS per image) are made chunk by chunk while earlier chunks are encoded, not all
    before the first crop: with in-process loading the calls interleave with the part writes."""
    records, props = data
    events = []
    real_propose, real_write = extract_mod.propose_chunk, extract_mod.write_part

    def propose(chunk, *args, **kwargs):
        events.append(("propose", chunk.index))
        return real_propose(chunk, *args, **kwargs)

    def write(path, **kwargs):
        events.append(("write", kwargs["meta"]["part"]["chunk_index"]))
        return real_write(path, **kwargs)

    monkeypatch.setattr(extract_mod, "propose_chunk", propose)
    monkeypatch.setattr(extract_mod, "write_part", write)
    out = _extract(records, props, clip, tmp_path / "lazy", batch_size=10)  # chunks of 3 images, one image per task
    assert events == [(e, i) for i in range(4) for e in ("propose", "write")]
    monkeypatch.setattr(extract_mod, "propose_chunk", real_propose)
    monkeypatch.setattr(extract_mod, "write_part", real_write)
    _same_bytes(out, _extract(records, props, clip, tmp_path / "ref", batch_size=10))


@pytest.mark.parametrize("backend", ["pil", "batched"])
def test_bad_proposals_of_a_later_chunk_name_file_and_image(data, clip, tmp_path, backend):
    """Proposals are made while earlier chunks run: a bad one stops the run with an error naming the
    proposal file and the image, the finished chunks' parts stay, and a rerun resumes from them."""
    records, props = data

    class NanForImage107(FileProposals):
        def __call__(self, recs, images):
            out = super().__call__(recs, images)
            return [(b * np.nan if r.image_id == 107 else b, sc) for (b, sc), r in zip(out, recs, strict=True)]

    out = tmp_path / "store"
    with pytest.raises(OVDError, match=r"props.json: proposals of image 107 \(.*img7.png\): .*NaN") as info:
        _extract(records, NanForImage107(props), clip, out, num_workers=2, resize_backend=backend)
    assert info.value.path == str(props)
    parts = sorted(f.name for f in (out / PARTS_DIR).iterdir())
    assert parts == ["shard0-chunk0.npz", "shard0-chunk1.npz"]  # images 0-5; image 7 is in chunk 2
    _same_bytes(_extract(records, props, clip, out, resize_backend=backend, num_workers=2),
                _extract(records, props, clip, tmp_path / "ref", resize_backend=backend))  # fmt: skip


def test_host_ring_slots_wrap_around():
    ring = io_mod.HostRing(3, 24, torch.device("cpu"))
    for item in range(7):
        ring.view(item, (2, 2, 2, 3)).fill_(item)  # 24 bytes = one slot
    assert ring.buffer.view(3, 24)[:, 0].tolist() == [6, 4, 5]  # item i lives in slot i % 3
    assert ring.view(4, (2, 3)).tolist() == [[4] * 3] * 2
    ring.close()


def test_resume_after_interruption_is_byte_identical(data, clip, tmp_path, monkeypatch):
    records, props = data
    straight = _extract(records, props, clip, tmp_path / "straight")

    # kill the run right after its first chunk (3 images) is on disk
    real_write = extract_mod.write_part
    calls = []

    def write_then_die(*args, **kwargs):
        real_write(*args, **kwargs)
        calls.append(1)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(extract_mod, "write_part", write_then_die)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _extract(records, props, clip, out)
    assert sorted(p.name for p in (out / PARTS_DIR).iterdir()) == ["shard0-chunk0.npz"]
    assert not store_is_complete(out) and not (out / "embeddings.npy").exists()
    with pytest.raises(OVDError, match="incomplete region store"):
        RegionStore.open(out)
    # a different extraction may not reuse the parts
    monkeypatch.setattr(extract_mod, "write_part", real_write)
    with pytest.raises(OVDError, match=r"shard0-chunk0.npz: part was written by a different extraction \(k: "):
        _extract(records, props, clip, out, k=3)
    with pytest.raises(OVDError, match="chunk_size"):
        _extract(records, props, clip, out, chunk_size=4)
    with pytest.raises(OVDError, match="crop_preprocess"):
        _extract(records, props, clip, out, resize_backend="tensor")

    seen = _count_crops(monkeypatch)
    _extract(records, props, clip, out)
    first_chunk = sum(int(RegionStore.open(straight).lookup(r.image_id)[0].shape[0]) for r in records[:3])
    assert sum(seen) == RegionStore.open(straight).metadata["num_regions"] - first_chunk  # chunk 0 not redone
    _same_bytes(straight, out)
    assert content_key(RegionStore.open(out).metadata) == content_key(RegionStore.open(straight).metadata)

    # a finished store is not recomputed, and not overwritten by another extraction
    seen.clear()
    assert _extract(records, props, clip, out) == out and seen == []
    with pytest.raises(OVDError, match="holds a finished region store of a different extraction"):
        _extract(records, props, clip, out, nms_thresh=0.7)


def test_two_shards_then_merge_equal_one_run(data, clip, tmp_path):
    records, props = data
    single = _extract(records, props, clip, tmp_path / "single", chunk_size=5)
    out = tmp_path / "sharded"
    _extract(records, props, clip, out, chunk_size=5, num_shards=2, shard_index=1)
    assert not store_is_complete(out)  # shard 0 missing: no merge
    assert sorted(p.name for p in (out / PARTS_DIR).iterdir()) == ["shard1-chunk0.npz"]
    _extract(records, props, clip, out, chunk_size=5, num_shards=2, shard_index=0)  # last shard merges
    assert store_is_complete(out) and not (out / PARTS_DIR).exists()
    _same_bytes(single, out)  # same chunks -> same CLIP batches -> same bytes

    # chunks that do not line up change the CLIP batches only: same boxes, embeddings within fp16 rounding
    odd = tmp_path / "odd"
    for s in range(3):
        _extract(records, props, clip, odd, chunk_size=2, num_shards=3, shard_index=s)
    a, b = RegionStore.open(single), RegionStore.open(odd)
    for name in ("boxes.npy", "valid.npy", "image_ids.npy"):
        assert (single / name).read_bytes() == (odd / name).read_bytes()
    np.testing.assert_allclose(np.load(odd / "embeddings.npy"), np.load(single / "embeddings.npy"), atol=2e-3)
    assert a.metadata["num_regions"] == b.metadata["num_regions"]


class _HalfBoxes(ProposalSource):
    """A source that reads the pixels: two boxes per image, scored by the mean intensity under them."""

    needs_images = True
    images_per_call = 2

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.calls = 0
        self.fail_on_call = fail_on_call

    def __call__(self, records, images):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("proposer crashed")
        out = []
        for rec, img in zip(records, images, strict=True):
            assert img.shape == (rec.height, rec.width, 3) and img.dtype == np.uint8
            h, w = rec.height, rec.width
            boxes = np.array([[0, 0, w / 2, h / 2], [w / 4, h / 4, w, h]], dtype=np.float32)
            scores = np.array([img[: h // 2, : w // 2].mean(), img[h // 4 :, w // 4 :].mean()], dtype=np.float32)
            out.append((boxes, scores))
        return out

    def describe(self):
        return {"kind": "test-half-boxes", "path": "", "sha256": ""}


def test_source_that_needs_images_and_resumes(data, clip, tmp_path):
    records, _ = data
    out = tmp_path / "store"
    with pytest.raises(RuntimeError, match="proposer crashed"):  # 3rd call = the first images of chunk 1
        _extract(records, _HalfBoxes(fail_on_call=3), clip, out, chunk_size=4)
    assert [p.name for p in (out / PARTS_DIR).iterdir()] == ["shard0-chunk0.npz"]
    source = _HalfBoxes()
    _extract(records, source, clip, out, chunk_size=4)
    assert source.calls == 3  # images 4-9 in pairs; chunk 0 (images 0-3) was not proposed again
    store = RegionStore.open(out)
    rec = records[1]
    boxes, emb = store.lookup(rec.image_id)
    img = cv2.imread(rec.file_name)[:, :, ::-1]
    h, w = rec.height, rec.width
    halves = [[0, 0, w / 2, h / 2], [w / 4, h / 4, w, h]]
    order = [0, 1] if img[: h // 2, : w // 2].mean() >= img[h // 4 :, w // 4 :].mean() else [1, 0]
    np.testing.assert_allclose(boxes, np.array(halves, dtype=np.float32)[order])
    assert store.metadata["proposals"]["kind"] == "test-half-boxes" and emb.shape == (2, 64)


@pytest.mark.parametrize(("num_workers", "backend"), [(0, "pil"), (1, "pil"), (1, "batched")])
def test_unreadable_image_names_the_file(data, clip, tmp_path, num_workers, backend):
    records, props = data
    for name, content in (("broken.png", b"not an image"), ("broken.jpg", b"\xff\xd8\xff\xe0 truncated")):
        bad = tmp_path / name
        bad.write_bytes(content)
        broken = [*records[:4], ImageRecord(image_id=101, file_name=str(bad), height=50, width=60), *records[5:]]
        broken[1] = ImageRecord(image_id=999, file_name=records[1].file_name, height=1, width=1)  # no proposals
        out = tmp_path / f"s_{name}"
        with pytest.raises(OVDError, match=rf"{name}: cannot decode image") as info:
            _extract(broken, props, clip, out, num_workers=num_workers, chunk_size=10, resize_backend=backend)
        assert info.value.path == str(bad)
        assert not store_is_complete(out)
    # records[0] is a JPEG, records[1] a PNG
    for rec in records[:2]:
        wrong_size = [ImageRecord(image_id=rec.image_id, file_name=rec.file_name, height=300, width=400)]
        with pytest.raises(OVDError, match="but the annotation file says 300x400"):
            _extract(wrong_size, props, clip, tmp_path / f"t{rec.image_id}", resize_backend=backend)


def test_bad_arguments(data, clip, tmp_path):
    records, props = data
    with pytest.raises(OVDError, match="duplicate image ids"):
        _extract([records[0], records[0]], props, clip, tmp_path / "a")
    other = [ImageRecord(image_id=5, file_name=records[0].file_name, height=1, width=1)]
    with pytest.raises(OVDError, match="props.json: the proposal file has no entry for any image"):
        _extract(other, props, clip, tmp_path / "b")
    with pytest.raises(OVDError, match="invalid rank 2 for world size 2"):
        _extract(records, props, clip, tmp_path / "c", num_shards=2, shard_index=2)
    with pytest.raises(OVDError, match="batch_size must be >= 1"):
        _extract(records, props, clip, tmp_path / "d", batch_size=0)
    assert not any((tmp_path / d / META_FILE).exists() for d in "abcd")


def test_cli_sharded_extraction(data, tmp_path, monkeypatch, capsys):
    from ovd.data.catalog import DatasetInfo, register_dataset
    from ovd.utils.cli import run_cli

    records, props = data
    root = Path(records[0].file_name).parent
    images = [{"id": r.image_id, "file_name": Path(r.file_name).name, "height": r.height, "width": r.width}
              for r in records]  # fmt: skip
    ann = tmp_path / "toy.json"
    ann.write_text(json.dumps({"images": images, "annotations": [], "categories": [{"id": 1, "name": "thing"}]}))
    info = DatasetInfo(name="distill_toy", image_root=str(root), ann_file=str(ann), class_names=("thing",),
                       category_ids=(1,))  # fmt: skip
    register_dataset(info, overwrite=True)
    spec = util.spec_from_file_location("extract_tool", REPO / "tools/extract_region_embeddings.py")
    tool = util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "store"
    args = ["--dataset", "distill_toy", "--proposals", str(props), "--clip-model", "ovd-tiny", "--output", str(out)]
    args += ["--workers", "0", "--batch-size", "16", "--num-shards", "2", "--no-progress"]
    torch.manual_seed(0)  # random-init CLIP: both shards must build the same weights
    assert run_cli(tool.main, [*args, "--shard-index", "0"]) == 0
    assert not store_is_complete(out)
    assert run_cli(tool.main, ["--merge", "--output", str(out)]) == 2
    assert "1 of 2 parts missing" in capsys.readouterr().err
    torch.manual_seed(1)  # other random weights: the parts refuse to mix
    assert run_cli(tool.main, [*args, "--shard-index", "1"]) == 2
    assert "part comes from a different extraction" in capsys.readouterr().err
    assert run_cli(tool.main, ["--merge", "--output", str(out)]) == 2
    (out / PARTS_DIR / "shard1-chunk0.npz").unlink()
    torch.manual_seed(0)
    assert run_cli(tool.main, [*args, "--shard-index", "1"]) == 0
    store = RegionStore.open(out)
    assert len(store) == NUM_IMAGES and store.metadata["dataset"] == "distill_toy"
    assert run_cli(tool.main, ["--merge", "--output", str(out)]) == 0  # already complete
    assert run_cli(tool.main, [*args[:3], str(tmp_path / "none.json"), *args[4:], "--shard-index", "0"]) == 2
    assert "none.json: proposal source not found" in capsys.readouterr().err
