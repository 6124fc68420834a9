"""The training sources of a run: ``data.train`` or ``data.sources`` resolved into records, augmentation,
supervision and region stores, and the loader that samples them (single-source epochs or the
multi-source weighted sampler of METHOD §1.5)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from ovd.config import SUPERVISIONS, Config, SourceCfg
from ovd.data.catalog import DatasetInfo, get_dataset
from ovd.data.coco import load_dataset
from ovd.data.loader import DetectionDataset, build_train_loader, collate_list, seed_worker
from ovd.data.multi_source import MultiSourceBatchSampler, MultiSourceDataset
from ovd.data.transforms import ResizeFlipAugmentation
from ovd.engine import distributed as dist
from ovd.engine.bad_images import existing_images
from ovd.errors import OVDError
from ovd.structures import ImageRecord


def _region_store(path: str, dataset: str, records: list, field: str) -> Any:
    """The region store at ``path``, checked to cover every image of ``records``."""
    if not path:
        raise OVDError("model.distill.enabled needs a region store", field=field)
    from ovd.distill.store import RegionStore

    store = RegionStore.open(path)
    missing = store.missing([r.image_id for r in records])
    if len(missing):
        raise OVDError(
            f"{len(missing)} of {len(records)} training images have no stored regions (e.g. image ids "
            f"{list(missing[:5])}); was the store extracted for {dataset}?",
            path=path,
        )
    return store


@dataclass
class TrainSource:
    """A training source resolved from the config: its data, augmentation and supervision."""

    cfg: SourceCfg
    info: DatasetInfo
    records: list[ImageRecord]
    augmentation: ResizeFlipAugmentation
    regions: Any  # a RegionStore (a WeightedRegions with teacher-aware RKD), or None


def weight_regions(cfg: Config, sources: list[TrainSource], text: torch.Tensor, image_counts: Any) -> None:
    """Teacher-aware RKD (``model.distill.region_weighting`` / ``contradiction_iou``): give every source's
    store the weights of that setting, computed by rank 0 the first time and kept in the store."""
    from ovd.distill.region_weights import RegionWeighting, ensure_weighted_regions

    d = cfg.model.distill
    try:
        weighting = RegionWeighting(
            mode=d.region_weighting,
            temperature=d.weight_temperature,
            floor=d.weight_floor,
            contradiction_iou=d.contradiction_iou,
            contradiction_weight=d.contradiction_weight,
        )
    except OVDError as e:
        raise OVDError(e.reason, field="model.distill") from e
    if weighting.is_uniform:
        return
    # the contradiction filter trusts ground truth only: the boxes of box-supervised sources
    truth = {int(r.image_id): (r.boxes, r.labels) for s in sources if s.cfg.supervision == "box" for r in s.records}
    base = [c for c, n in enumerate(torch.as_tensor(image_counts).tolist()) if n > 0]
    stores = [s for s in sources if s.regions is not None]
    if dist.is_main_process():  # rank 0 computes and writes (sources sharing a store: once), then all read
        for src in stores:
            ensure_weighted_regions(src.regions.path, text, weighting, truth, base)
    dist.synchronize()
    for src in stores:
        src.regions = ensure_weighted_regions(src.regions.path, text, weighting, truth, base, write=False)


def train_sources(cfg: Config, world: int) -> list[TrainSource]:
    """The sources of ``data.sources``, or the single box source ``data.train`` when it is empty."""
    if not cfg.data.sources:
        if cfg.solver.ims_per_batch % world:
            raise OVDError(
                f"ims_per_batch={cfg.solver.ims_per_batch} is not divisible by {world} processes",
                field="solver.ims_per_batch",
            )
        specs = [
            SourceCfg(
                dataset=cfg.data.train,
                batch_size=cfg.solver.ims_per_batch // world,
                region_store=cfg.data.region_store,
            )
        ]
        region_field = "data.region_store"
    else:
        specs = list(cfg.data.sources)
        region_field = "data.sources[].region_store"
    out = []
    for i, spec in enumerate(specs):
        where = f"data.sources[{i}]" if cfg.data.sources else "data.train"
        if spec.supervision not in SUPERVISIONS:
            raise OVDError(
                f"unknown supervision {spec.supervision!r}; choose one of {', '.join(SUPERVISIONS)}",
                field=f"{where}.supervision",
            )
        info = get_dataset(spec.dataset)
        if spec.supervision == "pseudo" and info.ann_type != "pseudo":
            raise OVDError(
                f"supervision 'pseudo' needs a pseudo-label dataset (ann_type 'pseudo'); {spec.dataset!r} has "
                f"ann_type {info.ann_type!r} (make one with tools/generate_pseudo_labels.py)",
                field=f"{where}.supervision",
            )
        if spec.supervision == "box" and info.ann_type != "box":
            raise OVDError(f"{spec.dataset!r} has no boxes (ann_type {info.ann_type!r})", field=f"{where}.supervision")
        records = load_dataset(info)
        if not records:
            raise OVDError(f"training dataset {spec.dataset!r} has no images", field=f"{where}.dataset")
        if cfg.data.check_images:
            records = existing_images(cfg, spec.dataset, records, where)
        i_cfg = cfg.input
        augmentation = ResizeFlipAugmentation(
            tuple(spec.min_size or i_cfg.min_size_train),
            spec.max_size or i_cfg.max_size_train,
            sample_style=i_cfg.min_size_train_sampling,
            flip_prob=i_cfg.flip_prob,
        )  # type: ignore[arg-type]
        regions = None
        if cfg.model.distill.enabled:
            regions = _region_store(spec.region_store, spec.dataset, records, region_field)
        out.append(TrainSource(spec, info, records, augmentation, regions))
    names = out[0].info.class_names
    for src in out[1:]:
        if src.info.class_names != names:
            raise OVDError(
                f"training sources must share one class list: {src.cfg.dataset!r} differs from {out[0].cfg.dataset!r}",
                field="data.sources",
            )
    return out


def build_source_loader(cfg: Config, sources: list[TrainSource], start_iter: int) -> DataLoader:
    """The single-source epoch sampler, or the multi-source weighted sampler of ``data.sources``."""
    if not cfg.data.sources:
        src = sources[0]
        return build_train_loader(
            src.records,
            src.augmentation,
            batch_size=src.cfg.batch_size,
            seed=cfg.seed,
            num_workers=cfg.data.num_workers,
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            start_iter=start_iter,
            regions=src.regions,
            num_regions=cfg.model.distill.num_regions,
            size_per_batch=cfg.input.size_per_batch,
            skip_bad_images=cfg.data.bad_images == "skip",
        )
    from ovd.data.lvis import repeat_factors

    factors = [
        repeat_factors(s.records, s.info.num_classes, s.cfg.repeat_threshold) if s.cfg.repeat_threshold > 0 else None
        for s in sources
    ]
    sampler = MultiSourceBatchSampler(
        [s.records for s in sources],
        [s.cfg.ratio for s in sources],
        [s.cfg.batch_size for s in sources],
        seed=cfg.seed,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        start_iter=start_iter,
        repeat_factors=factors,
        size_per_batch=cfg.input.size_per_batch,
    )
    datasets = [
        DetectionDataset(
            s.records,
            s.augmentation,
            seed=cfg.seed,
            regions=s.regions,
            num_regions=cfg.model.distill.num_regions,
            skip_bad_images=cfg.data.bad_images == "skip",
        )
        for s in sources
    ]
    generator = torch.Generator()
    generator.manual_seed(cfg.seed)
    return DataLoader(
        MultiSourceDataset(datasets),
        batch_sampler=sampler,
        collate_fn=collate_list,
        num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.num_workers > 0,
        worker_init_fn=seed_worker,
        generator=generator,
    )
