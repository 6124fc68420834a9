"""LR schedule values and checkpoint safety."""

import pytest
import torch
from torch import nn

from ovd.engine.checkpoint import last_checkpoint, load_checkpoint, load_model_state, save_checkpoint
from ovd.engine.schedule import lr_factor
from ovd.errors import OVDError


def test_warmup_multistep_values():
    kw = dict(warmup_iters=10, warmup_factor=0.001, steps=[20, 30], gamma=0.1)
    assert lr_factor(0, **kw) == pytest.approx(0.001)
    assert lr_factor(5, **kw) == pytest.approx(0.001 * 0.5 + 0.5)  # halfway: linear interpolation
    assert lr_factor(10, **kw) == 1.0
    assert lr_factor(19, **kw) == 1.0
    assert lr_factor(20, **kw) == pytest.approx(0.1)
    assert lr_factor(30, **kw) == pytest.approx(0.01)


def test_checkpoint_pointer_and_errors(tmp_path):
    model = nn.Linear(3, 2)
    save_checkpoint(tmp_path / "model_0000010.pth", {"model": model.state_dict(), "iteration": 10})
    assert last_checkpoint(tmp_path) == tmp_path / "model_0000010.pth"
    state = load_checkpoint(last_checkpoint(tmp_path))
    assert state["iteration"] == 10
    # a corrupt file is one clear error naming it
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(OVDError, match="bad.pth: cannot read checkpoint"):
        load_checkpoint(tmp_path / "bad.pth")
    with pytest.raises(OVDError, match="not found"):
        load_checkpoint(tmp_path / "none.pth")

    # a failed save leaves the previous good checkpoint and pointer untouched
    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path / "model_0000020.pth", {"model": {}, "bad": Boom()})
    assert last_checkpoint(tmp_path) == tmp_path / "model_0000010.pth"
    assert not (tmp_path / "model_0000020.pth").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_mismatched_model_state_is_reported():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    other = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1)).state_dict()
    with pytest.raises(OVDError, match="shape mismatches.*0.weight"):
        load_model_state(model, other, source="x.pth")
    partial = {k: v for k, v in model.state_dict().items() if k.startswith("0.")}
    with pytest.raises(OVDError, match="missing keys"):
        load_model_state(model, partial, source="x.pth")
    load_model_state(model, partial, source="x.pth", allow_missing=("1.",))
    extra = {**model.state_dict(), "2.weight": torch.zeros(1)}
    with pytest.raises(OVDError, match="unexpected keys"):
        load_model_state(model, extra, source="x.pth")


def _tiny_detector_like() -> nn.Module:
    """Stand-in with the attributes build_optimizer looks for: roi_heads.classifier, a norm, a frozen weight."""
    model = nn.Module()
    model.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4))
    model.roi_heads = nn.Module()
    model.roi_heads.fc = nn.Linear(4, 4)
    model.roi_heads.classifier = nn.Linear(4, 2)
    model.roi_heads.frozen = nn.Linear(2, 2).requires_grad_(False)
    return model


def test_classifier_lr_factor_groups_and_schedule():
    from ovd.config import SolverCfg
    from ovd.engine.trainer import build_optimizer

    model = _tiny_detector_like()
    plain = build_optimizer(SolverCfg(base_lr=0.02, weight_decay=1e-4), model)
    assert len(plain.param_groups) == 2  # factor 1: decay + norm groups only, as before the option existed
    assert sum(len(g["params"]) for g in plain.param_groups) == 8  # every trainable tensor once, frozen left out
    opt = build_optimizer(SolverCfg(base_lr=0.02, weight_decay=1e-4, classifier_lr_factor=10.0), model)
    decay, norm, head = opt.param_groups
    assert {id(p) for p in head["params"]} == {id(p) for p in model.roi_heads.classifier.parameters()}
    assert head["lr"] == pytest.approx(0.2) and decay["lr"] == pytest.approx(0.02)
    assert head["weight_decay"] == 1e-4 and norm["weight_decay"] == 0.0
    assert len(decay["params"]) == 4 and len(norm["params"]) == 2  # conv w+b, fc w+b; GN w+b
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda it: lr_factor(it, warmup_iters=10, warmup_factor=0.001, steps=[20], gamma=0.1)
    )
    for _ in range(25):
        opt.step()
        sched.step()
    assert head["lr"] == pytest.approx(0.02) and decay["lr"] == pytest.approx(0.002)  # both follow the schedule
    with pytest.raises(OVDError, match="classifier_lr_factor"):
        build_optimizer(SolverCfg(classifier_lr_factor=0.0), model)
