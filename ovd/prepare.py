"""What the stages of a pipeline share: caption tags, region stores and pseudo labels (issue #17).

Each is made once and reused only when its recorded provenance matches what the stage needs:

* **caption tags** (``coco_captions_train``'s ``captions_train2017_tags_allcaps.json``): made from the
  catalog entry's captions file when missing; the file records (``info.ovd_provenance``) the captions'
  SHA-256, the vocabulary, the synonym table and the matching options. A file with other provenance
  is an error; one without any (made elsewhere, e.g. the reference's) is used with a warning.
* **region stores**: one store per image set, never two of the same images. The pipeline's regions
  dataset and, unless ``pseudo_labels.own_regions``, the images it pseudo-labels share one store: the
  union of their images (OV-COCO's caption images are more than its seen-class split). Reuse goes
  through :func:`ovd.distill.extract.extract_region_embeddings`, which compares the store's
  ``meta.json`` (CLIP model and weights hash, proposal source and its hash, image ids, K, NMS, crop
  preprocessing) with this extraction's and refuses a store made otherwise.
* **pseudo labels**: a sidecar ``<file>.provenance.json`` records the labelled file's SHA-256, the region
  store's content key, the class embeddings' SHA-256 and the scoring parameters; a file whose
  sidecar differs (or is missing) is remade.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ovd.clip.model import file_sha256
from ovd.config import Config, PseudoLabelsCfg, RegionsCfg
from ovd.data.catalog import DatasetInfo, get_dataset
from ovd.errors import OVDError
from ovd.structures import ImageRecord
from ovd.utils.io import read_json, write_json

logger = logging.getLogger(__name__)

PROVENANCE_KEY = "ovd_provenance"


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _differences(found: dict[str, Any], expected: dict[str, Any]) -> str:
    keys = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
    return ", ".join(f"{k}: {found.get(k)!r} vs {expected.get(k)!r}" for k in keys[:4])


# --------------------------------------------------------------------------------------------------
# Caption tags
# --------------------------------------------------------------------------------------------------


def makes_caption_tags(info: DatasetInfo) -> bool:
    """Whether ``info`` is an image-label dataset whose file is made from a captions file."""
    return info.ann_type == "image" and "captions" in info.extra


def caption_tags_provenance(
    info: DatasetInfo,
    synonyms: dict[int, list[str]] | None,
    *,
    table: str = "",
    plurals: bool = True,
    longest_match: bool = True,
) -> dict[str, Any]:
    """What a tag file of ``info`` is made from (the captions file must exist)."""
    captions = info.resolve(info.extra["captions"])
    if not captions.is_file():
        raise OVDError("captions file not found (the caption tags are made from it)", path=captions)
    return {
        "kind": "caption_tags",
        "captions_sha256": file_sha256(captions),
        "category_ids": [int(c) for c in info.category_ids],
        "synonyms": table,
        "synonyms_sha256": _sha256_json({str(k): v for k, v in (synonyms or {}).items()}),
        "plurals": plurals,
        "longest_match": longest_match,
    }


def _default_synonyms(info: DatasetInfo) -> tuple[str, dict[int, list[str]]]:
    """The entry's packaged synonym table (name, table), else its class names."""
    from ovd.data.captions import synonym_table

    name = info.extra.get("synonyms", "")
    if name:
        return name, synonym_table(name)
    return "", {int(c): [n] for c, n in zip(info.category_ids, info.class_names, strict=True)}


def make_caption_tags(
    info: DatasetInfo,
    output: str | Path | None = None,
    *,
    synonyms: str | dict[int, list[str]] | None = None,
    plurals: bool = True,
    longest_match: bool = True,
) -> dict[str, Any]:
    """Tag the captions of catalog entry ``info`` (METHOD §4.1) and write the image-label JSON (default:
    the entry's ``ann_file``) with its provenance; returns the written data.

    Args:
        synonyms: a packaged table's name, a ``{category id: [names]}`` table, or None: the entry's
            ``synonyms`` table, else the class names.
    """
    from ovd.data.captions import synonym_table, tag_captions

    if synonyms is None:
        name, table = _default_synonyms(info)
    elif isinstance(synonyms, str):
        name, table = synonyms, synonym_table(synonyms)
    else:
        name, table = "", synonyms
    cats = [{"id": int(c), "name": n} for c, n in zip(info.category_ids, info.class_names, strict=True)]
    provenance = caption_tags_provenance(info, table, table=name, plurals=plurals, longest_match=longest_match)
    captions = info.resolve(info.extra["captions"])
    data = tag_captions(
        read_json(captions), cats, synonyms=table, plurals=plurals, longest_match=longest_match, path=str(captions)
    )
    data["info"] = {PROVENANCE_KEY: provenance}
    write_json(output or info.ann_file_path, data, indent=None)
    return data


def ensure_caption_tags(info: DatasetInfo) -> str:
    """Make the tag file of ``info`` when missing; check its provenance when present.

    Returns:
        ``"made"``, ``"reused"`` (provenance matches) or ``"unverified"`` (a file without provenance).

    Raises:
        OVDError: the captions file is missing, or the tag file was made from other captions or settings.
    """
    path = info.ann_file_path
    if not path.is_file():
        logger.info("caption tags of %s: making %s", info.name, path)
        make_caption_tags(info)
        return "made"
    raw = read_json(path)
    found = (raw.get("info") or {}).get(PROVENANCE_KEY) if isinstance(raw, dict) else None
    if not isinstance(found, dict):
        logger.warning("%s records no provenance (made outside ovd?): used as it is", path)
        return "unverified"
    name, table = _default_synonyms(info)
    expected = caption_tags_provenance(info, table, table=name)
    if found != expected:
        raise OVDError(
            f"caption tags made from other captions or settings ({_differences(found, expected)}); delete the "
            f"file (the pipeline re-makes it) or re-run 'python tools/tag_captions.py --dataset {info.name}'",
            path=path,
        )
    return "reused"


# --------------------------------------------------------------------------------------------------
# Region stores
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StorePlan:
    """One region store: where, and the catalog datasets whose images (their union) it holds."""

    path: Path
    datasets: tuple[str, ...]


def union_records(datasets: Sequence[str]) -> tuple[list[ImageRecord], str]:
    """The images of ``datasets`` (first dataset's order, then each next one's new images) and the name
    the store records: the datasets that contributed images, joined with ``+``.

    Raises:
        OVDError: one image id names different files in two datasets (they cannot share a store).
    """
    from ovd.data.coco import load_dataset

    records: list[ImageRecord] = []
    files: dict[int, tuple[str, str]] = {}
    used: list[str] = []
    for name in dict.fromkeys(datasets):
        added = 0
        for r in load_dataset(get_dataset(name)):
            seen = files.get(int(r.image_id))
            if seen is None:
                files[int(r.image_id)] = (r.file_name, name)
                records.append(r)
                added += 1
            elif Path(seen[0]).resolve() != Path(r.file_name).resolve():
                raise OVDError(
                    f"image id {r.image_id} is {seen[0]} in {seen[1]} but {r.file_name} in {name}: these datasets "
                    "cannot share a region store (set pseudo_labels.own_regions: true)",
                    field="regions.dataset",
                )
        if added:
            used.append(name)
    return records, "+".join(used)


def ensure_store(plan: StorePlan, regions: RegionsCfg, cfg: Config, proposals: Path) -> str:
    """Extract (or finish, or check and reuse) the store of ``plan`` with ``cfg``'s CLIP and device.

    Returns:
        ``"reused"`` (complete, same provenance) or ``"extracted"``.

    Raises:
        OVDError: no proposal source, or a complete store made by another extraction (other CLIP or
            weights, proposals, images, K, ...), naming the differences.
    """
    from ovd.clip import create_clip
    from ovd.distill.extract import extract_region_embeddings
    from ovd.distill.proposals import build_proposal_source
    from ovd.distill.store import store_is_complete
    from ovd.runtime.device import local_device

    if not regions.proposals:
        raise OVDError("a stage distils regions but the pipeline names no proposal source", field="regions.proposals")
    complete = store_is_complete(plan.path)
    records, name = union_records(plan.datasets)
    device = local_device(cfg.device)  # the stage's device runs the proposer and CLIP too
    source = build_proposal_source(
        proposals, min_size=cfg.input.min_size_test, max_size=cfg.input.max_size_test, device=device
    )
    clip = create_clip(cfg.clip.model, cfg.clip.pretrained or None, device=device)
    if not complete:
        logger.info("extracting %d regions per image of %s (%d images)", regions.k, name, len(records))
    extract_region_embeddings(
        records,
        source,
        clip,
        plan.path,
        regions.extraction(num_workers=cfg.data.num_workers),
        dataset_name=name,
    )
    return "reused" if complete else "extracted"


# --------------------------------------------------------------------------------------------------
# Pseudo labels
# --------------------------------------------------------------------------------------------------


def provenance_path(path: Path) -> Path:
    return path.with_name(path.name + ".provenance.json")


def ensure_pseudo_labels(p: PseudoLabelsCfg, cfg: Config, store: Path, path: Path, cache_dir: Path) -> str:
    """Write the pseudo boxes of ``p.dataset`` from the region ``store`` to ``path``, unless a file made
    from the same labels, store, class embeddings and parameters is there.

    Returns:
        ``"reused"`` or ``"made"``.
    """
    from ovd.distill.store import RegionStore, content_key
    from ovd.engine.vocabulary import class_embeddings
    from ovd.pis.pseudo_labels import ClipScoredProposals, generate_pseudo_labels

    info = get_dataset(p.dataset)
    emb = class_embeddings(cfg.clip, info.class_names, cache_dir)  # (C, D)
    expected = {
        "kind": "pseudo_labels",
        "dataset": p.dataset,
        "labels_sha256": file_sha256(info.ann_file_path),
        "region_store": _sha256_json(content_key(RegionStore.open(store).metadata)),
        "class_embeddings_sha256": hashlib.sha256(emb.detach().float().cpu().numpy().tobytes()).hexdigest(),
        "score": p.score,
        "threshold": p.threshold,
        "logit_scale": p.logit_scale,
    }
    sidecar = provenance_path(path)
    if path.is_file() and sidecar.is_file():
        found = read_json(sidecar)
        if found == expected:
            return "reused"
        logger.info("pseudo labels %s were made otherwise (%s): remaking them", path, _differences(found, expected))
    sidecar.unlink(missing_ok=True)
    source = ClipScoredProposals(store, emb, score=p.score, threshold=p.threshold, logit_scale=p.logit_scale)
    logger.info("pseudo-labelling %s from %s (%s > %g)", p.dataset, store, p.score, p.threshold)
    generate_pseudo_labels(info, source, path)
    write_json(sidecar, expected)
    return "made"


def plan_stores(
    pseudo: PseudoLabelsCfg, regions_dataset: str, stages: Sequence[tuple[str, Config]], default_root: Path
) -> tuple[StorePlan, StorePlan | None]:
    """The pipeline's region stores: one for the regions dataset's images (with those it pseudo-labels,
    unless they have regions of their own) and, with ``pseudo.own_regions``, one for the labelled images.

    A store is where the recipes of ``stages`` (name, recipe before the pipeline fills stores in) name it,
    else ``default_root/<dataset>``; its datasets are every dataset whose images it must hold.

    Raises:
        OVDError: recipes name two different stores for the same images.
    """
    own_regions = bool(pseudo.dataset and pseudo.own_regions)
    named: dict[str, dict[str, str]] = {"main": {}, "own": {}}  # image set -> {store path: first stage naming it}
    datasets = [regions_dataset, *([pseudo.dataset] if pseudo.dataset and not own_regions else [])]
    for stage, cfg in stages:
        if not cfg.model.distill.enabled:
            continue
        if not cfg.data.sources:
            datasets.append(cfg.data.train)
            if cfg.data.region_store:
                named["main"].setdefault(str(Path(cfg.data.region_store)), stage)
        for s in cfg.data.sources:
            kind = "own" if own_regions and s.dataset == pseudo.name else "main"
            if s.region_store:
                named[kind].setdefault(str(Path(s.region_store)), stage)
            if kind == "main" and s.dataset != pseudo.name:
                datasets.append(s.dataset)

    def pick(kind: str, default: Path) -> Path:
        if len(named[kind]) > 1:
            listed = ", ".join(f"{path} (stage {stage})" for path, stage in named[kind].items())
            raise OVDError(
                f"stages name different region stores for the same images: {listed}; name one (or none: the "
                "pipeline's own)",
                field="data.region_store",
            )
        return Path(next(iter(named[kind]))) if named[kind] else default

    main = StorePlan(pick("main", default_root / regions_dataset), tuple(dict.fromkeys(datasets)))
    own = StorePlan(pick("own", default_root / pseudo.dataset), (pseudo.dataset,)) if own_regions else None
    return main, own
