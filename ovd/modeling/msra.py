"""The MSRA ImageNet ResNet weights of detectron2 (``ImageNetPretrained/MSRA/R-50.pkl``) as a torchvision state dict.

The file is a Caffe2-era pickle ``{"blobs": {name: numpy array}, ...}``. It is read with a restricted
unpickler that admits numpy arrays, their dtypes and plain containers only (any other global, hence
any code, is refused), and its Caffe2 names are mapped to torchvision's ResNet names:

* ``conv1_w`` → ``conv1.weight``; ``res_conv1_bn_{s,b}`` → ``bn1.{weight,bias}``;
* ``res{k}_{i}_branch2{a,b,c}_w`` → ``layer{k-1}.{i}.conv{1,2,3}.weight`` (and ``_bn_{s,b}`` → ``bn{1,2,3}``);
* ``res{k}_0_branch1_w`` → ``layer{k-1}.0.downsample.0.weight`` (``_bn_{s,b}`` → ``downsample.1``);
* the classifier (``pred_*`` / ``fc1000_*``) and momentum blobs are dropped.

The BatchNorms of these weights are affine (``y = s · x + b``), so each gets ``running_mean = 0`` and
``running_var = 1 - eps`` (a FrozenBatchNorm with eps 1e-5 then computes exactly ``s · x + b``). The
weights expect the MSRA layout: ``model.backbone.stride_in_1x1`` and BGR caffe input (``model.input_format``).
"""

from __future__ import annotations

import codecs
import importlib
import pickle
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ovd.errors import OVDError

BN_EPS = 1e-5  # torchvision FrozenBatchNorm2d's eps

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes (a pure function)
}


class _ArrayUnpickler(pickle.Unpickler):
    """Admits only the globals a numpy array pickle needs; anything else (hence any code) is refused."""

    def find_class(self, module: str, name: str):  # type: ignore[override]
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")
        if module == "numpy":
            return getattr(np, name)
        if module == "_codecs":
            return codecs.encode
        try:  # numpy 2 moved numpy.core to numpy._core
            return getattr(importlib.import_module("numpy._core.multiarray"), name)
        except ImportError:
            return getattr(importlib.import_module("numpy.core.multiarray"), name)


_RULES = [
    (re.compile(r"conv1_w$"), "conv1.weight"),
    (re.compile(r"res_conv1_bn_s$"), "bn1.weight"),
    (re.compile(r"res_conv1_bn_b$"), "bn1.bias"),
    (re.compile(r"res(\d)_(\d+)_branch2([abc])_w$"), "conv"),
    (re.compile(r"res(\d)_(\d+)_branch2([abc])_bn_([sb])$"), "bn"),
    (re.compile(r"res(\d)_(\d+)_branch1_w$"), "down_w"),
    (re.compile(r"res(\d)_(\d+)_branch1_bn_([sb])$"), "down_bn"),
]


def _torchvision_name(blob: str) -> str | None:
    for pattern, kind in _RULES:
        m = pattern.match(blob)
        if m is None:
            continue
        if "." in kind:
            return kind
        k, i = int(m.group(1)), m.group(2)
        layer = f"layer{k - 1}.{i}"
        if kind == "conv":
            return f"{layer}.conv{'abc'.index(m.group(3)) + 1}.weight"
        if kind == "bn":
            return f"{layer}.bn{'abc'.index(m.group(3)) + 1}.{'weight' if m.group(4) == 's' else 'bias'}"
        if kind == "down_w":
            return f"{layer}.downsample.0.weight"
        return f"{layer}.downsample.1.{'weight' if m.group(3) == 's' else 'bias'}"
    return None


def load_msra_resnet(path: str | Path) -> dict[str, Tensor]:
    """A torchvision ResNet state dict (no ``fc``) from an MSRA ``R-*.pkl`` file.

    Raises:
        OVDError: a missing or unreadable file, a pickle that holds anything but numpy arrays, or no blobs.
    """
    path = Path(path)
    if not path.is_file():
        raise OVDError("MSRA weights file not found", path=path, field="model.backbone.weights")
    try:
        with open(path, "rb") as f:
            data = _ArrayUnpickler(f, encoding="latin1").load()
    except Exception as e:
        raise OVDError(f"cannot read as an MSRA weights pickle ({type(e).__name__}: {e})", path=path) from e
    blobs = data.get("blobs", data) if isinstance(data, dict) else None
    if not isinstance(blobs, dict) or not blobs:
        raise OVDError("no weight blobs in the pickle (expected {'blobs': {name: array}})", path=path)
    state: dict[str, Tensor] = {}
    for blob, value in blobs.items():
        name = _torchvision_name(str(blob))
        if name is None or not isinstance(value, np.ndarray):
            continue  # classifier, momentum and other non-backbone blobs
        state[name] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    for name in [n for n in state if n.endswith(".bias") and (".bn" in n or "downsample.1" in n or n == "bn1.bias")]:
        prefix = name[: -len("bias")]
        state[prefix + "running_mean"] = torch.zeros_like(state[name])
        state[prefix + "running_var"] = torch.full_like(state[name], 1.0 - BN_EPS)
    return state
