"""The vocabulary as data: class names + prompt templates + CLIP → ``Tensor[C, D]``, cached on disk.

Shape legend: ``C`` classes, ``T`` templates, ``D`` CLIP embedding dim.

Cache format: ``<stem>.npy`` (``C×D``, float32 or float16) plus a JSON sidecar ``<stem>.json`` that
records what produced it (model, tag or checkpoint hash, templates, class names, dim, time). The
reference repo's files (``datasets/zeroshot_weights/*_clip_a+photo+cname.npy``: bare ``C×512``
float16, unnormalised, no sidecar) load too, with ``class_names=None``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from torch import Tensor

from ovd.clip.model import ClipBundle, ClipSpec, create_clip, eval_mode
from ovd.errors import OVDError
from ovd.utils.io import atomic_open, read_json, write_json

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}",)
"""The reference prompt, exactly: "a photo of a {name}", no period (METHOD §2.1, ``--prompt photo``)."""

ENSEMBLE_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
"""The 7-prompt ensemble OpenAI selected for ImageNet (CLIP repo, ``Prompt_Engineering_for_ImageNet``;
open_clip ``SIMPLE_IMAGENET_TEMPLATES``)."""

EMBEDDING_DTYPES = ("float32", "float16")
FORMAT_NAME = "ovd.text_embeddings"
FORMAT_VERSION = 1
_MAX_LISTED = 5


def _non_empty_tuple(values: Sequence[str], field: str, expected: str, empty: str) -> tuple[str, ...]:
    """``values`` as a tuple; one string (not a sequence of them) or an empty sequence raise :class:`OVDError`."""
    if isinstance(values, str):
        what = field.replace("_", " ")
        raise OVDError(f"{what} must be {expected}, not one string", field=field)
    out = tuple(values)
    if not out:
        raise OVDError(empty, field=field)
    return out


def validate_vocabulary(class_names: Sequence[str]) -> tuple[str, ...]:
    """Check a vocabulary and return it as a tuple (names are used raw, as in the reference).

    Raises:
        OVDError: empty vocabulary, a non-string or blank name, or names that are equal after
            ``strip().lower()`` (all duplicates are named).
    """
    names = _non_empty_tuple(class_names, "class_names", "a sequence of names", "the vocabulary is empty")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise OVDError(f"class name {i} is empty or not a string: {name!r}", field=f"class_names[{i}]")
    counts = Counter(name.strip().lower() for name in names)
    dups = sorted(key for key, n in counts.items() if n > 1)
    if dups:
        raise OVDError(f"duplicate class names (case/space-insensitive): {', '.join(dups)}", field="class_names")
    return names


def validate_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """Check prompt templates: a non-empty sequence of strings that each contain ``{}``."""
    out = _non_empty_tuple(templates, "templates", "a sequence of strings", "no prompt templates given")
    for i, t in enumerate(out):
        if not isinstance(t, str) or "{}" not in t:
            raise OVDError(f"template {t!r} has no '{{}}' placeholder for the class name", field=f"templates[{i}]")
    return out


def _fill(template: str, name: str) -> str:
    return template.replace("{}", name)


def build_text_embeddings(
    clip: ClipBundle,
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    *,
    batch_size: int = 256,
) -> Tensor:
    """Zero-shot classifier weights, as open_clip's ``build_zero_shot_classifier`` computes them.

    For each class: encode every filled-in template, L2-normalise each, mean over templates, and
    L2-normalise the mean. With the single default template each row is therefore the normalised
    CLIP embedding of "a photo of a {name}" (the reference stores it unnormalised; the classifier
    normalises both the same way).

    Args:
        clip: the CLIP bundle.
        class_names: ``C`` names, used raw (no underscore clean-up, as in the reference).
        templates: ``T`` prompt templates with one ``{}``.
        batch_size: about how many prompts per forward pass.

    Returns:
        ``Tensor[C, D]`` float32 on CPU, rows of unit L2 norm.
    """
    names = validate_vocabulary(class_names)
    temps = validate_templates(templates)
    fillers = [partial(_fill, t) for t in temps]
    with eval_mode(clip.model):
        weights = open_clip.build_zero_shot_classifier(
            clip.model,
            clip.tokenizer,
            names,
            fillers,
            num_classes_per_batch=max(1, batch_size // len(temps)),
            device=clip.device,
        )  # (D, C)
    return weights.T.float().cpu().contiguous()  # (C, D)


@dataclass(frozen=True, eq=False)
class TextEmbeddings:
    """Class embeddings loaded from disk.

    Attributes:
        embeddings: ``Tensor[C, D]`` float32 (not re-normalised on load).
        class_names: the ``C`` names from the sidecar, or None for a bare reference ``.npy``.
        metadata: the sidecar's content (empty for a bare ``.npy``).
        path: the ``.npy`` file.
    """

    embeddings: Tensor
    class_names: tuple[str, ...] | None
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def num_classes(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])


def embedding_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(npy, sidecar)`` for a cache path given with or without the ``.npy`` suffix."""
    p = Path(path)
    npy = p if p.suffix == ".npy" else p.with_name(p.name + ".npy")
    return npy, npy.with_suffix(".json")


def save_text_embeddings(
    path: str | os.PathLike[str],
    embeddings: Tensor,
    *,
    class_names: Sequence[str],
    model_name: str,
    pretrained: str | None,
    templates: Sequence[str],
    checkpoint_sha256: str | None = None,
    dtype: str = "float32",
) -> Path:
    """Write ``<path>.npy`` and its JSON sidecar ``<path>.json``, both atomically.

    The old sidecar is removed before the array is replaced, so an interrupted write leaves an
    array without a sidecar, which :func:`get_or_build_text_embeddings` never trusts.

    Args:
        path: output path, with or without ``.npy``.
        embeddings: ``Tensor[C, D]``.
        class_names: the ``C`` names, in row order.
        model_name: open_clip architecture that produced the rows.
        pretrained: its tag or checkpoint path (None: random init).
        templates: the prompt templates used.
        checkpoint_sha256: hash of the checkpoint file, when ``pretrained`` is a file.
        dtype: ``"float32"`` or ``"float16"`` on disk.

    Returns:
        The ``.npy`` path.
    """
    names = validate_vocabulary(class_names)
    temps = validate_templates(templates)
    if dtype not in EMBEDDING_DTYPES:
        raise OVDError(f"dtype must be one of {', '.join(EMBEDDING_DTYPES)}, got {dtype!r}", field="dtype")
    if embeddings.ndim != 2 or embeddings.shape[0] != len(names):
        raise OVDError(
            f"embeddings of shape {tuple(embeddings.shape)} do not match {len(names)} class names",
            field="embeddings",
        )
    array = embeddings.detach().to("cpu", torch.float32).numpy().astype(dtype)  # (C, D)
    if not np.isfinite(array).all():
        raise OVDError("embeddings contain NaN or inf (or overflow in the chosen dtype)", field="embeddings")
    npy, sidecar = embedding_paths(path)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model_name": model_name,
        "pretrained": pretrained,
        "checkpoint_sha256": checkpoint_sha256,
        "templates": list(temps),
        "class_names": list(names),
        "num_classes": int(array.shape[0]),
        "dim": int(array.shape[1]),
        "dtype": dtype,
        "open_clip_version": open_clip.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with contextlib.suppress(FileNotFoundError):
        sidecar.unlink()
    with atomic_open(npy, "wb") as f:
        np.save(f, array, allow_pickle=False)
    write_json(sidecar, metadata)
    logger.info("wrote %d×%d text embeddings to %s", array.shape[0], array.shape[1], npy)
    return npy


def _bad_rows(rows: np.ndarray) -> str:
    idx = np.flatnonzero(rows).tolist()
    more = f" (and {len(idx) - _MAX_LISTED} more)" if len(idx) > _MAX_LISTED else ""
    return f"{', '.join(map(str, idx[:_MAX_LISTED]))}{more}"


def load_text_embeddings(
    path: str | os.PathLike[str],
    *,
    expected_dim: int | None = None,
    expected_num: int | None = None,
) -> TextEmbeddings:
    """Read class embeddings written by :func:`save_text_embeddings` or a bare reference ``.npy``.

    Args:
        path: the ``.npy`` file (suffix optional); its sidecar ``<stem>.json`` is read if present.
        expected_dim: required ``D`` (e.g. the classifier's), or None.
        expected_num: required ``C``, or None.

    Returns:
        :class:`TextEmbeddings` with ``Tensor[C, D]`` float32.

    Raises:
        OVDError: missing or unreadable file, not a 2-D float array, wrong ``D`` or ``C``, rows with
            NaN/inf or all zeros, or a sidecar that disagrees with the array.
    """
    npy, sidecar = embedding_paths(path)
    if not npy.is_file():
        raise OVDError("text embedding file not found", path=npy)
    try:
        array = np.load(npy, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise OVDError(f"not a readable .npy array ({e})", path=npy) from e
    if not isinstance(array, np.ndarray) or array.ndim != 2:
        raise OVDError(f"expected a 2-D (classes × dim) array, got shape {np.shape(array)}", path=npy)
    if array.dtype.kind != "f":
        raise OVDError(f"expected a float array, got dtype {array.dtype}", path=npy)
    num, dim = array.shape
    if expected_dim is not None and dim != expected_dim:
        raise OVDError(
            f"text embedding dim is {dim} but {expected_dim} was expected (from another CLIP model?)",
            path=npy,
        )
    if expected_num is not None and num != expected_num:
        raise OVDError(f"{num} class embeddings but {expected_num} classes were expected", path=npy)
    if num == 0:
        raise OVDError("the array has no rows", path=npy)
    bad = ~np.isfinite(array).all(axis=1)  # (C,)
    if bad.any():
        raise OVDError(f"rows {_bad_rows(bad)} contain NaN or inf", path=npy)
    zero = ~array.any(axis=1)  # (C,)
    if zero.any():
        raise OVDError(f"rows {_bad_rows(zero)} are all zero and cannot be normalised", path=npy)

    metadata: dict[str, Any] = {}
    class_names = None
    if sidecar.is_file():
        metadata = read_json(sidecar)
        if not isinstance(metadata, dict):
            raise OVDError("sidecar must be a JSON object", path=sidecar)
        names = metadata.get("class_names")
        if names is not None:
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise OVDError("must be a list of strings", path=sidecar, field="class_names")
            if len(names) != num:
                raise OVDError(f"{len(names)} class names but the array has {num} rows", path=sidecar)
            class_names = tuple(names)
        if metadata.get("dim", dim) != dim:
            raise OVDError(f"records dim {metadata['dim']} but the array has dim {dim}", path=sidecar)
    embeddings = torch.from_numpy(array.astype(np.float32))  # (C, D)
    return TextEmbeddings(embeddings=embeddings, class_names=class_names, metadata=metadata, path=npy)


def _cache_mismatch(
    metadata: dict[str, Any], spec: ClipSpec, names: tuple[str, ...], templates: tuple[str, ...], dtype: str
) -> str | None:
    """Why a cache sidecar does not describe the requested embeddings; None when it does."""
    if spec.pretrained is None:
        return "random-init weights are never reused"
    if metadata.get("format") != FORMAT_NAME:
        return "no ovd sidecar"
    expected = {
        "model_name": spec.model_name,
        "checkpoint_sha256": spec.checkpoint_sha256,
        "templates": list(templates),
        "class_names": list(names),
        "dtype": dtype,
    }
    if spec.checkpoint_sha256 is None:  # a tag: the tag names the weights; a file: the hash does
        expected["pretrained"] = spec.pretrained
    for key, value in expected.items():
        if metadata.get(key) != value:
            return f"{key} differs"
    return None


def get_or_build_text_embeddings(
    cache_path: str | os.PathLike[str],
    clip: ClipSpec | ClipBundle,
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    *,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
) -> TextEmbeddings:
    """Reuse the cache at ``cache_path`` when its sidecar matches the request, else build and write it.

    The cache matches when model name, tag (or checkpoint SHA-256 for a file, wherever it lives),
    templates, class names (same order) and dtype all agree. Random-init weights never match.

    Args:
        cache_path: ``.npy`` path (suffix optional) of the cache.
        clip: a :class:`ClipSpec` (the model is built only on a cache miss) or a built
            :class:`ClipBundle` (its recorded weights are trusted to be the ones it holds).
        class_names: ``C`` names.
        templates: ``T`` prompt templates.
        dtype: on-disk dtype, ``"float32"`` or ``"float16"``.
        device: where to build the model from a :class:`ClipSpec`.

    Returns:
        The :class:`TextEmbeddings` as read back from the cache.
    """
    names = validate_vocabulary(class_names)
    temps = validate_templates(templates)
    spec = clip.spec if isinstance(clip, ClipBundle) else ClipSpec.resolve(clip.model_name, clip.pretrained)
    npy, _ = embedding_paths(cache_path)
    if npy.is_file():
        try:
            cached = load_text_embeddings(npy, expected_num=len(names))
        except OVDError as e:
            reason = f"unreadable ({e})"
        else:
            reason = _cache_mismatch(cached.metadata, spec, names, temps, dtype)
            if reason is None:
                logger.info("reusing cached text embeddings %s", npy)
                return cached
        logger.info("rebuilding text embeddings %s: %s", npy, reason)
    bundle = clip if isinstance(clip, ClipBundle) else create_clip(spec.model_name, spec.pretrained, device=device)
    embeddings = build_text_embeddings(bundle, names, temps)  # (C, D)
    save_text_embeddings(
        npy,
        embeddings,
        class_names=names,
        model_name=bundle.model_name,
        pretrained=bundle.pretrained,
        templates=temps,
        checkpoint_sha256=bundle.checkpoint_sha256,
        dtype=dtype,
    )
    return load_text_embeddings(npy, expected_num=len(names))
