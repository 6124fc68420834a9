"""The OV-Shapes CLIP teacher: a tiny open_clip model trained contrastively on object crops.

It plays the part of web-pretrained CLIP for the synthetic OV-Shapes world: it sees crops of **all**
classes (base and novel) paired with varied prompts ("a photo of a red star", "a moon", ...), so the
detector can distil from it and use its text embeddings of the class names as the classifier. It is
saved as a plain open_clip state dict, which :func:`ovd.clip.create_clip` loads like any real CLIP
weights (``create_clip("ovd-tiny-cnn", pretrained=path)``).

Shape legend: ``B`` crops in a batch, ``U`` distinct captions in a batch, ``N`` evaluation crops,
``C`` classes, ``D`` CLIP embedding dim, ``H×W`` crop size.

Crops come from :func:`ovd.data.ovshapes.render_object_crops` (its own seed stream, disjoint from the
detection train/val images) in fixed chunks whose seeds are derived from ``(seed, purpose, chunk)``,
so training and held-out evaluation crops never share a seed and the crops do not depend on the
number of render workers.

Accuracy vs. compute (16 classes, ``"a photo of a {}"``, 1,024 held-out crops, measured on a shared
2-core CPU; see the sidecar of each trained teacher for its own numbers): a ViT (``ovd-tiny``, 64 px)
reached 14 % after 240 steps and 46 % after 2,000; open_clip's ModifiedResNet (32 px) 68 % after 600.
The default, a small conv tower registered in timm (``ovd-tiny-cnn``, 32 px,
:mod:`ovd.clip.tiny_cnn`) with every class prompt added to each batch's texts, reaches ~89 % after 600
steps, 90.8 % (novel 89.3 %) after 1,000 and 94.8 % (novel 94.2 %, 2,048 held-out crops) after the
default 1,300.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from ovd.clip.model import ClipBundle, create_clip, file_sha256, save_clip_checkpoint
from ovd.clip.text import DEFAULT_TEMPLATES, build_text_embeddings
from ovd.data.catalog import datasets_root
from ovd.data.ovshapes import CLASS_NAMES, DEFAULT_NOVEL, render_object_crops
from ovd.errors import OVDError
from ovd.utils.io import read_json, write_json

logger = logging.getLogger(__name__)

TEACHER_FILE = Path("ovshapes") / "teacher" / "ovshapes-clip.pt"
"""Where :func:`ensure_teacher` keeps the teacher, relative to the datasets root."""

FORMAT_NAME = "ovd.clip_teacher"
FORMAT_VERSION = 2  # bump when training changes in a way the config does not record

_CHUNK_CROPS = 256  # crops per render job (fixed, so the crops do not depend on the worker count)
_CROP_STREAMS = {"train": 0, "eval": 1}  # seed streams of the teacher's training / held-out crops
_MAX_LOGIT_SCALE = math.log(100.0)  # open_clip's clamp of the learnt logit scale (CLIP paper §2.5)
_EVAL_BATCH = 256  # crops per forward pass in zero_shot_accuracy


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
    if workers > 1 and len(jobs) > 1 and "fork" in multiprocessing.get_all_start_methods():
        with multiprocessing.get_context("fork").Pool(min(workers, len(jobs))) as pool:
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
    return _normalize(x.permute(0, 3, 1, 2).float().div(255.0), clip)  # (B, 3, H, W)


def _normalize(x: Tensor, clip: ClipBundle) -> Tensor:
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


# ----------------------------------------------------------------------------------------------
# Loss and schedule


def contrastive_loss(
    image_features: Tensor, text_features: Tensor, logit_scale: Tensor, image_labels: Tensor, text_labels: Tensor
) -> Tensor:
    """Symmetric CLIP cross-entropy with soft targets spread uniformly over all same-label pairs.

    With ``image_labels == text_labels == arange(B)`` this is open_clip's ``ClipLoss`` exactly.

    Args:
        image_features: ``Tensor[B, D]``, unit rows.
        text_features: ``Tensor[U, D]``, unit rows.
        logit_scale: scalar tensor (``exp`` of the learnt log scale).
        image_labels: ``Tensor[B]``; each label must also occur in ``text_labels``.
        text_labels: ``Tensor[U]``; texts whose label has no image in the batch (e.g. the prompt of a
            class absent from it) are negatives of every image and have no text-to-image term.

    Returns:
        Scalar: (mean over the B image rows + mean over the text rows with a positive) / 2 of the
        cross-entropy.
    """
    logits = logit_scale * image_features @ text_features.T  # (B, U)
    positive = (image_labels[:, None] == text_labels[None, :]).float()  # (B, U)
    i2t = -(positive / positive.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    has_image = positive.sum(0) > 0  # (U,)
    pos_t = positive.T[has_image]  # (U', B)
    t2i = -(pos_t / pos_t.sum(1, keepdim=True) * logits.T[has_image].log_softmax(1)).sum(1).mean()
    return (i2t + t2i) / 2


def learning_rate(step: int, cfg: TeacherConfig) -> float:
    """Linear warm-up to ``cfg.lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at the end."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip's split: no decay on gains, biases, norms and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if skip else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


# ----------------------------------------------------------------------------------------------
# Evaluation


def zero_shot_accuracy(
    clip_bundle: ClipBundle,
    images: np.ndarray | Sequence[np.ndarray],
    class_ids: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
    novel_ids: Sequence[int],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
) -> dict[str, Any]:
    """Zero-shot top-1 of crops against the text embeddings of all ``class_names``.

    Each crop goes through the bundle's own ``preprocess`` (open_clip's val transform on a PIL image);
    the prediction is the class whose :func:`ovd.clip.build_text_embeddings` row has the highest cosine
    similarity. The base/novel numbers are top-1 over **all** classes, averaged over the crops whose
    true class is base/novel.

    Args:
        clip_bundle: the CLIP.
        images: ``N`` ``uint8[H, W, 3]`` RGB crops.
        class_ids: ``N`` true class ids into ``class_names``.
        class_names: the ``C`` class names (the vocabulary).
        novel_ids: ids of the novel classes; all others are base.
        templates: prompt templates (``"a photo of a {}"``).

    Returns:
        ``{"top1", "top1_base", "top1_novel"}`` in percent (None for an empty subset),
        ``{"num", "num_base", "num_novel"}`` crop counts and ``"per_class"`` ``{name: percent or None}``.
    """
    labels = torch.as_tensor(np.asarray(class_ids), dtype=torch.long)  # (N,)
    if len(images) != labels.numel():
        raise OVDError(f"{len(images)} images but {labels.numel()} class ids", field="class_ids")
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise OVDError(f"class ids must lie in [0, {len(class_names)})", field="class_ids")
    text = build_text_embeddings(clip_bundle, class_names, templates).to(clip_bundle.device)  # (C, D)
    preds = [torch.zeros(0, dtype=torch.long)]
    for start in range(0, len(images), _EVAL_BATCH):
        batch = [clip_bundle.preprocess(Image.fromarray(np.asarray(im))) for im in images[start : start + _EVAL_BATCH]]
        feats = F.normalize(clip_bundle.encode_images(torch.stack(batch)), dim=-1)  # (b, D)
        preds.append((feats @ text.T).argmax(dim=1).cpu())  # (b,)
    correct = (torch.cat(preds) == labels).float()  # (N,)
    is_novel = torch.isin(labels, torch.as_tensor(list(novel_ids), dtype=torch.long))  # (N,)

    def pct(mask: Tensor) -> float | None:
        return round(100.0 * float(correct[mask].mean()), 2) if bool(mask.any()) else None

    return {
        "top1": pct(torch.ones_like(is_novel)),
        "top1_base": pct(~is_novel),
        "top1_novel": pct(is_novel),
        "num": int(labels.numel()),
        "num_base": int((~is_novel).sum()),
        "num_novel": int(is_novel.sum()),
        "per_class": {name: pct(labels == k) for k, name in enumerate(class_names)},
    }


# ----------------------------------------------------------------------------------------------
# Training


def train_teacher(cfg: TeacherConfig, output: Path, *, progress: bool = True, workers: int | None = None) -> dict:
    """Train the teacher from random init, save it to ``output`` and its JSON sidecar next to it.

    The model is open_clip's ``cfg.model_name`` trained with its own forward (normalised image and
    text features, learnt logit scale) on :func:`render_teacher_crops` and their captions, with
    :func:`contrastive_loss` and AdamW (warm-up + cosine). The reported accuracy is measured on the
    checkpoint as reloaded by :func:`create_clip`, on held-out crops.

    Args:
        cfg: the hyper-parameters.
        output: checkpoint path (``.pt``); written atomically, sidecar at ``output.with_suffix(".json")``.
        progress: show a tqdm bar (with ETA).
        workers: crop render processes (default: up to 2); results do not depend on it.

    Returns:
        The sidecar's content: ``config``, ``accuracy`` (see :func:`zero_shot_accuracy`),
        ``class_names``, ``novel_classes``, ``checkpoint``, ``checkpoint_sha256``, ``losses`` (per step),
        timings and versions.
    """
    output = Path(output)
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    start = time.perf_counter()
    images, labels, captions = render_teacher_crops(cfg, "train", workers=workers)
    eval_images, eval_labels, _ = render_teacher_crops(cfg, "eval", workers=workers)
    render_s = time.perf_counter() - start
    logger.info("rendered %d train + %d eval crops in %.1fs", len(images), len(eval_images), render_s)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        clip = create_clip(cfg.model_name)  # random init
    if clip.image_size != (cfg.crop_size, cfg.crop_size):
        raise OVDError(f"crop_size {cfg.crop_size} differs from {cfg.model_name}'s input size {clip.image_size}")
    model = clip.model
    # channels-last convolutions: ~20 % faster steps of the small conv tower on the CPU (same maths)
    model.visual.to(memory_format=torch.channels_last)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1.0 / cfg.temperature_init))
    # fused: one kernel for all parameters (the per-tensor loop was ~20 % of a one-thread step, most
    # of it on the 3.2M-parameter token embedding); same update rule, different float rounding
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, fused=True)
    pixels = torch.from_numpy(images)  # (N, H, W, 3) uint8
    labels_t = torch.from_numpy(labels)  # (N,)
    tokens = clip.tokenizer(captions)  # (N, L)
    _, caption_ids = np.unique(np.asarray(captions), return_inverse=True)
    caption_ids = torch.from_numpy(caption_ids.reshape(-1))  # (N,) equal captions share an id
    prompts = [(t.format(name), k) for k, name in enumerate(CLASS_NAMES) for t in cfg.eval_templates]
    prompt_tokens = clip.tokenizer([p for p, _ in prompts])  # (P, L)
    prompt_labels = torch.tensor([k for _, k in prompts])  # (P,)
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.zeros(0, dtype=torch.long)
    losses: list[float] = []
    model.train()
    bar = tqdm(range(cfg.steps), desc="teacher", unit="step", disable=not progress, dynamic_ncols=True)
    for step in bar:
        if order.numel() < cfg.batch_size:
            order = torch.cat([order, torch.randperm(len(images), generator=g)])
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]  # (B,)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        x = augment(pixels[idx].permute(0, 3, 1, 2).float().div(255.0), cfg, g)  # (B, 3, H, W)
        x = _normalize(x, clip).contiguous(memory_format=torch.channels_last)  # (B, 3, H, W)
        if cfg.label_aware:  # encode each distinct caption once; its label is its crop's class
            first = _first_occurrence(caption_ids[idx])  # (U,)
            text_idx, image_labels, text_labels = idx[first], labels_t[idx], labels_t[idx[first]]
        else:
            text_idx, image_labels = idx, torch.arange(len(idx))
            text_labels = image_labels
        text_tokens = tokens[text_idx]  # (U, L)
        if cfg.class_prompts:
            text_tokens = torch.cat([text_tokens, prompt_tokens])  # (U + P, L)
            text_labels = torch.cat([text_labels, prompt_labels])
        image_features, text_features, logit_scale = model(x, text_tokens)  # (B, D), (U', D), ()
        loss = contrastive_loss(image_features, text_features, logit_scale, image_labels, text_labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, _MAX_LOGIT_SCALE)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", scale=f"{float(logit_scale.detach()):.1f}")
    bar.close()
    model.eval()
    model.visual.to(memory_format=torch.contiguous_format)  # the checkpoint stores plain tensors
    train_s = time.perf_counter() - start - render_s

    sha = save_clip_checkpoint(model, output)
    reloaded = create_clip(cfg.model_name, pretrained=output)  # exactly how users load it
    novel_ids = [CLASS_NAMES.index(n) for n in cfg.novel_classes]
    accuracy = zero_shot_accuracy(reloaded, eval_images, eval_labels, CLASS_NAMES, novel_ids, cfg.eval_templates)
    record = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": cfg.to_json(),
        "model_name": cfg.model_name,
        "checkpoint": output.name,
        "checkpoint_sha256": sha,
        "class_names": list(CLASS_NAMES),
        "novel_classes": list(cfg.novel_classes),
        "accuracy": accuracy,
        "losses": [round(v, 5) for v in losses],
        "seconds": {
            "render": round(render_s, 2),
            "train": round(train_s, 2),
            "total": round(time.perf_counter() - start, 2),
        },
        "torch_threads": torch.get_num_threads(),
        "open_clip_version": open_clip.__version__,
        "torch_version": torch.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(output.with_suffix(".json"), record)
    logger.info(
        "teacher saved to %s: zero-shot top-1 %.2f%% (base %.2f%%, novel %.2f%%) in %.0fs",
        output, accuracy["top1"], accuracy["top1_base"] or 0.0, accuracy["top1_novel"] or 0.0,
        record["seconds"]["total"],
    )  # fmt: skip
    return record


def _first_occurrence(ids: Tensor) -> Tensor:
    """For each distinct value of ``Tensor[B]``, the index of its first occurrence (``Tensor[U]``)."""
    uniq, inverse = torch.unique(ids, return_inverse=True)  # (U,), (B,)
    positions = torch.arange(ids.numel())
    first = torch.full((uniq.numel(),), ids.numel(), dtype=torch.long).scatter_reduce(
        0, inverse, positions, reduce="amin"
    )  # (U,)
    return first


def teacher_path(root: Path | None = None) -> Path:
    """``<root>/ovshapes/teacher/ovshapes-clip.pt`` (root: :func:`ovd.data.catalog.datasets_root`)."""
    return Path(datasets_root() if root is None else root) / TEACHER_FILE


def _up_to_date(path: Path, cfg: TeacherConfig) -> str | None:
    """Why the teacher at ``path`` must be (re)trained for ``cfg``; None when it is current."""
    sidecar = path.with_suffix(".json")
    if not path.is_file() or not sidecar.is_file():
        return "missing"
    try:
        record = read_json(sidecar)
    except OVDError:
        return "unreadable sidecar"
    if not isinstance(record, dict) or record.get("format") != FORMAT_NAME:
        return "not a teacher sidecar"
    if record.get("format_version") != FORMAT_VERSION or record.get("config") != cfg.to_json():
        return "config differs"
    if record.get("checkpoint_sha256") != file_sha256(path):
        return "checkpoint does not match its sidecar"
    return None


def ensure_teacher(root: Path | None = None, cfg: TeacherConfig | None = None) -> Path:
    """The OV-Shapes teacher checkpoint, trained first when missing or made with another config.

    Args:
        root: datasets root (default :func:`ovd.data.catalog.datasets_root`).
        cfg: training config (default :class:`TeacherConfig`).

    Returns:
        ``<root>/ovshapes/teacher/ovshapes-clip.pt``, loadable with
        ``create_clip(cfg.model_name, pretrained=path)``.
    """
    cfg = TeacherConfig() if cfg is None else cfg
    path = teacher_path(root)
    reason = _up_to_date(path, cfg)
    if reason is not None:
        logger.info("training the OV-Shapes CLIP teacher (%s): %s", reason, path)
        train_teacher(cfg, path)
    return path
