"""The detectron2-compatible model options, each against hand-derived values, and their ONNX export."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models import resnet
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import roi_align

from ovd.config import load_config
from ovd.modeling.anchors import Detectron2AnchorGenerator, cell_anchors
from ovd.modeling.backbone import move_stride_to_1x1
from ovd.modeling.build import build_model
from ovd.modeling.mask_head import paste, paste_masks_grid
from ovd.modeling.roi_align import MultiScaleRoIAlign
from ovd.modeling.rpn import build_rpn

REPO = Path(__file__).parents[2]


def test_cell_anchors_are_unrounded_and_size_major():
    a = cell_anchors([32, 64], [0.5, 1.0, 2.0])  # (6, 4)
    w, h = math.sqrt(32**2 / 0.5), 0.5 * math.sqrt(32**2 / 0.5)  # 45.25 x 22.63: h / w = ratio, area = 32²
    torch.testing.assert_close(a[0], torch.tensor([-w / 2, -h / 2, w / 2, h / 2]))
    torch.testing.assert_close(a[1], torch.tensor([-16.0, -16.0, 16.0, 16.0]))
    torch.testing.assert_close(a[3], torch.tensor([-w, -h, w, h]))  # size 64, ratio 0.5: the 2nd size after 3 ratios


def test_anchor_grid_uses_the_given_stride_not_the_padded_size():
    gen = Detectron2AnchorGenerator([[32]], [1.0], strides=[16])
    images = ImageList(torch.zeros(1, 3, 37, 75), [(37, 75)])  # 75 // 5 = 15 would be torchvision's stride
    (anchors,) = gen(images, [torch.zeros(1, 8, 3, 5)])
    assert anchors.shape == (15, 4)
    torch.testing.assert_close(anchors[1], torch.tensor([0.0, -16.0, 32.0, 16.0]))  # x = 16, y = 0
    torch.testing.assert_close(anchors[5], torch.tensor([-16.0, 0.0, 16.0, 32.0]))  # row 1: y = 16
    assert gen.num_anchors_per_location() == [1]


def test_stride_moves_to_the_1x1_conv():
    net = resnet.resnet50(weights=None)
    before = {k: v.shape for k, v in net.state_dict().items()}
    move_stride_to_1x1(net)
    for layer in (net.layer2, net.layer3, net.layer4):
        assert layer[0].conv1.stride == (2, 2) and layer[0].conv2.stride == (1, 1)
        assert layer[1].conv1.stride == (1, 1) and layer[1].conv2.stride == (1, 1)
    assert net.layer1[0].conv1.stride == (1, 1)
    assert {k: v.shape for k, v in net.state_dict().items()} == before  # the same weights load
    x = torch.randn(1, 256, 8, 8)
    block = net.layer2[0].eval()
    with torch.no_grad():  # the block by hand: 1x1 stride 2, 3x3 stride 1
        y = torch.relu(block.bn1(torch.nn.functional.conv2d(x, block.conv1.weight, stride=2)))
        y = torch.relu(block.bn2(torch.nn.functional.conv2d(y, block.conv2.weight, padding=1)))
        y = torch.relu(block.bn3(block.conv3(y)) + block.downsample(x))
        torch.testing.assert_close(block(x), y)


def _d2_style(cfg_file: str, *extra: str):
    return load_config(
        REPO / cfg_file,
        [
            "model.input_format=BGR",
            "model.pixel_mean=[10.0,20.0,30.0]",
            "model.pixel_std=[1.0,1.0,1.0]",
            "model.size_divisibility=0",
            "model.rpn.anchor_style=detectron2",
            "model.rpn.nms_on_logits=true",
            "model.rpn.min_size=0",
            "model.roi_heads.fpn_pooler_aligned=true",
            *extra,
        ],
    )


def test_bgr_input_and_no_padding():
    cfg = _d2_style("configs/ovshapes/base.yaml")
    model = build_model(cfg, class_embeddings=torch.randn(4, 64))
    image = torch.zeros(3, 5, 7, dtype=torch.uint8)
    image[0] = 200  # red
    batch = model.preprocess([image])
    assert batch.tensors.shape == (1, 3, 5, 7)  # size_divisibility 0: not padded
    torch.testing.assert_close(batch.tensors[0, :, 0, 0], torch.tensor([-10.0, -20.0, 170.0]))  # B, G, R - mean


def test_nms_on_logits_keeps_the_higher_logit_where_probabilities_tie():
    def rpn(on_logits: bool):
        r = build_rpn(in_channels=4, anchor_sizes=[[32]], aspect_ratios=[1.0], fg_iou_thresh=0.7, bg_iou_thresh=0.3,
                      batch_size_per_image=8, positive_fraction=0.5, pre_nms_top_n={"training": 10, "testing": 10},
                      post_nms_top_n={"training": 10, "testing": 10}, nms_thresh=0.7, smooth_l1_beta=0.0,
                      loss_weight=1.0, anchor_style="detectron2", strides=[16], min_size=0.0,
                      nms_on_logits=on_logits)  # fmt: skip
        return r.eval()

    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.5], [20.0, 20.0, 20.0, 30.0]]])  # last: empty
    logits = torch.tensor([[20.0, 21.0, 25.0]])  # sigmoid: all exactly 1.0 in float32
    assert torch.sigmoid(logits[0, 0]) == torch.sigmoid(logits[0, 1])
    (kept,), (scores,) = rpn(True).filter_proposals(boxes, logits, [(50, 50)], [3])
    torch.testing.assert_close(kept, boxes[0, 1:2])  # the higher logit survives; the empty box is dropped
    assert scores.tolist() == [1.0]
    (kept_tv,), _ = rpn(False).filter_proposals(boxes, logits, [(50, 50)], [3])
    assert len(kept_tv) == 1  # torchvision ranks equal probabilities by index


def test_aligned_multiscale_pooler_is_roi_align_v2():
    feats = {"p2": torch.randn(1, 3, 16, 16), "p3": torch.randn(1, 3, 8, 8)}
    boxes = [torch.tensor([[3.0, 5.0, 20.0, 30.0]])]  # small: pooled from p2 (stride 4)
    pooler = MultiScaleRoIAlign(["p2", "p3"], 7, 0, canonical_scale=224, canonical_level=4, aligned=True)
    got = pooler(feats, boxes, [(64, 64)])
    want = roi_align(feats["p2"], boxes, 7, spatial_scale=0.25, sampling_ratio=0, aligned=True)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, roi_align(feats["p2"], boxes, 7, spatial_scale=0.25, sampling_ratio=0))


def test_grid_paste_covers_exactly_the_box_pixels():
    ones = torch.ones(1, 1, 28, 28)
    pasted = paste_masks_grid(ones, torch.tensor([[10.0, 4.0, 20.0, 9.0]]), (16, 32))[0]  # (16, 32)
    want = torch.zeros(16, 32, dtype=torch.bool)
    want[4:9, 10:20] = True  # pixel centres x + 0.5 in (10, 20), y + 0.5 in (4, 9)
    assert torch.equal(pasted >= 0.5, want)
    assert paste_masks_grid(ones, torch.tensor([[40.0, 40.0, 50.0, 50.0]]), (16, 32)).sum() == 0  # off the image
    torch.testing.assert_close(
        paste(ones, torch.tensor([[10.0, 4.0, 20.0, 9.0]]), (16, 32), "detectron2"), pasted[None]
    )
    with pytest.raises(ValueError, match="paste style"):
        paste(ones, torch.zeros(1, 4), (4, 4), "caffe")


@pytest.mark.slow  # torch.export of a detector: ~25 s of the ~60 s that tests/compat takes on 2 idle cores
def test_detectron2_options_export_to_onnx(tmp_path):
    """BGR, no padding, detectron2 anchors, NMS on logits and the aligned FPN pooler: the exported graph gives
    PyTorch's detections at a size it was not traced with (masks export as before: tests/test_export.py)."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from ovd.export import ExportableDetector, export_onnx, matched_detections
    from ovd.predictor import Prediction

    cfg = _d2_style("configs/ovshapes/base.yaml", "model.roi_heads.score_thresh_test=0.0",
                    "model.roi_heads.detections_per_image=2000")  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg, class_embeddings=torch.randn(5, 64)).eval()
    path = export_onnx(model, tmp_path / "d2.onnx", class_names=list("abcde"), min_size_test=64, max_size_test=128,
                       example_size=(96, 128))  # fmt: skip
    image = np.random.default_rng(2).integers(0, 256, (3, 70, 90), dtype=np.uint8)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": image})
    with torch.no_grad():
        ref = [t.numpy() for t in ExportableDetector(model)(torch.from_numpy(image))]

    def pred(b, s, lab):
        return Prediction(b.astype(np.float32), s.astype(np.float32), lab.astype(np.int64), [])

    assert len(ref[0]) > 0 and matched_detections(pred(*ref[:3]), pred(*got[:3])) == len(ref[0])
