"""Losses against the hand-computed values of METHOD §10 (2, 3, 4, 10)."""

import math

import pytest
import torch

from ovd.data.builtin import COCO_CATEGORIES, _coco_split
from ovd.losses import box_regression_loss, fed_loss_classes, sigmoid_ce_loss, zero_count_class_weight


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
