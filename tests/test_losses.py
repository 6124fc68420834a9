"""Losses against the hand-computed values of METHOD §10 (2, 3, 4, 7, 10)."""

import math

import pytest
import torch

from ovd.data.builtin import COCO_CATEGORIES, _coco_split
from ovd.losses import (
    box_regression_loss,
    distill_l1_loss,
    fed_loss_classes,
    irm_loss,
    max_size_loss,
    pseudo_max_score_loss,
    sigmoid_ce_loss,
    zero_count_class_weight,
)


def bce(z: float, t: float) -> float:
    return max(z, 0) - z * t + math.log1p(math.exp(-abs(z)))


def test_sigmoid_ce_hand_computed():
    # METHOD §10.2: C = 3, two regions, gt = [0, background]
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    gt = torch.tensor([0, 3])
    assert sigmoid_ce_loss(logits, gt, torch.tensor([1.0, 0.0, 1.0])).item() == pytest.approx(1.243650, abs=1e-6)
    assert sigmoid_ce_loss(logits, gt).item() == pytest.approx(1.746854, abs=1e-6)
    # the same by the BCE definition: row 1 targets (1,0,0), row 2 all zero; background column dropped
    manual = (bce(2, 1) + bce(-1, 0) + bce(0.5, 0) + 3 * bce(0, 0)) / 2
    assert sigmoid_ce_loss(logits, gt).item() == pytest.approx(manual, abs=1e-6)


def test_sigmoid_ce_background_logit_is_ignored():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    other = logits.clone()
    other[0, 3] = 123.0
    gt = torch.tensor([1])
    assert sigmoid_ce_loss(logits, gt) == sigmoid_ce_loss(other, gt)


def test_sigmoid_ce_empty_has_gradient():
    logits = torch.zeros(0, 5, requires_grad=True)
    loss = sigmoid_ce_loss(logits, torch.zeros(0, dtype=torch.int64))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None


def test_zero_count_weight_is_the_coco_base_mask():
    # METHOD §10.3: image_count ** 0.5 > 1e-4 holds exactly on the 48 base classes of OV-COCO
    base, novel = _coco_split()
    counts = torch.zeros(len(COCO_CATEGORIES), dtype=torch.int64)
    counts[list(base)] = torch.arange(1, len(base) + 1)
    w = zero_count_class_weight(counts, power=0.5, thresh=1e-4)
    assert w.sum().item() == 48
    assert torch.equal(torch.nonzero(w).flatten(), torch.tensor(sorted(base)))


def test_fed_loss_class_set_properties():
    # METHOD §10.4
    torch.manual_seed(0)
    num_classes = 200
    freq = torch.rand(num_classes) + 0.1
    freq[:20] = 0  # never sampled
    gt = torch.tensor([25, 25, 30, num_classes])  # background included
    for _ in range(20):
        out = fed_loss_classes(gt, freq, 50)
        assert out.numel() == 50 and out.unique().numel() == 50
        assert {25, 30} <= set(out.tolist())
        assert (out < num_classes).all() and not ((out < 20) & ~torch.isin(out, gt)).any()
    many = torch.arange(20, 80)
    assert torch.equal(fed_loss_classes(many, freq, 50), many)


def test_box_regression_loss_is_l1_over_sampled():
    # METHOD §10.10: Σ_fg |δ̂ − δ| / N_sampled
    pred = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, -2.0]])
    target = torch.zeros(2, 4)
    assert box_regression_loss(pred, target, num_sampled=6, beta=0.0).item() == pytest.approx(3 / 6)
    # smooth L1 with beta 1: 0.5·1²/1 + (2 − 0.5) = 2.0
    assert box_regression_loss(pred, target, num_sampled=4, beta=1.0).item() == pytest.approx(2.0 / 4)
    empty = torch.zeros(0, 4, requires_grad=True)
    assert box_regression_loss(empty, empty.detach(), 10, 0.0).item() == 0.0


# --- region distillation (METHOD §10.5, §10.6) ---------------------------------------------------
S = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
T = torch.tensor([[1.0, 0.0], [1.0, 1.0]])


def test_distill_l1_hand_computed():
    # n(T) row 2 = (1/√2, 1/√2): |0 − 0.7071| + |1 − 0.7071| = 1, over 4 elements → 0.25
    raw = distill_l1_loss(S, T).item()
    assert raw == pytest.approx(0.25, abs=1e-6)
    assert 0.15 * 100 * raw == pytest.approx(3.75, abs=1e-5)  # COCO weights
    assert 0.25 * 100 * raw == pytest.approx(6.25, abs=1e-5)  # LVIS weights


def test_irm_hand_computed():
    raw = irm_loss(S, T).item()
    # G_S = I; G_T rows = rn([1, a], [a, 1]) with a = 1/√2 → each row (1, a)/√1.5: difference
    # 2·(1 − 1/√1.5)² + 2·(a/√1.5)² = 0.734014
    expected = 2 * (1 - 1 / math.sqrt(1.5)) ** 2 + 2 * (1 / math.sqrt(2) / math.sqrt(1.5)) ** 2
    assert raw == pytest.approx(expected, abs=1e-6)
    assert raw == pytest.approx(0.734014, abs=1e-6)
    assert 0.15 * 100 * raw == pytest.approx(11.010205, abs=1e-4)
    assert 0.13 * 100 * raw == pytest.approx(9.542178, abs=1e-4)


@pytest.mark.parametrize("loss", [distill_l1_loss, irm_loss])
def test_distill_invariances(loss):
    torch.manual_seed(0)
    s, t = torch.randn(7, 16), torch.randn(7, 16)
    assert loss(t, t).item() == pytest.approx(0.0, abs=1e-6)  # identical student and teacher
    perm = torch.randperm(7)
    assert loss(s[perm], t[perm]).item() == pytest.approx(loss(s, t).item(), rel=1e-5)  # row permutation
    scale = torch.rand(7, 1) + 0.5
    assert loss(s * scale, t).item() == pytest.approx(loss(s, t).item(), rel=1e-5)  # positive row scaling
    empty = torch.zeros(0, 16, requires_grad=True)
    value = loss(empty, torch.zeros(0, 16))
    value.backward()
    assert value.item() == 0.0 and empty.grad is not None


def test_irm_is_a_sum_not_a_mean():
    torch.manual_seed(1)
    s, t = torch.randn(4, 8), torch.randn(4, 8)
    loop = 0.0
    gs = torch.nn.functional.normalize(s, dim=1)
    gt = torch.nn.functional.normalize(t, dim=1)
    a, b = gs @ gs.T, gt @ gt.T
    for i in range(4):  # slow reference: normalise each Gram row, sum squared differences
        ra, rb = a[i] / a[i].norm(), b[i] / b[i].norm()
        loop += ((ra - rb) ** 2).sum().item()
    assert irm_loss(s, t).item() == pytest.approx(loop, rel=1e-5)


def test_weighted_distill_hand_computed():
    """Teacher-aware RKD (issue #22): per-region weights, reductions unchanged."""
    t = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    # per-row sums of |n(S) − n(T)|: row 0 |1−0|+|0−1| = 2, row 1 = 1 (as above); mean over R·D = 4
    assert distill_l1_loss(S, t).item() == pytest.approx(3 / 4, abs=1e-6)
    assert distill_l1_loss(S, t, torch.tensor([0.5, 1.0])).item() == pytest.approx((0.5 * 2 + 1) / 4, abs=1e-6)
    assert distill_l1_loss(S, t, torch.tensor([0.0, 0.0])).item() == 0.0
    # IRM with S, T of §10.6: diagonal difference d = 1 − 1/√1.5, off-diagonal o = (1/√2)/√1.5;
    # Σ w_i w_j diff² = (w0² + w1²)·d² + 2·w0·w1·o², here w = (1, 0.5)
    d, o = 1 - 1 / math.sqrt(1.5), 1 / math.sqrt(2) / math.sqrt(1.5)
    expected = (1 + 0.25) * d**2 + 2 * 0.5 * o**2
    assert irm_loss(S, T, torch.tensor([1.0, 0.5])).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.375425, abs=1e-6)


@pytest.mark.parametrize("loss", [distill_l1_loss, irm_loss])
def test_all_ones_weights_are_bitwise_the_reference(loss):
    torch.manual_seed(3)
    s = torch.randn(9, 32, requires_grad=True)
    t = torch.randn(9, 32)
    plain = loss(s, t)
    (g_plain,) = torch.autograd.grad(plain, s)
    ones = loss(s, t, torch.ones(9))
    (g_ones,) = torch.autograd.grad(ones, s)
    assert torch.equal(plain, ones) and torch.equal(g_plain, g_ones)
    # a zero-weight region gets no gradient from L1, and the weights themselves get none
    w = torch.ones(9, requires_grad=True)
    w_zero = torch.cat([torch.zeros(1), torch.ones(8)])
    (g,) = torch.autograd.grad(distill_l1_loss(s, t, w_zero), s)
    assert torch.count_nonzero(g[0]) == 0 and torch.count_nonzero(g[1:]) > 0
    loss(s, t, w).backward()
    assert w.grad is None


# --- PIS losses (METHOD §4.4, §10.7) ------------------------------------------------------------


def test_pseudo_max_score_case_1() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])  # C = 3 plus the background column
    inner = pseudo_max_score_loss(logits, torch.tensor([0]), torch.tensor([0]), 1)
    assert inner.item() == pytest.approx(2.107414, abs=1e-6)
    assert 0.1 * inner.item() == pytest.approx(0.210741, abs=1e-6)


def test_pseudo_max_score_case_2_two_labels_one_image() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.0, 1.0, -2.0, 0.0]])
    loss = pseudo_max_score_loss(logits, torch.tensor([0, 2]), torch.tensor([0, 0]), 1)
    assert 0.1 * loss.item() == pytest.approx(0.346695, abs=1e-6)


def test_pseudo_max_score_matches_slow_loop() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 6, generator=g)  # C = 5
    labels = torch.tensor([0, 4, 1, 2, 2, 3, 0])
    image = torch.tensor([0, 0, 1, 3, 3, 3, 1])  # image 2 has no pseudo box
    expected = 0.0
    for b in range(4):
        rows = [i for i in range(7) if image[i] == b]
        per_label = [sum(bce(float(logits[i, c]), float(c == labels[i])) for c in range(6)) for i in rows]
        expected += sum(per_label) / len(rows) if rows else 0.0
    loss = pseudo_max_score_loss(logits, labels, image, 4)
    assert loss.item() == pytest.approx(expected / 4, rel=1e-6)


def test_pseudo_max_score_empty_has_gradient() -> None:
    logits = torch.zeros(0, 4, requires_grad=True)
    loss = pseudo_max_score_loss(logits, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 3)
    assert loss.item() == 0.0 and loss.requires_grad


def test_max_size_loss_by_hand() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    labels = torch.tensor([[1.0, 0.0, 1.0]])  # the image is tagged with classes 0 and 2
    loss = max_size_loss(logits, labels, torch.tensor([0]), 2)  # two images, one without labels
    expected = (bce(2.0, 1) + bce(-1.0, 0) + bce(0.5, 1)) / 2  # foreground columns only
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError):
        max_size_loss(logits.repeat(2, 1), labels.repeat(2, 1), torch.tensor([0, 0]), 2)
