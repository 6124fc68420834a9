"""RoIAlign with the sparse CPU backward: identical forward, torchvision's gradients, hand values."""

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign as TVMultiScaleRoIAlign
from torchvision.ops import roi_align as tv_roi_align

from ovd.modeling.roi_align import MultiScaleRoIAlign, RoIAlign, axis_weights, roi_align


def _grads(fn, features, rois, grad_out, *args):
    x = features.clone().requires_grad_()
    out = fn(x, rois, *args)
    out.backward(grad_out)
    return out, x.grad


def _random_rois(num, images, size, gen, *, max_side=140.0):
    xy = torch.rand(num, 2, generator=gen) * size - 20  # some start outside the map
    wh = torch.rand(num, 2, generator=gen) * max_side + 0.5
    batch = torch.randint(0, images, (num, 1), generator=gen).float()
    return torch.cat([batch, xy, xy + wh], dim=1)


def test_hand_values_centre_sample_and_far_edge():
    # one bin, one sample at (1.5, 1.5): a quarter of the gradient on each of the four pixels around it
    f = torch.zeros(1, 1, 4, 4, requires_grad=True)
    roi_align(f, torch.tensor([[0.0, 0.5, 0.5, 2.5, 2.5]]), (1, 1), 1.0, 1, False).backward(torch.ones(1, 1, 1, 1))
    expected = torch.zeros(4, 4)
    expected[1:3, 1:3] = 0.25
    assert torch.equal(f.grad[0, 0], expected)
    # sample at y = 3.5 (beyond the last row centre): the last row takes the whole y weight; x = 1.25
    g = torch.zeros(1, 1, 4, 4, requires_grad=True)
    roi_align(g, torch.tensor([[0.0, 0.75, 3.25, 1.75, 3.75]]), (1, 1), 1.0, 1, False).backward(torch.ones(1, 1, 1, 1))
    expected = torch.zeros(4, 4)
    expected[3, 1], expected[3, 2] = 0.75, 0.25
    assert torch.allclose(g.grad[0, 0], expected)


def test_axis_weights_hand_values():
    # one region from 0.5 of length 2 in 2 bins, 2 samples per bin: samples 0.75, 1.25 | 1.75, 2.25
    w, first = axis_weights(torch.tensor([0.5]), torch.tensor([2.0]), 2, torch.tensor([2]), 4)
    assert first.tolist() == [0]
    # bin 0: pixel 0 gets (.25 + 0)/2, pixel 1 gets (.75 + .75)/2 ... per sample weights (1 - frac, frac) / 2
    assert torch.allclose(w[0, 0], torch.tensor([0.125, 0.75, 0.125, 0.0]))
    assert torch.allclose(w[0, 1], torch.tensor([0.0, 0.125, 0.75, 0.125]))
    assert torch.allclose(w.sum(dim=2), torch.ones(1, 2))


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_matches_torchvision_forward_and_backward(aligned, sampling_ratio):
    gen = torch.Generator().manual_seed(0)
    for size, stride in [(20, 8), (10, 16), (5, 32)]:
        features = torch.randn(3, 6, size, size + 3, generator=gen)
        rois = _random_rois(60, 3, 160, gen)
        rois[0, 3:] = rois[0, 1:3]  # a zero-size region
        grad_out = torch.randn(60, 6, 7, 5, generator=gen)
        args = ((7, 5), 1.0 / stride, sampling_ratio, aligned)
        out_tv, grad_tv = _grads(tv_roi_align, features, rois, grad_out, *args)
        out, grad = _grads(roi_align, features, rois, grad_out, *args)
        assert torch.equal(out, out_tv)
        assert torch.allclose(grad, grad_tv, rtol=1e-5, atol=1e-5)


def test_gradcheck_double():
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(2, 3, 6, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    rois = _random_rois(5, 2, 40, gen, max_side=30.0).double()
    assert torch.autograd.gradcheck(lambda f: roi_align(f, rois, (3, 2), 1 / 4, 0, True), (features,))


def test_empty_rois_give_a_zero_gradient():
    f = torch.randn(2, 4, 5, 5, requires_grad=True)
    out = roi_align(f, torch.zeros(0, 5), (7, 7), 0.5, 0, False)
    assert out.shape == (0, 4, 7, 7)
    out.sum().backward()
    assert torch.equal(f.grad, torch.zeros_like(f))


def test_roi_align_module_takes_box_lists():
    gen = torch.Generator().manual_seed(2)
    f = torch.randn(2, 4, 12, 12, generator=gen)
    boxes = [torch.tensor([[1.0, 2.0, 30.0, 40.0]]), torch.tensor([[5.0, 5.0, 20.0, 9.0], [0.0, 0.0, 47.0, 47.0]])]
    out = RoIAlign(7, 0.25, 2, aligned=True)(f, boxes)
    rois = torch.cat([torch.tensor([[0.0], [1.0], [1.0]]), torch.cat(boxes)], dim=1)
    assert torch.equal(out, tv_roi_align(f, rois, (7, 7), 0.25, 2, True))


def test_multiscale_matches_torchvision():
    gen = torch.Generator().manual_seed(3)
    names = ["p3", "p4", "p5"]
    feats = {n: torch.randn(2, 8, 256 // s, 256 // s, generator=gen) for n, s in zip(names, (8, 16, 32), strict=True)}
    boxes = [_random_rois(k, 1, 230, gen, max_side=200.0)[:, 1:].clamp(0, 255) for k in (30, 45)]
    boxes = [torch.cat([b[:, :2], torch.maximum(b[:, 2:], b[:, :2] + 1)], dim=1) for b in boxes]
    sizes = [(256, 256), (256, 256)]
    grad_out = torch.randn(75, 8, 7, 7, generator=gen)
    results = []
    for pooler in (
        TVMultiScaleRoIAlign(names, 7, 0, canonical_scale=64),
        MultiScaleRoIAlign(names, 7, 0, canonical_scale=64),
    ):
        x = {n: t.clone().requires_grad_() for n, t in feats.items()}
        out = pooler(x, boxes, sizes)
        out.backward(grad_out)
        results.append((out, [x[n].grad for n in names]))
    (out_tv, grads_tv), (out, grads) = results
    assert torch.equal(out, out_tv)
    for g, g_tv in zip(grads, grads_tv, strict=True):
        assert torch.allclose(g, g_tv, rtol=1e-5, atol=1e-5)
