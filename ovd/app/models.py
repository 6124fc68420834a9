"""The models a web demo serves: each loaded once per process, with its text embeddings cached per
vocabulary.

A :class:`ModelZoo` holds named checkpoints (run by :class:`ovd.Predictor`) and exported ONNX files (run
by :class:`ovd.export.OnnxDetector`, fixed vocabulary). :meth:`ModelZoo.detect` is the one entry point:
it switches the model to a vocabulary (the ``Tensor[C, D]`` text embeddings of a (model, vocabulary)
pair are computed once, then reused), sets the confidence threshold and detects, under one lock, so
concurrent requests never see each other's vocabulary or threshold.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from ovd.errors import OVDError
from ovd.predictor import Prediction, Predictor

logger = logging.getLogger(__name__)

# Where the main job (README's first command) writes its stages' checkpoints.
DEFAULT_CHECKPOINT_GLOB = "output/ovshapes/*/model_final.pth"
# Text embeddings kept per process, least recently used dropped first (1,500 names x 512-d = 3 MB each).
MAX_CACHED_VOCABULARIES = 64


@dataclass(frozen=True)
class ModelSource:
    """A model file offered in the page.

    Attributes:
        name: the label in the model selector (unique).
        path: a trainer checkpoint or an exported ``.onnx`` file.
        kind: ``"checkpoint"`` or ``"onnx"``.
    """

    name: str
    path: Path
    kind: str


def model_sources(
    checkpoints: Sequence[str | os.PathLike[str]], onnx_files: Sequence[str | os.PathLike[str]] = ()
) -> list[ModelSource]:
    """Name each file for the selector: a ``model_final.pth`` by its run folder (``rkd_pis_wt``), any
    other file by its stem; ONNX files get `` (onnx)``; clashes get `` #2``, `` #3``...

    Raises:
        OVDError: a file is missing, or no file is given.
    """
    sources: list[ModelSource] = []
    taken: set[str] = set()
    for kind, files in (("checkpoint", checkpoints), ("onnx", onnx_files)):
        for file in files:
            path = Path(file)
            if not path.is_file():
                raise OVDError(f"{kind} not found", path=path)
            base = path.parent.name if path.name == "model_final.pth" and path.parent.name else path.stem
            base = f"{base} (onnx)" if kind == "onnx" else base
            name, n = base, 1
            while name in taken:
                n += 1
                name = f"{base} #{n}"
            taken.add(name)
            sources.append(ModelSource(name, path, kind))
    if not sources:
        raise OVDError("no model to serve: pass --checkpoint or --onnx (or run the README's first command)")
    return sources


def recorded_score(checkpoint: Path) -> float | None:
    """The headline number of the evaluation beside a checkpoint (``eval/metrics.json``: OV-COCO
    ``AP50_all``, LVIS box ``AP``), or None when there is none or it cannot be read."""
    try:
        metrics = json.loads((checkpoint.parent / "eval" / "metrics.json").read_text())
        value = metrics["AP50_all"] if "AP50_all" in metrics else metrics["bbox"]["AP"]
        return float(value)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def discover_checkpoints(pattern: str = DEFAULT_CHECKPOINT_GLOB, root: str | os.PathLike[str] = ".") -> list[Path]:
    """The checkpoints matching ``pattern`` under ``root``, best first: by the score their run recorded
    (:func:`recorded_score`; so the page opens on the full method of the README's pipeline, not on its
    baseline), then the unscored ones; ties by path."""
    found = [(recorded_score(p), p) for p in sorted(Path(root).glob(pattern))]
    return [p for score, p in sorted(found, key=lambda sp: (sp[0] is None, -(sp[0] or 0.0), str(sp[1])))]


@dataclass
class LoadedModel:
    """A model in memory.

    Attributes:
        detector: a :class:`Predictor` or an :class:`ovd.export.OnnxDetector`.
        own_classes: the vocabulary it was trained (or exported) with.
        current: the vocabulary it holds now.
    """

    detector: Any
    own_classes: list[str]
    current: tuple[str, ...]


class ModelZoo:
    """Loads each model once and detects with any vocabulary (see the module docstring).

    Args:
        sources: the models (:func:`model_sources`).
        device: ``auto``, ``cpu`` or ``cuda`` for checkpoints.
        clip_pretrained: CLIP text-encoder weights for new vocabularies (default: each checkpoint's own).
    """

    def __init__(self, sources: Sequence[ModelSource], *, device: str = "cpu", clip_pretrained: str | None = None):
        self.sources = {s.name: s for s in sources}
        self.device = device
        self.clip_pretrained = clip_pretrained
        self._loaded: dict[str, LoadedModel] = {}
        self._embeddings: OrderedDict[tuple[str, tuple[str, ...]], Tensor] = OrderedDict()
        self._text_encoders: dict[tuple[str, str | None], Any] = {}
        self._lock = threading.RLock()
        self.loads = 0  # how many model files were read (once each)
        self.embedding_builds = 0  # how many vocabularies were encoded

    @property
    def names(self) -> list[str]:
        return list(self.sources)

    def is_fixed_vocabulary(self, name: str) -> bool:
        """An exported model detects only the vocabulary it was exported with."""
        return self._source(name).kind == "onnx"

    def _source(self, name: str) -> ModelSource:
        if name not in self.sources:
            raise OVDError(f"unknown model {name!r} (serving: {', '.join(self.sources)})", field="model")
        return self.sources[name]

    def load(self, name: str) -> LoadedModel:
        """The loaded model (read from disk on first use only)."""
        with self._lock:
            if name in self._loaded:
                return self._loaded[name]
            source = self._source(name)
            start = time.perf_counter()
            if source.kind == "onnx":
                from ovd.export import OnnxDetector

                detector: Any = OnnxDetector(source.path)
            else:
                detector = Predictor(source.path, device=self.device, clip_pretrained=self.clip_pretrained)
                # the checkpoint's own embeddings, exactly as Predictor loaded them (no re-encoding)
                self._remember((name, tuple(detector.class_names)), detector.trained_embeddings)
            self.loads += 1
            loaded = LoadedModel(detector, list(detector.class_names), tuple(detector.class_names))
            self._loaded[name] = loaded
            logger.info("loaded %s (%s) in %.1f s", name, source.path, time.perf_counter() - start)
            return loaded

    def load_all(self) -> None:
        for name in self.sources:
            self.load(name)

    def own_classes(self, name: str) -> list[str]:
        """The vocabulary the model was trained (or exported) with."""
        return list(self.load(name).own_classes)

    def _remember(self, key: tuple[str, tuple[str, ...]], embeddings: Tensor) -> None:
        self._embeddings[key] = embeddings
        self._embeddings.move_to_end(key)
        while len(self._embeddings) > MAX_CACHED_VOCABULARIES:
            self._embeddings.popitem(last=False)

    def embeddings(self, name: str, names: Sequence[str]) -> tuple[Tensor, bool]:
        """``Tensor[C, D]`` text embeddings of ``names`` for model ``name`` and whether they were cached.

        Computed as :meth:`Predictor.set_vocabulary` computes them (the model's CLIP text encoder and
        prompt templates); the encoder is built once per (CLIP model, weights).
        """
        from ovd.clip import build_text_embeddings, create_clip

        key = (name, tuple(names))
        with self._lock:
            if key in self._embeddings:
                self._embeddings.move_to_end(key)
                return self._embeddings[key], True
            predictor: Predictor = self.load(name).detector
            clip = predictor.clip_cfg
            encoder_key = (clip.model, clip.pretrained or None)
            if encoder_key not in self._text_encoders:
                self._text_encoders[encoder_key] = create_clip(clip.model, clip.pretrained or None)
            emb = build_text_embeddings(self._text_encoders[encoder_key], list(names), list(clip.templates))
            self.embedding_builds += 1
            self._remember(key, emb)
            return emb, False

    def detect(
        self, name: str, image: np.ndarray, names: Sequence[str] | None, confidence: float
    ) -> tuple[Prediction, float, bool]:
        """Detect ``names`` (None: the model's own classes) on an RGB ``uint8[H, W, 3]`` image.

        Returns:
            ``(prediction, model seconds, embeddings were cached)``: the time covers the detector only.

        Raises:
            OVDError: an unknown model, or a new vocabulary for an exported (fixed-vocabulary) model.
        """
        if not 0.0 <= confidence <= 1.0:
            raise OVDError(f"must be in [0, 1], got {confidence}", field="confidence")
        with self._lock:
            loaded = self.load(name)
            vocabulary = tuple(loaded.own_classes if names is None else names)
            cached = True
            if self.is_fixed_vocabulary(name):
                if vocabulary != tuple(loaded.own_classes):
                    raise OVDError(
                        f"{name} is an exported model: it detects only its own classes "
                        f"({', '.join(loaded.own_classes)})",
                        field="vocabulary",
                    )
                loaded.detector.confidence = confidence
            else:
                predictor: Predictor = loaded.detector
                if vocabulary != loaded.current:
                    emb, cached = self.embeddings(name, vocabulary)
                    predictor.model.set_vocabulary(emb.to(predictor.device))
                    predictor.class_names = list(vocabulary)
                    loaded.current = vocabulary
                # the same threshold Predictor(confidence=c) builds into the model
                predictor.model.roi_heads.score_thresh = confidence
            start = time.perf_counter()
            prediction = loaded.detector(image)
            return prediction, time.perf_counter() - start, cached
