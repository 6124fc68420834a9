"""Proposal sources: top-K selection after NMS, the COCO-results file reader, detector proposals."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ovd.distill.proposals import (
    DetectorProposals,
    FileProposals,
    build_proposal_source,
    clip_to_image,
    select_top_k,
)
from ovd.errors import OVDError
from ovd.structures import ImageRecord

REPO = Path(__file__).parents[2]


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OVD_DATASETS", str(tmp_path / "datasets"))
    torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------------
# select_top_k
# --------------------------------------------------------------------------------------------------


def test_select_top_k_hand_case():
    # Continuous areas; IoU with B, the best box that survives the size filter:
    boxes = np.array(
        [
            [0, 0, 10, 10],  # A 0.90: inter 9x10 = 90, union 110 -> IoU 0.818 > 0.5: suppressed
            [1, 0, 11, 10],  # B 0.95: kept first
            [5, 0, 15, 10],  # C 0.50: inter 6x10 = 60, union 140 -> IoU 0.429: kept
            [20, 20, 30, 30],  # D 0.70: disjoint: kept
            [40, 40, 40.5, 60],  # E 0.99: 0.5 px wide -> dropped before NMS despite the best score
            [0, 0, 10, 15],  # F 0.80: inter 90, union 100 + 150 - 90 = 160 -> IoU 0.5625: suppressed
            [50, 50, 60, 60],  # G 0.10: disjoint: kept, but 4th by score
            [2, 0, 12, 10],  # H 0.60: inter 9x10 = 90, union 110 -> IoU 0.818: suppressed
        ],
        dtype=np.float32,
    )
    scores = np.array([0.9, 0.95, 0.5, 0.7, 0.99, 0.8, 0.1, 0.6], dtype=np.float32)
    # survivors by score: B 0.95, D 0.7, C 0.5, G 0.1 -> top 3 = B, D, C
    kept, kept_scores = select_top_k(boxes, scores, nms_thresh=0.5, k=3)
    np.testing.assert_array_equal(kept, boxes[[1, 3, 2]])
    np.testing.assert_array_equal(kept_scores, np.array([0.95, 0.7, 0.5], dtype=np.float32))
    assert kept.dtype == np.float32 and kept_scores.dtype == np.float32
    # IoU exactly at the threshold is kept (only IoU > thresh is suppressed): IoU(A, C) = 1/3
    kept, _ = select_top_k(boxes[[0, 2]], scores[[0, 2]], nms_thresh=1 / 3 + 1e-6, k=5)
    assert len(kept) == 2
    kept, _ = select_top_k(boxes[[0, 2]], scores[[0, 2]], nms_thresh=0.3, k=5)
    assert len(kept) == 1


def test_select_top_k_empty_and_degenerate():
    kept, s = select_top_k(np.zeros((0, 4)), np.zeros(0), nms_thresh=0.5, k=5)
    assert kept.shape == (0, 4) and s.shape == (0,)
    tiny = np.array([[0, 0, 0.9, 10], [0, 0, 10, 0.5], [3, 3, 3, 3]], dtype=np.float32)
    kept, s = select_top_k(tiny, np.ones(3), nms_thresh=0.5, k=5)
    assert kept.shape == (0, 4)
    with pytest.raises(OVDError, match="NaN"):
        select_top_k(np.array([[0, 0, np.nan, 1]]), np.ones(1), nms_thresh=0.5, k=5)
    with pytest.raises(OVDError, match="k must be"):
        select_top_k(tiny, np.ones(3), nms_thresh=0.5, k=0)
    with pytest.raises(OVDError, match="NMS threshold"):
        select_top_k(tiny, np.ones(3), nms_thresh=0.0, k=1)


def test_clip_to_image():
    boxes = np.array([[-5, -2, 30, 12], [8, 9, 50, 60]], dtype=np.float32)
    np.testing.assert_array_equal(clip_to_image(boxes, 10, 20), [[0, 0, 20, 10], [8, 9, 20, 10]])


# --------------------------------------------------------------------------------------------------
# FileProposals
# --------------------------------------------------------------------------------------------------


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def _rec(image_id, h=100, w=200):
    return ImageRecord(image_id=image_id, file_name=f"/nonexistent/{image_id}.jpg", height=h, width=w)


def test_file_proposals_parse(tmp_path):
    path = _write(
        tmp_path / "props.json",
        [
            {"image_id": 7, "bbox": [10, 20, 30, 40], "score": 0.5, "category_id": 3},
            {"image_id": 9, "bbox": [0.5, 1.5, 2, 3], "score": 1},
            {"image_id": 7, "bbox": [1, 2, 3, 4], "score": 0.9},
        ],
    )
    src = FileProposals(path)
    assert src.image_ids == {7, 9} and not src.needs_images
    (b7, s7), (b8, s8), (b9, s9) = src([_rec(7), _rec(8), _rec(9)], None)
    # xywh -> xyxy: [10, 20, 30, 40] -> [10, 20, 40, 60]; the file's order is kept within an image
    np.testing.assert_array_equal(b7, [[10, 20, 40, 60], [1, 2, 4, 6]])
    np.testing.assert_array_equal(s7, np.array([0.5, 0.9], dtype=np.float32))
    assert b8.shape == (0, 4) and s8.shape == (0,)
    np.testing.assert_array_equal(b9, [[0.5, 1.5, 2.5, 4.5]])
    assert b7.dtype == np.float32 and s9.dtype == np.float32
    desc = src.describe()
    assert desc["kind"] == "file" and len(desc["sha256"]) == 64 and desc["path"].endswith("props.json")
    assert isinstance(build_proposal_source(path), FileProposals)


GOOD = {"image_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}


@pytest.mark.parametrize(
    ("entry", "field", "message"),
    [
        ("oops", "[1]", "expected an object"),
        ({"bbox": [0, 0, 1, 1], "score": 1}, "[1]", "missing key 'image_id'"),
        ({"image_id": 1, "score": 1}, "[1]", "missing key 'bbox'"),
        ({"image_id": 1, "bbox": [0, 0, 1, 1]}, "[1]", "missing key 'score'"),
        ({"image_id": "1", "bbox": [0, 0, 1, 1], "score": 1}, "[1].image_id", "integer id"),
        ({"image_id": True, "bbox": [0, 0, 1, 1], "score": 1}, "[1].image_id", "integer id"),
        ({"image_id": 1, "bbox": [0, 0, 1], "score": 1}, "[1].bbox", "expected 4 numbers"),
        ({"image_id": 1, "bbox": "0 0 1 1", "score": 1}, "[1].bbox", "expected 4 numbers"),
        ({"image_id": 1, "bbox": [0, 0, "1", 1], "score": 1}, "[1].bbox", "finite numbers"),
        ({"image_id": 1, "bbox": [0, 0, -1, 1], "score": 1}, "[1].bbox", "negative width"),
        ({"image_id": 1, "bbox": [0, 0, 1, 1], "score": None}, "[1].score", "finite number"),
    ],
)
def test_file_proposals_malformed_entry(tmp_path, entry, field, message):
    path = _write(tmp_path / "bad.json", [GOOD, entry])
    with pytest.raises(OVDError, match=message) as info:
        FileProposals(path)
    assert info.value.path == str(path) and info.value.field == field
    assert str(info.value).startswith(f"{path}: {field}: ")


def test_file_proposals_bad_files(tmp_path):
    with pytest.raises(OVDError, match="file not found"):
        FileProposals(tmp_path / "missing.json")
    bad = tmp_path / "broken.json"
    bad.write_text('[{"image_id": 1,')
    with pytest.raises(OVDError, match="broken.json: malformed JSON"):
        FileProposals(bad)
    with pytest.raises(OVDError, match="expected a list of COCO result entries, got a JSON dict"):
        FileProposals(_write(tmp_path / "dict.json", {"annotations": []}))
    with pytest.raises(OVDError, match="proposal source not found"):
        build_proposal_source(tmp_path / "nope.json")
    with pytest.raises(OVDError, match="cannot tell the proposal source"):
        build_proposal_source(_write(tmp_path / "props.txt", []))


# --------------------------------------------------------------------------------------------------
# DetectorProposals
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A randomly initialised OV-Shapes detector saved like the trainer's ``checkpoint_state``."""
    from ovd.config import config_to_yaml, load_config
    from ovd.modeling.build import build_model

    overrides = ["clip.pretrained=", "input.min_size_test=64", "input.max_size_test=128"]
    overrides += ["model.rpn.pre_nms_top_n_test=100", "model.rpn.post_nms_top_n_test=30"]
    cfg = load_config(REPO / "configs/ovshapes/base.yaml", overrides)
    emb = torch.nn.functional.normalize(torch.randn(3, 64, generator=torch.Generator().manual_seed(0)), dim=1)
    model = build_model(cfg, class_embeddings=emb)
    path = tmp_path_factory.mktemp("ckpt") / "model_final.pth"
    state = {
        "model": model.state_dict(),
        "config": config_to_yaml(cfg),
        "vocabulary": {"class_names": ["a", "b", "c"], "embeddings": emb},
    }
    torch.save(state, path)
    return path


def test_detector_proposals_in_original_pixels(tiny_checkpoint):
    from ovd.data.transforms import ResizeFlipAugmentation

    src = build_proposal_source(tiny_checkpoint)
    assert isinstance(src, DetectorProposals) and src.needs_images
    assert (src.min_size, src.max_size) == (64, 128)  # from the checkpoint's config
    rng = np.random.default_rng(0)
    sizes = [(50, 90), (120, 70)]  # (H, W): resized to 64x115 and 110x64 (short side 64)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    records = [_rec(i, h, w) for i, (h, w) in enumerate(sizes)]
    out = src(records, images)
    assert len(out) == 2
    aug = ResizeFlipAugmentation((64,), 128, flip_prob=0.0)
    for (boxes, scores), img, (h, w) in zip(out, images, sizes, strict=True):
        assert boxes.dtype == np.float32 and scores.dtype == np.float32
        assert 0 < len(boxes) <= 30 and boxes.shape == (len(scores), 4)
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= h).all()
        assert (np.diff(scores) <= 0).all()  # sorted by score
        # the same boxes by hand: propose on the resized image, divide by the resize factors
        p = aug.sample(h, w, rng)
        with torch.no_grad():
            resized = torch.from_numpy(p.apply_image(img)).permute(2, 0, 1)
            ref_boxes, ref_scores = src.model.propose([resized])[0]
        scale = np.array([p.out_w / w, p.out_h / h] * 2)
        expected = np.clip(ref_boxes.numpy() / scale, 0, [w, h, w, h])
        np.testing.assert_allclose(boxes, expected, rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(scores, ref_scores.numpy(), rtol=1e-5, atol=1e-6)
    desc = src.describe()
    assert desc["kind"] == "detector" and desc["min_size"] == 64 and len(desc["sha256"]) == 64


def test_detector_proposals_bad_checkpoint(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(OVDError, match="bad.pth: cannot read checkpoint"):
        DetectorProposals(bad)
    plain = tmp_path / "plain.pth"
    torch.save({"model": {}}, plain)
    with pytest.raises(OVDError, match="no config/vocabulary"):
        build_proposal_source(plain)
