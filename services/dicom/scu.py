"""Sending DICOM files over a real association (pynetdicom as the SCU).

The demo and the service-level evaluation push files the way a modality or PACS would. Each file
is proposed in its own transfer syntax and sent in it, so nothing is transcoded. (pynetdicom can
also send a file's dataset bytes unparsed, but only through a process-wide switch,
``_config.STORE_SEND_CHUNKED_DATASET``; files are read with pydicom instead.)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom import AE
from tqdm import tqdm

from services.core.errors import BackendUnavailable

logger = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # presentation contexts one association may propose


def _context_key(path: Path) -> tuple[str, str]:
    meta = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[]).file_meta
    return str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)


def encodes_as_stored(ds: Dataset) -> bool:
    """Whether pydicom can write ``ds`` back in its own transfer syntax, as the C-STORE will send it.

    Some files declare one transfer syntax and hold another (pydicom reads them anyway); those
    cannot be re-encoded, and pynetdicom would refuse them with a logged traceback.
    """
    syntax = ds.file_meta.TransferSyntaxUID
    buffer = DicomBytesIO()
    buffer.is_implicit_VR, buffer.is_little_endian = syntax.is_implicit_VR, syntax.is_little_endian
    try:
        write_dataset(buffer, ds)
    except Exception:  # noqa: BLE001 - pydicom raises many types for values it cannot encode
        return False
    return True


def sendable(path: Path) -> bool:
    """Whether :func:`send_files` can send the file at ``path`` as stored."""
    try:
        return encodes_as_stored(pydicom.dcmread(path))
    except Exception:  # noqa: BLE001 - a file pydicom cannot read is not sendable, whatever it raises
        return False


def send_files(
    host: str,
    port: int,
    files: Iterable[Path],
    *,
    called_ae: str = "CBMIR",
    calling_ae: str = "CBMIR-SCU",
    progress: tqdm[Any] | None = None,
) -> dict[Path, int]:
    """C-STORE every file; returns each file's DICOM status (-1 when it could not be sent)."""
    groups: list[tuple[set[tuple[str, str]], list[Path]]] = []
    statuses: dict[Path, int] = {}
    for path in map(Path, files):
        try:
            key = _context_key(path)
        except Exception as exc:  # noqa: BLE001 - a file pydicom cannot frame is reported, not fatal
            logger.warning("%s: not sendable (%s)", path.name, exc)
            statuses[path] = -1
            continue
        for contexts, members in groups:
            if key in contexts or len(contexts) < MAX_CONTEXTS:
                contexts.add(key)
                members.append(path)
                break
        else:
            groups.append(({key}, [path]))
    for contexts, members in groups:
        ae = AE(ae_title=calling_ae)
        for sop_class, syntax in sorted(contexts):
            ae.add_requested_context(sop_class, syntax)
        assoc = ae.associate(host, port, ae_title=called_ae)
        if not assoc.is_established:
            raise BackendUnavailable(f"association with {called_ae}@{host}:{port} was not established")
        try:
            for path in members:
                try:
                    ds = pydicom.dcmread(path)
                    if not encodes_as_stored(ds):
                        logger.warning(
                            "%s: not sent (its data set cannot be encoded in its own transfer syntax)",
                            path.name,
                        )
                        statuses[path] = -1
                    else:
                        status = assoc.send_c_store(ds)
                        statuses[path] = int(status.Status) if status else -1
                except Exception as exc:  # noqa: BLE001 - e.g. no accepted context for this file
                    logger.warning("%s: not sent (%s)", path.name, exc)
                    statuses[path] = -1
                if progress is not None:
                    progress.update(1)
        finally:
            assoc.release()
    return statuses
