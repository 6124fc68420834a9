"""The OV-Shapes CLIP teacher's recipe and training data: :class:`TeacherConfig`, the rendered crops, their
tensors and augmentation (used by :mod:`ovd.clip.teacher`, which re-exports these names).

Crops come from :func:`ovd.data.ovshapes.render_object_crops` (its own seed stream, disjoint from the
detection train/val images) in fixed chunks whose seeds are derived from ``(seed, purpose, chunk)``,
so training and held-out evaluation crops never share a seed and the crops do not depend on the
number of render workers. Shape legend: ``B`` crops, ``N`` crops of a split, ``H×W`` crop size.
"""

from __future__ import annotations

import json
import math
import multiprocessing
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ovd.clip.model import ClipBundle
from ovd.clip.text import DEFAULT_TEMPLATES
from ovd.data.ovshapes import render_object_crops
from ovd.data.ovshapes_meta import CLASS_NAMES, DEFAULT_NOVEL
from ovd.errors import OVDError

_CHUNK_CROPS = 256  # crops per render job (fixed, so the crops do not depend on the worker count)
_CROP_STREAMS = {"train": 0, "eval": 1}  # seed streams of the teacher's training / held-out crops


@dataclass(frozen=True)
class TeacherConfig:
    """How the OV-Shapes teacher is trained (every field changes the resulting weights).

    The defaults fit the main job's budget (about 2 minutes on 2 idle CPU cores); the measured
    accuracy is in the sidecar (see the module docstring).
    """

    model_name: str = "ovd-tiny-cnn"
    """open_clip architecture, trained from random init; its image size must equal ``crop_size``."""
    num_train_crops: int = 12288
    """Training crops rendered once (all classes, uniformly); >= 1."""
    num_eval_crops: int = 2048
    """Held-out crops for the reported zero-shot accuracy (another seed stream); >= 1."""
    crop_size: int = 32
    """Crop side in px (= the CLIP input size)."""
    partial_prob: float = 0.25
    """Share of crops that cut 20-45 % of the object off (imperfect proposals), in [0, 1]."""
    context_prob: float = 0.3
    """Share of crops showing part of another object beside the main one, in [0, 1]."""
    steps: int = 1300
    """Optimizer steps; >= 1."""
    batch_size: int = 128
    """Crops per step (each with its own caption); >= 2."""
    lr: float = 6e-3
    """Peak AdamW learning rate, reached after ``warmup_steps``, then cosine decay to ``min_lr``."""
    min_lr: float = 1e-5
    """Learning rate at the last step."""
    warmup_steps: int = 25
    """Linear warm-up steps from 0 to ``lr``; >= 0."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay on matrices only (no biases, norms or logit scale), as open_clip."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas (open_clip's ViT defaults)."""
    grad_clip: float = 1.0
    """Max gradient L2 norm; 0 disables clipping."""
    temperature_init: float = 0.07
    """Initial softmax temperature (logit scale = 1 / T, learnt, clamped at 100), CLIP's 0.07."""
    label_aware: bool = True
    """Contrastive targets: all same-class pairs are positives (True) or only the own caption (False)."""
    class_prompts: bool = True
    """Add the prompts of **every** class (``eval_templates`` × class names) to each batch's texts, so
    every crop is contrasted with all classes, not only those in its batch (needs ``label_aware``)."""
    hflip_prob: float = 0.5
    """Probability of a horizontal flip per crop (the generator flips shapes too), in [0, 1]."""
    scale_jitter: float = 0.15
    """Zoom factor drawn log-uniformly in ``[1/(1+s), 1+s]`` per crop (box-size jitter); >= 0."""
    shift_jitter: float = 0.08
    """Translation per axis drawn uniformly in ``±shift_jitter`` of the crop side (box jitter); >= 0."""
    brightness_jitter: float = 0.1
    """Brightness offset drawn uniformly in ``±b`` (pixel values in [0, 1]); >= 0."""
    contrast_jitter: float = 0.2
    """Contrast factor drawn uniformly in ``[1-c, 1+c]``; in [0, 1)."""
    seed: int = 0
    """Seed of the crops, the initialisation and the batch order; >= 0."""
    novel_classes: tuple[str, ...] = DEFAULT_NOVEL
    """Class names reported as novel (the teacher still trains on them: it stands for web CLIP)."""
    eval_templates: tuple[str, ...] = DEFAULT_TEMPLATES
    """Prompt templates of the zero-shot classifier used for the reported accuracy."""

    def __post_init__(self) -> None:
        def check(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise OVDError(f"invalid teacher config: {what}", field=key)

        check(self.num_train_crops >= 1 and self.num_eval_crops >= 1, "num_*_crops", "must be >= 1")
        check(self.steps >= 1, "steps", "must be >= 1")
        check(self.batch_size >= 2, "batch_size", "must be >= 2")
        check(self.lr > 0 and 0 <= self.min_lr <= self.lr, "lr", "need lr > 0 and 0 <= min_lr <= lr")
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(self.temperature_init > 0, "temperature_init", "must be > 0")
        for key in ("partial_prob", "context_prob", "hflip_prob"):
            check(0 <= getattr(self, key) <= 1, key, "must lie in [0, 1]")
        check(0 <= self.contrast_jitter < 1, "contrast_jitter", "must lie in [0, 1)")
        check(min(self.scale_jitter, self.shift_jitter, self.brightness_jitter) >= 0, "jitter", "must be >= 0")
        check(self.seed >= 0, "seed", "must be >= 0")
        check(self.label_aware or not self.class_prompts, "class_prompts", "needs label_aware")
        unknown = [n for n in self.novel_classes if n not in CLASS_NAMES]
        check(not unknown, "novel_classes", f"unknown classes {unknown} (valid: {', '.join(CLASS_NAMES)})")

    def to_json(self) -> dict[str, Any]:
        """The config as plain JSON values (tuples become lists), as stored in the sidecar."""
        return json.loads(json.dumps(asdict(self)))


# ----------------------------------------------------------------------------------------------
# Crops


def _chunk_seed(seed: int, purpose: str, chunk: int) -> int:
    """Seed of one render chunk, derived from ``(seed, purpose, chunk)`` (32-bit)."""
    return int(np.random.SeedSequence([seed, _CROP_STREAMS[purpose], chunk]).generate_state(1)[0])


def _render_chunk(job: tuple[int, int, int, float, float]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    n, seed, size, partial_prob, context_prob = job
    return render_object_crops(n, seed, size=size, partial_prob=partial_prob, context_prob=context_prob)


def render_teacher_crops(
    cfg: TeacherConfig, purpose: str, *, workers: int = 1
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The teacher's training (``purpose="train"``) or held-out (``"eval"``) crops of all classes.

    Args:
        cfg: crop count, size, partial/context probabilities and seed.
        purpose: ``"train"`` or ``"eval"``: their chunk seeds come from different streams.
        workers: render processes (forked); the crops do not depend on it.

    Returns:
        ``uint8[N, H, W, 3]`` RGB crops, ``int64[N]`` class ids into :data:`CLASS_NAMES`, ``N`` captions.
    """
    if purpose not in _CROP_STREAMS:
        raise OVDError(f"unknown crop purpose {purpose!r} (valid: {', '.join(_CROP_STREAMS)})")
    total = cfg.num_train_crops if purpose == "train" else cfg.num_eval_crops
    sizes = [min(_CHUNK_CROPS, total - start) for start in range(0, total, _CHUNK_CROPS)]
    seeds = [_chunk_seed(cfg.seed, purpose, c) for c in range(len(sizes))]
    other = "eval" if purpose == "train" else "train"
    other_total = cfg.num_eval_crops if purpose == "train" else cfg.num_train_crops
    if set(seeds) & {_chunk_seed(cfg.seed, other, c) for c in range(-(-other_total // _CHUNK_CROPS))}:
        raise OVDError(f"seed {cfg.seed} gives train and eval crops a common chunk seed; pick another")
    jobs = [(n, s, cfg.crop_size, cfg.partial_prob, cfg.context_prob) for n, s in zip(sizes, seeds, strict=True)]
    if workers > 1 and len(jobs) > 1 and "forkserver" in multiprocessing.get_all_start_methods():
        # a fork server, not fork: forking a caller that runs threads can deadlock its children
        with multiprocessing.get_context("forkserver").Pool(min(workers, len(jobs))) as pool:
            parts = pool.map(_render_chunk, jobs, chunksize=1)  # ordered
    else:
        parts = [_render_chunk(job) for job in jobs]
    images = np.concatenate([p[0] for p in parts])  # (N, H, W, 3)
    class_ids = np.concatenate([p[1] for p in parts])  # (N,)
    return images, class_ids, [c for p in parts for c in p[2]]


def crops_to_tensor(images: np.ndarray | Tensor, clip: ClipBundle) -> Tensor:
    """Batched equivalent of ``clip.preprocess`` for crops already at the CLIP input size.

    Args:
        images: ``uint8[B, H, W, 3]`` RGB with ``(H, W) == clip.image_size``.
        clip: gives the normalisation (open_clip's ``preprocess_cfg`` mean and std).

    Returns:
        ``Tensor[B, 3, H, W]`` float32, equal to stacking ``clip.preprocess(PIL image)``.
    """
    x = torch.as_tensor(images)
    if x.ndim != 4 or x.shape[-1] != 3 or tuple(x.shape[1:3]) != clip.image_size:
        raise OVDError(f"expected crops of shape (B, {clip.image_size[0]}, {clip.image_size[1]}, 3), "
                       f"got {tuple(x.shape)}")  # fmt: skip
    return normalize(x.permute(0, 3, 1, 2).float().div(255.0), clip)  # (B, 3, H, W)


def normalize(x: Tensor, clip: ClipBundle) -> Tensor:
    """``Tensor[B, 3, H, W]`` in [0, 1] → open_clip's normalisation (``preprocess_cfg`` mean and std)."""
    cfg = clip.model.visual.preprocess_cfg
    mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


def augment(x: Tensor, cfg: TeacherConfig, generator: torch.Generator) -> Tensor:
    """Random flip, zoom/shift (reflection padding) and brightness/contrast of ``Tensor[B, 3, H, W]``
    in [0, 1] (before normalisation)."""
    b = x.shape[0]

    def uniform(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=generator)  # (B,)

    flip = torch.where(torch.rand(b, generator=generator) < cfg.hflip_prob, -1.0, 1.0)  # (B,)
    zoom = torch.exp(uniform(-1.0, 1.0) * math.log1p(cfg.scale_jitter))  # (B,) > 1: zoom out
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = zoom * flip
    theta[:, 1, 1] = zoom
    theta[:, :, 2] = 2 * cfg.shift_jitter * (2 * torch.rand(b, 2, generator=generator) - 1)  # grid is [-1, 1]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    contrast = uniform(1 - cfg.contrast_jitter, 1 + cfg.contrast_jitter).view(b, 1, 1, 1)
    shift = uniform(-cfg.brightness_jitter, cfg.brightness_jitter).view(b, 1, 1, 1)
    return ((x - mean) * contrast + mean + shift).clamp(0.0, 1.0)
