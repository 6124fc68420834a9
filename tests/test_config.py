"""Config schema: inheritance, overrides, unknown keys, type errors, round trip."""

import pytest
import yaml

from ovd.config import Config, config_from_yaml, config_to_yaml, load_config, save_config
from ovd.errors import OVDError


def _write(path, text):
    path.write_text(text)
    return path


def test_defaults_are_the_reference_coco_recipe():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.model.classifier.temperature == 50.0
    assert cfg.model.roi_heads.detections_per_image == 100
    assert cfg.model.roi_heads.nms_thresh_test == 0.5
    assert cfg.model.rpn.post_nms_top_n_test == 1000
    assert cfg.solver.steps == [60000, 80000] and cfg.solver.max_iter == 90000
    assert cfg.clip.templates == ["a photo of a {}"]


def test_base_chain_and_overrides(tmp_path):
    _write(tmp_path / "a.yaml", "solver:\n  max_iter: 100\n  base_lr: 0.1\nseed: 3\n")
    (tmp_path / "sub").mkdir()
    child = _write(tmp_path / "sub" / "b.yaml", "_base_: ../a.yaml\nsolver:\n  max_iter: 200\n")
    cfg = load_config(child, ["solver.base_lr=0.5", "model.rpn.anchor_sizes=[[8],[16]]"])
    assert cfg.solver.max_iter == 200  # child wins over base
    assert cfg.solver.base_lr == 0.5  # command line wins over files
    assert cfg.seed == 3  # inherited
    assert cfg.model.rpn.anchor_sizes == [[8], [16]]


def test_unknown_key_names_closest(tmp_path):
    bad = _write(tmp_path / "bad.yaml", "solver:\n  max_itr: 5\n")
    with pytest.raises(
        OVDError, match=r"bad.yaml: unknown config key 'solver.max_itr'; did you mean 'solver.max_iter'"
    ):
        load_config(bad)
    with pytest.raises(OVDError, match="model.backbone.nme"):
        load_config(None, ["model.backbone.nme=x"])


def test_type_errors_and_malformed(tmp_path):
    with pytest.raises(OVDError, match="solver.max_iter"):
        load_config(None, ["solver.max_iter=many"])
    with pytest.raises(OVDError, match="key=value"):
        load_config(None, ["solver.max_iter"])
    with pytest.raises(OVDError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(OVDError, match="malformed YAML"):
        load_config(_write(tmp_path / "m.yaml", "solver: [1, 2\n"))
    with pytest.raises(OVDError, match="circular"):
        load_config(_write(tmp_path / "c.yaml", "_base_: c.yaml\n"))


def test_frozen_and_round_trip(tmp_path):
    cfg = load_config(None, ["seed=7", "clip.templates=['a {}', 'the {}']"])
    assert cfg.clip.templates == ["a {}", "the {}"]
    with pytest.raises(OVDError, match="cannot parse"):
        load_config(None, ["clip.templates=[a {}, b"])
    with pytest.raises(Exception):  # noqa: B017 - dataclasses.FrozenInstanceError
        cfg.seed = 1  # type: ignore[misc]
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert config_from_yaml(config_to_yaml(cfg)) == cfg


def test_every_shipped_recipe_and_pipeline_loads():
    from pathlib import Path

    from ovd.config import load_config
    from ovd.pipeline import load_pipeline

    root = Path(__file__).parents[1] / "configs"
    files = sorted(root.rglob("*.yaml"))
    assert len(files) >= 20
    for f in files:
        if "stages" in (yaml.safe_load(f.read_text()) or {}):  # a pipeline file (pipeline.yaml, ablation.yaml)
            pipe = load_pipeline(f)
            for stage in pipe.stages:
                assert (f.parent / stage.config).is_file(), (f, stage.config)
        else:
            cfg = load_config(f)
            from ovd.data.transforms import ResizeFlipAugmentation

            for src in cfg.data.sources:
                assert src.dataset, f
                # the per-source input sizes must suit the recipe's sampling style (as the trainer builds them)
                ResizeFlipAugmentation(
                    tuple(src.min_size or cfg.input.min_size_train),
                    src.max_size or cfg.input.max_size_train,
                    sample_style=cfg.input.min_size_train_sampling,
                    flip_prob=cfg.input.flip_prob,
                )


def test_ovshapes_ablation_is_the_main_job_plus_the_control():
    """benchmarks/ovshapes_ablation.py's pipeline must not drift from the main job's."""
    from dataclasses import replace
    from pathlib import Path

    from ovd.pipeline import load_pipeline

    root = Path(__file__).parents[1] / "configs" / "ovshapes"
    main, ablation = load_pipeline(root / "pipeline.yaml"), load_pipeline(root / "ablation.yaml")
    control = [s for s in ablation.stages if s.name == "base_continued"]
    assert [s.config for s in control] == ["base_continued.yaml"]
    assert replace(ablation, stages=[s for s in ablation.stages if s.name != "base_continued"]) == main


def test_ovshapes_base_only_is_the_main_jobs_first_stage():
    """configs/ovshapes/base_only.yaml (issue #3's main job) trains exactly the main job's base stage."""
    from pathlib import Path

    from ovd.pipeline import load_pipeline

    root = Path(__file__).parents[1] / "configs" / "ovshapes"
    main, base_only = load_pipeline(root / "pipeline.yaml"), load_pipeline(root / "base_only.yaml")
    assert base_only.stages == main.stages[:1] and base_only.teacher and base_only.demo_images == main.demo_images
