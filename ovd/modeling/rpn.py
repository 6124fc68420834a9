"""Region proposal network: torchvision's, with the box-loss beta made a parameter."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers


class OpenVocabRPN(RegionProposalNetwork):
    """torchvision's ``RegionProposalNetwork`` whose box loss uses ``smooth_l1_beta`` (0 = L1, as in
    detectron2) instead of the hard-coded 1/9, and whose losses are scaled by ``loss_weight``."""

    def __init__(self, *args, smooth_l1_beta: float, loss_weight: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.smooth_l1_beta = smooth_l1_beta
        self.loss_weight = loss_weight

    @torch.no_grad()
    def proposals_with_scores(
        self, images: ImageList, features: dict[str, Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Inference-time proposals with their objectness probabilities.

        The same steps as torchvision's ``forward`` (head → anchors → decode → per-level top-k, NMS),
        keeping the scores that ``forward`` drops. Returns per image ``Tensor[P_i, 4]`` and ``Tensor[P_i]``.
        """
        feats = list(features.values())
        objectness, deltas = self.head(feats)
        anchors = self.anchor_generator(images, feats)
        num_per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = self.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        return self.filter_proposals(proposals, objectness, images.image_sizes, num_per_level)

    def compute_loss(
        self,
        objectness: Tensor,
        pred_bbox_deltas: Tensor,
        labels: list[Tensor],
        regression_targets: list[Tensor],
    ) -> tuple[Tensor, Tensor]:
        pos, neg = self.fg_bg_sampler(labels)
        pos_idx = torch.where(torch.cat(pos))[0]  # (Fa,)
        sampled = torch.cat([pos_idx, torch.where(torch.cat(neg))[0]])  # (Sa,)
        labels_all = torch.cat(labels)
        targets = torch.cat(regression_targets)
        diff = pred_bbox_deltas[pos_idx].float() - targets[pos_idx]
        if self.smooth_l1_beta < 1e-5:
            box = diff.abs().sum()
        else:
            box = F.smooth_l1_loss(diff, torch.zeros_like(diff), beta=self.smooth_l1_beta, reduction="sum")
        box = box / max(sampled.numel(), 1)
        obj = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled].float(), labels_all[sampled])
        return self.loss_weight * obj, self.loss_weight * box


def build_rpn(
    *,
    in_channels: int,
    anchor_sizes: list[list[int]],
    aspect_ratios: list[float],
    fg_iou_thresh: float,
    bg_iou_thresh: float,
    batch_size_per_image: int,
    positive_fraction: float,
    pre_nms_top_n: dict[str, int],
    post_nms_top_n: dict[str, int],
    nms_thresh: float,
    smooth_l1_beta: float,
    loss_weight: float,
) -> OpenVocabRPN:
    """An RPN with one anchor-size list per feature level and the same aspect ratios everywhere."""
    anchors = AnchorGenerator(
        sizes=tuple(tuple(s) for s in anchor_sizes),
        aspect_ratios=tuple(tuple(aspect_ratios) for _ in anchor_sizes),
    )
    head = RPNHead(in_channels, anchors.num_anchors_per_location()[0])
    return OpenVocabRPN(
        anchors,
        head,
        fg_iou_thresh,
        bg_iou_thresh,
        batch_size_per_image,
        positive_fraction,
        pre_nms_top_n,
        post_nms_top_n,
        nms_thresh,
        smooth_l1_beta=smooth_l1_beta,
        loss_weight=loss_weight,
    )
