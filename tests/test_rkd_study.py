"""benchmarks/ovshapes_rkd_study.py's val step (issue #22): the pipeline file that trains the chosen setting
beside today's recipe, and how the two sides are read back. No training."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from ovd.config import load_pipeline

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("bench_rkd_study", REPO / "benchmarks" / "ovshapes_rkd_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SETTING = ["model.distill.region_weighting=max_prob", "model.distill.contradiction_iou=0.5"]


def test_val_pipeline_twins_only_the_distilling_stages(study, tmp_path):
    spec = study.val_pipeline(SETTING, parallel=2)
    names = [s["name"] for s in spec["stages"]]
    assert names == ["base", "base_continued", "rkd", "pis", "rkd_pis", "rkd_pis_wt",
                     "rkd_chosen", "rkd_pis_chosen", "rkd_pis_wt_chosen"]  # fmt: skip
    twins = {s["name"]: s["overrides"] for s in spec["stages"] if s["name"].endswith("_chosen")}
    assert twins["rkd_chosen"] == SETTING  # starts from base, like rkd
    assert twins["rkd_pis_chosen"] == SETTING  # starts from base, like rkd_pis
    assert twins["rkd_pis_wt_chosen"] == [*SETTING, "init_stage=rkd_chosen"]  # from the twin of its rkd start
    originals = {s["name"]: s for s in spec["stages"] if not s["name"].endswith("_chosen")}
    ablation = yaml.safe_load((REPO / "configs/ovshapes/ablation.yaml").read_text())
    assert [originals[s["name"]].get("overrides") for s in ablation["stages"]] == [
        s.get("overrides") for s in ablation["stages"]
    ]  # today's stages unchanged (so a finished ablation folder is reused)
    assert spec["regions"] == ablation["regions"] and spec["pseudo_labels"] == ablation["pseudo_labels"]
    path = tmp_path / "val_pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    loaded = load_pipeline(path)  # a valid pipeline file, stage recipes found from any folder
    assert all(Path(s.config).is_absolute() and Path(s.config).is_file() for s in loaded.stages)
    assert loaded.parallel_stages == 2


def test_val_numbers_puts_twins_on_the_chosen_side(study, tmp_path):
    stages = ["base", "base_continued", "rkd", "pis", "rkd_pis", "rkd_pis_wt", "rkd_chosen", "rkd_pis_chosen",
              "rkd_pis_wt_chosen"]  # fmt: skip
    for seed in (0, 1):
        rows = [{"stage": s, "AP50_novel": 10.0 * i + seed, "AP50_base": 50.0 + i} for i, s in enumerate(stages)]
        folder = tmp_path / f"seed{seed}"
        folder.mkdir()
        (folder / "ablation.json").write_text(json.dumps({"stages": rows}))
        for stage, cos in (("rkd", 0.5), ("rkd_chosen", 0.7)):
            (folder / stage / "eval").mkdir(parents=True)
            (folder / stage / "eval" / "metrics.json").write_text(json.dumps({"fidelity_cosine_base": cos + seed}))
    today, chosen = study.val_numbers(tmp_path, [0, 1])
    assert set(today) == set(stages[:6]) and set(chosen) == set(stages[:6])
    assert today["rkd"]["AP50_novel"] == [20.0, 21.0] and chosen["rkd"]["AP50_novel"] == [60.0, 61.0]
    assert chosen["rkd_pis_wt"]["AP50_base"] == [58.0, 58.0] and today["rkd_pis_wt"]["AP50_base"] == [55.0, 55.0]
    assert chosen["pis"] == today["pis"] and chosen["base_continued"] == today["base_continued"]  # shared
    assert today["rkd"]["fidelity_cosine_base"] == [0.5, 1.5] and chosen["rkd"]["fidelity_cosine_base"] == [0.7, 1.7]
    rule = study.adoption(today, chosen)
    assert rule["checks"]["rkd_base_cost_le_2"]["numbers"] == "-5.0"  # control 51 − chosen rkd 56
    assert rule["adopt"]
