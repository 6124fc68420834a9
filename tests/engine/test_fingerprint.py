"""Finished work is reused only when it matches: --resume and pipeline stages compare fingerprints (change
one field → refused → rerun with the flag → the numbers of the new config), and one run per output folder."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ovd.config import load_config
from ovd.engine.checkpoint import load_checkpoint
from ovd.engine.fingerprint import (
    ABSENT,
    check_reuse,
    file_identity,
    fingerprint_diff,
    read_fingerprint,
    run_fingerprint,
)
from ovd.engine.trainer import train
from ovd.errors import OVDError
from ovd.pipeline import run_pipeline
from ovd.utils.lock import LOCK_FILE, create_pid_lock, output_lock

REPO = Path(__file__).parents[2]
# two iterations of the OV-Shapes baseline at 64-96 px with a random-init tiny CLIP
FAST = (  # noqa: SIM905 (one string: reads as a command line)
    "clip.pretrained= data.train=ovshapes_small_train data.test=ovshapes_small_val data.num_workers=0 "
    "solver.ims_per_batch=2 solver.max_iter=2 solver.warmup_iters=1 solver.steps=[1] input.min_size_train=[96] "
    "input.min_size_train_sampling=choice input.min_size_test=64 model.rpn.post_nms_top_n_test=20"
).split()
pytestmark = pytest.mark.usefixtures("shared_datasets")


def _cfg(*extra):
    return load_config(REPO / "configs/ovshapes/base.yaml", [*FAST, "data.test=", *extra])


def test_fingerprint_keys_and_diff(tmp_path):
    a = run_fingerprint(_cfg())
    assert a["config.seed"] == 0 and a["config.solver.max_iter"] == 2 and "version" in a
    assert "config.log_period" not in a and "config.data.num_workers" not in a  # result-neutral fields
    assert a["inputs.dataset.ovshapes_small_train"].startswith("sha256:")
    assert run_fingerprint(_cfg("log_period=7", "data.num_workers=3", "solver.checkpoint_period=1")) == a
    b = run_fingerprint(_cfg("seed=3", "init_weights=none.pth"))
    expected = [
        "config.init_weights: '' -> 'none.pth'",
        "config.seed: 0 -> 3",
        f"inputs.init_weights: None -> '{ABSENT}'",
    ]
    assert fingerprint_diff(a, b) == expected
    assert fingerprint_diff(a, {**a, "inputs.x": ABSENT}, ignore_absent=True) == []
    killed = tmp_path / "stage"  # a run killed before its first checkpoint: nothing to reuse, nothing refused
    killed.mkdir()
    (killed / "config.yaml").write_text("seed: 5\n")
    check_reuse([killed], [_cfg()])
    (killed / "model_0000002.pth").write_bytes(b"")  # but a checkpoint without a fingerprint is refused
    with pytest.raises(OVDError, match="no fingerprint.json"):
        check_reuse([killed], [_cfg()])


def test_region_store_identity_is_its_content_key(tmp_path):
    """A region store's identity follows how its arrays were made: per-region weights added later (named by
    the stages that use them), the creation time, statistics and file paths leave it unchanged (stages
    trained before a weighting was added stay valid); a result-changing field changes it."""
    store = tmp_path / "store"
    store.mkdir()
    meta = {
        "format": "ovd-region-store",
        "k": 16,
        "clip": {"model": "ovd-tiny-cnn", "weights_sha256": "ab", "pretrained": "/a/clip.pt"},
        "proposals": {"kind": "detector", "sha256": "cd", "path": "/a/model_final.pth"},
        "created": "2026-12-04T16:59:58+00:00",
        "num_regions": 24000,
    }
    (store / "meta.json").write_text(json.dumps(meta))
    first = file_identity(store)
    later = {
        **meta,
        "created": "2026-12-05T00:00:00+00:00",
        "num_regions": 7,
        "clip": {**meta["clip"], "pretrained": "/elsewhere/clip.pt"},
        "proposals": {**meta["proposals"], "path": "/elsewhere/model_final.pth"},
        "region_weights": {"w_8caf100996aa4137": {"mode": "max_prob", "temperature": 0.01}},
    }
    (store / "meta.json").write_text(json.dumps(later, indent=2))
    assert file_identity(store) == first
    for changed in ({**meta, "k": 5}, {**meta, "proposals": {**meta["proposals"], "sha256": "ef"}}):
        (store / "meta.json").write_text(json.dumps(changed))
        assert file_identity(store) != first
    (store / "meta.json").write_text("{not json")
    with pytest.raises(OVDError, match=r"meta\.json.*malformed JSON"):
        file_identity(store)
    (store / "meta.json").unlink()
    assert file_identity(store) == ABSENT  # a store whose merge never finished


def test_resume_refuses_result_changing_fields(tmp_path):
    train(_cfg(), tmp_path)
    written = (tmp_path / "config.yaml").read_text()
    with pytest.raises(
        OVDError, match=r"model_final.pth: --resume: .*\(solver.base_lr: 0.02 -> 0.5\); .*new --output-dir"
    ):
        train(_cfg("solver.base_lr=0.5", "log_period=1"), tmp_path, resume=True)
    assert (tmp_path / "config.yaml").read_text() == written  # not rewritten by the refused run
    # logging / workers may differ, and a run may be extended: it continues from iteration 2
    train(_cfg("solver.max_iter=3", "log_period=1", "data.num_workers=0"), tmp_path, resume=True)
    assert load_checkpoint(tmp_path / "model_final.pth")["iteration"] == 3
    assert read_fingerprint(tmp_path)["config.solver.max_iter"] == 3


def _pipeline(tmp_path: Path) -> Path:
    spec = {
        "stages": [{"name": "base", "config": str(REPO / "configs/ovshapes/base.yaml"), "overrides": FAST}],
        "demo_images": 0,
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_pipeline_reuses_a_stage_only_when_it_matches(tmp_path):
    pipe, out = _pipeline(tmp_path), tmp_path / "out"
    first = run_pipeline(pipe, out)
    assert run_pipeline(pipe, out)["stages"][0]["time_s"] is None  # same settings: skipped
    with pytest.raises(OVDError) as e:
        run_pipeline(pipe, out, ["seed=1"])
    assert "stage 'base' was made with other settings or inputs (config.seed: 0 -> 1)" in str(e.value)
    assert "new --output-dir" in str(e.value) and "--rerun-changed" in str(e.value)
    before = load_checkpoint(out / "base" / "model_final.pth")["model"]
    again = run_pipeline(pipe, out, ["seed=1"], rerun_changed=True)
    fresh = run_pipeline(pipe, tmp_path / "fresh", ["seed=1"])  # what seed 1 gives in a new folder
    a = load_checkpoint(out / "base" / "model_final.pth")["model"]
    b = load_checkpoint(tmp_path / "fresh" / "base" / "model_final.pth")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], before[k]) for k in a)
    assert again["stages"][0]["time_s"] is not None
    assert {k: v for k, v in again["stages"][0].items() if k != "time_s"} == {
        k: v for k, v in fresh["stages"][0].items() if k != "time_s"
    }
    assert first["stages"][0]["stage"] == "base"
    # a folder made by an earlier version (no fingerprint) is not reused silently either
    (out / "base" / "fingerprint.json").unlink()
    with pytest.raises(OVDError, match="no fingerprint.json"):
        run_pipeline(pipe, out, ["seed=1"])


def test_one_run_per_output_folder(tmp_path, caplog):
    live = {"pid": 1, "host": socket.gethostname(), "start": None, "time": 0, "command": "tools/train_net.py X"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(live))
    with pytest.raises(OVDError, match=rf"{LOCK_FILE}: another run is writing into this folder: pid 1 on .*train_net"):
        train(_cfg(), tmp_path)
    with pytest.raises(OVDError, match="another run is writing"):
        run_pipeline(_pipeline(tmp_path), tmp_path)
    assert not (tmp_path / "config.yaml").exists()
    other = dict(live, host="elsewhere")
    (tmp_path / LOCK_FILE).write_text(json.dumps(other))
    with pytest.raises(OVDError, match="another host: delete the file if that run is over"), output_lock(tmp_path):
        pass
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_FILE).write_text(json.dumps(dict(live, pid=int(dead.stdout))))  # a killed run's lock
    with output_lock(tmp_path) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
        with pytest.raises(OVDError, match=f"pid {os.getpid()}"), output_lock(tmp_path):  # a 2nd run here
            pass
    assert "taking over a stale lock" in caplog.text
    merge = tmp_path / "merge.lock"  # the region store's merge lock: "<pid> <host>"
    merge.write_text(f"{int(dead.stdout)} {socket.gethostname()}")  # a merge killed mid-way
    os.close(create_pid_lock(merge))
    assert merge.read_text() == f"{os.getpid()} {socket.gethostname()}"
    with pytest.raises(FileExistsError):  # held by a live process (this one)
        create_pid_lock(merge)
    assert not (tmp_path / LOCK_FILE).exists()  # released
