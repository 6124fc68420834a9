"""Teacher-aware RKD (issue #22): per-region weights from the teacher's posterior, the contradiction
filter, weights kept in the region store, and their way through the data loader into the losses."""

import math
import pickle

import numpy as np
import pytest
import torch

from ovd.distill.region_weights import (
    RegionWeighting,
    WeightedRegions,
    contradicted,
    ensure_weighted_regions,
    region_weights,
    teacher_confidence,
    teacher_posterior,
)
from ovd.distill.store import WEIGHTS_DIR, RegionStore, content_key, write_region_store
from ovd.errors import OVDError

E = torch.eye(4)  # text embeddings of 4 classes: the unit axes


def test_posterior_and_confidence_hand_computed():
    p = teacher_posterior(torch.tensor([[2.0, 0, 0, 0]]), E[:2], temperature=1.0)  # cosines (1, 0)
    assert p[0, 0].item() == pytest.approx(math.e / (math.e + 1), abs=1e-6)
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25] * 4, [1.0, 0, 0, 0]])
    # max_prob: 0.5, 0.25, 1; entropy: 1 − log 2/log 4 = 0.5, 1 − 1 = 0, 1 − 0 = 1
    assert teacher_confidence(probs, "max_prob").tolist() == pytest.approx([0.5, 0.25, 1.0])
    assert teacher_confidence(probs, "entropy").tolist() == pytest.approx([0.5, 0.0, 1.0], abs=1e-6)
    assert teacher_confidence(probs, "uniform").tolist() == [1.0, 1.0, 1.0]


def test_floor_and_modes():
    emb = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0, 0, 0]])  # undecided, sure
    w = region_weights(emb, E, RegionWeighting("entropy", temperature=0.01, floor=0.2))
    assert w[0].item() == pytest.approx(0.2) and w[1].item() == pytest.approx(1.0, abs=1e-6)
    assert region_weights(emb, E, RegionWeighting()).tolist() == [1.0, 1.0]
    with pytest.raises(OVDError, match="unknown region weighting"):
        RegionWeighting("confidence")
    with pytest.raises(OVDError, match="temperature"):
        RegionWeighting("max_prob", temperature=0.0)


def test_contradiction_cases():
    """Classes 0, 1 base, 2, 3 novel; one ground-truth box of class 0 at (0, 0, 10, 10)."""
    gt_boxes, gt_labels = torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([0])
    is_base = torch.tensor([True, True, False, False])
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 30]])
    top = torch.tensor([0, 1, 2, 0, 0])
    # confirmed (same box, same class) | wrong base class | novel call | base call on background |
    # loose box around the object (IoU 1/3 < 0.5: the box loss calls it background)
    got = contradicted(boxes, top, gt_boxes, gt_labels, is_base, 0.5)
    assert got.tolist() == [False, True, False, True, True]
    assert contradicted(boxes, top, gt_boxes, gt_labels, is_base, 0.3).tolist()[4] is False
    # an image without base objects: every base call is wrong
    assert contradicted(boxes, top, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), is_base, 0.5).tolist() == [
        True, True, False, True, True,
    ]  # fmt: skip
    # inside region_weights: contradicted regions × contradiction_weight, the others keep their weight
    emb = E[top]  # the teacher is sure of each top class
    w = region_weights(emb, E, RegionWeighting("max_prob", contradiction_iou=0.5, contradiction_weight=0.25),
                       boxes=boxes, ground_truth=(gt_boxes, gt_labels), is_base=is_base)  # fmt: skip
    assert w.tolist() == pytest.approx([1.0, 0.25, 1.0, 0.25, 0.25], abs=1e-5)


def _store(tmp_path):
    ids = np.array([3, 8], np.int64)
    valid = np.array([[True, True, False], [False, False, False]])  # image 8 has no region
    boxes = np.zeros((2, 3, 4), np.float32)
    boxes[0, :2] = [[0, 0, 10, 10], [20, 20, 40, 40]]
    emb = np.zeros((2, 3, 4), np.float32)
    emb[0, :2] = [[1, 0, 0, 0], [0.6, 0.8, 0, 0]]
    meta = {"dataset": "toy", "clip": {"model": "m", "weights_sha256": "w"}, "proposals": {"kind": "file"}}
    return write_region_store(tmp_path / "s", image_ids=ids, boxes=boxes, embeddings=emb, valid=valid, metadata=meta)


def test_weights_are_computed_once_and_kept_in_the_store(tmp_path):
    path = _store(tmp_path)
    key_before = content_key(RegionStore.open(path).metadata)
    weighting = RegionWeighting("max_prob", contradiction_iou=0.5)
    truth = {3: (np.array([[0, 0, 10, 10]], np.float32), np.array([1]))}  # region 0 is class 1, not 0
    with pytest.raises(OVDError, match="no region weights"):
        ensure_weighted_regions(path, E, weighting, truth, [0, 1], write=False)
    regions = ensure_weighted_regions(path, E, weighting, truth, [0, 1])
    store = RegionStore.open(path)
    (name, how), = store.metadata["region_weights"].items()  # fmt: skip
    assert how["mode"] == "max_prob" and how["contradiction_iou"] == 0.5 and how["base_classes"] == [0, 1]
    assert (path / WEIGHTS_DIR / f"{name}.npy").is_file()
    assert content_key(store.metadata) == key_before  # derived weights do not change the store's identity
    # region 0: teacher says class 0 (base), the ground truth says 1 → dropped; region 1: p = softmax(80·(.6, .8)
    # over 4 axes ≈ max 1 (16 logits apart), class 1 base, IoU 0 with the ground truth → dropped as well
    w = regions.lookup_weights(3)
    assert w.shape == (2,) and w.tolist() == [0.0, 0.0]
    assert regions.lookup_weights(8).shape == (0,) and regions.lookup_weights(99).shape == (0,)
    boxes, emb = regions.lookup(3)
    assert boxes.shape == (2, 4) and emb.shape == (2, 4)
    # no contradiction filter: the teacher's confidence (region 0 sure, region 1 a softmax over 60 vs 80)
    conf = ensure_weighted_regions(path, E, RegionWeighting("max_prob"))
    expected = 1 / (1 + math.exp(-20) + 2 * math.exp(-80))
    assert conf.lookup_weights(3).tolist() == pytest.approx([1.0, expected], abs=1e-6)
    assert len(RegionStore.open(path).metadata["region_weights"]) == 2
    # a second call reads what is stored (write=False would raise if it were missing)
    again = ensure_weighted_regions(path, E, RegionWeighting("max_prob"), write=False)
    assert again.name == conf.name
    clone = pickle.loads(pickle.dumps(again))  # DataLoader workers re-open by path and name
    assert isinstance(clone, WeightedRegions) and np.array_equal(clone.lookup_weights(3), again.lookup_weights(3))
    # another vocabulary is another array
    other = ensure_weighted_regions(path, E[[1, 0, 2, 3]], RegionWeighting("max_prob"))
    assert other.name != conf.name


def test_an_old_store_without_weights_reads_as_before(tmp_path):
    path = _store(tmp_path)
    store = RegionStore.open(path)
    assert store.region_weights("w_0123456789abcdef") is None
    assert store.locate(3) == (0, 2) and store.locate(8) == (1, 0) and store.locate(5) is None
