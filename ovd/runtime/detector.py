"""Load a trained detector from a checkpoint: the one way ``Predictor``, detector proposals, ONNX export
and ``--eval-only`` get a model to run."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from ovd.config import Config, config_from_yaml
from ovd.errors import OVDError
from ovd.modeling.build import build_model
from ovd.modeling.detector import OpenVocabDetector
from ovd.runtime.checkpoint import load_checkpoint, load_model_state
from ovd.runtime.device import local_device


@dataclass
class LoadedDetector:
    """A trained detector, ready to run.

    Attributes:
        model: the detector with the checkpoint's weights, in eval mode, on the requested device.
        cfg: the config it was built from (the checkpoint's own unless one was given).
        class_names: the vocabulary the model detects (one name per class embedding).
        class_embeddings: ``Tensor[C, D]`` (CPU) text embeddings of ``class_names`` the model was built with.
        path: the checkpoint file.
    """

    model: OpenVocabDetector
    cfg: Config
    class_names: list[str]
    class_embeddings: Tensor
    path: Path


def load_trained_detector(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    cfg: Config | None = None,
    confidence: float | None = None,
    vocabulary: Sequence[str] | None = None,
    encode: Callable[[Sequence[str]], Tensor] | None = None,
) -> LoadedDetector:
    """Build the detector of a checkpoint and load its weights (strictly: every key and shape must match).

    Args:
        path: a checkpoint written by ``ovd``'s trainer (it holds its config and vocabulary).
        device: ``auto``, ``cpu``, ``cuda`` (this rank's GPU) or a ``torch.device``.
        cfg: build this config's model instead of the checkpoint's own (``--eval-only`` with a config
            file); the file then needs no ``config`` entry.
        confidence: ``model.roi_heads.score_thresh_test`` of the returned model and config (None: as configured).
        vocabulary: the class names to detect (None: the checkpoint's). Names equal to the checkpoint's
            reuse its embeddings; other names are embedded with ``encode``.
        encode: ``names -> Tensor[C, D]`` text embeddings, for a vocabulary other than the checkpoint's.

    Raises:
        OVDError: naming the file: missing, unreadable or unsafe (:func:`~ovd.runtime.checkpoint.load_checkpoint`),
            written without a config/vocabulary where one is needed, a new vocabulary without ``encode``,
            or weights that do not fit the model (:func:`~ovd.runtime.checkpoint.load_model_state`).
    """
    path = Path(path)
    state = load_checkpoint(path)
    stored = state.get("vocabulary") or None
    if (cfg is None and "config" not in state) or (stored is None and (cfg is None or vocabulary is None)):
        raise OVDError("checkpoint has no config/vocabulary; was it written by ovd's trainer?", path=path)
    cfg = config_from_yaml(state["config"], str(path)) if cfg is None else cfg
    if confidence is not None:
        roi = replace(cfg.model.roi_heads, score_thresh_test=confidence)
        cfg = replace(cfg, model=replace(cfg.model, roi_heads=roi))
    stored_names = list(stored["class_names"]) if stored is not None else None
    names = list(vocabulary) if vocabulary is not None else stored_names
    assert names is not None  # checked above
    if stored is not None and names == stored_names:
        embeddings = stored["embeddings"]  # the vocabulary the model was trained with: no text encoder needed
    elif encode is None:
        raise OVDError("a vocabulary other than the checkpoint's needs a text encoder (encode)", path=path)
    else:
        embeddings = encode(names)
    model = build_model(cfg, class_embeddings=embeddings)
    load_model_state(model, state["model"], source=str(path))
    model.to(local_device(device) if isinstance(device, str) else torch.device(device)).eval()
    return LoadedDetector(
        model=model,
        cfg=cfg,
        class_names=names,
        class_embeddings=embeddings,
        path=path,
    )
