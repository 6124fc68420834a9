"""Teacher-aware RKD through the trainer (issue #22): the weights are made once and kept in the store,
and weights that are all 1 train exactly the reference's model."""

from pathlib import Path

import numpy as np
import pytest
import torch

from ovd.config import load_config
from ovd.data.catalog import get_dataset
from ovd.data.coco import load_dataset
from ovd.distill.store import RegionStore, write_region_store
from ovd.engine.checkpoint import load_checkpoint
from ovd.engine.trainer import train

REPO = Path(__file__).parents[2]
RKD = ["solver.max_iter=2", "model.distill.enabled=true", "model.distill.irm_weight=0.15"]

pytestmark = pytest.mark.usefixtures("shared_datasets")


def _ground_truth_store(path: Path) -> Path:
    """A store whose regions are each training image's ground-truth boxes (up to 5, padded with a
    whole-image box) with random unit embeddings: no CLIP extraction needed."""
    records = load_dataset(get_dataset("ovshapes_small_train"))
    k, d = 5, 64
    rng = np.random.default_rng(0)
    boxes = np.zeros((len(records), k, 4), np.float32)
    valid = np.zeros((len(records), k), bool)
    for i, r in enumerate(records):
        b = np.concatenate([r.boxes[: k - 1], [[0, 0, r.width, r.height]]]).astype(np.float32)
        boxes[i, : len(b)], valid[i, : len(b)] = b, True
    emb = rng.normal(size=(len(records), k, d)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=2, keepdims=True)
    ids = np.array([r.image_id for r in records], np.int64)
    meta = {"dataset": "ovshapes_small_train", "clip": {"model": "random"}, "proposals": {"kind": "ground_truth"}}
    return write_region_store(path, image_ids=ids, boxes=boxes, embeddings=emb * valid[..., None], valid=valid,
                              metadata=meta)  # fmt: skip


def test_weights_made_once_and_all_ones_train_the_reference_model(tmp_path, tiny_train_overrides):
    store = _ground_truth_store(tmp_path / "store")

    def cfg(*extra):
        overrides = [*tiny_train_overrides, *RKD, f"data.region_store={store}", *extra]
        return load_config(REPO / "configs/ovshapes/base.yaml", overrides)

    train(cfg(), tmp_path / "uniform")
    # max_prob with floor 1 weighs every region 1: the weighted loss path must give the same model bit for bit
    train(cfg("model.distill.region_weighting=max_prob", "model.distill.weight_floor=1.0"), tmp_path / "ones")
    a = load_checkpoint(tmp_path / "uniform" / "model_final.pth")["model"]
    b = load_checkpoint(tmp_path / "ones" / "model_final.pth")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a real weighting with the contradiction filter: written into the store, described in its metadata
    train(cfg("model.distill.region_weighting=entropy", "model.distill.contradiction_iou=0.5"), tmp_path / "ent")
    described = RegionStore.open(store).metadata["region_weights"]
    assert len(described) == 2
    modes = sorted((h["mode"], h["contradiction_iou"]) for h in described.values())
    assert modes == [("entropy", 0.5), ("max_prob", 0.0)]
    c = load_checkpoint(tmp_path / "ent" / "model_final.pth")["model"]
    assert any(not torch.equal(a[k], c[k]) for k in a)
