"""OpenVocabDetector: backbone → RPN → open-vocabulary RoI heads.

Images enter as ``uint8 Tensor[3, H, W]`` RGB, already resized by the data pipeline; the detector
normalises and pads them into one batch. Detections come out in the pixel coordinates of the
images it was given.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

from ovd.modeling.roi_heads import OpenVocabRoIHeads
from ovd.modeling.rpn import OpenVocabRPN
from ovd.structures import Detections


class OpenVocabDetector(nn.Module):
    """A two-stage detector whose classifier is a set of CLIP text embeddings.

    Args:
        backbone: ``Tensor[B, 3, H, W] → OrderedDict[str, Tensor]``.
        rpn: proposal network over all backbone outputs.
        roi_heads: second stage.
        pixel_mean, pixel_std: statistics on a 0–255 scale, in ``input_format``'s channel order.
        size_divisibility: batched images are padded to a multiple of this (0: to the largest image).
        input_format: ``"RGB"`` or ``"BGR"``: the channel order the backbone sees (images enter as RGB).
        max_size_num_proposals: top RPN proposals among which the max-size loss takes the largest.
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        rpn: OpenVocabRPN,
        roi_heads: OpenVocabRoIHeads,
        pixel_mean: list[float],
        pixel_std: list[float],
        size_divisibility: int,
        max_size_num_proposals: int = 128,
        input_format: str = "RGB",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(3, 1, 1), persistent=False)
        self.size_divisibility = size_divisibility
        self.max_size_num_proposals = max_size_num_proposals
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"input_format must be RGB or BGR, got {input_format!r}")
        self.input_format = input_format

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def distill_enabled(self) -> bool:
        return self.roi_heads.distill_l1_weight > 0 or self.roi_heads.distill_irm_weight > 0

    @property
    def num_classes(self) -> int:
        return self.roi_heads.num_classes

    def set_vocabulary(self, class_embeddings: Tensor) -> None:
        """Detect the classes of ``Tensor[C, D]`` text embeddings from now on."""
        self.roi_heads.classifier.set_vocabulary(class_embeddings)

    def preprocess(self, images: list[Tensor]) -> ImageList:
        """Normalise and zero-pad ``uint8 Tensor[3, H_i, W_i]`` images into ``Tensor[B, 3, H, W]``."""
        sizes = [(im.shape[-2], im.shape[-1]) for im in images]  # ints (symbolic while exporting: no int())
        d = max(self.size_divisibility, 1)
        # round up with non-negative operands: ONNX's integer division truncates towards zero
        max_h = (max(h for h, _ in sizes) + d - 1) // d * d
        max_w = (max(w for _, w in sizes) + d - 1) // d * d
        batch = []
        for im in images:
            im = im.to(self.device, non_blocking=True)  # (3, H, W) RGB
            if self.input_format == "BGR":
                im = im.flip(0)
            x = (im.float() - self.pixel_mean) / self.pixel_std  # (3, H, W)
            batch.append(F.pad(x, (0, max_w - x.shape[-1], 0, max_h - x.shape[-2])))  # zero = mean colour
        return ImageList(torch.stack(batch), sizes)

    def features(self, images: ImageList) -> OrderedDict[str, Tensor]:
        return self.backbone(images.tensors)

    @torch.no_grad()
    def propose(self, images: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Class-agnostic proposals: RPN boxes refined by the box regressor, scored by RPN objectness.

        Returns per image (``Tensor[P_i, 4]`` boxes in input-image pixels, ``Tensor[P_i]`` scores in
        ``[0, 1]``), sorted by score. Used as a proposal source for region distillation.
        """
        batch = self.preprocess(images)
        feats = self.features(batch)
        boxes, scores = self.rpn.proposals_with_scores(batch, feats)
        refined = self.roi_heads.refine_boxes(feats, boxes, batch.image_sizes)
        out = []
        for b, s in zip(refined, scores, strict=True):
            order = s.argsort(descending=True)
            out.append((b[order], s[order]))
        return out

    def loss_names(self, supervision: str) -> tuple[str, ...]:
        """The loss keys a training batch of ``supervision`` returns (see :meth:`forward`)."""
        distill = self.roi_heads.distill_loss_names()
        if supervision == "box":
            mask = ("loss_mask",) if self.roi_heads.mask_head is not None else ()
            return ("loss_objectness", "loss_rpn_box_reg", "loss_cls", "loss_box_reg", *mask, *distill)
        if supervision in ("pseudo", "image"):
            return ("loss_image_label", *distill)
        raise ValueError(f"unknown supervision {supervision!r}; expected box, pseudo or image")

    def forward(
        self,
        images: list[Tensor],
        targets: list[dict[str, Tensor]] | None = None,
        supervision: str = "box",
    ) -> dict[str, Tensor] | list[Detections]:
        """Training: ``targets`` → dict of losses; inference: a list of :class:`Detections`.

        Each target holds ``boxes`` float[N, 4] and ``labels`` int64[N], for a Mask R-CNN ``masks``
        uint8[N, H, W] (box batches only), and for region distillation ``distill_boxes`` float[K, 4]
        with ``distill_embeddings`` float[K, D] (and, teacher-aware, ``distill_weights`` float[K]).

        ``supervision`` says what the training batch's targets are (METHOD §4.4):

        * ``"box"``: ground-truth boxes: RPN and detection losses;
        * ``"pseudo"``: pseudo boxes (one per image-level label, ``labels`` = that label): the RPN is
          not run, the pseudo boxes are the proposals, and the pseudo max-score loss is the only
          detection loss;
        * ``"image"``: image-level labels only (``pos_labels`` int64[L]): the largest RPN proposal of
          each image takes all its labels (Detic's max-size loss); no RPN loss.

        Region distillation losses are added to every kind of batch when distillation is on.
        """
        batch = self.preprocess(images)
        feats = self.features(batch)
        if targets is not None:
            targets = [{k: v.to(self.device) for k, v in t.items()} for t in targets]
        if not self.training:
            proposals, _ = self.rpn(batch, feats, None)
            detections, _ = self.roi_heads(feats, proposals, batch.image_sizes, None)
            return detections
        if targets is None:
            raise ValueError("targets are needed in training mode")
        if supervision == "box":
            proposals, rpn_losses = self.rpn(batch, feats, targets)
            _, roi_losses = self.roi_heads(feats, proposals, batch.image_sizes, targets)
            losses = {**rpn_losses, **roi_losses}
        elif supervision == "pseudo":
            losses = self.roi_heads.pseudo_box_losses(
                feats, [t["boxes"] for t in targets], [t["labels"] for t in targets], batch.image_sizes
            )
        elif supervision == "image":
            with torch.no_grad():
                proposals, _ = self.rpn.proposals_with_scores(batch, feats)
            losses = self.roi_heads.max_size_losses(
                feats, [p[: self.max_size_num_proposals] for p in proposals],
                [t["pos_labels"] for t in targets], batch.image_sizes,
            )  # fmt: skip
        else:
            raise ValueError(f"unknown supervision {supervision!r}; expected box, pseudo or image")
        if self.distill_enabled:
            if any("distill_boxes" not in t for t in targets):
                raise ValueError("region distillation is on but the batch has no distill_boxes")
            losses |= self.roi_heads.distill_losses(
                feats,
                [t["distill_boxes"] for t in targets],
                [t["distill_embeddings"] for t in targets],
                batch.image_sizes,
                [t["distill_weights"] for t in targets] if all("distill_weights" in t for t in targets) else None,
            )
        return losses
