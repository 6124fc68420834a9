"""LR schedule values and checkpoint safety."""

import errno
import logging

import pytest
import torch
from torch import nn

from ovd.engine.checkpoint import (
    last_checkpoint,
    load_checkpoint,
    load_model_state,
    remove_partial_checkpoints,
    save_checkpoint,
)
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


def test_checkpoint_pointer_and_errors(tmp_path, monkeypatch):
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

    # a failed save (the disk fills up mid-write) is one error; the previous checkpoint and pointer are kept
    def full_disk(state, f):
        f.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(torch, "save", full_disk)
        with pytest.raises(OVDError, match=r"model_0000020.pth: disk full .*checkpoint: model_0000010.pth.*--resume"):
            save_checkpoint(tmp_path / "model_0000020.pth", {"model": {}, "iteration": 20})
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


def test_truncated_checkpoints_and_a_bad_pointer(tmp_path, caplog):
    for it in (2, 4):
        save_checkpoint(
            tmp_path / f"model_{it:07d}.pth", {"model": {"w": torch.full((64,), float(it))}, "iteration": it}
        )
    newest = tmp_path / "model_0000004.pth"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # a crash or a copy cut it in half
    with pytest.raises(OVDError, match="model_0000004.pth: cannot read checkpoint, truncated or corrupt"):
        load_checkpoint(newest)
    with caplog.at_level(logging.WARNING):  # the pointer names the truncated file: the newest intact one is used
        assert last_checkpoint(tmp_path) == tmp_path / "model_0000002.pth"
    assert "model_0000004.pth, which is missing or truncated; resuming from model_0000002.pth" in caplog.text
    newest.unlink()  # a pointer to a missing file: the same
    assert last_checkpoint(tmp_path) == tmp_path / "model_0000002.pth"
    assert load_checkpoint(last_checkpoint(tmp_path))["iteration"] == 2
    (tmp_path / "model_0000002.pth").write_bytes(b"")
    assert last_checkpoint(tmp_path) is None  # nothing intact: start from scratch
    (tmp_path / ".model_0000006.pth.x1y2.tmp").write_bytes(b"PK")  # a killed write's temporary file
    (tmp_path / ".other.tmp").write_bytes(b"")
    assert remove_partial_checkpoints(tmp_path) == 1 and (tmp_path / ".other.tmp").exists()
