"""``Predictor``: a trained checkpoint + any vocabulary → detections on single images.

from ovd import Predictor
predictor = Predictor("output/ovshapes/base/model_final.pth")
predictor.set_vocabulary(["star", "moon"])
result = predictor("photo.png")
print(result.names, result.scores)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ovd.data.loader import read_image_rgb
from ovd.data.transforms import ResizeFlipAugmentation
from ovd.errors import OVDError
from ovd.runtime.detector import load_trained_detector


@dataclass
class Prediction:
    """Detections of one image, in original-image pixels.

    Attributes:
        boxes: ``float32[N, 4]`` xyxy.
        scores: ``float32[N]``.
        labels: ``int64[N]`` indices into the vocabulary.
        names: the class name of each detection.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    names: list[str]

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def rgb_image(image: np.ndarray | str | os.PathLike[str]) -> np.ndarray:
    """An RGB ``uint8[H, W, 3]`` array from an array, a PIL image or an image path.

    Raises:
        OVDError: an unreadable file (naming it) or an array of another shape or dtype.
    """
    if isinstance(image, (str, Path)):
        return read_image_rgb(str(image))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise OVDError(f"expected an RGB uint8 (H, W, 3) image, got {array.dtype} {array.shape}")
    return array


class Predictor:
    """Load a checkpoint and detect the classes of a vocabulary.

    Args:
        checkpoint: a checkpoint written by the trainer (it holds its config and vocabulary).
        confidence: minimum score of a returned detection (``None`` = the config's test threshold).
        device: ``auto``, ``cpu`` or ``cuda``.
        clip_model, clip_pretrained: the CLIP text encoder used by :meth:`set_vocabulary` for new names
            (default: the one the checkpoint was trained with).
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike[str],
        *,
        confidence: float | None = None,
        device: str = "auto",
        clip_model: str | None = None,
        clip_pretrained: str | None = None,
    ) -> None:
        loaded = load_trained_detector(checkpoint, device=device, confidence=confidence)
        cfg = loaded.cfg
        clip = cfg.clip
        self.clip_cfg = replace(
            clip,
            model=clip_model or clip.model,
            pretrained=clip_pretrained if clip_pretrained is not None else clip.pretrained,
        )
        self.cfg = cfg
        self.device = loaded.model.device
        self.model = loaded.model
        self.class_names: list[str] = loaded.class_names
        self.trained_embeddings = loaded.class_embeddings  # Tensor[C, D]: the checkpoint's own vocabulary
        self.augmentation = ResizeFlipAugmentation((cfg.input.min_size_test,), cfg.input.max_size_test, flip_prob=0.0)
        self._text_encoder = None

    def set_vocabulary(self, names: Sequence[str] | str) -> None:
        """Detect these classes from now on: a list of free-text names, or a catalog dataset name (a
        ``data.custom`` dataset of the checkpoint's config included)."""
        from ovd.clip import build_text_embeddings, create_clip
        from ovd.data.catalog import get_dataset

        if isinstance(names, str):
            from ovd.data.custom import register_custom_datasets

            register_custom_datasets([s for s in self.cfg.data.custom if s.name == names])  # the run's own data
            names = list(get_dataset(names, prepare=False).class_names)
        names = [n.strip() for n in names]
        if not names:
            raise OVDError("the vocabulary is empty", field="vocabulary")
        seen: dict[str, str] = {}
        for name in names:  # one name twice would split one class into two score columns
            if seen.setdefault(name.lower(), name) is not name:
                raise OVDError(f"{name!r} is in the vocabulary twice (as {seen[name.lower()]!r})", field="vocabulary")
        if self._text_encoder is None:
            self._text_encoder = create_clip(self.clip_cfg.model, self.clip_cfg.pretrained or None)
        emb = build_text_embeddings(self._text_encoder, names, list(self.clip_cfg.templates))
        self.model.set_vocabulary(emb.to(self.device))
        self.class_names = list(names)

    @torch.no_grad()
    def __call__(self, image: np.ndarray | str | os.PathLike[str]) -> Prediction:
        """Detect on an RGB ``uint8[H, W, 3]`` array, a PIL image or an image path."""
        array = rgb_image(image)
        params = self.augmentation.sample(array.shape[0], array.shape[1], np.random.default_rng(0))
        tensor = torch.from_numpy(np.ascontiguousarray(params.apply_image(array))).permute(2, 0, 1)
        det = self.model([tensor])[0]
        boxes = params.inverse_boxes(det.boxes.float().cpu().numpy()).astype(np.float32)
        labels = det.labels.cpu().numpy()
        return Prediction(boxes, det.scores.float().cpu().numpy(), labels, [self.class_names[i] for i in labels])
