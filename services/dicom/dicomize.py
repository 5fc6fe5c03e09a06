"""``cbmir dicomize SRC OUT``: turn the shared corpus into the DICOM a modality would send.

SRC is a folder with a ``manifest.csv`` in the shared format (``path, modality, label, split,
source, patient, sha256``); it defaults to the shared data folder (``CBMIR_SHARED_DATA``, else
``<repo>/../shared/data``). Per manifest modality:

* ``xray`` -> Computed Radiography Image Storage (Modality CR, chest, 8-bit MONOCHROME2);
* ``mri``  -> MR Image Storage (Modality MR, 16-bit MONOCHROME2, nominal axial geometry);
* ``oct``  -> Ophthalmic Tomography Image Storage (Modality OPT, one B-scan as a 1-frame
  enhanced multi-frame object with its functional groups);
* ``eeg``  -> Routine Scalp EEG Waveform Storage: one multiplex group, one channel, 173.61 Hz,
  samples as SS with a Channel Sensitivity of 1 µV (UCUM ``uV``), correction factor 1, baseline 0.

The source images are lossy JPEGs, so every image says ``LossyImageCompression = 01`` and
``ImageType = DERIVED\\SECONDARY``. What the sources do not record is written as a fixed,
documented nominal value: 1 mm pixel spacing and an axial plane for MR, right eye for OCT, and
lead Cz (MDC 7:1016) for the EEG channel. Patients are synthetic: one per manifest ``patient``
key, else one per file; one study per patient and modality, one series per study. UIDs come from
pydicom ``generate_uid``; with ``--seed`` they (and the dates) are derived from the seed and
the source path, so the same source gives the same UIDs. Labels never go into the DICOM:
``OUT/manifest.csv`` maps each written file to its SOP Instance UID, modality, label and split.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from models.data import shared_data_dir
from services.core.errors import CbmirError, InvalidInput, UnreadableInput
from services.core.vocabulary import (
    CR_IMAGE,
    DICOM_MODALITY_CODES,
    EEG,
    MR_IMAGE,
    MRI,
    OCT,
    OPHTHALMIC_TOMOGRAPHY_IMAGE,
    ROUTINE_SCALP_EEG,
    TRAINED_MODALITIES,
    XRAY,
)
from services.dicom.build import (
    InstanceIdentity,
    base_dataset,
    coded_entry,
    eeg_waveform_group,
    write_dataset,
)

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
BONN_SAMPLING_HZ = 173.61
SIDECAR_FIELDS = (
    "file",
    "sop_instance_uid",
    "sop_class_uid",
    "study_instance_uid",
    "series_instance_uid",
    "patient_id",
    "modality",
    "label",
    "split",
    "source",
    "source_path",
)


# --- identity: UIDs, synthetic patients, dates ---------------------------------------------------


class UidFactory:
    """Study/series/instance UIDs and dates; deterministic per key when ``seed`` is given."""

    def __init__(self, seed: str | int | None = None):
        self.seed = None if seed is None else str(seed)
        self._cache: dict[tuple[str, ...], str] = {}
        self._now = dt.datetime.now().replace(microsecond=0)

    def uid(self, *key: str) -> str:
        """The UID for ``key``: derived from the seed, else new and remembered for this run."""
        from pydicom.uid import generate_uid

        if self.seed is not None:
            return generate_uid(entropy_srcs=["cbmir-dicomize", self.seed, *key])
        if key not in self._cache:
            self._cache[key] = generate_uid()
        return self._cache[key]

    def when(self, *key: str) -> dt.datetime:
        """Acquisition time for ``key``: fixed from the seed, else now."""
        if self.seed is None:
            return self._now
        digest = int(hashlib.sha256("|".join(("when", self.seed, *key)).encode()).hexdigest(), 16)
        return dt.datetime(2020, 1, 1) + dt.timedelta(days=digest % 1500, seconds=(digest >> 16) % 86400)

    def patient_id(self, patient_key: str) -> str:
        """A synthetic Patient ID for a manifest patient key (never the key itself)."""
        salt = self.seed if self.seed is not None else self.uid("patient-salt")
        return "CBMIR-" + hashlib.sha256(f"{salt}|{patient_key}".encode()).hexdigest()[:12].upper()


def _identity(row: Mapping[str, str], uids: UidFactory, instance_number: int) -> InstanceIdentity:
    modality = row["modality"]
    patient_key = row.get("patient") or f"file:{row['path']}"
    study_key = ("study", patient_key, modality)
    return InstanceIdentity(
        patient_id=uids.patient_id(patient_key),
        study_uid=uids.uid(*study_key),
        series_uid=uids.uid("series", patient_key, modality),
        instance_uid=uids.uid("instance", row["path"]),
        frame_of_reference_uid=uids.uid("frame-of-reference", patient_key, modality),
        study_time=uids.when(*study_key),
        instance_number=instance_number,
    )


# --- common modules ------------------------------------------------------------------------------


def _lossy_greyscale_image(ds: Dataset, pixels: np.ndarray, bits: int, src: Path) -> None:
    """Image Pixel + lossy compression history for a MONOCHROME2 picture from a JPEG."""
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = "converted from a lossy JPEG of a public data set"
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.LossyImageCompressionRatio = _compression_ratio(src, pixels)
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    dtype = "<u1" if bits == 8 else "<u2"
    ds.PixelData = np.ascontiguousarray(pixels, dtype=dtype).tobytes()
    if bits == 16:
        ds["PixelData"].VR = "OW"


def _load_greyscale(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as picture:
            return np.asarray(picture.convert("L"), dtype=np.uint8)
    except FileNotFoundError:
        raise UnreadableInput(f"source image missing: {path}", reason="no-such-file") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise UnreadableInput(
            f"source image unreadable: {path} ({type(exc).__name__})", reason="not-an-image"
        ) from None


def _compression_ratio(src: Path, pixels: np.ndarray) -> float:
    """Uncompressed size over the source JPEG's size (what the lossy step achieved)."""
    try:
        return round(pixels.size / max(src.stat().st_size, 1), 2)  # 8-bit source samples
    except OSError:
        return 1.0


def _load_bonn(path: Path) -> np.ndarray:
    try:
        samples = np.loadtxt(path, dtype=np.float64, ndmin=1)
    except FileNotFoundError:
        raise UnreadableInput(f"source signal missing: {path}", reason="no-such-file") from None
    except ValueError as exc:
        raise UnreadableInput(
            f"not a one-sample-per-line signal file: {path} ({exc})", reason="not-a-signal"
        ) from None
    if samples.ndim != 1 or samples.size == 0 or not np.isfinite(samples).all():
        raise UnreadableInput(f"expected one finite sample per line in {path}", reason="not-a-signal")
    return samples


# --- per modality --------------------------------------------------------------------------------


def _xray(row: Mapping[str, str], src: Path, ctx: InstanceIdentity) -> Dataset:
    ds = base_dataset(
        CR_IMAGE,
        DICOM_MODALITY_CODES[XRAY],
        ctx,
        study_description="Chest X-ray",
        series_description="Chest radiograph",
    )
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = ""
    ds.PatientOrientation = ""
    _lossy_greyscale_image(ds, _load_greyscale(src), 8, src)
    ds.ImageType = ["DERIVED", "SECONDARY"]
    return ds


def _mri(row: Mapping[str, str], src: Path, ctx: InstanceIdentity) -> Dataset:
    ds = base_dataset(
        MR_IMAGE, DICOM_MODALITY_CODES[MRI], ctx, study_description="MRI brain", series_description="Brain MR"
    )
    ds.BodyPartExamined = "BRAIN"
    pixels = _load_greyscale(src).astype(np.uint16)
    _lossy_greyscale_image(ds, pixels, 16, src)
    ds.BitsStored, ds.HighBit = 8, 7  # the source has 8 significant bits
    ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    ds.ScanningSequence = "RM"
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.RepetitionTime = None
    ds.EchoTime = None
    ds.EchoTrainLength = None
    ds.FrameOfReferenceUID = ctx.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.PixelSpacing = [1, 1]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, 0]
    ds.SliceThickness = None
    ds.PatientPosition = None
    # DICOM linear VOI maps x to (x - (c - 0.5)) / (w - 1) + 0.5: c=128, w=256 is exactly 0..255 -> 0..1
    ds.WindowCenter, ds.WindowWidth = 128, 256
    return ds


def _oct(row: Mapping[str, str], src: Path, ctx: InstanceIdentity) -> Dataset:
    from pydicom.dataset import Dataset

    ds = base_dataset(
        OPHTHALMIC_TOMOGRAPHY_IMAGE,
        DICOM_MODALITY_CODES[OCT],
        ctx,
        study_description="Retinal OCT",
        series_description="OCT B-scan",
    )
    pixels = _load_greyscale(src)
    _lossy_greyscale_image(ds, pixels, 8, src)
    date_time = ctx.study_time.strftime("%Y%m%d%H%M%S")
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.NumberOfFrames = 1
    ds.PresentationLUTShape = "IDENTITY"
    ds.AcquisitionDateTime = date_time
    ds.AcquisitionDuration = 0
    ds.AcquisitionNumber = 1
    del ds.DerivationDescription  # not part of this IOD
    # Not a concatenation, so no Concatenation UID / In-concatenation Number (both 1C on a
    # concatenation); dicom3tools 2022 still lists the latter as Type 1 in this module
    ds.FrameOfReferenceUID = ctx.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.AcquisitionContextSequence = []
    # Ocular Region Imaged: the source gives no laterality; "R" is a nominal value
    ds.ImageLaterality = "R"
    ds.AnatomicRegionSequence = [coded_entry("81745001", "SCT", "Eye")]
    # Ophthalmic Tomography Acquisition Parameters (type 2 left empty: not in the source)
    for keyword in (
        "AxialLengthOfTheEye",
        "HorizontalFieldOfView",
        "RefractiveStateSequence",
        "EmmetropicMagnification",
        "IntraOcularPressure",
        "PupilDilated",
    ):
        setattr(ds, keyword, [] if keyword.endswith("Sequence") else None)
    ds.IlluminationWaveLength = 840
    ds.IlluminationPower = 0
    ds.IlluminationBandwidth = 50
    # Ophthalmic Tomography Parameters
    ds.AcquisitionDeviceTypeCodeSequence = [
        coded_entry("392012008", "SCT", "Optical Coherence Tomography Scanner")
    ]
    ds.LightPathFilterTypeStackCodeSequence = []
    ds.DetectorType = "CCD"
    # Multi-frame Functional Groups and Dimension
    dimension_uid = ctx.series_uid + ".1" if len(ctx.series_uid) < 62 else ctx.series_uid
    organization = Dataset()
    organization.DimensionOrganizationUID = dimension_uid
    ds.DimensionOrganizationSequence = [organization]
    index = Dataset()
    index.DimensionOrganizationUID = dimension_uid
    index.DimensionIndexPointer = 0x00209057  # In-Stack Position Number
    index.FunctionalGroupPointer = 0x00209111  # Frame Content Sequence
    ds.DimensionIndexSequence = [index]
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [0.0039, 0.0117]  # nominal: 2 mm depth / 6 mm scan length
    measures.SliceThickness = 0.0117
    shared.PixelMeasuresSequence = [measures]
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PlaneOrientationSequence = [orientation]
    anatomy = Dataset()
    anatomy.FrameLaterality = "R"
    anatomy.AnatomicRegionSequence = [coded_entry("81745001", "SCT", "Eye")]
    shared.FrameAnatomySequence = [anatomy]
    ds.SharedFunctionalGroupsSequence = [shared]
    frame = Dataset()
    content = Dataset()
    content.StackID = "1"
    content.InStackPositionNumber = 1
    content.DimensionIndexValues = [1]
    content.FrameAcquisitionDateTime = date_time
    content.FrameReferenceDateTime = date_time
    content.FrameAcquisitionDuration = 0
    frame.FrameContentSequence = [content]
    position = Dataset()
    position.ImagePositionPatient = [0, 0, 0]
    frame.PlanePositionSequence = [position]
    ds.PerFrameFunctionalGroupsSequence = [frame]
    return ds


def _eeg(row: Mapping[str, str], src: Path, ctx: InstanceIdentity) -> Dataset:
    ds = base_dataset(
        ROUTINE_SCALP_EEG,
        DICOM_MODALITY_CODES[EEG],
        ctx,
        study_description="EEG",
        series_description="Routine scalp EEG",
    )
    samples_uv = _load_bonn(src)
    peak = float(np.abs(samples_uv).max()) if samples_uv.size else 0.0
    sensitivity = 1.0 if peak <= 32767 else float(np.ceil(peak / 32767 * 1000) / 1000)
    stored = np.round(samples_uv / sensitivity).astype("<i2")
    ds.AcquisitionDateTime = ctx.study_time.strftime("%Y%m%d%H%M%S")
    ds.AcquisitionContextSequence = []
    ds.WaveformSequence = [eeg_waveform_group(stored, BONN_SAMPLING_HZ, sensitivity, 0)]
    return ds


_BUILDERS: dict[str, Callable[[Mapping[str, str], Path, InstanceIdentity], Dataset]] = {
    XRAY: _xray,
    MRI: _mri,
    OCT: _oct,
    EEG: _eeg,
}


# --- public API ----------------------------------------------------------------------------------


def build_dataset(
    row: Mapping[str, str],
    src_dir: str | os.PathLike[str],
    *,
    uids: UidFactory | None = None,
    instance_number: int = 1,
) -> Dataset:
    """One manifest row (``path``, ``modality``, optional ``patient``) -> a pydicom Dataset.

    Pass one :class:`UidFactory` for a whole run so rows of a patient share study and series.
    """
    modality = (row.get("modality") or "").strip()
    if modality not in _BUILDERS:
        raise InvalidInput(f"unknown manifest modality {modality!r}; expected one of {TRAINED_MODALITIES}")
    if not row.get("path"):
        raise InvalidInput("manifest row has no path")
    ctx = _identity(row, uids or UidFactory(), instance_number)
    return _BUILDERS[modality](row, Path(src_dir) / row["path"], ctx)


def dicomize_row(
    row: Mapping[str, str],
    src_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    seed: str | int | None = None,
    uids: UidFactory | None = None,
) -> Path:
    """Build one manifest row and write it to ``out_path`` (the demo's one-file entry point)."""
    ds = build_dataset(row, src_dir, uids=uids or UidFactory(seed))
    return write_dataset(ds, out_path)


def read_manifest(src_dir: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Rows of ``SRC/manifest.csv``."""
    path = Path(src_dir) / "manifest.csv"
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except FileNotFoundError:
        raise UnreadableInput(f"no manifest.csv in {src_dir}", reason="no-such-file") from None
    missing = {"path", "modality", "label", "split"} - set(rows[0] if rows else {})
    if rows and missing:
        raise UnreadableInput(f"{path} lacks columns {sorted(missing)}", reason="bad-manifest")
    return rows


def select_rows(
    rows: Iterable[Mapping[str, str]],
    *,
    splits: Sequence[str] | None = None,
    modalities: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    limit_per_class: int | None = None,
) -> list[Mapping[str, str]]:
    """Filter rows; ``limit_per_class`` keeps the first N per (modality, split, label)."""
    taken: Counter = Counter()
    chosen = []
    for row in rows:
        if splits and row.get("split") not in splits:
            continue
        if modalities and row.get("modality") not in modalities:
            continue
        if labels and row.get("label") not in labels:
            continue
        key = (row.get("modality"), row.get("split"), row.get("label"))
        if limit_per_class is not None and taken[key] >= limit_per_class:
            continue
        taken[key] += 1
        chosen.append(row)
    return chosen


def output_name(row: Mapping[str, str]) -> str:
    """Relative output path: the source path with ``.dcm`` (mirrors the source tree)."""
    return str(Path(row["path"]).with_suffix(".dcm"))


def dicomize(
    src_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    splits: Sequence[str] | None = None,
    modalities: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    limit_per_class: int | None = None,
    seed: str | int | None = None,
) -> tuple[Path, Counter]:
    """Write the selected rows as DICOM plus ``OUT/manifest.csv``; returns (sidecar, counts)."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    rows = select_rows(
        read_manifest(src_dir),
        splits=splits,
        modalities=modalities,
        labels=labels,
        limit_per_class=limit_per_class,
    )
    uids = UidFactory(seed)
    instance_numbers: Counter = Counter()
    counts: Counter = Counter()
    sidecar = out_dir / "manifest.csv"
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(sidecar, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=SIDECAR_FIELDS)
        writer.writeheader()
        for row in rows:
            series_key = (row.get("patient") or row["path"], row["modality"])
            instance_numbers[series_key] += 1
            try:
                ds = build_dataset(row, src_dir, uids=uids, instance_number=instance_numbers[series_key])
            except UnreadableInput as exc:
                logger.warning("skipping %s: %s", row["path"], exc)
                counts["skipped"] += 1
                continue
            name = output_name(row)
            write_dataset(ds, out_dir / name)
            writer.writerow(
                {
                    "file": name,
                    "sop_instance_uid": ds.SOPInstanceUID,
                    "sop_class_uid": ds.SOPClassUID,
                    "study_instance_uid": ds.StudyInstanceUID,
                    "series_instance_uid": ds.SeriesInstanceUID,
                    "patient_id": ds.PatientID,
                    "modality": row["modality"],
                    "label": row.get("label", ""),
                    "split": row.get("split", ""),
                    "source": row.get("source", ""),
                    "source_path": row["path"],
                }
            )
            counts[row["modality"]] += 1
    return sidecar, counts


# --- CLI -----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cbmir dicomize [SRC] OUT``."""
    parser.add_argument(
        "src", metavar="SRC", nargs="?", help="folder with manifest.csv (default: the shared data folder)"
    )
    parser.add_argument("out", metavar="OUT", nargs="?", help="output folder")
    parser.add_argument(
        "--split",
        dest="splits",
        action="append",
        choices=SPLITS,
        help="split(s) to convert (repeatable; default all)",
    )
    parser.add_argument(
        "--modality",
        dest="modalities",
        action="append",
        choices=TRAINED_MODALITIES,
        help="modalities to convert (repeatable; default all)",
    )
    parser.add_argument("--label", dest="labels", action="append", help="labels to convert (repeatable)")
    parser.add_argument(
        "--limit-per-class",
        type=int,
        default=None,
        metavar="N",
        help="at most N files per (modality, split, label), in manifest order",
    )
    parser.add_argument(
        "--seed", default=None, help="derive UIDs and dates from this seed: same source, same UIDs"
    )


def run(args: argparse.Namespace) -> int:
    """Execute ``cbmir dicomize``; 0 on success, 2 on bad input."""
    src, out = args.src, args.out
    if out is None:
        if src is None:
            print("dicomize: OUT is required", file=sys.stderr)
            return 2
        src, out = None, src
    src_dir = Path(src) if src else shared_data_dir()
    if args.limit_per_class is not None and args.limit_per_class < 1:
        print("dicomize: --limit-per-class must be >= 1", file=sys.stderr)
        return 2
    try:
        sidecar, counts = dicomize(
            src_dir,
            out,
            splits=args.splits,
            modalities=args.modalities,
            labels=args.labels,
            limit_per_class=args.limit_per_class,
            seed=args.seed,
        )
    except CbmirError as exc:
        print(f"dicomize: {exc}", file=sys.stderr)
        return 2
    summary = ", ".join(f"{key} {value}" for key, value in sorted(counts.items())) or "nothing selected"
    print(f"dicomize: {summary}; index {sidecar}")
    return 0
