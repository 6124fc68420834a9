"""``build_model(cfg)``: the only modeling code that reads the config."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ovd.config import Config
from ovd.errors import OVDError
from ovd.losses import zero_count_class_weight
from ovd.modeling.backbone import C4_STRIDE, build_resnet50_c4, build_resnet_fpn, build_tiny_fpn
from ovd.modeling.classifier import ZeroShotClassifier
from ovd.modeling.detector import OpenVocabDetector
from ovd.modeling.mask_head import MaskHead
from ovd.modeling.roi_align import MultiScaleRoIAlign, fpn_pooler
from ovd.modeling.roi_heads import (
    AgnosticBoxRegressor,
    C4RegionFeatures,
    FPNRegionFeatures,
    OpenVocabRoIHeads,
)
from ovd.modeling.rpn import build_rpn
from ovd.modeling.weight_transfer import WeightTransferClassifier

BACKBONES = ("resnet50_c4", "resnet50_fpn", "resnet18_fpn", "tiny_fpn")

WEIGHT_TRANSFER_NEW_KEYS = tuple(f"roi_heads.classifier.fc{k}." for k in range(1, 5))
"""State-dict prefixes that a weight-transfer model may miss when initialised from an RKD checkpoint."""


def _backbone_and_region_features(cfg: Config) -> tuple[nn.Module, nn.Module, int, int]:
    """(backbone, region feature extractor, backbone channels, region feature dim)."""
    b, r = cfg.model.backbone, cfg.model.roi_heads
    if b.name == "resnet50_c4":
        parts = build_resnet50_c4(norm=b.norm, freeze_at=b.freeze_at, weights=b.weights, stride_in_1x1=b.stride_in_1x1)
        region = C4RegionFeatures(
            parts.res5,
            resolution=r.pooler_resolution,
            scale=1.0 / C4_STRIDE,
            sampling_ratio=r.pooler_sampling_ratio,
            aligned=r.pooler_aligned,
        )
        return parts.trunk, region, parts.out_channels, parts.head_channels
    if b.name in ("resnet50_fpn", "resnet18_fpn"):
        backbone = build_resnet_fpn(
            depth=int(b.name[6:8]),
            norm=b.norm,
            freeze_at=b.freeze_at,
            weights=b.weights,
            fpn_channels=b.fpn_channels,
            stride_in_1x1=b.stride_in_1x1,
        )
    elif b.name == "tiny_fpn":
        if b.weights:
            raise OVDError("tiny_fpn has no ImageNet weights", field="model.backbone.weights")
        backbone = build_tiny_fpn(
            widths=list(b.tiny_widths), norm=b.norm, fpn_channels=b.fpn_channels, min_level=b.fpn_min_level
        )
    else:
        raise OVDError(
            f"unknown backbone {b.name!r}; choose one of {', '.join(BACKBONES)}", field="model.backbone.name"
        )
    region = FPNRegionFeatures(
        pooler=_fpn_pooler(cfg, r.pooler_resolution), in_channels=b.fpn_channels, fc_dim=r.fc_dim, num_fc=r.num_fc
    )
    return backbone, region, b.fpn_channels, r.fc_dim


def _level_strides(cfg: Config) -> list[int]:
    """Input-pixel stride of each feature map the RPN sees (C4: res4; FPN: p{min_level}..p5 and p6)."""
    b = cfg.model.backbone
    if b.name == "resnet50_c4":
        return [C4_STRIDE]
    return [2**k for k in range(b.fpn_min_level, 7)]


def _fpn_pooler(cfg: Config, resolution: int) -> MultiScaleRoIAlign:
    """The RoIAlign over the FPN levels, with ``model.roi_heads``' level mapping (box and mask heads alike)."""
    r = cfg.model.roi_heads
    return fpn_pooler(
        resolution,
        r.pooler_sampling_ratio,
        min_level=cfg.model.backbone.fpn_min_level,
        canonical_box_size=r.canonical_box_size,
        canonical_level=r.canonical_level,
        aligned=r.fpn_pooler_aligned,
    )


def _mask_head(cfg: Config) -> MaskHead | None:
    """The class-agnostic mask head of ``model.mask`` (FPN backbones only), or ``None`` when disabled."""
    mk, b = cfg.model.mask, cfg.model.backbone
    if not mk.enabled:
        return None
    if b.name == "resnet50_c4":
        raise OVDError(
            "the mask head needs an FPN backbone (resnet50_fpn, resnet18_fpn or tiny_fpn), not resnet50_c4",
            field="model.mask.enabled",
        )
    return MaskHead(
        pooler=_fpn_pooler(cfg, mk.pooler_resolution),
        in_channels=b.fpn_channels,
        num_conv=mk.num_conv,
        conv_dim=mk.conv_dim,
    )


def build_model(
    cfg: Config, *, class_embeddings: Tensor, class_image_counts: Tensor | None = None
) -> OpenVocabDetector:
    """Build the detector of ``cfg``.

    Args:
        cfg: the run's config.
        class_embeddings: ``Tensor[C, D]`` text embeddings of the training vocabulary.
        class_image_counts: ``Tensor[C]`` training images per class; needed when
            ``model.classifier.ignore_zero_cats`` or ``use_fed_loss`` is on (``None`` = no masking).
    """
    m, c, r, d = cfg.model, cfg.model.classifier, cfg.model.roi_heads, cfg.model.distill
    torch.manual_seed(cfg.seed)
    backbone, region, channels, feat_dim = _backbone_and_region_features(cfg)
    mask_head = _mask_head(cfg)
    if class_image_counts is not None and class_image_counts.shape[0] != class_embeddings.shape[0]:
        raise OVDError(f"{class_image_counts.shape[0]} class counts for {class_embeddings.shape[0]} class embeddings")
    class_weight = fed_freq = None
    if class_image_counts is not None:
        if c.ignore_zero_cats:
            class_weight = zero_count_class_weight(
                class_image_counts, power=c.freq_weight_power, thresh=c.zero_freq_thresh
            )
        if c.use_fed_loss:
            fed_freq = class_image_counts.float().pow(c.freq_weight_power)
    classifier: ZeroShotClassifier
    if c.weight_transfer:
        classifier = WeightTransferClassifier(
            feat_dim,
            class_embeddings,
            temperature=c.temperature,
            use_bias=c.use_bias,
            bias_init=c.bias_init,
            hidden_dim=c.weight_transfer_hidden_dim,
            negative_slope=c.weight_transfer_negative_slope,
        )
    else:
        classifier = ZeroShotClassifier(
            feat_dim, class_embeddings, temperature=c.temperature, use_bias=c.use_bias, bias_init=c.bias_init
        )
    roi_heads = OpenVocabRoIHeads(
        region_features=region,
        classifier=classifier,
        box_regressor=AgnosticBoxRegressor(feat_dim),
        class_weight=class_weight,
        fed_loss_freq=fed_freq,
        fed_loss_num_classes=c.fed_loss_num_classes,
        bbox_reg_weights=tuple(r.bbox_reg_weights),  # type: ignore[arg-type]
        fg_iou_thresh=r.fg_iou_thresh,
        bg_iou_thresh=r.bg_iou_thresh,
        batch_size_per_image=r.batch_size_per_image,
        positive_fraction=r.positive_fraction,
        add_gt_as_proposals=r.add_gt_as_proposals,
        smooth_l1_beta=r.smooth_l1_beta,
        cls_loss_weight=c.cls_loss_weight,
        box_loss_weight=r.box_loss_weight,
        score_thresh=r.score_thresh_test,
        nms_thresh=r.nms_thresh_test,
        detections_per_image=r.detections_per_image,
        distill_l1_weight=d.l1_weight * d.weight_scale if d.enabled else 0.0,
        distill_irm_weight=d.irm_weight * d.weight_scale if d.enabled else 0.0,
        irm_group_images=d.irm_group_images,
        image_label_weight=m.image_label.loss_weight,
        mask_head=mask_head,
        mask_loss_weight=m.mask.loss_weight,
    )
    p = m.rpn
    rpn = build_rpn(
        in_channels=channels,
        anchor_sizes=[list(s) for s in p.anchor_sizes],
        aspect_ratios=list(p.aspect_ratios),
        fg_iou_thresh=p.fg_iou_thresh,
        bg_iou_thresh=p.bg_iou_thresh,
        batch_size_per_image=p.batch_size_per_image,
        positive_fraction=p.positive_fraction,
        pre_nms_top_n={"training": p.pre_nms_top_n_train, "testing": p.pre_nms_top_n_test},
        post_nms_top_n={"training": p.post_nms_top_n_train, "testing": p.post_nms_top_n_test},
        nms_thresh=p.nms_thresh,
        smooth_l1_beta=p.smooth_l1_beta,
        loss_weight=p.loss_weight,
        anchor_style=p.anchor_style,
        strides=_level_strides(cfg),
        min_size=p.min_size,
        nms_on_logits=p.nms_on_logits,
    )
    return OpenVocabDetector(
        backbone=backbone,
        rpn=rpn,
        roi_heads=roi_heads,
        pixel_mean=list(m.pixel_mean),
        pixel_std=list(m.pixel_std),
        size_divisibility=m.size_divisibility,
        max_size_num_proposals=m.image_label.max_size_num_proposals,
        input_format=m.input_format,
    )
