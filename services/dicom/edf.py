"""EDF/EDF+/BDF signals: the first EEG channel in µV, read with pyedflib.

The channel is the first signal whose label mentions EEG (e.g. ``EEG Fp1-Ref``), else the first
signal that is not an annotation channel. Physical values are converted to µV from the signal's
physical dimension (``uV``, ``µV``, ``mV``, ``V``, ``nV``; an empty dimension is taken as µV).
Only :mod:`services.core.errors` classes are raised.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from services.core.errors import CbmirError, DecodeError, TooLarge, UnreadableInput, UnsupportedInput
from services.core.logs import file_ref

logger = logging.getLogger(__name__)

MAX_SAMPLES = 50_000_000
_TO_MICROVOLT = {"uv": 1.0, "µv": 1.0, "μv": 1.0, "mv": 1e3, "v": 1e6, "nv": 1e-3, "": 1.0}


def _pick_channel(labels: list[str]) -> int:
    usable = [i for i, label in enumerate(labels) if "annotation" not in label.lower()]
    if not usable:
        raise UnsupportedInput("EDF file has no signal channel (only annotations)", reason="no-signal")
    eeg = [i for i in usable if "eeg" in labels[i].lower()]
    return eeg[0] if eeg else usable[0]


def read_edf_signal(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """First EEG channel of an EDF/BDF file as float64 µV, and its sampling frequency in Hz."""
    path = Path(path)
    if not path.is_file():
        raise UnreadableInput(f"no such file: {file_ref(path)}", reason="no-such-file")
    if path.stat().st_size == 0:
        raise UnreadableInput(f"{file_ref(path)} is empty (0 bytes)", reason="empty")
    import pyedflib

    try:
        reader = pyedflib.EdfReader(str(path))
    except Exception as exc:  # noqa: BLE001 - pyedflib raises OSError and others for anything not EDF
        raise UnreadableInput(
            f"{file_ref(path)} is not a readable EDF/BDF file ({type(exc).__name__})", reason="not-edf"
        ) from None
    try:
        labels = [str(label) for label in reader.getSignalLabels()]
        channel = _pick_channel(labels)
        sampling_hz = float(reader.getSampleFrequency(channel))
        n_samples = int(reader.getNSamples()[channel])
        if not np.isfinite(sampling_hz) or sampling_hz <= 0:
            raise UnreadableInput(
                "EDF channel has no positive sampling frequency", reason="invalid-attribute"
            )
        if n_samples < 1:
            raise UnreadableInput("EDF channel has no samples", reason="no-samples")
        if n_samples > MAX_SAMPLES:
            raise TooLarge(
                f"EDF channel has {n_samples:,} samples; the limit is {MAX_SAMPLES:,}",
                reason="too-many-samples",
            )
        dimension = str(reader.getPhysicalDimension(channel)).strip().lower()
        scale = _TO_MICROVOLT.get(dimension)
        if scale is None:
            raise UnsupportedInput(
                f"EDF channel unit '…' ({len(dimension)} characters) is not uV, mV, V or nV",
                reason="unsupported-unit",
            )
        if not dimension:
            logger.warning("EDF channel has no physical dimension; assuming µV")
        try:
            samples = np.asarray(reader.readSignal(channel), dtype=np.float64) * scale
        except Exception as exc:  # noqa: BLE001 - pyedflib raises many types for a damaged file
            raise DecodeError(
                f"EDF samples could not be read ({type(exc).__name__})", reason="corrupt-signal"
            ) from None
    except CbmirError:
        raise
    except Exception as exc:  # noqa: BLE001 - header accessors of a damaged file
        raise UnreadableInput(
            f"EDF header of {file_ref(path)} is unusable ({type(exc).__name__})", reason="parse-error"
        ) from None
    finally:
        reader.close()
    return samples, sampling_hz
