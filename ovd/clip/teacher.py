"""The OV-Shapes CLIP teacher: a tiny open_clip model trained contrastively on object crops.

It plays the part of web-pretrained CLIP for the synthetic OV-Shapes world: it sees crops of **all**
classes (base and novel) paired with varied prompts ("a photo of a red star", "a moon", ...), so the
detector can distil from it and use its text embeddings of the class names as the classifier. It is
saved as a plain open_clip state dict, which :func:`ovd.clip.create_clip` loads like any real CLIP
weights (``create_clip("ovd-tiny-cnn", pretrained=path)``).

Shape legend: ``B`` crops in a batch, ``U`` distinct captions in a batch, ``N`` evaluation crops,
``C`` classes, ``D`` CLIP embedding dim, ``H×W`` crop size.

The recipe (:class:`TeacherConfig`) and the training crops live in :mod:`ovd.clip.teacher_data`.

Accuracy vs. compute (16 classes, ``"a photo of a {}"``, 1,024 held-out crops, measured on a shared
2-core CPU; see the sidecar of each trained teacher for its own numbers): a ViT (``ovd-tiny``, 64 px)
reached 14 % after 240 steps and 46 % after 2,000; open_clip's ModifiedResNet (32 px) 68 % after 600.
The default, a small conv tower registered in timm (``ovd-tiny-cnn``, 32 px,
:mod:`ovd.clip.tiny_cnn`) with every class prompt added to each batch's texts, reaches ~89 % after 600
steps, 90.8 % (novel 89.3 %) after 1,000 and 94.8 % (novel 94.2 %, 2,048 held-out crops) after the
default 1,300.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
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
from ovd.clip.teacher_data import TeacherConfig, augment, crops_to_tensor, normalize, render_teacher_crops
from ovd.clip.text import DEFAULT_TEMPLATES, build_text_embeddings
from ovd.data.catalog import datasets_root
from ovd.data.ovshapes_meta import CLASS_NAMES
from ovd.errors import OVDError
from ovd.utils.io import read_json, write_json

__all__ = [  # the teacher's public names, wherever they are defined
    "FORMAT_NAME", "FORMAT_VERSION", "TEACHER_FILE", "TeacherConfig", "augment", "contrastive_loss", "crops_to_tensor",
    "ensure_teacher", "learning_rate", "normalize", "render_teacher_crops", "teacher_path", "train_teacher",
    "zero_shot_accuracy",
]  # fmt: skip

logger = logging.getLogger(__name__)

TEACHER_FILE = Path("ovshapes") / "teacher" / "ovshapes-clip.pt"
"""Where :func:`ensure_teacher` keeps the teacher, relative to the datasets root."""

FORMAT_NAME = "ovd.clip_teacher"
FORMAT_VERSION = 2  # bump when training changes in a way the config does not record

_MAX_LOGIT_SCALE = math.log(100.0)  # open_clip's clamp of the learnt logit scale (CLIP paper §2.5)
_EVAL_BATCH = 256  # crops per forward pass in zero_shot_accuracy


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


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
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
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, fused=True)
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
        x = normalize(x, clip).contiguous(memory_format=torch.channels_last)  # (B, 3, H, W)
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
