"""Dropped files into DICOM: what the watcher spools for each file it takes.

* **What a file is.** By content first (``DICM`` at byte 128, the PNG or JPEG signature, the EDF/BDF
  header), else by suffix (``.dcm``/``.dicom``/``.dic``/``.ima``/none: DICOM; ``.png``/``.jpg``/
  ``.jpeg``: picture; ``.edf``/``.bdf``: EEG). Anything else is refused as ``unsupported-file-type``.
* **DICOM** is spooled byte for byte under its SOP Instance UID after a header check. The SOP
  classes are those the listener negotiates (:func:`services.core.vocabulary.accepted_storage_classes`);
  anything else (SR documents, RT plans, ...) is refused with the decoder's reason, as the listener
  would have refused it.
* **PNG/JPEG** become a Secondary Capture Image object: the picture is reduced to 8-bit luma by
  exactly the function the query service uses for picture queries
  (:func:`models.preprocess.decode_image_bytes`: EXIF orientation, ITU-R BT.601 luma, 16-bit / 257),
  stored as MONOCHROME2, so a picture query with the same bytes finds it at distance 0. The modality
  comes from the first folder under the watched folder, because a PNG carries none: ``xray/`` ->
  Modality ``CR``, ``mri/`` -> ``MR``, ``oct/`` -> ``OPT``, ``eeg/`` -> ``EEG``, anything else (or
  the folder itself) -> ``OT`` (other); see :data:`services.core.vocabulary.DICOM_MODALITY_CODES`.
  Folder names are compared case-insensitively. Secondary Capture rather than a modality IOD,
  because nothing about the acquisition is known; the Modality attribute carries the folder's
  modality, which is what cbmir indexes by.
* **EDF/BDF** becomes a Routine Scalp EEG Waveform object holding the channel
  :func:`services.dicom.edf.read_edf_signal` picks (the first EEG channel), in µV at the file's own
  sampling rate, one multiplex group as in :mod:`services.dicom.dicomize`; the worker draws it with the
  render its encoder's contract names, as in training.
* **UIDs.** Converted objects get new UIDs under pydicom's root, derived from the file's SHA-256
  (and the folder modality): a new object for every distinct file, and the same UIDs if the very
  same file is dropped again, so a repeat overwrites its index point instead of duplicating it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pydicom.valuerep import format_number_as_ds

from models.data import sha256_file
from services.core.errors import CbmirError, InvalidInput, StorageError, TooLarge, UnreadableInput
from services.core.logs import file_ref
from services.core.vocabulary import (
    DICOM_MODALITY_CODES,
    EEG,
    OTHER,
    ROUTINE_SCALP_EEG,
    SECONDARY_CAPTURE_IMAGE,
    TRAINED_MODALITIES,
    accepted_sop_class_uids,
)
from services.dicom.build import InstanceIdentity, base_dataset, dataset_bytes, eeg_waveform_group
from services.dicom.decode import looks_like_dicom
from services.ingest.spool import spool_name_for

DICOM_SUFFIXES = frozenset({"", ".dcm", ".dicom", ".dic", ".ima"})
PICTURE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
EDF_SUFFIXES = frozenset({".edf", ".bdf"})
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_EDF_MAGIC = b"0       "
_BDF_MAGIC = b"\xffBIOSEMI"
SOFTWARE = "cbmir watch"


def detect_kind(name: str, head: bytes) -> str:
    """``dicom`` | ``png`` | ``jpeg`` | ``edf`` | ``unknown``: content first, then the suffix."""
    if looks_like_dicom(head):
        return "dicom"
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(_JPEG_MAGIC):
        return "jpeg"
    if head.startswith((_EDF_MAGIC, _BDF_MAGIC)):
        return "edf"
    suffix = Path(name).suffix.lower()
    if suffix in PICTURE_SUFFIXES:
        return "png" if suffix == ".png" else "jpeg"
    if suffix in EDF_SUFFIXES:
        return "edf"
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    return "unknown"


def folder_modality(relative: Path) -> str:
    """DICOM Modality code for a picture from its first folder (``OT`` at the top level)."""
    folder = relative.parts[0].lower() if len(relative.parts) > 1 else OTHER
    return DICOM_MODALITY_CODES[folder if folder in TRAINED_MODALITIES else OTHER]


# --- building the objects ------------------------------------------------------------------------


def _identity(digest: str, kind: str, modality_code: str, when: float) -> InstanceIdentity:
    """UIDs and a synthetic patient derived from the file's content."""

    def uid(role: str) -> str:
        return generate_uid(entropy_srcs=["cbmir-watch", role, kind, modality_code, digest])

    return InstanceIdentity(
        patient_id="CBMIR-" + digest[:12].upper(),
        study_uid=uid("study"),
        series_uid=uid("series"),
        instance_uid=uid("instance"),
        frame_of_reference_uid=uid("frame-of-reference"),
        study_time=dt.datetime.fromtimestamp(when).replace(microsecond=0),
        instance_number=1,
    )


def _dropped_file_dataset(
    sop_class: str, modality_code: str, identity: InstanceIdentity, study: str, series: str
) -> Dataset:
    ds = base_dataset(
        sop_class,
        modality_code,
        identity,
        study_description=study,
        series_description=series,
        software=SOFTWARE,
    )
    ds.InstitutionName = ""
    ds.DeidentificationMethod = "synthetic patient; the dropped file had no identifiers"
    return ds


def picture_dataset(
    grey: np.ndarray, modality_code: str, *, lossy: bool, digest: str, when: float, kind: str = "picture"
) -> Dataset:
    """8-bit greyscale picture -> Secondary Capture Image object with ``modality_code``."""
    grey = np.ascontiguousarray(grey, dtype=np.uint8)
    if grey.ndim != 2 or min(grey.shape) < 1:
        raise UnreadableInput(f"picture decoded to shape {grey.shape}", reason="not-an-image")
    identity = _identity(digest, kind, modality_code, when)
    ds = _dropped_file_dataset(
        SECONDARY_CAPTURE_IMAGE, modality_code, identity, "Dropped picture", f"cbmir watch ({modality_code})"
    )
    ds.ConversionType = "WSD"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.PatientOrientation = ""
    ds.Laterality = ""  # Type 2C: unknown (the body part is not known either)
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "01" if lossy else "00"
    if lossy:
        ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(grey.shape[0]), int(grey.shape[1])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelRepresentation = 0
    ds.PixelData = grey.tobytes()
    return ds


def eeg_dataset(samples_uv: np.ndarray, sampling_hz: float, *, digest: str, when: float) -> Dataset:
    """One EEG channel in µV -> Routine Scalp EEG Waveform object (one multiplex group, SS samples).

    Integer-valued signals within ±32767 µV are stored exactly with a 1 µV sensitivity (as
    :mod:`services.dicom.dicomize` stores the Bonn corpus); anything else is centred with the channel
    baseline and scaled to use the 16-bit range.
    """
    x = np.asarray(samples_uv, dtype=np.float64).ravel()
    if x.size == 0 or not np.isfinite(x).all():
        raise UnreadableInput("EEG channel has no samples or non-finite values", reason="not-edf")
    if not np.isfinite(sampling_hz) or sampling_hz <= 0:
        raise UnreadableInput("EEG channel has no positive sampling frequency", reason="invalid-attribute")
    if np.abs(x).max() <= 32767 and np.all(np.abs(x - np.rint(x)) < 1e-6):
        sensitivity, baseline = "1", "0"
    else:
        low, high = float(x.min()), float(x.max())
        baseline = format_number_as_ds((low + high) / 2)
        half_range = max(abs(high - float(baseline)), abs(float(baseline) - low), 1e-9)
        sensitivity = format_number_as_ds(half_range / 32000)  # headroom for the DS rounding
    stored = np.clip(np.rint((x - float(baseline)) / float(sensitivity)), -32768, 32767).astype("<i2")

    code = DICOM_MODALITY_CODES[EEG]
    identity = _identity(digest, "edf", code, when)
    ds = _dropped_file_dataset(ROUTINE_SCALP_EEG, code, identity, "EEG", "Routine scalp EEG (from EDF)")
    ds.AcquisitionDateTime = identity.study_time.strftime("%Y%m%d%H%M%S")
    ds.AcquisitionContextSequence = []
    ds.WaveformSequence = [
        eeg_waveform_group(stored, format_number_as_ds(float(sampling_hz)), sensitivity, baseline)
    ]
    return ds


def _decode_picture(data: bytes) -> np.ndarray:
    from PIL import Image

    from models.preprocess import decode_image_bytes

    try:
        return decode_image_bytes(data)
    except UnreadableInput as exc:
        raise UnreadableInput(f"not a decodable PNG/JPEG picture ({exc})", reason="not-an-image") from None
    except InvalidInput as exc:
        raise TooLarge(str(exc), reason="too-many-pixels") from None
    except Image.DecompressionBombError as exc:
        raise TooLarge(f"picture too large ({exc})", reason="too-many-pixels") from None
    except Exception as exc:  # noqa: BLE001 - any other decoder failure still means "not a usable picture"
        raise UnreadableInput(
            f"picture could not be decoded ({type(exc).__name__})", reason="not-an-image"
        ) from None


# --- one file ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Converted:
    """A file turned into a spool entry: its name and the bytes to store (None: copy the file)."""

    spool_name: str
    data: bytes | None
    description: str


class FileConverter:
    """File -> :class:`Converted`, or a :class:`CbmirError` whose reason goes into quarantine.

    :class:`StorageError` means the file could not be read now (try again later); every other
    :class:`CbmirError` means it never will be usable as it is.
    """

    def __init__(self) -> None:
        self._accepted = accepted_sop_class_uids()

    def convert(self, path: Path, relative: Path) -> Converted:
        """Turn the file at ``path`` (``relative`` to the watched folder) into a spool entry."""
        try:
            with open(path, "rb") as handle:
                head = handle.read(132)
        except OSError as exc:
            raise StorageError(f"cannot read {file_ref(relative)}: {exc.strerror or exc}") from None
        kind = detect_kind(path.name, head)
        if kind == "dicom":
            return self._dicom(path)
        if kind in ("png", "jpeg"):
            return self._picture(path, relative, kind)
        if kind == "edf":
            return self._edf(path)
        raise InvalidInput(
            f"{path.suffix or 'no suffix'}: not DICOM, PNG, JPEG or EDF", reason="unsupported-file-type"
        )

    def _dicom(self, path: Path) -> Converted:
        from services.dicom.decode import decode_for_embedding, read_header

        header = read_header(path)
        if header.sop_class_uid not in self._accepted:
            from pydicom.uid import UID

            name = UID(header.sop_class_uid).name
            try:  # the decoder names the reason (sr-document, no-image, ...)
                decode_for_embedding(path)
            except CbmirError:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever the decoder raises, the file is not usable
                raise InvalidInput(
                    f"{name} could not be read ({type(exc).__name__})", reason="unsupported-sop-class"
                ) from None
            raise InvalidInput(
                f"{name} is not a storage SOP class the listener accepts", reason="unsupported-sop-class"
            )
        return Converted(
            spool_name_for(header.sop_instance_uid),
            None,
            f"DICOM {header.modality} {header.sop_instance_uid}",
        )

    def _picture(self, path: Path, relative: Path, kind: str) -> Converted:
        data = _read(path)
        grey = _decode_picture(data)
        digest = hashlib.sha256(data).hexdigest()
        code = folder_modality(relative)
        ds = picture_dataset(
            grey, code, lossy=kind == "jpeg", digest=digest, when=path.stat().st_mtime, kind=kind
        )
        return Converted(
            spool_name_for(ds.SOPInstanceUID),
            dataset_bytes(ds),
            f"{kind.upper()} as Secondary Capture, Modality {code}, {ds.SOPInstanceUID}",
        )

    def _edf(self, path: Path) -> Converted:
        from services.dicom.edf import read_edf_signal

        samples_uv, sampling_hz = read_edf_signal(path)
        ds = eeg_dataset(samples_uv, sampling_hz, digest=sha256_file(path), when=path.stat().st_mtime)
        return Converted(
            spool_name_for(ds.SOPInstanceUID),
            dataset_bytes(ds),
            f"EDF as Routine Scalp EEG waveform ({sampling_hz:g} Hz), {ds.SOPInstanceUID}",
        )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StorageError(f"cannot read {file_ref(path)}: {exc.strerror or exc}") from None
