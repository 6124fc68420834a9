"""Checkpoints: atomic saves, a ``last_checkpoint`` pointer, and clear errors on mismatch.

A checkpoint is a ``torch.save`` dict with ``model`` (state dict), and when saved by the trainer
``optimizer``, ``scheduler``, ``scaler``, ``iteration``, ``config`` (YAML text) and ``vocabulary``
(``class_names`` and ``embeddings`` ``Tensor[C, D]``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ovd.errors import OVDError
from ovd.utils.io import atomic_open, atomic_write

LAST_CHECKPOINT = "last_checkpoint"  # text file in the output dir naming the newest checkpoint


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write ``state`` atomically, then point ``last_checkpoint`` at it."""
    path = Path(path)
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    with atomic_open(path.parent / LAST_CHECKPOINT) as f:
        f.write(path.name)


def last_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint of a run, or ``None``."""
    pointer = Path(output_dir) / LAST_CHECKPOINT
    if not pointer.is_file():
        return None
    path = Path(output_dir) / pointer.read_text().strip()
    return path if path.is_file() else None


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint; a missing or corrupt file raises :class:`OVDError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise OVDError("checkpoint not found", path=path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise OVDError(f"cannot read checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})", path=path) from e
    if not isinstance(state, dict) or "model" not in state:
        raise OVDError("not an ovd checkpoint (no 'model' entry)", path=path)
    return state


def load_model_state(
    model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str, allow_missing: tuple[str, ...] = ()
) -> None:
    """Load weights strictly, except for missing keys starting with a prefix in ``allow_missing``.

    Raises:
        OVDError: keys or shapes do not match, listing a few of each.
    """
    own = model.state_dict()
    shape = [
        f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = [k for k in own if k not in state_dict and not k.startswith(allow_missing)]
    unexpected = [k for k in state_dict if k not in own]
    if shape or missing or unexpected:
        parts = []
        if shape:
            parts.append(f"{len(shape)} shape mismatches (e.g. {'; '.join(shape[:3])})")
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        raise OVDError("checkpoint does not match the model: " + "; ".join(parts), path=source)
    model.load_state_dict(state_dict, strict=False)
