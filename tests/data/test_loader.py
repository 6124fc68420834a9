"""Dataset decoding/augmentation, the deterministic grouped batch sampler, and test-loader sharding."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ovd.data.loader import DetectionDataset, build_test_loader, build_train_loader, collate_list
from ovd.data.sampling import (
    LANDSCAPE,
    PORTRAIT,
    GroupedBatchSampler,
    InferenceSampler,
    StreamItem,
    aspect_groups,
    epoch_permutation,
    group_into_batches,
    rank_index_stream,
    sample_seed,
    shard_range,
)
from ovd.data.transforms import ResizeFlipAugmentation
from ovd.errors import OVDError
from ovd.structures import ImageRecord

# --------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------


def _write_image(path: Path, h: int, w: int) -> np.ndarray:
    """Write a lossless BGR image whose left half is pure blue; returns the RGB array."""
    bgr = np.zeros((h, w, 3), dtype=np.uint8)
    bgr[:, : w // 2] = (255, 0, 0)  # blue in BGR
    bgr[:, w // 2 :] = (0, 0, 255)  # red in BGR
    assert cv2.imwrite(str(path), bgr)
    return bgr[:, :, ::-1].copy()


def _record(path: Path, h: int, w: int, boxes: list[list[float]], labels: list[int], **kw) -> ImageRecord:
    return ImageRecord(
        image_id=kw.pop("image_id", 7),
        file_name=str(path),
        height=h,
        width=w,
        boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.array(labels, dtype=np.int64),
        **kw,
    )


def test_dataset_returns_rgb_tensors_untransformed(tmp_path: Path) -> None:
    rgb = _write_image(tmp_path / "a.png", 20, 30)
    rec = _record(tmp_path / "a.png", 20, 30, [[1, 2, 11, 12], [0, 0, 30, 20]], [3, 1])
    # short side 20 == image short side: identity resize, no flip
    ds = DetectionDataset([rec], ResizeFlipAugmentation.for_test(20, 1333))
    out = ds[0]
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, 20, 30)
    np.testing.assert_array_equal(out["image"].permute(1, 2, 0).numpy(), rgb)
    assert out["image"][:, 0, 0].tolist() == [0, 0, 255]  # the blue half, in RGB order
    assert out["boxes"].dtype == torch.float32 and out["labels"].dtype == torch.int64
    np.testing.assert_array_equal(out["boxes"].numpy(), rec.boxes)
    assert out["labels"].tolist() == [3, 1]
    assert out["pos_labels"].dtype == torch.int64 and out["pos_labels"].shape == (0,)
    assert out["image_id"] == 7 and out["orig_size"] == (20, 30)
    assert out["ann_type"] == "box" and out["file_name"] == str(tmp_path / "a.png")
    assert (out["params"].out_h, out["params"].out_w, out["params"].flip) == (20, 30, False)


def test_dataset_resize_flip_and_degenerate_boxes(tmp_path: Path) -> None:
    _write_image(tmp_path / "a.png", 40, 40)
    # 40x40 -> 20x20 (scale 0.5), flipped:
    #   [0,0,1.5,1.5] -> [0,0,0.75,0.75] -> 0.75 px wide: dropped with its label 4
    #   [4,8,20,28]   -> [2,4,10,14] -> flipped [10,4,18,14]
    #   [38,0,60,10]  -> [19,0,30,5] -> flipped [-10,0,1,5] -> clipped [0,0,1,5]: exactly 1 px, kept
    rec = _record(tmp_path / "a.png", 40, 40, [[0, 0, 1.5, 1.5], [4, 8, 20, 28], [38, 0, 60, 10]], [4, 2, 0])
    ds = DetectionDataset([rec], ResizeFlipAugmentation((20,), 1333, flip_prob=1.0))
    out = ds[0]
    assert out["image"].shape == (3, 20, 20)
    np.testing.assert_array_equal(out["boxes"].numpy(), [[10, 4, 18, 14], [0, 0, 1, 5]])
    assert out["labels"].tolist() == [2, 0]
    # flipped: the left (blue, RGB [0,0,255]) half of the original is now on the right
    assert out["image"][:, 10, 19].tolist() == [0, 0, 255]
    assert out["image"][:, 10, 0].tolist() == [255, 0, 0]


def test_dataset_image_labels_and_sample_seed(tmp_path: Path) -> None:
    _write_image(tmp_path / "a.png", 16, 24)
    rec = _record(tmp_path / "a.png", 16, 24, [], [], pos_labels=np.array([5, 2]), ann_type="image")
    ds = DetectionDataset([rec], ResizeFlipAugmentation((8, 40), 100, sample_style="range"), seed=3)
    out = ds[(0, 12345)]
    assert out["pos_labels"].tolist() == [5, 2] and out["ann_type"] == "image"
    assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,)
    # the same (index, sample_seed) always gives the same augmentation; int keys use (seed, index)
    assert ds[(0, 12345)]["params"] == out["params"]
    assert ds[0]["params"] == ds[0]["params"]
    params = {ds[(0, s)]["params"] for s in range(20)}
    assert len(params) > 1  # different seeds draw different sizes/flips


def test_dataset_missing_corrupt_and_mismatched_images(tmp_path: Path) -> None:
    aug = ResizeFlipAugmentation.for_test(20, 1333)
    missing = tmp_path / "missing.jpg"
    with pytest.raises(OVDError, match="image file not found") as e:
        DetectionDataset([_record(missing, 20, 30, [], [])], aug)[0]
    assert str(missing) in str(e.value)

    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\x00garbage bytes, not a jpeg" * 10)
    with pytest.raises(OVDError, match="cannot decode image") as e:
        DetectionDataset([_record(corrupt, 20, 30, [], [])], aug)[0]
    assert str(corrupt) in str(e.value)

    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(OVDError, match="cannot decode image"):
        DetectionDataset([_record(empty, 20, 30, [], [])], aug)[0]

    _write_image(tmp_path / "a.png", 20, 30)
    with pytest.raises(OVDError, match=r"decoded image is 20x30 .* says 30x20") as e:
        DetectionDataset([_record(tmp_path / "a.png", 30, 20, [], [])], aug)[0]
    assert "a.png" in str(e.value)


def test_collate_list_keeps_dicts() -> None:
    batch = [{"a": 1}, {"a": 2}]
    assert collate_list(batch) == batch


# --------------------------------------------------------------------------------------------------
# Sampler pieces
# --------------------------------------------------------------------------------------------------


def _records(sizes: list[tuple[int, int]]) -> list[ImageRecord]:
    return [ImageRecord(image_id=i, file_name=f"{i}.jpg", height=h, width=w) for i, (h, w) in enumerate(sizes)]


# 23 images: landscape (w >= h, squares included) and portrait, interleaved
SIZES = [(480, 640), (640, 480), (500, 500), (300, 200), (100, 400)] * 4 + [(10, 20), (20, 10), (5, 5)]
RECORDS = _records(SIZES)


def test_aspect_groups() -> None:
    assert aspect_groups(RECORDS[:5]).tolist() == [LANDSCAPE, PORTRAIT, LANDSCAPE, PORTRAIT, LANDSCAPE]
    assert aspect_groups([]).shape == (0,)


def test_epoch_permutation_is_a_deterministic_permutation() -> None:
    p = epoch_permutation(23, seed=5, epoch=2)
    assert sorted(p.tolist()) == list(range(23))
    assert p.tolist() == epoch_permutation(23, seed=5, epoch=2).tolist()
    assert p.tolist() != epoch_permutation(23, seed=5, epoch=3).tolist()


def test_group_into_batches_hand_case() -> None:
    stream = ["a1", "b1", "a2", "b2", "a3", "b3", "a4", "b4", "b5"]
    # bucket "a" emits at 2 items, bucket "b" at 3; leftovers ("b4", "b5") are never emitted
    out = list(group_into_batches(stream, key=lambda s: s[0], batch_size=lambda k: {"a": 2, "b": 3}[k]))
    assert out == [["a1", "a2"], ["b1", "b2", "b3"], ["a3", "a4"]]
    assert list(group_into_batches([], key=lambda s: s, batch_size=2)) == []


def test_rank_streams_partition_each_epoch() -> None:
    n = 23
    one = list(itertools.islice(rank_index_stream(n, seed=1), 2 * n))
    assert [it.index for it in one[:n]] == epoch_permutation(n, 1, 0).tolist()
    assert {it.epoch for it in one[n:]} == {1}
    r0 = [it for it in itertools.islice(rank_index_stream(n, seed=1, rank=0, world_size=2), 12)]
    r1 = [it for it in itertools.islice(rank_index_stream(n, seed=1, rank=1, world_size=2), 11)]
    assert all(it.epoch == 0 for it in r0 + r1)
    assert {it.position for it in r0} == set(range(0, n, 2)) and {it.position for it in r1} == set(range(1, n, 2))
    i0, i1 = {it.index for it in r0}, {it.index for it in r1}
    assert not i0 & i1 and i0 | i1 == set(range(n))


def test_sample_seed() -> None:
    assert sample_seed(1, 2, 3) == sample_seed(1, 2, 3)
    seeds = {sample_seed(0, e, p) for e in range(3) for p in range(50)}
    assert len(seeds) == 150
    assert all(0 <= s < 2**63 for s in seeds)


# --------------------------------------------------------------------------------------------------
# GroupedBatchSampler
# --------------------------------------------------------------------------------------------------


def _take(sampler: GroupedBatchSampler, n: int) -> list:
    return list(itertools.islice(iter(sampler), n))


def test_sampler_is_deterministic() -> None:
    a = _take(GroupedBatchSampler(RECORDS, 3, seed=4), 30)
    b = _take(GroupedBatchSampler(RECORDS, 3, seed=4), 30)
    assert a == b
    assert a != _take(GroupedBatchSampler(RECORDS, 3, seed=5), 30)
    # iterating the same sampler twice restarts the same stream
    s = GroupedBatchSampler(RECORDS, 3, seed=4)
    assert _take(s, 10) == _take(s, 10)


def test_sampler_batches_never_mix_aspect_groups() -> None:
    groups = aspect_groups(RECORDS)
    for batch in _take(GroupedBatchSampler(RECORDS, 4, seed=0, world_size=2, rank=1), 50):
        assert len(batch) == 4
        assert len({groups[i] for i, _ in batch}) == 1


def _epoch0_items(sampler: GroupedBatchSampler, n_batches: int) -> list[StreamItem]:
    items = [it for batch in itertools.islice(sampler.item_batches(), n_batches) for it in batch]
    return [it for it in items if it.epoch == 0]


def test_sampler_every_index_once_per_epoch() -> None:
    # 60 batches x 3 = 180 items ~ 7.8 epochs: every epoch-0 item has long left its bucket
    items = _epoch0_items(GroupedBatchSampler(RECORDS, 3, seed=2), 60)
    assert sorted(it.index for it in items) == list(range(len(RECORDS)))
    # without grouping and a batch size dividing N, the first epoch is exactly the permutation
    s = GroupedBatchSampler(RECORDS[:21], 7, seed=2, group_by_aspect=False)
    flat = [i for batch in _take(s, 3) for i, _ in batch]
    assert flat == epoch_permutation(21, 2, 0).tolist()


def test_sampler_two_ranks_cover_one_rank_without_overlap() -> None:
    r0 = _epoch0_items(GroupedBatchSampler(RECORDS, 2, seed=9, rank=0, world_size=2), 40)
    r1 = _epoch0_items(GroupedBatchSampler(RECORDS, 2, seed=9, rank=1, world_size=2), 40)
    one = _epoch0_items(GroupedBatchSampler(RECORDS, 2, seed=9), 80)
    i0, i1 = [it.index for it in r0], [it.index for it in r1]
    assert not set(i0) & set(i1)
    assert sorted(i0 + i1) == sorted(it.index for it in one) == list(range(len(RECORDS)))
    # an item's augmentation seed depends on its global (epoch, position), not on the rank layout
    seeds_one = {(it.epoch, it.position): sample_seed(9, it.epoch, it.position) for it in one}
    b0 = _take(GroupedBatchSampler(RECORDS, 2, seed=9, rank=0, world_size=2), 40)
    by_index = {}
    item_batches = GroupedBatchSampler(RECORDS, 2, seed=9, rank=0, world_size=2).item_batches()
    for batch, items in zip(b0, itertools.islice(item_batches, 40), strict=True):
        for (idx, s), it in zip(batch, items, strict=True):
            assert idx == it.index
            by_index[(it.epoch, it.position)] = s
    shared = set(seeds_one) & set(by_index)
    assert shared and all(seeds_one[k] == by_index[k] for k in shared)


@pytest.mark.parametrize("k", [0, 1, 7, 25])
def test_sampler_start_iter_resumes_exact_stream(k: int) -> None:
    full = _take(GroupedBatchSampler(RECORDS, 3, seed=11, rank=1, world_size=2), k + 10)
    resumed = _take(GroupedBatchSampler(RECORDS, 3, seed=11, rank=1, world_size=2, start_iter=k), 10)
    assert resumed == full[k:]


def test_sampler_validation() -> None:
    with pytest.raises(OVDError, match="empty"):
        GroupedBatchSampler([], 2, seed=0)
    with pytest.raises(OVDError, match="rank"):
        GroupedBatchSampler(RECORDS, 2, seed=0, rank=2, world_size=2)
    with pytest.raises(OVDError, match="batch_size"):
        GroupedBatchSampler(RECORDS, 0, seed=0)
    with pytest.raises(OVDError, match="cannot be shared"):
        GroupedBatchSampler(RECORDS[:2], 1, seed=0, rank=0, world_size=3)


# --------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------


def _image_records(tmp_path: Path, sizes: list[tuple[int, int]]) -> list[ImageRecord]:
    recs = []
    for i, (h, w) in enumerate(sizes):
        path = tmp_path / f"{i}.png"
        _write_image(path, h, w)
        recs.append(_record(path, h, w, [[1, 1, w - 1, h - 1]], [i % 3], image_id=100 + i))
    return recs


def _summary(batches: list[list[dict]]) -> list[list[tuple]]:
    return [[(d["image_id"], d["params"], d["boxes"].tolist()) for d in b] for b in batches]


def test_train_loader_deterministic_across_workers(tmp_path: Path) -> None:
    recs = _image_records(tmp_path, [(16, 24), (24, 16), (20, 20), (12, 30), (30, 12), (16, 16)])
    aug = ResizeFlipAugmentation((8, 12, 16), 40)
    kw = {"batch_size": 2, "seed": 3}
    l0 = build_train_loader(recs, aug, num_workers=0, **kw)
    b0 = list(itertools.islice(iter(l0), 6))
    groups = aspect_groups(recs)
    for batch in b0:
        assert isinstance(batch, list) and len(batch) == 2
        assert len({groups[d["image_id"] - 100] for d in batch}) == 1
    l2 = build_train_loader(recs, aug, num_workers=2, **kw)
    it2 = iter(l2)
    b2 = list(itertools.islice(it2, 6))
    del it2, l2
    assert _summary(b2) == _summary(b0)
    resumed = list(itertools.islice(iter(build_train_loader(recs, aug, num_workers=0, start_iter=4, **kw)), 2))
    assert _summary(resumed) == _summary(b0[4:6])


def test_shard_range_hand_case() -> None:
    # 7 items on 3 ranks: sizes 3, 2, 2
    assert [list(shard_range(7, r, 3)) for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [len(shard_range(2, r, 3)) for r in range(3)] == [1, 1, 0]
    assert list(shard_range(0, 0, 1)) == []


@pytest.mark.parametrize(("n", "world_size"), [(7, 3), (2, 3), (5, 1), (6, 2)])
def test_inference_sampler_covers_each_index_once(n: int, world_size: int) -> None:
    seen = [i for r in range(world_size) for i in InferenceSampler(n, rank=r, world_size=world_size)]
    assert seen == list(range(n))  # contiguous shards in rank order: each index exactly once, in order
    assert sum(len(InferenceSampler(n, rank=r, world_size=world_size)) for r in range(world_size)) == n


def test_test_loader_sharding(tmp_path: Path) -> None:
    recs = _image_records(tmp_path, [(16, 24), (24, 16), (20, 20), (12, 30), (30, 12)])
    aug = ResizeFlipAugmentation.for_test(16, 40)
    ids = Counter()
    for rank in range(2):
        for batch in build_test_loader(recs, aug, batch_size=2, rank=rank, world_size=2):
            assert isinstance(batch, list)
            for d in batch:
                ids[d["image_id"]] += 1
                assert not d["params"].flip
    assert ids == Counter({100 + i: 1 for i in range(5)})


def test_size_per_batch_shares_one_short_side_per_batch(tmp_path: Path) -> None:
    recs = _image_records(tmp_path, [(20, 20)] * 12)
    aug = ResizeFlipAugmentation((8, 40), 100, sample_style="range")
    kw = {"batch_size": 4, "seed": 2, "num_workers": 0}
    per_image = list(itertools.islice(iter(build_train_loader(recs, aug, **kw)), 30))
    per_batch = list(itertools.islice(iter(build_train_loader(recs, aug, size_per_batch=True, **kw)), 30))
    # per image (detectron2): the short sides of a batch differ; per batch: one short side each
    assert any(len({d["params"].out_h for d in b}) > 1 for b in per_image)
    assert all(len({d["params"].out_h for d in b}) == 1 for b in per_batch)
    sides = [b[0]["params"].out_h for b in per_batch]
    assert len(set(sides)) > 5 and min(sides) >= 8 and max(sides) <= 40  # still drawn from the range
    # the data order and each image's flip (its own seed) are those of per-image sampling
    assert [[d["image_id"] for d in b] for b in per_batch] == [[d["image_id"] for d in b] for b in per_image]
    assert [[d["params"].flip for d in b] for b in per_batch] == [[d["params"].flip for d in b] for b in per_image]
    # resuming replays the same batch sizes
    resumed = list(itertools.islice(iter(build_train_loader(recs, aug, size_per_batch=True, start_iter=10, **kw)), 5))
    assert _summary(resumed) == _summary(per_batch[10:15])


def test_size_per_batch_sampler_keys() -> None:
    plain = _take(GroupedBatchSampler(RECORDS, 3, seed=4), 12)
    shared = _take(GroupedBatchSampler(RECORDS, 3, seed=4, size_per_batch=True), 12)
    for a, b in zip(plain, shared, strict=True):
        assert [k[:2] for k in b] == a  # same items and item seeds
        assert {k[2] for k in b} == {a[0][1]}  # the batch's first seed, on every item
