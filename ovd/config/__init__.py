"""The one configuration schema of `ovd`, and how configs are loaded.

Every number that changes a result is a field of the schema, with a one-line doc. Experiment files in
``configs/`` are YAML that only override these defaults; a file may name a parent with
``_base_: relative/path.yaml``. Command-line ``key=value`` overrides come last. Unknown keys are
errors naming the key and the closest valid one. Defaults reproduce the reference's OV-COCO R50-C4
recipe (METHOD §1.2) unless a comment says otherwise.

Usage::

    cfg = load_config("configs/ovshapes/base.yaml", ["solver.max_iter=100"])
    cfg.model.roi_heads.nms_thresh_test  # typed attribute access; the object is frozen

Modules: :mod:`ovd.config.schema` (the dataclasses of a run and which fields change a result),
:mod:`ovd.config.stages` (the pipeline file and region extraction), :mod:`ovd.config.loading` (YAML
chains, merging, overrides, the key checker). Every public name is importable from ``ovd.config``.
"""

from ovd.config.loading import (
    BASE_KEY,
    check_keys,
    config_from_yaml,
    config_to_yaml,
    load_config,
    save_config,
)
from ovd.config.schema import (
    BAD_IMAGE_POLICIES,
    RESULT_NEUTRAL,
    RESUME_MAY_CHANGE,
    SUPERVISIONS,
    BackboneCfg,
    ClassifierCfg,
    ClipCfg,
    Config,
    CustomDatasetCfg,
    DataCfg,
    DistillCfg,
    ImageLabelCfg,
    InputCfg,
    MaskHeadCfg,
    ModelCfg,
    RoIHeadsCfg,
    RPNCfg,
    SolverCfg,
    SourceCfg,
    TestCfg,
)
from ovd.config.stages import (
    CROP_DTYPES,
    RESIZE_BACKENDS,
    ExtractionCfg,
    PipelineCfg,
    PseudoLabelsCfg,
    RegionsCfg,
    StageCfg,
    check_parallel_stages,
    load_pipeline,
)

__all__ = [
    "BAD_IMAGE_POLICIES",
    "BASE_KEY",
    "BackboneCfg",
    "CROP_DTYPES",
    "ClassifierCfg",
    "ClipCfg",
    "Config",
    "CustomDatasetCfg",
    "DataCfg",
    "DistillCfg",
    "ExtractionCfg",
    "ImageLabelCfg",
    "InputCfg",
    "MaskHeadCfg",
    "ModelCfg",
    "PipelineCfg",
    "PseudoLabelsCfg",
    "RESIZE_BACKENDS",
    "RESULT_NEUTRAL",
    "RESUME_MAY_CHANGE",
    "RPNCfg",
    "RegionsCfg",
    "RoIHeadsCfg",
    "SUPERVISIONS",
    "SolverCfg",
    "SourceCfg",
    "StageCfg",
    "TestCfg",
    "check_keys",
    "check_parallel_stages",
    "config_from_yaml",
    "config_to_yaml",
    "load_config",
    "load_pipeline",
    "save_config",
]
