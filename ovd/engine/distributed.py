"""Thin helpers over ``torch.distributed`` for runs launched with ``torchrun`` (this rank's device:
:func:`ovd.runtime.device.local_device`)."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_objects",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_main_process",
    "reduce_mean",
    "synchronize",
]


def init_distributed(device: torch.device) -> None:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE > 1``); no-op otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def synchronize() -> None:
    if get_world_size() > 1:
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Gather a picklable object from every rank (a one-element list without distribution)."""
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Average scalars over ranks (for logging)."""
    if get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / get_world_size() for k, v in zip(keys, t.tolist(), strict=True)}
