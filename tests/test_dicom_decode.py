"""services.dicom.decode: real corpora (WG04, pydicom test files, pydicom-data), display transforms on
hand-built datasets with known answers, multi-frame policy, EEG waveforms, and a fuzz test."""

from __future__ import annotations

import collections
import io
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from services.core.errors import CbmirError, DecodeError, TooLarge, UnreadableInput, UnsupportedInput
from services.dicom.decode import (
    DecodedFrame,
    DecodeLimits,
    InstanceHeader,
    decode_for_embedding,
    normalize_modality,
    read_eeg_waveform,
    read_header,
)

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("CBMIR_SHARED_DATA", REPO.parent / "shared" / "data"))
WG04 = SHARED / "dicom" / "wg04"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"
ROUTINE_EEG = "1.2.840.10008.5.1.4.1.1.9.7.1"


# --- helpers -------------------------------------------------------------------------------------


def dataset_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def base_dataset(sop_class: str = MR_IMAGE, modality: str = "MR") -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "SECRET-ID"
    ds.PatientBirthDate = "19700101"
    return ds


def image_dataset(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    frames: int | None = None,
    sop_class: str = MR_IMAGE,
    modality: str = "MR",
    planar: int | None = None,
    raw_bytes: bytes | None = None,
) -> Dataset:
    """Native little-endian image; ``pixels`` is (rows, cols), (rows, cols, 3) or with frames first."""
    ds = base_dataset(sop_class, modality)
    colour = photometric not in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR")
    shape = pixels.shape[1:] if frames else pixels.shape
    ds.Rows, ds.Columns = int(shape[0]), int(shape[1])
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    if colour:
        ds.PlanarConfiguration = 0 if planar is None else planar
    if frames:
        ds.NumberOfFrames = frames
    little_endian = pixels.astype(pixels.dtype.newbyteorder("<"))
    ds.PixelData = raw_bytes if raw_bytes is not None else little_endian.tobytes()
    return ds


def only_frame(ds_or_bytes, **kwargs) -> np.ndarray:
    _, frames = decode_for_embedding(ds_or_bytes, **kwargs)
    assert len(frames) == 1
    return frames[0].image


def check_frame(frame: DecodedFrame) -> None:
    image = frame.image
    assert isinstance(image, np.ndarray) and image.dtype == np.float32 and image.ndim == 2
    assert np.isfinite(image).all()
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert frame.frame_number >= 1


def zst_bytes(path: Path) -> bytes:
    """Decompress a .zst file with the zstandard package, else the zstd command line tool."""
    try:
        import zstandard

        with open(path, "rb") as handle:
            return zstandard.ZstdDecompressor().stream_reader(handle).read()
    except ImportError:
        pass
    if shutil.which("zstd") is None:
        pytest.skip("neither the zstandard package nor the zstd tool is available")
    return subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True).stdout


def wg04_source(path: Path):
    return zst_bytes(path) if path.suffix == ".zst" else path


def wg04_files() -> list:
    if not WG04.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"{WG04} absent"))]
    return [pytest.param(p, id=f"{p.parent.name}/{p.name}") for p in sorted(WG04.glob("*/*")) if p.is_file()]


def pydicom_test_files(own: bool) -> list[str]:
    from pydicom.data import get_testdata_files

    return sorted(f for f in get_testdata_files() if ("data_store" in f) != own)


def survey(files) -> tuple[collections.Counter, dict[str, str]]:
    """Decode every file; count outcomes; any non-cbmir exception fails the test."""
    counts: collections.Counter = collections.Counter()
    outcome: dict[str, str] = {}
    for name in files:
        try:
            _, frames = decode_for_embedding(name)
        except CbmirError as exc:
            key = f"{type(exc).__name__}:{exc.reason}"
        else:
            for frame in frames:
                check_frame(frame)
            key = "decoded"
        counts[key] += 1
        outcome[Path(name).name] = key
    return counts, outcome


# --- WG04 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", wg04_files())
def test_wg04_decodes_except_12bit_lossy_jpeg(path: Path) -> None:
    source = wg04_source(path)
    if path.parent.name == "JPLY":
        with pytest.raises(DecodeError) as info:
            decode_for_embedding(source)
        assert info.value.reason == "jpeg-12bit-lossy"
        assert "1.2.840.10008.1.2.4.51" in str(info.value) and "JPEG Extended" in str(info.value)
        return
    header, frames = decode_for_embedding(source)
    assert len(frames) == 1 and frames[0].frame_number == 1
    check_frame(frames[0])
    assert frames[0].image.shape == (header.rows, header.columns)
    assert frames[0].image.std() > 0.01, "decoded picture is flat"
    expected = {"CR": "xray", "RG": "xray", "MR": "mri"}.get(header.modality_code, "other")
    assert header.modality == expected


@pytest.mark.parametrize("encoding", ["J2KR", "JLSL", "JPLL", "RLE", "J2KI", "JLSN"])
def test_wg04_encodings_match_reference(encoding: str) -> None:
    if not (WG04 / "REF").is_dir():
        pytest.skip(f"{WG04} absent")
    compared = 0
    for ref in sorted((WG04 / "REF").glob("*_UNC.zst")):
        stem = ref.name.split("_")[0]
        other = WG04 / encoding / f"{stem}_{encoding}"
        if not other.exists():
            continue
        expected = only_frame(zst_bytes(ref))
        actual = only_frame(other)
        if encoding in ("J2KI", "JLSN"):  # lossy: same picture, small differences
            correlation = np.corrcoef(expected.ravel(), actual.ravel())[0, 1]
            assert correlation > 0.93, f"{other.name}: correlation {correlation:.3f}"
        else:
            np.testing.assert_allclose(actual, expected, atol=1e-6, err_msg=other.name)
        compared += 1
    assert compared >= 10


# --- pydicom's own test files and pydicom-data ---------------------------------------------------


def test_pydicom_test_files_decode_or_raise_cbmir_errors() -> None:
    counts, outcome = survey(pydicom_test_files(own=True))
    print("pydicom test files:", dict(counts))
    assert counts["decoded"] >= 80
    assert outcome["JPEG-lossy.dcm"] == "DecodeError:jpeg-12bit-lossy"
    assert outcome["test-SR.dcm"] == "UnsupportedInput:sr-document"
    assert outcome["rtplan.dcm"] == "UnsupportedInput:no-image"
    assert outcome["MR_truncated.dcm"] == "UnreadableInput:truncated"
    assert outcome["waveform_ecg.dcm"] == "UnsupportedInput:unsupported-waveform"
    assert outcome["no_meta.dcm"] == "UnreadableInput:not-dicom"
    assert outcome["CT_small.dcm"] == outcome["MR_small_RLE.dcm"] == "decoded"


def test_pydicom_files_without_study_uid_decode_once_completed() -> None:
    """Files stripped of their Study/Series UIDs are refused, but their pixels do decode."""
    refused = 0
    for name in pydicom_test_files(own=True):
        try:
            read_header(name)
        except UnreadableInput as exc:
            if exc.reason != "missing-uid":
                continue
        except CbmirError:
            continue
        else:
            continue
        refused += 1
        ds = pydicom.dcmread(name, force=True)
        for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            if not ds.get(keyword):
                setattr(ds, keyword, SC_IMAGE if keyword == "SOPClassUID" else generate_uid())
        try:
            _, frames = decode_for_embedding(ds)
        except CbmirError:
            continue
        for frame in frames:
            check_frame(frame)
    assert refused >= 5


def test_pydicom_data_files_decode_or_raise_cbmir_errors() -> None:
    pytest.importorskip("data_store", reason="pydicom-data not installed")
    counts, outcome = survey(pydicom_test_files(own=False))
    print("pydicom-data files:", dict(counts))
    assert counts["decoded"] >= 60
    for name in (
        "RG1_UNCI.dcm",
        "emri_small.dcm",
        "color3d_jpeg_baseline.dcm",
        "US1_J2KR.dcm",
        "emri_small_RLE.dcm",
        "OBXXXX1A_rle.dcm",
        "vlut_04.dcm",
        "mlut_18.dcm",
    ):
        assert outcome[name] == "decoded", name


def test_pydicom_data_monochrome1_chest_is_inverted() -> None:
    pytest.importorskip("data_store", reason="pydicom-data not installed")
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCI.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    image = only_frame(path)
    as_mono2 = ds.copy()
    as_mono2.PhotometricInterpretation = "MONOCHROME2"
    np.testing.assert_allclose(image, 1.0 - only_frame(as_mono2), atol=1e-6)
    assert read_header(path).modality == "xray"


def test_pydicom_data_multiframe_policy() -> None:
    pytest.importorskip("data_store", reason="pydicom-data not installed")
    from pydicom.data import get_testdata_file

    enhanced_mr = get_testdata_file("emri_small.dcm")
    header, middle = decode_for_embedding(enhanced_mr)
    assert header.sop_class_uid == ENHANCED_MR and header.modality == "mri"
    assert header.number_of_frames == 10 and [f.frame_number for f in middle] == [5]
    _, every = decode_for_embedding(enhanced_mr, frames="all")
    assert [f.frame_number for f in every] == list(range(1, 11))
    np.testing.assert_array_equal(every[4].image, middle[0].image)

    cine = get_testdata_file("color3d_jpeg_baseline.dcm")  # US, 120 colour frames, JPEG baseline
    header, frames = decode_for_embedding(cine)
    assert header.number_of_frames == 120 and frames[0].frame_number == 60
    check_frame(frames[0])


# --- display transforms with known answers -------------------------------------------------------


def test_rescale_then_window_linear() -> None:
    stored = np.array([[0, 50], [100, 150]], dtype=np.uint16)
    ds = image_dataset(stored)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100  # values -100, 0, 100, 200
    ds.WindowCenter, ds.WindowWidth = [50, 999], [201, 1]  # first window wins
    # linear: ((x - (c - 0.5)) / (w - 1) + 0.5), clipped
    expected = np.clip((np.array([[-100, 0], [100, 200]]) - 49.5) / 200 + 0.5, 0, 1)
    np.testing.assert_allclose(only_frame(ds), expected, atol=1e-6)


def test_window_linear_exact_and_sigmoid() -> None:
    stored = np.array([[0, 100], [200, 300]], dtype=np.int16)
    ds = image_dataset(stored)
    ds.WindowCenter, ds.WindowWidth = 150, 200
    ds.VOILUTFunction = "LINEAR_EXACT"
    np.testing.assert_allclose(only_frame(ds), [[0, 0.25], [0.75, 1.0]], atol=1e-6)
    ds.VOILUTFunction = "SIGMOID"
    expected = 1 / (1 + np.exp(-4 * (stored.astype(float) - 150) / 200))
    np.testing.assert_allclose(only_frame(ds), expected, atol=1e-6)


def test_no_window_is_min_max_and_signed_pixels() -> None:
    stored = np.array([[-1000, 0], [1000, 3000]], dtype=np.int16)
    np.testing.assert_allclose(only_frame(image_dataset(stored)), [[0, 0.25], [0.5, 1.0]], atol=1e-6)
    flat = image_dataset(np.full((4, 4), 7, dtype=np.uint8))
    assert only_frame(flat).max() == 0.0


def test_voi_lut_sequence() -> None:
    ds = image_dataset(np.array([[0, 1], [2, 3]], dtype=np.uint8))
    item = Dataset()
    item.LUTDescriptor = [4, 0, 8]
    item.LUTData = [0, 51, 102, 255]
    ds.VOILUTSequence = [item]
    ds.WindowCenter, ds.WindowWidth = 1, 1  # the LUT wins over the window
    np.testing.assert_allclose(only_frame(ds), [[0, 0.2], [0.4, 1.0]], atol=1e-6)


def test_monochrome1_is_inverted() -> None:
    stored = np.array([[0, 64], [128, 255]], dtype=np.uint8)
    mono2 = only_frame(image_dataset(stored))
    mono1 = only_frame(image_dataset(stored, photometric="MONOCHROME1"))
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)
    assert mono1[0, 0] == 1.0 and mono1[1, 1] == 0.0


RGB = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 255]]], dtype=np.uint8)
LUMA = (RGB.astype(float) @ np.array([0.299, 0.587, 0.114])) / 255


def test_rgb_luminance_pixel_and_planar_interleaved() -> None:
    np.testing.assert_allclose(only_frame(image_dataset(RGB, photometric="RGB")), LUMA, atol=1e-6)
    planar_bytes = RGB.transpose(2, 0, 1).tobytes()  # RRRR GGGG BBBB
    planar = image_dataset(RGB, photometric="RGB", planar=1, raw_bytes=planar_bytes)
    np.testing.assert_allclose(only_frame(planar), LUMA, atol=1e-6)


def test_ybr_full_is_converted() -> None:
    from pydicom.pixels import convert_color_space

    ybr = convert_color_space(RGB, "RGB", "YBR_FULL")
    ds = image_dataset(ybr, photometric="YBR_FULL")
    np.testing.assert_allclose(only_frame(ds), LUMA, atol=2 / 255)  # 8-bit rounding of Cb/Cr


def test_palette_colour() -> None:
    ds = image_dataset(np.array([[0, 1], [2, 3]], dtype=np.uint8), photometric="PALETTE COLOR")
    red, green, blue = [0, 65535, 0, 0], [0, 0, 65535, 0], [0, 0, 0, 65535]
    for colour, values in (("Red", red), ("Green", green), ("Blue", blue)):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [4, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", np.array(values, "<u2").tobytes())
    np.testing.assert_allclose(only_frame(ds), [[0, 0.299], [0.587, 0.114]], atol=1e-6)


def test_multiframe_middle_and_all() -> None:
    stack = np.stack([np.full((3, 4), 10 * (k + 1), dtype=np.uint16) for k in range(5)])
    ds = image_dataset(stack, frames=5)
    ds.WindowCenter, ds.WindowWidth = 30.5, 60  # frame k -> (10k - 0.5)/59 + 0.5 ... absolute
    header, middle = decode_for_embedding(ds)
    assert header.number_of_frames == 5 and [f.frame_number for f in middle] == [3]
    _, every = decode_for_embedding(ds, frames="all")
    assert [f.frame_number for f in every] == [1, 2, 3, 4, 5]
    means = [float(f.image.mean()) for f in every]
    assert means == sorted(means) and len(set(means)) == 5
    np.testing.assert_array_equal(every[2].image, middle[0].image)
    two = image_dataset(stack[:2], frames=2)
    assert decode_for_embedding(two)[1][0].frame_number == 1


def test_enhanced_per_frame_rescale_and_window() -> None:
    stack = np.stack([np.arange(4, dtype=np.uint16).reshape(2, 2)] * 2)
    ds = image_dataset(stack, frames=2, sop_class=ENHANCED_MR)
    shared, first, second = Dataset(), Dataset(), Dataset()
    voi = Dataset()
    voi.WindowCenter, voi.WindowWidth = 100.5, 101
    shared.FrameVOILUTSequence = [voi]
    for item, slope in ((first, 1), (second, 100)):
        transform = Dataset()
        transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = slope, 0, "US"
        item.PixelValueTransformationSequence = [transform]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = [first, second]
    _, frames = decode_for_embedding(ds, frames="all")
    expected = [np.clip((np.arange(4).reshape(2, 2) * s - 100) / 100 + 0.5, 0, 1) for s in (1, 100)]
    np.testing.assert_allclose(frames[0].image, expected[0], atol=1e-6)
    np.testing.assert_allclose(frames[1].image, expected[1], atol=1e-6)


# --- header, modality, limits, errors ------------------------------------------------------------


def test_header_has_no_patient_data_and_reads_without_pixels(tmp_path: Path) -> None:
    ds = image_dataset(np.zeros((4, 6), dtype=np.uint8), sop_class="1.2.840.10008.5.1.4.1.1.1", modality="CR")
    path = tmp_path / "cr.dcm"
    ds.save_as(path, enforce_file_format=True)
    for source in (path, str(path), path.read_bytes(), ds):
        header = read_header(source)
        assert header == InstanceHeader(
            sop_instance_uid=ds.SOPInstanceUID,
            sop_class_uid=ds.SOPClassUID,
            study_instance_uid=ds.StudyInstanceUID,
            series_instance_uid=ds.SeriesInstanceUID,
            modality_code="CR",
            modality="xray",
            number_of_frames=1,
            rows=4,
            columns=6,
            transfer_syntax_uid=ExplicitVRLittleEndian,
        )
        assert "Jane" not in repr(header) and "SECRET" not in repr(header) and "1970" not in repr(header)
    from_network = pydicom.dcmread(path)
    del from_network.file_meta  # as a C-STORE dataset may arrive: no File Meta
    assert read_header(from_network).transfer_syntax_uid == ExplicitVRLittleEndian
    assert only_frame(from_network).shape == (4, 6)
    truncated = path.read_bytes()[:-20]  # pixel data cut: the header is still readable
    assert read_header(truncated).rows == 4
    with pytest.raises(UnreadableInput):
        decode_for_embedding(truncated)


@pytest.mark.parametrize(
    "code, sop, expected",
    [
        ("CR", "", "xray"),
        ("DX", "", "xray"),
        ("RG", "", "xray"),
        ("", "1.2.840.10008.5.1.4.1.1.1.1", "xray"),
        ("OT", "1.2.840.10008.5.1.4.1.1.1", "xray"),
        ("MR", "", "mri"),
        ("", ENHANCED_MR, "mri"),
        ("OPT", "", "oct"),
        ("", "1.2.840.10008.5.1.4.1.1.77.1.5.4", "oct"),
        ("EEG", "", "eeg"),
        ("", ROUTINE_EEG, "eeg"),
        ("", "1.2.840.10008.5.1.4.1.1.9.7.4", "eeg"),
        ("CT", "1.2.840.10008.5.1.4.1.1.2", "other"),
        ("US", "", "other"),
        ("MG", "", "other"),
        (None, None, "other"),
        ("mr", "", "mri"),
    ],
)
def test_normalize_modality(code, sop, expected) -> None:
    assert normalize_modality(code, sop) == expected


def test_missing_sop_instance_uid() -> None:
    ds = image_dataset(np.zeros((2, 2), dtype=np.uint8))
    del ds.SOPInstanceUID
    ds.file_meta.MediaStorageSOPInstanceUID = ""
    with pytest.raises(UnreadableInput, match="SOPInstanceUID"):
        read_header(ds)


def test_limits() -> None:
    ds = image_dataset(np.zeros((20, 30), dtype=np.uint8))
    with pytest.raises(TooLarge):
        decode_for_embedding(ds, limits=DecodeLimits(max_rows=10))
    with pytest.raises(TooLarge):
        decode_for_embedding(ds, limits=DecodeLimits(max_columns=10))
    with pytest.raises(TooLarge):
        decode_for_embedding(ds, limits=DecodeLimits(max_pixels=100))
    stack = image_dataset(np.zeros((4, 20, 30), dtype=np.uint8), frames=4)
    decode_for_embedding(stack, limits=DecodeLimits(max_pixels=600))  # one frame decoded
    with pytest.raises(TooLarge):
        decode_for_embedding(stack, frames="all", limits=DecodeLimits(max_pixels=600))
    with pytest.raises(TooLarge):
        decode_for_embedding(stack, limits=DecodeLimits(max_frames=3))


def test_unreadable_inputs() -> None:
    with pytest.raises(UnreadableInput, match="empty"):
        decode_for_embedding(b"")
    with pytest.raises(UnreadableInput, match="not a DICOM"):
        decode_for_embedding(b"\x89PNG" + bytes(200))
    no_pixels = image_dataset(np.zeros((2, 2), dtype=np.uint8))
    del no_pixels.PixelData
    with pytest.raises(UnreadableInput, match="Pixel Data"):
        decode_for_embedding(dataset_bytes(no_pixels))


def test_sr_document_is_unsupported() -> None:
    ds = base_dataset("1.2.840.10008.5.1.4.1.1.88.33", "SR")
    with pytest.raises(UnsupportedInput, match="structured report"):
        decode_for_embedding(dataset_bytes(ds))


# --- EEG waveforms -------------------------------------------------------------------------------


def eeg_dataset(
    channels: np.ndarray,
    *,
    sampling_hz: float = 173.61,
    sensitivity: float = 0.5,
    correction: float = 1.0,
    baseline: float = 10.0,
    unit: str = "uV",
) -> Dataset:
    """Routine Scalp EEG with ``channels`` (n_channels, n_samples) int16 stored values."""
    ds = base_dataset(ROUTINE_EEG, "EEG")
    group = Dataset()
    group.MultiplexGroupTimeOffset = 0
    group.WaveformOriginality = "ORIGINAL"
    group.NumberOfWaveformChannels = channels.shape[0]
    group.NumberOfWaveformSamples = channels.shape[1]
    group.SamplingFrequency = sampling_hz
    definitions = []
    for _ in range(channels.shape[0]):
        definition = Dataset()
        definition.ChannelSensitivity = sensitivity
        definition.ChannelSensitivityCorrectionFactor = correction
        definition.ChannelBaseline = baseline
        units = Dataset()
        units.CodeValue, units.CodingSchemeDesignator, units.CodeMeaning = unit, "UCUM", unit
        definition.ChannelSensitivityUnitsSequence = [units]
        definition.WaveformBitsStored = 16
        definitions.append(definition)
    group.ChannelDefinitionSequence = definitions
    group.WaveformBitsAllocated = 16
    group.WaveformSampleInterpretation = "SS"
    group.WaveformData = channels.T.astype("<i2").tobytes()  # interleaved by sample
    ds.WaveformSequence = [group]
    return ds


def test_eeg_waveform_round_trip() -> None:
    rng = np.random.default_rng(0)
    stored = rng.integers(-2000, 2000, size=(2, 4097)).astype(np.int16)
    ds = eeg_dataset(stored, sensitivity=0.5, correction=2.0, baseline=10.0)
    for source in (ds, dataset_bytes(ds)):
        samples_uv, sampling_hz = read_eeg_waveform(source)
        assert sampling_hz == pytest.approx(173.61)
        np.testing.assert_allclose(samples_uv, stored[0] * 0.5 * 2.0 + 10.0)
    millivolt = eeg_dataset(stored, sensitivity=0.001, correction=1.0, baseline=0.0, unit="mV")
    np.testing.assert_allclose(read_eeg_waveform(millivolt)[0], stored[0].astype(float), atol=1e-9)
    assert read_header(ds).modality == "eeg" and read_header(ds).rows == 0

    eeg = pytest.importorskip("models.eeg", reason="models/eeg.py not there yet")
    header, frames = decode_for_embedding(dataset_bytes(ds))
    assert header.modality == "eeg" and [f.frame_number for f in frames] == [1]
    check_frame(frames[0])
    expected = eeg.render_eeg_trace(stored[0] * 1.0 + 10.0, 173.61).astype(np.float32) / 255
    np.testing.assert_array_equal(frames[0].image, expected)
    # the render the encoder's contract names is the one drawn
    _, spectro = decode_for_embedding(dataset_bytes(ds), eeg_render=eeg.TRACE_SPECTROGRAM)
    expected = eeg.render_eeg(stored[0] * 1.0 + 10.0, 173.61, eeg.TRACE_SPECTROGRAM).astype(np.float32) / 255
    np.testing.assert_array_equal(spectro[0].image, expected)
    assert not np.array_equal(spectro[0].image, frames[0].image)
    with pytest.raises(CbmirError):
        decode_for_embedding(dataset_bytes(ds), eeg_render="waterfall")


def test_non_eeg_waveform_and_broken_eeg() -> None:
    ecg = eeg_dataset(np.zeros((1, 10), dtype=np.int16))
    ecg.SOPClassUID = ecg.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.9.1.1"
    ecg.Modality = "ECG"
    with pytest.raises(UnsupportedInput):
        decode_for_embedding(ecg)
    short = eeg_dataset(np.zeros((2, 100), dtype=np.int16))
    short.WaveformSequence[0].WaveformData = short.WaveformSequence[0].WaveformData[:50]
    with pytest.raises(UnreadableInput, match="Waveform Data"):
        read_eeg_waveform(short)
    empty = eeg_dataset(np.zeros((1, 10), dtype=np.int16))
    del empty.WaveformSequence
    with pytest.raises(UnreadableInput):
        decode_for_embedding(empty)


# --- fuzz ----------------------------------------------------------------------------------------


def fuzz_seeds() -> list[bytes]:
    from pydicom.data import get_testdata_file

    seeds = []
    for name in (
        "CT_small.dcm",
        "MR_small_RLE.dcm",
        "JPEG2000.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
        "emri_small_jpeg_ls_lossless.dcm",
        "OBXXXX1A_rle.dcm",
    ):
        path = get_testdata_file(name)
        if path:
            seeds.append(Path(path).read_bytes())
    rng = np.random.default_rng(1)
    seeds.append(dataset_bytes(eeg_dataset(rng.integers(-500, 500, (2, 400)).astype(np.int16))))
    return seeds


SEEDS = fuzz_seeds()


@st.composite
def mutated_dicom(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "flip-header", "insert", "delete", "truncate"]))
        # most structure sits in the first ~1 kB: bias half of the edits there
        limit = min(len(data), 1200) if kind == "flip-header" else len(data)
        if limit <= 1:
            break
        position = draw(st.integers(0, limit - 1))
        if kind.startswith("flip"):
            data[position] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[position : position + draw(st.integers(1, 16))]
        else:
            del data[position:]
    return bytes(data)


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_dicom(), st.sampled_from(["middle", "all"]))
def test_fuzz_only_cbmir_errors_escape(data: bytes, frames: str) -> None:
    limits = DecodeLimits(max_rows=4096, max_columns=4096, max_frames=64, max_pixels=20_000_000)
    try:
        header, decoded = decode_for_embedding(data, frames=frames, limits=limits)
    except CbmirError:
        return
    assert isinstance(header, InstanceHeader)
    for frame in decoded:
        check_frame(frame)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=20000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_dicom(), st.sampled_from(["middle", "all"]))
def test_fuzz_only_cbmir_errors_escape_long(data: bytes, frames: str) -> None:
    test_fuzz_only_cbmir_errors_escape.hypothesis.inner_test(data, frames)
