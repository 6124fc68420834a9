"""Two CPU processes (gloo) train the same model as one process with the same total batch."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ovd.config import load_config
from ovd.data.catalog import DatasetInfo, register_dataset
from ovd.engine.checkpoint import load_checkpoint

REPO = Path(__file__).parents[2]
SIZE = 128  # every image square, so the aspect grouping puts the same images in one global batch


def _make_dataset(root: Path) -> None:
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(8):
        img = np.full((SIZE, SIZE, 3), 40, np.uint8)
        for j in range(2):
            x, y = rng.integers(5, 70, size=2)
            w, h = rng.integers(20, 50, size=2)
            img[y : y + h, x : x + w] = (200, 60 + 80 * j, 30)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": j + 1,
                    "bbox": [int(x), int(y), int(w), int(h)],
                    "area": int(w * h),
                    "iscrowd": 0,
                }
            )
        cv2.imwrite(str(root / f"{i}.png"), img)
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": SIZE, "width": SIZE})
    cats = [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}, {"id": 3, "name": "green"}]
    (root / "train.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    np.save(root / "emb.npy", np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32))


def _register(root: Path) -> None:
    # the same images as pseudo-labelled data: each box is a pseudo box of its image-level label
    data = json.loads((root / "train.json").read_text())
    for img in data["images"]:
        img["pos_category_ids"] = sorted({a["category_id"] for a in data["annotations"] if a["image_id"] == img["id"]})
    (root / "pseudo.json").write_text(json.dumps(data))
    register_dataset(
        DatasetInfo(
            name="ddp_fixture_pseudo",
            image_root=str(root),
            ann_file=str(root / "pseudo.json"),
            class_names=("red", "blue", "green"),
            category_ids=(1, 2, 3),
            ann_type="pseudo",
        ),
        overwrite=True,
    )
    register_dataset(
        DatasetInfo(
            name="ddp_fixture",
            image_root=str(root),
            ann_file=str(root / "train.json"),
            class_names=("red", "blue", "green"),
            category_ids=(1, 2, 3),
            base_classes=(0, 1),
            novel_classes=(2,),
        ),
        overwrite=True,
    )


MULTI_SOURCE = (
    "data.sources=[{dataset: ddp_fixture, batch_size: 2, ratio: 1},"
    " {dataset: ddp_fixture_pseudo, supervision: pseudo, batch_size: 2, ratio: 1}]"
)


def _cfg(root: Path, *extra: str):
    return load_config(
        REPO / "configs/ovshapes/base.yaml",
        [
            "data.train=ddp_fixture",
            "data.test=",
            "data.num_workers=0",
            f"clip.embeddings={root / 'emb.npy'}",
            "solver.ims_per_batch=4",
            "solver.max_iter=1",
            "solver.warmup_iters=0",
            "solver.base_lr=0.01",
            "input.min_size_train=[128]",
            "input.min_size_train_sampling=choice",
            "input.max_size_train=128",
            "input.flip_prob=0.0",
            # take every anchor and proposal: no random subsampling, so both runs see the same samples
            "model.rpn.batch_size_per_image=1000000",
            "model.rpn.positive_fraction=1.0",
            "model.roi_heads.batch_size_per_image=1000000",
            "model.roi_heads.positive_fraction=1.0",
            *extra,
        ],
    )


# Run by torchrun in each process: loads this file by path, registers the fixture and trains.
_LAUNCH = """
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("ddp_test", sys.argv[1])
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
torch.set_num_threads(1)
from pathlib import Path
from ovd.engine.trainer import train
mod._register(Path(sys.argv[2]))
train(mod._cfg(Path(sys.argv[2]), *sys.argv[4:]), sys.argv[3])
torch.distributed.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)
    _make_dataset(tmp_path)
    _register(tmp_path)
    from ovd.engine.trainer import train

    train(_cfg(tmp_path), tmp_path / "single")
    script = tmp_path / "launch.py"
    script.write_text(_LAUNCH)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}"]
    cmd += [str(script), __file__, str(tmp_path), str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    from ovd.modeling.build import build_model

    init = build_model(_cfg(tmp_path), class_embeddings=torch.zeros(3, 64)).state_dict()
    single = load_checkpoint(tmp_path / "single" / "model_final.pth")["model"]
    ddp = load_checkpoint(tmp_path / "ddp" / "model_final.pth")["model"]
    num = den = 0.0
    for k, v in init.items():
        if not v.is_floating_point():
            continue
        d_single, d_ddp = single[k] - v, ddp[k] - v
        num += (d_ddp - d_single).pow(2).sum().item()
        den += d_single.pow(2).sum().item()
    assert den > 0  # the step changed the weights
    # equal up to float summation order (measured: ~3e-6); without the gradient all-reduce, rank 0
    # would step on half of the batch only
    assert (num / den) ** 0.5 < 1e-3


@pytest.mark.slow
def test_two_processes_multi_source(tmp_path, monkeypatch):
    """Ranks may draw batches of different supervision in the same iteration (box on one, pseudo on
    the other, METHOD §1.5): DDP must still step, with every rank logging the same loss keys."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _make_dataset(tmp_path)
    script = tmp_path / "launch.py"
    script.write_text(_LAUNCH)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}"]
    cmd += [str(script), __file__, str(tmp_path), str(tmp_path / "ddp"), MULTI_SOURCE, "solver.max_iter=6",
            "log_period=1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_checkpoint(tmp_path / "ddp" / "model_final.pth")["iteration"] == 6
