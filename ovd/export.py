"""ONNX export of a detector with its vocabulary, and an onnxruntime runner for the exported file.

The exported graph takes one RGB image ``uint8[3, H, W]`` of any size (``H``, ``W`` symbolic) and
returns the detections of the vocabulary it was exported with, in that image's pixels:

* ``boxes`` ``float32[N, 4]`` xyxy, ``scores`` ``float32[N]``, ``labels`` ``int64[N]`` (indices into
  the class names stored in the file's metadata);
* for a Mask R-CNN, also ``masks`` ``float32[N, 1, M, M]``: per-box mask probabilities.

It is the model's own inference (normalisation, padding, RPN, RoI heads, thresholds, per-class NMS,
top-k) traced by ``torch.export`` and translated by ``torch.onnx`` (needs ``onnx`` and ``onnxscript``:
``pip install 'ovd[export]'``). Two things differ from eager mode only while exporting: torchvision's
``batched_nms`` is replaced by the coordinate-offset form without its data-dependent branches (the same
kept boxes), and the RoI pooler's level scales are fixed by one eager forward first (they depend only on
the backbone's strides). The test scale (the short side the model was evaluated at) is not part of the
graph: :class:`OnnxDetector` resizes like :class:`ovd.Predictor` and maps the boxes back.

Metadata (``onnx.ModelProto.metadata_props``): ``ovd.class_names`` (JSON list), ``ovd.min_size_test``,
``ovd.max_size_test``, ``ovd.score_thresh_test``, ``ovd.outputs``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import Tensor, nn

from ovd.errors import OVDError
from ovd.modeling.detector import OpenVocabDetector
from ovd.predictor import Prediction, Predictor, rgb_image
from ovd.utils.io import atomic_write

OUTPUTS = ("boxes", "scores", "labels")
MASK_OUTPUT = "masks"
META_PREFIX = "ovd."


class ExportableDetector(nn.Module):
    """``uint8 Tensor[3, H, W]`` → ``(boxes, scores, labels[, masks])`` of one image (see the module doc)."""

    def __init__(self, model: OpenVocabDetector) -> None:
        super().__init__()
        self.model = model
        self.with_masks = model.roi_heads.mask_head is not None

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        det = self.model([image])[0]
        out = (det.boxes.float(), det.scores.float(), det.labels)  # (N, 4), (N,), (N,)
        if self.with_masks:
            return (*out, det.masks.float())  # (N, 1, M, M)
        return out


def batched_nms_for_export(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """``torchvision.ops.batched_nms`` without data-dependent Python branches: boxes of different
    ``idxs`` are moved apart by ``idx * (max coordinate + 1)`` so that one NMS never mixes them (the
    same result as per-class NMS); an empty input gives an empty ``int64`` index."""
    max_coordinate = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)]).max()  # 0 for no boxes
    offsets = idxs.to(boxes) * (max_coordinate + 1)  # (N,)
    return torchvision.ops.nms(boxes + offsets[:, None], scores, iou_threshold)


@contextlib.contextmanager
def _export_friendly_nms() -> Iterator[None]:
    """Route torchvision's RPN and the RoI heads to :func:`batched_nms_for_export` while exporting."""
    import torchvision.ops.boxes as tv_boxes

    import ovd.modeling.roi_heads as roi_heads

    saved = tv_boxes.batched_nms, roi_heads.batched_nms
    tv_boxes.batched_nms = roi_heads.batched_nms = batched_nms_for_export
    try:
        yield
    finally:
        tv_boxes.batched_nms, roi_heads.batched_nms = saved


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise OVDError(f"ONNX export needs the {module!r} package: pip install 'ovd[export]'") from e


def export_onnx(
    model: OpenVocabDetector,
    path: str | os.PathLike[str],
    *,
    class_names: Sequence[str],
    min_size_test: int,
    max_size_test: int,
    example_size: tuple[int, int] = (480, 640),
    size_range: tuple[int, int] = (32, 4096),
) -> Path:
    """Export ``model`` (with its current vocabulary) to an ONNX file, written atomically.

    Args:
        model: the detector; exported on its device, in eval mode.
        path: the ``.onnx`` file to write.
        class_names: the vocabulary's names (one per class embedding), stored in the metadata.
        min_size_test, max_size_test: the test scale, stored in the metadata for :class:`OnnxDetector`.
        example_size: ``(H, W)`` of the random image the graph is traced with; large enough that no
            feature map is 1 pixel high or wide (torch.export fixes such sizes).
        size_range: the smallest and largest image side the graph accepts.

    Returns:
        ``path``.

    Raises:
        OVDError: ``onnx`` / ``onnxscript`` missing, the names do not match the vocabulary, or a bad size.
    """
    onnx = _require("onnx")
    _require("onnxscript")
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 6):
        raise OVDError(f"ONNX export needs torch >= 2.6 (torch.export with dynamic shapes), found {torch.__version__}")
    if len(class_names) != model.num_classes:
        raise OVDError(f"{len(class_names)} class names for a vocabulary of {model.num_classes} classes")
    lo, hi = size_range
    if not 0 < lo <= min(example_size) <= max(example_size) <= hi:
        raise OVDError(f"example size {example_size} must lie within the size range {size_range}")
    wrapper = ExportableDetector(model.eval())
    generator = torch.Generator().manual_seed(0)
    example = torch.randint(0, 256, (3, *example_size), dtype=torch.uint8, generator=generator).to(model.device)
    with torch.no_grad():
        wrapper(example)  # fixes the RoI pooler's level scales (they would be inferred from symbolic sizes)
    dims = {1: torch.export.Dim("height", min=lo, max=hi), 2: torch.export.Dim("width", min=lo, max=hi)}
    names = [*OUTPUTS, MASK_OUTPUT] if wrapper.with_masks else list(OUTPUTS)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _export_friendly_nms(), torch.no_grad():
        program = torch.onnx.export(
            wrapper, (example,), dynamo=True, dynamic_shapes=(dims,), input_names=["image"], output_names=names
        )

    def write(tmp: str) -> None:  # a unique temporary sibling: two exports to one folder never collide
        program.save(tmp)
        proto = onnx.load(tmp)
        meta = {
            "class_names": json.dumps(list(class_names)),
            "min_size_test": str(min_size_test),
            "max_size_test": str(max_size_test),
            "score_thresh_test": str(model.roi_heads.score_thresh),
            "outputs": json.dumps(names),
        }
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = META_PREFIX + key, value
        onnx.save(proto, tmp)

    atomic_write(out, write)
    return out


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``ovd.*`` metadata of an exported file (prefix removed).

    Raises:
        OVDError: the file is missing, not ONNX, or was not written by :func:`export_onnx`.
    """
    onnx = _require("onnx")
    if not Path(path).is_file():
        raise OVDError("no such ONNX file", path=path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and others for non-ONNX bytes
        raise OVDError(f"not an ONNX model ({type(e).__name__})", path=path) from e
    meta = {p.key[len(META_PREFIX) :]: p.value for p in proto.metadata_props if p.key.startswith(META_PREFIX)}
    missing = {"class_names", "min_size_test", "max_size_test", "outputs"} - set(meta)
    if missing:
        raise OVDError(f"not exported by ovd: metadata {sorted(missing)} missing", path=path)
    return meta


def _checked_metadata(meta: dict[str, str], path: str | os.PathLike[str]) -> tuple[list[str], list[str], int, int]:
    """``(class_names, outputs, min_size_test, max_size_test)`` of the metadata, each checked.

    Raises:
        OVDError: naming the file and the ``ovd.*`` key whose value is malformed.
    """

    def bad(key: str, expected: str) -> OVDError:
        return OVDError(f"malformed metadata: expected {expected}, got {meta[key][:80]!r}", path=path,
                        field=META_PREFIX + key)  # fmt: skip

    values: dict[str, Any] = {}
    for key in ("class_names", "outputs"):
        try:
            values[key] = json.loads(meta[key])
        except json.JSONDecodeError as e:
            raise bad(key, "a JSON list of strings") from e
        if not isinstance(values[key], list) or not all(isinstance(v, str) for v in values[key]):
            raise bad(key, "a JSON list of strings")
    if not values["class_names"]:
        raise bad("class_names", "at least one class name")
    if not set(OUTPUTS) <= set(values["outputs"]):
        raise bad("outputs", f"a list holding {', '.join(OUTPUTS)}")
    for key in ("min_size_test", "max_size_test"):
        try:
            values[key] = int(meta[key])
        except ValueError as e:
            raise bad(key, "a positive integer") from e
        if values[key] <= 0:
            raise bad(key, "a positive integer")
    return values["class_names"], values["outputs"], values["min_size_test"], values["max_size_test"]


class OnnxDetector:
    """Runs an exported detector with onnxruntime, as :class:`ovd.Predictor` runs a checkpoint: the
    image is resized to the test scale, detected, and the boxes come back in its own pixels.

    Args:
        path: a file written by :func:`export_onnx`.
        confidence: minimum score of a returned detection (the graph already applies the exported
            test threshold).
        providers: onnxruntime execution providers (default: CPU).
    """

    def __init__(
        self, path: str | os.PathLike[str], *, confidence: float = 0.0, providers: Sequence[str] | None = None
    ) -> None:
        from ovd.data.transforms import ResizeFlipAugmentation

        ort = _require("onnxruntime")
        self.path = Path(path)
        self.class_names, self.outputs, min_size, max_size = _checked_metadata(read_metadata(path), path)
        self.confidence = confidence
        self.augmentation = ResizeFlipAugmentation((min_size,), max_size, flip_prob=0.0)
        self.session = ort.InferenceSession(str(path), providers=list(providers or ["CPUExecutionProvider"]))

    def __call__(self, image: np.ndarray | str | os.PathLike[str]) -> Prediction:
        """Detect on an RGB ``uint8[H, W, 3]`` array, a PIL image or an image path."""
        array = rgb_image(image)
        params = self.augmentation.sample(array.shape[0], array.shape[1], np.random.default_rng(0))
        resized = np.ascontiguousarray(params.apply_image(array).transpose(2, 0, 1))  # (3, h, w)
        result = dict(zip(self.outputs, self.session.run(self.outputs, {"image": resized}), strict=True))
        keep = result["scores"] >= self.confidence
        boxes = params.inverse_boxes(result["boxes"][keep]).astype(np.float32)
        labels = result["labels"][keep].astype(np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= len(self.class_names)):
            raise OVDError(
                f"the model returned label {int(labels.min() if labels.min() < 0 else labels.max())} for a vocabulary "
                f"of {len(self.class_names)} classes (metadata and graph disagree)",
                path=self.path,
            )
        names = [self.class_names[i] for i in labels]
        return Prediction(boxes, result["scores"][keep].astype(np.float32), labels, names)


def matched_detections(a: Prediction, b: Prediction, *, score_tol: float = 1e-4, iou_min: float = 0.999) -> int:
    """How many detections of ``a`` have a twin in ``b`` (same label, score within ``score_tol``, box IoU
    above ``iou_min``)."""
    if len(a) == 0 or len(b) == 0:
        return 0
    iou = torchvision.ops.box_iou(torch.from_numpy(a.boxes), torch.from_numpy(b.boxes)).numpy()  # (Na, Nb)
    same = (a.labels[:, None] == b.labels[None]) & (np.abs(a.scores[:, None] - b.scores[None]) <= score_tol)
    return int((same & (iou >= iou_min)).any(axis=1).sum())


def check_export(
    predictor: Predictor, path: str | os.PathLike[str], size: tuple[int, int] = (300, 400)
) -> dict[str, Any]:
    """Run ``predictor`` and the exported file on one random ``size`` image.

    Returns:
        ``{"size", "torch", "onnx", "matched"}``: detection counts and how many of PyTorch's have an
        identical twin (:func:`matched_detections`) in onnxruntime's.
    """
    image = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    ref = predictor(image)
    got = OnnxDetector(path)(image)
    return {"size": size, "torch": len(ref), "onnx": len(got), "matched": matched_detections(ref, got)}
