"""Training on several sources at once: weighted sampling and never-mixed batches (METHOD §1.5, §10.11).

A *source* is one training dataset with its own supervision (boxes, image labels, pseudo boxes),
sampling ratio, per-rank batch size and input sizes. The sampler draws items from the union of the
sources with per-item weights

    ``w_i = max_d(N_d) / N_{d(i)} · r_{d(i)} / Σ_d r_d``        (× the item's repeat factor, if any)

so that source ``d`` receives the share ``r_d / Σr`` of the items whatever its size. Items go into one
bucket per (source, aspect group); a bucket becomes a batch when it holds its source's batch size,
so a batch never mixes sources.

The global stream is drawn in chunks of :data:`CHUNK` items, chunk ``c`` from a generator seeded with
``(seed, c)``, identical on every rank; rank ``k`` of ``W`` takes positions ``k, k+W, k+2W, …``. The
stream is therefore deterministic, resumable (skip ``start_iter`` batches) and sharded without
communication. Each item carries its own augmentation seed derived from ``(seed, chunk, position)``
and, with one short side per batch (``size_per_batch``), its batch's first seed as ``size_seed``.

Shape shorthand: ``S`` sources, ``N`` items over all sources.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
from torch.utils.data import Dataset, Sampler

from ovd.data.sampling import aspect_groups, group_into_batches, sample_seed
from ovd.errors import OVDError
from ovd.structures import ImageRecord

CHUNK = 4096
"""Items drawn per chunk of the global stream (a fixed constant: the stream does not depend on it
being changed between runs, so changing it changes the data order)."""


class SourceItem(NamedTuple):
    """One drawn item: its source, its index inside that source and its augmentation seed; with one
    short side per batch, ``size_seed`` is the seed all items of its batch draw it from (-1: none)."""

    source: int
    index: int
    seed: int
    size_seed: int = -1


def source_sample_weights(sizes: Sequence[int], ratios: Sequence[float]) -> np.ndarray:
    """Per-item weight of each source, ``max(sizes) / size_d · r_d / Σr`` (METHOD §10.11).

    Args:
        sizes: items per source (each >= 1).
        ratios: sampling ratio per source (each > 0).

    Returns:
        ``float64[S]``: the weight of one item of source ``d``.
    """
    if len(sizes) != len(ratios) or not sizes:
        raise OVDError(f"need one ratio per source, got {len(sizes)} sources and {len(ratios)} ratios")
    if min(sizes) < 1:
        raise OVDError(f"every source needs at least one image, got sizes {list(sizes)}")
    if min(ratios) <= 0:
        raise OVDError(f"sampling ratios must be > 0, got {list(ratios)}", field="ratio")
    sizes_a = np.asarray(sizes, dtype=np.float64)
    ratios_a = np.asarray(ratios, dtype=np.float64)
    return sizes_a.max() / sizes_a * ratios_a / ratios_a.sum()


def item_weights(
    sizes: Sequence[int], ratios: Sequence[float], repeat_factors: Sequence[np.ndarray | None] | None = None
) -> np.ndarray:
    """``float64[N]`` sampling weights of all items, sources concatenated in order.

    A source's repeat factors (``float[N_d]``, e.g. LVIS repeat-factor sampling) are rescaled to mean
    1 inside the source and multiply its items' weights, so its total share stays ``r_d / Σr``.
    """
    per_source = source_sample_weights(sizes, ratios)
    parts = []
    for d, n in enumerate(sizes):
        w = np.full(n, per_source[d])
        factors = None if repeat_factors is None else repeat_factors[d]
        if factors is not None:
            f = np.asarray(factors, dtype=np.float64)
            if f.shape != (n,) or not np.all(f > 0):
                raise OVDError(f"source {d}: need {n} positive repeat factors, got shape {f.shape}")
            w = w * f / f.mean()
        parts.append(w)
    return np.concatenate(parts)


class MultiSourceBatchSampler(Sampler[list[SourceItem]]):
    """Infinite, deterministic, resumable, distributed batch sampler over several sources.

    Yields lists of :class:`SourceItem` from one (source, aspect group) bucket each; see the module
    docstring for the exact stream. Has no length.

    Args:
        sources: the records of each source (only ``width``/``height`` are read).
        ratios: sampling ratio per source.
        batch_sizes: images per batch on this rank, per source.
        seed: seed of the stream and of the augmentation seeds, shared by all ranks.
        rank, world_size: this process's shard of the global stream.
        start_iter: batches of this rank to skip (resume).
        repeat_factors: optional per-source ``float[N_d]`` repeat factors (``None`` = uniform).
        group_by_aspect: bucket by landscape/portrait inside each source.
        size_per_batch: one short side per batch (``size_seed`` = the batch's first item's seed).
    """

    def __init__(
        self,
        sources: Sequence[Sequence[ImageRecord]],
        ratios: Sequence[float],
        batch_sizes: Sequence[int],
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_iter: int = 0,
        repeat_factors: Sequence[np.ndarray | None] | None = None,
        group_by_aspect: bool = True,
        size_per_batch: bool = False,
    ) -> None:
        if len(batch_sizes) != len(sources) or min(batch_sizes, default=0) < 1:
            raise OVDError(f"need a batch size >= 1 per source, got {list(batch_sizes)}", field="batch_size")
        if seed < 0 or start_iter < 0:
            raise OVDError(f"seed and start_iter must be >= 0, got {seed}, {start_iter}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise OVDError(f"invalid rank {rank} for world size {world_size}")
        sizes = [len(s) for s in sources]
        weights = item_weights(sizes, ratios, repeat_factors)  # (N,)
        self.cdf = np.cumsum(weights / weights.sum())  # (N,)
        self.cdf[-1] = 1.0
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])  # (S+1,)
        self.groups = np.concatenate(
            [aspect_groups(s) if group_by_aspect else np.zeros(len(s), dtype=np.int64) for s in sources]
        )  # (N,)
        self.batch_sizes = [int(b) for b in batch_sizes]
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_iter = start_iter
        self.size_per_batch = size_per_batch

    def _stream(self) -> Iterator[SourceItem]:
        """This rank's items of the global stream, forever."""
        for chunk in itertools.count():
            u = np.random.default_rng((self.seed, chunk)).random(CHUNK)  # (CHUNK,)
            drawn = np.searchsorted(self.cdf, u, side="right").clip(max=len(self.cdf) - 1)  # (CHUNK,)
            for position in range(self.rank, CHUNK, self.world_size):
                flat = int(drawn[position])
                source = int(np.searchsorted(self.offsets, flat, side="right") - 1)
                yield SourceItem(source, flat - int(self.offsets[source]), sample_seed(self.seed, chunk, position))

    def item_batches(self) -> Iterator[list[SourceItem]]:
        """Batches from iteration 0 (ignores ``start_iter``)."""

        def key(it: SourceItem) -> tuple[int, int]:
            return it.source, int(self.groups[self.offsets[it.source] + it.index])

        return group_into_batches(self._stream(), key, lambda k: self.batch_sizes[k[0]])

    def __iter__(self) -> Iterator[list[SourceItem]]:
        for batch in itertools.islice(self.item_batches(), self.start_iter, None):
            yield [it._replace(size_seed=batch[0].seed) for it in batch] if self.size_per_batch else batch


class MultiSourceDataset(Dataset):
    """``dataset[SourceItem]`` → the item of that source's dataset, with ``"source"`` added.

    Args:
        datasets: one map-style dataset per source, each accepting ``(index, sample_seed)`` keys
            (e.g. :class:`ovd.data.loader.DetectionDataset` with the source's own augmentation).
    """

    def __init__(self, datasets: Sequence[Dataset]) -> None:
        self.datasets = list(datasets)

    def __getitem__(self, item: SourceItem) -> dict[str, Any]:
        key = (item.index, item.seed) if item.size_seed < 0 else (item.index, item.seed, item.size_seed)
        out = self.datasets[item.source][key]
        out["source"] = item.source
        return out

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)  # type: ignore[arg-type]
