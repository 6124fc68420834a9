"""The detector pair of the model benchmarks: our OpenVocabDetector and torchvision's Faster R-CNN (R50-FPN)
with the same backbone, RPN, RoI sampling and box head, and the same weights (see bench_model.py's
docstring); inputs, score-threshold calibration and the untimed instrumentation (hooks, NMS counts, stage
times, profiler tables). Used by bench_model.py and bench_maskrcnn.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
import torchvision
from timing import OURS, TV, Stopwatch  # benchmarks/timing.py
from torch import Tensor, nn
from torchvision.models import resnet50
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection import roi_heads as tv_roi_heads_module
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d

import ovd.modeling.roi_heads as ovd_roi_heads_module
from ovd.config import load_config
from ovd.modeling.build import build_model
from ovd.modeling.detector import OpenVocabDetector

RPN_TOP_N = dict(pre_train=2000, post_train=2000, pre_test=1000, post_test=1000)  # torchvision defaults
EMBED_DIM = 512


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """The flags both paired detector benchmarks share: ``--seed``, ``--output``, ``--quiet``."""
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, embeddings and inputs")
    parser.add_argument("--output", default=None, help="also write the markdown report to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def start(args: argparse.Namespace) -> Callable[[str], None]:
    """Set torch's threads (``--threads``) and seed; returns the progress logger (stderr unless ``--quiet``)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    return log


def ours_overrides(num_classes: int, args: argparse.Namespace) -> list[str]:
    """Config overrides that make our detector the torchvision Faster R-CNN R50-FPN shape."""
    lvis = num_classes >= args.fed_loss_from
    return [
        "model.backbone.name=resnet50_fpn",
        "model.backbone.norm=frozen_bn",
        "model.backbone.freeze_at=2",
        "model.backbone.fpn_channels=256",
        "model.rpn.anchor_sizes=[[32],[64],[128],[256],[512]]",
        "model.rpn.aspect_ratios=[0.5,1.0,2.0]",
        f"model.rpn.pre_nms_top_n_train={RPN_TOP_N['pre_train']}",
        f"model.rpn.post_nms_top_n_train={RPN_TOP_N['post_train']}",
        f"model.rpn.pre_nms_top_n_test={RPN_TOP_N['pre_test']}",
        f"model.rpn.post_nms_top_n_test={RPN_TOP_N['post_test']}",
        "model.rpn.nms_thresh=0.7",
        "model.rpn.batch_size_per_image=256",
        "model.roi_heads.pooler_resolution=7",
        f"model.roi_heads.pooler_sampling_ratio={args.sampling_ratio}",
        "model.roi_heads.fc_dim=1024",
        "model.roi_heads.num_fc=2",
        "model.roi_heads.batch_size_per_image=512",
        "model.roi_heads.positive_fraction=0.25",
        "model.roi_heads.add_gt_as_proposals=true",
        "model.roi_heads.nms_thresh_test=0.5",
        "model.roi_heads.detections_per_image=100",
        "model.size_divisibility=32",
        "model.classifier.ignore_zero_cats=true",
        # LVIS recipe (METHOD §1.4): learnable logit bias and the federated loss
        f"model.classifier.use_bias={str(lvis).lower()}",
        f"model.classifier.use_fed_loss={str(lvis).lower()}",
        f"seed={args.seed}",
    ]


def class_image_counts(num_classes: int, seed: int) -> Tensor:
    """Synthetic per-class training image counts with the splits' share of zero-count classes
    (OV-COCO: 32 of 80 classes unseen; LVIS: the 337 rare classes of 1203)."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 2000, (num_classes,), generator=g)
    unseen = round(num_classes * (32 / 80 if num_classes <= 100 else 337 / 1203))
    counts[torch.randperm(num_classes, generator=g)[:unseen]] = 0
    return counts


def torchvision_kwargs(num_classes: int, cfg: Any, h: int, w: int) -> dict[str, Any]:
    """The keyword arguments that give torchvision's R-CNN our input scale, statistics, RPN and RoI sampling."""
    return dict(
        num_classes=num_classes + 1,
        # min/max size = the input's short/long side: the transform's scale factor is exactly 1.
        min_size=min(h, w),
        max_size=max(h, w),
        # torchvision is given float images on the 0–255 scale with our 0–255 statistics, so its
        # normalisation is bit-identical to ours (``(x - mean) / std``) and so are features and proposals.
        image_mean=list(cfg.model.pixel_mean),
        image_std=list(cfg.model.pixel_std),
        rpn_pre_nms_top_n_train=RPN_TOP_N["pre_train"],
        rpn_pre_nms_top_n_test=RPN_TOP_N["pre_test"],
        rpn_post_nms_top_n_train=RPN_TOP_N["post_train"],
        rpn_post_nms_top_n_test=RPN_TOP_N["post_test"],
        rpn_nms_thresh=0.7,
        rpn_batch_size_per_image=256,
        box_nms_thresh=0.5,
        box_detections_per_img=100,
        box_batch_size_per_image=512,
        box_positive_fraction=0.25,
    )


def shared_weights(src: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict entries under torchvision's names for every part both share: backbone + FPN, RPN head
    and the 2-FC box head."""
    shared = {k: v for k, v in src.items() if k.startswith(("backbone.", "rpn.head."))}
    for i, name in ((1, "fc6"), (3, "fc7")):
        for p in ("weight", "bias"):
            shared[f"roi_heads.box_head.{name}.{p}"] = src[f"roi_heads.region_features.head.{i}.{p}"]
    return shared


def build_pair(num_classes: int, args: argparse.Namespace) -> tuple[OpenVocabDetector, FasterRCNN, dict]:
    cfg = load_config(None, ours_overrides(num_classes, args))
    g = torch.Generator().manual_seed(args.seed + num_classes)
    embeddings = torch.randn(num_classes, EMBED_DIM, generator=g)  # random CLIP-like text embeddings
    ours = build_model(cfg, class_embeddings=embeddings, class_image_counts=class_image_counts(num_classes, args.seed))
    h, w = args.size
    # Exactly what fasterrcnn_resnet50_fpn(weights_backbone=ResNet50_Weights.IMAGENET1K_V1) builds
    # (FrozenBatchNorm2d, 3 trainable stages), without the download; with weights_backbone=None it
    # would use trainable BatchNorm2d and 5 trainable stages, i.e. a different backbone than ours.
    backbone = _resnet_fpn_extractor(resnet50(weights=None, norm_layer=FrozenBatchNorm2d), trainable_layers=3)
    tv = FasterRCNN(
        backbone,
        **torchvision_kwargs(num_classes, cfg, h, w),
    )
    shared = shared_weights(ours.state_dict())
    missing, unexpected = tv.load_state_dict(shared, strict=False)
    assert not unexpected, unexpected
    assert all(k.startswith("roi_heads.box_predictor.") for k in missing), missing
    n_train = {m: sum(p.numel() for p in mod.parameters() if p.requires_grad) for m, mod in ((OURS, ours), (TV, tv))}
    n_all = {m: sum(p.numel() for p in mod.parameters()) for m, mod in ((OURS, ours), (TV, tv))}
    info = {"cfg": cfg, "trainable_params": n_train, "params": n_all}
    return ours, tv, info


def make_inputs(batch: int, args: argparse.Namespace, num_classes: int, counts: Tensor, seed: int):
    """Smooth random images (uint8 for ours, the same values as float for torchvision) and random GT boxes."""
    g = torch.Generator().manual_seed(seed)
    h, w = args.size
    images = []
    for _ in range(batch):
        low = torch.rand(1, 3, h // 16, w // 16, generator=g)
        im = nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0]
        im = im + 0.1 * torch.rand(3, h, w, generator=g)
        images.append((im.clamp(0, 1) * 255).round().to(torch.uint8))
    seen = torch.where(counts > 0)[0]
    targets_ours, targets_tv = [], []
    for _ in range(batch):
        n = args.gt_per_image
        wh = torch.exp(torch.empty(n, 2).uniform_(2.5, 5.5, generator=g))  # ~12..245 px
        xy = torch.rand(n, 2, generator=g) * (torch.tensor([w, h]) - wh).clamp(min=1)
        boxes = torch.cat([xy, xy + wh], 1).clamp(max=torch.tensor([w, h, w, h]))
        labels = seen[torch.randint(len(seen), (n,), generator=g)]
        targets_ours.append({"boxes": boxes, "labels": labels})
        targets_tv.append({"boxes": boxes.clone(), "labels": labels + 1})  # torchvision: 0 = background
    return images, [im.float() for im in images], targets_ours, targets_tv


# ------------------------------------------------------------------------------------------------
# Instrumentation (only in untimed runs)
# ------------------------------------------------------------------------------------------------


@contextmanager
def hooks(pairs: list[tuple[nn.Module, str, Callable]]):
    handles = []
    for module, kind, fn in pairs:
        reg = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
        handles.append(reg(fn))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def count_roi_nms(store: list[dict[str, int]], roi_modules: list[nn.Module]):
    """Record (candidates, classes, kept) of every ``batched_nms`` call made inside a RoI head."""
    inside = {"on": False}
    orig_ovd, orig_tv = ovd_roi_heads_module.batched_nms, tv_roi_heads_module.box_ops.batched_nms

    def wrap(orig):
        def f(boxes, scores, idxs, thresh):
            keep = orig(boxes, scores, idxs, thresh)
            if inside["on"]:
                store.append(
                    {"candidates": int(boxes.shape[0]), "classes": int(idxs.unique().numel()), "kept": len(keep)}
                )
            return keep

        return f

    ovd_roi_heads_module.batched_nms = wrap(orig_ovd)
    tv_roi_heads_module.box_ops.batched_nms = wrap(orig_tv)  # torchvision.ops.boxes, also used by the RPN
    on = [(m, "pre", lambda *a: inside.__setitem__("on", True)) for m in roi_modules]
    off = [(m, "post", lambda *a: inside.__setitem__("on", False)) for m in roi_modules]
    try:
        with hooks(on + off):
            yield
    finally:
        ovd_roi_heads_module.batched_nms = orig_ovd
        tv_roi_heads_module.box_ops.batched_nms = orig_tv


def kth_threshold(scores: Tensor, k: int) -> float:
    """A threshold with exactly ``k`` of ``scores`` strictly above it (midway between ranks k, k+1)."""
    top = torch.topk(scores.flatten().double(), min(k + 1, scores.numel())).values
    if top.numel() <= k:
        return float(top[-1]) - 1e-12
    return float((top[k - 1] + top[k]) / 2)


@torch.inference_mode()
def calibrate(
    ours: OpenVocabDetector, tv: FasterRCNN, images_ours, images_tv, k: int, stages: dict[str, dict[str, nn.Module]]
) -> dict[str, Any]:
    """Set both score thresholds so that ``k`` (box, class) pairs enter NMS; capture head inputs.

    Two inferences per model: one to capture scores, one to check the NMS input (and time ``stages``)."""
    cap: dict[str, Any] = {}
    with hooks(
        [
            (ours.backbone, "pre", lambda m, a: cap.__setitem__("ours_in", tuple(a[0].shape))),
            (tv.backbone, "pre", lambda m, a: cap.__setitem__("tv_in", tuple(a[0].shape))),
            (ours.backbone, "post", lambda m, a, o: cap.__setitem__("ours_feat", list(o.values()))),
            (tv.backbone, "post", lambda m, a, o: cap.__setitem__("tv_feat", list(o.values()))),
            (ours.rpn, "post", lambda m, a, o: cap.__setitem__("ours_props", o[0])),
            (tv.rpn, "post", lambda m, a, o: cap.__setitem__("tv_props", o[0])),
            (ours.roi_heads.region_features, "post", lambda m, a, o: cap.__setitem__("x", o)),
            (ours.roi_heads, "pre", lambda m, a: cap.__setitem__("image_sizes", a[2])),
            (ours.roi_heads.classifier, "post", lambda m, a, o: cap.__setitem__("logits", o)),
            (ours.roi_heads.box_regressor, "post", lambda m, a, o: cap.__setitem__("deltas", o)),
            (tv.roi_heads, "pre", lambda m, a: cap.__setitem__("tv_shapes", a[2])),
            (tv.roi_heads.box_head, "post", lambda m, a, o: cap.__setitem__("tv_x", o)),
            (tv.roi_heads.box_predictor, "post", lambda m, a, o: cap.__setitem__("tv_out", o)),
        ]
    ):
        ours(images_ours)
        tv(images_tv)
    num_classes = ours.num_classes
    # ours: sigmoid scores of the C foreground columns, one shared box per region
    ours.roi_heads.score_thresh = kth_threshold(torch.sigmoid(cap["logits"].float())[:, :num_classes], k)
    # torchvision: softmax over C+1, per-class boxes, clipped; empty boxes are dropped after the threshold
    logits, deltas = cap["tv_out"]
    rh = tv.roi_heads
    boxes = rh.box_coder.decode(deltas, cap["tv_props"])  # (R, C+1, 4)
    boxes = torchvision.ops.clip_boxes_to_image(boxes, cap["tv_shapes"][0])[:, 1:]
    scores = torch.softmax(logits, -1)[:, 1:]
    ws, hs = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    scores = torch.where((ws >= 1e-2) & (hs >= 1e-2), scores, torch.full_like(scores, -1.0))
    rh.score_thresh = kth_threshold(scores, k)
    # check: the NMS inputs really have k candidates in both models
    nms: list[dict[str, int]] = []
    dets: dict[str, Any] = {}
    with count_roi_nms(nms, [ours.roi_heads, tv.roi_heads]):
        stage = {
            OURS: stage_times(lambda: dets.__setitem__(OURS, ours(images_ours)), stages[OURS]),
            TV: stage_times(lambda: dets.__setitem__(TV, tv(images_tv)), stages[TV]),
        }
    dets_ours, dets_tv = dets[OURS], dets[TV]
    assert len(nms) == 2, nms
    feat_diff = max(
        float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))
        for a, b in zip(cap["ours_feat"], cap["tv_feat"], strict=True)
    )
    props_same = all(
        a.shape == b.shape and bool((a == b).all()) for a, b in zip(cap["ours_props"], cap["tv_props"], strict=True)
    )
    return {
        "backbone_in": {OURS: cap["ours_in"], TV: cap["tv_in"]},
        "feat_rel_diff": feat_diff,
        "proposals": {OURS: [len(p) for p in cap["ours_props"]], TV: [len(p) for p in cap["tv_props"]]},
        "proposals_same": props_same,
        "thresh": {OURS: ours.roi_heads.score_thresh, TV: rh.score_thresh},
        "nms": {OURS: nms[0], TV: nms[1]},
        "detections": {OURS: len(dets_ours[0]), TV: len(dets_tv[0]["scores"])},
        "stages": stage,
        "x": cap["x"].clone(),
        "tv_x_same": bool(torch.allclose(cap["x"], cap["tv_x"], rtol=1e-3, atol=1e-3 * float(cap["x"].abs().max()))),
        "ours_head_in": (cap["logits"].clone(), cap["deltas"].clone(), [p.clone() for p in cap["ours_props"]]),
        "image_sizes": cap["image_sizes"],
        "tv_head_in": (logits.clone(), deltas.clone(), [p.clone() for p in cap["tv_props"]], cap["tv_shapes"]),
    }


# ------------------------------------------------------------------------------------------------
# Timed functions and report helpers
# ------------------------------------------------------------------------------------------------


def train_step_fn(model: nn.Module, images, targets, lr: float) -> Callable[[], float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        losses = model(images, [dict(t) for t in targets])
        total = sum(losses.values())
        total.backward()
        opt.step()
        return float(total.detach())

    return step


def infer_fn(model: nn.Module, images) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            model(images)

    return run


def profile_table(fn: Callable[[], Any], rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def stage_times(run: Callable[[], Any], stages: dict[str, nn.Module]) -> dict[str, float]:
    """Wall time spent inside each of ``stages`` (forward only) during one ``run``."""
    acc: dict[str, float] = {k: 0.0 for k in stages}
    start: dict[str, float] = {}
    pairs = []
    for name, mod in stages.items():
        pairs.append((mod, "pre", lambda *a, n=name: start.__setitem__(n, time.perf_counter())))
        pairs.append((mod, "post", lambda *a, n=name: acc.__setitem__(n, acc[n] + time.perf_counter() - start[n])))
    with hooks(pairs), Stopwatch() as whole:
        run()
    acc["total"] = whole.s
    return acc
