"""Where a process runs its model: the device of this rank."""

from __future__ import annotations

import os

import torch


def local_device(name: str) -> torch.device:
    """``auto`` → this rank's CUDA device when CUDA is available, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        index = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(name)
