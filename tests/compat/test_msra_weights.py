"""detectron2's MSRA ImageNet pickle (R-50.pkl layout) as a backbone init, read without executing code."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torchvision.models import resnet
from torchvision.ops import FrozenBatchNorm2d

from ovd.errors import OVDError
from ovd.modeling.backbone import build_resnet50_c4
from ovd.modeling.msra import BN_EPS, load_msra_resnet


def caffe2_blobs(seed: int = 0) -> dict[str, np.ndarray]:
    """An R-50.pkl-style blob dict: Caffe2 names, affine BN (scale, bias), plus a classifier and momenta."""
    rng = np.random.default_rng(seed)
    with torch.device("meta"):  # shapes only
        net = resnet.resnet50(weights=None)
    blobs = {}
    names = {"conv1.weight": "conv1_w", "bn1.weight": "res_conv1_bn_s", "bn1.bias": "res_conv1_bn_b"}
    for k, layer in enumerate([net.layer1, net.layer2, net.layer3, net.layer4], start=2):
        for i in range(len(layer)):
            for j, c in enumerate("abc", start=1):
                names[f"layer{k - 1}.{i}.conv{j}.weight"] = f"res{k}_{i}_branch2{c}_w"
                names[f"layer{k - 1}.{i}.bn{j}.weight"] = f"res{k}_{i}_branch2{c}_bn_s"
                names[f"layer{k - 1}.{i}.bn{j}.bias"] = f"res{k}_{i}_branch2{c}_bn_b"
        names[f"layer{k - 1}.0.downsample.0.weight"] = f"res{k}_0_branch1_w"
        names[f"layer{k - 1}.0.downsample.1.weight"] = f"res{k}_0_branch1_bn_s"
        names[f"layer{k - 1}.0.downsample.1.bias"] = f"res{k}_0_branch1_bn_b"
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    for tv, c2 in names.items():
        blobs[c2] = rng.standard_normal(shapes[tv], dtype=np.float32)
    blobs["pred_w"] = np.zeros((1000, 2048), np.float32)
    blobs["conv1_w_momentum"] = np.zeros((64, 3, 7, 7), np.float32)
    return blobs


def test_msra_pickle_initialises_the_backbone(tmp_path):
    blobs = caffe2_blobs()
    path = tmp_path / "R-50.pkl"
    with open(path, "wb") as f:
        pickle.dump({"blobs": blobs, "__author__": "Detectron"}, f, protocol=2)  # a Python-2-era pickle
    state = load_msra_resnet(path)
    assert "fc.weight" not in state and len(state) == 265  # conv + 4 buffers per BN, no classifier
    np.testing.assert_array_equal(state["layer3.5.conv2.weight"].numpy(), blobs["res4_5_branch2b_w"])
    np.testing.assert_array_equal(state["layer1.0.downsample.1.bias"].numpy(), blobs["res2_0_branch1_bn_b"])
    parts = build_resnet50_c4(norm="frozen_bn", freeze_at=2, weights=str(path), stride_in_1x1=True)
    bn = parts.trunk.stem[1]
    assert isinstance(bn, FrozenBatchNorm2d)
    x = torch.randn(1, 64, 3, 3)
    scale, bias = blobs["res_conv1_bn_s"][None, :, None, None], blobs["res_conv1_bn_b"][None, :, None, None]
    torch.testing.assert_close(bn(x), x * torch.from_numpy(scale) + torch.from_numpy(bias))  # affine, as in Caffe2
    assert torch.equal(parts.res5[0].conv1.weight, torch.from_numpy(blobs["res5_0_branch2a_w"]))
    assert float(state["bn1.running_var"][0]) == pytest.approx(1.0 - BN_EPS)


def test_pickles_with_code_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"blobs": {"conv1_w": Evil()}}, f)
    with pytest.raises(OVDError, match="builtins.print"):
        load_msra_resnet(path)
    with pytest.raises(OVDError, match="not found"):
        load_msra_resnet(tmp_path / "missing.pkl")
    with open(tmp_path / "empty.pkl", "wb") as f:
        pickle.dump({"blobs": {}}, f)
    with pytest.raises(OVDError, match="no weight blobs"):
        load_msra_resnet(tmp_path / "empty.pkl")
