"""Second stage: proposal sampling, region features, zero-shot classification, class-agnostic boxes
(and, for Mask R-CNN, class-agnostic masks: :mod:`ovd.modeling.mask_head`).

Shape shorthand: ``B`` images, ``P_i`` proposals of image i, ``R`` sampled regions of the batch,
``D'`` region feature dim, ``C`` classes (background = ``C``).

torchvision's private detection helpers (``BoxCoder``, ``Matcher``,
``BalancedPositiveNegativeSampler``) are imported here and nowhere else.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image

from ovd.losses import (
    box_regression_loss,
    distill_l1_loss,
    fed_loss_classes,
    irm_loss,
    max_size_loss,
    pseudo_max_score_loss,
    sigmoid_ce_loss,
)
from ovd.modeling.classifier import ZeroShotClassifier, at_least_float32
from ovd.modeling.mask_head import MaskHead, mask_loss, mask_targets
from ovd.modeling.roi_align import MultiScaleRoIAlign, RoIAlign
from ovd.structures import Detections

# detectron2's clamp on predicted log-scale deltas (Box2BoxTransform._DEFAULT_SCALE_CLAMP).
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


class C4RegionFeatures(nn.Module):
    """RoIAlign on ``res4`` → res5 stage → spatial mean: ``Tensor[R, 2048]`` (METHOD §1.2)."""

    def __init__(self, res5: nn.Module, *, resolution: int, scale: float, sampling_ratio: int, aligned: bool) -> None:
        super().__init__()
        self.pooler = RoIAlign(resolution, scale, sampling_ratio, aligned=aligned)
        self.res5 = res5

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]]) -> Tensor:
        x = self.pooler(features["res4"], [b.to(features["res4"].dtype) for b in boxes])  # (R, 1024, S, S)
        return self.res5(x).mean(dim=(2, 3))  # (R, 2048)


class FPNRegionFeatures(nn.Module):
    """Multi-level RoIAlign (``p{min_level}``–p5) → flatten → ``num_fc`` × (Linear, ReLU): ``Tensor[R, fc_dim]``."""

    def __init__(
        self,
        *,
        pooler: MultiScaleRoIAlign,
        in_channels: int,
        fc_dim: int,
        num_fc: int,
    ) -> None:
        super().__init__()
        self.pooler = pooler  # (R, Ch, S, S): ovd.modeling.roi_align.fpn_pooler
        side = pooler.output_size[0]
        layers: list[nn.Module] = [nn.Flatten()]
        dim = in_channels * side * side
        for _ in range(num_fc):
            fc = nn.Linear(dim, fc_dim)
            nn.init.kaiming_uniform_(fc.weight, a=1)  # detectron2 c2_xavier_fill
            nn.init.zeros_(fc.bias)
            layers += [fc, nn.ReLU(inplace=True)]
            dim = fc_dim
        self.head = nn.Sequential(*layers)

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]]) -> Tensor:
        x = self.pooler(features, boxes, image_sizes)  # (R, Ch, S, S)
        return self.head(x)  # (R, fc_dim)


class AgnosticBoxRegressor(nn.Module):
    """``Linear(D', D') → ReLU → Linear(D', 4)``: one box per region, shared by all classes."""

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, in_dim)
        self.fc2 = nn.Linear(in_dim, 4)
        nn.init.kaiming_uniform_(self.fc1.weight, a=1)
        nn.init.zeros_(self.fc1.bias)
        nn.init.normal_(self.fc2.weight, std=0.001)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))  # (R, 4)


class OpenVocabRoIHeads(nn.Module):
    """Proposal sampling, losses and inference around a :class:`ZeroShotClassifier`.

    Args:
        region_features: ``(features, boxes, image_sizes) → Tensor[R, D']``.
        classifier: the zero-shot classifier on region features.
        box_regressor: ``Tensor[R, D'] → Tensor[R, 4]`` class-agnostic deltas.
        class_weight: ``Tensor[C]`` loss weights of the classes (0 = ignored), or ``None``.
        fed_loss_freq: ``Tensor[C]`` sampling weights of the federated loss, or ``None`` (off).
        fed_loss_num_classes: classes per batch under the federated loss.
        bbox_reg_weights: ``(wx, wy, ww, wh)`` of the box coder.
        fg_iou_thresh, bg_iou_thresh: proposal matching thresholds.
        batch_size_per_image, positive_fraction: proposal sampling.
        add_gt_as_proposals: append ground-truth boxes to proposals in training.
        smooth_l1_beta: box loss beta (0 = L1).
        cls_loss_weight, box_loss_weight: loss multipliers.
        score_thresh, nms_thresh, detections_per_image: inference.
        distill_l1_weight, distill_irm_weight: effective RKD loss weights (0 = off).
        image_label_weight: weight of the image-level losses of PIS (METHOD §4.4).
        irm_group_images: images per IRM group (the loss is averaged over groups; 0 = the whole batch).
        mask_head: the class-agnostic mask head of Mask R-CNN (METHOD §1.4), or ``None`` (box only).
        mask_loss_weight: multiplies the mask loss.
    """

    def __init__(
        self,
        *,
        region_features: nn.Module,
        classifier: ZeroShotClassifier,
        box_regressor: nn.Module,
        class_weight: Tensor | None,
        fed_loss_freq: Tensor | None,
        fed_loss_num_classes: int,
        bbox_reg_weights: tuple[float, float, float, float],
        fg_iou_thresh: float,
        bg_iou_thresh: float,
        batch_size_per_image: int,
        positive_fraction: float,
        add_gt_as_proposals: bool,
        smooth_l1_beta: float,
        cls_loss_weight: float,
        box_loss_weight: float,
        score_thresh: float,
        nms_thresh: float,
        detections_per_image: int,
        distill_l1_weight: float = 0.0,
        distill_irm_weight: float = 0.0,
        image_label_weight: float = 0.0,
        irm_group_images: int = 0,
        mask_head: MaskHead | None = None,
        mask_loss_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.region_features = region_features
        self.classifier = classifier
        self.box_regressor = box_regressor
        self.register_buffer("class_weight", class_weight, persistent=False)
        self.register_buffer("fed_loss_freq", fed_loss_freq, persistent=False)
        self.fed_loss_num_classes = fed_loss_num_classes
        self.box_coder = det_utils.BoxCoder(bbox_reg_weights, bbox_xform_clip=DEFAULT_SCALE_CLAMP)
        self.matcher = det_utils.Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
        self.sampler = det_utils.BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.add_gt_as_proposals = add_gt_as_proposals
        self.smooth_l1_beta = smooth_l1_beta
        self.cls_loss_weight = cls_loss_weight
        self.box_loss_weight = box_loss_weight
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_image = detections_per_image
        self.distill_l1_weight = distill_l1_weight
        self.distill_irm_weight = distill_irm_weight
        self.image_label_weight = image_label_weight
        self.irm_group_images = irm_group_images
        self.mask_head = mask_head
        self.mask_loss_weight = mask_loss_weight

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    # -- training --------------------------------------------------------------------------------

    @torch.no_grad()
    def sample_proposals(
        self,
        proposals: list[Tensor],
        gt_boxes: list[Tensor],
        gt_labels: list[Tensor],
        *,
        with_gt_index: bool = False,
    ) -> tuple[list[Tensor], ...]:
        """Match proposals to ground truth and sample a balanced set per image.

        Returns:
            per image: sampled boxes ``Tensor[S_i, 4]``, classes ``int64[S_i]`` in ``[0, C]`` and
            matched ground-truth boxes ``Tensor[S_i, 4]`` (meaningful for foreground only); with
            ``with_gt_index`` also the matched ground-truth index ``int64[S_i]`` (``-1`` = background),
            which picks each foreground region's mask.
        """
        bg = self.num_classes
        all_labels, all_matched, all_index = [], [], []
        if self.add_gt_as_proposals:
            proposals = [torch.cat([p, g.to(p.dtype)]) for p, g in zip(proposals, gt_boxes, strict=True)]
        for props, boxes, labels in zip(proposals, gt_boxes, gt_labels, strict=True):
            if boxes.numel() == 0:
                all_labels.append(torch.full((props.shape[0],), bg, dtype=torch.int64, device=props.device))
                all_matched.append(torch.zeros_like(props))
                all_index.append(torch.full((props.shape[0],), -1, dtype=torch.int64, device=props.device))
                continue
            iou = box_iou(boxes, props)  # (G, P_i)
            idx = self.matcher(iou)  # (P_i,) gt index, or BELOW_LOW_THRESHOLD / BETWEEN_THRESHOLDS
            cls = labels[idx.clamp(min=0)].clone()  # (P_i,)
            cls[idx == self.matcher.BELOW_LOW_THRESHOLD] = bg
            cls[idx == self.matcher.BETWEEN_THRESHOLDS] = -1
            all_labels.append(cls)
            all_matched.append(boxes[idx.clamp(min=0)])
            all_index.append(idx.clamp(min=-1))  # (P_i,) both negative codes become -1
        # the sampler wants 1 = positive, 0 = negative, -1 = ignore
        binary = [torch.where(c < 0, -1, (c < bg).long()) for c in all_labels]
        pos, neg = self.sampler(binary)
        out_boxes, out_cls, out_matched, out_index = [], [], [], []
        per_image = zip(proposals, all_labels, all_matched, all_index, pos, neg, strict=True)
        for props, cls, matched, index, p, n in per_image:
            keep = torch.where(p | n)[0]  # (S_i,)
            out_boxes.append(props[keep])
            out_cls.append(cls[keep])
            out_matched.append(matched[keep])
            out_index.append(torch.where(cls[keep] < bg, index[keep], -1))  # sampled classes are in [0, C]
        if with_gt_index:
            return out_boxes, out_cls, out_matched, out_index
        return out_boxes, out_cls, out_matched

    def losses(
        self,
        logits: Tensor,
        deltas: Tensor,
        boxes: list[Tensor],
        classes: list[Tensor],
        matched: list[Tensor],
    ) -> dict[str, Tensor]:
        """Sigmoid BCE classification loss and class-agnostic box loss on sampled regions."""
        gt_classes = torch.cat(classes)  # (R,)
        weight = self.class_weight
        if self.fed_loss_freq is not None:
            fed = torch.zeros_like(self.fed_loss_freq)
            fed[fed_loss_classes(gt_classes, self.fed_loss_freq, self.fed_loss_num_classes)] = 1.0
            weight = fed if weight is None else weight * fed
        loss_cls = sigmoid_ce_loss(logits.float(), gt_classes, weight)
        fg = torch.where(gt_classes < self.num_classes)[0]  # (F,)
        props = torch.cat(boxes)  # (R, 4)
        target = self.box_coder.encode_single(torch.cat(matched)[fg], props[fg])  # (F, 4)
        loss_box = box_regression_loss(deltas[fg].float(), target, gt_classes.numel(), self.smooth_l1_beta)
        return {"loss_cls": self.cls_loss_weight * loss_cls, "loss_box_reg": self.box_loss_weight * loss_box}

    def region_embeddings(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> Tensor:
        """Student embeddings ``Tensor[R, D]`` (not normalised) of ``boxes``: the detection RoI feature
        extractor followed by the classifier's projection (METHOD §3.4)."""
        return self.classifier.project(self.region_features(features, boxes, image_sizes))

    def distill_losses(
        self,
        features: dict[str, Tensor],
        boxes: list[Tensor],
        teacher: list[Tensor],
        image_sizes: list[tuple[int, int]],
        weights: list[Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """RKD losses between student and stored CLIP embeddings of the regions of the whole batch.

        Args:
            boxes: per image ``Tensor[K_i, 4]`` on the input image.
            teacher: per image ``Tensor[K_i, D]`` CLIP image embeddings.
            weights: per image ``Tensor[K_i]`` region weights (teacher-aware RKD), or None (uniform).
        """
        names = self.distill_loss_names()
        if sum(len(b) for b in boxes) == 0:
            zero = self.classifier.fc_weight_sum() * 0.0  # keeps every rank's graph alike under DDP
            return dict.fromkeys(names, zero)
        student = self.region_embeddings(features, boxes, image_sizes).float()  # (R, D)
        target = torch.cat(teacher).float()  # (R, D)
        weight = None if weights is None else torch.cat(weights).to(student.device)  # (R,)
        losses: dict[str, Tensor] = {}
        if "loss_distill_l1" in names:
            losses["loss_distill_l1"] = self.distill_l1_weight * distill_l1_loss(student, target, weight)
        if "loss_irm" not in names:
            return losses
        # IRM over groups of irm_group_images images, averaged: the reference computes it per GPU over
        # its 2 images and DDP averages the GPUs, so the Frobenius sum never spans more regions
        per_image = [len(b) for b in boxes]
        g = self.irm_group_images if self.irm_group_images > 0 else len(boxes)
        sizes = [sum(per_image[i : i + g]) for i in range(0, len(per_image), g)]
        w_parts = [None] * len(sizes) if weight is None else weight.split(sizes)
        groups = [
            irm_loss(s_part, t_part, w_part)
            for s_part, t_part, w_part in zip(student.split(sizes), target.split(sizes), w_parts, strict=True)
            if len(s_part)
        ]
        losses["loss_irm"] = self.distill_irm_weight * torch.stack(groups).mean()
        return losses

    def distill_loss_names(self) -> tuple[str, ...]:
        """The RKD loss keys: each term only when its weight is non-zero (as the reference's IRM key)."""
        return tuple(
            name
            for name, weight in (("loss_distill_l1", self.distill_l1_weight), ("loss_irm", self.distill_irm_weight))
            if weight > 0
        )

    def classify(self, features: dict[str, Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]]) -> Tensor:
        """Logits ``Tensor[R, C+1]`` of the given boxes (per image ``Tensor[P_i, 4]``)."""
        return self.classifier(self.region_features(features, boxes, image_sizes))

    def pseudo_box_losses(
        self,
        features: dict[str, Tensor],
        boxes: list[Tensor],
        labels: list[Tensor],
        image_sizes: list[tuple[int, int]],
    ) -> dict[str, Tensor]:
        """PIS on pseudo boxes: each box is classified as the image-level label it was made for.

        Args:
            boxes: per image ``Tensor[P_i, 4]``, one pseudo box per label (they replace the proposals).
            labels: per image ``int64[P_i]`` the label of each pseudo box.
        """
        index = torch.cat([torch.full((len(b),), i, dtype=torch.long) for i, b in enumerate(boxes)])  # (P,)
        if index.numel() == 0:
            return {"loss_image_label": self.classifier.fc_weight_sum() * 0.0}
        logits = self.classify(features, boxes, image_sizes).float()  # (P, C+1)
        loss = pseudo_max_score_loss(logits, torch.cat(labels), index.to(logits.device), len(boxes))
        return {"loss_image_label": self.image_label_weight * loss}

    def max_size_losses(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        pos_labels: list[Tensor],
        image_sizes: list[tuple[int, int]],
    ) -> dict[str, Tensor]:
        """Detic's max-size loss: the largest proposal of each image takes all its image-level labels.

        Args:
            proposals: per image ``Tensor[P_i, 4]`` (RPN proposals).
            pos_labels: per image ``int64[L_i]`` image-level labels.
        """
        keep = [i for i, (p, lab) in enumerate(zip(proposals, pos_labels, strict=True)) if len(p) and len(lab)]
        if not keep:
            return {"loss_image_label": self.classifier.fc_weight_sum() * 0.0}
        largest = []
        for i in keep:
            p = proposals[i]
            area = (p[:, 2] - p[:, 0]) * (p[:, 3] - p[:, 1])  # (P_i,)
            largest.append(p[area.argmax()].view(1, 4))
        feats = self.region_features(features, largest, [image_sizes[i] for i in keep])  # (B', D')
        logits = self.classifier(feats).float()  # (B', C+1)
        multi_hot = torch.zeros(len(keep), self.num_classes, device=logits.device)
        for row, i in enumerate(keep):
            multi_hot[row, pos_labels[i]] = 1.0
        index = torch.as_tensor(keep, device=logits.device)
        return {"loss_image_label": self.image_label_weight * max_size_loss(logits, multi_hot, index, len(proposals))}

    def mask_losses(
        self,
        features: dict[str, Tensor],
        boxes: list[Tensor],
        gt_index: list[Tensor],
        gt_masks: list[Tensor],
        image_sizes: list[tuple[int, int]],
    ) -> dict[str, Tensor]:
        """Mask R-CNN's mask loss on the sampled foreground regions (METHOD §1.4).

        Args:
            boxes: per image the sampled regions ``Tensor[S_i, 4]``.
            gt_index: per image ``int64[S_i]``, the matched ground truth of each region (``-1`` = background).
            gt_masks: per image ``uint8[G_i, H_i, W_i]`` masks on the input image, aligned with its boxes.
        """
        if self.mask_head is None:
            raise ValueError("this model has no mask head")
        size = self.mask_head.mask_size
        fg_boxes, targets = [], []
        for b, index, masks in zip(boxes, gt_index, gt_masks, strict=True):
            fg = torch.where(index >= 0)[0]  # (F_i,)
            fg_boxes.append(b[fg])
            targets.append(mask_targets(masks, b[fg], index[fg], size))  # (F_i, M, M)
        logits = self.mask_head(features, fg_boxes, image_sizes)  # (F, 1, M, M)
        return {"loss_mask": self.mask_loss_weight * mask_loss(logits, torch.cat(targets))}

    def predict_masks(
        self, features: dict[str, Tensor], detections: list[Detections], image_sizes: list[tuple[int, int]]
    ) -> list[Detections]:
        """Detections with their class-agnostic mask probabilities ``Tensor[N_i, 1, M, M]`` added."""
        if self.mask_head is None:
            raise ValueError("this model has no mask head")
        logits = self.mask_head(features, [d.boxes for d in detections], image_sizes)  # (N, 1, M, M)
        probs = torch.sigmoid(logits.float()).split([len(d) for d in detections])
        return [Detections(d.boxes, d.scores, d.labels, p) for d, p in zip(detections, probs, strict=True)]

    # -- inference -------------------------------------------------------------------------------

    def predict(self, logits: Tensor, deltas: Tensor, proposals: list[Tensor], image_sizes: list[tuple[int, int]]):
        """Sigmoid scores, shared class-agnostic boxes, threshold, per-class NMS, top-k (METHOD §1.1)."""
        num_per_image = [p.shape[0] for p in proposals]
        boxes_all = self.box_coder.decode_single(at_least_float32(deltas), torch.cat(proposals))  # (R, 4)
        scores_all = torch.sigmoid(at_least_float32(logits))[:, : self.num_classes]  # (R, C): background dropped
        results = []
        for boxes, scores, size in zip(
            boxes_all.split(num_per_image), scores_all.split(num_per_image), image_sizes, strict=True
        ):
            boxes = clip_boxes_to_image(boxes, size)  # (P, 4)
            keep = scores > self.score_thresh  # (P, C)
            region, cls = keep.nonzero(as_tuple=True)  # (K,), (K,)
            det_boxes, det_scores = boxes[region], scores[region, cls]
            kept = batched_nms(det_boxes, det_scores, cls, self.nms_thresh)[: self.detections_per_image]
            results.append(Detections(det_boxes[kept], det_scores[kept], cls[kept]))
        return results

    def refine_boxes(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> list[Tensor]:
        """Apply the class-agnostic box regressor to ``boxes`` (per image ``Tensor[P_i, 4]``)."""
        x = self.region_features(features, boxes, image_sizes)  # (R, D')
        decoded = self.box_coder.decode_single(at_least_float32(self.box_regressor(x)), torch.cat(boxes))  # (R, 4)
        return [
            clip_boxes_to_image(b, size)
            for b, size in zip(decoded.split([len(b) for b in boxes]), image_sizes, strict=True)
        ]

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[Detections], dict[str, Tensor]]:
        """Training (``targets`` given): losses. Inference: detections in input-image pixels."""
        if self.training:
            if targets is None:
                raise ValueError("targets are needed in training mode")
            if self.mask_head is not None and any("masks" not in t for t in targets):
                raise ValueError("the mask head needs 'masks' in every target (uint8[N, H, W])")
            boxes, classes, matched, gt_index = self.sample_proposals(
                proposals, [t["boxes"] for t in targets], [t["labels"] for t in targets], with_gt_index=True
            )
            x = self.region_features(features, boxes, image_sizes)  # (R, D')
            losses = self.losses(self.classifier(x), self.box_regressor(x), boxes, classes, matched)
            if self.mask_head is not None:
                losses |= self.mask_losses(features, boxes, gt_index, [t["masks"] for t in targets], image_sizes)
            return [], losses
        x = self.region_features(features, proposals, image_sizes)  # (R, D')
        detections = self.predict(self.classifier(x), self.box_regressor(x), proposals, image_sizes)
        if self.mask_head is not None:
            detections = self.predict_masks(features, detections, image_sizes)
        return detections, {}
