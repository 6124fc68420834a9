"""What a web-demo user types or uploads, checked: the vocabulary text and the image file.

Every check raises :class:`~ovd.errors.OVDError` with a message meant for the page. Images are decoded
within a memory bound: the header is read first (PIL, no pixels), a JPEG larger than
:data:`MAX_DECODE_PIXELS` is decoded at 1/2, 1/4 or 1/8 scale (OpenCV's reduced reads:
libjpeg's DCT scaling, the full image is never in memory), any other format that large is refused,
and what is decoded is downscaled to :data:`MAX_SIDE` pixels on its long side.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from ovd.data.loader import read_image_rgb
from ovd.errors import OVDError

# More names than LVIS's 1,203 are refused: each name is a CLIP text forward and a classifier column.
MAX_VOCABULARY_NAMES = 1500
# Longer names are refused: CLIP's text encoder sees 77 tokens at most.
MAX_NAME_CHARS = 200
# Decoded pixels at most (40 Mpx: 120 MB as RGB uint8); larger JPEGs are decoded at a reduced scale.
MAX_DECODE_PIXELS = 40_000_000
# Long side of the image the model sees, at most: a detector resizes to its test scale (256 to 1,333 px)
# anyway, so larger inputs only cost memory and drawing time.
MAX_SIDE = 4096
_REDUCED_COLOR = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
_SEPARATORS = re.compile(r"[,\n;]")


def parse_names(text: str | None) -> list[str]:
    """Class names from the vocabulary box: separated by commas, semicolons or new lines, stripped.

    Raises:
        OVDError: no names, repeated names (case-insensitive; all are named), more than
            :data:`MAX_VOCABULARY_NAMES` names, or a name longer than :data:`MAX_NAME_CHARS`.
    """
    names = [n.strip() for n in _SEPARATORS.split(text or "") if n.strip()]
    if not names:
        raise OVDError("the vocabulary is empty: type class names separated by commas", field="vocabulary")
    if len(names) > MAX_VOCABULARY_NAMES:
        raise OVDError(f"{len(names):,} class names is too many (at most {MAX_VOCABULARY_NAMES:,})", field="vocabulary")
    long = [n for n in names if len(n) > MAX_NAME_CHARS]
    if long:
        raise OVDError(
            f"a class name is longer than {MAX_NAME_CHARS} characters: {long[0][:40]!r}...", field="vocabulary"
        )
    seen: dict[str, int] = {}
    for n in names:
        seen[n.lower()] = seen.get(n.lower(), 0) + 1
    repeated = [n for n, count in seen.items() if count > 1]
    if repeated:
        raise OVDError(f"repeated class names: {', '.join(repeated)} (give each name once)", field="vocabulary")
    return names


@dataclass
class LoadedImage:
    """An image ready for the model.

    Attributes:
        rgb: ``uint8[h, w, 3]`` what the model sees.
        original_size: ``(H, W)`` of the file.
        scale: ``h / H`` (1.0 unless the image was reduced).
    """

    rgb: np.ndarray
    original_size: tuple[int, int]
    scale: float

    @property
    def reduced(self) -> bool:
        return self.scale != 1.0


def _header(path: Path, label: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.size  # noqa: B018  (the header is parsed lazily)
            return image
    except Image.DecompressionBombError as e:
        raise OVDError(f"the image is too large to open ({e})", path=label) from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise OVDError("not an image file (or a corrupt one)", path=label) from e


def load_image(path: str | os.PathLike[str], *, name: str | None = None) -> LoadedImage:
    """Decode an uploaded image file within the memory bound of the module docstring.

    Args:
        path: the file.
        name: the name shown in messages (the user's file name; default: ``path``).

    Raises:
        OVDError: not an image, a corrupt or truncated one, or too large to decode (naming its size).
    """
    path = Path(path)
    label = name or str(path)
    header = _header(path, label)
    width, height = header.size
    if width < 1 or height < 1:
        raise OVDError(f"the image is empty ({width}x{height})", path=label)
    if width * height <= MAX_DECODE_PIXELS:
        header.close()
        try:
            rgb = read_image_rgb(str(path))  # as Predictor reads a path (OpenCV, EXIF orientation)
        except OVDError as e:
            raise OVDError("cannot decode the image (corrupt or truncated file)", path=label) from e
    elif header.format == "JPEG":
        header.close()
        factor = 2
        while factor < 8 and width * height / (factor * factor) > MAX_DECODE_PIXELS:
            factor *= 2
        if width * height / (factor * factor) > MAX_DECODE_PIXELS:
            raise OVDError(f"the image is {width}x{height}: too large even at 1/8 scale", path=label)
        bgr = cv2.imread(str(path), _REDUCED_COLOR[factor])  # libjpeg decodes at 1/factor scale
        if bgr is None:
            raise OVDError("cannot decode the image (corrupt or truncated file)", path=label)
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=bgr)  # in place: one decoded copy in memory
    else:
        header.close()
        raise OVDError(
            f"the image is {width}x{height} ({width * height / 1e6:.0f} Mpx): larger than "
            f"{MAX_DECODE_PIXELS / 1e6:.0f} Mpx; downscale it, or save it as JPEG (decoded at a reduced scale)",
            path=label,
        )
    h, w = rgb.shape[:2]
    if max(h, w) > MAX_SIDE:
        ratio = MAX_SIDE / max(h, w)
        rgb = cv2.resize(rgb, (max(1, round(w * ratio)), max(1, round(h * ratio))), interpolation=cv2.INTER_AREA)
    rgb = np.ascontiguousarray(rgb)
    return LoadedImage(rgb, (height, width), rgb.shape[0] / height)
