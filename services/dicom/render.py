"""Thumbnails: a decoded display frame as a small greyscale PNG.

The frame comes from :func:`services.dicom.decode.decode_for_embedding`, so a thumbnail shows what
the encoder saw: Modality and VOI LUT applied, MONOCHROME1 inverted, the middle frame, an EEG as
the picture its model's render draws (``eeg_render`` of the contract). Only the contrast stretch
(min to max, as the encoder's preprocessing does) and an aspect-preserving downscale are added here.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from models.preprocess import to_grey
from services.core.answers import DEFAULT_THUMBNAIL, MAX_THUMBNAIL, MIN_THUMBNAIL
from services.core.errors import InvalidInput


def check_thumbnail_size(max_size: int) -> int:
    """``max_size`` (0: the default), or InvalidInput outside MIN_THUMBNAIL..MAX_THUMBNAIL."""
    size = max_size or DEFAULT_THUMBNAIL
    if not MIN_THUMBNAIL <= size <= MAX_THUMBNAIL:
        raise InvalidInput(
            f"a thumbnail's size must be {MIN_THUMBNAIL} to {MAX_THUMBNAIL} pixels, got {size}"
        )
    return size


def to_display_uint8(image: np.ndarray) -> np.ndarray:
    """A display frame (any dtype, grey or RGB) stretched min-to-max into 8-bit grey."""
    grey = to_grey(image).astype(np.float32, copy=False)
    finite = np.isfinite(grey)
    if not finite.any():
        return np.zeros(grey.shape, dtype=np.uint8)
    low, high = float(grey[finite].min()), float(grey[finite].max())
    if high <= low:
        return np.zeros(grey.shape, dtype=np.uint8)
    scaled = (np.where(finite, grey, low) - low) * np.float32(255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def display_base(image: np.ndarray) -> Image.Image:
    """The 8-bit picture every thumbnail of ``image`` is scaled from: at most MAX_THUMBNAIL on its
    longest side (decode once, then any size is a cheap downscale)."""
    picture = Image.fromarray(to_display_uint8(image), mode="L")
    picture.thumbnail((MAX_THUMBNAIL, MAX_THUMBNAIL), Image.Resampling.LANCZOS)
    return picture


def png_of(base: Image.Image, max_size: int = DEFAULT_THUMBNAIL) -> tuple[bytes, int, int]:
    """(PNG bytes, width, height) of ``base`` scaled down so its longest side is ``max_size`` at
    most (never scaled up)."""
    size = check_thumbnail_size(max_size)
    picture = base.copy()
    picture.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    picture.save(out, format="PNG", optimize=False)
    return out.getvalue(), picture.width, picture.height


def thumbnail_png(image: np.ndarray, max_size: int = DEFAULT_THUMBNAIL) -> tuple[bytes, int, int]:
    """(PNG bytes, width, height) of a display frame, its longest side ``max_size`` at most."""
    check_thumbnail_size(max_size)
    return png_of(display_base(image), max_size)
