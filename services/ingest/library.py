"""The reference library's findings: which indexed instances are curated cases, and their labels.

``cbmir library import`` spools a labelled collection like any other instance and records each
instance's verified finding here first, as ``<data>/library/<SOP Instance UID>.json``, with the
SHA-256 of the object it imported. Workers and the reindex attach the finding to a point
(``finding`` and ``source=library`` in its payload) only when the object they index is that very
object, so the label survives a reindex, and an object a DICOM sender sends under a library case's
SOP Instance UID (which every hit shows) is indexed as a clinical case without a finding. Only
``cbmir library import`` (an operator with the data folder) can label a case; erasure removes the
record with the instance.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from services.core.config import DataLayout
from services.core.errors import InvalidInput, StorageError
from services.core.files import fsync_dir
from services.core.vocabulary import FINDING_PATTERN, MODALITIES, is_valid_uid

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LibraryRecord:
    """One curated instance: its modality, verified finding and the collection it came from."""

    sop_instance_uid: str
    modality: str
    finding: str
    collection: str
    imported_at: float
    sha256: str  # of the imported object: the finding belongs to these bytes only


def check_finding(finding: str) -> str:
    """The finding label in lower case; InvalidInput when it is not a short term (one to four
    words joined by ``_`` or ``-``, at most 32 characters): free text could carry patient data."""
    label = finding.strip().lower()
    if not FINDING_PATTERN.match(label):
        raise InvalidInput(
            "a finding label is one to four words of letters and digits joined by _ or -, "
            "at most 32 characters (e.g. glioma, interictal_focal)"
        )
    return label


class ReferenceLibrary:
    """The findings of the curated reference library under ``<data>/library``; safe to share
    between processes (every record is written atomically and fsynced)."""

    def __init__(self, layout: DataLayout):
        self.folder = layout.library

    def _path(self, sop_instance_uid: str) -> Path:
        if not is_valid_uid(sop_instance_uid):
            raise InvalidInput("a library record needs a valid SOP Instance UID")
        return self.folder / f"{sop_instance_uid}.json"

    def record(
        self, sop_instance_uid: str, modality: str, finding: str, collection: str, data: bytes
    ) -> LibraryRecord:
        """Record (or replace) the finding of the object ``data``, durably, before it is spooled."""
        if modality not in MODALITIES:
            raise InvalidInput(f"modality must be one of {', '.join(MODALITIES)}")
        entry = LibraryRecord(
            sop_instance_uid,
            modality,
            check_finding(finding),
            collection,
            time.time(),
            hashlib.sha256(data).hexdigest(),
        )
        final = self._path(sop_instance_uid)
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = final.with_suffix(f".{os.getpid()}.tmp")
        try:
            with open(tmp, "w") as handle:
                json.dump(entry.__dict__, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, final)
            fsync_dir(self.folder)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise StorageError(f"cannot write the library record into {self.folder}: {exc.strerror}") from exc
        return entry

    def get(self, sop_instance_uid: str) -> LibraryRecord | None:
        """The instance's record, or None when it is not a library case (or the record is unreadable)."""
        try:
            data = json.loads(self._path(sop_instance_uid).read_text())
            return LibraryRecord(**data)
        except FileNotFoundError:
            return None
        except InvalidInput:
            return None
        except (OSError, ValueError, TypeError) as exc:
            logger.warning("unreadable library record for %s: %s", sop_instance_uid, type(exc).__name__)
            return None

    def finding_for(self, sop_instance_uid: str, path: Path) -> str | None:
        """The verified finding of the object at ``path`` when it is the library case imported
        under ``sop_instance_uid``; None for a clinical object (or another object sent under a
        library case's UID: logged)."""
        entry = self.get(sop_instance_uid)
        if entry is None:
            return None
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
        except OSError:
            return None
        if not hmac.compare_digest(digest.hexdigest(), entry.sha256):
            logger.warning(
                "%s has a library record but is not the object imported for it: indexed without a finding",
                sop_instance_uid,
            )
            return None
        return entry.finding

    def forget(self, sop_instance_uids: Iterable[str]) -> int:
        """Remove the records of erased instances; returns how many there were."""
        removed = 0
        for uid in sop_instance_uids:
            if not is_valid_uid(uid):
                continue
            with contextlib.suppress(FileNotFoundError):
                self._path(uid).unlink()
                removed += 1
        if removed:
            fsync_dir(self.folder)
        return removed

    def records(self) -> list[LibraryRecord]:
        """Every record (unreadable ones skipped)."""
        if not self.folder.is_dir():
            return []
        found = []
        for path in sorted(self.folder.glob("*.json")):
            entry = self.get(path.stem)
            if entry is not None:
                found.append(entry)
        return found

    def counts(self) -> Counter[tuple[str, str]]:
        """Records per (modality, finding)."""
        return Counter((entry.modality, entry.finding) for entry in self.records())
