"""Building DICOM objects: the modules every object cbmir writes shares.

Used by ``cbmir dicomize`` (the shared corpus as a modality would send it) and by the watcher's
file converter (PNG/JPEG and EDF into DICOM). Patients are synthetic: objects built here carry no
real identifiers, and say so (Patient Identity Removed, De-identification Method).
"""

from __future__ import annotations

import datetime as dt
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from services.core.errors import StorageError

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.1"  # pydicom's root + .1 (as pydicom writes)


@dataclass(frozen=True)
class InstanceIdentity:
    """Where one object sits: synthetic patient, study, series, instance."""

    patient_id: str
    study_uid: str
    series_uid: str
    instance_uid: str
    frame_of_reference_uid: str
    study_time: dt.datetime
    instance_number: int


def coded_entry(value: str, scheme: str, meaning: str) -> Dataset:
    """A code sequence item (Code Value, Coding Scheme Designator, Code Meaning)."""
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def base_dataset(
    sop_class: str,
    modality_code: str,
    identity: InstanceIdentity,
    *,
    study_description: str,
    series_description: str,
    software: str = "cbmir dicomize",
) -> Dataset:
    """File meta, SOP Common, Patient, General Study/Series/Equipment for a new object.

    ``software`` names the builder in Manufacturer's Model Name, Software Versions and the
    Implementation Version Name.
    """
    date, time = identity.study_time.strftime("%Y%m%d"), identity.study_time.strftime("%H%M%S")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(identity.instance_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    ds.file_meta.ImplementationVersionName = software.upper().replace(" ", "_")[:16]
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = identity.instance_uid
    ds.StudyDate, ds.StudyTime = date, time
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.ContentDate, ds.ContentTime = date, time
    ds.AccessionNumber = ""
    ds.Modality = modality_code
    ds.Manufacturer = "cbmir"
    ds.InstitutionName = "cbmir synthetic corpus"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study_description
    ds.SeriesDescription = series_description
    ds.ManufacturerModelName = software
    ds.PatientName = f"CBMIR^{identity.patient_id[6:]}"
    ds.PatientID = identity.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "synthetic patient; no identifiers in the public source"
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = f"{software} 1"
    ds.StudyInstanceUID = identity.study_uid
    ds.SeriesInstanceUID = identity.series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = identity.instance_number
    return ds


def eeg_waveform_group(
    stored: np.ndarray, sampling_hz: str | float, sensitivity: str | float, baseline: str | float
) -> Dataset:
    """One multiplex group with one EEG channel: ``stored`` int16 samples, µV = stored x sensitivity
    + baseline (UCUM ``uV``, correction factor 1), lead Cz as a nominal source."""
    group = Dataset()
    group.WaveformOriginality = "ORIGINAL"
    group.NumberOfWaveformChannels = 1
    group.NumberOfWaveformSamples = int(stored.size)
    group.SamplingFrequency = sampling_hz
    group.MultiplexGroupLabel = "EEG"
    channel = Dataset()
    channel.WaveformChannelNumber = 1
    channel.ChannelLabel = "EEG"
    channel.ChannelStatus = "OK"
    channel.ChannelSourceSequence = [coded_entry("7:1016", "MDC", "Cz")]  # nominal: not in the sources
    channel.ChannelSensitivity = sensitivity
    channel.ChannelSensitivityUnitsSequence = [coded_entry("uV", "UCUM", "microvolt")]
    channel.ChannelSensitivityCorrectionFactor = 1
    channel.ChannelBaseline = baseline
    channel.ChannelTimeSkew = 0
    channel.WaveformBitsStored = 16
    group.ChannelDefinitionSequence = [channel]
    group.WaveformBitsAllocated = 16
    group.WaveformSampleInterpretation = "SS"
    group.WaveformData = np.ascontiguousarray(stored, dtype="<i2").tobytes()
    return group


def dataset_bytes(ds: Dataset) -> bytes:
    """Part 10 bytes (preamble, File Meta) of a dataset built here."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_dataset(ds: Dataset, out_path: str | os.PathLike[str]) -> Path:
    """Write a Part 10 file (preamble, File Meta), creating folders."""
    out_path = Path(out_path)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out_path, enforce_file_format=True)
    except OSError as exc:
        raise StorageError(f"cannot write {out_path}: {exc.strerror or exc}") from None
    return out_path
