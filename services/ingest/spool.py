"""The durable spool: every acknowledged instance lives on disk until it is indexed or quarantined.

Layout under the data directory (see :class:`services.core.config.DataLayout`)::

    spool/tmp/        partial writes (same filesystem, so the final rename is atomic)
    spool/incoming/   received and acknowledged, waiting for a worker
    archive/          indexed; kept so a reindex can re-embed everything with a new model
    quarantine/       could not be indexed; each object has a ``<name>.reason.json`` beside it

A file moves between these folders only by ``os.replace`` and every write is fsynced, file and
folder, before anyone is told it happened. Nothing here ever deletes the only copy of an object.
"""

from __future__ import annotations

import contextlib
import filecmp
import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from services.core.config import DataLayout
from services.core.errors import StorageError
from services.core.files import fsync_dir
from services.core.logs import file_ref, mask_values
from services.core.vocabulary import is_valid_uid

logger = logging.getLogger(__name__)

REASON_SUFFIX = ".reason.json"
REPLACED_DIR = ".replaced"


def spool_name_for(sop_instance_uid: str, suffix: str = ".dcm") -> str:
    """The file name for an instance: its SOP Instance UID when that is a valid UID, else a hash."""
    uid = (sop_instance_uid or "").strip()
    if is_valid_uid(uid):
        return uid + suffix
    return "x" + hashlib.sha256(uid.encode("utf-8", "replace")).hexdigest()[:40] + suffix


@dataclass(frozen=True)
class QuarantineEntry:
    """A quarantined object's reason file: what, why, at which stage, when."""

    name: str
    reason: str
    detail: str
    stage: str
    quarantined_at: float


class Spool:
    """Durable file store for received objects; safe to share between processes."""

    def __init__(self, layout: DataLayout):
        self.layout = layout
        for folder in (layout.spool_tmp, layout.incoming, layout.attempts, layout.archive, layout.quarantine):
            folder.mkdir(parents=True, exist_ok=True)

    # -- writing ------------------------------------------------------------------------------
    def _write_atomically(self, data: bytes, final: Path) -> Path:
        tmp = self.layout.spool_tmp / f"{final.name}.{os.getpid()}.{time.monotonic_ns()}.part"
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, final)
            fsync_dir(final.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):  # the folder itself is what failed
                tmp.unlink(missing_ok=True)
            raise StorageError(
                f"cannot write {final.name} into {final.parent}: {exc.strerror or exc}"
            ) from exc
        return final

    def store(self, name: str, data: bytes) -> Path:
        """Write ``data`` as ``incoming/<name>``: temp file, fsync, atomic rename, fsync folder.

        A second object with the same name replaces the first (a resent SOP Instance UID).
        """
        return self._write_atomically(data, self.layout.incoming / name)

    def write_tmp(self, name: str, data: bytes) -> Path:
        """Write ``data`` under spool/tmp (not yet durable; :meth:`adopt` makes it so)."""
        tmp = self.layout.spool_tmp / f"{name}.{os.getpid()}.{time.monotonic_ns()}.part"
        try:
            tmp.write_bytes(data)
        except OSError as exc:
            raise StorageError(f"cannot write {name} into {tmp.parent}: {exc.strerror or exc}") from exc
        return tmp

    def adopt(self, received: Path, name: str) -> Path:
        """Make a file already written under ``spool/tmp`` durable as ``incoming/<name>``: fsync it,
        rename it atomically, fsync the folder. No bytes are copied."""
        final = self.layout.incoming / name
        try:
            with open(received, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(received, final)
            fsync_dir(final.parent)
        except OSError as exc:
            raise StorageError(f"cannot spool {name} into {final.parent}: {exc.strerror or exc}") from exc
        return final

    def store_file(self, source: Path, name: str) -> Path:
        """Copy an existing file into ``incoming/<name>`` durably (the source is left alone)."""
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise StorageError(f"cannot read {file_ref(source)}: {exc.strerror or exc}") from exc
        return self.store(name, data)

    # -- lifecycle ----------------------------------------------------------------------------
    def incoming_path(self, name: str) -> Path:
        """Where a spooled object waits for a worker."""
        return self.layout.incoming / _plain_name(name)

    def mark_attempt(self, name: str) -> None:
        """A worker is (still) working on ``name``: the sweep leaves it alone for a while. Best
        effort: a full disk may refuse the marker, which only means an early re-send."""
        marker = self.layout.attempts / _plain_name(name)
        with contextlib.suppress(OSError):
            marker.touch()

    def last_attempt(self, name: str) -> float | None:
        """When a worker last started on ``name`` (None: never, or it is done)."""
        try:
            return (self.layout.attempts / _plain_name(name)).stat().st_mtime
        except OSError:
            return None

    def forget_attempts(self, name: str) -> None:
        """``name`` left the spool (archived or quarantined): its marker goes."""
        with contextlib.suppress(OSError):
            (self.layout.attempts / _plain_name(name)).unlink()

    def archived_path(self, name: str) -> Path:
        """Where an indexed object is kept."""
        return self.layout.archive / _plain_name(name)

    def archive_many(self, names: list[str]) -> dict[str, StorageError]:
        """:meth:`archive` each of ``names``, with one fsync of the archive folder for them all;
        returns the names that could not be archived, with why (the others are archived)."""
        failed: dict[str, StorageError] = {}
        for name in names:
            try:
                self.archive(name, sync=False)
            except StorageError as exc:
                failed[name] = exc
        if len(failed) < len(names):
            try:
                fsync_dir(self.layout.archive)
            except OSError as exc:  # the moves happened; a lost one only means indexing again
                logger.warning("cannot sync the archive folder: %s", exc.strerror or exc)
        return failed

    def archive(self, name: str, *, sync: bool = True) -> Path:
        """Move an indexed object from incoming to the archive (``sync``: and fsync the folder; an
        archive move lost in a crash only means the instance is indexed again, idempotently).

        A SOP Instance UID sent again with other content replaces the archived object, whose
        earlier copy is kept in ``archive/.replaced/<name>.<time>``. A second delivery of the same
        task finds the object archived already and leaves it be.
        """
        source, target = self.incoming_path(name), self.archived_path(name)
        try:
            if not source.exists() and target.exists():
                return target  # archived by another delivery of the same task
            if target.exists() and not filecmp.cmp(source, target, shallow=False):
                kept = self.layout.archive / REPLACED_DIR / f"{name}.{time.time_ns()}"
                kept.parent.mkdir(exist_ok=True)
                os.replace(target, kept)
                fsync_dir(kept.parent)
                logger.info(
                    "%s was sent again with other content; the earlier copy is kept as %s",
                    name,
                    kept.relative_to(self.layout.root),
                )
            os.replace(source, target)
            if sync:
                fsync_dir(target.parent)
            self.forget_attempts(name)
        except FileNotFoundError:
            if target.exists():
                return target  # the same race, decided between our checks
            raise StorageError(f"cannot archive {name}: it is in neither incoming nor archive") from None
        except OSError as exc:
            raise StorageError(f"cannot archive {name}: {exc.strerror or exc}") from exc
        return target

    def quarantine(
        self,
        source: Path,
        *,
        reason: str,
        detail: str,
        stage: str,
        name: str | None = None,
        source_name: str | None = None,
    ) -> Path:
        """Move ``source`` into quarantine with a reason file; never deletes anything.

        ``source_name``: where a dropped file came from (kept in the record, beside the object,
        never logged: a chosen name may carry a patient's name).

        The reason file is written first, so a crash in between leaves an object in its old place
        plus a harmless reason file, never an object without its reason.
        """
        name = _plain_name(name) if name else source.name
        target = self.layout.quarantine / name
        if target.exists() and source.resolve() != target.resolve():
            target = self.layout.quarantine / f"{time.time_ns()}-{name}"
        record = {
            "name": target.name,
            "reason": reason,
            "detail": mask_values(detail)[:2000],  # a second net: quoted values never reach the record
            "stage": stage,
            "quarantined_at": time.time(),
        }
        if source_name is not None:
            record["source"] = source_name
        reason_path = target.with_name(target.name + REASON_SUFFIX)
        self._write_atomically(json.dumps(record, indent=2).encode(), reason_path)
        try:
            if source.parent.resolve() in (
                self.layout.incoming.resolve(),
                self.layout.archive.resolve(),
                self.layout.spool_tmp.resolve(),
            ):
                os.replace(source, target)
            else:
                shutil.copy2(source, target)  # someone else's file (e.g. a watched folder): keep theirs
            fsync_dir(target.parent)
        except OSError as exc:
            raise StorageError(f"cannot quarantine {name}: {exc.strerror or exc}") from exc
        self.forget_attempts(source.name)
        logger.warning(
            "quarantined %s at %s: %s (%s)", file_ref(target.name), stage, reason, mask_values(detail)[:200]
        )
        return target

    ERASED_HOLD_S = 3600.0  # how long an erased instance's in-flight work is kept from indexing it

    def mark_erased(self, name: str) -> None:
        """``name`` is being erased: work already under way for it must not index it again."""
        self.layout.erased.mkdir(parents=True, exist_ok=True)
        marker = self.layout.erased / _plain_name(name)
        marker.touch()
        os.utime(marker)

    def erased_recently(self, name: str) -> bool:
        """Whether ``name`` was erased within :data:`ERASED_HOLD_S` (its markers expire after that,
        so the same SOP Instance UID can be sent and indexed again later)."""
        try:
            erased_at = (self.layout.erased / _plain_name(name)).stat().st_mtime
        except (OSError, StorageError):
            return False
        return time.time() - erased_at < self.ERASED_HOLD_S

    def forget_old_erasures(self) -> int:
        """Remove expired erasure markers; returns how many."""
        removed, cutoff = 0, time.time() - self.ERASED_HOLD_S
        if not self.layout.erased.is_dir():
            return 0
        for marker in self.layout.erased.iterdir():
            with contextlib.suppress(OSError):
                if marker.stat().st_mtime < cutoff:
                    marker.unlink()
                    removed += 1
        return removed

    def unarchive(self, name: str) -> Path:
        """Move an archived object back to incoming, to be embedded again (a repair)."""
        source, target = self.archived_path(name), self.incoming_path(name)
        try:
            os.replace(source, target)
            fsync_dir(target.parent)
        except OSError as exc:
            raise StorageError(f"cannot move {source.name} back to the spool: {exc.strerror or exc}") from exc
        return target

    def requeue_quarantined(self, name: str, as_name: str | None = None) -> Path:
        """Move a quarantined object back to incoming (after a fix), as ``as_name`` if given; its
        reason file is kept as history. StorageError if a newer object has that name already."""
        source = self.layout.quarantine / _plain_name(name)
        target = self.incoming_path(as_name or source.name)
        if target.exists():
            raise StorageError(f"cannot requeue {source.name}: {target.name} waits in the spool already")
        reason = source.with_name(source.name + REASON_SUFFIX)
        try:
            os.replace(source, target)
            if reason.exists():
                os.replace(reason, reason.with_name(reason.name + f".{int(time.time())}.resolved"))
            fsync_dir(target.parent)
        except OSError as exc:
            raise StorageError(f"cannot requeue {source.name}: {exc.strerror or exc}") from exc
        return target

    # -- reading ------------------------------------------------------------------------------
    def pending(self) -> list[Path]:
        """Objects received but not yet indexed, oldest first."""
        return [path for _, path in self.pending_since()]

    def pending_since(self) -> list[tuple[float, Path]]:
        """(time spooled, path) of every object received but not yet indexed, oldest first."""
        dated = []
        for path in self.layout.incoming.iterdir():
            try:
                dated.append((path.stat().st_mtime, path))
            except FileNotFoundError:
                continue  # archived or quarantined by a worker while we listed
        return sorted(dated)

    def remove_stale_tmp(self, older_than_s: float) -> int:
        """Delete partial files in spool/tmp untouched for ``older_than_s`` (their writer is gone; none
        was ever acknowledged); returns how many."""
        removed, cutoff = 0, time.time() - older_than_s
        for path in self.layout.spool_tmp.iterdir():
            try:
                if path.is_file() and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def archived(self) -> list[Path]:
        """Every archived object, by name."""
        return sorted(p for p in self.layout.archive.iterdir() if p.is_file())

    def quarantine_entries(self) -> list[QuarantineEntry]:
        """Every quarantined object's reason record (unreadable reason files are skipped)."""
        entries = []
        for reason_file in sorted(self.layout.quarantine.glob("*" + REASON_SUFFIX)):
            try:
                record = json.loads(reason_file.read_text())
            except (OSError, ValueError):
                continue
            entries.append(
                QuarantineEntry(
                    name=record.get("name", reason_file.name[: -len(REASON_SUFFIX)]),
                    reason=record.get("reason", "unknown"),
                    detail=record.get("detail", ""),
                    stage=record.get("stage", ""),
                    quarantined_at=float(record.get("quarantined_at", 0.0)),
                )
            )
        return entries

    def quarantine_counts(self) -> Counter:
        """Quarantined objects per reason."""
        return Counter(entry.reason for entry in self.quarantine_entries())


def _plain_name(name: str) -> str:
    base = os.path.basename(name)
    if not base or base in (".", "..") or base != name:
        raise StorageError(f"not a spool file name: {name!r}")
    return base
