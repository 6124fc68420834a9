"""The training vocabulary: class names → text embeddings, from a file or the CLIP text encoder."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from ovd.config import ClipCfg


def class_embeddings(clip_cfg: ClipCfg, class_names: Sequence[str], output_dir: str | os.PathLike[str]) -> Tensor:
    """``Tensor[C, D]`` embeddings of ``class_names``.

    ``clip.embeddings`` (a precomputed ``.npy``) wins when set; otherwise the CLIP text encoder of
    ``clip.model`` / ``clip.pretrained`` is run with ``clip.templates`` and the result is cached
    under ``clip.cache_dir`` (default ``<output_dir>/text_embeddings``).
    """
    from ovd.clip import ClipSpec, get_or_build_text_embeddings, load_text_embeddings

    if clip_cfg.embeddings:
        return load_text_embeddings(clip_cfg.embeddings, expected_num=len(class_names)).embeddings
    cache_dir = Path(clip_cfg.cache_dir) if clip_cfg.cache_dir else Path(output_dir) / "text_embeddings"
    return get_or_build_text_embeddings(
        cache_dir / "vocabulary",
        ClipSpec.resolve(clip_cfg.model, clip_cfg.pretrained or None),
        list(class_names),
        list(clip_cfg.templates),
    ).embeddings
