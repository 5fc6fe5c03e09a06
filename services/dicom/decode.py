"""DICOM adapter: instance headers and display-ready frames for embedding.

The listener, the workers and the gRPC service all read DICOM through this module:

* :func:`read_header` gives an :class:`InstanceHeader` (UIDs, modality, geometry, transfer
  syntax; never patient name, ID or birth date) without touching the pixel data.
* :func:`decode_for_embedding` gives the header plus a list of :class:`DecodedFrame`, each a 2-D
  float32 image in [0, 1] (0 = black, 1 = white) after the display pipeline of PS3.4 N.2.
* :func:`read_eeg_waveform` gives the first channel of an EEG waveform object in µV.

Display pipeline, in order (monochrome): Modality LUT or Rescale Slope/Intercept (per frame from
the functional groups of enhanced objects, else the top-level values); then the VOI LUT Sequence
(first LUT) or else Window Center/Width (first window; LINEAR, LINEAR_EXACT or SIGMOID) or else a
min-max stretch of the frame; then MONOCHROME1 inversion. Colour: pydicom returns pixel-interleaved
RGB (planar configuration undone, YBR_FULL/YBR_FULL_422 converted, YBR_ICT/YBR_RCT undone by
the JPEG 2000 codec), PALETTE COLOR goes through its palette; the frame becomes ITU-R BT.601 luma
divided by the largest sample value. Multi-frame: ``frames="middle"`` decodes only frame
``(n + 1) // 2`` (1-based; our documented default: one vector per instance, the frame number goes
into the payload), ``"all"`` decodes every frame. EEG waveforms become one frame: the first
channel drawn by ``models.eeg.render_eeg`` with the encoder contract's ``eeg_render``.

Codecs: pydicom's pixel decoders with the pylibjpeg plug-ins (pylibjpeg-libjpeg for JPEG and
JPEG-LS, pylibjpeg-openjpeg for JPEG 2000, pylibjpeg-rle for RLE), not python-gdcm, because
they are small manylinux wheels with permissive licences, are the plug-ins pydicom 3 is designed
around (per-frame decoding, documented error messages), and cover every transfer syntax we meet
except 12-bit lossy JPEG. python-gdcm is one large SWIG binary with a global state, pinned to
specific Python versions, and would only add that one syntax. 12-bit JPEG Extended
(1.2.840.10008.1.2.4.51) therefore raises a :class:`~services.core.errors.DecodeError` that names
the transfer syntax and suggests a transcoding (dcmtk's ``dcmdjpeg`` reads those files).

Errors: only :mod:`services.core.errors` classes leave this module (their ``reason`` is a PHI-free
slug): :class:`UnreadableInput` (not DICOM, empty, truncated, missing UIDs or pixel data,
parse failures), :class:`UnsupportedInput` (SR documents, objects without pixels or waveform,
non-EEG waveforms), :class:`DecodeError` (no codec, corrupt compressed stream) and
:class:`TooLarge` (over :class:`DecodeLimits`).
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import math
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Union

import numpy as np

from models.eeg import MAX_SAMPLING_HZ
from services.core.config import DecodeSettings, FramePolicy
from services.core.errors import (
    CbmirError,
    ConfigError,
    DecodeError,
    InvalidInput,
    TooLarge,
    UnreadableInput,
    UnsupportedInput,
)
from services.core.logs import describe, file_ref
from services.core.patients import patient_key
from services.core.vocabulary import (
    EEG,
    EEG_SOP_CLASSES,
    MEDIA_STORAGE_DIRECTORY,
    MRI,
    OCT,
    XRAY,
    is_valid_uid,
    modality_term,
    normalize_modality,
)

if TYPE_CHECKING:
    from pydicom.dataset import Dataset
    from pydicom.pixels.decoders.base import Decoder

logger = logging.getLogger(__name__)

DicomSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, "Dataset"]

JPEG_EXTENDED_12BIT = "1.2.840.10008.1.2.4.51"
DEFLATED_EXPLICIT_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
# A deflated data set is inflated in memory: never more than this (a 1 MB file can inflate to GBs).
MAX_INFLATED_BYTES = 256 * 2**20
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
STUDY_DATE = re.compile(r"^(19|20)[0-9]{6}$")
_LUMA = (0.299, 0.587, 0.114)


# --- public data types ---------------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceHeader:
    """What cbmir keeps about an instance: identifiers and geometry, no patient data.

    ``rows``/``columns`` are 0 for objects without pixels (waveforms); ``number_of_frames`` is
    the number of frames decode_for_embedding can return ("all"), 1 for waveforms.
    """

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality_code: str
    modality: str
    number_of_frames: int
    rows: int
    columns: int
    transfer_syntax_uid: str
    patient_key: str = ""  # keyed hash of issuer + Patient ID (services.core.patients), when a secret is set
    study_date: str = ""  # Study Date as YYYYMMDD when it is a valid date, else ""


@dataclass
class DecodeLimits:
    """Refuse (with :class:`TooLarge`) anything bigger, before decoding.

    ``max_pixels`` counts the samples decoded in one call: rows × columns × samples per pixel ×
    frames decoded. ``max_waveform_samples`` bounds channels × samples of one multiplex group.
    """

    max_rows: int = 8192
    max_columns: int = 8192
    max_frames: int = 2000
    max_pixels: int = 100_000_000
    max_waveform_samples: int = 50_000_000
    max_inflated_bytes: int = MAX_INFLATED_BYTES

    @classmethod
    def from_settings(cls, settings: DecodeSettings) -> DecodeLimits:
        """The limits a component's ``CBMIR_MAX_*`` settings set (the rest at their defaults)."""
        return cls(
            max_rows=settings.max_rows, max_columns=settings.max_columns, max_frames=settings.max_frames
        )


@dataclass
class DecodedFrame:
    """One display-ready frame: 2-D float32 in [0, 1], ``frame_number`` 1-based."""

    frame_number: int
    image: np.ndarray


# --- reading -------------------------------------------------------------------------------------


def looks_like_dicom(head: bytes) -> bool:
    """Whether bytes start like a DICOM Part 10 file: a 128-byte preamble, then ``DICM``."""
    return len(head) >= 132 and head[128:132] == b"DICM"


def _open_source(source: Any) -> tuple[BinaryIO, str]:
    """Source -> (seekable binary stream at 0, description for messages); files stay on disk."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source)), "byte buffer"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            return open(path, "rb"), file_ref(path.name)
        except FileNotFoundError:
            raise UnreadableInput(f"no such file: {file_ref(path)}", reason="no-such-file") from None
        except IsADirectoryError:
            raise UnreadableInput(
                f"{file_ref(path)} is a directory, not a file", reason="not-a-file"
            ) from None
        except OSError as exc:
            raise UnreadableInput(
                f"cannot read {file_ref(path)}: {describe(exc)}", reason="io-error"
            ) from None
    if hasattr(source, "read"):
        try:
            data = source.read()
        except Exception as exc:  # noqa: BLE001 - a broken stream is unreadable input, whatever it raises
            raise UnreadableInput(f"cannot read stream: {describe(exc)}", reason="io-error") from None
        if not isinstance(data, (bytes, bytearray)):
            raise UnreadableInput("stream did not return bytes", reason="not-dicom")
        return io.BytesIO(bytes(data)), "stream"
    raise InvalidInput(f"cannot read DICOM from a {type(source).__name__}")


# Defined terms that messages may show; any other value from a data set is shown as '…', since free
# text can carry patient data (messages reach logs, quarantine reasons and gRPC callers).
_PHOTOMETRIC_TERMS = frozenset(
    {
        "MONOCHROME1",
        "MONOCHROME2",
        "PALETTE COLOR",
        "RGB",
        "HSV",
        "ARGB",
        "CMYK",
        "YBR_FULL",
        "YBR_FULL_422",
        "YBR_PARTIAL_420",
        "YBR_PARTIAL_422",
        "YBR_ICT",
        "YBR_RCT",
        "XYB",
    }
)
_WAVEFORM_INTERPRETATIONS = frozenset({"SB", "UB", "MB", "AB", "SS", "US", "SL", "UL", "SV", "UV"})


def _term(value: str, known: frozenset[str]) -> str:
    """``value`` for a message when it is one of ``known``, else ``'…'``."""
    return value if value in known else "'…'"


_LONG_LENGTH_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"})


def inflated(stream: BinaryIO, max_bytes: int = MAX_INFLATED_BYTES) -> tuple[BinaryIO, int]:
    """A Part 10 stream ready for pydicom, and its size in bytes.

    A Deflated Explicit VR Little Endian file becomes an in-memory copy with the data set inflated
    (at most ``max_bytes``, else :class:`TooLarge` before any more is inflated) and File Meta that
    says Explicit VR Little Endian, which is what the inflated bytes are. pydicom would inflate
    the whole data set, however large. Any other stream comes back as it is, at position 0.
    """
    stream.seek(0)
    head = stream.read(132 + 12)
    elements, offset = [], 132
    meta = head[132:] + stream.read(64 * 1024)  # File Meta is a few hundred bytes
    position = 0
    while position + 8 <= len(meta):
        group, element = struct.unpack_from("<HH", meta, position)
        if group != 0x0002:
            break
        vr = meta[position + 4 : position + 6]
        if vr in _LONG_LENGTH_VRS:
            length, start = struct.unpack_from("<I", meta, position + 8)[0], position + 12
        else:
            length, start = struct.unpack_from("<H", meta, position + 6)[0], position + 8
        elements.append((element, vr, meta[start : start + length], meta[position:start]))
        position = start + length
    syntax = (
        next((v for e, _, v, _ in elements if e == 0x0010), b"").rstrip(b"\x00 ").decode("ascii", "replace")
    )
    size = stream.seek(0, os.SEEK_END)
    stream.seek(0)
    if syntax != DEFLATED_EXPLICIT_LE:
        return stream, size
    offset += position
    stream.seek(offset)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    parts, total = [], 0
    try:
        while chunk := stream.read(1 << 20):
            part = inflater.decompress(chunk, max_bytes + 1 - total)
            parts.append(part)
            total += len(part)
            if total > max_bytes or inflater.unconsumed_tail:
                raise TooLarge(
                    f"the deflated data set inflates to more than {max_bytes:,} bytes",
                    reason="too-many-bytes",
                )
    except zlib.error as exc:
        raise UnreadableInput(
            f"the deflated data set is corrupt ({describe(exc)})", reason="parse-error"
        ) from None
    body = b""
    for element, vr, value, _ in elements:
        if element == 0x0000:
            continue
        if element == 0x0010:
            value = EXPLICIT_LE.encode() + b"\0"
        if vr in _LONG_LENGTH_VRS:
            body += struct.pack("<HH2s2xI", 0x0002, element, vr, len(value)) + value
        else:
            body += struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    rebuilt = io.BytesIO(head[:132] + group_length + body + b"".join(parts))
    return rebuilt, len(rebuilt.getbuffer())


def _read_dataset(
    source: Any, *, stop_before_pixels: bool, max_inflated_bytes: int = MAX_INFLATED_BYTES
) -> Dataset:
    """Parse a DICOM Part 10 file (path, bytes, stream) or pass a Dataset through."""
    from pydicom.dataset import Dataset

    if isinstance(source, Dataset):
        return source
    stream, what = _open_source(source)
    with stream:
        try:
            head = stream.read(132)
            stream.seek(0)
        except OSError as exc:
            raise UnreadableInput(f"cannot read {what}: {describe(exc)}", reason="io-error") from None
        if not head:
            raise UnreadableInput(f"{what} is empty (0 bytes)", reason="empty")
        if not looks_like_dicom(head):
            raise UnreadableInput(
                f"{what} is not a DICOM Part 10 file: no 128-byte preamble followed by DICM "
                "(raw datasets without File Meta Information are not accepted)",
                reason="not-dicom",
            )
        import pydicom

        try:
            parsed, _ = inflated(stream, max_inflated_bytes)
            ds = pydicom.dcmread(parsed, stop_before_pixels=stop_before_pixels)
            # Elements are parsed lazily: touch the ones we rely on so a broken VR fails here.
            for keyword in (
                "SOPClassUID",
                "SOPInstanceUID",
                "StudyInstanceUID",
                "SeriesInstanceUID",
                "Modality",
                "NumberOfFrames",
                "Rows",
                "Columns",
            ):
                ds.get(keyword)
            ds.file_meta.get("TransferSyntaxUID")
        except CbmirError:
            raise
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types for broken files: all mean "unreadable"
            raise UnreadableInput(
                f"{what} could not be parsed as DICOM ({describe(exc)})", reason="parse-error"
            ) from None
    return ds


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else ""
    return str(value).strip().strip("\x00").strip()


def _required_uid(ds: Dataset, keyword: str, meta_keyword: str | None = None) -> str:
    uid = _text(ds, keyword)
    if not uid and meta_keyword is not None:
        meta = getattr(ds, "file_meta", None)
        uid = _text(meta, meta_keyword) if meta is not None else ""
        if uid:
            logger.warning("%s missing from the dataset; using %s of the file meta", keyword, meta_keyword)
    if not uid:
        raise UnreadableInput(f"required attribute {keyword} is missing or empty", reason="missing-uid")
    if not is_valid_uid(uid):
        raise UnreadableInput(
            f"{keyword} is not a valid UID (digits and dots, at most 64 chars)", reason="invalid-uid"
        )
    return uid


def _int_attr(ds: Dataset, keyword: str, default: int) -> int:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UnreadableInput(f"{keyword} is not a number", reason="invalid-attribute") from None
    if not math.isfinite(number) or number != int(number):
        raise UnreadableInput(f"{keyword} is not an integer", reason="invalid-attribute")
    return int(number)


def _transfer_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    uid = _text(meta, "TransferSyntaxUID") if meta is not None else ""
    if uid:
        return uid
    implicit, little = ds.original_encoding
    if implicit is None:  # built in memory: pixel data, if any, is native little endian
        return "1.2.840.10008.1.2.1"
    if little:
        return "1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1"
    return "1.2.840.10008.1.2.2"


def _header_from_dataset(ds: Dataset, patient_key_secret: bytes | None = None) -> InstanceHeader:
    sop_class_uid = _required_uid(ds, "SOPClassUID", "MediaStorageSOPClassUID")
    if sop_class_uid == MEDIA_STORAGE_DIRECTORY:
        raise UnsupportedInput("this is a DICOMDIR (media directory), not an instance", reason="dicomdir")
    sop_instance_uid = _required_uid(ds, "SOPInstanceUID", "MediaStorageSOPInstanceUID")
    study_uid = _required_uid(ds, "StudyInstanceUID")
    series_uid = _required_uid(ds, "SeriesInstanceUID")
    modality_code = modality_term(_text(ds, "Modality"))
    has_pixels = any(keyword in ds for keyword in PIXEL_KEYWORDS)
    frames = _int_attr(ds, "NumberOfFrames", 1)
    if frames < 1:
        if "NumberOfFrames" in ds and has_pixels:
            raise UnreadableInput("Number of Frames is 0 or negative", reason="invalid-attribute")
        frames = 1
    rows = max(_int_attr(ds, "Rows", 0), 0)
    columns = max(_int_attr(ds, "Columns", 0), 0)
    return InstanceHeader(
        sop_instance_uid=sop_instance_uid,
        sop_class_uid=sop_class_uid,
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        modality_code=modality_code,
        modality=normalize_modality(modality_code, sop_class_uid),
        number_of_frames=frames,
        rows=rows,
        columns=columns,
        transfer_syntax_uid=_transfer_syntax(ds),
        patient_key=(
            patient_key(patient_key_secret, _text(ds, "PatientID"), _text(ds, "IssuerOfPatientID"))
            if patient_key_secret
            else ""
        ),
        study_date=study_date(_text(ds, "StudyDate")),
    )


def study_date(value: str) -> str:
    """A DICOM DA value as YYYYMMDD when it is a real calendar date, else ""."""
    value = value.strip()
    if not STUDY_DATE.match(value):
        return ""
    try:
        dt.date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        return ""
    return value


@dataclass(frozen=True)
class Identity:
    """Whose and which an object is, read leniently (no validation): for erasure, which must find
    an object even when its header is malformed. The patient is the keyed reference only."""

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_key: str


_IDENTITY_TAGS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID", "IssuerOfPatientID")


def read_identity(path: Path, patient_key_secret: bytes | None = None) -> Identity | None:
    """The identifying UIDs and patient key of the file at ``path``, however malformed the rest of
    it is; None when it is not DICOM at all (a dropped picture, say)."""
    import pydicom

    try:
        with open(path, "rb") as handle:
            ds = pydicom.dcmread(
                handle, force=True, stop_before_pixels=True, specific_tags=list(_IDENTITY_TAGS)
            )
            values = {}
            for keyword in _IDENTITY_TAGS:
                try:
                    values[keyword] = str(ds.get(keyword, "") or "").strip().rstrip("\x00")
                except Exception:  # noqa: BLE001 - a malformed element is an empty one here
                    values[keyword] = ""
    except (OSError, EOFError, ValueError, TypeError, struct.error, pydicom.errors.InvalidDicomError):
        return None
    if not any(values.values()):
        return None
    key = ""
    if patient_key_secret:
        key = patient_key(patient_key_secret, values["PatientID"], values["IssuerOfPatientID"])
    return Identity(values["SOPInstanceUID"], values["StudyInstanceUID"], values["SeriesInstanceUID"], key)


def read_header(source: DicomSource, patient_key_secret: bytes | None = None) -> InstanceHeader:
    """Header of a DICOM instance (path, bytes, stream or Dataset); pixel data is not read."""
    ds = _read_dataset(source, stop_before_pixels=True)
    try:
        return _header_from_dataset(ds, patient_key_secret)
    except CbmirError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom and the codecs raise many types; all mean one thing here
        raise UnreadableInput(
            f"cannot read the instance header ({describe(exc)})", reason="parse-error"
        ) from None


# --- what kind of content ------------------------------------------------------------------------


def _sop_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name
    return name if name != uid else f"unknown SOP class {uid}"


def _content_kind(ds: Dataset, header: InstanceHeader) -> str:
    """``"image"`` or ``"waveform"``; raise for everything cbmir cannot turn into a picture."""
    present = [keyword for keyword in PIXEL_KEYWORDS if keyword in ds]
    if len(present) > 1:
        raise UnreadableInput("more than one pixel data element present", reason="invalid-attribute")
    if present:
        return "image"
    name = _sop_name(header.sop_class_uid)
    is_eeg_class = header.sop_class_uid in EEG_SOP_CLASSES
    if "WaveformSequence" in ds:
        if is_eeg_class or header.modality == EEG:
            return "waveform"
        raise UnsupportedInput(
            f"{name} is a waveform but not EEG; only EEG waveforms are indexed", reason="unsupported-waveform"
        )
    if is_eeg_class:
        raise UnreadableInput(
            f"{name} instance has no Waveform Sequence (5400,0100)", reason="missing-waveform"
        )
    if "Image Storage" in name or header.modality in (XRAY, MRI, OCT):
        raise UnreadableInput(f"{name} instance has no Pixel Data (7FE0,0010)", reason="missing-pixel-data")
    if name.endswith("SR Storage") or header.modality_code == "SR":
        raise UnsupportedInput(
            f"{name} is a structured report: it has no image to index", reason="sr-document"
        )
    raise UnsupportedInput(
        f"{name} (modality {header.modality_code or 'unset'}) has neither "
        "pixel data nor a waveform; nothing to index",
        reason="no-image",
    )


# --- images --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PixelModule:
    samples_per_pixel: int
    photometric: str
    bits_allocated: int
    bits_stored: int
    pixel_keyword: str


def _pixel_module(ds: Dataset, header: InstanceHeader) -> _PixelModule:
    keyword = next(k for k in PIXEL_KEYWORDS if k in ds)
    missing = [k for k in ("Rows", "Columns", "BitsAllocated") if ds.get(k) in (None, "")]
    if keyword == "PixelData":
        missing += [
            k for k in ("PhotometricInterpretation", "PixelRepresentation") if ds.get(k) in (None, "")
        ]
    if missing:
        raise UnreadableInput(
            f"Image Pixel module incomplete: {', '.join(missing)} missing", reason="missing-attribute"
        )
    if header.rows < 1 or header.columns < 1:
        raise UnreadableInput("Rows and Columns must be at least 1", reason="invalid-attribute")
    samples = _int_attr(ds, "SamplesPerPixel", 1)
    bits_allocated = _int_attr(ds, "BitsAllocated", 0)
    bits_stored = _int_attr(ds, "BitsStored", bits_allocated)
    photometric = _text(ds, "PhotometricInterpretation").upper() or "MONOCHROME2"
    if samples not in (1, 3, 4):
        raise UnreadableInput(f"Samples per Pixel {samples} is invalid", reason="invalid-attribute")
    if bits_allocated not in (1, 8, 16, 32, 64) or not 1 <= bits_stored <= bits_allocated:
        raise UnreadableInput(
            f"Bits Allocated/Stored {bits_allocated}/{bits_stored} are invalid", reason="invalid-attribute"
        )
    return _PixelModule(samples, photometric, bits_allocated, bits_stored, keyword)


def _check_image_limits(
    header: InstanceHeader, pixels: _PixelModule, n_decoded: int, limits: DecodeLimits
) -> None:
    if header.rows > limits.max_rows or header.columns > limits.max_columns:
        raise TooLarge(
            f"image is {header.rows}×{header.columns} pixels; the limit is "
            f"{limits.max_rows}×{limits.max_columns}",
            reason="too-many-pixels",
        )
    if header.number_of_frames > limits.max_frames:
        raise TooLarge(
            f"instance has {header.number_of_frames} frames; the limit is {limits.max_frames}",
            reason="too-many-frames",
        )
    total = header.rows * header.columns * pixels.samples_per_pixel * n_decoded
    if total > limits.max_pixels:
        raise TooLarge(
            f"decoding {n_decoded} frame(s) means {total:,} samples; the limit is {limits.max_pixels:,}",
            reason="too-many-pixels",
        )


def _expected_native_bytes(header: InstanceHeader, pixels: _PixelModule) -> int:
    per_frame = header.rows * header.columns * pixels.samples_per_pixel
    if pixels.photometric == "YBR_FULL_422" and pixels.samples_per_pixel == 3:
        per_frame = header.rows * header.columns * 2
    bits = per_frame * header.number_of_frames * pixels.bits_allocated
    return (bits + 7) // 8


def _decoder_for(ds: Dataset, header: InstanceHeader, pixels: _PixelModule) -> tuple[Decoder, str]:
    """The pydicom decoder for this transfer syntax, or a DecodeError that says why not."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    ts = UID(header.transfer_syntax_uid)
    if not is_valid_uid(str(ts)):
        ts_text = "a transfer syntax UID that is not a UID"
    else:
        ts_text = f"{ts.name} ({ts})" if ts.name != str(ts) else f"unknown transfer syntax {ts}"
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise DecodeError(f"no pixel decoder exists for {ts_text}", reason="no-codec") from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)  # e.g. "gdcm - requires gdcm>=3.0.10"
        raise DecodeError(
            f"no installed codec can decode {ts_text} (missing {missing or 'plug-ins'})", reason="no-codec"
        )
    if decoder.is_native:
        element = ds[pixels.pixel_keyword]
        value = element.value
        length = len(value) if isinstance(value, (bytes, bytearray)) else None
        if ds[pixels.pixel_keyword].is_undefined_length:
            raise UnreadableInput(
                f"pixel data is encapsulated but the transfer syntax is {ts_text}", reason="invalid-attribute"
            )
        if length is not None and length < _expected_native_bytes(header, pixels):
            raise UnreadableInput(
                f"pixel data holds {length} bytes but Rows, Columns, frames and Bits Allocated "
                f"need {_expected_native_bytes(header, pixels)}: the file is truncated or inconsistent",
                reason="truncated",
            )
    return decoder, ts_text


def _frame_groups(ds: Dataset, index: int) -> list[Dataset]:
    """Per-frame then shared functional group items that apply to frame ``index`` (0-based)."""
    groups = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and index < len(per_frame):
        groups.append(per_frame[index])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    return groups


def _functional_item(ds: Dataset, index: int, sequence_keyword: str) -> Dataset | None:
    for group in _frame_groups(ds, index):
        seq = group.get(sequence_keyword)
        if seq:
            return seq[0]
    return None


def _first_float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        if not len(value):
            return None
        value = value[0]
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _apply_modality(values: np.ndarray, ds: Dataset, index: int) -> np.ndarray:
    """Modality LUT Sequence or Rescale Slope/Intercept (frame-level first)."""
    item = _functional_item(ds, index, "PixelValueTransformationSequence") or ds
    if item is ds and "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        try:
            return np.asarray(apply_modality_lut(values, ds), dtype=np.float64)
        except Exception as exc:  # noqa: BLE001 - pydicom and the codecs raise many types; all mean one thing here
            logger.warning("ignoring unusable Modality LUT (%s)", describe(exc))
            return values
    slope = _first_float(item.get("RescaleSlope"))
    intercept = _first_float(item.get("RescaleIntercept"))
    if slope is None and intercept is None:
        return values
    if slope is None or slope == 0:
        slope = 1.0
    return values * slope + (intercept or 0.0)


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2 windowing to [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(np.clip(-4.0 * (values - center) / width, -700, 700)))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width == 1:
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _apply_voi(values: np.ndarray, ds: Dataset, index: int) -> np.ndarray | None:
    """VOI LUT (first) or first window, to [0, 1]; None when the object defines neither."""
    frame_voi = _functional_item(ds, index, "FrameVOILUTSequence")
    if frame_voi is None and ds.get("VOILUTSequence"):
        from pydicom.pixels import apply_voi

        try:
            item = ds.VOILUTSequence[0]
            nr_entries = int(item.LUTDescriptor[0]) or 65536
            first_map = int(item.LUTDescriptor[1])
            table = np.asarray(
                apply_voi(np.arange(first_map, first_map + nr_entries), ds, 0), dtype=np.float64
            )
            mapped = np.asarray(apply_voi(values, ds, 0), dtype=np.float64)
            low, high = float(table.min()), float(table.max())
            if high > low:
                return (mapped - low) / (high - low)
            logger.warning("ignoring constant VOI LUT")
        except Exception as exc:  # noqa: BLE001 - pydicom and the codecs raise many types; all mean one thing here
            logger.warning("ignoring unusable VOI LUT (%s); trying the window", describe(exc))
    source = frame_voi if frame_voi is not None else ds
    center = _first_float(source.get("WindowCenter"))
    width = _first_float(source.get("WindowWidth"))
    if center is None or width is None:
        return None
    function = _text(source, "VOILUTFunction").upper() or "LINEAR"
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        logger.warning("unknown VOI LUT Function; using LINEAR")
        function = "LINEAR"
    if width <= 0 or (function == "LINEAR" and width < 1):
        logger.warning("ignoring invalid Window Width %s", width)
        return None
    return _window(values, center, width, function)


def _min_max(values: np.ndarray) -> np.ndarray:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape, dtype=np.float64)
    low, high = float(finite.min()), float(finite.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.float64)
    return (np.nan_to_num(values, nan=low, posinf=high, neginf=low) - low) / (high - low)


def _luma(rgb: np.ndarray, max_value: float) -> np.ndarray:
    rgb = rgb.astype(np.float64, copy=False)
    grey = rgb[..., 0] * _LUMA[0] + rgb[..., 1] * _LUMA[1] + rgb[..., 2] * _LUMA[2]
    return np.clip(grey / max_value, 0.0, 1.0) if max_value > 0 else _min_max(grey)


def _display_frame(
    raw: np.ndarray, photometric: str, ds: Dataset, index: int, pixels: _PixelModule
) -> np.ndarray:
    """One decoded frame (as pydicom returns it) -> 2-D float64 in [0, 1]."""
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        if raw.ndim != 2:
            raise DecodeError(
                f"{photometric} frame decoded to shape {raw.shape}, expected 2-D",
                reason="corrupt-pixel-data",
            )
        values = raw.astype(np.float64)
        if pixels.pixel_keyword == "PixelData":
            values = _apply_modality(values, ds, index)
        shown = _apply_voi(values, ds, index)
        if shown is None:
            shown = _min_max(values)
        return 1.0 - shown if photometric == "MONOCHROME1" else shown
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        try:
            rgb = apply_color_lut(raw, ds)
            entries, first = (
                int(ds.RedPaletteColorLookupTableDescriptor[0]) or 65536,
                int(ds.RedPaletteColorLookupTableDescriptor[1]),
            )
            # normalise by the palette's own largest entry: some writers store 8-bit values
            # in 16-bit tables, so the descriptor's bit depth is not a reliable white point
            palette_max = float(np.max(apply_color_lut(np.arange(first, first + entries), ds)))
        except Exception as exc:  # noqa: BLE001 - pydicom and the codecs raise many types; all mean one thing here
            raise DecodeError(
                f"palette colour lookup failed ({describe(exc)})", reason="corrupt-palette"
            ) from None
        return _luma(rgb, palette_max)
    if photometric.startswith("YBR_FULL") and raw.ndim == 3:
        from pydicom.pixels import convert_color_space

        raw = convert_color_space(raw, "YBR_FULL", "RGB")
        photometric = "RGB"
    if (
        photometric in ("RGB", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "YBR_PARTIAL_422")
        and raw.ndim == 3
        and raw.shape[-1] == 3
    ):
        if photometric.startswith("YBR_PARTIAL"):
            raise UnsupportedInput(
                f"photometric interpretation {photometric} is not supported",
                reason="unsupported-photometric",
            )
        return _luma(raw, float(2 ** min(pixels.bits_stored, 32) - 1))
    named = _term(photometric, _PHOTOMETRIC_TERMS) if photometric else "unset"
    raise UnsupportedInput(
        f"photometric interpretation {named} with "
        f"{pixels.samples_per_pixel} sample(s) per pixel is not supported",
        reason="unsupported-photometric",
    )


_JPEG_SYNTAXES = frozenset(f"1.2.840.10008.1.2.4.{n}" for n in (50, 51, 57, 70, 80, 81))
_J2K_SYNTAXES = frozenset(f"1.2.840.10008.1.2.4.{n}" for n in (90, 91, 92, 93, 201, 202, 203))
# Start of Frame markers: JPEG processes (not DHT C4, JPG C8, DAC CC) and JPEG-LS SOF55
_SOF_MARKERS = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}) | {0xF7}


def codestream_size(transfer_syntax_uid: str, frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) a JPEG, JPEG-LS or JPEG 2000 codestream says it holds, from its own header;
    None for other syntaxes or when the header cannot be found in the first 64 KiB."""
    head = bytes(frame[: 64 * 1024])
    if transfer_syntax_uid in _J2K_SYNTAXES:
        at = head.find(b"\xff\x4f\xff\x51")  # SOC then SIZ
        if at < 0 or at + 24 > len(head):
            return None
        width, height, x0, y0 = struct.unpack_from(">IIII", head, at + 8)
        return height - y0, width - x0
    if transfer_syntax_uid in _JPEG_SYNTAXES:
        at = head.find(b"\xff\xd8")
        while 0 <= at < len(head) - 9:
            if head[at] != 0xFF:
                return None
            marker = head[at + 1]
            if marker == 0xFF:  # fill byte
                at += 1
            elif marker in _SOF_MARKERS:
                height, width = struct.unpack_from(">HH", head, at + 5)
                return height, width
            elif marker == 0xD8 or 0xD0 <= marker <= 0xD7 or marker == 0x01:
                at += 2
            else:
                at += 2 + struct.unpack_from(">H", head, at + 2)[0]
    return None


def _check_codestreams(ds: Dataset, header: InstanceHeader, pixels: _PixelModule, indices: list[int]) -> None:
    """A compressed frame must be the size Rows and Columns say, before a codec allocates it: a
    small object can carry a 16000×16000 codestream."""
    if header.transfer_syntax_uid not in _JPEG_SYNTAXES | _J2K_SYNTAXES:
        return
    from pydicom.encaps import get_frame

    for index in indices:
        try:
            frame = get_frame(ds[pixels.pixel_keyword].value, index, number_of_frames=header.number_of_frames)
        except Exception:  # noqa: BLE001 - a broken encapsulation is the codec's to report
            return
        size = codestream_size(header.transfer_syntax_uid, frame)
        if size is not None and size != (header.rows, header.columns):
            raise DecodeError(
                f"frame {index + 1} is a {size[0]}×{size[1]} codestream but Rows and Columns say "
                f"{header.rows}×{header.columns}",
                reason="corrupt-pixel-data",
            )


def _decode_image(
    ds: Dataset, header: InstanceHeader, frames: str, limits: DecodeLimits
) -> list[DecodedFrame]:
    pixels = _pixel_module(ds, header)
    count = header.number_of_frames
    indices = [(count + 1) // 2 - 1] if frames == "middle" else list(range(count))
    _check_image_limits(header, pixels, len(indices), limits)
    decoder, ts_text = _decoder_for(ds, header, pixels)
    _check_codestreams(ds, header, pixels, indices)
    decoded = []
    for index in indices:
        try:
            # pydicom 3.0 annotates **kwargs as DecodeOptions rather than Unpack[DecodeOptions]
            raw, meta = decoder.as_array(ds, index=index, as_rgb=True)  # type: ignore[arg-type]
        except CbmirError:
            raise
        except Exception as exc:  # noqa: BLE001 - codec and pydicom errors of any type mean "cannot decode"
            raise _codec_error(ts_text, header, pixels, index, exc) from None
        except BaseException as exc:
            if not _is_codec_panic(exc):
                raise
            raise DecodeError(
                f"frame {index + 1} of {ts_text}: the codec aborted on corrupt data ({describe(exc)})",
                reason="corrupt-pixel-data",
            ) from None
        photometric = str(meta.get("photometric_interpretation", pixels.photometric)).upper()
        shown = _display_frame(raw, photometric, ds, index, pixels)
        image = np.ascontiguousarray(np.nan_to_num(shown, nan=0.0), dtype=np.float32)
        decoded.append(DecodedFrame(frame_number=index + 1, image=image))
    return decoded


def _is_codec_panic(exc: BaseException) -> bool:
    """Rust plug-ins (pylibjpeg-rle) raise pyo3's PanicException, a BaseException, on bad input."""
    return type(exc).__name__ == "PanicException"


def _codec_error(
    ts_text: str, header: InstanceHeader, pixels: _PixelModule, index: int, exc: Exception
) -> CbmirError:
    if header.transfer_syntax_uid == JPEG_EXTENDED_12BIT and pixels.bits_stored > 8:
        return DecodeError(
            f"cannot decode {ts_text} with {pixels.bits_stored}-bit samples: lossy JPEG with more "
            "than 8 bits per sample (process 4, 12-bit) is not supported by the installed codecs "
            "(pylibjpeg-libjpeg, Pillow). Ask the sender "
            "for JPEG Lossless, JPEG-LS, JPEG 2000 or uncompressed, or transcode the file "
            "(e.g. dcmtk 'dcmdjpeg'); the stored file is kept unchanged",
            reason="jpeg-12bit-lossy",
        )
    if isinstance(exc, MemoryError):
        return TooLarge(f"not enough memory to decode frame {index + 1}", reason="out-of-memory")
    return DecodeError(
        f"frame {index + 1} of {ts_text} could not be decoded ({describe(exc)})", reason="corrupt-pixel-data"
    )


# --- waveforms -----------------------------------------------------------------------------------

_WAVEFORM_DTYPES = {
    (8, "SB"): "i1",
    (8, "UB"): "u1",
    (16, "SS"): "i2",
    (16, "US"): "u2",
    (32, "SL"): "i4",
    (32, "UL"): "u4",
    (64, "SV"): "i8",
    (64, "UV"): "u8",
}
_UNITS_TO_UV = {"uv": 1.0, "µv": 1.0, "mv": 1e3, "v": 1e6, "nv": 1e-3}


def _waveform_channel_uv(ds: Dataset, limits: DecodeLimits) -> tuple[np.ndarray, float]:
    """First channel of the first multiplex group, in µV, and its sampling frequency."""
    sequence = ds.get("WaveformSequence")
    if not sequence:
        raise UnreadableInput("Waveform Sequence is empty", reason="missing-waveform")
    group = sequence[0]
    missing = [
        k
        for k in (
            "NumberOfWaveformChannels",
            "NumberOfWaveformSamples",
            "SamplingFrequency",
            "WaveformBitsAllocated",
            "WaveformSampleInterpretation",
            "WaveformData",
        )
        if group.get(k) in (None, "", b"")
    ]
    if missing:
        raise UnreadableInput(
            f"waveform multiplex group incomplete: {', '.join(missing)} missing", reason="missing-attribute"
        )
    channels = _int_attr(group, "NumberOfWaveformChannels", 0)
    samples = _int_attr(group, "NumberOfWaveformSamples", 0)
    bits = _int_attr(group, "WaveformBitsAllocated", 0)
    interpretation = _text(group, "WaveformSampleInterpretation").upper()
    sampling_hz = _first_float(group.get("SamplingFrequency"))
    if channels < 1 or samples < 1:
        raise UnreadableInput("waveform has no channels or no samples", reason="invalid-attribute")
    if sampling_hz is None or sampling_hz <= 0 or not math.isfinite(sampling_hz):
        raise UnreadableInput("Sampling Frequency is missing or not positive", reason="invalid-attribute")
    if sampling_hz > MAX_SAMPLING_HZ:
        raise UnsupportedInput(
            f"Sampling Frequency {sampling_hz:g} Hz is above the {MAX_SAMPLING_HZ:g} Hz cbmir draws",
            reason="unsupported-waveform",
        )
    if channels * samples > limits.max_waveform_samples:
        raise TooLarge(
            f"waveform has {channels}×{samples} samples; the limit is {limits.max_waveform_samples:,}",
            reason="too-many-samples",
        )
    dtype_code = _WAVEFORM_DTYPES.get((bits, interpretation))
    if dtype_code is None:
        raise DecodeError(
            f"waveform sample encoding {bits}-bit {_term(interpretation, _WAVEFORM_INTERPRETATIONS)} "
            "is not supported",
            reason="unsupported-waveform-encoding",
        )
    little = _transfer_syntax(ds) != "1.2.840.10008.1.2.2"
    dtype = np.dtype(("<" if little else ">") + dtype_code)
    data = group.WaveformData
    needed = channels * samples * dtype.itemsize
    if not isinstance(data, (bytes, bytearray)) or len(data) < needed:
        raise UnreadableInput(
            f"Waveform Data holds {len(data) if data else 0} bytes, "
            f"{channels} channels × {samples} samples need {needed}",
            reason="truncated",
        )
    raw = np.frombuffer(bytes(data[:needed]), dtype=dtype).reshape(samples, channels)[:, 0]
    values = raw.astype(np.float64)
    definitions = group.get("ChannelDefinitionSequence")
    if definitions:
        channel = definitions[0]
        sensitivity = _first_float(channel.get("ChannelSensitivity"))
        correction = _first_float(channel.get("ChannelSensitivityCorrectionFactor"))
        baseline = _first_float(channel.get("ChannelBaseline")) or 0.0
        unit = ""
        units = channel.get("ChannelSensitivityUnitsSequence")
        if units:
            unit = _text(units[0], "CodeValue")
        if sensitivity is not None and sensitivity != 0:
            values = values * sensitivity * (correction if correction else 1.0) + baseline
            scale = _UNITS_TO_UV.get(unit.lower()) if unit else 1.0
            if scale is None:
                raise UnsupportedInput(
                    f"channel sensitivity unit '…' ({len(unit)} characters) is not uV, mV, V or nV",
                    reason="unsupported-waveform-unit",
                )
            if not unit:
                logger.warning("EEG channel has no sensitivity unit; assuming µV")
            values = values * scale
        else:
            logger.warning("EEG channel has no usable Channel Sensitivity; using raw sample values")
    else:
        logger.warning("EEG multiplex group has no Channel Definition Sequence; using raw values")
    return values, float(sampling_hz)


def read_eeg_waveform(source: DicomSource, *, limits: DecodeLimits | None = None) -> tuple[np.ndarray, float]:
    """First EEG channel of a waveform instance in µV (float64) and the sampling frequency in Hz."""
    limits = limits or DecodeLimits()
    ds = _read_dataset(source, stop_before_pixels=False, max_inflated_bytes=limits.max_inflated_bytes)
    try:
        header = _header_from_dataset(ds)
        if _content_kind(ds, header) != "waveform":
            raise UnsupportedInput(
                f"{_sop_name(header.sop_class_uid)} is not an EEG waveform", reason="not-eeg"
            )
        return _waveform_channel_uv(ds, limits)
    except CbmirError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom and the codecs raise many types; all mean one thing here
        raise UnreadableInput(f"waveform could not be read ({describe(exc)})", reason="parse-error") from None


def _render_eeg(samples_uv: np.ndarray, sampling_hz: float, render: str) -> np.ndarray:
    try:
        from models.eeg import render_eeg
    except ImportError as exc:
        raise ConfigError(
            f"EEG renderer models.eeg.render_eeg unavailable ({exc})",
            reason="eeg-renderer-missing",
        ) from None
    try:
        picture = np.asarray(render_eeg(samples_uv, sampling_hz, render))
    except CbmirError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom and the codecs raise many types; all mean one thing here
        raise DecodeError(
            f"EEG trace could not be rendered ({describe(exc)})", reason="eeg-render-failed"
        ) from None
    if picture.ndim != 2:
        raise DecodeError(f"EEG renderer returned shape {picture.shape}", reason="eeg-render-failed")
    scale = 255.0 if picture.dtype == np.uint8 else max(float(picture.max()), 1.0)
    return np.ascontiguousarray(picture.astype(np.float32) / np.float32(scale))


# --- the worker's entry point --------------------------------------------------------------------


def decode_for_embedding(
    source: DicomSource,
    *,
    frames: FramePolicy = "middle",
    limits: DecodeLimits | None = None,
    patient_key_secret: bytes | None = None,
    eeg_render: str = "trace",
) -> tuple[InstanceHeader, list[DecodedFrame]]:
    """Header plus display-ready frames of one instance (image or EEG waveform).

    ``frames="middle"``: only the central frame ``(n + 1) // 2`` (1-based); ``"all"``: every
    frame in order. An EEG waveform is drawn by ``eeg_render`` (``models.eeg.render_eeg``; pass
    the encoder's ``contract.eeg_render``). Raises only :mod:`services.core.errors` classes.
    """
    if frames not in ("middle", "all"):
        raise InvalidInput(f"frames must be middle or all, got {frames!r}")
    limits = limits or DecodeLimits()
    ds = _read_dataset(source, stop_before_pixels=False, max_inflated_bytes=limits.max_inflated_bytes)
    try:
        header = _header_from_dataset(ds, patient_key_secret)
        kind = _content_kind(ds, header)
        if kind == "waveform":
            samples_uv, sampling_hz = _waveform_channel_uv(ds, limits)
    except CbmirError:
        raise
    except Exception as exc:  # noqa: BLE001 - lazily parsed elements can fail on first access
        raise UnreadableInput(
            f"instance could not be parsed ({describe(exc)})", reason="parse-error"
        ) from None
    if kind == "waveform":
        decoded = [DecodedFrame(frame_number=1, image=_render_eeg(samples_uv, sampling_hz, eeg_render))]
    else:
        try:
            decoded = _decode_image(ds, header, frames, limits)
        except CbmirError:
            raise
        except MemoryError:
            raise TooLarge("not enough memory to decode the pixel data", reason="out-of-memory") from None
        except Exception as exc:  # noqa: BLE001 - pydicom and the codecs raise many types; all mean one thing here
            raise DecodeError(
                f"pixel data could not be decoded ({describe(exc)})", reason="corrupt-pixel-data"
            ) from None
    logger.debug("decoded %s (%s, %d frame(s))", header.sop_instance_uid, header.modality, len(decoded))
    return header, decoded
