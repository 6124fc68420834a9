"""Parity of converted detectron2 models with detectron2's own outputs, stage by stage.

The fixtures (``data/d2_parity_<arch>.npz``) were recorded by ``benchmarks/detectron2_parity/make_fixtures.py``
running detectron2 v0.6 and object-centric-ovd from source on full-size models whose weights come from
the shared seeded generator (``random_weights.py``) plus the calibrated statistics stored in the fixture.
Here the same detectron2-format state dict is rebuilt, converted with :mod:`ovd.compat.detectron2` and run
by ovd alone (no detectron2 import).
"""

from __future__ import annotations

import importlib.util
import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from ovd.compat.detectron2 import PRESETS, ZS_WEIGHT, convert_state_dict
from ovd.config import config_from_yaml
from ovd.engine.checkpoint import load_model_state
from ovd.export import matched_detections
from ovd.modeling.build import build_model
from ovd.modeling.mask_head import paste
from ovd.predictor import Prediction

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parents[2]
IMAGES = ("coffee", "chelsea")


def _random_weights():
    spec = importlib.util.spec_from_file_location(
        "d2_random_weights", ROOT / "benchmarks" / "detectron2_parity" / "random_weights.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def detectron2_state(arch: str) -> tuple[dict[str, torch.Tensor], np.lib.npyio.NpzFile]:
    """The detectron2-format state dict that make_fixtures.py ran, and the fixture."""
    rw = _random_weights()
    manifest = json.loads((DATA / "detectron2_manifests.json").read_text())["archs"][arch]
    fix = np.load(DATA / f"d2_parity_{arch}.npz")
    state = rw.random_state_dict(manifest)
    # zs_weight as the reference builds it from its .npy: transpose, zero background column, L2 columns
    emb = torch.from_numpy(fix["zeroshot_npy"]).float().T  # (D, C)
    zs = torch.nn.functional.normalize(torch.cat([emb, emb.new_zeros(emb.shape[0], 1)], dim=1), p=2, dim=0)
    state[ZS_WEIGHT] = zs.numpy()
    calib = {k[len("calib/") :]: fix[k] for k in fix.files if k.startswith("calib/")}
    alpha = float(calib.pop("classifier_alpha"))
    bias_key = next(k for k in calib if k.startswith("roi_heads.box_predictor.cls_score."))
    weight_key = bias_key[: -len("bias")] + "weight"
    state[weight_key] = rw.aligned_classifier_weight(state[weight_key], state[ZS_WEIGHT], alpha)
    state.update(calib)
    return {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, fix


@cache
def converted(arch: str, preset: str):
    torch.set_num_threads(2)
    state, fix = detectron2_state(arch)
    overrides = [  # the fixture's two test-time settings (see make_fixtures.py)
        f"model.rpn.post_nms_top_n_test={int(fix['post_nms_topk'])}",
        f"model.roi_heads.score_thresh_test={float(fix['score_thresh'])}",
    ]
    ckpt = convert_state_dict(state, PRESETS[preset], overrides=overrides)
    cfg = config_from_yaml(ckpt["config"])
    model = build_model(cfg, class_embeddings=ckpt["vocabulary"]["embeddings"])
    load_model_state(model, ckpt["model"], source=arch)
    return model.eval(), fix


def _photo(name: str) -> torch.Tensor:
    skimage_data = pytest.importorskip("skimage.data")
    return torch.from_numpy(np.ascontiguousarray(getattr(skimage_data, name)())).permute(2, 0, 1)  # (3, H, W) RGB


def _close(got: torch.Tensor, want: np.ndarray, rel: float, what: str) -> None:
    want_t = torch.from_numpy(np.asarray(want, dtype=np.float32))
    assert got.shape == want_t.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want_t.shape)}"
    scale = max(float(want_t.abs().max()), 1e-6)
    err = float((got.float() - want_t).abs().max()) / scale
    assert err <= rel, f"{what}: max error {err:.2e} of its scale {scale:.3g} (limit {rel:g})"


# Tolerances: the issue's, except where float32 rounding alone moves a value further. ovd's own outputs
# differ between 1 and 2 CPU threads by as much as they differ from detectron2's: res4 by 8e-6 of its
# scale, the top-50 proposals by up to 1.0e-3 px (so 2e-3 here, not 1e-3), and the FPN head's class
# scores by 1.4e-5 (2.3e-5 from detectron2; so 5e-5 for FPN, the 1e-5 for C4, measured 9e-7).
FEATURE_REL = 1e-4
OBJECTNESS_REL = 1e-4
PROPOSAL_PX = 2e-3
SCORE_ABS = {"c4": 1e-5, "fpn": 5e-5}
DELTA_ABS = {"c4": 1e-5, "fpn": 5e-5}  # FPN box deltas: 1.6e-5 from detectron2
DET_IOU = 0.999
# final scores: the 1e-4 for C4; FPN detections pool proposals that are themselves ~1e-3 px apart,
# and one of 93 differs by 1.08e-4 from detectron2's
DET_SCORE = {"c4": 1e-4, "fpn": 3e-4}
MASK_IOU = 0.99
TOP_PROPOSALS = 50


def run_stages(model, image: torch.Tensor) -> dict:
    """One inference pass of ``model`` on ``image``, with every stage's output captured."""
    caps: dict = {}
    fpn = hasattr(model.backbone, "body")
    trunk = model.backbone.body if fpn else model.backbone
    layers = ["layer1", "layer2", "layer3", "layer4"] if fpn else ["layer1", "layer2", "layer3"]
    hooks = [
        getattr(trunk, name).register_forward_hook(lambda m, i, o, k=f"res{j + 2}": caps.__setitem__(k, o))
        for j, name in enumerate(layers)
    ]
    hooks.append(model.backbone.register_forward_hook(lambda m, i, o: caps.__setitem__("features", o)))
    hooks.append(model.rpn.head.register_forward_hook(lambda m, i, o: caps.__setitem__("rpn", o)))
    hooks.append(model.roi_heads.register_forward_pre_hook(lambda m, args: caps.__setitem__("proposals", args[1])))
    with torch.no_grad():
        caps["batch"] = model.preprocess([image])
        caps["detections"] = model([image])[0]
    for h in hooks:
        h.remove()
    if fpn:
        caps.update({("p6" if k == "pool" else k): v for k, v in caps["features"].items()})
    return caps


def check_stages(model, fix, name: str, paste_style: str = "detectron2") -> None:
    got = run_stages(model, _photo(name))
    batch = got["batch"]
    _close(batch.tensors[0, :, ::4, ::4], fix[f"{name}/input"], 1e-6, "normalised input")
    for key in fix.files:
        if key.startswith(f"{name}/feat_") and key.count("_") == 1:
            level = key.split("feat_")[1]
            idx = torch.from_numpy(fix[f"{key}_channels"])
            step = int(fix[f"{key}_step"])
            f = got[level][0, idx, ::step, ::step]
            _close(f / float(fix[f"{key}_scale"]), fix[key] / fix[f"{key}_scale"], FEATURE_REL, level)
    objectness, deltas = got["rpn"]
    flat = torch.cat([o[0].permute(1, 2, 0).reshape(-1) for o in objectness])  # detectron2's (H·W·A,) order
    _close(flat, fix[f"{name}/rpn_objectness"], OBJECTNESS_REL, "RPN objectness")
    flat_d = torch.cat([d[0].view(-1, 4, *d.shape[-2:]).permute(2, 3, 0, 1).reshape(-1, 4) for d in deltas])
    _close(flat_d, fix[f"{name}/rpn_deltas"], OBJECTNESS_REL, "RPN deltas")
    # the same top proposals (as sets: ranks may swap only where logits nearly tie)
    logits = fix[f"{name}/proposal_logits"]
    assert logits[TOP_PROPOSALS - 1] - logits[TOP_PROPOSALS] > 1e-4 if len(logits) > TOP_PROPOSALS else True
    want = torch.from_numpy(fix[f"{name}/proposals"][:TOP_PROPOSALS])
    props = got["proposals"][0][:TOP_PROPOSALS]
    assert props.shape == want.shape
    dist = (props[:, None, :] - want[None]).abs().amax(dim=2)  # (P, P)
    assert float(dist.amin(dim=0).max()) <= PROPOSAL_PX, f"proposals differ by {float(dist.amin(dim=0).max()):.2e} px"
    # RoI head on detectron2's own proposals
    fixed = torch.from_numpy(fix[f"{name}/fixed_proposals"])
    with torch.no_grad():
        x = model.roi_heads.region_features(got["features"], [fixed], batch.image_sizes)
        scores = torch.sigmoid(model.roi_heads.classifier(x))
        box_deltas = model.roi_heads.box_regressor(x)
    kind = "fpn" if hasattr(model.backbone, "body") else "c4"
    score_tol, delta_tol = SCORE_ABS[kind], DELTA_ABS[kind]
    assert float((scores - torch.from_numpy(fix[f"{name}/fixed_scores"])).abs().max()) <= score_tol
    assert float((box_deltas - torch.from_numpy(fix[f"{name}/fixed_deltas"])).abs().max()) <= delta_tol
    # final detections, one to one
    det = got["detections"]
    ours = Prediction(det.boxes.numpy(), det.scores.numpy(), det.labels.numpy(), [])
    ref = Prediction(
        fix[f"{name}/det_boxes"], fix[f"{name}/det_scores"], fix[f"{name}/det_classes"].astype(np.int64), []
    )
    assert len(ref) > 0 and len(ours) == len(ref)
    assert matched_detections(ref, ours, score_tol=DET_SCORE[kind], iou_min=DET_IOU) == len(ref)
    assert matched_detections(ours, ref, score_tol=DET_SCORE[kind], iou_min=DET_IOU) == len(ours)
    if f"{name}/det_mask_probs" in fix.files:
        check_masks(det, fix, name, batch.image_sizes[0], paste_style)


def check_masks(det, fix, name: str, size: tuple[int, int], model_paste: str) -> None:
    """Mask probabilities of the matched detections, and the pasted masks of the top ones."""
    ref_boxes = torch.from_numpy(fix[f"{name}/det_boxes"])
    iou = box_iou(ref_boxes, det.boxes)  # (N, N)
    same = torch.from_numpy(fix[f"{name}/det_classes"].astype(np.int64))[:, None] == det.labels[None]
    order = torch.where(same, iou, torch.zeros_like(iou)).argmax(dim=1)  # ours matching each reference detection
    ours = det.masks[order, 0]  # (N, M, M)
    ref = torch.from_numpy(fix[f"{name}/det_mask_probs"].astype(np.float32))
    assert float((ours - ref).abs().max()) <= 2e-3  # float16 storage
    packed = fix[f"{name}/det_masks_packed"]
    want = np.unpackbits(packed, axis=-1)[..., : size[1]].astype(bool)  # (K, H, W)
    top = order[: len(want)]
    pasted = paste(det.masks[top], det.boxes[top], size, model_paste).numpy() >= 0.5
    inter = (pasted & want).sum(axis=(1, 2))
    union = (pasted | want).sum(axis=(1, 2))
    assert (inter / np.maximum(union, 1)).min() >= MASK_IOU


@pytest.mark.parametrize(
    ("arch", "preset", "images"),
    [
        ("c4", "ovd_coco_r50_c4", IMAGES[:1]),  # chelsea: test_converted_file_in_predictor
        ("c4_wt", "ovd_coco_r50_c4_wt", IMAGES[1:]),
        ("fpn_mask", "ovd_lvis_r50_fpn_mask", IMAGES[:1]),
    ],
)
def test_stages_match_detectron2(arch, preset, images):
    model, fix = converted(arch, preset)
    for name in images:
        check_stages(model, fix, name)
