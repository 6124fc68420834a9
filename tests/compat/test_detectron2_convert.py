"""Converting detectron2 checkpoints: full-size key manifests of every reference architecture convert and
load strictly, every unknown key is reported, files are read weights-only, and a converted file works in
Predictor with detectron2's detections."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from ovd.compat.detectron2 import (
    PRESETS,
    ZS_WEIGHT,
    class_names,
    convert,
    convert_state_dict,
    detect_preset,
    read_detectron2_checkpoint,
)
from ovd.config import config_from_yaml, load_config
from ovd.errors import OVDError
from ovd.modeling.build import build_model

DATA = Path(__file__).parent / "data"
MANIFESTS = json.loads((DATA / "detectron2_manifests.json").read_text())["archs"]
ARCH_PRESET = {
    "c4": "ovd_coco_r50_c4",
    "c4_wt": "ovd_coco_r50_c4_wt",
    "fpn_mask": "ovd_lvis_r50_fpn_mask",
    "fpn_mask_wt": "ovd_lvis_r50_fpn_mask_wt",
}


def zeros_state(arch: str) -> dict[str, torch.Tensor]:
    """A state dict with the exact key names and shapes of the reference's ``arch`` (zeros; a valid zs_weight)."""
    state = {k: torch.zeros(s) for k, s in MANIFESTS[arch].items()}
    d, c1 = state[ZS_WEIGHT].shape
    state[ZS_WEIGHT] = torch.nn.functional.normalize(torch.randn(d, c1), dim=0)
    state[ZS_WEIGHT][:, -1] = 0.0
    return state


def test_manifests_are_the_reference_models():
    c4_wt = MANIFESTS["c4_wt"]
    assert len(c4_wt) == 287
    assert c4_wt[ZS_WEIGHT] == [512, 81] and c4_wt["roi_heads.box_predictor.freq_weight"] == [80]
    assert MANIFESTS["fpn_mask"][ZS_WEIGHT] == [512, 1204]
    assert MANIFESTS["fpn_mask"]["roi_heads.box_predictor.cls_score.cls_bias"] == [1]
    assert len(MANIFESTS["c4"]) == 287 - 8  # no fc1-fc4


@pytest.mark.parametrize("arch", list(ARCH_PRESET))
def test_full_size_keys_convert_and_load_strictly(arch):
    state = zeros_state(arch)
    assert detect_preset(state).name == ARCH_PRESET[arch]
    ckpt = convert_state_dict(state)
    cfg = config_from_yaml(ckpt["config"])
    with torch.device("meta"):  # a strict load checks every name and shape; meta skips the random init
        model = build_model(cfg, class_embeddings=ckpt["vocabulary"]["embeddings"].to("meta"))
    model.load_state_dict(ckpt["model"], strict=True, assign=True)
    names = ckpt["vocabulary"]["class_names"]
    assert len(names) == state[ZS_WEIGHT].shape[1] - 1 == model.num_classes
    # the vocabulary is zs_weight's class columns (normalised already), as rows
    torch.testing.assert_close(ckpt["vocabulary"]["embeddings"], state[ZS_WEIGHT][:, :-1].T)
    dropped = {k for k in state if k.endswith("freq_weight")} | {ZS_WEIGHT}
    assert len(ckpt["model"]) == len(state) - len(dropped)
    assert cfg.model.input_format == "BGR" and cfg.model.backbone.stride_in_1x1


def test_class_names_in_id_order():
    from ovd.data.catalog import get_dataset

    coco, lvis = class_names("coco"), class_names("lvis_v1")
    assert coco == list(get_dataset("coco_ovd_val", prepare=False).class_names)  # --eval-only reuses the embeddings
    assert len(coco) == 80 and coco[0] == "person" and coco[-1] == "toothbrush" and len(set(coco)) == 80
    assert len(lvis) == 1203 and lvis[0] == "aerosol_can" and lvis[-1] == "zucchini" and len(set(lvis)) == 1203


def test_every_unknown_or_missing_key_is_reported():
    state = zeros_state("c4")
    state["roi_heads.box_predictor.surprise.weight"] = torch.zeros(3)
    state["backbone.res9.0.conv1.weight"] = torch.zeros(3)
    del state["proposal_generator.rpn_head.conv.bias"]
    state["roi_heads.res5.0.conv1.weight"] = torch.zeros(1, 1, 1, 1)
    state["backbone.res2.0.conv1.norm.num_batches_tracked"] = torch.zeros((), dtype=torch.long)  # ignored
    with pytest.raises(OVDError) as e:
        convert_state_dict(state, source="m.pth")
    msg = str(e.value)
    assert "2 keys not mapped" in msg and "surprise" in msg and "res9" in msg
    assert "rpn.head.conv.0.0.bias" in msg and "shape mismatches" in msg and msg.startswith("m.pth")
    bad = zeros_state("c4")
    bad[ZS_WEIGHT][:, -1] = 1.0
    with pytest.raises(OVDError, match="background"):
        convert_state_dict(bad)
    with pytest.raises(OVDError, match="expects"):  # an LVIS classifier under a COCO preset
        convert_state_dict(zeros_state("fpn_mask") | {ZS_WEIGHT: torch.zeros(512, 1204)}, PRESETS["ovd_coco_r50_c4"])
    with pytest.raises(OVDError, match="not a supported"):
        detect_preset({"backbone.stem.conv1.weight": torch.zeros(1)})


def test_reading_files(tmp_path):
    arrays = {k: np.zeros(s, np.float32) for k, s in list(MANIFESTS["c4"].items())[:3]}
    path = tmp_path / "numpy.pth"
    torch.save({"model": arrays, "iteration": 10, "__author__": "someone"}, path)  # numpy arrays inside
    got = read_detectron2_checkpoint(path)
    assert set(got) == set(arrays) and all(isinstance(v, torch.Tensor) for v in got.values())

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"model": {"a": Evil()}}, f)
    with pytest.raises(OVDError, match="weights-only"):
        read_detectron2_checkpoint(evil)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(OVDError, match="junk.pth"):
        read_detectron2_checkpoint(tmp_path / "junk.pth")
    with pytest.raises(OVDError, match="not found"):
        read_detectron2_checkpoint(tmp_path / "missing.pth")
    with pytest.raises(OVDError, match="unknown preset"):
        convert(path, "faster_rcnn_x101")


def test_converted_file_in_predictor(tmp_path, capsys):
    """A detectron2 file (the parity model) → tools/convert_detectron2.py → Predictor: detectron2's own
    detections on a photo (the fixture), mapped back to the photo's pixels."""
    import importlib.util

    from ovd.export import matched_detections
    from ovd.predictor import Prediction, Predictor
    from ovd.utils.cli import run_cli

    spec = importlib.util.spec_from_file_location("parity", Path(__file__).parent / "test_detectron2_parity.py")
    parity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parity)
    state, fix = parity.detectron2_state("c4")
    d2_file, out = tmp_path / "model_final.pth", tmp_path / "converted" / "ovd.pth"
    torch.save({"model": state, "iteration": 90000, "__author__": "d2"}, d2_file)
    spec = importlib.util.spec_from_file_location(
        "convert_tool", Path(__file__).parents[2] / "tools/convert_detectron2.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    overrides = [f"model.rpn.post_nms_top_n_test={int(fix['post_nms_topk'])}", "input.min_size_test=300"]
    assert run_cli(tool.main, ["--input", str(d2_file), "--output", str(out), *overrides]) == 0
    assert "ovd_coco_r50_c4" in capsys.readouterr().out
    assert load_config(out.with_suffix(".yaml")).model.input_format == "BGR"  # the config for --eval-only
    assert set(torch.load(out, weights_only=True)) == {"model", "config", "vocabulary", "detectron2_preset"}  # plain
    predictor = Predictor(out, device="cpu")
    got = predictor(parity._photo("chelsea").permute(1, 2, 0).numpy())  # 300 x 451: the test scale, no resize
    ref = Prediction(  # detectron2's float32 run: the Predictor runs in float32 (the parity records: float64)
        fix["float32/chelsea/det_boxes"],
        fix["float32/chelsea/det_scores"],
        fix["float32/chelsea/det_classes"].astype(np.int64),
        [],
    )
    assert len(got) == len(ref) > 0
    assert matched_detections(ref, got, score_tol=1e-4, iou_min=0.999) == len(ref)
    assert got.names[0] == class_names("coco")[int(got.labels[0])]
    assert run_cli(tool.main, ["--input", str(d2_file), "--output", str(d2_file)]) == 2  # never overwrites the input


def test_fine_tuning_recipe_has_the_preset_model_options():
    """configs/coco/rkd_from_detectron2.yaml (RKD from the released base model) builds the converted model."""
    recipe = load_config(Path(__file__).parents[2] / "configs/coco/rkd_from_detectron2.yaml")
    preset = PRESETS["ovd_coco_r50_c4"]
    want = load_config(None, list(preset.overrides)).model
    for item in preset.overrides:
        key = item.split("=", 1)[0]
        if key.startswith("model."):
            path = key.split(".")[1:]
            got_v, want_v = recipe.model, want
            for part in path:
                got_v, want_v = getattr(got_v, part), getattr(want_v, part)
            assert got_v == want_v, key
    assert recipe.model.distill.enabled and recipe.init_weights
