"""The schema of a pipeline file (``configs/*/pipeline.yaml``, :mod:`ovd.pipeline`) and of region extraction.

A pipeline file lists detector stages (each a recipe of :class:`~ovd.config.schema.Config`) and what they
share: the region store (:class:`RegionsCfg`) and pseudo labels (:class:`PseudoLabelsCfg`). The defaults
of a region extraction (K, NMS, batch and worker sizes, where crops are made) are written once, in
:class:`ExtractionCfg`: :func:`ovd.distill.extract.extract_region_embeddings` takes it, the pipeline's
``regions`` section and ``tools/extract_region_embeddings.py`` read their defaults from it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ovd.config.loading import check_keys
from ovd.errors import OVDError

RESIZE_BACKENDS = ("pil", "tensor", "batched")
"""Where crops are made: PIL in the DataLoader workers, torch per crop on the CLIP's device, or batched
matrix products on the CLIP's device (ExtractionCfg.resize_backend; "auto" picks one)."""
CROP_DTYPES = ("float32", "float16")  # of the batched backend's matrix products (ExtractionCfg.crop_dtype)


@dataclass(frozen=True)
class ExtractionCfg:
    """How region embeddings are extracted (METHOD §3.1-§3.2; :mod:`ovd.distill.extract`).

    Result-changing (recorded in the store's metadata, so a resumed or sharded run must use the same):
    ``k``, ``nms_thresh``, ``resize_backend`` and, for the batched backend, ``crop_dtype``; ``chunk_size``
    fixes the part files' layout. The others only change the speed.
    """

    k: int = 5  # regions kept per image after class-agnostic NMS (METHOD §3.1: top_N = 5)
    nms_thresh: float = 0.5  # class-agnostic NMS IoU threshold (METHOD §3.1)
    batch_size: int = 256  # crops per CLIP forward pass
    num_workers: int = 2  # DataLoader processes that decode and crop images (0 = in this process)
    chunk_size: int = 512  # images per resumable part file
    # where crops are made: pil (in the workers, exactly as clip.preprocess on a PIL crop) | tensor (torch per
    # crop on the CLIP's device) | batched (batched matrix products there) | auto (batched on a GPU, else pil)
    resize_backend: str = "auto"
    # batched backend: workers decode into shared buffers, page-locked on a GPU (False: the DataLoader's queue;
    # the same numbers either way)
    host_ring: bool = True
    # dtype of the batched backend's matrix products: float32 | float16 (within one intensity level of
    # float32) | auto (float16 on a GPU, float32 on a CPU)
    crop_dtype: str = "auto"


_EXTRACTION = ExtractionCfg()


@dataclass(frozen=True)
class RegionsCfg:
    """Class-agnostic regions + CLIP embeddings for region distillation (METHOD §3.1–§3.2)."""

    proposals: str = ""  # stage whose final checkpoint proposes the regions, or a COCO results JSON ("" = none)
    dataset: str = ""  # whose images ("" = the first stage's data.train, or its first source); others share its ids
    k: int = _EXTRACTION.k  # regions kept per image after class-agnostic NMS (distillation reads the first num_regions)
    nms_thresh: float = _EXTRACTION.nms_thresh  # class-agnostic NMS IoU
    batch_size: int = _EXTRACTION.batch_size  # crops per CLIP forward pass

    def extraction(self, num_workers: int) -> ExtractionCfg:
        """The extraction these regions are made with (the rest at :class:`ExtractionCfg`'s defaults)."""
        return replace(
            _EXTRACTION, k=self.k, nms_thresh=self.nms_thresh, batch_size=self.batch_size, num_workers=num_workers
        )


@dataclass(frozen=True)
class PseudoLabelsCfg:
    """Pseudo boxes for image-level labels (PIS, METHOD §4.2), scored by CLIP on the stored regions."""

    dataset: str = ""  # image-label dataset (caption tags) to pseudo-label ("" = no PIS step)
    name: str = ""  # catalog name the pseudo-labelled dataset is registered under (the recipes' sources use it)
    score: str = "softmax"  # how a region is scored for a label: softmax (over the vocabulary) | cosine
    threshold: float = 0.3  # a label keeps its best region only when that region's score exceeds this
    logit_scale: float = 100.0  # softmax scale over the vocabulary (CLIP's learnt scale is 100)
    own_regions: bool = False  # labels of other images than the regions dataset's (ImageNet): a store of their own


@dataclass(frozen=True)
class StageCfg:
    name: str = ""  # stage name: its output folder and how later recipes refer to it (init_stage)
    config: str = ""  # recipe file, relative to the pipeline file
    overrides: list[str] = field(default_factory=list)  # key=value overrides of the recipe


@dataclass(frozen=True)
class PipelineCfg:
    stages: list[StageCfg] = field(default_factory=list)  # detector stages, in order
    regions: RegionsCfg = field(default_factory=RegionsCfg)  # the store read by stages with distillation
    pseudo_labels: PseudoLabelsCfg = field(default_factory=PseudoLabelsCfg)  # read by stages with "pseudo" sources
    teacher: bool = False  # train the OV-Shapes CLIP teacher first when it is missing
    demo_images: int = 4  # validation images the final model is demonstrated on (0 = no demo)
    demo_confidence: float = 0.3  # score threshold of the demo drawings
    parallel_stages: int = 1  # stages trained at once, each in its own process, once their init stages are done


def check_parallel_stages(n: int, path: Path | None = None) -> None:
    """Raise unless ``n`` (``parallel_stages``, from ``path`` or the command line) is at least 1."""
    if n < 1:
        raise OVDError(f"must be >= 1, got {n}", path=path, field="parallel_stages")


def load_pipeline(path: str | os.PathLike[str]) -> PipelineCfg:
    """Read a pipeline file.

    Raises:
        OVDError: a missing or malformed file, an unknown key (naming the closest valid one), a value of
            the wrong type, stages without unique non-empty names, or ``parallel_stages`` < 1.
    """
    path = Path(path)
    if not path.is_file():
        raise OVDError("pipeline file not found", path=path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise OVDError(f"malformed YAML: {e}", path=path) from e
    check_keys(data, PipelineCfg, "", str(path))  # recursive: regions., pseudo_labels., stages[i].
    try:
        cfg: PipelineCfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PipelineCfg), data))  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise OVDError(f"invalid value: {str(e).splitlines()[0]}", path=path) from e
    names = [s.name for s in cfg.stages]
    if not names or len(set(names)) != len(names) or "" in names:
        raise OVDError("stages need unique, non-empty names", path=path, field="stages")
    check_parallel_stages(cfg.parallel_stages, path)
    return cfg
