"""Loss functions: small, pure, with their reduction stated.

Shape shorthand: ``R`` regions (sampled proposals) of a batch, ``C`` classes (background = ``C``),
``D`` embedding dim.

``BCE(z, t) = max(z, 0) - z·t + log(1 + exp(-|z|))`` is ``binary_cross_entropy_with_logits``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sigmoid_ce_loss(logits: Tensor, gt_classes: Tensor, class_weight: Tensor | None = None) -> Tensor:
    """Per-class sigmoid BCE over foreground columns (METHOD §2.3, §10.2).

    ``L = Σ_{i, c<C} w_c · BCE(z_ic, 1[g_i = c]) / R``: the background column is dropped, so
    background regions have an all-zero target.

    Args:
        logits: ``Tensor[R, C+1]``.
        gt_classes: ``int64[R]`` in ``[0, C]``; ``C`` is background.
        class_weight: ``Tensor[C]`` (or ``Tensor[R, C]``) weights; ``None`` = all ones.

    Returns:
        A scalar; 0 (with gradient) when ``R == 0``.
    """
    num_classes = logits.shape[1] - 1
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    target = F.one_hot(gt_classes, num_classes + 1)[:, :num_classes].to(logits.dtype)  # (R, C)
    loss = F.binary_cross_entropy_with_logits(logits[:, :num_classes], target, reduction="none")  # (R, C)
    if class_weight is not None:
        loss = loss * class_weight
    return loss.sum() / logits.shape[0]


def zero_count_class_weight(image_counts: Tensor, *, power: float, thresh: float) -> Tensor:
    """``w_c = 1[image_count_c ** power > thresh]`` (METHOD §10.3): ignore classes never seen in training.

    Args:
        image_counts: ``Tensor[C]`` number of training images containing each class.
    Returns:
        ``float32[C]`` of zeros and ones.
    """
    freq = image_counts.float().pow(power)  # (C,)
    return (freq > thresh).float()


def fed_loss_classes(gt_classes: Tensor, freq_weight: Tensor, num_sample: int) -> Tensor:
    """Classes that get a loss under the federated loss (METHOD §2.3, §10.4).

    The classes present in the batch, plus classes drawn without replacement with probability
    ∝ ``freq_weight`` until ``num_sample`` are reached. Background and zero-frequency classes are
    never drawn.

    Args:
        gt_classes: ``int64[R]`` in ``[0, C]``.
        freq_weight: ``Tensor[C]`` sampling weights (``image_count ** 0.5``).
        num_sample: target size of the class set.
    Returns:
        ``int64[K]`` sorted unique class ids, ``K = max(num_sample, #appeared)`` when enough classes
        have non-zero frequency.
    """
    num_classes = freq_weight.shape[0]
    appeared = torch.unique(gt_classes)
    appeared = appeared[appeared < num_classes]  # (A,)
    if appeared.numel() >= num_sample:
        return appeared
    prob = freq_weight.float().clone()  # (C,)
    prob[appeared] = 0
    available = int((prob > 0).sum())
    extra = min(num_sample - appeared.numel(), available)
    if extra <= 0:
        return appeared
    sampled = torch.multinomial(prob, extra, replacement=False)  # (extra,)
    return torch.sort(torch.cat([appeared, sampled.to(appeared.device)]))[0]


def box_regression_loss(pred_deltas: Tensor, target_deltas: Tensor, num_sampled: int, beta: float) -> Tensor:
    """Class-agnostic box loss ``Σ_fg smoothL1_β(δ̂ − δ) / N_sampled`` (METHOD §10.10).

    Args:
        pred_deltas, target_deltas: ``Tensor[F, 4]`` for the F foreground regions.
        num_sampled: number of sampled regions (foreground + background) in the batch.
        beta: smooth-L1 beta; 0 gives plain L1.
    """
    if pred_deltas.shape[0] == 0:
        return pred_deltas.sum() * 0.0
    if beta < 1e-5:
        loss = (pred_deltas - target_deltas).abs().sum()
    else:
        loss = F.smooth_l1_loss(pred_deltas, target_deltas, beta=beta, reduction="sum")
    return loss / max(num_sampled, 1)


def distill_l1_loss(student: Tensor, teacher: Tensor, weight: Tensor | None = None) -> Tensor:
    """RKD point-wise loss ``mean_{r,d} w_r |n(S)_rd − n(T)_rd|`` (METHOD §3.5, §10.5).

    Args:
        student, teacher: ``Tensor[R, D]`` region embeddings (normalised here).
        weight: ``Tensor[R]`` per-region weights (constants: no gradient flows into them), or
            ``None`` = the reference's unweighted loss. The reduction stays a mean over all ``R·D``
            elements, so a region of weight ``w_r < 1`` pulls less and the loss is not renormalised
            by ``Σ w`` (all-ones weights give the unweighted value bit for bit).
    Returns:
        A scalar; 0 (with gradient) when ``R == 0``.
    """
    if student.shape[0] == 0:
        return student.sum() * 0.0
    diff = (F.normalize(student, dim=1) - F.normalize(teacher, dim=1)).abs()  # (R, D)
    if weight is not None:
        diff = diff * weight.detach().to(diff.dtype)[:, None]  # (R, D)
    return diff.mean()


def irm_loss(student: Tensor, teacher: Tensor, weight: Tensor | None = None) -> Tensor:
    """Inter-embedding relationship matching ``Σ_ij w_i w_j (rn(n(S) n(S)ᵀ) − rn(n(T) n(T)ᵀ))_ij²``
    (METHOD §3.5, §10.6).

    ``n`` normalises rows, ``rn`` normalises each row of the ``R×R`` Gram matrix. The reduction is a
    Frobenius **sum** (not a mean over ``R²``), as in the reference, so its scale grows with ``R``.
    With per-region weights a pair counts with ``w_i·w_j`` (a relation is trusted only as much as
    both of its regions); the Gram rows are still normalised over all ``R`` regions.

    Args:
        student, teacher: ``Tensor[R, D]`` region embeddings of the whole batch.
        weight: ``Tensor[R]`` per-region weights (constants), or ``None`` = unweighted (all-ones
            weights give the unweighted value bit for bit).
    """
    if student.shape[0] == 0:
        return student.sum() * 0.0
    s = F.normalize(student, dim=1)  # (R, D)
    t = F.normalize(teacher, dim=1)  # (R, D)
    g_s = F.normalize(s @ s.T, dim=1)  # (R, R)
    g_t = F.normalize(t @ t.T, dim=1)  # (R, R)
    sq = (g_s - g_t).pow(2)  # (R, R)
    if weight is not None:
        w = weight.detach().to(sq.dtype)  # (R,)
        sq = sq * (w[:, None] * w[None, :])  # (R, R)
    return sq.sum()


def pseudo_max_score_loss(logits: Tensor, labels: Tensor, image_index: Tensor, num_images: int) -> Tensor:
    """PIS "pseudo max-score" loss (METHOD §4.4, §10.7), without its weight.

    Each row is the region of one pseudo box, labelled with the image-level class it was made for:
    ``L = (1/B) Σ_b (1/|L_b|) Σ_{ℓ∈L_b} Σ_{c=0..C} BCE(z_{k(ℓ),c}, 1[c=ℓ])``. The sum runs over **all**
    ``C+1`` columns, background included, with no class weight: every other class is a negative.

    Args:
        logits: ``Tensor[P, C+1]`` logits of the ``P`` pseudo-box regions of the batch.
        labels: ``int64[P]`` the class ``ℓ`` of each row, in ``[0, C)``.
        image_index: ``int64[P]`` the batch image ``b`` of each row, in ``[0, num_images)``.
        num_images: ``B``, the images of the batch (those without a pseudo box count, with loss 0).

    Returns:
        A scalar; 0 (with gradient) when ``P == 0``.
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    target = F.one_hot(labels, logits.shape[1]).to(logits.dtype)  # (P, C+1)
    per_row = F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(dim=1)  # (P,)
    rows_per_image = torch.bincount(image_index, minlength=num_images).to(logits.dtype)  # (B,)
    return (per_row / rows_per_image[image_index]).sum() / num_images


def max_size_loss(logits: Tensor, labels: Tensor, image_index: Tensor, num_images: int) -> Tensor:
    """Detic's image-label loss: the largest proposal of each image takes all of its labels.

    ``L = (1/B) Σ_b Σ_{c<C} BCE(z_{k_b,c}, 1[c ∈ L_b])`` with ``k_b`` the largest proposal of image
    ``b`` (Zhou et al. 2022, "max-size"); foreground columns only.

    Args:
        logits: ``Tensor[B', C+1]`` logits of the largest proposal of each image that has labels.
        labels: ``Tensor[B', C]`` multi-hot image-level labels of those images.
        image_index: ``int64[B']`` their batch images (rows must be distinct images).
        num_images: ``B``.

    Returns:
        A scalar; 0 (with gradient) when ``B' == 0``.
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    if image_index.unique().numel() != image_index.numel():
        raise ValueError("max_size_loss takes one row per image")
    num_classes = logits.shape[1] - 1
    loss = F.binary_cross_entropy_with_logits(logits[:, :num_classes], labels.to(logits.dtype), reduction="none")
    return loss.sum() / num_images
