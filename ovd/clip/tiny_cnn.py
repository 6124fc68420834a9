"""A small conv image tower for CPU-sized CLIP models, registered in timm's model registry.

open_clip builds timm image towers by name (``vision_cfg.timm_model_name``), so registering this
network lets a plain open_clip config (``ovd/clip/model_configs/ovd-tiny-cnn.json``) use it and its
checkpoints stay ordinary open_clip state dicts. It keeps full resolution in its first block and
halves it in each of ``len(widths)`` blocks, which learns small synthetic objects far faster than a
ViT or open_clip's ModifiedResNet of the same cost (the latter pools ×4 in its stem).

Shape legend: ``B`` images, ``H×W`` input size, ``F`` = ``widths[-1]`` features.
"""

from __future__ import annotations

from torch import Tensor, nn

TIMM_NAME = "ovd_tiny_cnn"
"""The name the network is registered under in timm."""


def _block(c_in: int, c_out: int) -> nn.Sequential:
    """conv3×3 → BN → ReLU → conv3×3 (stride 2) → BN → ReLU: halves the resolution."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class TinyConvNet(nn.Module):
    """``Tensor[B, 3, H, W]`` → ``Tensor[B, num_classes]`` (or ``Tensor[B, F]`` pooled features if 0).

    Follows the timm model interface that open_clip's ``TimmModel`` uses: ``num_classes`` and
    ``global_pool`` constructor arguments, ``num_features``, ``reset_classifier`` and ``default_cfg``.

    Args:
        widths: channels of the stride-2 blocks.
        num_classes: output size of the final linear layer (0 = no layer).
        global_pool: ``"avg"`` (the only pooling supported).
        in_chans: input channels.
    """

    def __init__(
        self,
        widths: tuple[int, ...] = (16, 32, 64, 128),
        *,
        num_classes: int = 0,
        global_pool: str = "avg",
        in_chans: int = 3,
        **_: object,  # timm passes options (e.g. pretrained_cfg) that this network does not use
    ) -> None:
        super().__init__()
        if global_pool != "avg":
            raise ValueError(f"{TIMM_NAME} supports global_pool='avg' only, got {global_pool!r}")
        chans = (in_chans, *widths)
        self.features = nn.Sequential(*(_block(a, b) for a, b in zip(chans[:-1], chans[1:], strict=True)))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = widths[-1]
        self.default_cfg: dict[str, object] = {"pool_size": None}
        self.head: nn.Module = nn.Identity()
        self.reset_classifier(num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        if global_pool not in ("avg", ""):
            raise ValueError(f"{TIMM_NAME} supports global_pool='avg' only, got {global_pool!r}")
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)  # (B, F, H/2^k, W/2^k)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.forward_features(x)))  # (B, num_classes or F)


def ovd_tiny_cnn(pretrained: bool = False, **kwargs: object) -> TinyConvNet:
    """timm entry point; there are no pretrained weights."""
    if pretrained:
        raise ValueError(f"{TIMM_NAME} has no pretrained weights")
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    return TinyConvNet(**kwargs)  # type: ignore[arg-type]


def register_timm_models() -> None:
    """Add :func:`ovd_tiny_cnn` to timm's registry (idempotent)."""
    import timm
    from timm.models import register_model

    if TIMM_NAME not in timm.list_models(TIMM_NAME):
        register_model(ovd_tiny_cnn)
