"""Fixtures of the web-demo tests: the tiny checkpoint (tests/conftest.py) and a saved CLIP text encoder,
so that the page and a separate :class:`Predictor` encode new names with the same (random-init) weights."""

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from ovd.data.loader import read_image_rgb
from ovd.predictor import Prediction, Predictor


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory) -> str:
    from ovd.clip import create_clip
    from ovd.clip.model import save_clip_checkpoint

    path = tmp_path_factory.mktemp("clip") / "text_encoder.pt"
    save_clip_checkpoint(create_clip("ovd-tiny-cnn"), path)  # the tiny checkpoint's CLIP architecture
    return str(path)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, clip_file):
    """``predict(image path, names or None, confidence) -> Prediction`` by a fresh :class:`Predictor`."""
    checkpoint = tiny_checkpoint[0]

    def predict(image: Path | str, names: list[str] | None, confidence: float) -> Prediction:
        predictor = Predictor(checkpoint, confidence=confidence, device="cpu", clip_pretrained=clip_file)
        if names is not None:
            predictor.set_vocabulary(names)
        return predictor(read_image_rgb(str(image)))

    return predict


@pytest.fixture(scope="session")
def assert_same_detections():
    """``check(got, want, box_tol=1e-4)``: the same names, boxes and scores, in the same order."""

    def check(got: Prediction, want: Prediction, *, box_tol: float = 1e-4) -> None:
        assert len(got) == len(want) > 0
        assert got.names == want.names
        np.testing.assert_allclose(got.boxes, want.boxes, atol=box_tol)
        np.testing.assert_allclose(got.scores, want.scores, atol=1e-6)

    return check


@pytest.fixture(scope="session")
def huge_png(tmp_path_factory) -> Path:
    """A PNG whose header says 12,000 x 12,000 RGB and whose pixel data is one short zero row."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 12000, 12000, 8, 2, 0, 0, 0)
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path
