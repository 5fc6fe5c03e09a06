"""The one preprocessing contract shared by training and serving.

Every picture that reaches an encoder goes through :func:`to_model_input`, with the
:class:`PreprocessContract` stored beside the model (``<model>.preprocess.json``). The steps,
in order, are fixed:

1. **Greyscale.** A 2-D array is used as is. An H×W×3 / H×W×4 array is reduced to luma with the
   ITU-R BT.601 weights (0.299, 0.587, 0.114); alpha is dropped. Integer RGB is rounded to the
   nearest integer after the weighting, so an RGB array and the same picture decoded by
   :func:`decode_image_bytes` give the same grey values.
2. **Per-image min–max to [0, 1]** in float64. This is what makes the output independent of the
   dtype and the source scale: a uint8 JPEG, the same picture as uint16 scaled by 257, or the
   float output of a DICOM VOI transform all map to the same values. A constant picture maps to
   all zeros. NaN/inf are replaced by the finite minimum first.
3. **Resize to input_size × input_size** with Pillow's antialiased bilinear filter on a 32-bit
   float image (Pillow's filter is deterministic), by the contract's ``resize``: ``"stretch"``
   (the default) resizes both sides to S, so the aspect ratio is not kept; ``"pad"`` resizes the
   longer side to S, keeps the aspect ratio (the shorter side rounded, at least 1 pixel) and
   centres the result on an S×S canvas of zeros (the picture's minimum after step 2), with the
   odd pixel of padding at the bottom or right.
4. **Standardise**: ``(x - mean) / std`` with the contract's ``mean`` and ``std``.

EEG signals become pictures before step 1, by the render the contract names (``eeg_render``, one
of :data:`models.eeg.RENDERS`; ``"trace"`` when a stored contract has no such field).

The result is float32 of shape ``(1, S, S)``; stack them to ``(N, 1, S, S)`` for an encoder.
This module imports numpy and Pillow only (no torch), so the serving path can use it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from models.eeg import RENDERS as EEG_RENDERS
from models.eeg import TRACE
from models.errors import InvalidInput, TooLarge, UnreadableInput

logger = logging.getLogger(__name__)

LUMA_WEIGHTS = (0.299, 0.587, 0.114)
RESIZE_MODES = ("stretch", "pad")
RESIZE_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
}
MAX_PIXELS = 100_000_000
_LUMA_STRIP_ROWS = 256


@dataclasses.dataclass(frozen=True)
class PreprocessContract:
    """How a picture becomes an encoder input; stored as ``<model>.preprocess.json``."""

    input_size: int = 64
    intensity: str = "minmax"  # per-image min-max to [0, 1]; the only supported choice
    resize: str = "stretch"  # one of RESIZE_MODES: S×S without keeping the aspect ratio, or padded
    interpolation: str = "bilinear"  # Pillow filter, antialiased when shrinking
    mean: float = 0.0
    std: float = 1.0
    channels: int = 1
    version: int = 1
    eeg_render: str = TRACE  # how an EEG signal is drawn before step 1 (models.eeg.render_eeg)

    def __post_init__(self) -> None:
        if self.input_size < 8:
            raise InvalidInput(f"input_size must be >= 8, got {self.input_size}")
        if self.intensity != "minmax" or self.resize not in RESIZE_MODES or self.channels != 1:
            raise InvalidInput(f"unsupported preprocessing contract: {self}")
        if self.interpolation not in RESIZE_FILTERS:
            raise InvalidInput(f"unknown interpolation {self.interpolation!r}")
        if not self.std > 0:
            raise InvalidInput("std must be > 0")
        if self.eeg_render not in EEG_RENDERS:
            raise InvalidInput(f"unknown EEG render {self.eeg_render!r}; known: {', '.join(EEG_RENDERS)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessContract:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            logger.warning("ignoring unknown preprocessing fields: %s", sorted(unknown))
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PreprocessContract:
        return cls.from_dict(json.loads(Path(path).read_text()))


def to_grey(image: np.ndarray) -> np.ndarray:
    """2-D array as is; H×W×3/4 (or H×W×1) to BT.601 luma, rounded when the input is integer."""
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        return arr
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        rgb = arr[:, :, :3].astype(np.float64)
        luma = rgb @ np.asarray(LUMA_WEIGHTS)
        if np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
            luma = np.rint(luma)
        return luma
    raise InvalidInput(f"expected a 2-D greyscale or H×W×3/4 colour array, got shape {arr.shape}")


def to_model_input(image: np.ndarray, contract: PreprocessContract) -> np.ndarray:
    """Picture (any dtype, greyscale or RGB(A)) -> float32 ``(1, S, S)`` per the contract."""
    grey = to_grey(image)
    if grey.size == 0 or min(grey.shape) < 1:
        raise InvalidInput("empty image")
    if grey.size > MAX_PIXELS:
        raise InvalidInput(f"image too large: {grey.shape}")
    # Min-max scaling in float64, then float32: computed in strips of rows, so a 16-megapixel query
    # holds a float32 copy and one strip of float64 rather than three float64 copies. The numbers
    # are exactly those of the whole-array computation (element-wise, same operations).
    fill: float | None = None
    if np.issubdtype(grey.dtype, np.integer) or grey.dtype == np.bool_:
        low, high = float(grey.min()), float(grey.max())
    else:
        finite = np.isfinite(grey)
        if finite.all():
            low, high = float(np.min(grey)), float(np.max(grey))
        else:
            fill = float(grey[finite].min()) if finite.any() else 0.0
            low = min(fill, float(grey[finite].min())) if finite.any() else fill
            high = max(fill, float(grey[finite].max())) if finite.any() else fill
        del finite
    scaled = np.zeros(grey.shape, dtype=np.float32)
    if high > low:
        for start in range(0, grey.shape[0], _LUMA_STRIP_ROWS):
            values = grey[start : start + _LUMA_STRIP_ROWS].astype(np.float64)
            if fill is not None:
                values = np.where(np.isfinite(values), values, fill)
            scaled[start : start + _LUMA_STRIP_ROWS] = ((values - low) / (high - low)).astype(np.float32)
    size = contract.input_size
    picture = Image.fromarray(scaled, mode="F")
    del scaled
    out = _resized(picture, size, contract)
    if contract.mean != 0.0 or contract.std != 1.0:
        out = (out - np.float32(contract.mean)) / np.float32(contract.std)
    return np.ascontiguousarray(out[None, :, :], dtype=np.float32)


def _resized(picture: Image.Image, size: int, contract: PreprocessContract) -> np.ndarray:
    """Step 3: the float picture at S×S, stretched or padded per ``contract.resize``."""
    width, height = picture.size
    target = (size, size)
    if contract.resize == "pad":
        scale = size / max(width, height)
        target = (max(1, min(size, round(width * scale))), max(1, min(size, round(height * scale))))
    if picture.size != target:
        picture = picture.resize(target, RESIZE_FILTERS[contract.interpolation])
    if target == (size, size):
        return np.asarray(picture, dtype=np.float32)
    canvas = np.zeros((size, size), dtype=np.float32)
    top, left = (size - target[1]) // 2, (size - target[0]) // 2
    canvas[top : top + target[1], left : left + target[0]] = np.asarray(picture, dtype=np.float32)
    return canvas


def _pil_to_grey_uint8(picture: Image.Image) -> np.ndarray:
    ImageOps.exif_transpose(picture, in_place=True)  # a copy of the whole picture otherwise
    mode = picture.mode
    if mode in ("L", "LA"):
        return np.asarray(picture.getchannel(0), dtype=np.uint8)
    if mode == "1":
        return np.asarray(picture.convert("L"), dtype=np.uint8)
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        wide = np.asarray(picture, dtype=np.float64)
        return np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
    if mode == "F":
        return np.clip(np.rint(np.asarray(picture, dtype=np.float64)), 0, 255).astype(np.uint8)
    if mode not in ("RGB", "RGBA"):
        picture = picture.convert("RGBA" if "A" in mode or "transparency" in picture.info else "RGB")
    width, height = picture.size
    grey = np.empty((height, width), dtype=np.uint8)
    for start in range(0, height, _LUMA_STRIP_ROWS):  # only a strip is ever copied out of Pillow
        strip = np.asarray(picture.crop((0, start, width, min(height, start + _LUMA_STRIP_ROWS))))
        grey[start : start + _LUMA_STRIP_ROWS] = np.clip(to_grey(strip), 0, 255).astype(np.uint8)
    return grey


# The only picture formats read: Pillow would otherwise also open EPS (through Ghostscript, which
# runs PostScript), ICO (which decodes its images while opening) and dozens more.
PICTURE_FORMATS = ("PNG", "JPEG")


def decode_image_bytes(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """PNG or JPEG bytes -> 2-D uint8 greyscale; 16-bit is divided by 257.

    The size comes from the header: a picture over ``max_pixels`` is refused (TooLarge) before any
    pixel is decoded. Colour is reduced to luma in strips of rows copied out of Pillow one at a
    time, so Pillow's decoded picture is the only full-size colour buffer.
    """
    if not data:
        raise UnreadableInput("empty image bytes")
    try:
        with Image.open(io.BytesIO(data), formats=PICTURE_FORMATS) as picture:
            if picture.width * picture.height > max_pixels:
                raise TooLarge(
                    f"image too large: {picture.width}x{picture.height} pixels, the limit is {max_pixels:,}"
                )
            picture.load()
            return _pil_to_grey_uint8(picture)
    except Image.DecompressionBombError as exc:  # not an OSError: Pillow's own guard
        raise TooLarge(f"image too large: {exc}") from exc
    except UnidentifiedImageError:
        raise UnreadableInput("not a PNG or JPEG picture") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise UnreadableInput(f"cannot decode image bytes: {exc}") from exc


def load_image_file(path: str | Path) -> np.ndarray:
    """Image file -> 2-D uint8 greyscale (same rules as :func:`decode_image_bytes`)."""
    return decode_image_bytes(Path(path).read_bytes())
