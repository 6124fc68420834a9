"""The checkpoint file format: safe reading, atomic writing, upgrading earlier layouts, loading weights.

A checkpoint is a ``torch.save`` dict with ``model`` (state dict), and when saved by the trainer
``optimizer``, ``scheduler``, ``scaler``, ``iteration``, ``rng`` (tensors), ``config`` (YAML text) and
``vocabulary`` (``class_names`` and ``embeddings`` ``Tensor[C, D]``).

Safety: a checkpoint holds only tensors, numbers, strings, ``None`` and plain containers (checked on
save), and every load uses ``torch.load(weights_only=True)``, whose unpickler admits only those types:
a file whose unpickling would call anything else is refused, naming the file, before any of its code
runs. ``torch.save`` + ``weights_only`` rather than safetensors: a checkpoint nests optimizer state,
RNG states, the config text and the vocabulary, which safetensors (flat ``{name: tensor}`` plus string
metadata) would have to flatten into a second format, and every checkpoint ``ovd`` ever wrote (and the
converted ones of :mod:`ovd.compat`) stays loadable as it is. A trusted file of another layout is
converted once with ``tools/upgrade_checkpoint.py``.

The trainer's bookkeeping around these files (``last_checkpoint`` pointer, resumption) is
:mod:`ovd.engine.checkpoint`; loading a trained detector from one is :mod:`ovd.runtime.detector`.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ovd.errors import OVDError
from ovd.utils.io import atomic_open

UPGRADE_COMMAND = "python tools/upgrade_checkpoint.py --trust {path} NEW.pth"
_PLAIN = (torch.Tensor, int, float, bool, str, bytes, type(None), torch.dtype, torch.Size)


def plain_state_errors(obj: Any, where: str = "") -> list[str]:
    """Where ``obj`` holds something other than tensors, numbers, strings, None and lists/tuples/dicts."""
    if isinstance(obj, _PLAIN):
        return []
    if isinstance(obj, dict):
        return [e for k, v in obj.items() for e in plain_state_errors(k, where) + plain_state_errors(v, f"{where}.{k}")]
    if isinstance(obj, (list, tuple)):
        return [e for i, v in enumerate(obj) for e in plain_state_errors(v, f"{where}[{i}]")]
    return [f"{where or '<top level>'}: {type(obj).__module__}.{type(obj).__qualname__}"]


def write_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (a reader sees the old file or the new one, never a part).

    Raises:
        OVDError: ``state`` holds a non-plain object (it could not be loaded back safely).
        DiskFullError: the disk is full (``path`` is left as it was).
    """
    path = Path(path)
    bad = plain_state_errors(state)
    if bad:
        raise OVDError(f"a checkpoint may hold only tensors, numbers, strings and containers: {bad[:3]}", path=path)
    with atomic_open(path, "wb") as f:  # a file object: a full disk is an OSError, not torch's RuntimeError
        torch.save(state, f)


def is_intact(path: Path) -> bool:
    """Whether ``path`` is a complete ``torch.save`` archive (a truncated one lacks the zip's directory)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/data.pkl") or n == "data.pkl" for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``.

    Raises:
        OVDError: naming the file: missing, truncated or corrupt, not an ``ovd`` checkpoint, or holding
            objects whose unpickling could run code (refused before any runs; the message says how to
            convert the file if its source is trusted).
    """
    path = Path(path)
    if not path.is_file():
        raise OVDError("checkpoint not found", path=path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e) or "Unsupported operand" in str(e):  # not a pickle at all
            raise OVDError(f"cannot read checkpoint, truncated or corrupt ({str(e)[:200]})", path=path) from e
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise OVDError(
            f"refused: loading it needs unpickling objects other than tensors and plain containers{what}, "
            f"which can run arbitrary code; if you trust its source, convert it once with "
            f"`{UPGRADE_COMMAND.format(path=path)}`",
            path=path,
        ) from e
    except Exception as e:
        first = (str(e).splitlines() or [""])[0][:200]
        raise OVDError(f"cannot read checkpoint, truncated or corrupt ({type(e).__name__}: {first})", path=path) from e
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


def to_plain(obj: Any) -> Any:
    """``obj`` with numpy arrays/scalars turned into tensors/numbers and configs into YAML text.

    Raises:
        OVDError: an object that has no plain equivalent (listed by where it sits).
    """
    import dataclasses

    if isinstance(obj, _PLAIN):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {to_plain(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [to_plain(v) for v in obj]
        return items if isinstance(obj, list) else tuple(items)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        from omegaconf import OmegaConf

        return OmegaConf.to_yaml(OmegaConf.structured(obj))
    raise OVDError(f"no plain equivalent for a {type(obj).__module__}.{type(obj).__qualname__}")


def _numpy_data_globals(names: list[str]) -> list[Any] | None:
    """The objects behind ``names`` when every one is a numpy array / scalar / dtype constructor, else ``None``.

    An explicit list, not "anything from numpy": numpy also holds functions that run code.
    """
    import importlib

    allowed_functions = {"_reconstruct", "scalar"}  # numpy.(_)core.multiarray: rebuild an array / a scalar
    found = []
    for name in names:
        module_name, _, attr = name.rpartition(".")
        if module_name != "numpy" and not module_name.startswith("numpy."):
            return None
        obj = getattr(importlib.import_module(module_name), attr, None)
        is_dtype = isinstance(obj, type) and issubclass(obj, (np.ndarray, np.dtype))
        if not (is_dtype or (module_name.endswith("multiarray") and attr in allowed_functions)):
            return None
        found.append(obj)
    # the concrete dtype classes (numpy.dtypes.Float32DType, ...) are built while loading, not listed
    dtype_classes = [
        c for c in vars(getattr(np, "dtypes", np)).values() if isinstance(c, type) and issubclass(c, np.dtype)
    ]
    return found + dtype_classes


def upgrade_checkpoint(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> list[str]:
    """Convert a checkpoint of an earlier layout (numpy values inside) into the plain format; returns what changed.

    Read with ``weights_only=True`` plus an explicit list of numpy array / scalar / dtype constructors, so
    nothing in the file runs; a file naming any other object is refused, naming it.
    """
    src = Path(src)
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(src)
    except Exception as e:
        raise OVDError(f"cannot read checkpoint ({type(e).__name__}: {str(e)[:200]})", path=src) from e
    admitted = _numpy_data_globals(names)
    if admitted is None:
        raise OVDError(f"refused: the file names objects other than numpy data ({', '.join(names[:5])})", path=src)
    try:
        with torch.serialization.safe_globals(admitted):
            state = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:
        raise OVDError(f"cannot read checkpoint ({type(e).__name__}: {str(e)[:200]})", path=src) from e
    if not isinstance(state, dict) or "model" not in state:
        raise OVDError("not an ovd checkpoint (no 'model' entry)", path=src)
    changed = plain_state_errors(state)
    try:
        plain = to_plain(state)
    except OVDError as e:
        raise OVDError(e.reason, path=src) from e
    with atomic_open(Path(dst), "wb") as f:
        torch.save(plain, f)
    return changed
