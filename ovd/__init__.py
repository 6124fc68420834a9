"""ovd: open-vocabulary object detection.

The public API, importable from the package root (``from ovd import Predictor``). Names are resolved
lazily (PEP 562 ``__getattr__``): ``import ovd`` imports neither torch-heavy modules nor onnxruntime;
each name imports its module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {  # public name -> module defining it
    "OVDError": "ovd.errors",
    "Detections": "ovd.structures",
    "Config": "ovd.config.schema",
    "load_config": "ovd.config.loading",
    "DatasetInfo": "ovd.data.catalog",
    "get_dataset": "ovd.data.catalog",
    "list_datasets": "ovd.data.catalog",
    "register_dataset": "ovd.data.catalog",
    "generate_ovshapes": "ovd.data.ovshapes",
    "build_model": "ovd.modeling.build",
    "create_clip": "ovd.clip.model",
    "build_evaluator": "ovd.evaluation.evaluator",
    "train": "ovd.engine.trainer",
    "evaluate": "ovd.engine.evaluate",
    "load_trained_detector": "ovd.runtime.detector",
    "Predictor": "ovd.predictor",
    "export_onnx": "ovd.export",
    "OnnxDetector": "ovd.export",
    "run_pipeline": "ovd.pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ovd' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
