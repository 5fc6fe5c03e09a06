"""services.dicom.dicomize: objects per modality, grouping, deterministic UIDs, sidecar index, CLI,
dciodvfy validation and the round trip through services.dicom.decode."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from services.dicom import dicomize
from services.dicom.build import write_dataset
from services.dicom.decode import decode_for_embedding, read_eeg_waveform, read_header
from tests import support

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("CBMIR_SHARED_DATA", REPO.parent / "shared" / "data"))
FIELDS = ["path", "modality", "label", "split", "source", "patient", "sha256"]

# dicom3tools 1.00~20220618 lists these as Type 1 in the Ophthalmic Tomography Image module, while
# its own Multi-frame Functional Groups module forbids them outside a concatenation (and a
# concatenation of one frame is invalid): a single-frame OCT object cannot satisfy both.
KNOWN_DCIODVFY_FALSE_POSITIVES = {
    f"Error - Missing attribute Type 1 Required Element=<{keyword}> Module=<OphthalmicTomographyImage>"
    for keyword in ("ConcatenationFrameOffsetNumber", "InConcatenationNumber", "InConcatenationTotalNumber")
}


@pytest.fixture()
def source_dir(tmp_path: Path) -> Path:
    """A miniature corpus in the shared format: 2 X-rays of one patient, MRI, OCT, EEG."""
    src = tmp_path / "src"
    rng = np.random.default_rng(3)
    rows = []
    for modality, label, split, name, patient in (
        ("xray", "normal", "test", "xray/normal/a.jpg", "P1"),
        ("xray", "viral", "test", "xray/viral/b.jpg", "P1"),
        ("xray", "normal", "train", "xray/normal/c.jpg", "P2"),
        ("mri", "glioma", "test", "mri/glioma/d.jpg", ""),
        ("oct", "cnv", "test", "oct/cnv/e.jpg", ""),
        ("eeg", "seizure", "test", "eeg/seizure/S001.txt", ""),
    ):
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if modality == "eeg":
            np.savetxt(path, rng.integers(-1500, 1500, 4097), fmt="%d")
        else:
            shape = (120, 200) if modality == "oct" else (64, 64)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path, quality=90)
        rows.append(dict(zip(FIELDS, (name, modality, label, split, "unit-test", patient, "0"), strict=True)))
    with open(src / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return src


def read_sidecar(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_objects_per_modality_and_round_trip(source_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _, counts = dicomize.dicomize(source_dir, out, seed="s1")
    assert dict(counts) == {"xray": 3, "mri": 1, "oct": 1, "eeg": 1}
    rows = read_sidecar(out)
    assert [r["file"] for r in rows][:1] == ["xray/normal/a.dcm"]
    expected_sop = {
        "xray": "1.2.840.10008.5.1.4.1.1.1",
        "mri": "1.2.840.10008.5.1.4.1.1.4",
        "oct": "1.2.840.10008.5.1.4.1.1.77.1.5.4",
        "eeg": "1.2.840.10008.5.1.4.1.1.9.7.1",
    }
    for row in rows:
        path = out / row["file"]
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == expected_sop[row["modality"]] == row["sop_class_uid"]
        assert ds.SOPInstanceUID == row["sop_instance_uid"]
        assert row["label"] not in str(ds)  # labels live in the sidecar only
        header, frames = decode_for_embedding(path)
        assert header.modality == row["modality"] and header.sop_instance_uid == row["sop_instance_uid"]
        assert len(frames) == 1 and frames[0].image.dtype == np.float32
        if row["modality"] == "eeg":
            samples_uv, sampling_hz = read_eeg_waveform(path)
            np.testing.assert_array_equal(samples_uv, np.loadtxt(source_dir / row["source_path"]))
            assert sampling_hz == pytest.approx(173.61)
            group = ds.WaveformSequence[0]
            assert group.WaveformSampleInterpretation == "SS" and group.NumberOfWaveformChannels == 1
            unit = group.ChannelDefinitionSequence[0].ChannelSensitivityUnitsSequence[0]
            assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("uV", "UCUM")
        else:
            source = np.asarray(Image.open(source_dir / row["source_path"]).convert("L"))
            np.testing.assert_array_equal(ds.pixel_array, source)
            assert ds.LossyImageCompression == "01"


def test_grouping_and_deterministic_uids(source_dir: Path, tmp_path: Path) -> None:
    dicomize.dicomize(source_dir, tmp_path / "a", seed=42)
    dicomize.dicomize(source_dir, tmp_path / "b", seed=42)
    dicomize.dicomize(source_dir, tmp_path / "c", seed=43)
    dicomize.dicomize(source_dir, tmp_path / "d")
    a, b, c, d = (read_sidecar(tmp_path / x) for x in "abcd")
    assert a == b
    assert {r["sop_instance_uid"] for r in a}.isdisjoint(r["sop_instance_uid"] for r in c)
    assert {r["sop_instance_uid"] for r in a}.isdisjoint(r["sop_instance_uid"] for r in d)
    same_file = "xray/normal/a.dcm"
    assert (tmp_path / "a" / same_file).read_bytes() == (tmp_path / "b" / same_file).read_bytes()
    by_file = {r["file"]: r for r in d}
    first, second = by_file["xray/normal/a.dcm"], by_file["xray/viral/b.dcm"]
    other = by_file["xray/normal/c.dcm"]
    assert first["patient_id"] == second["patient_id"] != other["patient_id"]
    assert first["study_instance_uid"] == second["study_instance_uid"] != other["study_instance_uid"]
    assert first["series_instance_uid"] == second["series_instance_uid"]
    numbers = [
        pydicom.dcmread(tmp_path / "d" / name).InstanceNumber
        for name in ("xray/normal/a.dcm", "xray/viral/b.dcm")
    ]
    assert numbers == [1, 2]
    assert len({r["patient_id"] for r in d}) == 5  # P1, P2, and one per file without a patient key


def test_selection_and_cli(source_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    from services.ops.cli import main

    assert (
        main(
            [
                "dicomize",
                str(source_dir),
                str(out),
                "--split",
                "test",
                "--modality",
                "xray",
                "--limit-per-class",
                "1",
                "--seed",
                "x",
            ]
        )
        == 0
    )
    assert sorted(r["file"] for r in read_sidecar(out)) == ["xray/normal/a.dcm", "xray/viral/b.dcm"]
    assert main(["dicomize"]) == 2
    completed = subprocess.run(
        [str(support.CBMIR), "dicomize", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0 and "--limit-per-class" in completed.stdout


def test_build_dataset_from_one_row(source_dir: Path, tmp_path: Path) -> None:
    row = {"path": "oct/cnv/e.jpg", "modality": "oct", "label": "cnv", "split": "test"}
    ds = dicomize.build_dataset(row, source_dir)
    path = write_dataset(ds, tmp_path / "one.dcm")
    assert read_header(path).modality == "oct" and read_header(path).number_of_frames == 1
    eeg_row = {"path": "eeg/seizure/S001.txt", "modality": "eeg"}
    first = dicomize.dicomize_row(eeg_row, source_dir, tmp_path / "eeg1.dcm", seed=5)
    second = dicomize.dicomize_row(eeg_row, source_dir, tmp_path / "eeg2.dcm", seed=5)
    assert first.read_bytes() == second.read_bytes()
    assert read_header(first).modality == "eeg"


def dciodvfy_lines(path: Path) -> tuple[list[str], list[str]]:
    completed = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False
    )  # dciodvfy exits non-zero on errors: they are parsed
    lines = [line.strip() for line in (completed.stdout + completed.stderr).splitlines()]
    return [x for x in lines if x.startswith("Error")], [x for x in lines if x.startswith("Warning")]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools (dciodvfy) not installed")
def test_dciodvfy_one_object_per_modality(source_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    dicomize.dicomize(source_dir, out, seed=1)
    report = {}
    for modality, name in (
        ("xray", "xray/normal/a.dcm"),
        ("mri", "mri/glioma/d.dcm"),
        ("oct", "oct/cnv/e.dcm"),
        ("eeg", "eeg/seizure/S001.dcm"),
    ):
        path = out / name
        errors, warnings = dciodvfy_lines(path)
        if modality == "eeg" and errors == ["Error - Information Object Not found"]:
            # dicom3tools 2022 predates the EEG IODs: check the shared waveform modules by
            # validating the same object as a General ECG waveform
            ds = pydicom.dcmread(path)
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.9.1.2"
            ds.Modality = "ECG"
            surrogate = tmp_path / "eeg-as-ecg.dcm"
            ds.save_as(surrogate, enforce_file_format=True)
            errors, warnings = dciodvfy_lines(surrogate)
        errors = [e for e in errors if e not in KNOWN_DCIODVFY_FALSE_POSITIVES]
        assert errors == [], f"{modality}: {errors}"
        report[modality] = warnings
    print("dciodvfy warnings:", report)


@pytest.mark.skipif(not (SHARED / "manifest.csv").exists(), reason="shared data absent")
def test_shared_corpus_sample_round_trip(tmp_path: Path) -> None:
    _, counts = dicomize.dicomize(SHARED, tmp_path, splits=["test"], limit_per_class=1, seed=0)
    assert set(counts) == {"xray", "mri", "oct", "eeg"}
    for row in read_sidecar(tmp_path):
        header, frames = decode_for_embedding(tmp_path / row["file"])
        assert header.modality == row["modality"] and len(frames) == 1
        assert re.fullmatch(r"[0-9.]+", header.sop_instance_uid)
