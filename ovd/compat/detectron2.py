"""Import detectron2 checkpoints of the reference (object-centric-ovd) and Detic as ordinary ovd checkpoints.

A detectron2 ``model_final.pth`` is ``{"model": state_dict, ...}`` (the other entries, such as optimizer,
scheduler, iteration and ``__author__``, are training state and are ignored). :func:`convert` maps every
key of the state dict onto the ovd model of a :class:`Preset` (a config whose detectron2-compatible
options reproduce detectron2's inference: MSRA ResNet, BGR input, detectron2 anchors, ROIAlignV2, ...),
turns the classifier's ``zs_weight`` buffer (``D × (C+1)``, normalised, last column background) into the
model's vocabulary with the class names of the dataset it was trained for, and returns a checkpoint
``{"model", "config", "vocabulary"}`` that :class:`ovd.Predictor`, ``tools/train_net.py --eval-only``,
ONNX export and ``init_weights`` read like any other.

Every key of the file is either mapped or reported in one error; a few buffers that only training
uses (``freq_weight``, ``num_batches_tracked``) or that detectron2 recomputes (``pixel_mean``,
``pixel_std``, cell anchors) are dropped. Files are read with ``torch.load(weights_only=True)``; numpy
arrays of numeric dtypes inside the file are admitted, nothing else that would run code.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ovd.config import Config, config_to_yaml, load_config
from ovd.data.builtin import COCO_CATEGORIES
from ovd.errors import OVDError
from ovd.modeling.build import build_model

CLASS_NAMES_FILE = Path(__file__).resolve().parent.parent / "data" / "metadata" / "lvis_v1_class_names.json"

# detectron2's caffe-style input: BGR, 0-255, mean of the MSRA ImageNet weights, std 1
D2_PIXEL_MEAN = [103.530, 116.280, 123.675]
D2_PIXEL_STD = [1.0, 1.0, 1.0]

_COMMON = [
    "model.backbone.norm=frozen_bn",
    "model.backbone.stride_in_1x1=true",
    "model.backbone.weights=''",
    "model.input_format=BGR",
    f"model.pixel_mean={D2_PIXEL_MEAN}",
    f"model.pixel_std={D2_PIXEL_STD}",
    "model.rpn.anchor_style=detectron2",
    "model.rpn.min_size=0",
    "model.rpn.nms_on_logits=true",
    "model.rpn.aspect_ratios=[0.5,1.0,2.0]",
    "model.rpn.nms_thresh=0.7",
    "model.roi_heads.bbox_reg_weights=[10.0,10.0,5.0,5.0]",
    "model.roi_heads.pooler_sampling_ratio=0",
    "model.roi_heads.nms_thresh_test=0.5",
    "model.classifier.temperature=50.0",
    "input.min_size_test=800",
    "input.max_size_test=1333",
    "clip.model=ViT-B-32",
    "clip.pretrained=openai",
]
_C4 = [
    "model.backbone.name=resnet50_c4",
    "model.size_divisibility=0",  # detectron2's ResNet backbone does not pad
    "model.rpn.anchor_sizes=[[32,64,128,256,512]]",
    "model.rpn.pre_nms_top_n_test=6000",
    "model.rpn.post_nms_top_n_test=1000",
    "model.roi_heads.pooler_resolution=14",
    "model.roi_heads.pooler_aligned=true",
    "model.roi_heads.score_thresh_test=0.05",
    "model.roi_heads.detections_per_image=100",
    "model.classifier.use_bias=false",
    "data.train=coco_ovd_train",
    "data.test=coco_ovd_val",
]
_FPN_MASK = [
    "model.backbone.name=resnet50_fpn",
    "model.backbone.fpn_channels=256",
    "model.backbone.fpn_min_level=2",
    "model.size_divisibility=32",
    "model.rpn.anchor_sizes=[[32],[64],[128],[256],[512]]",
    "model.rpn.pre_nms_top_n_test=1000",
    "model.rpn.post_nms_top_n_test=1000",
    "model.roi_heads.pooler_resolution=7",
    "model.roi_heads.fpn_pooler_aligned=true",
    "model.roi_heads.fc_dim=1024",
    "model.roi_heads.num_fc=2",
    "model.roi_heads.canonical_box_size=224",
    "model.roi_heads.canonical_level=4",
    "model.roi_heads.score_thresh_test=0.0001",
    "model.roi_heads.detections_per_image=300",
    "model.classifier.use_bias=true",
    "model.mask.enabled=true",
    "model.mask.pooler_resolution=14",
    "model.mask.num_conv=4",
    "model.mask.conv_dim=256",
    "model.mask.paste=detectron2",
    "data.train=lvis_v1_train_norare",
    "data.test=lvis_v1_val",
]


@dataclass(frozen=True)
class Preset:
    """A family of released detectron2 checkpoints with one architecture."""

    name: str
    description: str
    overrides: tuple[str, ...]  # config overrides on top of the schema defaults
    dataset: str  # "coco" | "lvis_v1": whose class names the stored zs_weight rows follow
    fpn: bool  # Mask R-CNN R50-FPN (else Faster R-CNN R50-C4)


def _preset(
    name: str, description: str, arch: list[str], dataset: str, *, wt: bool, extra: tuple[str, ...] = ()
) -> Preset:
    fpn = arch is _FPN_MASK
    overrides = (*_COMMON, *arch, f"model.classifier.weight_transfer={str(wt).lower()}", *extra)
    return Preset(name, description, overrides, dataset, fpn=fpn)


_REF = "object-centric-ovd"
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        _preset("ovd_coco_r50_c4", f"{_REF} OV-COCO R50-C4 (Base, RKD, PIS, RKD+PIS)", _C4, "coco", wt=False),
        _preset("ovd_coco_r50_c4_wt", f"{_REF} OV-COCO R50-C4 with weight transfer (1x, 8x)", _C4, "coco", wt=True),
        _preset(
            "ovd_lvis_r50_fpn_mask",
            f"{_REF} OV-LVIS Mask R-CNN R50-FPN (Base, RKD, PIS, RKD+PIS)",
            _FPN_MASK,
            "lvis_v1",
            wt=False,
        ),
        _preset(
            "ovd_lvis_r50_fpn_mask_wt",
            f"{_REF} OV-LVIS Mask R-CNN R50-FPN with weight transfer (1x, 8x)",
            _FPN_MASK,
            "lvis_v1",
            wt=True,
        ),
        # Detic's BoxSup_OVCOCO_CLIP_R50_1x has the same modules and keys as ovd_coco_r50_c4; its
        # embeddings were made with the prompt "a {name}"
        _preset(
            "detic_coco_r50_c4",
            "Detic OV-COCO R50-C4 (BoxSup_OVCOCO_CLIP_R50_1x)",
            _C4,
            "coco",
            wt=False,
            extra=("clip.templates=['a {}']",),
        ),
    )
}

ZS_WEIGHT = "roi_heads.box_predictor.cls_score.zs_weight"
# buffers only training uses, or that detectron2 recomputes: dropped without a mapping
IGNORED = re.compile(
    r"(.*\.num_batches_tracked|roi_heads\.box_predictor\.freq_weight|pixel_mean|pixel_std"
    r"|proposal_generator\.anchor_generator\.cell_anchors\.\d+)$"
)

# (detectron2 key pattern, ovd replacement), tried in order
_BLOCK = [
    (r"(\d+)\.conv(\d)\.weight", r"\1.conv\2.weight"),
    (r"(\d+)\.conv(\d)\.norm\.(\w+)", r"\1.bn\2.\3"),
    (r"(\d+)\.shortcut\.weight", r"\1.downsample.0.weight"),
    (r"(\d+)\.shortcut\.norm\.(\w+)", r"\1.downsample.1.\2"),
]
_HEADS = [
    (r"proposal_generator\.rpn_head\.conv\.(\w+)", r"rpn.head.conv.0.0.\1"),
    (r"proposal_generator\.rpn_head\.objectness_logits\.(\w+)", r"rpn.head.cls_logits.\1"),
    (r"proposal_generator\.rpn_head\.anchor_deltas\.(\w+)", r"rpn.head.bbox_pred.\1"),
    (r"roi_heads\.box_predictor\.cls_score\.(linear|fc[1-4])\.(\w+)", r"roi_heads.classifier.\1.\2"),
    (r"roi_heads\.box_predictor\.cls_score\.cls_bias", r"roi_heads.classifier.bias"),
    (r"roi_heads\.box_predictor\.bbox_pred\.0\.(\w+)", r"roi_heads.box_regressor.fc1.\1"),
    (r"roi_heads\.box_predictor\.bbox_pred\.2\.(\w+)", r"roi_heads.box_regressor.fc2.\1"),
]


def _rules(preset: Preset) -> list[tuple[re.Pattern[str], str]]:
    rules: list[tuple[str, str]] = []
    if preset.fpn:
        src, dst = r"backbone\.bottom_up\.", "backbone.body."
        rules += [
            (src + r"stem\.conv1\.weight", dst + "conv1.weight"),
            (src + r"stem\.conv1\.norm\.(\w+)", dst + r"bn1.\1"),
        ]
        for k in range(2, 6):
            rules += [(f"{src}res{k}\\.{a}", f"{dst}layer{k - 1}.{b}") for a, b in _BLOCK]
            rules += [
                (rf"backbone\.fpn_lateral{k}\.(\w+)", rf"backbone.fpn.inner_blocks.{k - 2}.0.\1"),
                (rf"backbone\.fpn_output{k}\.(\w+)", rf"backbone.fpn.layer_blocks.{k - 2}.0.\1"),
            ]
        rules += [
            (r"roi_heads\.box_head\.fc1\.(\w+)", r"roi_heads.region_features.head.1.\1"),
            (r"roi_heads\.box_head\.fc2\.(\w+)", r"roi_heads.region_features.head.3.\1"),
            (r"roi_heads\.mask_head\.predictor\.(\w+)", r"roi_heads.mask_head.predictor.\1"),
            (r"roi_heads\.mask_head\.deconv\.(\w+)", r"roi_heads.mask_head.layers.8.\1"),
        ]
        rules += [
            (rf"roi_heads\.mask_head\.mask_fcn{i}\.(\w+)", rf"roi_heads.mask_head.layers.{2 * i - 2}.\1")
            for i in range(1, 5)
        ]
    else:
        rules += [
            (r"backbone\.stem\.conv1\.weight", "backbone.stem.0.weight"),
            (r"backbone\.stem\.conv1\.norm\.(\w+)", r"backbone.stem.1.\1"),
        ]
        for k in range(2, 5):
            rules += [(f"backbone\\.res{k}\\.{a}", f"backbone.layer{k - 1}.{b}") for a, b in _BLOCK]
        rules += [(f"roi_heads\\.res5\\.{a}", f"roi_heads.region_features.res5.{b}") for a, b in _BLOCK]
    return [(re.compile(p + "$"), r) for p, r in [*rules, *_HEADS]]


def map_key(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    """The ovd name of detectron2 key ``key``, or ``None`` when no rule maps it."""
    for pattern, repl in rules:
        if pattern.match(key):
            return pattern.sub(repl, key)
    return None


def detect_preset(keys: set[str] | Mapping[str, Any]) -> Preset:
    """The preset whose architecture has this key set (Detic's C4 model has the reference's C4 keys and
    is detected as ``ovd_coco_r50_c4``, which converts it identically)."""
    keys = set(keys)
    fpn = any(k.startswith("backbone.bottom_up.") for k in keys)
    c4 = any(k.startswith("roi_heads.res5.") for k in keys)
    wt = any(k.startswith("roi_heads.box_predictor.cls_score.fc1.") for k in keys)
    if ZS_WEIGHT not in keys or fpn == c4:
        raise OVDError(
            "not a supported detectron2 checkpoint: expected a zero-shot classifier "
            f"({ZS_WEIGHT}) and either an R50-C4 (roi_heads.res5.*) or an R50-FPN (backbone.bottom_up.*) model; "
            f"choose --preset from {', '.join(PRESETS)}"
        )
    name = ("ovd_lvis_r50_fpn_mask" if fpn else "ovd_coco_r50_c4") + ("_wt" if wt else "")
    return PRESETS[name]


def class_names(dataset: str) -> list[str]:
    """The class names, in category-id order, of ``"coco"`` (80: the catalog's, so that ``--eval-only`` on
    ``coco_ovd_val`` reuses the stored embeddings) or ``"lvis_v1"`` (1203, raw LVIS names)."""
    if dataset == "coco":
        return [name for _, name in COCO_CATEGORIES]
    with open(CLASS_NAMES_FILE) as f:
        return list(json.load(f)[dataset])


def preset_config(preset: Preset, overrides: list[str] | None = None) -> Config:
    return load_config(None, [*preset.overrides, *(overrides or [])])


def _as_tensor(key: str, value: Any, source: str) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
        return torch.from_numpy(np.ascontiguousarray(value))
    raise OVDError(f"value of {key!r} is a {type(value).__name__}, not a tensor or numeric array", path=source)


def _numpy_safe_globals() -> list[Any]:
    """What unpickling a numeric numpy array needs (its reconstructor, ndarray, dtype and numeric dtype classes)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    kinds = [np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8, np.bool_]
    return [_reconstruct, np.ndarray, np.dtype, *[type(np.dtype(k)) for k in kinds]]


def read_detectron2_checkpoint(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The model state dict of a detectron2 ``.pth`` (``{"model": ...}`` or a bare state dict).

    Read with ``torch.load(weights_only=True)``; numeric numpy arrays (detectron2 checkpoints converted
    from Caffe pickles hold them) are admitted and become tensors. Raises :class:`OVDError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise OVDError("detectron2 checkpoint not found", path=path)
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise OVDError(f"cannot read as a weights-only checkpoint ({type(e).__name__}: {first})", path=path) from e
    state = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not state:
        raise OVDError("no model state dict (expected {'model': {name: tensor}})", path=path)
    return {str(k): _as_tensor(str(k), v, str(path)) for k, v in state.items()}


def _vocabulary(zs_weight: Tensor, preset: Preset, source: str) -> dict[str, Any]:
    """``zs_weight`` ``Tensor[D, C+1]`` (last column background) → ``{"class_names", "embeddings" Tensor[C, D]}``."""
    names = class_names(preset.dataset)
    if zs_weight.dim() != 2 or zs_weight.shape[1] != len(names) + 1:
        raise OVDError(
            f"{ZS_WEIGHT} has shape {tuple(zs_weight.shape)}; preset {preset.name} expects "
            f"(D, {len(names) + 1}) for the {len(names)} {preset.dataset} classes and the background",
            path=source,
        )
    if zs_weight[:, -1].abs().max() > 0:
        raise OVDError(f"{ZS_WEIGHT}: the last (background) column is not zero", path=source)
    return {"class_names": names, "embeddings": zs_weight[:, :-1].T.float().contiguous()}  # (C, D)


def convert_state_dict(
    state: Mapping[str, Tensor],
    preset: Preset | None = None,
    *,
    source: str = "<state dict>",
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """An ovd checkpoint ``{"model", "config", "vocabulary"}`` from a detectron2 model state dict.

    Raises:
        OVDError: a key that no rule maps, an ovd weight left without a value, or a shape that differs
            (all of them listed).
    """
    preset = preset or detect_preset(state)
    cfg = preset_config(preset, overrides)
    if ZS_WEIGHT not in state:
        raise OVDError(f"no {ZS_WEIGHT}: not a zero-shot detectron2 model", path=source)
    vocab = _vocabulary(state[ZS_WEIGHT], preset, source)
    with torch.device("meta"):  # names and shapes only: no memory, no initialisation
        own = build_model(cfg, class_embeddings=vocab["embeddings"].to("meta")).state_dict()
    rules = _rules(preset)
    out: dict[str, Tensor] = {}
    unmapped, shapes = [], []
    for key, value in state.items():
        if key == ZS_WEIGHT or IGNORED.match(key):
            continue
        target = map_key(key, rules)
        if target is None or target not in own:
            unmapped.append(key)
            continue
        if target == "roi_heads.classifier.bias":
            value = value.reshape(())  # detectron2's cls_bias is (1,)
        if tuple(value.shape) != tuple(own[target].shape):
            shapes.append(f"{key} {tuple(value.shape)} vs {target} {tuple(own[target].shape)}")
            continue
        out[target] = value.to(own[target].dtype).contiguous()
    missing = [k for k in own if k not in out]
    if unmapped or shapes or missing:
        parts = []
        if unmapped:
            parts.append(f"{len(unmapped)} keys not mapped: {', '.join(unmapped)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches: {'; '.join(shapes)}")
        if missing:
            parts.append(f"{len(missing)} ovd weights without a value: {', '.join(missing)}")
        raise OVDError(f"checkpoint does not fit preset {preset.name}: " + " | ".join(parts), path=source)
    return {"model": out, "config": config_to_yaml(cfg), "vocabulary": vocab, "detectron2_preset": preset.name}


def convert(
    input_path: str | os.PathLike[str], preset_name: str | None = None, overrides: list[str] | None = None
) -> dict[str, Any]:
    """Read a detectron2 checkpoint file and convert it (see :func:`convert_state_dict`)."""
    if preset_name is not None and preset_name not in PRESETS:
        raise OVDError(f"unknown preset {preset_name!r}; choose one of {', '.join(PRESETS)}", field="--preset")
    state = read_detectron2_checkpoint(input_path)
    preset = PRESETS[preset_name] if preset_name else None
    return convert_state_dict(state, preset, source=str(input_path), overrides=overrides)
