"""Run a :class:`~ovd.predictor.Predictor` on an image, a folder of images, a video or a camera
(``webcam`` / ``webcam:N``); write annotated copies and ``detections.json``.

from ovd import Predictor
from ovd.demo import run_demo
predictor = Predictor("model_final.pth", confidence=0.3)
predictor.set_vocabulary(["star", "moon"])
summary = run_demo(predictor, "clip.mp4", "out/")   # out/clip_annotated.mp4, out/detections.json

``detections.json`` holds the COCO results format plus the vocabulary::

    {"categories": [{"id": 1, "name": "star"}, ...],          # id = vocabulary index + 1
     "images": [{"id": 1, "file_name": "a.png", "height": H, "width": W}, ...],   # videos: + "frame_index"
     "annotations": [{"image_id": 1, "category_id": 1, "bbox": [x, y, w, h], "score": 0.87,
                      "category_name": "star"}, ...]}

Boxes are in original-image pixels (COCO ``xywh``).
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from tqdm import tqdm

from ovd.data.catalog import get_dataset, list_datasets
from ovd.data.loader import read_image_rgb
from ovd.errors import OVDError
from ovd.utils.io import atomic_write, write_json
from ovd.visualize import draw_detections

if TYPE_CHECKING:
    from ovd.predictor import Prediction, Predictor

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv"})
DETECTIONS_FILE = "detections.json"
# Camera inputs: "webcam" (device 0) or "webcam:N" (OpenCV device index N).
CAMERA_PREFIX = "webcam"
# Frame rate of the annotated video when the input does not report one (frames per second).
DEFAULT_VIDEO_FPS = 25.0
# (fourcc, container suffix) tried in order for the annotated video.
VIDEO_CODECS = (("mp4v", ".mp4"), ("MJPG", ".avi"))
# A single word closer than this (difflib ratio) to a registered dataset name is taken for a misspelt
# dataset name and reported as an error, not used as a free-text class name.
DATASET_TYPO_CUTOFF = 0.8
# Decimals kept in detections.json: 1/100 pixel and 1e-5 score are below any evaluation's resolution.
BOX_DECIMALS = 2
SCORE_DECIMALS = 5


def parse_vocabulary(value: str) -> list[str] | str:
    """Turn a ``--vocabulary`` value into what :meth:`Predictor.set_vocabulary` takes.

    A value with a comma is a list of free-text names (stripped; empty and repeated names dropped); a
    registered dataset name stays a string (its class names are used); any other value is a single
    free-text name, unless it is one word that looks like a misspelt dataset name.

    Raises:
        OVDError: no names are left, or the value looks like an unknown dataset name.
    """
    empty = OVDError(
        f"the vocabulary {value!r} is empty: give a dataset name or comma-separated class names", field="vocabulary"
    )
    if "," in value:
        given = [name.strip() for name in value.split(",") if name.strip()]
        names: list[str] = []  # the first spelling of each name (CLIP's tokenizer ignores case)
        for name in given:
            if name.lower() not in {n.lower() for n in names}:
                names.append(name)
        if not names:
            raise empty
        if len(names) < len(given):
            repeated = sorted({n.lower() for n in given if sum(m.lower() == n.lower() for m in given) > 1})
            logger.warning("vocabulary: %s given more than once, merged into one class each", ", ".join(repeated))
        return names
    name = value.strip()
    if not name:
        raise empty
    try:
        get_dataset(name, prepare=False)
        return name
    except OVDError:
        looks_like_dataset = not any(c.isspace() for c in name) and difflib.get_close_matches(
            name, list_datasets(), n=1, cutoff=DATASET_TYPO_CUTOFF
        )
        if looks_like_dataset:
            raise
    return [name]


def camera_index(value: str | os.PathLike[str]) -> int | None:
    """The OpenCV device index of a camera input (``webcam`` → 0, ``webcam:2`` → 2), else None.

    Raises:
        OVDError: ``webcam:`` followed by something that is not a non-negative integer.
    """
    text = str(value)
    if text == CAMERA_PREFIX:
        return 0
    if not text.startswith(CAMERA_PREFIX + ":"):
        return None
    index = text[len(CAMERA_PREFIX) + 1 :]
    if not index.isdigit():
        raise OVDError(f"expected webcam:N with a device number N >= 0, got {text!r}", field="input")
    return int(index)


def input_kind(path: str | os.PathLike[str]) -> str:
    """``"image"``, ``"folder"``, ``"video"`` or ``"camera"`` (``webcam[:N]``): by name, then file type,
    then by what OpenCV can decode.

    Raises:
        OVDError: the path is missing, or is neither a decodable image nor a video OpenCV can open.
    """
    if not Path(path).exists() and camera_index(path) is not None:
        return "camera"
    path = Path(path)
    if path.is_dir():
        return "folder"
    if not path.is_file():
        raise OVDError("input not found (expected an image, a folder of images or a video)", path=path)
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    # Unknown extension: an image if it decodes as one (checked first: OpenCV also "opens" a single
    # image as a one-frame video), else a video if OpenCV can read a frame of it.
    with contextlib.suppress(OVDError):
        read_image_rgb(str(path))
        return "image"
    cap = cv2.VideoCapture(str(path))
    try:
        if cap.isOpened() and cap.read()[0]:
            return "video"
    finally:
        cap.release()
    raise OVDError(
        f"not an image or a video OpenCV can read (images: {', '.join(sorted(IMAGE_EXTENSIONS))}; "
        f"videos: {', '.join(sorted(VIDEO_EXTENSIONS))})",
        path=path,
    )


class CocoResults:
    """Accumulates the ``images`` and ``annotations`` of ``detections.json``."""

    def __init__(self, class_names: list[str]) -> None:
        self.categories = [{"id": i + 1, "name": name} for i, name in enumerate(class_names)]
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []

    def add(self, prediction: Prediction, *, file_name: str, height: int, width: int, **extra: Any) -> None:
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "file_name": file_name, "height": height, "width": width, **extra})
        for (x1, y1, x2, y2), score, label, name in zip(
            prediction.boxes.tolist(),
            prediction.scores.tolist(),
            prediction.labels.tolist(),
            prediction.names,
            strict=True,
        ):
            bbox = [x1, y1, x2 - x1, y2 - y1]  # xyxy -> COCO xywh
            self.annotations.append(
                {
                    "image_id": image_id,
                    "category_id": int(label) + 1,
                    "bbox": [round(v, BOX_DECIMALS) for v in bbox],
                    "score": round(score, SCORE_DECIMALS),
                    "category_name": name,
                }
            )

    def to_json(self) -> dict[str, Any]:
        return {"categories": self.categories, "images": self.images, "annotations": self.annotations}


def _rgb_to_bgr(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image[:, :, ::-1])


def _write_image(path: Path, image_rgb: np.ndarray) -> None:
    def writer(tmp: str) -> None:
        if not cv2.imwrite(tmp, _rgb_to_bgr(image_rgb)):
            raise OVDError("cannot write the annotated image", path=path)

    atomic_write(path, writer)


def _check_not_input(output: Path, source: Path) -> None:
    if output.resolve() == source.resolve():
        raise OVDError("the output would overwrite the input; choose another output folder", path=output)


def _annotate_images(
    predictor: Predictor, files: list[Path], output_dir: Path, results: CocoResults, bar: tqdm
) -> tuple[list[str], list[str]]:
    """Detect on each image file and write its annotated copy; returns (written, skipped) paths."""
    written, skipped = [], []
    for file in files:
        try:
            image = read_image_rgb(str(file))
        except OVDError as e:
            if len(files) == 1:
                raise
            logger.warning("skipping %s", e)
            skipped.append(str(file))
            bar.update()
            continue
        prediction = predictor(image)
        out = output_dir / file.name
        _write_image(out, draw_detections(image, prediction))
        results.add(prediction, file_name=file.name, height=image.shape[0], width=image.shape[1])
        written.append(str(out))
        bar.update()
    return written, skipped


def _open_video_writer(output_dir: Path, stem: str, fps: float, size: tuple[int, int]) -> tuple[Any, Path, Path]:
    """An opened ``cv2.VideoWriter`` on a temporary file, that file, and the final path (mp4v, else MJPG)."""
    for fourcc, suffix in VIDEO_CODECS:
        final = output_dir / f"{stem}_annotated{suffix}"
        tmp = output_dir / f".{stem}_annotated.partial{suffix}"
        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*fourcc), fps, size)
        if writer.isOpened():
            return writer, tmp, final
        writer.release()
        tmp.unlink(missing_ok=True)
        logger.info("cannot open a %s video writer; trying the next codec", fourcc)
    codecs = ", ".join(f"{fourcc} ({suffix})" for fourcc, suffix in VIDEO_CODECS)
    raise OVDError(f"cannot open a video writer with any of {codecs}", path=output_dir)


def _video_frames(
    path: Path, camera: int | None = None
) -> tuple[Iterator[np.ndarray], int | None, float, Callable[[], None]]:
    """BGR frames of a video (or of OpenCV camera ``camera``), its frame count (``None`` if unknown, as
    for a camera), frame rate and a release function."""
    cap = cv2.VideoCapture(camera if camera is not None else str(path))
    if not cap.isOpened():
        cap.release()
        if camera is not None:
            raise OVDError(f"cannot open camera {camera} (no such device, or no access to it)", field="input")
        raise OVDError("cannot open video (missing codec, or a corrupt or unsupported file)", path=path)
    count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
    total = int(count) if camera is None and math.isfinite(count) and count > 0 else None
    fps = cap.get(cv2.CAP_PROP_FPS)
    fps = fps if math.isfinite(fps) and fps > 0 else DEFAULT_VIDEO_FPS

    def frames() -> Iterator[np.ndarray]:
        while True:
            ok, frame = cap.read()
            if not ok:
                return
            yield frame

    return frames(), total, fps, cap.release


def _annotate_video(
    predictor: Predictor,
    path: Path,
    output_dir: Path,
    results: CocoResults,
    progress: bool,
    *,
    camera: int | None = None,
    max_frames: int | None = None,
) -> tuple[list[str], list[str]]:
    """Annotate the frames of a video or a camera; a camera runs until ``max_frames`` or Ctrl-C, and
    what was recorded until then is kept."""
    frames, total, fps, release = _video_frames(path, camera)
    if max_frames is not None:
        total = max_frames if total is None else min(total, max_frames)
    name = path.name if camera is None else f"{CAMERA_PREFIX}{camera}"
    writer = tmp = final = None
    try:
        with tqdm(total=total, desc=name, unit="frame", disable=not progress, dynamic_ncols=True) as bar:
            try:
                for index, frame_bgr in enumerate(frames):
                    if max_frames is not None and index >= max_frames:
                        break
                    frame = np.ascontiguousarray(frame_bgr[:, :, ::-1])  # BGR -> RGB
                    height, width = frame.shape[:2]
                    if writer is None:
                        stem = path.stem if camera is None else name
                        writer, tmp, final = _open_video_writer(output_dir, stem, fps, (width, height))
                    prediction = predictor(frame)
                    writer.write(_rgb_to_bgr(draw_detections(frame, prediction)))
                    results.add(prediction, file_name=name, height=height, width=width, frame_index=index)
                    bar.update()
            except KeyboardInterrupt:
                if camera is None:
                    raise
                logger.info("%s: stopped after %d frames (Ctrl-C)", name, len(results.images))
        if writer is None:
            if camera is not None:
                raise OVDError(f"camera {camera} gave no frame", field="input")
            raise OVDError("no frame could be decoded (corrupt or unsupported video)", path=path)
        writer.release()
        os.replace(tmp, final)
    finally:
        release()
        if writer is not None:
            writer.release()
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return [str(final)], []


def run_demo(
    predictor: Predictor,
    input_path: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    progress: bool = True,
    max_frames: int | None = None,
) -> dict[str, Any]:
    """Detect on an image, a folder of images (sorted by name), a video or a camera and write the results.

    Writes ``output_dir/<name>`` (annotated copy of each image, same name and format) or
    ``output_dir/<stem>_annotated.mp4`` (``.avi`` when no mp4v encoder is available), and
    ``output_dir/detections.json`` (see the module docstring), atomically at the end. Unreadable images
    inside a folder are skipped with a warning.

    Args:
        predictor: detects with its current vocabulary and confidence threshold (a :class:`Predictor`,
            or an :class:`ovd.export.OnnxDetector` for an exported model).
        input_path: an image file, a folder of image files, a video file, or ``webcam[:N]`` (OpenCV
            camera N, default 0: recorded into ``webcam<N>_annotated.mp4`` until ``max_frames`` or Ctrl-C).
        output_dir: created if missing; must not be the input folder.
        progress: show a tqdm progress bar (with ETA) for folders and videos.
        max_frames: stop a video or camera after this many frames (None: all; a camera until Ctrl-C).

    Returns:
        ``{"kind": "image"|"folder"|"video"|"camera", "num_images": images or frames processed,
        "num_detections": int, "outputs": [annotated file paths], "detections": json path,
        "skipped": [unreadable image paths]}``.

    Raises:
        OVDError: missing input, a folder without images, an unreadable image or video.
    """
    if max_frames is not None and max_frames < 1:
        raise OVDError(f"must be >= 1, got {max_frames}", field="max_frames")
    kind = input_kind(input_path)
    source = Path(input_path)
    out_dir = Path(output_dir)
    results = CocoResults(list(predictor.class_names))
    if kind in ("video", "camera"):
        out_dir.mkdir(parents=True, exist_ok=True)
        camera = camera_index(input_path) if kind == "camera" else None
        written, skipped = _annotate_video(
            predictor, source, out_dir, results, progress, camera=camera, max_frames=max_frames
        )
    else:
        if kind == "folder":
            files = sorted(
                (p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                key=lambda p: p.name,
            )
            if not files:
                raise OVDError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in this folder", path=source)
            _check_not_input(out_dir, source)
        else:
            files = [source]
            _check_not_input(out_dir / source.name, source)
        out_dir.mkdir(parents=True, exist_ok=True)
        show = progress and kind == "folder"
        with tqdm(total=len(files), desc=source.name, unit="img", disable=not show, dynamic_ncols=True) as bar:
            written, skipped = _annotate_images(predictor, files, out_dir, results, bar)
        if not written:
            raise OVDError("none of the images in this folder could be decoded", path=source)
    json_path = out_dir / DETECTIONS_FILE
    write_json(json_path, results.to_json())
    unit = "frames" if kind in ("video", "camera") else "images"
    logger.info("%s: %d detections on %d %s → %s", source, len(results.annotations), len(results.images), unit, out_dir)
    return {
        "kind": kind,
        "num_images": len(results.images),
        "num_detections": len(results.annotations),
        "outputs": written,
        "detections": str(json_path),
        "skipped": skipped,
    }
