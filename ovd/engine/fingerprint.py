"""Fingerprints of finished work: reuse an output folder, a resume or a cache only when it matches.

A fingerprint is a flat JSON dict of what determines a result:

- ``config.<key>``: every field of the resolved :class:`~ovd.config.Config` except those listed in
  :data:`ovd.config.RESULT_NEUTRAL` (logging, workers, threads, device, checkpoint and evaluation periods,
  cache folders: they cannot change a number);
- ``inputs.<name>``: the identity of each file the run reads (the init checkpoint, region stores, the
  annotation files of its datasets, precomputed text embeddings, a CLIP checkpoint file): SHA-256 of the
  file (for a region store, of the part of its ``meta.json`` that records how its arrays were made);
- ``version``: the ``ovd`` package version.

:func:`fingerprint_diff` lists the keys whose values differ, so an error can say exactly what changed.
The trainer writes ``fingerprint.json`` into its output folder when it starts; the pipeline skips a stage
only when that file matches the stage's current fingerprint, and ``--resume`` refuses a config whose
result-changing fields differ from the checkpoint's (:func:`resume_differences`). Other producers
(region stores, pseudo labels) can use :func:`file_identity`, :func:`flatten` and :func:`fingerprint_diff`
for their own provenance records.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ovd.config import RESULT_NEUTRAL, RESUME_MAY_CHANGE, Config, config_from_yaml
from ovd.distill.store_format import META_FILE, content_key
from ovd.errors import OVDError
from ovd.utils.io import read_json, write_json

FINGERPRINT_FILE = "fingerprint.json"
ABSENT = "absent"  # the identity of an input file that does not exist (now)
_HASH_CHUNK = 1 << 20
_HASHES: dict[tuple[str, int, int], str] = {}  # this process's hashes, by (path, size, mtime)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ovd")
    except PackageNotFoundError:
        return "unknown"


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b.c": leaf}``; lists stay values (compared whole)."""
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def file_identity(path: str | os.PathLike[str]) -> str:
    """``sha256:<hex>`` of a file's bytes; for a region store (a folder with ``meta.json``), of the part of
    its metadata that determines the arrays (:func:`~ovd.distill.store_format.content_key`: not the
    creation time, file paths, statistics, or the per-region weights added to the store later, which a
    stage's own config names); :data:`ABSENT` when it does not exist."""
    p = Path(path)
    if p.is_dir():
        p = p / META_FILE
        if p.is_file():
            meta = read_json(p)
            if not isinstance(meta, dict):
                raise OVDError(f"a region store's metadata must be a JSON object, got {type(meta).__name__}", path=p)
            canonical = json.dumps(content_key(meta), sort_keys=True).encode()
            return f"sha256:{hashlib.sha256(canonical).hexdigest()}"
    if not p.is_file():
        return ABSENT
    stat = p.stat()
    key = (str(p.resolve()), stat.st_size, stat.st_mtime_ns)  # a file rewritten in place gets a new mtime
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
        _HASHES[key] = f"sha256:{h.hexdigest()}"
    return _HASHES[key]


def config_fields(cfg: Config) -> dict[str, Any]:
    """The result-changing fields of ``cfg``, flattened (``solver.max_iter``, ...)."""
    flat = flatten(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))
    return {k: v for k, v in flat.items() if k not in RESULT_NEUTRAL}


def _input_paths(cfg: Config) -> dict[str, str]:
    """The files ``cfg`` reads, by name."""
    from ovd.data.catalog import get_dataset

    paths: dict[str, str] = {}
    if cfg.init_weights:
        paths["init_weights"] = cfg.init_weights
    if cfg.clip.embeddings:
        paths["clip.embeddings"] = cfg.clip.embeddings
    if cfg.clip.pretrained and Path(os.path.expanduser(cfg.clip.pretrained)).is_file():
        paths["clip.pretrained"] = os.path.expanduser(cfg.clip.pretrained)
    if cfg.model.distill.enabled:
        stores = [s.region_store for s in cfg.data.sources] if cfg.data.sources else [cfg.data.region_store]
        for i, store in enumerate(stores):
            if store:
                paths[f"region_store[{i}]"] = store
    names = [s.dataset for s in cfg.data.sources] if cfg.data.sources else [cfg.data.train]
    for name in [*names, *([cfg.data.test] if cfg.data.test else [])]:
        try:
            info = get_dataset(name)  # made first if it is a built-in dataset not generated yet
        except OVDError:
            continue  # not registered yet: nothing to fingerprint
        if info.ann_file:
            paths[f"dataset.{name}"] = str(info.ann_file_path)
    return paths


def run_fingerprint(cfg: Config) -> dict[str, Any]:
    """The fingerprint of a training run of ``cfg`` with the input files as they are now."""
    fp: dict[str, Any] = {"version": package_version()}
    fp.update({f"config.{k}": v for k, v in config_fields(cfg).items()})
    fp.update({f"inputs.{k}": file_identity(p) for k, p in _input_paths(cfg).items()})
    return fp


def fingerprint_diff(old: Mapping[str, Any], new: Mapping[str, Any], *, ignore_absent: bool = False) -> list[str]:
    """``"key: old -> new"`` for every key whose value differs (a missing key counts as ``None``).

    Args:
        ignore_absent: an input that is :data:`ABSENT` in ``new`` is not compared (a region store deleted
            after the stage that read it finished does not make the stage stale).
    """
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b or (ignore_absent and key.startswith("inputs.") and b == ABSENT):
            continue
        out.append(f"{key}: {_short(a)} -> {_short(b)}")
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def write_fingerprint(folder: str | os.PathLike[str], fingerprint: Mapping[str, Any]) -> None:
    write_json(Path(folder) / FINGERPRINT_FILE, dict(fingerprint), indent=1)


def read_fingerprint(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The recorded fingerprint of an output folder, or None when it has none."""
    path = Path(folder) / FINGERPRINT_FILE
    if not path.is_file():
        return None
    data = read_json(path)
    if not isinstance(data, dict):
        raise OVDError("expected a JSON object", path=path)
    return data


def resume_differences(cfg: Config, checkpoint_config: Config) -> list[str]:
    """Result-changing fields in which ``cfg`` differs from the config a checkpoint was trained with;
    fields of :data:`ovd.config.RESUME_MAY_CHANGE` (extending a run, what it is evaluated on) may differ."""
    old, new = config_fields(checkpoint_config), config_fields(cfg)
    allowed = tuple(RESUME_MAY_CHANGE)
    return [d for d in fingerprint_diff(old, new) if not d.split(":", 1)[0].startswith(allowed)]


def listing(differences: Iterable[str], limit: int = 8) -> str:
    diffs = list(differences)
    more = f"; and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more


def check_resume(cfg: Config, state: Mapping[str, Any], ckpt: Path) -> None:
    """Refuse to resume ``ckpt`` with a config whose result-changing fields differ from its own."""
    if "config" not in state:
        return
    differences = resume_differences(cfg, config_from_yaml(state["config"], str(ckpt)))
    if differences:
        raise OVDError(
            f"--resume: the config differs from the checkpoint's in result-changing fields ({listing(differences)}); "
            f"resume with the same config, or train into a new --output-dir",
            path=ckpt,
        )


def check_reuse(folders: list[Path], configs: list[Config], *, rerun_changed: bool = False) -> None:
    """Reuse a run's output folder (skip it when finished, resume it otherwise) only when the fingerprint it
    recorded matches the current one of its config; ``folders`` in order (a pipeline's stages: each may
    read the ones before it).

    Raises:
        OVDError: a folder made with other result-changing fields or inputs (or by an earlier version,
            without a fingerprint), listing the differing keys and the two ways out; with
            ``rerun_changed`` that folder and every later one are deleted (to be made again) instead.
    """
    import logging
    import shutil

    for i, (folder, cfg) in enumerate(zip(folders, configs, strict=True)):
        if not ((folder / FINGERPRINT_FILE).exists() or any(folder.glob("model_*.pth"))):
            continue  # nothing that could be reused (a run killed before its first write leaves config.yaml only)
        recorded = read_fingerprint(folder)
        differences = (
            [f"no {FINGERPRINT_FILE} (made by an earlier version of ovd)"]
            if recorded is None
            else fingerprint_diff(recorded, run_fingerprint(cfg), ignore_absent=True)
        )
        if not differences:
            continue
        if not rerun_changed:
            raise OVDError(
                f"stage {folder.name!r} was made with other settings or inputs ({listing(differences)}); use a new "
                f"--output-dir, or --rerun-changed to train {folder.name!r} and every stage after it again",
                path=folder,
            )
        for later in folders[i:]:
            if later.exists():
                logging.getLogger(__name__).warning("--rerun-changed: deleting %s to make it again", later)
                shutil.rmtree(later)
        return
