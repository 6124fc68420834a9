"""Pre-flight check: every input any stage will read, checked in seconds before the first stage trains.

:func:`preflight` returns every problem found (not just the first): annotation files that are missing,
do not parse or do not match their catalog entry (categories outside its vocabulary); images that do
not exist (a stat of every listed image) or do not decode to the annotated size (a sample); captions
files the caption-tag step reads; region stores a distilling recipe reads (unless the run makes
them); CLIP models and weights, backbone ImageNet weights and proposal files that do not resolve;
precomputed text embeddings of the wrong shape; output folders that are not writable or lack the free
space the region stores will take (estimated as ``N x K x (16 + 2 D + 1)`` bytes plus 8 per image);
a CUDA device asked for on a machine without one. :class:`PreflightError` lists them all on one line.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ovd.config import Config
from ovd.data.catalog import DatasetInfo, get_dataset
from ovd.errors import OVDError

logger = logging.getLogger(__name__)

DECODE_SAMPLE = 8  # images decoded per dataset (first, last and evenly spaced)


class PreflightError(OVDError):
    """The pre-flight check found problems; ``problems`` lists them."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(dict.fromkeys(problems))  # stages sharing a setting report it once
        listed = " | ".join(f"({i + 1}) {p}" for i, p in enumerate(self.problems))
        super().__init__(f"pre-flight check: {len(self.problems)} problem(s), nothing was trained: {listed}")


@dataclass
class StoreNeed:
    """A region store a run will write: where, the datasets whose images it holds, K regions each."""

    path: Path
    datasets: tuple[str, ...]
    k: int


@dataclass
class PreflightReport:
    problems: list[str] = field(default_factory=list)
    images: dict[str, int] = field(default_factory=dict)  # dataset -> images listed
    store_bytes: dict[str, int] = field(default_factory=dict)  # store path -> estimated size
    seconds: float = 0.0


def region_store_bytes(num_images: int, k: int, dim: int) -> int:
    """Size of a region store: float32 boxes, float16 embeddings, bool valid per slot, int64 id per image."""
    return num_images * (k * (4 * 4 + 2 * dim + 1) + 8)


def _decode(path: str, width: int, height: int) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            size = im.size
    except Exception as e:  # any decoder failure is a finding
        return f"{path}: cannot decode ({type(e).__name__}: {e})"
    if size != (width, height):
        return f"{path}: decodes to {size[0]}x{size[1]}, the annotation says {width}x{height}"
    return None


def _check_dataset(info: DatasetInfo, report: PreflightReport, sample: int) -> set[int]:
    """Parse the annotation file and check the images; returns the image ids (empty on failure)."""
    from ovd.data.coco import load_dataset

    try:
        records = load_dataset(info)
    except OVDError as e:
        report.problems.append(f"dataset {info.name}: {e}")
        return set()
    report.images[info.name] = len(records)
    missing = [r.file_name for r in records if not os.path.isfile(r.file_name)]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        report.problems.append(f"dataset {info.name}: {len(missing)} of {len(records)} images missing: {shown}")
    absent = set(missing)
    present = [r for r in records if r.file_name not in absent]
    step = max(1, len(present) // max(1, sample - 1))
    for r in {id(r): r for r in [*present[::step][: sample - 1], *present[-1:]]}.values():
        found = _decode(r.file_name, r.width, r.height)
        if found:
            report.problems.append(f"dataset {info.name}: {found}")
    return {int(r.image_id) for r in records}


def _check_captions(info: DatasetInfo, report: PreflightReport, makes_tags: bool) -> None:
    from ovd.utils.io import read_json

    captions = info.resolve(info.extra["captions"])
    if info.ann_file_path.is_file():
        return
    if not makes_tags:
        report.problems.append(
            f"dataset {info.name}: caption-tag file {info.ann_file_path} not found; make it with "
            f"'python tools/tag_captions.py --dataset {info.name}' (tools/run_pipeline.py makes it itself)"
        )
        return
    try:
        data = read_json(captions)
        if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
            raise OVDError("not a COCO captions file (no 'annotations' list)", path=captions)
    except OVDError as e:
        report.problems.append(f"dataset {info.name}: captions for the caption-tag step: {e}")


def _check_writable(folder: Path, need: int, report: PreflightReport) -> None:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".preflight"):
            pass
    except OSError as e:
        report.problems.append(f"output folder {folder} is not writable ({e.strerror or type(e).__name__})")
        return
    free = shutil.disk_usage(existing).free
    if need > free:
        report.problems.append(f"output folder {folder}: about {need / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free")


def _check_models(
    cfg: Config, num_classes: int, report: PreflightReport, clip_dims: dict[tuple[str, str], int], made: set[Path]
) -> None:
    import torch

    key = (cfg.clip.model, cfg.clip.pretrained)
    # with precomputed class embeddings the CLIP encoder is read only for the region-fidelity report
    if cfg.clip.embeddings and not cfg.test.region_fidelity:
        clip_dims.setdefault(key, 0)
    if key not in clip_dims and cfg.clip.pretrained and Path(cfg.clip.pretrained).resolve() in made:
        clip_dims[key] = 0  # the run makes it (the OV-Shapes teacher)
    if key not in clip_dims:
        from ovd.clip import create_clip

        try:
            clip_dims[key] = create_clip(cfg.clip.model, cfg.clip.pretrained or None).embed_dim
        except OVDError as e:
            clip_dims[key] = 0
            report.problems.append(f"CLIP {cfg.clip.model} / {cfg.clip.pretrained or 'random init'}: {e}")
    if cfg.clip.embeddings:
        from ovd.clip import load_text_embeddings

        try:
            load_text_embeddings(cfg.clip.embeddings, expected_num=num_classes)
        except OVDError as e:
            report.problems.append(f"clip.embeddings: {e}")
    weights = cfg.model.backbone.weights
    if weights == "torchvision" and cfg.model.backbone.name.startswith("resnet"):
        from torchvision.models import resnet

        enum = resnet.ResNet18_Weights if cfg.model.backbone.name.startswith("resnet18") else resnet.ResNet50_Weights
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.IMAGENET1K_V1.url).name
        if not cached.is_file():
            report.problems.append(
                f"model.backbone.weights: torchvision ImageNet weights not in the torch cache ({cached}); download "
                "them once or name a local file"
            )
    elif weights and weights != "torchvision" and not Path(weights).is_file():
        report.problems.append(f"model.backbone.weights: file not found: {weights}")
    if cfg.init_weights and not cfg.init_stage and not Path(cfg.init_weights).is_file():
        report.problems.append(f"init_weights: file not found: {cfg.init_weights}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        report.problems.append("device: cuda asked for, but this machine has no CUDA device (use device=auto or cpu)")
    on_gpu = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.solver.amp and cfg.solver.amp_dtype == "float16" and not on_gpu:
        logger.warning("pre-flight: solver.amp with float16 trains in float32 on a CPU")


def preflight(
    configs: Sequence[Config],
    output_dirs: Iterable[Path],
    *,
    datasets: Iterable[str] = (),
    skip: Iterable[str] = (),
    makes_tags: bool = False,
    stores: Sequence[StoreNeed] = (),
    proposals: Path | None = None,
    made: Iterable[Path] = (),
    sample: int = DECODE_SAMPLE,
) -> PreflightReport:
    """Check every input of ``configs`` (their train/test datasets and sources, plus ``datasets``) and
    the outputs; ``skip``: datasets a run makes itself (the pipeline's pseudo labels); ``makes_tags``:
    the run makes missing caption-tag files (then their captions are checked instead); ``made``: model
    files the run makes before using them (the OV-Shapes CLIP teacher). Never raises
    for a finding: see :class:`PreflightReport`."""
    from ovd.distill.store import store_is_complete

    start = time.perf_counter()
    report = PreflightReport()
    names = set(datasets)
    for cfg in configs:
        names |= {s.dataset for s in cfg.data.sources} or {cfg.data.train}
        names |= {cfg.data.test} if cfg.data.test else set()
    names -= {*skip, ""}
    ids: dict[str, set[int]] = {}
    for name in sorted(names):
        try:
            info = get_dataset(name, prepare=False)
        except OVDError as e:
            report.problems.append(str(e))
            continue
        if info.prepare is not None and not info.ann_file_path.is_file():
            continue  # a built-in world, generated on first use
        if info.ann_type == "image" and "captions" in info.extra:
            _check_captions(info, report, makes_tags)
            if not info.ann_file_path.is_file():
                continue
        ids[name] = _check_dataset(info, report, sample)
    clip_dims: dict[tuple[str, str], int] = {}
    for cfg in configs:
        train = cfg.data.sources[0].dataset if cfg.data.sources else cfg.data.train
        num_classes = get_dataset(train, prepare=False).num_classes if train in ids else 0
        _check_models(cfg, num_classes, report, clip_dims, {Path(m).resolve() for m in made})
    made_stores = {Path(s.path).resolve() for s in stores}
    for cfg in configs:  # stores a distilling recipe reads must exist, unless this run makes them
        if not cfg.model.distill.enabled:
            continue
        for store in {cfg.data.region_store, *(s.region_store for s in cfg.data.sources)} - {""}:
            if Path(store).resolve() not in made_stores and not store_is_complete(store):
                report.problems.append(
                    f"region store {store} not found or unfinished; make it with tools/extract_region_embeddings.py "
                    "(tools/run_pipeline.py makes its own)"
                )
    if proposals is not None and proposals.suffix == ".json" and not proposals.is_file():
        report.problems.append(f"regions.proposals: file not found: {proposals}")
    need: dict[Path, int] = {}
    dim = max(clip_dims.values(), default=512) or 512
    for s in stores:
        if store_is_complete(s.path):
            continue
        n = len(set().union(*(ids.get(d, set()) for d in s.datasets)))
        report.store_bytes[str(s.path)] = region_store_bytes(n, s.k, dim)
        need[s.path.parent] = need.get(s.path.parent, 0) + report.store_bytes[str(s.path)]
    for folder in [*output_dirs, *need]:
        _check_writable(Path(folder), need.get(Path(folder), 0), report)
    report.seconds = round(time.perf_counter() - start, 2)
    return report


def check_pipeline(
    configs: Sequence[Config],
    out: Path,
    datasets: Iterable[str],
    stores: Sequence[tuple[Path, tuple[str, ...]]],
    proposals: Path | None,
    *,
    k: int,
    skip: Iterable[str],
    teacher: bool,
) -> PreflightReport:
    """:func:`preflight` of a pipeline run (it makes caption tags, its pseudo labels ``skip`` and, with
    ``teacher``, the OV-Shapes CLIP teacher itself; ``stores``: (path, datasets) it will fill).

    Raises:
        PreflightError: listing every problem.
    """
    made = []
    if teacher:
        from ovd.clip.teacher import teacher_path

        made.append(teacher_path())
    needs = [StoreNeed(path, names, k) for path, names in stores]
    report = preflight(
        configs, [out], datasets=datasets, skip=skip, makes_tags=True, stores=needs, proposals=proposals, made=made
    )
    if report.problems:
        raise PreflightError(report.problems)
    images = ", ".join(f"{name} {n} images" for name, n in report.images.items())
    logger.info("pre-flight check passed in %.1f s (%s)", report.seconds, images)
    return report
