"""End to end on the OV-Shapes `small` preset: train → checkpoint → resume → evaluate → metrics.json,
plus exact resumption and the one-line errors of the CLI."""

import json
from pathlib import Path

import pytest
import torch

from ovd.config import load_config
from ovd.engine.checkpoint import load_checkpoint
from ovd.engine.trainer import evaluate_checkpoint, train

REPO = Path(__file__).parents[2]
FAST = [
    "data.train=ovshapes_small_train",
    "data.test=ovshapes_small_val",
    "data.num_workers=0",
    "clip.pretrained=",  # random-init tiny CLIP: no weights needed
    "solver.ims_per_batch=2",
    "solver.warmup_iters=2",
    "solver.checkpoint_period=2",
    "log_period=1",
    "input.min_size_train=[128]",
    "input.min_size_train_sampling=choice",
    "input.min_size_test=128",
    "model.rpn.post_nms_top_n_test=50",
]


@pytest.fixture(autouse=True)
def _env(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.getbasetemp() / "datasets"  # shared across tests: generated once
    monkeypatch.setenv("OVD_DATASETS", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)


def _cfg(*extra):
    return load_config(REPO / "configs/ovshapes/base.yaml", [*FAST, *extra])


def test_train_resume_evaluate(tmp_path):
    metrics = train(_cfg("solver.max_iter=2"), tmp_path)
    first = load_checkpoint(tmp_path / "model_final.pth")
    assert first["iteration"] == 2
    # resume to 4 iterations
    metrics = train(_cfg("solver.max_iter=4"), tmp_path, resume=True)
    state = load_checkpoint(tmp_path / "model_final.pth")
    assert state["iteration"] == 4
    assert (tmp_path / "config.yaml").is_file()
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for key in ("AP50_novel", "AP50_base", "AP50_all", "AP"):
        assert key in saved and 0.0 <= saved[key] <= 100.0
    assert saved["AP50_all"] == metrics["AP50_all"]
    assert list((tmp_path / "tensorboard").iterdir())
    # --eval-only on the final weights gives the same numbers
    again = evaluate_checkpoint(_cfg("solver.max_iter=4"), str(tmp_path / "model_final.pth"), tmp_path / "e2")
    assert again["AP50_all"] == pytest.approx(metrics["AP50_all"])


def test_resume_is_exact(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(_cfg("solver.max_iter=4", "data.test="), straight)
    train(_cfg("solver.max_iter=2", "data.test="), split)
    train(_cfg("solver.max_iter=4", "data.test="), split, resume=True)
    a = load_checkpoint(straight / "model_final.pth")["model"]
    b = load_checkpoint(split / "model_final.pth")["model"]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_cli_bad_inputs(tmp_path, capsys):
    from importlib import util

    spec = util.spec_from_file_location("train_net", REPO / "tools/train_net.py")
    tool = util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    from ovd.utils.cli import run_cli

    cfg = str(REPO / "configs/ovshapes/base.yaml")
    assert run_cli(tool.main, ["--config-file", cfg, "data.train=nope_train"]) == 2
    assert "unknown dataset 'nope_train'" in capsys.readouterr().err
    assert run_cli(tool.main, ["--config-file", cfg, "solver.max_itr=3"]) == 2
    assert "did you mean 'solver.max_iter'" in capsys.readouterr().err
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00garbage")
    assert run_cli(tool.main, ["--config-file", cfg, *FAST, "--eval-only", "--weights", str(bad)]) == 2
    assert "bad.pth: cannot read checkpoint" in capsys.readouterr().err
