"""Administration of the index and the data folder: erasure, verification, quarantine.

:class:`IndexMaintenance` holds the operations; it runs inside the index owner (served as
``cbmir.v1.IndexAdmin`` to admin-role callers by :class:`IndexAdminServicer`) or, with nothing
serving, in ``cbmir delete|verify|quarantine --data-dir`` itself. Every change is written to the
audit trail (``<data>/audit/admin.jsonl`` and the ``cbmir.audit`` log): who, when, what, how many.
Nothing here names a patient: selectors are UIDs or keyed patient references, and headers are
shown through :class:`~services.dicom.decode.InstanceHeader`, which holds no patient data.
"""

from __future__ import annotations

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
from services.core.files import fsync_dir
from services.core.logs import append_audit
from services.core.patients import PATIENT_KEY_PATTERN
from services.core.vocabulary import is_valid_uid
from services.dicom.decode import read_header, read_identity
from services.grpc_gen.cbmir.v1 import admin_pb2, admin_pb2_grpc
from services.index import VectorIndex
from services.index.base import SELECTABLE_FIELDS
from services.ingest.library import ReferenceLibrary
from services.ingest.spool import (
    REASON_SUFFIX,
    REPLACED_DIR,
    QuarantineEntry,
    Spool,
    spool_name_for,
)
from services.query.reindex import ReindexJob, ReindexState

logger = logging.getLogger(__name__)
audit = logging.getLogger("cbmir.audit")

DEFAULT_LISTED = 20
ERASE_SETTLE_S = 2.0  # after marking an erasure: how long in-flight upserts may still land
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
    unexamined: list[str] = field(default_factory=list)  # objects that are not DICOM: not checked


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
        self.library = ReferenceLibrary(spool.layout)
        self.lock = threading.Lock()  # one change at a time (a reindex writes its batches under it too)

    # -- the audit trail ------------------------------------------------------------------------
    def record(self, who: str, action: str, **details: Any) -> None:
        """Append one line to the audit trail (fsynced) and to the ``cbmir.audit`` log."""
        append_audit(self.spool.layout.audit_log, who, action, **details)

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
        with self.lock:
            try:
                self._delete_locked(selector, value, report)
            finally:
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
                    unexamined=len(report.unexamined),
                )
        return report

    def _delete_points(self, field: str, value: str) -> int:
        """Delete the points whose payload ``field`` is ``value``, in every collection."""
        deleted = 0
        for collection in self.index.collections():
            ids = [point for point, _ in self.index.scroll(collection, field=field, value=value)]
            self.index.delete_points(ids, collection)
            deleted += len(ids)
        return deleted

    def _delete_points_of(self, uids: set[str]) -> int:
        """Delete the points of these SOP Instance UIDs (found by header) in every collection."""
        return sum(self._delete_points("sop_instance_uid", uid) for uid in sorted(uids) if uid)

    def _selected_points(self, selector: str, value: str, uids: set[str], names: set[str]) -> None:
        """Collect the UIDs and spool names of the selected points (in every collection)."""
        for collection in self.index.collections():
            for _, payload in self.index.scroll(collection, field=selector, value=value):
                uids.add(str(payload.get("sop_instance_uid", "")))
                if payload.get("spool_name"):
                    names.add(str(payload["spool_name"]))

    def _delete_locked(self, selector: str, value: str, report: DeleteReport) -> None:
        layout = self.spool.layout
        archive, replaced = layout.archive, layout.archive / REPLACED_DIR
        names: set[str] = {spool_name_for(value)} if selector == "sop_instance_uid" else set()
        uids: set[str] = {value} if selector == "sop_instance_uid" else set()
        self._selected_points(selector, value, uids, names)
        # objects on disk that no point names are found by their (leniently read) header: archived
        # ones without a point (or, for a patient key, whose point lacks the key: indexed before
        # the secret was set), earlier copies, pending and quarantined ones
        indexed, keyless = set(), set()
        for _, payload in self._current_points():
            name = _object_name(payload)
            indexed.add(name)
            if "patient_key" not in payload:
                keyless.add(name)
        unread = keyless if selector == "patient_key" else set()
        copies = sorted(replaced.iterdir()) if replaced.is_dir() else []
        # earlier copies: only the copy goes (the current object of that UID may be another's)
        found: list[tuple[str, Path]] = [
            ("archive", path)
            for path in copies
            if self._matching_uid(path, selector, value, report) is not None
        ]
        for folder, paths in (
            ("archive", [p for p in self._archived_paths() if p.name not in indexed or p.name in unread]),
            ("pending", sorted(layout.incoming.iterdir())),
            ("quarantine", [p for p in sorted(layout.quarantine.iterdir()) if _is_object(p)]),
        ):
            for path in paths:
                uid = self._matching_uid(path, selector, value, report)
                if uid is not None:
                    found.append((folder, path))
                    uids.add(uid)
                    names.add(spool_name_for(uid))
        for name in names:
            if (archive / name).is_file() and ("archive", archive / name) not in found:
                found.append(("archive", archive / name))
            if replaced.is_dir():
                found += [("archive", c) for c in replaced.glob(f"{name}.*") if ("archive", c) not in found]
        # in-flight work for these instances must not index them again (workers, the index writer
        # and a reindex check these markers); then the points go, then the files
        for name in names:
            self.spool.mark_erased(name)
        report.points_deleted += self._delete_points(selector, value)
        report.points_deleted += self._delete_points_of(uids)
        for folder, path in found:
            try:
                removed = _unlink(path)
            except StorageError as exc:
                logger.error("delete: %s", exc)
                report.unexamined.append(path.name)
                continue
            if folder == "archive":
                report.archived_deleted += removed
            elif folder == "pending":
                report.pending_deleted += removed
                self.spool.forget_attempts(path.name)
            else:
                report.quarantined_deleted += removed
                _unlink(path.with_name(path.name + REASON_SUFFIX))
                for history in path.parent.glob(path.name + REASON_SUFFIX + ".*"):
                    _unlink(history)
        for changed in (archive, layout.incoming, layout.quarantine):
            fsync_dir(changed)
        # a worker that read the markers just before they were written may have upserted since
        time.sleep(ERASE_SETTLE_S)
        report.points_deleted += self._delete_points(selector, value)
        report.points_deleted += self._delete_points_of(uids)
        report.sop_instance_uids = sorted(u for u in uids if u)
        self.library.forget(report.sop_instance_uids)  # an erased library case loses its finding too

    def _current_points(self) -> Iterator[tuple[str, dict[str, Any]]]:
        if self.index.current_collection() is None:
            return iter(())
        return self.index.scroll()

    def _matching_uid(self, path: Path, selector: str, value: str, report: DeleteReport) -> str | None:
        """The SOP Instance UID of the object at ``path`` if ``selector`` picks it, else None. The
        header is read leniently: a malformed object (quarantined for it) is still found. An object
        that is not DICOM (a dropped picture the watcher quarantined) cannot be examined: it is
        listed in the report."""
        if selector == "sop_instance_uid" and (
            path.name == spool_name_for(value) or path.name.startswith(spool_name_for(value) + ".")
        ):
            return value
        identity = read_identity(path, self._secret)
        if identity is None:
            report.unexamined.append(path.name)
            return None
        if str(getattr(identity, selector)) == value:
            return identity.sop_instance_uid or value
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
        layout = self.spool.layout
        with self.lock:
            # the points first, then the folders in the order an instance moves through them
            # (incoming, archive, quarantine): a point seen in the scroll has its object in one of
            # them when they are listed, even if it moved in between
            points: dict[str, tuple[str, str, bool]] = {}  # point id -> (name, uid, other model)
            indexed: set[str] = set()
            for point, payload in self._current_points():
                name = _object_name(payload)
                other = payload.get("model_version", self.model_version) != self.model_version
                points[point] = (name, str(payload.get("sop_instance_uid", "")), other)
                indexed.add(name)
            report.points = len(points)
            waiting = {p.name for p in layout.incoming.iterdir()}
            archived = {p.name for p in self._archived_paths()}
            quarantined = {p.name for p in layout.quarantine.iterdir() if _is_object(p)}
            present = waiting | archived | quarantined
            orphans = {pid: entry for pid, entry in points.items() if entry[0] not in present}
            missing = sorted(archived - indexed)
            # each finding checked again, one by one: ingest goes on while we look
            orphans = {pid: e for pid, e in orphans.items() if not self._on_disk(e[0])}
            missing = [
                name for name in missing if (layout.archive / name).exists() and not self._has_point(name)
            ]
            report.archived = len(archived)
            report.missing = missing
            report.orphans = sorted(uid for _, uid, _ in orphans.values())
            report.other_version = sorted({n for n, _, other in points.values() if other and n in archived})
            if repair:
                try:
                    for name in [*report.missing, *report.other_version]:
                        try:
                            self.spool.unarchive(name)
                        except StorageError as exc:
                            logger.error("verify: cannot re-send %s: %s", name, exc)
                            continue
                        # in the spool now: if the broker does not take it, the sweep sends it
                        report.resent += 1 if self._send(name) else 0
                    stale = [pid for pid, (name, _, _) in orphans.items() if not self._on_disk(name)]
                    self.index.delete_points(stale)
                    report.orphans_deleted = len(stale)
                finally:
                    self.record(
                        who,
                        "verify-repair",
                        missing=len(report.missing),
                        other_version=len(report.other_version),
                        orphans=len(report.orphans),
                        resent=report.resent,
                        orphans_deleted=report.orphans_deleted,
                    )
            report.seconds = time.monotonic() - started
        return report

    def _on_disk(self, name: str) -> bool:
        layout = self.spool.layout
        return any(
            (folder / name).exists() for folder in (layout.incoming, layout.archive, layout.quarantine)
        )

    def _has_point(self, name: str) -> bool:
        """Whether the alias's collection holds a point of the object ``name`` (now)."""
        uid = name.rsplit(".", 1)[0]
        if is_valid_uid(uid):
            return any(True for _ in self.index.scroll(field="sop_instance_uid", value=uid))
        return any(True for _ in self.index.scroll(field="spool_name", value=name))

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
        with self.lock:
            try:
                for entry in self.quarantined(selection):
                    if entry.stage == "watcher":
                        left += 1
                        continue
                    # a second quarantine of one UID is kept as "<time>-<name>": back under its name
                    identity = read_identity(self.spool.layout.quarantine / entry.name)
                    name = entry.name
                    if identity is not None and is_valid_uid(identity.sop_instance_uid):
                        name = spool_name_for(identity.sop_instance_uid)
                    try:
                        self.spool.requeue_quarantined(entry.name, as_name=name)
                    except StorageError as exc:  # gone, or its name is taken by a newer copy
                        logger.error("requeue: %s", exc)
                        left += 1
                        continue
                    self._send(name)
                    requeued += 1
            finally:
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
        with self.lock:
            try:
                for entry in self.quarantined(selection):
                    path = self.spool.layout.quarantine / entry.name
                    try:
                        purged += _unlink(path)
                        _unlink(path.with_name(path.name + REASON_SUFFIX))
                        for history in path.parent.glob(path.name + REASON_SUFFIX + ".*"):
                            _unlink(history)
                    except StorageError as exc:
                        logger.error("purge: %s", exc)
                fsync_dir(self.spool.layout.quarantine)
            finally:
                self.record(who, "quarantine-purge", **_selection_details(selection), purged=purged)
        return purged


def _selection_details(selection: Selection) -> dict[str, Any]:
    return {
        "reason": selection.reason or "any",
        "older_than_s": selection.older_than_s,
        "names": len(selection.names),
    }


def _object_name(payload: dict[str, Any]) -> str:
    """The spool file name of the object a point was made from."""
    return str(payload.get("spool_name") or spool_name_for(str(payload.get("sop_instance_uid", ""))))


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


MAX_LISTED_QUARANTINE = 10_000


def list_pb(
    maintenance: IndexMaintenance, entries: list[QuarantineEntry], limit: int
) -> admin_pb2.ListQuarantineResponse:
    """The oldest ``limit`` (0: 1000) of the selected quarantine records, and how many there are."""
    shown = min(limit or 1000, MAX_LISTED_QUARANTINE)
    return admin_pb2.ListQuarantineResponse(
        objects=[quarantined_pb(maintenance, e) for e in entries[:shown]], total=len(entries)
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
        unexamined=sorted(set(report.unexamined)),
    )


Guard = Callable[[Callable[..., Any]], Callable[..., Any]]
Who = Callable[[Iterable[tuple[str, str | bytes]]], str]


def reindex_pb(
    state: ReindexState, dropped: Iterable[str] = (), running: bool = False
) -> admin_pb2.ReindexStatus:
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
        running=running,
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
            return list_pb(maintenance, entries, request.limit)

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
            reindex.who = caller
            state = reindex.start_background(drop_old=request.drop_old)
            maintenance.record(caller, "reindex-start", target=state.target, drop_old=request.drop_old)
            return reindex_pb(state, running=reindex.running)

        @override
        @guarded
        def GetReindexStatus(
            self, request: admin_pb2.GetReindexStatusRequest, context: grpc.ServicerContext
        ) -> admin_pb2.ReindexStatus:
            return reindex_pb(reindex.status(), reindex.last_dropped, reindex.running)

    return IndexAdminServicer()


def require_secret(secret: bytes | None) -> bytes:
    """The patient-key secret, or a clear ConfigError saying the feature is off."""
    if secret is None:
        raise ConfigError(
            "patient keys are unavailable: CBMIR_PATIENT_KEY_SECRET is not set "
            "(it must be the workers' secret)"
        )
    return secret
