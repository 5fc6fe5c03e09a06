"""services.dicom.edf: first EEG channel of an EDF file in µV."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.core.errors import UnreadableInput, UnsupportedInput
from services.dicom.edf import read_edf_signal

highlevel = pytest.importorskip("pyedflib.highlevel")


def write_edf(path: Path, labels: list[str], dimension: str, signals: np.ndarray, hz: float = 256) -> None:
    headers = highlevel.make_signal_headers(
        labels, dimension=dimension, sample_frequency=hz, physical_min=-500, physical_max=500
    )
    highlevel.write_edf(str(path), signals, headers)


def test_first_eeg_channel_in_microvolt(tmp_path: Path) -> None:
    t = np.arange(1024) / 256
    eeg = 100 * np.sin(2 * np.pi * 10 * t)
    path = tmp_path / "a.edf"
    write_edf(path, ["ECG", "EEG Fp1-Ref", "EEG Fp2-Ref"], "mV", np.stack([eeg * 0, eeg, -eeg]))
    samples_uv, sampling_hz = read_edf_signal(path)
    assert sampling_hz == 256
    np.testing.assert_allclose(samples_uv, eeg * 1000, atol=500 / 2**15 * 1000 * 2)


def test_falls_back_to_first_signal_and_uv(tmp_path: Path) -> None:
    signal = np.linspace(-50, 50, 512)
    path = tmp_path / "b.edf"
    write_edf(path, ["Fz"], "uV", signal[None, :], hz=128)
    samples_uv, sampling_hz = read_edf_signal(path)
    assert sampling_hz == 128
    np.testing.assert_allclose(samples_uv, signal, atol=0.1)


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(UnreadableInput):
        read_edf_signal(tmp_path / "missing.edf")
    (tmp_path / "empty.edf").write_bytes(b"")
    with pytest.raises(UnreadableInput, match="empty"):
        read_edf_signal(tmp_path / "empty.edf")
    (tmp_path / "junk.edf").write_bytes(b"0       " + b"x" * 600)
    with pytest.raises(UnreadableInput):
        read_edf_signal(tmp_path / "junk.edf")
    path = tmp_path / "temperature.edf"
    write_edf(path, ["Temp"], "degC", np.zeros((1, 256)))
    with pytest.raises(UnsupportedInput):
        read_edf_signal(path)
