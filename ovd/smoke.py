"""Smoke runs of a real recipe: every stage, on a few dozen images, for a few iterations, at a small size.

``tools/run_pipeline.py ... --smoke`` checks a new dataset end to end on a CPU in minutes before the
long GPU run: each dataset the stages read is cut to its first ``N`` images (subset files under
``<output>/smoke/data``, registered in place of the catalog entries in this process; caption files are
cut too, so the caption-tag step runs on them), every stage trains :data:`SMOKE_ITERS` iterations at a
short side of :data:`SMOKE_SIZE` px with one image per source batch, and region stores are the
pipeline's own (under the output folder, never a store a recipe names under ``$OVD_DATASETS``, which
a full run will fill). The model, CLIP and their weights are the recipe's: a smoke run checks that they
load. The pseudo-label threshold is 0, so that every label gets a box whatever the weights.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from ovd.data.catalog import DatasetInfo, get_dataset, register_dataset
from ovd.utils.io import read_json, write_json

logger = logging.getLogger(__name__)

SMOKE_IMAGES = 24  # images per dataset
SMOKE_SIZE = 128  # training and test short side, px
SMOKE_MAX_SIZE = 213  # long-side cap, px
SMOKE_ITERS = 2


def smoke_overrides() -> list[str]:
    """Recipe overrides of a smoke run (applied to every stage before the command line's own)."""
    size, cap = SMOKE_SIZE, SMOKE_MAX_SIZE
    return [
        f"solver.max_iter={SMOKE_ITERS}",
        "solver.warmup_iters=1",
        "solver.steps=[1]",
        "solver.ims_per_batch=2",
        f"input.min_size_train=[{size}]",
        "input.min_size_train_sampling=choice",
        f"input.max_size_train={cap}",
        f"input.min_size_test={size}",
        f"input.max_size_test={cap}",
        f"data.sources[*].min_size=[{size}]",
        f"data.sources[*].max_size={cap}",
        "data.sources[*].batch_size=1",
        "data.num_workers=0",
        "model.roi_heads.detections_per_image=20",  # fast evaluation (LVIS: 300 masks per image)
        "data.region_store=",
        "data.sources[*].region_store=",
    ]


def tiny_model_overrides() -> list[str]:
    """A random-init tiny FPN detector and CLIP (``--smoke-tiny``): a smoke run without any weights (tests, CI)."""
    return [
        "model.backbone.name=tiny_fpn",
        "model.backbone.weights=",
        "model.backbone.norm=gn",
        "model.backbone.freeze_at=0",
        "model.backbone.fpn_channels=64",
        "model.backbone.fpn_min_level=3",
        "model.backbone.tiny_widths=[16,32,64,128]",
        "model.rpn.anchor_sizes=[[16],[32],[64],[128]]",
        "model.roi_heads.pooler_resolution=7",
        "model.roi_heads.canonical_box_size=64",
        "model.roi_heads.fc_dim=256",
        "model.mask.conv_dim=64",
        "model.mask.num_conv=2",
        "clip.model=ovd-tiny-cnn",
        "clip.pretrained=",
        "clip.embeddings=",
    ]


def _subset(data: dict[str, Any], n: int) -> dict[str, Any]:
    """The first ``n`` images of a COCO-style file, their annotations and every other top-level entry."""
    images = list(data.get("images") or [])[:n]
    ids = {img.get("id") for img in images}
    out = {**data, "images": images}
    if isinstance(data.get("annotations"), list):
        out["annotations"] = [a for a in data["annotations"] if a.get("image_id") in ids]
    return out


@contextlib.contextmanager
def register_subsets(names: Iterable[str], folder: Path, n: int = SMOKE_IMAGES) -> Iterator[dict[str, int]]:
    """Register each catalog dataset of ``names`` as its first ``n`` images (files written to ``folder``)
    while the context lasts (the former entries come back at its end).

    An entry whose file is made from captions (``extra["captions"]``) gets a cut captions file and a tag
    file to be made there. Yields ``{name: images kept}`` (caption entries: captioned images kept).
    """
    folder.mkdir(parents=True, exist_ok=True)
    kept: dict[str, int] = {}
    former: list[DatasetInfo] = []
    try:
        for name in names:
            former.append(get_dataset(name))  # generates a built-in world first
            kept[name] = _register_subset(former[-1], folder, n)
        logger.info("smoke run: %s", ", ".join(f"{k} {v} images" for k, v in kept.items()))
        yield kept
    finally:
        for info in former:
            register_dataset(info, overwrite=True)


def _register_subset(info: DatasetInfo, folder: Path, n: int) -> int:
    """Register ``info``'s first ``n`` images in its place; returns how many were kept."""
    ann = (folder / f"{info.name}.json").resolve()
    extra = dict(info.extra)
    if info.ann_type == "image" and "captions" in info.extra:
        captions = _subset(read_json(info.resolve(info.extra["captions"])), n)
        path = (folder / f"{info.name}_captions.json").resolve()
        write_json(path, captions, indent=None)
        extra["captions"] = str(path)
        ann.unlink(missing_ok=True)  # the caption-tag step makes it
        count = len(captions["images"])
    else:
        data = _subset(read_json(info.ann_file_path), n)
        write_json(ann, data, indent=None)
        count = len(data["images"])
    root = str(info.image_root_path.resolve())
    register_dataset(replace(info, ann_file=str(ann), image_root=root, extra=extra, prepare=None), overwrite=True)
    return count
