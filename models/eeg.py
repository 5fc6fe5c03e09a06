"""EEG segments as pictures: one fixed renderer used by training and serving.

:func:`render_eeg_trace` draws a single-channel EEG trace as a 256×256 uint8 image (white trace
on black). Everything about the picture is fixed, never derived from the signal's own range:

* **Rate**: the signal is first resampled to ``RENDER_RATE_HZ`` (173.61 Hz, the Bonn rate) by
  linear interpolation on a fixed time grid, after a moving-average anti-alias filter when the
  source rate is higher. So a different sampling rate draws the same picture.
* **Duration**: the first ``DURATION_S`` seconds (23.6 s = 4097 samples at 173.61 Hz, one Bonn
  segment). A shorter signal leaves the rest of the picture black.
* **Layout**: the duration is cut into ``ROWS`` = 8 consecutive strips of 2.95 s each, stacked
  top to bottom like a paper strip chart; each strip is ``HEIGHT / ROWS`` = 32 px tall and
  ``WIDTH`` = 256 px wide (time on x, left to right, about 2 samples per pixel column).
* **Amplitude**: the segment's mean is removed (DC offset), then a fixed scale of
  ``AMPLITUDE_UV`` = ±300 µV spans each strip's height (positive up), and values beyond it are
  clipped to the strip's edge. No autoscaling.
* **Drawing**: in every pixel column the vertical span between the lowest and the highest value
  the (linearly connected) trace reaches in that column is set to 255.

:func:`render_eeg_trace_spectrogram` (render ``"trace-spectrogram"``, contract ``eeg_render``) is
the same signal as a 256×256 picture in two panels, so that a 64×64 model input still carries the
rhythm (band power) as well as the waveform's shape:

* **Top half (rows 0-127)**: the trace as above, in ``ROWS // 2`` = 4 strips of 5.9 s, 32 px tall.
* **Bottom half (rows 128-255)**: a spectrogram with fixed axes and scale. ``SPEC_FRAMES`` = 64
  Hann windows of ``SPEC_WINDOW`` = 256 samples (1.47 s), centred at equal steps over the
  duration (the signal is zero-padded at both ends), each 4 px wide; ``SPEC_BINS`` = 64 frequency
  bins from 0 to 42.7 Hz (0.68 Hz each, 2 px tall, low frequencies at the bottom). The one-sided
  power spectral density in dB re 1 µV²/Hz is mapped linearly from [``SPEC_DB_MIN``,
  ``SPEC_DB_MAX``] = [-20, 45] dB to 0-255 and clipped. No autoscaling: the range was read once
  off the Bonn training segments (0.5 % to 99.5 % of their values, rounded) and is now a constant.
  Two details are part of the fixed render and stay as they are: the 0 Hz bin is doubled like the
  others (it reads 3 dB high), and ``np.hanning`` is the symmetric window.

A model's preprocessing contract names its render (``PreprocessContract.eeg_render``); serving
draws what the model was trained on, through :func:`render_eeg`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from models.errors import InvalidInput, UnreadableInput

logger = logging.getLogger(__name__)

BONN_SAMPLING_HZ = 173.61
RENDER_RATE_HZ = BONN_SAMPLING_HZ
DURATION_S = 4097 / BONN_SAMPLING_HZ  # 23.599 s, one Bonn segment
AMPLITUDE_UV = 300.0
# The highest sampling rate rendered (clinical EEG is recorded at 128 Hz to 20 kHz). The anti-alias
# filter costs about samples × rate / 173.61 operations, so the rate needs a bound of its own.
MAX_SAMPLING_HZ = 65_536.0
ROWS = 8
WIDTH = 256
HEIGHT = 256
SPEC_WINDOW = 256
SPEC_FRAMES = 64
SPEC_BINS = 64
SPEC_DB_MIN = -20.0
SPEC_DB_MAX = 45.0
TRACE = "trace"
TRACE_SPECTROGRAM = "trace-spectrogram"
RENDERS = (TRACE, TRACE_SPECTROGRAM)


def read_bonn_txt(path: str | Path) -> np.ndarray:
    """A Bonn EEG text file (one integer sample in µV per line) -> float64 µV."""
    try:
        samples = np.loadtxt(path, dtype=np.float64, ndmin=1)
    except ValueError as exc:
        raise UnreadableInput(f"not a Bonn EEG text file: {path}: {exc}") from exc
    if samples.ndim != 1 or samples.size == 0:
        raise UnreadableInput(f"expected one sample per line in {path}")
    return samples


def resample_to_render_rate(samples_uv: np.ndarray, sampling_hz: float) -> np.ndarray:
    """Resample to ``RENDER_RATE_HZ`` on the grid t_k = k / RENDER_RATE_HZ, cut to ``DURATION_S``."""
    x = np.asarray(samples_uv, dtype=np.float64).ravel()
    if x.size == 0:
        raise InvalidInput("empty EEG signal")
    if not sampling_hz or sampling_hz <= 0 or not np.isfinite(sampling_hz):
        raise InvalidInput(f"invalid sampling rate {sampling_hz!r}")
    if sampling_hz > MAX_SAMPLING_HZ:
        raise InvalidInput(f"sampling rate {sampling_hz:g} Hz is above the {MAX_SAMPLING_HZ:g} Hz rendered")
    # only the first DURATION_S seconds are drawn: keep them and the filter's reach past their end
    keep = int(np.ceil(DURATION_S * sampling_hz)) + 2 * int(np.ceil(sampling_hz / RENDER_RATE_HZ)) + 2
    x = np.nan_to_num(x[:keep], nan=0.0, posinf=0.0, neginf=0.0)
    if abs(sampling_hz - RENDER_RATE_HZ) < 1e-6:
        return x[: round(DURATION_S * RENDER_RATE_HZ)]
    ratio = sampling_hz / RENDER_RATE_HZ
    if ratio > 1.0:  # anti-alias: moving average over one output sample period
        width = round(ratio)
        if width > 1:
            kernel = np.ones(width) / width
            x = np.convolve(np.pad(x, (width // 2, width - 1 - width // 2), mode="edge"), kernel, "valid")
    source_t = np.arange(x.size) / sampling_hz
    n_out = min(round(DURATION_S * RENDER_RATE_HZ), int(np.floor(source_t[-1] * RENDER_RATE_HZ)) + 1)
    target_t = np.arange(n_out) / RENDER_RATE_HZ
    return np.interp(target_t, source_t, x)


def render_eeg(samples_uv: np.ndarray, sampling_hz: float, render: str = TRACE) -> np.ndarray:
    """The named render (one of ``RENDERS``) of a single-channel EEG in µV -> 256×256 uint8."""
    if render == TRACE:
        return render_eeg_trace(samples_uv, sampling_hz)
    if render == TRACE_SPECTROGRAM:
        return render_eeg_trace_spectrogram(samples_uv, sampling_hz)
    raise InvalidInput(f"unknown EEG render {render!r}; known: {', '.join(RENDERS)}")


def training_view(samples_uv: np.ndarray, rng: np.random.Generator, polarity: bool = True) -> np.ndarray:
    """One random training view of a segment: a circular time shift, and a sign flip when ``polarity``.

    Training only (``eeg_views`` of ``models.train``): the picture's fixed time and amplitude
    scales are untouched, unlike an affine warp of the drawn picture. A rhythm or a spike pattern
    is the same finding wherever the 23.6 s window starts, and an EEG's sign depends on the
    montage's reference, so both leave the label as it is. The shift's seam is one discontinuity.
    """
    x = np.roll(np.asarray(samples_uv, dtype=np.float64), int(rng.integers(len(samples_uv))))
    return -x if polarity and rng.random() < 0.5 else x


def render_eeg_trace(samples_uv: np.ndarray, sampling_hz: float) -> np.ndarray:
    """Single-channel EEG (µV) at ``sampling_hz`` -> 256×256 uint8 strip-chart picture."""
    x = resample_to_render_rate(samples_uv, sampling_hz)
    return _draw_trace(x - x.mean(), ROWS, HEIGHT)


def render_eeg_trace_spectrogram(samples_uv: np.ndarray, sampling_hz: float) -> np.ndarray:
    """Single-channel EEG (µV) -> 256×256 uint8: trace (top half) over a spectrogram (bottom half)."""
    x = resample_to_render_rate(samples_uv, sampling_hz)
    x = x - x.mean()
    image = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    image[: HEIGHT // 2] = _draw_trace(x, ROWS // 2, HEIGHT // 2)
    image[HEIGHT // 2 :] = _draw_spectrogram(x, HEIGHT // 2)
    return image


def _draw_spectrogram(x: np.ndarray, height: int) -> np.ndarray:
    """Fixed-axis, fixed-scale spectrogram panel (see the module docstring), ``height`` × ``WIDTH``."""
    total = round(DURATION_S * RENDER_RATE_HZ)
    padded = np.zeros(total + SPEC_WINDOW, dtype=np.float64)
    padded[SPEC_WINDOW // 2 : SPEC_WINDOW // 2 + x.size] = x[:total]
    centres = np.round((np.arange(SPEC_FRAMES) + 0.5) * total / SPEC_FRAMES).astype(np.int64)
    window = np.hanning(SPEC_WINDOW)
    frames = np.stack([padded[c : c + SPEC_WINDOW] for c in centres]) * window
    psd = 2.0 * np.abs(np.fft.rfft(frames, axis=1)[:, :SPEC_BINS]) ** 2
    psd /= RENDER_RATE_HZ * float((window**2).sum())
    db = 10.0 * np.log10(psd + 1e-12)
    level = np.clip((db - SPEC_DB_MIN) / (SPEC_DB_MAX - SPEC_DB_MIN), 0.0, 1.0)
    cells = np.round(level * 255.0).astype(np.uint8).T[::-1]  # rows = bins, low frequency at the bottom
    return np.repeat(np.repeat(cells, height // SPEC_BINS, axis=0), WIDTH // SPEC_FRAMES, axis=1)


def _draw_trace(x: np.ndarray, rows: int, height: int) -> np.ndarray:
    """Zero-mean µV trace drawn as ``rows`` strips stacked in a ``height`` × ``WIDTH`` picture."""
    total = round(DURATION_S * RENDER_RATE_HZ)
    per_row = int(np.ceil(total / rows))
    row_h = height // rows
    half = (row_h - 1) / 2.0
    # amplitude -> fractional pixel row inside a strip (0 = top); clip, never autoscale
    y = half - np.clip(x / AMPLITUDE_UV, -1.0, 1.0) * half
    image = np.zeros((height, WIDTH), dtype=np.uint8)
    for row in range(rows):
        seg = y[row * per_row : (row + 1) * per_row + 1]  # +1: connect to the next strip's start
        if seg.size < 2:
            if seg.size == 1:
                r = round(seg[0])
                image[row * row_h + r, 0] = 255
            continue
        # sample i sits at x position i * WIDTH / per_row; column c covers [c, c+1)
        pos = np.arange(seg.size) * (WIDTH / per_row)
        last_col = min(WIDTH - 1, int(np.floor(pos[-1] - 1e-9)))
        cols = np.arange(last_col + 1)
        left = np.interp(cols, pos, seg)
        right = np.interp(np.minimum(cols + 1, pos[-1]), pos, seg)
        low, high = np.minimum(left, right), np.maximum(left, right)
        inside = pos < last_col + 1
        col_of = np.floor(pos[inside]).astype(np.int64)
        np.minimum.at(low, col_of, seg[inside])
        np.maximum.at(high, col_of, seg[inside])
        top = np.floor(low + 0.5).astype(np.int64)
        bottom = np.floor(high + 0.5).astype(np.int64)
        rows_idx = np.arange(row_h)[:, None]
        strip = (rows_idx >= top[None, :]) & (rows_idx <= bottom[None, :])
        image[row * row_h : (row + 1) * row_h, : last_col + 1][strip] = 255
    return image
