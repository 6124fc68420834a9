"""Region proposal network: torchvision's, with the box-loss beta made a parameter."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers
from torchvision.ops import boxes as box_ops

from ovd.modeling.anchors import Detectron2AnchorGenerator

ANCHOR_STYLES = ("torchvision", "detectron2")


class OpenVocabRPN(RegionProposalNetwork):
    """torchvision's ``RegionProposalNetwork`` whose box loss uses ``smooth_l1_beta`` (0 = L1, as in
    detectron2) instead of the hard-coded 1/9, and whose losses are scaled by ``loss_weight``."""

    def __init__(self, *args, smooth_l1_beta: float, loss_weight: float, nms_on_logits: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.smooth_l1_beta = smooth_l1_beta
        self.loss_weight = loss_weight
        self.nms_on_logits = nms_on_logits

    def filter_proposals(
        self,
        proposals: Tensor,
        objectness: Tensor,
        image_shapes: list[tuple[int, int]],
        num_anchors_per_level: list[int],
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per-level top-k, clipping, empty-box removal, per-level NMS, top-k per image.

        With ``nms_on_logits`` (detectron2's ``find_top_rpn_proposals``) the NMS ranks by objectness logits;
        torchvision ranks by sigmoid probabilities, which float32 rounds into ties above a logit of about 5
        (steps of 6e-8 near 1), so near-equal proposals can be kept in another order and suppress others.
        Scores are returned as probabilities either way.
        """
        if not self.nms_on_logits:
            return super().filter_proposals(proposals, objectness, image_shapes, num_anchors_per_level)
        num_images, device = proposals.shape[0], proposals.device
        objectness = objectness.detach().reshape(num_images, -1)  # (N, A_total)
        levels = torch.cat(
            [torch.full((n,), i, dtype=torch.int64, device=device) for i, n in enumerate(num_anchors_per_level)]
        )  # (A_total,)
        top = self._get_top_n_idx(objectness, num_anchors_per_level)  # (N, K)
        rows = torch.arange(num_images, device=device)[:, None]
        out_boxes, out_scores = [], []
        per_image = zip(proposals[rows, top], objectness[rows, top], levels[top], image_shapes, strict=True)
        for boxes, logits, lvl, shape in per_image:
            boxes = box_ops.clip_boxes_to_image(boxes, shape)  # (K, 4)
            keep = box_ops.remove_small_boxes(boxes, self.min_size)
            boxes, logits, lvl = boxes[keep], logits[keep], lvl[keep]
            keep = box_ops.batched_nms(boxes, logits, lvl, self.nms_thresh)[: self.post_nms_top_n()]
            out_boxes.append(boxes[keep])
            out_scores.append(torch.sigmoid(logits[keep]))
        return out_boxes, out_scores

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
    anchor_style: str = "torchvision",
    strides: list[int] | None = None,
    min_size: float = 1e-3,
    nms_on_logits: bool = False,
) -> OpenVocabRPN:
    """An RPN with one anchor-size list per feature level and the same aspect ratios everywhere.

    ``anchor_style`` ``"detectron2"`` uses :class:`Detectron2AnchorGenerator` with the backbone's level
    ``strides``. ``min_size`` 0 keeps every non-empty proposal (detectron2's ``MIN_SIZE 0``).
    """
    anchors: nn.Module
    if anchor_style == "detectron2":
        if strides is None:
            raise ValueError("detectron2 anchors need the backbone's level strides")
        anchors = Detectron2AnchorGenerator(anchor_sizes, aspect_ratios, strides)
    elif anchor_style == "torchvision":
        anchors = AnchorGenerator(
            sizes=tuple(tuple(s) for s in anchor_sizes),
            aspect_ratios=tuple(tuple(aspect_ratios) for _ in anchor_sizes),
        )
    else:
        raise ValueError(f"unknown anchor style {anchor_style!r}; choose one of {', '.join(ANCHOR_STYLES)}")
    head = RPNHead(in_channels, anchors.num_anchors_per_location()[0])
    rpn = OpenVocabRPN(
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
        nms_on_logits=nms_on_logits,
    )
    # torchvision keeps boxes with both sides >= min_size; the smallest positive float keeps exactly
    # the boxes of positive width and height, as detectron2's ``nonempty`` with threshold 0
    rpn.min_size = min_size if min_size > 0 else torch.finfo(torch.float32).tiny
    return rpn
