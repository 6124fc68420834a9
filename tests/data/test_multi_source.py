"""Multi-source sampling (METHOD §1.5, §10.11)."""

import itertools

import numpy as np
import pytest

from ovd.data.multi_source import MultiSourceBatchSampler, item_weights, source_sample_weights
from ovd.errors import OVDError
from ovd.structures import ImageRecord


def records(n: int, portrait_every: int = 0) -> list[ImageRecord]:
    out = []
    for i in range(n):
        tall = portrait_every and i % portrait_every == 0
        out.append(
            ImageRecord(image_id=i, file_name=f"{i}.jpg", height=300 if tall else 200, width=200 if tall else 300)
        )
    return out


def test_sample_weights_hand_case() -> None:
    w = source_sample_weights([100, 400], [1, 4])
    assert np.allclose(w, [0.8, 0.8])
    assert np.allclose([w[0] * 100, w[1] * 400], [80, 320])  # dataset mass 1 : 4


def test_repeat_factors_keep_the_source_share() -> None:
    w = item_weights([2, 3], [1, 1], [None, np.array([1.0, 1.0, 4.0])])
    assert np.isclose(w[:2].sum(), w[2:].sum())
    assert np.isclose(w[4] / w[2], 4.0)


def test_proportions_and_never_mixed_batches() -> None:
    sources = [records(50, portrait_every=3), records(200)]
    sampler = MultiSourceBatchSampler(sources, [1, 4], [2, 8], seed=0)
    counts = np.zeros(2)
    for batch in itertools.islice(iter(sampler), 2000):
        src = {it.source for it in batch}
        assert len(src) == 1  # one source per batch
        s = src.pop()
        assert len(batch) == (2, 8)[s]
        aspects = {sources[s][it.index].width >= sources[s][it.index].height for it in batch}
        assert len(aspects) == 1  # one aspect group per batch
        counts[s] += len(batch)
    assert counts[1] / counts.sum() == pytest.approx(0.8, abs=0.02)  # images: 1 : 4
    # batches: box (1/5)/2 = 0.1 vs image (4/5)/8 = 0.1 per sample, so about half the steps each


def test_deterministic_and_resumable() -> None:
    sources = [records(30), records(40)]
    a = list(itertools.islice(iter(MultiSourceBatchSampler(sources, [1, 1], [2, 3], seed=5)), 40))
    b = list(itertools.islice(iter(MultiSourceBatchSampler(sources, [1, 1], [2, 3], seed=5)), 40))
    resumed = list(itertools.islice(iter(MultiSourceBatchSampler(sources, [1, 1], [2, 3], seed=5, start_iter=25)), 15))
    assert a == b and resumed == a[25:]
    other = list(itertools.islice(iter(MultiSourceBatchSampler(sources, [1, 1], [2, 3], seed=6)), 40))
    assert other != a


def test_ranks_split_the_global_stream() -> None:
    sources = [records(30), records(40)]
    one = MultiSourceBatchSampler(sources, [1, 3], [1, 1], seed=2, group_by_aspect=False)
    ranks = [MultiSourceBatchSampler(sources, [1, 3], [1, 1], seed=2, rank=r, world_size=2) for r in range(2)]
    glob = [b[0] for b in itertools.islice(iter(one), 100)]
    per_rank = [[b[0] for b in itertools.islice(iter(s), 50)] for s in ranks]
    interleaved = [x for pair in zip(*per_rank, strict=True) for x in pair]
    assert [(i.source, i.index) for i in interleaved] == [(i.source, i.index) for i in glob]
    assert interleaved == glob  # augmentation seeds too


def test_bad_arguments() -> None:
    with pytest.raises(OVDError, match="ratio"):
        MultiSourceBatchSampler([records(3), records(3)], [1], [1, 1], seed=0)
    with pytest.raises(OVDError, match="> 0"):
        source_sample_weights([3, 3], [1, 0])
    with pytest.raises(OVDError, match="at least one image"):
        source_sample_weights([3, 0], [1, 1])
    with pytest.raises(OVDError, match="batch size"):
        MultiSourceBatchSampler([records(3)], [1], [0], seed=0)


def test_size_per_batch_tags_every_item_with_its_batch_seed() -> None:
    sources = [records(30), records(40)]
    plain = list(itertools.islice(iter(MultiSourceBatchSampler(sources, [1, 1], [2, 3], seed=5)), 20))
    shared = list(
        itertools.islice(iter(MultiSourceBatchSampler(sources, [1, 1], [2, 3], seed=5, size_per_batch=True)), 20)
    )
    for a, b in zip(plain, shared, strict=True):
        assert all(it.size_seed == -1 for it in a)
        assert [it._replace(size_seed=-1) for it in b] == a
        assert {it.size_seed for it in b} == {a[0].seed}


def test_dataset_forwards_the_size_seed() -> None:
    from ovd.data.multi_source import MultiSourceDataset, SourceItem

    class Keys:
        def __getitem__(self, key):
            return {"key": key}

    ds = MultiSourceDataset([Keys(), Keys()])
    assert ds[SourceItem(1, 4, 77)] == {"key": (4, 77), "source": 1}
    assert ds[SourceItem(0, 2, 77, size_seed=5)] == {"key": (2, 77, 5), "source": 0}
