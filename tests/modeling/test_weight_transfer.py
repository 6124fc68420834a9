"""Weight-transfer classifier (METHOD §5, §10.8)."""

import torch
import torch.nn.functional as F
from torch import nn

from ovd.modeling.classifier import ZeroShotClassifier
from ovd.modeling.weight_transfer import WeightTransferClassifier


def make(in_dim: int = 3, embed_dim: int = 2, classes: int = 4, hidden: int = 5) -> WeightTransferClassifier:
    torch.manual_seed(0)
    emb = torch.randn(classes, embed_dim)
    return WeightTransferClassifier(
        in_dim, emb, temperature=50.0, use_bias=False, bias_init=0.0, hidden_dim=hidden, negative_slope=0.1
    )


def test_toy_transferred_weight() -> None:
    wt = make()
    with torch.no_grad():
        wt.linear.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))  # W_rkd (D=2, D'=3)
        wt.fc1.weight.copy_(torch.eye(2, 3))
        wt.fc1.bias.zero_()
        wt.fc2.weight.fill_(0.5)
        wt.fc2.bias.zero_()
    assert torch.allclose(wt.transferred_weight(), torch.full((2, 3), 0.5))


def test_shapes_at_reference_size() -> None:
    wt = WeightTransferClassifier(
        1024, torch.randn(7, 512), temperature=50.0, use_bias=True, bias_init=-4.6, hidden_dim=1024, negative_slope=0.1
    )
    assert wt.transferred_weight().shape == (512, 1024)
    assert wt(torch.randn(6, 1024)).shape == (6, 8)


def test_forward_formula_against_manual() -> None:
    wt = make()
    x = torch.randn(5, 3)
    act = nn.LeakyReLU(0.1)
    w_t = wt.fc2(act(wt.fc1(wt.linear.weight)))
    z = wt.fc4(act(wt.fc3(x))) + x @ w_t.T
    expected = 50.0 * F.normalize(z, dim=1) @ wt.vocabulary.T
    assert torch.allclose(wt(x), expected, atol=1e-5)
    assert torch.all(wt(x)[:, -1] == 0)  # background column


def test_frozen_projection_gets_no_gradient() -> None:
    wt = make()
    wt(torch.randn(4, 3)).sum().backward()
    assert wt.linear.weight.grad is None and wt.linear.bias.grad is None
    for fc in (wt.fc1, wt.fc2, wt.fc3, wt.fc4):
        assert fc.weight.grad is not None and fc.weight.grad.abs().sum() > 0


def test_project_is_the_frozen_rkd_projection() -> None:
    wt = make()
    x = torch.randn(4, 3)
    assert torch.equal(wt.project(x), wt.linear(x))
    plain = ZeroShotClassifier(3, torch.randn(4, 2), temperature=50.0, use_bias=False, bias_init=0.0)
    plain.load_state_dict({k: v for k, v in wt.state_dict().items() if k.startswith("linear.")})
    assert torch.equal(plain.project(x), wt.project(x))


def test_set_vocabulary_on_weight_transfer() -> None:
    wt = make()
    wt.set_vocabulary(torch.randn(9, 2))
    assert wt.num_classes == 9 and wt(torch.randn(2, 3)).shape == (2, 10)
