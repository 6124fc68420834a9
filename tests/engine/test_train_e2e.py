"""End to end on the OV-Shapes `small` preset: train → checkpoint → resume → evaluate → metrics.json,
plus exact resumption and the one-line errors of the CLI."""

import json
import math
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


pytestmark = pytest.mark.usefixtures("shared_datasets")


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
        assert key in saved and 0.0 <= saved[key] <= 100.0  # a 4-iteration run: floors in test_floors_e2e.py
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
    # a mid-run evaluation (test.eval_period, result-neutral in the fingerprint) leaves the weights bit-equal
    evaluated = tmp_path / "evaluated"
    train(_cfg("solver.max_iter=4", "test.eval_period=2"), evaluated)
    assert (evaluated / "eval_0000002" / "metrics.json").is_file()
    c = load_checkpoint(evaluated / "model_final.pth")["model"]
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_amp_dtype_choice(caplog):
    from ovd.config import SolverCfg
    from ovd.engine.trainer import amp_dtype
    from ovd.errors import OVDError

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert amp_dtype(SolverCfg(amp=False, amp_dtype="bfloat16"), cpu) is None
    assert amp_dtype(SolverCfg(amp=True, amp_dtype="bfloat16"), cpu) is torch.bfloat16
    assert amp_dtype(SolverCfg(amp=True, amp_dtype="float16"), cuda) is torch.float16
    with caplog.at_level("WARNING"):
        assert amp_dtype(SolverCfg(amp=True, amp_dtype="float16"), cpu) is None  # as before: float32 on a CPU
    assert "CUDA only" in caplog.text
    with pytest.raises(OVDError, match=r"solver.amp_dtype: unknown 'half'"):
        amp_dtype(SolverCfg(amp=True, amp_dtype="half"), cpu)


def test_bfloat16_training_on_cpu(tmp_path):
    """solver.amp_dtype=bfloat16 trains on a CPU: finite losses, weights near the float32 run's but not equal
    (the forward really ran in bfloat16); float16 on a CPU falls back to exactly the float32 run."""
    common = ("solver.max_iter=2", "data.test=", "solver.warmup_iters=0", "solver.base_lr=0.01")
    train(_cfg(*common), tmp_path / "fp32")
    train(_cfg(*common, "solver.amp=true", "solver.amp_dtype=bfloat16"), tmp_path / "bf16")
    train(_cfg(*common, "solver.amp=true", "solver.amp_dtype=float16"), tmp_path / "fp16")
    a = load_checkpoint(tmp_path / "fp32" / "model_final.pth")["model"]
    b = load_checkpoint(tmp_path / "bf16" / "model_final.pth")["model"]
    c = load_checkpoint(tmp_path / "fp16" / "model_final.pth")["model"]
    assert all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)
    diffs = [(a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point()]
    assert all(math.isfinite(d) for d in diffs)
    assert max(diffs) > 1e-4  # a different computation (measured: 3e-3) ...
    assert max(diffs) < 0.05  # ... of the same two SGD steps


def test_skipped_optimizer_steps_keep_the_schedule_quiet(tmp_path, monkeypatch):
    """A float16 GradScaler skips the optimizer step of an iteration whose gradients overflowed (its first
    ones on a GPU). The schedule still follows iterations (as in detectron2) and torch's "scheduler stepped
    before optimizer" warning is not shown: reproduced on the CPU with a scaler that skips the first step."""
    import warnings

    from ovd.engine import trainer as trainer_module

    class SkipFirstStep(torch.amp.GradScaler):
        skipped = 0

        def step(self, optimizer, *args, **kwargs):
            if not SkipFirstStep.skipped:
                SkipFirstStep.skipped += 1
                return None  # what an overflowing iteration does: no optimizer.step()
            return optimizer.step()

    monkeypatch.setattr(trainer_module.torch.amp, "GradScaler", SkipFirstStep)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(_cfg("solver.max_iter=2", "data.test=", "solver.warmup_iters=0"), tmp_path)
    assert SkipFirstStep.skipped == 1
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)], [str(w.message) for w in caught]
    assert load_checkpoint(tmp_path / "model_final.pth")["iteration"] == 2


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
