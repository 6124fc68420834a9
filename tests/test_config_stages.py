"""The pipeline file's schema and the extraction defaults (ovd.config.stages): one schema, one key checker,
defaults written once."""

import ast
import re
from dataclasses import fields
from importlib import util
from pathlib import Path

import pytest

import ovd.config
from ovd.config import (
    CustomDatasetCfg,
    ExtractionCfg,
    PipelineCfg,
    RegionsCfg,
    check_keys,
    load_config,
    load_pipeline,
)
from ovd.errors import OVDError

REPO = Path(__file__).parents[1]


def _pipeline(tmp_path, text):
    path = tmp_path / "pipeline.yaml"
    path.write_text("stages:\n  - name: base\n    config: base.yaml\n" + text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("regions:\n  kk: 3\n", "unknown config key 'regions.kk'; did you mean 'regions.k'?"),
        ("pseudo_labels:\n  nam: x\n", "unknown config key 'pseudo_labels.nam'; did you mean 'pseudo_labels.name'?"),
        ("paralel_stages: 2\n", "unknown config key 'paralel_stages'; did you mean 'parallel_stages'?"),
        ("regions:\n  zzz: 1\n", "unknown config key 'regions.zzz'; valid keys: proposals, dataset, k, nms_thresh"),
    ],
)
def test_pipeline_unknown_keys_name_the_closest_valid_one(tmp_path, text, message):
    path = _pipeline(tmp_path, text)
    with pytest.raises(OVDError, match=re.escape(f"pipeline.yaml: {message}")):
        load_pipeline(path)


def test_pipeline_stage_keys_values_and_names_are_checked(tmp_path):
    bad_stage = tmp_path / "stage.yaml"
    bad_stage.write_text("stages:\n  - name: a\n    confg: a.yaml\n")
    with pytest.raises(OVDError, match=r"unknown config key 'stages\[0\].confg'; did you mean 'stages\[0\].config'"):
        load_pipeline(bad_stage)
    with pytest.raises(OVDError, match="invalid value"):
        load_pipeline(_pipeline(tmp_path, "regions:\n  k: five\n"))
    with pytest.raises(OVDError, match="parallel_stages.*must be >= 1, got 0"):
        load_pipeline(_pipeline(tmp_path, "parallel_stages: 0\n"))
    dup = tmp_path / "dup.yaml"
    dup.write_text("stages:\n  - name: a\n  - name: a\n")
    with pytest.raises(OVDError, match="stages need unique, non-empty names"):
        load_pipeline(dup)
    pipe = load_pipeline(_pipeline(tmp_path, "regions:\n  k: 3\n  batch_size: 64\n"))
    assert isinstance(pipe, PipelineCfg) and pipe.regions.k == 3 and pipe.regions.nms_thresh == 0.5


def test_check_keys_is_the_one_checker_of_both_schemas():
    check_keys({"regions": {"k": 1}, "stages": [{"name": "a"}]}, PipelineCfg, "", "p.yaml")
    with pytest.raises(OVDError, match=r"p.yaml: unknown config key 'data.custom\[0\].evaluater'"):
        check_keys({"data": {"custom": [{"evaluater": "lvis"}]}}, ovd.config.Config, "", "p.yaml")


def test_extraction_defaults_are_written_once():
    defaults = ExtractionCfg()
    assert (defaults.k, defaults.nms_thresh, defaults.batch_size) == (5, 0.5, 256)  # METHOD §3.1
    regions = RegionsCfg()
    assert (regions.k, regions.nms_thresh, regions.batch_size) == (defaults.k, defaults.nms_thresh, defaults.batch_size)
    made = RegionsCfg(k=3, nms_thresh=0.7, batch_size=8).extraction(num_workers=0)
    assert made == ExtractionCfg(k=3, nms_thresh=0.7, batch_size=8, num_workers=0)
    spec = util.spec_from_file_location("extract_tool", REPO / "tools/extract_region_embeddings.py")
    tool = util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    args = tool.parse_args(["--output", "x", "--merge"])
    flags = {"k": "k", "nms": "nms_thresh", "batch_size": "batch_size", "workers": "num_workers"}
    flags |= {"chunk_size": "chunk_size", "resize_backend": "resize_backend", "crop_dtype": "crop_dtype"}
    assert {field: getattr(args, flag) for flag, field in flags.items()} == {
        field: getattr(defaults, field) for field in flags.values()
    }
    # no other module writes the numbers again: the extraction code has no default of its own
    tree = ast.parse((REPO / "ovd/distill/extract.py").read_text())
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "extract_region_embeddings"]
    names = [a.arg for a in fn.args.args + fn.args.kwonlyargs]
    assert not {f.name for f in fields(ExtractionCfg)} & set(names), names


def test_custom_dataset_evaluator_field(tmp_path):
    assert CustomDatasetCfg().evaluator == "coco_ovd"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  custom:\n    - name: mine\n      ann_file: a.json\n      evaluator: lvis\n")
    assert load_config(recipe).data.custom[0].evaluator == "lvis"


def test_every_public_name_is_importable_from_the_package():
    for name in ovd.config.__all__:
        assert getattr(ovd.config, name) is not None
    for module in ("schema", "loading", "stages"):
        path = REPO / "ovd" / "config" / f"{module}.py"
        assert path.read_text().count("\n") < 400, path
        tree = ast.parse(path.read_text())
        public = {n.name for n in tree.body if isinstance(n, ast.ClassDef | ast.FunctionDef)}
        assert {n for n in public if not n.startswith("_")} <= set(ovd.config.__all__), module
