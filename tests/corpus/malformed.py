"""Write a corpus of malformed and unsupported DICOM files, with the cbmir error each must raise.

``python tests/corpus/malformed.py OUT_DIR [--max-rows N]`` (or :func:`generate`) writes one file
per case plus ``index.json``: ``{"limits": {...}, "cases": [{"file", "expected_error",
"expected_reason", "description"}]}``. ``expected_error`` is a class name from
``services.core.errors``; the decoder is called with the ``limits`` recorded in the index. Everything
is built from scratch (no shared data, no PHI): synthetic UIDs, a synthetic patient.
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import sys
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
RT_PLAN = "1.2.840.10008.5.1.4.1.1.481.5"
ROUTINE_SCALP_EEG = "1.2.840.10008.5.1.4.1.1.9.7.1"
DEFAULT_LIMITS = {"max_rows": 4096, "max_columns": 4096, "max_frames": 500, "max_pixels": 50_000_000}


def _dataset(sop_class: str, modality: str, transfer_syntax: str = ExplicitVRLittleEndian) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientName = "Synthetic^Malformed"
    ds.PatientID = "MALFORMED-0"
    return ds


def _image(
    rows: int = 64,
    columns: int = 64,
    frames: int | None = None,
    sop_class: str = MR_IMAGE,
    modality: str = "MR",
) -> Dataset:
    ds = _dataset(sop_class, modality)
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    count = frames or 1
    if frames:
        ds.NumberOfFrames = frames
    ramp = (np.arange(rows * columns * count) % 4096).astype("<u2")
    ds.PixelData = ramp.tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def _encode(ds: Dataset, *, conformant_meta: bool = True) -> bytes:
    """Part 10 bytes; ``conformant_meta=False`` writes the File Meta as it is (even if incomplete)."""
    buffer = io.BytesIO()
    if not conformant_meta:
        ds.preamble = b"\x00" * 128
    ds.save_as(buffer, enforce_file_format=conformant_meta)
    return buffer.getvalue()


def _raw_dataset(ds: Dataset) -> bytes:
    """The dataset alone, implicit VR little endian: no preamble, no 'DICM', no File Meta."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buffer = DicomBytesIO()
    buffer.is_implicit_VR, buffer.is_little_endian = True, True
    del ds.file_meta
    write_dataset(buffer, ds)
    return buffer.getvalue()


def _with_wrong_vr(ds: Dataset) -> bytes:
    """Rows (0028,0010) re-encoded as UN with a 3-byte value: no whole US value can be read."""
    data = _encode(ds)
    rows_tag = struct.pack("<HH", 0x0028, 0x0010)
    start = data.index(rows_tag + b"US")
    original = rows_tag + b"US" + struct.pack("<H", 2) + struct.pack("<H", ds.Rows)
    assert data[start : start + len(original)] == original
    replacement = rows_tag + b"UN" + b"\x00\x00" + struct.pack("<I", 3) + b"abc"
    return data[:start] + replacement + data[start + len(original) :]


def _sr_document() -> Dataset:
    ds = _dataset(COMPREHENSIVE_SR, "SR")
    ds.ValueType = "CONTAINER"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator = "18748-4", "LN"
    concept.CodeMeaning = "Diagnostic Imaging Report"
    ds.ConceptNameCodeSequence = [concept]
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    return ds


def _rt_plan() -> Dataset:
    ds = _dataset(RT_PLAN, "RTPLAN")
    ds.RTPlanLabel = "PLAN"
    ds.RTPlanGeometry = "PATIENT"
    return ds


def _rle_garbage() -> Dataset:
    ds = _image(32, 32)
    ds.file_meta.TransferSyntaxUID = RLELossless
    from pydicom.encaps import encapsulate

    header = struct.pack("<16I", 2, 64, 64 + 8, *([0] * 13))
    ds.PixelData = encapsulate([header + b"\x7f" * 8 + b"\x85" * 8])
    ds["PixelData"].VR = "OB"
    return ds


def _eeg_without_waveform() -> Dataset:
    return _dataset(ROUTINE_SCALP_EEG, "EEG")


def cases(limits: dict[str, int]) -> list[tuple[str, bytes, str, str, str]]:
    """(file name, bytes, expected error class, expected reason, description)."""
    good = _encode(_image())
    no_pixels = _image()
    del no_pixels.PixelData
    no_uid = _image()
    del no_uid.SOPInstanceUID
    no_uid.file_meta.MediaStorageSOPInstanceUID = ""
    too_tall = _image(rows=limits["max_rows"] + 1, columns=1)
    too_many_frames = _image(4, 4, frames=limits["max_frames"] + 1)
    return [
        ("zero_bytes.dcm", b"", "UnreadableInput", "empty", "empty file"),
        (
            "truncated_in_pixel_data.dcm",
            good[: len(good) - 3000],
            "UnreadableInput",
            "truncated",
            "file cut inside the native Pixel Data",
        ),
        (
            "truncated_in_meta.dcm",
            good[:150],
            "UnreadableInput",
            "missing-uid",
            "file cut inside the File Meta Information",
        ),
        (
            "truncated_before_dicm.dcm",
            good[:100],
            "UnreadableInput",
            "not-dicom",
            "file cut inside the preamble",
        ),
        (
            "no_preamble_no_meta.dcm",
            _raw_dataset(_image()),
            "UnreadableInput",
            "not-dicom",
            "bare implicit-VR dataset without preamble, 'DICM' or File Meta",
        ),
        (
            "not_dicom.png",
            b"\x89PNG\r\n\x1a\n" + bytes(400),
            "UnreadableInput",
            "not-dicom",
            "a PNG signature, not DICOM",
        ),
        (
            "wrong_vr_rows.dcm",
            _with_wrong_vr(_image()),
            "UnreadableInput",
            "parse-error",
            "Rows (0028,0010) encoded as UN with a 3-byte text value",
        ),
        (
            "missing_pixel_data.dcm",
            _encode(no_pixels),
            "UnreadableInput",
            "missing-pixel-data",
            "MR Image Storage without Pixel Data",
        ),
        (
            "missing_sop_instance_uid.dcm",
            _encode(no_uid, conformant_meta=False),
            "UnreadableInput",
            "missing-uid",
            "no SOP Instance UID anywhere",
        ),
        (
            "rows_over_limit.dcm",
            _encode(too_tall),
            "TooLarge",
            "too-many-pixels",
            f"Rows {limits['max_rows'] + 1} > max_rows {limits['max_rows']}",
        ),
        (
            "frames_over_limit.dcm",
            _encode(too_many_frames),
            "TooLarge",
            "too-many-frames",
            f"{limits['max_frames'] + 1} frames > max_frames {limits['max_frames']}",
        ),
        (
            "sr_document.dcm",
            _encode(_sr_document()),
            "UnsupportedInput",
            "sr-document",
            "Comprehensive SR document",
        ),
        (
            "rt_plan.dcm",
            _encode(_rt_plan()),
            "UnsupportedInput",
            "no-image",
            "RT Plan: a SOP class without pixels or waveform",
        ),
        (
            "rle_corrupt_segments.dcm",
            _encode(_rle_garbage()),
            "DecodeError",
            "corrupt-pixel-data",
            "RLE Lossless with segment offsets pointing past the data",
        ),
        (
            "eeg_without_waveform.dcm",
            _encode(_eeg_without_waveform()),
            "UnreadableInput",
            "missing-waveform",
            "Routine Scalp EEG without a Waveform Sequence",
        ),
    ]


def generate(out_dir: str | Path, limits: dict[str, int] | None = None) -> Path:
    """Write the corpus and ``index.json`` into ``out_dir``; returns the index path."""
    limits = {**DEFAULT_LIMITS, **(limits or {})}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = {"limits": limits, "cases": []}
    for name, data, error, reason, description in cases(limits):
        (out_dir / name).write_bytes(data)
        index["cases"].append(
            {"file": name, "expected_error": error, "expected_reason": reason, "description": description}
        )
    path = out_dir / "index.json"
    path.write_text(json.dumps(index, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--max-rows", type=int, default=DEFAULT_LIMITS["max_rows"])
    parser.add_argument("--max-frames", type=int, default=DEFAULT_LIMITS["max_frames"])
    args = parser.parse_args(argv)
    index = generate(args.out_dir, {"max_rows": args.max_rows, "max_frames": args.max_frames})
    print(f"wrote {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
