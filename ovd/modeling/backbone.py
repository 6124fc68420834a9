"""Backbones built from torchvision parts.

* ``resnet50_c4``: ResNet-50 conv1..layer3 (stride 16, 1024 channels) as the trunk; layer4 becomes
  the RoI head (METHOD §1.2, §11).
* ``resnet50_fpn`` / ``resnet18_fpn``: torchvision ResNet + ``FeaturePyramidNetwork`` with a max-pool
  top block (levels p2–p6, METHOD §1.4).
* ``tiny_fpn``: a small ResNet of BasicBlocks (configurable widths) + FPN, for CPU tests and the
  synthetic world.

Every backbone returns ``OrderedDict[str, Tensor[B, Ch, H/s, W/s]]``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ovd.errors import OVDError
from ovd.modeling.msra import load_msra_resnet

NORM_LAYERS: dict[str, Callable[[int], nn.Module]] = {
    "frozen_bn": FrozenBatchNorm2d,
    "bn": nn.BatchNorm2d,
    # 32 groups as in detectron2's GN; fewer when the width is small.
    "gn": lambda c: nn.GroupNorm(min(32, c // 4), c),
}

C4_STRIDE = 16  # res4 output stride


def norm_layer(name: str) -> Callable[[int], nn.Module]:
    if name not in NORM_LAYERS:
        raise OVDError(f"unknown norm {name!r}; choose one of {sorted(NORM_LAYERS)}", field="model.backbone.norm")
    return NORM_LAYERS[name]


def _load_weights(model: nn.Module, weights: str, arch: str) -> None:
    """ImageNet init from a local torchvision-format file, or torchvision's own (cached) weights."""
    if not weights:
        return
    if weights == "torchvision":
        enum = {
            "resnet50": resnet.ResNet50_Weights.IMAGENET1K_V1,
            "resnet18": resnet.ResNet18_Weights.IMAGENET1K_V1,
        }
        try:
            state = enum[arch].get_state_dict(progress=False)
        except Exception as e:  # offline and not cached
            raise OVDError(
                f"torchvision {arch} ImageNet weights are not available offline ({type(e).__name__}); "
                "download them once or pass a local file",
                field="model.backbone.weights",
            ) from e
    elif weights.endswith(".pkl"):  # detectron2's MSRA ImageNet weights (R-50.pkl): a restricted unpickler
        state = load_msra_resnet(weights)
    else:
        path = Path(weights)
        if not path.is_file():
            raise OVDError("backbone weights file not found", path=path, field="model.backbone.weights")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise OVDError(f"cannot read backbone weights ({type(e).__name__})", path=path) from e
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.") and "num_batches_tracked" not in k]
    if missing or unexpected:
        raise OVDError(
            f"backbone weights do not match {arch}: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})",
            path=weights,
        )


def move_stride_to_1x1(net: nn.Module) -> None:
    """Make every downsampling ``Bottleneck`` of ``net`` stride in its first 1×1 conv instead of its 3×3.

    MSRA/caffe ResNets (detectron2's ``STRIDE_IN_1X1``, its ImageNet ``R-50.pkl``) do this; torchvision's
    ResNet ("v1.5") strides in the 3×3. The parameters are the same, only the convolutions' strides move.
    """
    for block in net.modules():
        if isinstance(block, resnet.Bottleneck) and block.conv2.stride != (1, 1):
            block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)


def _freeze(modules: list[nn.Module]) -> None:
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(False)


@dataclass
class C4Parts:
    trunk: nn.Module  # image → {"res4": Tensor[B, 1024, H/16, W/16]}
    res5: nn.Module  # pooled RoIs Tensor[R, 1024, 14, 14] → Tensor[R, 2048, 7, 7]
    out_channels: int  # trunk channels (1024)
    head_channels: int  # res5 channels (2048)


class ResNetTrunk(nn.Module):
    """conv1 … layer3 of a torchvision ResNet; returns ``{"res4": features}``."""

    def __init__(self, net: resnet.ResNet) -> None:
        super().__init__()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return OrderedDict(res4=x)


def build_resnet50_c4(*, norm: str, freeze_at: int, weights: str, stride_in_1x1: bool = False) -> C4Parts:
    net = resnet.resnet50(weights=None, norm_layer=norm_layer(norm))
    _load_weights(net, weights, "resnet50")
    if stride_in_1x1:
        move_stride_to_1x1(net)
    trunk = ResNetTrunk(net)
    _freeze([trunk.stem, trunk.layer1][:freeze_at])
    return C4Parts(trunk=trunk, res5=net.layer4, out_channels=1024, head_channels=2048)


FPN_MAX_LEVEL = 5  # p5 = last ResNet stage; the max-pool top block adds p6 ("pool")


def _fpn(net: nn.Module, widths: list[int], fpn_channels: int, min_level: int) -> BackboneWithFPN:
    """FPN over ResNet stages ``min_level..5`` (stage k has stride 2**k), outputs ``p{k}`` and ``pool``."""
    if not 2 <= min_level <= FPN_MAX_LEVEL:
        raise OVDError(
            f"fpn_min_level must be in 2..{FPN_MAX_LEVEL}, got {min_level}", field="model.backbone.fpn_min_level"
        )
    levels = range(min_level, FPN_MAX_LEVEL + 1)
    return BackboneWithFPN(
        net,
        return_layers={f"layer{k - 1}": f"p{k}" for k in levels},
        in_channels_list=[widths[k - 2] for k in levels],
        out_channels=fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )


def build_resnet_fpn(
    *,
    depth: int,
    norm: str,
    freeze_at: int,
    weights: str,
    fpn_channels: int,
    min_level: int = 2,
    stride_in_1x1: bool = False,
) -> BackboneWithFPN:
    arch = f"resnet{depth}"
    net = getattr(resnet, arch)(weights=None, norm_layer=norm_layer(norm))
    _load_weights(net, weights, arch)
    if stride_in_1x1:
        move_stride_to_1x1(net)
    _freeze([nn.ModuleList([net.conv1, net.bn1]), net.layer1][:freeze_at])
    width = 64 * (4 if depth >= 50 else 1)  # layer1 output channels
    return _fpn(net, [width, width * 2, width * 4, width * 8], fpn_channels, min_level)


class TinyResNet(nn.Module):
    """A 4-stage ResNet of BasicBlocks (strides 4, 8, 16, 32) with configurable widths."""

    def __init__(self, widths: list[int], norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        if len(widths) != 4:
            raise OVDError(f"tiny_widths needs 4 stage widths, got {widths}", field="model.backbone.tiny_widths")
        w0 = widths[0]
        self.stem = nn.Sequential(
            nn.Conv2d(3, w0, 3, stride=2, padding=1, bias=False),
            norm(w0),
            nn.ReLU(inplace=True),
            nn.Conv2d(w0, w0, 3, stride=2, padding=1, bias=False),
            norm(w0),
            nn.ReLU(inplace=True),
        )
        stages = []
        in_ch = w0
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or in_ch != w:
                down = nn.Sequential(nn.Conv2d(in_ch, w, 1, stride=stride, bias=False), norm(w))
            stages.append(
                nn.Sequential(
                    resnet.BasicBlock(in_ch, w, stride, down, norm_layer=norm),
                    resnet.BasicBlock(w, w, norm_layer=norm),
                )
            )
            in_ch = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - used through IntermediateLayerGetter
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))


def build_tiny_fpn(*, widths: list[int], norm: str, fpn_channels: int, min_level: int = 2) -> BackboneWithFPN:
    return _fpn(TinyResNet(widths, norm_layer(norm)), list(widths), fpn_channels, min_level)
