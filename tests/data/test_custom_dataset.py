"""Datasets declared in the config (``data.custom``): the catalog entry, its errors, and a training run
that gives exactly the numbers of the same files registered in Python."""

import json
from pathlib import Path

import pytest
import torch

from ovd.config import CustomDatasetCfg, load_config
from ovd.data.catalog import get_dataset
from ovd.data.custom import EVALUATORS as CUSTOM_EVALUATORS
from ovd.data.custom import custom_dataset_info, register_custom_datasets
from ovd.engine.checkpoint import load_checkpoint
from ovd.engine.trainer import train
from ovd.errors import OVDError

REPO = Path(__file__).parents[2]
NOVEL = ["heart", "crescent", "ring", "lightning bolt", "tree", "key"]  # OV-Shapes' default split


pytestmark = pytest.mark.usefixtures("shared_datasets")


def _small_world_specs() -> list[CustomDatasetCfg]:
    """The small OV-Shapes files, declared as the user's own datasets with absolute paths."""
    specs = []
    for split in ("train", "val"):
        info = get_dataset(f"ovshapes_small_{split}")  # generates the world on first use
        specs.append(
            CustomDatasetCfg(
                name=f"myshapes_{split}",
                ann_file=str(info.ann_file_path),
                image_root=str(info.image_root_path),
                novel_classes=list(NOVEL),
            )
        )
    return specs


def test_entry_equals_the_builtin_registration():
    train_spec, _ = _small_world_specs()
    info = custom_dataset_info(train_spec)
    builtin = get_dataset("ovshapes_small_train")
    assert info.class_names == builtin.class_names
    assert info.category_ids == builtin.category_ids
    assert info.novel_classes == builtin.novel_classes
    assert info.base_classes == builtin.base_classes
    assert info.ann_type == "box"


def test_category_order_and_novel_ids(tmp_path):
    ann = tmp_path / "ann.json"
    cats = [{"id": 9, "name": "zebra"}, {"id": 2, "name": "apple"}, {"id": 5, "name": "mug"}]
    ann.write_text(json.dumps({"images": [], "annotations": [], "categories": cats}))
    info = custom_dataset_info(CustomDatasetCfg(name="mine", ann_file=str(ann), novel_classes=["zebra"]))
    assert info.class_names == ("apple", "mug", "zebra")  # contiguous ids in category-id order
    assert info.category_ids == (2, 5, 9)
    assert info.novel_classes == (2,) and info.base_classes == (0, 1)
    assert info.evaluator == "coco_ovd"  # the default metric
    assert register_custom_datasets([CustomDatasetCfg(name="mine", ann_file=str(ann))]) == ["mine"]
    assert get_dataset("mine").novel_classes == ()
    # re-declaring a config dataset with other settings replaces it (a later run, another split)
    register_custom_datasets([CustomDatasetCfg(name="mine", ann_file=str(ann), novel_classes=["mug"])])
    assert get_dataset("mine").novel_classes == (1,)
    # the same entry again (every stage of a run registers it) does not read the file again
    ann.unlink()
    register_custom_datasets([CustomDatasetCfg(name="mine", ann_file=str(ann), novel_classes=["mug"])])
    assert get_dataset("mine").novel_classes == (1,)
    with pytest.raises(OVDError, match="ann.json"):  # ... but changed settings do
        register_custom_datasets([CustomDatasetCfg(name="mine", ann_file=str(ann))])


def test_errors_name_the_field(tmp_path):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "lightning bolt"}]}))
    with pytest.raises(OVDError, match=r"novel class 'lightning' .*did you mean 'lightning bolt'") as e:
        custom_dataset_info(CustomDatasetCfg(name="x", ann_file=str(ann), novel_classes=["lightning"]), 3)
    assert e.value.field == "data.custom[3].novel_classes"
    with pytest.raises(OVDError) as e:
        custom_dataset_info(CustomDatasetCfg(name="x", ann_file=str(tmp_path / "missing.json")))
    assert "missing.json" in str(e.value)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(OVDError, match="categories"):
        custom_dataset_info(CustomDatasetCfg(name="x", ann_file=str(bad)))
    with pytest.raises(OVDError, match="empty dataset name") as e:
        custom_dataset_info(CustomDatasetCfg(ann_file=str(ann)))
    assert e.value.field == "data.custom[0].name"
    with pytest.raises(OVDError, match="unknown ann_type 'boxes'"):
        custom_dataset_info(CustomDatasetCfg(name="x", ann_file=str(ann), ann_type="boxes"))
    with pytest.raises(OVDError, match="dataset 'x': unknown evaluator 'voc' \\(valid: coco_ovd, lvis\\)") as e:
        custom_dataset_info(CustomDatasetCfg(name="x", ann_file=str(ann), evaluator="voc"), 2)
    assert e.value.field == "data.custom[2].evaluator"
    with pytest.raises(OVDError, match="built-in dataset"):
        register_custom_datasets([CustomDatasetCfg(name="coco_ovd_val", ann_file=str(ann))])
    with pytest.raises(OVDError, match="declared twice"):
        register_custom_datasets([CustomDatasetCfg(name="y", ann_file=str(ann))] * 2)


def test_the_evaluator_field_picks_the_metric(tmp_path):
    from ovd.evaluation.evaluator import EVALUATORS, COCOOVDEvaluator, LVISEvaluator, build_evaluator

    assert sorted(EVALUATORS) == list(CUSTOM_EVALUATORS)  # the config's valid values are the registry's
    ann = tmp_path / "lvis_like.json"
    cats = [{"id": 1, "name": "a", "frequency": "f"}, {"id": 2, "name": "b", "frequency": "r"}]
    ann.write_text(json.dumps({"images": [], "annotations": [], "categories": cats}))
    # LVIS-format categories alone do not choose the metric (no heuristic): the field does
    default = custom_dataset_info(CustomDatasetCfg(name="mine_lvis", ann_file=str(ann)))
    assert isinstance(build_evaluator(default), COCOOVDEvaluator)
    lvis = custom_dataset_info(CustomDatasetCfg(name="mine_lvis", ann_file=str(ann), evaluator="lvis"))
    assert lvis.evaluator == "lvis" and isinstance(build_evaluator(lvis), LVISEvaluator)


def test_training_on_a_declared_dataset_equals_the_builtin(tmp_path):
    """The same files trained through `data.custom` and through the built-in names: identical weights
    and metrics; the novel / base split comes from the declared names."""
    train_spec, val_spec = _small_world_specs()
    custom = [
        "data.custom=["
        + ", ".join(
            f"{{name: {s.name}, ann_file: '{s.ann_file}', image_root: '{s.image_root}', "
            f"novel_classes: [{', '.join(s.novel_classes)}]}}"
            for s in (train_spec, val_spec)
        )
        + "]"
    ]
    fast = [
        "data.num_workers=0",
        "clip.pretrained=",
        "solver.ims_per_batch=2",
        "solver.max_iter=2",
        "solver.warmup_iters=1",
        "input.min_size_train=[128]",
        "input.min_size_train_sampling=choice",
        "input.min_size_test=128",
        "model.rpn.post_nms_top_n_test=50",
    ]
    base = REPO / "configs/ovshapes/base.yaml"
    ours = train(load_config(base, [*fast, *custom, "data.train=myshapes_train", "data.test=myshapes_val"]),
                 tmp_path / "custom")  # fmt: skip
    ref = train(load_config(base, [*fast, "data.train=ovshapes_small_train", "data.test=ovshapes_small_val"]),
                tmp_path / "builtin")  # fmt: skip
    for key in ("AP50_novel", "AP50_base", "AP50_all", "num_detections"):
        assert ours[key] == pytest.approx(ref[key]), key
    a = load_checkpoint(tmp_path / "custom" / "model_final.pth")["model"]
    b = load_checkpoint(tmp_path / "builtin" / "model_final.pth")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the run's config records the declaration, so --eval-only and resumption see the same dataset
    saved = (tmp_path / "custom" / "config.yaml").read_text()
    assert "myshapes_val" in saved and "lightning bolt" in saved
    # ... and the Python API takes the declared name as a vocabulary, in a process that never registered it
    from ovd.data import custom
    from ovd.data.catalog import _CATALOG
    from ovd.predictor import Predictor

    for name in ("myshapes_train", "myshapes_val"):
        _CATALOG.pop(name)
        custom._CUSTOM.pop(name)
    predictor = Predictor(tmp_path / "custom" / "model_final.pth", device="cpu")
    predictor.set_vocabulary("myshapes_val")
    assert predictor.class_names == list(get_dataset("ovshapes_small_val").class_names)
