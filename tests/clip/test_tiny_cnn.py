"""The timm-registered conv image tower of the OV-Shapes CLIP (``ovd-tiny-cnn``)."""

import timm
import torch

from ovd.clip.model import create_clip, register_model_configs, save_clip_checkpoint
from ovd.clip.tiny_cnn import TIMM_NAME, TinyConvNet


def test_registered_and_shapes():
    register_model_configs()
    assert TIMM_NAME in timm.list_models(TIMM_NAME)
    net = timm.create_model(TIMM_NAME, num_classes=10)
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    net.reset_classifier(0)
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, net.num_features)
    # four stride-2 blocks: 32 px → 2 px
    assert TinyConvNet().forward_features(torch.rand(1, 3, 32, 32)).shape == (1, 128, 2, 2)


def test_open_clip_round_trip(tmp_path):
    torch.manual_seed(0)
    clip = create_clip("ovd-tiny-cnn")
    assert clip.image_size == (32, 32)
    path = tmp_path / "m.pt"
    save_clip_checkpoint(clip, path)
    again = create_clip("ovd-tiny-cnn", pretrained=path)
    x = torch.rand(3, 3, 32, 32)
    assert torch.allclose(clip.encode_images(x), again.encode_images(x))
