"""Class-agnostic mask head: shapes, targets and loss by hand, pasting, and Mask R-CNN end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ovd.config import load_config
from ovd.engine.trainer import train
from ovd.errors import OVDError
from ovd.modeling.build import build_model
from ovd.modeling.mask_head import MaskHead, mask_loss, mask_targets, paste_masks
from ovd.modeling.roi_align import fpn_pooler
from ovd.structures import Detections

REPO = Path(__file__).parents[2]

# pycocotools' C decoder trips a numpy-2 copy-keyword deprecation; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _features(channels: int = 8, size: int = 64, min_level: int = 3) -> dict[str, torch.Tensor]:
    return {f"p{k}": torch.randn(2, channels, size >> k, size >> k) for k in range(min_level, 7)}


def _head(resolution: int = 7, **kw) -> MaskHead:
    args = dict(pooler=fpn_pooler(resolution, 0, min_level=3), in_channels=8, num_conv=2, conv_dim=16) | kw
    return MaskHead(**args)


def test_shapes_and_one_channel():
    torch.manual_seed(0)
    head = _head()
    boxes = [torch.tensor([[4.0, 4, 40, 40], [0, 0, 64, 64]]), torch.tensor([[10.0, 20, 30, 50]])]
    out = head(_features(), boxes, [(64, 64), (64, 64)])
    assert out.shape == (3, 1, 14, 14)  # class-agnostic: one channel, M = 2 S
    assert head.mask_size == 14 and head.predictor.out_channels == 1
    assert head(_features(), [torch.zeros(0, 4), torch.zeros(0, 4)], [(64, 64)] * 2).shape == (0, 1, 14, 14)
    # detectron2 init: predictor ~ N(0, 0.001), zero biases
    assert head.predictor.weight.std() < 0.005 and not head.predictor.bias.any()


def test_mask_target_of_a_box_aligned_square_is_all_ones():
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 8:24, 8:24] = 1  # a 16 px square: pixels 8..23, i.e. pixel edges [8, 24)
    masks[1, 40:60, 30:50] = 1
    boxes = torch.tensor([[8.0, 8, 24, 24], [8, 8, 40, 24], [30, 40, 50, 60]])
    t = mask_targets(masks, boxes, torch.tensor([0, 0, 1]), 28)
    assert t.shape == (3, 28, 28) and t.dtype == torch.float32
    assert bool((t[0] == 1).all()) and bool((t[2] == 1).all())  # box == the square's extent → all ones
    # a box twice as wide holds the square in its left half. Bin j samples x = 8 + (j + ½)·32/28 (pixel
    # edges); the mask reads ≥ 0.5 up to x = 24, so columns j ≤ 13 are 1 (x = 23.4) and j ≥ 14 are 0 (24.6).
    assert bool((t[1][:, :14] == 1).all()) and not t[1][:, 14:].any()
    assert mask_targets(masks, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 28).shape == (0, 28, 28)


def test_mask_loss_equals_a_per_pixel_loop():
    torch.manual_seed(0)
    logits = torch.randn(3, 1, 4, 4)
    targets = (torch.rand(3, 4, 4) > 0.5).float()
    total = 0.0
    for r in range(3):
        for i in range(4):
            for j in range(4):
                z, t = float(logits[r, 0, i, j]), float(targets[r, i, j])
                p = 1 / (1 + torch.exp(torch.tensor(-z)))
                total += -(t * torch.log(p) + (1 - t) * torch.log(1 - p))
    assert torch.isclose(mask_loss(logits, targets), torch.as_tensor(total / 48), atol=1e-6)
    # by hand: a zero logit costs log 2 per pixel whatever the target
    assert torch.isclose(mask_loss(torch.zeros(2, 1, 3, 3), targets[:2, :3, :3]), torch.log(torch.tensor(2.0)))


def test_no_foreground_gives_zero_loss_with_gradient():
    head = _head()
    logits = head(_features(), [torch.zeros(0, 4), torch.zeros(0, 4)], [(64, 64)] * 2)
    loss = mask_loss(logits, torch.zeros(0, 14, 14))
    assert loss.item() == 0.0
    loss.backward()
    assert head.predictor.weight.grad is not None and not head.predictor.weight.grad.any()


def test_paste_round_trip_on_a_square():
    square = torch.zeros(64, 64)
    square[8:24, 16:40] = 1  # a 24 x 16 rectangle at pixel edges x [16, 40), y [8, 24)
    box = torch.tensor([[16.0, 8, 40, 24]])
    target = mask_targets(square[None], box, torch.tensor([0]), 28)  # (1, 28, 28) all ones
    pasted = paste_masks(target[:, None], box, (64, 64))  # (1, 64, 64)
    assert pasted.shape == (1, 64, 64)
    assert torch.equal((pasted[0] >= 0.5).float(), square)
    assert paste_masks(torch.zeros(0, 1, 28, 28), torch.zeros(0, 4), (5, 7)).shape == (0, 5, 7)


def test_paste_equals_torchvision_bitwise():
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    gen = torch.Generator().manual_seed(0)
    for h, w in [(64, 64), (50, 83)]:
        xy = torch.rand(40, 2, generator=gen) * 60
        boxes = torch.cat([xy, xy + torch.rand(40, 2, generator=gen) * 40 + 0.2], dim=1)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        boxes[0] = torch.tensor([3.0, 4.0, 3.2, 4.1])  # smaller than a pixel
        boxes[1] = torch.tensor([0.0, 0.0, w, h])  # the whole image
        masks = torch.rand(40, 1, 28, 28, generator=gen)
        assert torch.equal(paste_masks(masks, boxes, (h, w)), paste_masks_in_image(masks, boxes, (h, w))[:, 0])
    # a box beyond the image (torchvision raises): nothing pasted
    assert not paste_masks(torch.ones(1, 1, 28, 28), torch.tensor([[70.0, 70.0, 90.0, 90.0]]), (64, 64)).any()


def test_detections_carry_masks():
    d = Detections(torch.rand(3, 4), torch.rand(3), torch.arange(3), torch.rand(3, 1, 28, 28))
    sub = d[torch.tensor([2, 0])]
    assert torch.equal(sub.masks, d.masks[[2, 0]])
    assert d.scale(2.0, 3.0).masks is d.masks and d.to("cpu").masks is not None
    assert Detections.empty().masks is None and d[:1].masks.shape == (1, 1, 28, 28)


def test_model_mask_loss_and_inference():
    cfg = load_config(REPO / "configs/ovshapes_lt/base.yaml", ["model.mask.num_conv=1", "model.mask.conv_dim=16"])
    model = build_model(cfg, class_embeddings=F.normalize(torch.randn(16, 64), dim=1), class_image_counts=None)
    assert model.roi_heads.mask_head is not None and "loss_mask" in model.loss_names("box")
    image = torch.randint(0, 255, (3, 128, 160), dtype=torch.uint8)
    masks = torch.zeros(1, 128, 160, dtype=torch.uint8)
    masks[0, 20:70, 10:60] = 1
    target = {"boxes": torch.tensor([[10.0, 20, 60, 70]]), "labels": torch.tensor([3]), "masks": masks}
    losses = model.train()([image], [target])
    assert losses["loss_mask"].item() > 0
    losses["loss_mask"].backward()
    assert model.roi_heads.mask_head.predictor.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="masks"):
        model([image], [{k: v for k, v in target.items() if k != "masks"}])
    model.eval()
    with torch.no_grad():
        det = model([image])[0]
    assert det.masks is not None and det.masks.shape == (len(det), 1, 28, 28)
    assert det.masks.min() >= 0 and det.masks.max() <= 1


def test_mask_head_needs_fpn():
    cfg = load_config(None, ["model.mask.enabled=true"])  # default backbone: resnet50_c4
    with pytest.raises(OVDError, match="FPN backbone"):
        build_model(cfg, class_embeddings=torch.randn(4, 8))


FAST = [
    "data.train=ovshapes_lt_small_train_norare",
    "data.test=ovshapes_lt_small_val",
    "data.num_workers=0",
    "clip.pretrained=",  # random-init tiny CLIP: no weights needed
    "solver.ims_per_batch=2",
    "solver.warmup_iters=2",
    "solver.max_iter=3",
    "solver.checkpoint_period=3",
    "log_period=1",
    "input.min_size_train=[128]",
    "input.min_size_train_sampling=choice",
    "input.min_size_test=128",
    "model.rpn.post_nms_top_n_test=50",
    "model.roi_heads.score_thresh_test=0.0",  # 3 iterations leave every score near 0: keep them all ...
    "model.roi_heads.detections_per_image=20",  # ... but few, to keep the mask inference short
    "model.mask.conv_dim=16",
]


def test_mask_rcnn_trains_and_evaluates_on_ovshapes_lt(tmp_path, monkeypatch):
    monkeypatch.setenv("OVD_DATASETS", str(tmp_path / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)
    metrics = train(load_config(REPO / "configs/ovshapes_lt/base.yaml", FAST), tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert saved["dataset"] == "ovshapes_lt_small_val" and saved["iou_types"] == ["bbox", "segm"]
    for iou_type in ("bbox", "segm"):
        for key in ("AP", "APr", "APc", "APf"):
            value = saved[iou_type][key]
            assert value is None or 0.0 <= value <= 100.0  # 3 iterations: the LVIS path's floors are in
            # tests/engine/test_method_floors_e2e.py::test_lvis_path_floors
        assert saved[iou_type]["AP"] == metrics[iou_type]["AP"]
    detections = json.loads((tmp_path / "run" / "eval" / "detections.json").read_text())
    assert detections and all("segmentation" in d for d in detections)
    assert max(sum(d["image_id"] == i for d in detections) for i in {d["image_id"] for d in detections}) <= 20
    assert saved["bbox"]["num_detections"] > 0 and saved["segm"]["num_detections"] > 0


def test_pasted_perfect_masks_score_full_mask_ap():
    """encode_masks → COCO segm evaluation: masks equal to the GT give mask AP 100, a shifted one less."""
    from pycocotools import mask as mask_util

    from ovd.engine.evaluate import encode_masks
    from ovd.evaluation.coco_ovd import evaluate_ovd

    gt_mask = torch.zeros(48, 64, dtype=torch.uint8)
    gt_mask[8:24, 16:40] = 1  # a 24 x 16 rectangle
    rle = mask_util.encode(gt_mask.numpy()[:, :, None].copy(order="F"))[0]
    gt = {
        "images": [{"id": 1, "height": 48, "width": 64}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [16, 8, 24, 16], "area": 384.0,
                         "iscrowd": 0, "segmentation": {"size": [48, 64], "counts": rle["counts"].decode()}}],
        "categories": [{"id": 1, "name": "a"}],
    }  # fmt: skip
    box = torch.tensor([[16.0, 8, 40, 24]])
    full = Detections(box, torch.tensor([0.9]), torch.tensor([0]), torch.ones(1, 1, 28, 28))
    half = Detections(box, torch.tensor([0.9]), torch.tensor([0]), torch.ones(1, 1, 28, 28))
    half.masks[..., 14:] = 0  # the left half of the box only: mask IoU 0.5
    # full: mask IoU 1 → AP 100; half: IoU exactly 0.5 passes only the first of the ten thresholds → AP 10
    for det, expected in ((full, 100.0), (half, 10.0)):
        (segm,) = encode_masks(det, box, (48, 64))
        assert segm["size"] == [48, 64]
        result = [{"image_id": 1, "category_id": 1, "bbox": [16, 8, 24, 16], "score": 0.9, "segmentation": segm}]
        m = evaluate_ovd(gt, result, base_category_ids=[1], novel_category_ids=[], iou_type="segm")
        box_m = evaluate_ovd(gt, result, base_category_ids=[1], novel_category_ids=[])
        assert box_m["AP"] == pytest.approx(100.0)  # the boxes are perfect either way
        assert m["AP"] == pytest.approx(expected) and m["iou_type"] == "segm"
