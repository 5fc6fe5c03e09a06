"""The shared vocabulary: modality names, their codes in DICOM and in the API, accepted SOP classes.

This is the one place these facts are written down; every other module imports them.

* **Modalities.** The four the encoder is trained on (``XRAY``, ``MRI``, ``OCT``, ``EEG``) come
  from the bottom layer (:mod:`models.data`, since ``models/`` imports nothing of ours) and are
  re-exported here; ``OTHER`` is everything else an image storage SOP class can carry (CT, US...).
* **In the API** each name is the ``cbmir.v1.Modality`` value ``MODALITY_<NAME>``.
* **In DICOM** an instance's modality comes from its Modality attribute, else its SOP class
  (:func:`normalize_modality`); objects cbmir builds itself carry :data:`DICOM_MODALITY_CODES`.
* **Accepted SOP classes** are every image storage class pynetdicom knows plus the EEG waveforms
  (:func:`accepted_storage_classes`): what the listener negotiates and the watcher accepts.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from types import MappingProxyType

from models.data import EEG, MRI, OCT, XRAY
from models.data import MODALITIES as TRAINED_MODALITIES
from services.grpc_gen.cbmir.v1 import search_pb2

OTHER = "other"
MODALITIES: tuple[str, ...] = (*TRAINED_MODALITIES, OTHER)

# name <-> cbmir.v1.Modality; MODALITY_UNSPECIFIED (0) has no name.
MODALITY_TO_PB: dict[str, search_pb2.Modality] = {
    name: getattr(search_pb2, f"MODALITY_{name.upper()}") for name in MODALITIES
}
PB_TO_MODALITY: dict[int, str] = {value: name for name, value in MODALITY_TO_PB.items()}

# Where a case comes from: the curated reference library (with verified findings) or the clinical
# stream (the PACS, the watcher); name <-> cbmir.v1.CaseSource (CASE_SOURCE_ANY has no name).
LIBRARY = "library"
CLINICAL = "clinical"
SOURCE_TO_PB: dict[str, search_pb2.CaseSource] = {
    LIBRARY: search_pb2.CASE_SOURCE_LIBRARY,
    CLINICAL: search_pb2.CASE_SOURCE_CLINICAL,
}
PB_TO_SOURCE: dict[int, str] = {value: name for name, value in SOURCE_TO_PB.items()}
# How hits are counted: name ("instance", "study") <-> cbmir.v1.GroupBy.
GROUP_BY_TO_PB: dict[str, search_pb2.GroupBy] = {
    "instance": search_pb2.GROUP_BY_INSTANCE,
    "study": search_pb2.GROUP_BY_STUDY,
}
# A finding label of the reference library: a short lower-case term of one to four words joined by
# "_" or "-" ("glioma", "bacterial", "interictal_focal"), at most 32 characters; never free text.
FINDING_PATTERN = re.compile(r"^(?=.{1,32}$)[a-z][a-z0-9]*(?:[_-][a-z0-9]+){0,3}$")

# The DICOM Modality (0008,0060) of objects cbmir builds for each modality (dicomize, the watcher).
DICOM_MODALITY_CODES: dict[str, str] = {XRAY: "CR", MRI: "MR", OCT: "OPT", EEG: "EEG", OTHER: "OT"}

# The Defined Terms of Modality (0008,0060), PS3.3 C.7.3.1.1.1, current and retired. Only these
# are kept from an object: anything else there is free text (a misconfigured modality can put a
# patient's name in it), and free text never reaches a payload, a log or an answer.
_MODALITY_TERMS_TEXT = """
    ANN AR ASMT AU BDUS BI BMD CFM CR CT CTPROTOCOL DG DMS DOC DX ECG EEG EMG EOG EPS ES FID GM HC
    HD IO IOL IVOCT IVUS KER KO LEN LS M3D MG MR NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PA
    PLAN POS PR PT PX REG RESP RF RG RTDOSE RTIMAGE RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT
    RWV SEG SM SMR SR SRF STAIN TEXTUREMAP TG US VA XA XAPROTOCOL XC
    AS CD CF CP CS DD DF DM DS EC FA FS LP MA MS OPR ST VF"""
DICOM_MODALITY_TERMS = frozenset(_MODALITY_TERMS_TEXT.split())


def modality_term(value: str | None) -> str:
    """``value`` as a Modality Defined Term, or ``""`` when it is not one."""
    term = (value or "").strip().upper()
    return term if term in DICOM_MODALITY_TERMS else ""


# --- SOP classes ---------------------------------------------------------------------------------
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4.1"
ENHANCED_MR_COLOR_IMAGE = "1.2.840.10008.5.1.4.1.1.4.3"
OPHTHALMIC_TOMOGRAPHY_IMAGE = "1.2.840.10008.5.1.4.1.1.77.1.5.4"
OCT_BSCAN_VOLUME_ANALYSIS = "1.2.840.10008.5.1.4.1.1.77.1.5.8"
SECONDARY_CAPTURE_IMAGE = "1.2.840.10008.5.1.4.1.1.7"
ROUTINE_SCALP_EEG = "1.2.840.10008.5.1.4.1.1.9.7.1"
SLEEP_EEG = "1.2.840.10008.5.1.4.1.1.9.7.4"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

XRAY_MODALITY_CODES = frozenset({"CR", "DX", "RG"})
XRAY_SOP_CLASSES = frozenset({CR_IMAGE, DX_FOR_PRESENTATION, DX_FOR_PROCESSING})
MRI_SOP_CLASSES = frozenset({MR_IMAGE, ENHANCED_MR_IMAGE, ENHANCED_MR_COLOR_IMAGE})
OCT_SOP_CLASSES = frozenset({OPHTHALMIC_TOMOGRAPHY_IMAGE, OCT_BSCAN_VOLUME_ANALYSIS})
EEG_SOP_CLASSES = frozenset({ROUTINE_SCALP_EEG, SLEEP_EEG})

# pynetdicom's names of the two EEG waveform classes the listener accepts besides images.
EEG_WAVEFORM_CLASS_NAMES = (
    "RoutineScalpElectroencephalogramWaveformStorage",
    "SleepElectroencephalogramWaveformStorage",
)
# pynetdicom's name for OCT B-scan Volume Analysis (1.2.840.10008.5.1.4.1.1.77.1.5.8) is misspelt
# and has no "Image" in it.
EXTRA_IMAGE_CLASS_NAMES = ("OphthlamicOpticalCoherenceTomographyBscanVolumeAnalysisStorage",)


UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"  # a DICOM UID's characters; at most 64 of them
_UID_PATTERN = re.compile(UID_PATTERN)


def is_valid_uid(uid: str) -> bool:
    """A DICOM UID: digits and dots, at most 64 characters (PS3.5 9.1)."""
    return len(uid) <= 64 and bool(_UID_PATTERN.match(uid))


_MODALITY_BY_CODE = {
    code: name for name, code in DICOM_MODALITY_CODES.items() if name != OTHER
} | dict.fromkeys(XRAY_MODALITY_CODES, XRAY)
_SOP_CLASSES_BY_MODALITY = (
    (XRAY, XRAY_SOP_CLASSES),
    (MRI, MRI_SOP_CLASSES),
    (OCT, OCT_SOP_CLASSES),
    (EEG, EEG_SOP_CLASSES),
)


def normalize_modality(modality_code: str | None, sop_class_uid: str | None) -> str:
    """DICOM Modality + SOP Class UID -> one of :data:`MODALITIES` (the code wins over the class)."""
    code = (modality_code or "").strip().upper()
    sop = (sop_class_uid or "").strip()
    if code in _MODALITY_BY_CODE:
        return _MODALITY_BY_CODE[code]
    return next((modality for modality, classes in _SOP_CLASSES_BY_MODALITY if sop in classes), OTHER)


def accepted_storage_classes() -> Mapping[str, str]:
    """Every image storage SOP class pynetdicom knows, plus the EEG waveforms (name -> UID), read-only."""
    return _accepted_storage_classes()


@functools.cache
def _accepted_storage_classes() -> MappingProxyType[str, str]:
    import pynetdicom.sop_class as sop_classes

    accepted = {}
    for name in dir(sop_classes):
        # DX, mammography and intra-oral classes end in "StorageForPresentation"/"...ForProcessing"
        if not name.endswith(("Storage", "StorageForPresentation", "StorageForProcessing")):
            continue
        if (
            ("Image" in name and "PresentationState" not in name)
            or name in EEG_WAVEFORM_CLASS_NAMES
            or name in EXTRA_IMAGE_CLASS_NAMES
        ):
            accepted[name] = str(getattr(sop_classes, name))
    return MappingProxyType(dict(sorted(accepted.items())))


def accepted_sop_class_uids() -> frozenset[str]:
    """The UIDs of :func:`accepted_storage_classes`."""
    return frozenset(accepted_storage_classes().values())
