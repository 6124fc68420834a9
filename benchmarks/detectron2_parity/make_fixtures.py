r"""Record detectron2's own outputs for the ovd parity tests (tests/compat/test_detectron2_parity.py).

Runs detectron2 (v0.6) and object-centric-ovd model code **from source on the CPU**, without building
detectron2's C++ extension (a stub ``detectron2._C`` module: deformable conv, rotated boxes and
ROIAlignRotated are not on these models' paths), builds the reference's own configs at full size with
the shared seeded weights of ``random_weights.py``, makes them informative (FrozenBN statistics
calibrated on a photo, a classifier bias that lets a few per cent of class scores pass the test
threshold), and records on scikit-image sample photos: the normalised input, the backbone features,
RPN objectness and deltas, the proposals, the RoI head's class scores and box deltas for given
proposals, and the final instances (+ masks). The records are computed in float64 (``model.double()``
after calibration: the same float32 weights, float64 arithmetic; :func:`keep_float64` removes detectron2's
three float32 casts on these paths) and stored as float32, so the tests can hold ovd's float64 run to
the issue's tolerances; a float32 run's small records (``float32/<photo>/...``) are stored too.

Usage (a Python environment with detectron2's pure-python deps: fvcore, iopath, yacs, termcolor, tabulate)::

    python benchmarks/detectron2_parity/make_fixtures.py \
        --detectron2 /path/to/detectron2-v0.6 --reference /path/to/object-centric-ovd \
        --zeroshot-weights /path/to/zeroshot_weights --output tests/compat/data

It writes ``detectron2_manifests.json`` (the exact key names and shapes of every reference architecture
at full size), ``d2_parity_<arch>.npz`` per architecture and ``zeroshot_{coco,lvis}.npy`` (the reference's
class embeddings, shared by the fixtures of a dataset). Fixture size is kept small by (1) the
shared weight generator (no conv weights stored), (2) a subset of feature channels (every
``C / 16``-th) and (3) small photos; see the README of this folder.
"""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from random_weights import SEED, aligned_classifier_weight, random_state_dict  # noqa: E402

ARCHS = {
    # arch: (reference config, zero-shot weights file)
    "c4": ("configs/coco/Base-OVD-RCNN-C4.yaml", "coco_clip_a+photo+cname.npy"),
    "c4_wt": ("configs/coco/COCO_OVD_RKD_PIS_WeightTransfer.yaml", "coco_clip_a+photo+cname.npy"),
    "fpn_mask": ("configs/lvis/mask_rcnn_R50FPN_CLIP_sigmoid.yaml", "lvis_v1_clip_a+photo+cname.npy"),
    "fpn_mask_wt": ("configs/lvis/LVIS_OVD_RKD_PIS_WeightTransfer.yaml", "lvis_v1_clip_a+photo+cname.npy"),
}
IMAGES = ("coffee", "chelsea")  # skimage.data photos: 400x600 and 300x451
# the photos recorded per architecture (the 10 MB budget: an FPN record of one photo is ~2 MB)
ARCH_IMAGES = {"c4": IMAGES, "c4_wt": ("chelsea",), "fpn_mask": ("coffee",), "fpn_mask_wt": ("chelsea",)}
ZEROSHOT_FILES = {
    "coco_clip_a+photo+cname.npy": "zeroshot_coco.npy",
    "lvis_v1_clip_a+photo+cname.npy": "zeroshot_lvis.npy",
}
# recorded a second time with the float32 model (the tests' rounding check): small records only
FLOAT32_KEYS = (
    "proposals",
    "proposal_logits",
    "fixed_proposals",
    "fixed_scores",
    "fixed_deltas",
    "det_boxes",
    "det_scores",
    "det_classes",
)
CALIBRATION_IMAGE = "astronaut"
NUM_CHANNELS = 16  # feature channels recorded per map
NUM_FIXED_PROPOSALS = 20  # proposals whose RoI-head outputs are recorded
POST_NMS_TOPK = 50  # proposals per image at test (the reference: 1000); keeps the CPU tests short
SCORE_THRESH = 0.05  # LVIS tests at 0.0001 (300 detections, mostly near-ties at random weights): 0.05 here
NUM_PASTED = 10  # highest-scoring detections whose pasted masks are recorded
CLASSIFIER_ALPHA = 10.0  # alignment of the classified embedding with the class embeddings (random_weights.py)
TARGET_PASS = 0.01  # share of (region, class) scores above 0.05 after calibration (on all photos)


def reference_env(d2_src: Path, ref_src: Path) -> None:
    sys.modules["detectron2._C"] = types.ModuleType("detectron2._C")  # no C++ ops on these paths
    import PIL.Image

    PIL.Image.LINEAR = PIL.Image.BILINEAR  # removed in Pillow 10, used by detectron2 v0.6
    sys.path[:0] = [str(d2_src), str(ref_src)]


def _parity_float(t):
    import torch

    return torch.float64 if isinstance(t, torch.Tensor) and t.dtype == torch.float64 else torch.float32


def _patch_source(fn, replacements: dict[str, str]) -> None:
    """Recompile ``fn`` (a detectron2 function) from its own source with textual ``replacements``."""
    src = textwrap.dedent(inspect.getsource(fn))
    for old, new in replacements.items():
        assert old in src, (fn.__qualname__, old)
        src = src.replace(old, new)
    fn.__globals__["_parity_float"] = _parity_float
    namespace: dict = {}
    exec(compile(src, inspect.getsourcefile(fn), "exec"), fn.__globals__, namespace)
    fn.__code__ = namespace[fn.__name__].__code__


def keep_float64() -> None:
    """Let detectron2's inference path run in float64 (``model.double()``, for the parity records).

    detectron2 v0.6 casts to float32 in three places on these models' paths: ``Boxes.__init__``, the box
    decoding (``Box2BoxTransform.apply_deltas``) and ``batched_nms``. Each is recompiled from its own source
    with the cast made dtype-preserving (float64 stays float64; anything else still becomes float32, so
    float32 runs are unchanged). Everything else already follows the dtype of the weights and inputs.
    """
    from detectron2.layers import batched_nms
    from detectron2.modeling.box_regression import Box2BoxTransform
    from detectron2.structures import Boxes

    _patch_source(Boxes.__init__, {"dtype=torch.float32": "dtype=_parity_float(tensor)"})
    _patch_source(Box2BoxTransform.apply_deltas, {"deltas.float()": "deltas.to(_parity_float(deltas))"})
    _patch_source(batched_nms, {"boxes.float()": "boxes.to(_parity_float(boxes))"})


def build_reference(arch: str, ref_src: Path, zs_dir: Path, tmp: Path):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from ovd.config import add_ovd_config  # the reference's package

    cfg = get_cfg()
    add_ovd_config(cfg)
    config, zs_file = ARCHS[arch]
    cfg.merge_from_file(str(ref_src / config))
    num = 80 if arch.startswith("c4") else 1203
    cat_info = tmp / f"cat_info_{num}.json"
    cat_info.write_text(json.dumps([{"id": i + 1, "image_count": i % 5} for i in range(num)]))
    cfg.MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH = str(zs_dir / zs_file)
    cfg.MODEL.ROI_BOX_HEAD.CAT_FREQ_PATH = str(cat_info)
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = POST_NMS_TOPK
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = SCORE_THRESH
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    model.eval()
    return model, cfg


def manifest_of(model) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def load_random(model, manifest: dict[str, list[int]]) -> None:
    import torch

    keep = ("zs_weight", "freq_weight")  # real CLIP embeddings / training-only: as built
    state = {k: torch.from_numpy(v) for k, v in random_state_dict(manifest).items() if not k.endswith(keep)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith(keep) for k in missing), (missing, unexpected)


def photo(name: str) -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)()  # RGB uint8 (H, W, 3)


def d2_input(rgb: np.ndarray):
    """detectron2's input dict: uint8 BGR (the model's float64 pixel mean makes the normalised input float64)."""
    import torch

    bgr = np.ascontiguousarray(rgb[:, :, ::-1].transpose(2, 0, 1))
    return {"image": torch.from_numpy(bgr), "height": rgb.shape[0], "width": rgb.shape[1]}


def calibrate(model, arch: str) -> dict[str, np.ndarray]:
    """FrozenBN statistics from one photo (each layer sees the calibrated layers before it), then a
    classifier bias shift; returns the calibrated tensors by key."""
    import torch
    from detectron2.layers import FrozenBatchNorm2d

    names = {m: n for n, m in model.named_modules()}

    def pre_hook(module, inputs):
        x = inputs[0].detach()
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)) + 1e-3)

    handles = [m.register_forward_pre_hook(pre_hook) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    with torch.no_grad():
        model.inference([d2_input(photo(CALIBRATION_IMAGE))], do_postprocess=False)
    for h in handles:
        h.remove()
    out = {}
    for m, n in names.items():
        if isinstance(m, FrozenBatchNorm2d):
            out[f"{n}.running_mean"] = m.running_mean.numpy().copy()
            out[f"{n}.running_var"] = m.running_var.numpy().copy()
    out.update(calibrate_classifier(model, arch))
    return out


def _box_features(model, batched):
    """Region features of the RPN proposals of one image (the input of the box predictor)."""
    import torch

    with torch.no_grad():
        images = model.preprocess_image(batched)
        features = model.backbone(images.tensor)
        proposals, _ = model.proposal_generator(images, features, None)
        heads = model.roi_heads
        boxes = [p.proposal_boxes for p in proposals]
        if hasattr(heads, "res5"):
            x = heads._shared_roi_transform([features[f] for f in heads.in_features], boxes).mean(dim=[2, 3])
        else:
            x = heads.box_head(heads.box_pooler([features[f] for f in heads.box_in_features], boxes))
    return x


def calibrate_classifier(model, arch: str) -> dict[str, np.ndarray]:
    """Align the layer that makes the classified embedding with the class embeddings (a random projection
    gives all classes nearly the same logit), then shift its bias away from the mean class embedding until
    about TARGET_PASS of the scores exceed 0.05 on the photos."""
    import torch
    import torch.nn.functional as F

    cls = model.roi_heads.box_predictor.cls_score
    layer = cls.fc4 if hasattr(cls, "fc4") else cls.linear
    x = torch.cat([_box_features(model, [d2_input(photo(n))]) for n in (CALIBRATION_IMAGE, *IMAGES)])
    mean_dir = F.normalize(cls.zs_weight[:, :-1].mean(dim=1), dim=0)  # (D,)
    aligned = aligned_classifier_weight(layer.weight.detach().numpy(), cls.zs_weight.numpy(), CLASSIFIER_ALPHA)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(aligned))
    base = layer.bias.detach().clone()

    def pass_rate(c: float) -> float:
        layer.bias.copy_(base - c * mean_dir)
        return float((torch.sigmoid(cls(x))[:, :-1] > 0.05).float().mean())

    with torch.no_grad():
        hi = 1.0
        while pass_rate(hi) > TARGET_PASS:
            hi *= 2.0
        lo = 0.0
        for _ in range(30):
            c = (lo + hi) / 2
            lo, hi = (c, hi) if pass_rate(c) > TARGET_PASS else (lo, c)
        pass_rate(hi)
    prefix = [n for n, m in model.named_modules() if m is layer][0]
    return {f"{prefix}.bias": layer.bias.detach().numpy().copy(), "classifier_alpha": np.array(CLASSIFIER_ALPHA)}


def channel_subset(c: int) -> np.ndarray:
    return np.arange(0, c, max(c // NUM_CHANNELS, 1))[:NUM_CHANNELS]


def record(model, arch: str, rgb: np.ndarray) -> dict[str, np.ndarray]:
    import torch

    rec: dict[str, np.ndarray] = {}
    batched = [d2_input(rgb)]
    captured: dict[str, torch.Tensor] = {}
    bottom = model.backbone.bottom_up if hasattr(model.backbone, "bottom_up") else model.backbone
    stages = [n for n in ("res2", "res3", "res4", "res5") if hasattr(bottom, n)]
    hooks = [getattr(bottom, n).register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o)) for n in stages]
    with torch.no_grad():
        images = model.preprocess_image(batched)
        features = model.backbone(images.tensor)
        for h in hooks:
            h.remove()
        rec["input"] = images.tensor[0, :, ::4, ::4].numpy()
        rec["image_size"] = np.array(images.image_sizes[0])
        maps = {**captured, **{k: v for k, v in features.items() if k.startswith("p")}}
        for name, f in maps.items():
            idx = channel_subset(f.shape[1])
            step = 2 if f.shape[-1] > 100 else 1  # the finest maps: every other pixel
            rec[f"feat_{name}"] = f[0, idx, ::step, ::step].numpy()
            rec[f"feat_{name}_step"] = np.array(step)
            rec[f"feat_{name}_channels"] = idx
            rec[f"feat_{name}_scale"] = np.array(float(f.abs().max()))
        rpn = model.proposal_generator
        feats = [features[f] for f in rpn.in_features]
        logits, deltas = rpn.rpn_head(feats)
        # detectron2's flattened layouts: (H·W·A,) and (H·W·A, 4) per level
        rec["rpn_objectness"] = np.concatenate([o[0].permute(1, 2, 0).reshape(-1).numpy() for o in logits])
        rec["rpn_deltas"] = np.concatenate(
            [d[0].view(-1, 4, d.shape[-2], d.shape[-1]).permute(2, 3, 0, 1).reshape(-1, 4).numpy() for d in deltas]
        )
        proposals, _ = rpn(images, features, None)
        p = proposals[0]
        rec["proposals"] = p.proposal_boxes.tensor.numpy()
        rec["proposal_logits"] = p.objectness_logits.numpy()
        # RoI head on fixed proposals: the first NUM_FIXED_PROPOSALS RPN proposals
        fixed = p.proposal_boxes[:NUM_FIXED_PROPOSALS]
        heads = model.roi_heads
        if hasattr(heads, "res5"):
            x = heads._shared_roi_transform([features[f] for f in heads.in_features], [fixed]).mean(dim=[2, 3])
        else:
            x = heads.box_head(heads.box_pooler([features[f] for f in heads.box_in_features], [fixed]))
        scores, box_deltas = heads.box_predictor(x)
        rec["fixed_proposals"] = fixed.tensor.numpy()
        rec["fixed_scores"] = torch.sigmoid(scores).numpy()
        rec["fixed_deltas"] = box_deltas.numpy()
        inst = model.inference(batched, do_postprocess=False)[0]
        rec["det_boxes"] = inst.pred_boxes.tensor.numpy()
        rec["det_scores"] = inst.scores.numpy()
        rec["det_classes"] = inst.pred_classes.numpy()
        if inst.has("pred_masks"):
            from detectron2.layers import paste_masks_in_image

            rec["det_mask_probs"] = inst.pred_masks[:, 0].numpy().astype(np.float16)  # (N, 28, 28)
            top = inst[:NUM_PASTED]  # sorted by score
            pasted = paste_masks_in_image(top.pred_masks[:, 0], top.pred_boxes, images.image_sizes[0], 0.5)
            rec["det_masks_packed"] = np.packbits(pasted.numpy().astype(bool), axis=-1)
    return rec


def git_commit(path: Path) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except Exception:
        return "unknown (not a git checkout)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detectron2", type=Path, required=True, help="detectron2 v0.6 source tree")
    ap.add_argument("--reference", type=Path, required=True, help="object-centric-ovd source tree")
    ap.add_argument("--zeroshot-weights", type=Path, required=True, help="folder with the reference's *.npy")
    ap.add_argument("--output", type=Path, default=HERE.parent.parent / "tests" / "compat" / "data")
    ap.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--manifests-only", action="store_true")
    ap.add_argument("--float32", action="store_true", help="record in float32 only (default: float64 records)")
    ap.add_argument(
        "--source-commits", nargs=2, metavar=("D2", "REF"), help="commits to record when the trees are archives"
    )
    args = ap.parse_args()
    reference_env(args.detectron2, args.reference)
    keep_float64()
    import torch

    torch.set_num_threads(2)
    args.output.mkdir(parents=True, exist_ok=True)
    tmp = args.output / ".tmp"
    tmp.mkdir(exist_ok=True)
    manifests = {}
    for arch in ARCHS:
        model, _ = build_reference(arch, args.reference, args.zeroshot_weights, tmp)
        manifests[arch] = manifest_of(model)
    commits = args.source_commits or [git_commit(args.detectron2), git_commit(args.reference)]
    meta = {"detectron2": commits[0], "object-centric-ovd": commits[1], "seed": SEED}
    (args.output / "detectron2_manifests.json").write_text(json.dumps({"sources": meta, "archs": manifests}))
    if not args.manifests_only:
        for arch in args.archs:
            torch.manual_seed(0)
            model, _ = build_reference(arch, args.reference, args.zeroshot_weights, tmp)
            load_random(model, manifests[arch])
            calibrated = calibrate(model, arch)  # in float32: the stored values are float32
            out = {f"calib/{k}": v for k, v in calibrated.items()}
            zs_file = ARCHS[arch][1]  # (C, D) float16: zs_weight's source, shared by the fixtures of a dataset
            np.save(args.output / ZEROSHOT_FILES[zs_file], np.load(args.zeroshot_weights / zs_file))
            out["zeroshot_file"] = np.array(ZEROSHOT_FILES[zs_file])
            out["post_nms_topk"] = np.array(POST_NMS_TOPK)
            out["score_thresh"] = np.array(SCORE_THRESH)
            for name in ARCH_IMAGES[arch]:
                for k, v in record(model, arch, photo(name)).items():
                    if k in FLOAT32_KEYS:
                        out[f"float32/{name}/{k}"] = v
            out["dtype"] = np.array("float32" if args.float32 else "float64")
            if not args.float32:
                model.double()  # same weights (float32 values), float64 arithmetic
            for name in ARCH_IMAGES[arch]:
                for k, v in record(model, arch, photo(name)).items():
                    # float64 results stored as float32: 6e-8 relative, far below every tolerance
                    out[f"{name}/{k}"] = v.astype(np.float32) if v.dtype == np.float64 and v.ndim else v
            np.savez_compressed(args.output / f"d2_parity_{arch}.npz", **out)
            print(arch, {k: v.shape for k, v in out.items() if k.startswith(ARCH_IMAGES[arch][0] + "/det")})
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
