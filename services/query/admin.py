"""Administration of the index and the data folder: erasure, verification, quarantine.

:class:`IndexMaintenance` holds the operations; it runs inside the index owner (served as
``cbmir.v1.IndexAdmin`` to admin-role callers by :class:`IndexAdminServicer`) or, with nothing
serving, in ``cbmir delete|verify|quarantine --data-dir`` itself. Every change is written to the
audit trail (``<data>/audit/admin.jsonl`` and the ``cbmir.audit`` log): who, when, what, how many.
Nothing here names a patient: selectors are UIDs or keyed patient references, and headers are
shown through :class:`~services.dicom.decode.InstanceHeader`, which holds no patient data.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from typing_extensions import override

from services.core.errors import CbmirError, ConfigError, InvalidInput, NotFound, StorageError
from services.core.patients import PATIENT_KEY_PATTERN
from services.core.vocabulary import is_valid_uid
from services.dicom.decode import read_header
from services.grpc_gen.cbmir.v1 import admin_pb2, admin_pb2_grpc
from services.index import VectorIndex
from services.index.base import SELECTABLE_FIELDS
from services.ingest.spool import (
    REASON_SUFFIX,
    REPLACED_DIR,
    QuarantineEntry,
    Spool,
    fsync_dir,
    spool_name_for,
)
from services.query.reindex import ReindexJob, ReindexState

logger = logging.getLogger(__name__)
audit = logging.getLogger("cbmir.audit")

DEFAULT_LISTED = 20
_HEADER_FIELDS = (
    "sop_instance_uid",
    "sop_class_uid",
    "study_instance_uid",
    "series_instance_uid",
    "modality_code",
    "modality",
    "number_of_frames",
    "rows",
    "columns",
    "transfer_syntax_uid",
)


@dataclass(frozen=True)
class Selection:
    """Which quarantined objects: by reason, by age, by name (empty: no restriction)."""

    reason: str = ""
    older_than_s: float = 0.0
    names: tuple[str, ...] = ()

    def matches(self, entry: QuarantineEntry, now: float) -> bool:
        """Whether ``entry`` is selected."""
        return (
            (not self.reason or entry.reason == self.reason)
            and now - entry.quarantined_at >= self.older_than_s
            and (not self.names or entry.name in self.names)
        )


@dataclass
class DeleteReport:
    """What an erasure removed."""

    points_deleted: int = 0
    archived_deleted: int = 0
    quarantined_deleted: int = 0
    pending_deleted: int = 0
    sop_instance_uids: list[str] = field(default_factory=list)


@dataclass
class VerifyReport:
    """The archive against the index, and what a repair did."""

    archived: int = 0
    points: int = 0
    missing: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    other_version: list[str] = field(default_factory=list)
    model_version: str = ""
    resent: int = 0
    orphans_deleted: int = 0
    seconds: float = 0.0


class IndexMaintenance:
    """Erasure, verification and quarantine management over one index and one data folder.

    ``send(name)`` hands a spooled instance to the workers (a task by name) and says whether the
    broker took it; an instance it could not send waits in the spool, where the listener's sweep
    sends it again.
    """

    def __init__(
        self,
        index: VectorIndex,
        spool: Spool,
        *,
        model_version: str,
        send: Callable[[str], bool],
        patient_key_secret: bytes | None = None,
    ):
        self.index = index
        self.spool = spool
        self.model_version = model_version
        self._send = send
        self._secret = patient_key_secret
        self._lock = threading.Lock()  # one change at a time

    # -- the audit trail ------------------------------------------------------------------------
    def record(self, who: str, action: str, **details: Any) -> None:
        """Append one line to the audit trail (fsynced) and to the ``cbmir.audit`` log."""
        entry = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "who": who, "action": action}
        entry.update(details)
        path = self.spool.layout.audit_log
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        audit.info("%s by %s: %s", action, who, json.dumps(details, sort_keys=True))

    # -- erasure --------------------------------------------------------------------------------
    def delete(self, selector: str, value: str, who: str) -> DeleteReport:
        """Remove every point, archived object (with earlier copies), pending and quarantined object
        that ``selector`` (a payload field of :data:`SELECTABLE_FIELDS`) equal to ``value`` picks.
        Idempotent: a second call finds nothing and removes nothing."""
        value = value.strip()
        if selector not in SELECTABLE_FIELDS:
            raise InvalidInput(f"select by one of {', '.join(SELECTABLE_FIELDS)}")
        if selector == "patient_key":
            require_secret(self._secret)
            if not PATIENT_KEY_PATTERN.match(value):
                raise InvalidInput("a patient key is 32 hex digits (cbmir patient-key computes it)")
        elif not is_valid_uid(value):
            raise InvalidInput(f"{selector} must be a DICOM UID")
        report = DeleteReport()
        with self._lock:
            self._indexed_cache = None
            names: set[str] = set()
            uids: set[str] = set()
            for collection in self.index.collections():
                ids = []
                for point, payload in self.index.scroll(collection, field=selector, value=value):
                    ids.append(point)
                    uids.add(str(payload.get("sop_instance_uid", "")))
                    if payload.get("spool_name"):
                        names.add(str(payload["spool_name"]))
                self.index.delete_points(ids, collection)
                report.points_deleted += len(ids)
            names |= {spool_name_for(uid) for uid in uids if uid}
            if selector == "sop_instance_uid":
                names.add(spool_name_for(value))
            # archived objects of these instances, with the earlier copies of re-sent ones
            archive = self.spool.layout.archive
            for name in sorted(names):
                if _unlink(archive / name):
                    report.archived_deleted += 1
                for copy in (archive / REPLACED_DIR).glob(f"{name}.*"):
                    report.archived_deleted += _unlink(copy)
            # archived objects without a point, and the pending and quarantined ones: by their header
            unindexed = [p for p in self._archived_paths() if p.name not in self._indexed_names()]
            for folder, paths in (
                ("archive", unindexed),
                ("pending", list(self.spool.layout.incoming.iterdir())),
                ("quarantine", [p for p in self.spool.layout.quarantine.iterdir() if _is_object(p)]),
            ):
                for path in paths:
                    uid = self._matching_uid(path, selector, value)
                    if uid is None:
                        continue
                    uids.add(uid)
                    removed = _unlink(path)
                    if folder == "archive":
                        report.archived_deleted += removed
                    elif folder == "pending":
                        report.pending_deleted += removed
                        self.spool.forget_attempts(path.name)
                    else:
                        report.quarantined_deleted += removed
                        _unlink(path.with_name(path.name + REASON_SUFFIX))
            for changed in (archive, self.spool.layout.incoming, self.spool.layout.quarantine):
                fsync_dir(changed)
            report.sop_instance_uids = sorted(u for u in uids if u)
            self._indexed_cache = None
            self.record(
                who,
                "delete",
                selector=selector,
                value=value,
                instances=len(report.sop_instance_uids),
                points=report.points_deleted,
                archived=report.archived_deleted,
                pending=report.pending_deleted,
                quarantined=report.quarantined_deleted,
            )
        return report

    _indexed_cache: set[str] | None = None

    def _indexed_names(self) -> set[str]:
        if self._indexed_cache is None:
            self._indexed_cache = {
                str(payload.get("spool_name") or spool_name_for(str(payload.get("sop_instance_uid", ""))))
                for _, payload in self._current_points()
            }
        return self._indexed_cache

    def _current_points(self) -> Iterator[tuple[str, dict[str, Any]]]:
        if self.index.current_collection() is None:
            return iter(())
        return self.index.scroll()

    def _matching_uid(self, path: Path, selector: str, value: str) -> str | None:
        """The SOP Instance UID of the DICOM object at ``path`` if ``selector`` picks it, else None."""
        if selector == "sop_instance_uid" and path.name == spool_name_for(value):
            return value
        try:
            header = read_header(path, self._secret if selector == "patient_key" else None)
        except CbmirError:
            return None  # not DICOM we can read: nothing in it to select by
        if selector == "patient_key" and self._secret is None:
            return None
        if str(getattr(header, selector)) == value:
            return header.sop_instance_uid
        return None

    def _archived_paths(self) -> list[Path]:
        with os.scandir(self.spool.layout.archive) as entries:
            return [Path(e.path) for e in entries if e.is_file(follow_symlinks=False)]

    # -- verification ---------------------------------------------------------------------------
    def verify(self, repair: bool, who: str) -> VerifyReport:
        """The archive against the alias's collection: archived objects without a point (missing),
        points without an archived, pending or quarantined object (orphans), points of another
        model version. ``repair`` re-sends the missing and the other-version ones to the workers and
        deletes the orphans."""
        started = time.monotonic()
        report = VerifyReport(model_version=self.model_version)
        with self._lock:
            archived = {p.name for p in self._archived_paths()}
            waiting = {p.name for p in self.spool.layout.incoming.iterdir()}
            quarantined = {p.name for p in self.spool.layout.quarantine.iterdir() if _is_object(p)}
            indexed: set[str] = set()
            orphan_ids: list[str] = []
            for point, payload in self._current_points():
                report.points += 1
                name = str(
                    payload.get("spool_name") or spool_name_for(str(payload.get("sop_instance_uid", "")))
                )
                indexed.add(name)
                if name not in archived and name not in waiting and name not in quarantined:
                    orphan_ids.append(point)
                    report.orphans.append(str(payload.get("sop_instance_uid", "")))
                elif (
                    payload.get("model_version", self.model_version) != self.model_version
                    and name in archived
                ):
                    report.other_version.append(name)
            report.archived = len(archived)
            report.missing = sorted(archived - indexed)
            report.other_version = sorted(set(report.other_version))
            if repair:
                for name in [*report.missing, *report.other_version]:
                    try:
                        self.spool.unarchive(name)
                    except StorageError as exc:
                        logger.error("verify: cannot re-send %s: %s", name, exc)
                        continue
                    report.resent += 1
                    self._send(name)
                self.index.delete_points(orphan_ids)
                report.orphans_deleted = len(orphan_ids)
            report.seconds = time.monotonic() - started
            if repair:
                self.record(
                    who,
                    "verify-repair",
                    missing=len(report.missing),
                    other_version=len(report.other_version),
                    orphans=len(report.orphans),
                    resent=report.resent,
                    orphans_deleted=report.orphans_deleted,
                )
        return report

    # -- quarantine -----------------------------------------------------------------------------
    def quarantined(self, selection: Selection) -> list[QuarantineEntry]:
        """The quarantined objects ``selection`` picks, oldest first."""
        now = time.time()
        chosen = [e for e in self.spool.quarantine_entries() if selection.matches(e, now)]
        return sorted(chosen, key=lambda e: e.quarantined_at)

    def size_of(self, entry: QuarantineEntry) -> int:
        """Size in bytes of a quarantined object (0 when it is gone)."""
        try:
            return (self.spool.layout.quarantine / entry.name).stat().st_size
        except OSError:
            return 0

    def show(self, name: str) -> tuple[QuarantineEntry, dict[str, str], str]:
        """(record, PHI-free header fields, why the header could not be read) of one object."""
        entry = next((e for e in self.spool.quarantine_entries() if e.name == name), None)
        if entry is None:
            raise NotFound(f"nothing named {name} is in quarantine")
        try:
            header = read_header(self.spool.layout.quarantine / entry.name)
        except CbmirError as exc:
            return entry, {}, f"{exc.reason}: {exc}"
        fields = asdict(header)
        return entry, {key: str(fields[key]) for key in _HEADER_FIELDS}, ""

    def requeue(self, selection: Selection, who: str) -> tuple[int, int]:
        """Move the selected objects back into the spool and send them; returns (requeued, left).
        Files the watcher quarantined are the dropped files themselves, not DICOM: they are left."""
        requeued, left = 0, 0
        with self._lock:
            for entry in self.quarantined(selection):
                if entry.stage == "watcher":
                    left += 1
                    continue
                self.spool.requeue_quarantined(entry.name)
                self._send(entry.name)
                requeued += 1
            self.record(
                who, "quarantine-requeue", **_selection_details(selection), requeued=requeued, left=left
            )
        return requeued, left

    def purge(self, selection: Selection, who: str) -> int:
        """Delete the selected quarantined objects and their reason files, for good; only objects
        older than ``selection.older_than_s`` (which must be set)."""
        if selection.older_than_s <= 0:
            raise InvalidInput("purge needs an age: only objects older than it are deleted (--older-than)")
        purged = 0
        with self._lock:
            for entry in self.quarantined(selection):
                path = self.spool.layout.quarantine / entry.name
                purged += _unlink(path)
                _unlink(path.with_name(path.name + REASON_SUFFIX))
            fsync_dir(self.spool.layout.quarantine)
            self.record(who, "quarantine-purge", **_selection_details(selection), purged=purged)
        return purged


def _selection_details(selection: Selection) -> dict[str, Any]:
    return {
        "reason": selection.reason or "any",
        "older_than_s": selection.older_than_s,
        "names": len(selection.names),
    }


def _is_object(path: Path) -> bool:
    """A quarantined object, not its reason file or a resolved reason kept as history."""
    return path.is_file() and ".reason.json" not in path.name


def _unlink(path: Path) -> int:
    """1 if ``path`` was removed, 0 if it was not there."""
    try:
        path.unlink()
        return 1
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise StorageError(f"cannot delete {path.name}: {exc.strerror or exc}") from exc


def selection_from_pb(message: admin_pb2.QuarantineSelection) -> Selection:
    """A :class:`Selection` from its message."""
    return Selection(message.reason, max(0.0, message.older_than_s), tuple(message.names))


def quarantined_pb(maintenance: IndexMaintenance, entry: QuarantineEntry) -> admin_pb2.QuarantinedObject:
    """A quarantine record as a message."""
    return admin_pb2.QuarantinedObject(
        name=entry.name,
        reason=entry.reason,
        detail=entry.detail,
        stage=entry.stage,
        quarantined_at=entry.quarantined_at,
        size_bytes=maintenance.size_of(entry),
    )


def verify_pb(report: VerifyReport, max_listed: int) -> admin_pb2.VerifyResponse:
    """A verification report as a message, each list cut to ``max_listed`` names."""
    listed = max_listed or DEFAULT_LISTED
    return admin_pb2.VerifyResponse(
        archived=report.archived,
        points=report.points,
        missing_count=len(report.missing),
        missing=report.missing[:listed],
        orphan_count=len(report.orphans),
        orphans=report.orphans[:listed],
        other_version_count=len(report.other_version),
        other_version=report.other_version[:listed],
        model_version=report.model_version,
        resent=report.resent,
        orphans_deleted=report.orphans_deleted,
        seconds=report.seconds,
    )


def delete_pb(report: DeleteReport) -> admin_pb2.DeleteInstancesResponse:
    """An erasure report as a message."""
    return admin_pb2.DeleteInstancesResponse(
        points_deleted=report.points_deleted,
        archived_deleted=report.archived_deleted,
        quarantined_deleted=report.quarantined_deleted,
        pending_deleted=report.pending_deleted,
        sop_instance_uids=report.sop_instance_uids,
    )


Guard = Callable[[Callable[..., Any]], Callable[..., Any]]
Who = Callable[[Iterable[tuple[str, str | bytes]]], str]


def reindex_pb(state: ReindexState, dropped: Iterable[str] = ()) -> admin_pb2.ReindexStatus:
    """A reindex state as a message."""
    return admin_pb2.ReindexStatus(
        state=state.state,
        target=state.target,
        previous=state.previous,
        model_version=state.model_version,
        done=state.done,
        total=state.total,
        failed=state.failed,
        passes=state.passes,
        error=state.error,
        dropped=list(dropped),
        started_at=state.started_at,
        finished_at=state.finished_at,
    )


def make_servicer(
    maintenance: IndexMaintenance, reindex: ReindexJob, guarded: Guard, who: Who
) -> admin_pb2_grpc.IndexAdminServicer:
    """``cbmir.v1.IndexAdmin`` over ``maintenance`` and ``reindex``. ``guarded`` turns exceptions into
    statuses (the query service's one mapping); ``who(metadata)`` names the caller for the audit trail."""

    class IndexAdminServicer(admin_pb2_grpc.IndexAdminServicer):
        """Erasure, verification and quarantine for admin-role callers."""

        @override
        @guarded
        def DeleteInstances(
            self, request: admin_pb2.DeleteInstancesRequest, context: grpc.ServicerContext
        ) -> admin_pb2.DeleteInstancesResponse:
            selector = request.WhichOneof("selector")
            if selector is None:
                raise InvalidInput("name what to delete: a study, series or instance UID, or a patient key")
            caller = who(context.invocation_metadata())
            return delete_pb(maintenance.delete(selector, getattr(request, selector), caller))

        @override
        @guarded
        def Verify(
            self, request: admin_pb2.VerifyRequest, context: grpc.ServicerContext
        ) -> admin_pb2.VerifyResponse:
            report = maintenance.verify(request.repair, who(context.invocation_metadata()))
            return verify_pb(report, request.max_listed)

        @override
        @guarded
        def ListQuarantine(
            self, request: admin_pb2.ListQuarantineRequest, context: grpc.ServicerContext
        ) -> admin_pb2.ListQuarantineResponse:
            entries = maintenance.quarantined(selection_from_pb(request.selection))
            return admin_pb2.ListQuarantineResponse(objects=[quarantined_pb(maintenance, e) for e in entries])

        @override
        @guarded
        def ShowQuarantined(
            self, request: admin_pb2.ShowQuarantinedRequest, context: grpc.ServicerContext
        ) -> admin_pb2.ShowQuarantinedResponse:
            entry, header, error = maintenance.show(request.name)
            return admin_pb2.ShowQuarantinedResponse(
                object=quarantined_pb(maintenance, entry), header=header, header_error=error
            )

        @override
        @guarded
        def RequeueQuarantined(
            self, request: admin_pb2.RequeueQuarantinedRequest, context: grpc.ServicerContext
        ) -> admin_pb2.RequeueQuarantinedResponse:
            requeued, left = maintenance.requeue(
                selection_from_pb(request.selection), who(context.invocation_metadata())
            )
            return admin_pb2.RequeueQuarantinedResponse(requeued=requeued, left=left)

        @override
        @guarded
        def PurgeQuarantine(
            self, request: admin_pb2.PurgeQuarantineRequest, context: grpc.ServicerContext
        ) -> admin_pb2.PurgeQuarantineResponse:
            purged = maintenance.purge(
                selection_from_pb(request.selection), who(context.invocation_metadata())
            )
            return admin_pb2.PurgeQuarantineResponse(purged=purged)

        @override
        @guarded
        def StartReindex(
            self, request: admin_pb2.StartReindexRequest, context: grpc.ServicerContext
        ) -> admin_pb2.ReindexStatus:
            caller = who(context.invocation_metadata())
            reindex.drop_when_done = request.drop_old
            state = reindex.start_background()
            maintenance.record(caller, "reindex-start", target=state.target, drop_old=request.drop_old)
            return reindex_pb(state)

        @override
        @guarded
        def GetReindexStatus(
            self, request: admin_pb2.GetReindexStatusRequest, context: grpc.ServicerContext
        ) -> admin_pb2.ReindexStatus:
            return reindex_pb(reindex.status(), reindex.last_dropped)

    return IndexAdminServicer()


def require_secret(secret: bytes | None) -> bytes:
    """The patient-key secret, or a clear ConfigError saying the feature is off."""
    if secret is None:
        raise ConfigError(
            "patient keys are unavailable: CBMIR_PATIENT_KEY_SECRET is not set "
            "(it must be the workers' secret)"
        )
    return secret
