"""The order of the data: deterministic, resumable, distributed samplers of image indices.

Training data order is a pure function of ``(seed, rank, world_size)``:

1. :func:`epoch_permutation`: epoch ``e`` is a permutation of all indices drawn from
   ``np.random.default_rng((seed, e))`` (shared by every rank).
2. :func:`rank_index_stream`: rank ``r`` takes every ``world_size``-th element, epoch after epoch.
3. :func:`group_into_batches`: items go into buckets (landscape / portrait); a bucket is emitted as
   a batch when it holds ``batch_size`` items (detectron2 ``AspectRatioGroupedDataset``, but on
   indices, so it is deterministic and nothing is decoded).
4. Each emitted item gets a ``sample_seed`` derived from ``(seed, epoch, position)``
   (:func:`sample_seed`) that seeds its augmentation, whichever worker decodes it. With one short
   side per batch (``size_per_batch``), the items of a batch also carry the batch's first seed,
   from which each draws the same short side (:func:`short_side_rng`): no image is padded up to a
   larger one of its batch.

Resuming at iteration ``k`` (``start_iter=k``) replays steps 1-3 on indices only and drops the
first ``k`` batches, so the data order continues exactly. The pieces are separate functions so a
multi-source sampler (METHOD §1.5: one bucket per (source, aspect), per-source batch sizes) can
reuse them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import NamedTuple, TypeVar

import numpy as np
from torch.utils.data import Sampler

from ovd.errors import OVDError
from ovd.structures import ImageRecord

# Bucket keys of aspect grouping (detectron2 AspectRatioGroupedDataset: w > h vs. the rest; here a
# square image counts as landscape, as the issue specifies ``width >= height``).
LANDSCAPE, PORTRAIT = 0, 1

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)


class StreamItem(NamedTuple):
    """One element of a rank's index stream.

    Attributes:
        index: record index.
        epoch: epoch of the global stream it comes from.
        position: its position in that epoch's global permutation (the same on every rank).
    """

    index: int
    epoch: int
    position: int


def epoch_permutation(num_items: int, seed: int, epoch: int) -> np.ndarray:
    """The global order of epoch ``epoch``: ``int64[num_items]``, identical on every rank."""
    return np.random.default_rng((seed, epoch)).permutation(num_items)


def rank_index_stream(
    num_items: int, *, seed: int, rank: int = 0, world_size: int = 1, start_epoch: int = 0
) -> Iterator[StreamItem]:
    """Infinite stream of this rank's items: every ``world_size``-th element of each epoch.

    Over one epoch the ranks' items are disjoint and together cover ``0..num_items-1`` once.
    """
    _check_rank(rank, world_size)
    if num_items < world_size:
        raise OVDError(f"{num_items} images cannot be shared by {world_size} ranks")
    for epoch in itertools.count(start_epoch):
        perm = epoch_permutation(num_items, seed, epoch)
        for position in range(rank, num_items, world_size):
            yield StreamItem(int(perm[position]), epoch, position)


def group_into_batches(
    stream: Iterable[T], key: Callable[[T], K], batch_size: int | Callable[[K], int]
) -> Iterator[list[T]]:
    """Bucket a stream by ``key(item)``; yield a bucket as a batch when it is full.

    Args:
        stream: items, in order.
        key: bucket of an item (e.g. aspect group, or ``(source, aspect)`` for multi-source).
        batch_size: items per batch, or a function of the bucket key (per-source batch sizes).

    Yields:
        Lists of items from one bucket each, in the order they became full. Items left in
        unfilled buckets when a finite stream ends are dropped.
    """
    size_of = (lambda _k: batch_size) if isinstance(batch_size, int) else batch_size
    buckets: dict[K, list[T]] = {}
    for item in stream:
        k = key(item)
        bucket = buckets.setdefault(k, [])
        bucket.append(item)
        if len(bucket) >= size_of(k):
            yield bucket
            buckets[k] = []


def aspect_groups(records: Sequence[ImageRecord]) -> np.ndarray:
    """``int64[len(records)]``: :data:`LANDSCAPE` if ``width >= height`` else :data:`PORTRAIT`."""
    return np.array([LANDSCAPE if r.width >= r.height else PORTRAIT for r in records], dtype=np.int64)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """Augmentation seed of the item at ``position`` of epoch ``epoch`` (a 63-bit int)."""
    state = np.random.SeedSequence((seed, epoch, position)).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def short_side_rng(size_seed: int) -> np.random.Generator:
    """The generator of a batch's shared short side (a stream distinct from the items' own)."""
    return np.random.default_rng((size_seed, 1))


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise OVDError(f"invalid rank {rank} for world size {world_size}")


class GroupedBatchSampler(Sampler[list[tuple[int, ...]]]):
    """Infinite, deterministic, resumable, distributed batch sampler.

    Yields batches ``[(index, sample_seed), ...]`` of ``batch_size`` items from one aspect group
    (see the module docstring for the exact stream), or ``[(index, sample_seed, size_seed), ...]``
    with ``size_per_batch``. Has no length.

    Args:
        records: the images (only ``width``/``height`` are read).
        batch_size: images per batch on this rank.
        seed: seed of the data order and of the augmentation seeds; shared by all ranks.
        rank, world_size: this process's shard of the global stream.
        start_iter: number of batches of this rank to skip (resume).
        group_by_aspect: bucket by landscape/portrait; if False every item goes into one bucket.
        size_per_batch: give the items of a batch one short side (their first item's seed as
            ``size_seed``); the data order and each item's ``sample_seed`` do not change.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_iter: int = 0,
        group_by_aspect: bool = True,
        size_per_batch: bool = False,
    ):
        if not records:
            raise OVDError("cannot sample training batches from an empty dataset")
        if batch_size < 1:
            raise OVDError(f"batch_size must be >= 1, got {batch_size}", field="batch_size")
        if seed < 0:
            raise OVDError(f"seed must be >= 0, got {seed}", field="seed")
        if start_iter < 0:
            raise OVDError(f"start_iter must be >= 0, got {start_iter}", field="start_iter")
        _check_rank(rank, world_size)
        if len(records) < world_size:
            raise OVDError(f"{len(records)} images cannot be shared by {world_size} ranks")
        self.num_items = len(records)
        self.groups = aspect_groups(records) if group_by_aspect else np.zeros(len(records), dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_iter = start_iter
        self.size_per_batch = size_per_batch

    def item_batches(self) -> Iterator[list[StreamItem]]:
        """Batches of :class:`StreamItem` (with epoch and position), from iteration 0."""
        stream = rank_index_stream(self.num_items, seed=self.seed, rank=self.rank, world_size=self.world_size)
        return group_into_batches(stream, lambda it: int(self.groups[it.index]), self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, ...]]]:
        for batch in itertools.islice(self.item_batches(), self.start_iter, None):
            keys = [(it.index, sample_seed(self.seed, it.epoch, it.position)) for it in batch]
            yield [(*k, keys[0][1]) for k in keys] if self.size_per_batch else keys


def shard_range(num_items: int, rank: int, world_size: int) -> range:
    """Contiguous shard of ``rank``; shard sizes differ by at most one and cover every index once."""
    _check_rank(rank, world_size)
    base, extra = divmod(num_items, world_size)
    begin = rank * base + min(rank, extra)
    return range(begin, begin + base + (rank < extra))


class InferenceSampler(Sampler[int]):
    """Indices of this rank's contiguous shard, in order (no shuffling, no padding)."""

    def __init__(self, num_items: int, *, rank: int = 0, world_size: int = 1):
        self.indices = shard_range(num_items, rank, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
