"""What the web demo's buttons do, without any web framework: tested directly, wired by ``ovd.app.page``.

One run: check the vocabulary, decode the image within its memory bound (``ovd.app.inputs``), detect
with one model or two ("compare", same image and vocabulary), and return for each model the annotated
image (drawn by :func:`ovd.visualize.draw_detections`, as ``tools/demo.py`` draws), the table rows
``[class, score, x1, y1, x2, y2]`` and a COCO-results JSON file (``detections.json``'s format, see
:mod:`ovd.demo`), in the uploaded file's pixels.
"""

from __future__ import annotations

import itertools
import os
import re
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from ovd.app.inputs import LoadedImage, load_image, parse_names
from ovd.app.models import ModelZoo
from ovd.data.catalog import get_dataset, list_datasets
from ovd.demo import BOX_DECIMALS, SCORE_DECIMALS, CocoResults
from ovd.errors import OVDError
from ovd.predictor import Prediction
from ovd.utils.io import write_json
from ovd.visualize import draw_detections

TABLE_HEADERS = ["class", "score", "x1", "y1", "x2", "y2"]
# The vocabulary preset that stands for the selected model's own classes; the others are catalog names.
OWN_CLASSES_PRESET = "the model's own classes"
# zlib level of the annotated PNG the page shows: 1 is several times faster than 6 and 10-30 % larger.
PNG_COMPRESSION = 1


@dataclass
class ModelResult:
    """One model's answer for one image.

    Attributes:
        model: its name in the selector.
        prediction: detections in the uploaded file's pixels.
        annotated: ``uint8[h, w, 3]`` the image the model saw, with the detections drawn.
        rows: one ``[class, score, x1, y1, x2, y2]`` per detection, by decreasing score (rounded as in
            ``detections.json``).
        json_path: the COCO-results file.
        image_path: ``annotated`` as a PNG file (fast compression: the page sends this file).
        seconds: the model's time (detector call only).
        cached: the vocabulary's text embeddings came from the cache.
        fixed_vocabulary: an exported model, which detects its own classes whatever the vocabulary box says.
    """

    model: str
    prediction: Prediction
    annotated: np.ndarray
    rows: list[list[object]]
    json_path: Path
    image_path: Path
    seconds: float
    cached: bool
    fixed_vocabulary: bool = False

    def summary(self) -> str:
        vocabulary = (
            "exported: its own classes"
            if self.fixed_vocabulary
            else f"text embeddings {'cached' if self.cached else 'computed'}"
        )
        return f"{self.model}: {len(self.prediction)} detections, model {self.seconds * 1000:.1f} ms ({vocabulary})"


def _to_original(prediction: Prediction, image: LoadedImage) -> Prediction:
    """Boxes of the (possibly reduced) image the model saw → the uploaded file's pixels."""
    if not image.reduced:
        return prediction
    height, width = image.original_size
    sx, sy = width / image.rgb.shape[1], height / image.rgb.shape[0]
    boxes = (prediction.boxes * np.array([sx, sy, sx, sy], dtype=np.float32)).astype(np.float32)  # (N, 4)
    return replace(prediction, boxes=boxes)


def table_rows(prediction: Prediction) -> list[list[object]]:
    """``[class, score, x1, y1, x2, y2]`` per detection, highest score first."""
    order = np.argsort(-prediction.scores, kind="stable")
    return [
        [
            prediction.names[i],
            round(float(prediction.scores[i]), SCORE_DECIMALS),
            *(round(float(v), BOX_DECIMALS) for v in prediction.boxes[i]),
        ]
        for i in order
    ]


def write_png(path: Path, image_rgb: np.ndarray) -> None:
    """A lossless PNG written fast (zlib level :data:`PNG_COMPRESSION`; PIL's default took as long as the
    OV-Shapes model itself)."""
    if not cv2.imwrite(
        str(path), np.ascontiguousarray(image_rgb[:, :, ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION]
    ):
        raise OVDError("cannot write the annotated image", path=path)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "model"


class DemoHandlers:
    """The page's actions on a :class:`ModelZoo`; result files go under ``workdir``.

    Args:
        zoo: the served models.
        workdir: a folder for the COCO-results files (one sub-folder per run).
    """

    def __init__(self, zoo: ModelZoo, workdir: str | os.PathLike[str]) -> None:
        self.zoo = zoo
        self.workdir = Path(workdir)
        self._runs = itertools.count(1)
        self._runs_lock = threading.Lock()

    def presets(self) -> list[str]:
        """The vocabulary presets: the model's own classes, then every catalog dataset."""
        return [OWN_CLASSES_PRESET, *list_datasets()]

    def preset_text(self, preset: str, model: str) -> str:
        """The vocabulary box's text for a preset (comma-separated names)."""
        if preset == OWN_CLASSES_PRESET:
            names = self.zoo.own_classes(model)
        else:
            names = list(get_dataset(preset, prepare=False).class_names)
        return ", ".join(names)

    def run(
        self,
        image_path: str | os.PathLike[str] | None,
        vocabulary: str | None,
        confidence: float,
        model: str,
        compare_with: str | None = None,
        *,
        image_name: str | None = None,
    ) -> tuple[int, LoadedImage, list[ModelResult]]:
        """Detect on one image with ``model`` (and ``compare_with``, if given).

        An exported model detects its own classes whatever the vocabulary box says; a checkpoint
        detects the box's names.

        Returns:
            ``(run number, the decoded image, one result per model)``.

        Raises:
            OVDError: no image, a bad image or vocabulary, an unknown model (one message for the page).
        """
        if image_path is None:
            raise OVDError("no image: upload one, take a webcam snapshot or pick an example", field="image")
        models = [model] if not compare_with or compare_with == model else [model, compare_with]
        needs_names = any(not self.zoo.is_fixed_vocabulary(m) for m in models)
        names = parse_names(vocabulary) if needs_names else None
        image = load_image(image_path, name=image_name)
        with self._runs_lock:
            run_id = next(self._runs)
        out_dir = self.workdir / f"run{run_id:06d}"
        out_dir.mkdir(parents=True, exist_ok=True)
        results = []
        file_name = image_name or Path(image_path).name
        for name in models:
            fixed = self.zoo.is_fixed_vocabulary(name)
            prediction, seconds, cached = self.zoo.detect(name, image.rgb, None if fixed else names, confidence)
            original = _to_original(prediction, image)
            coco = CocoResults(self.zoo.own_classes(name) if fixed else list(names or []))
            height, width = image.original_size
            coco.add(original, file_name=file_name, height=height, width=width)
            json_path = out_dir / f"detections_{_slug(name)}.json"
            write_json(json_path, coco.to_json())
            annotated = draw_detections(image.rgb, prediction)
            image_path = out_dir / f"annotated_{_slug(name)}.png"
            write_png(image_path, annotated)
            rows = table_rows(original)
            results.append(ModelResult(name, original, annotated, rows, json_path, image_path, seconds, cached, fixed))
        return run_id, image, results
