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
