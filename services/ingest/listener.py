"""The DICOM C-STORE listener (``cbmir scp``), built on pynetdicom, or with dcmtk as its network side.

The C-STORE handler does three light things and answers: check the dataset parses, write the
encoded bytes durably into the spool (temp file, fsync, atomic rename, named by SOP Instance UID),
and send the workers a reference (the spool file name). Decoding and inference happen in workers.

With ``CBMIR_DICOM_RECEIVER=dcmtk`` the plain port is served by the native program of
:mod:`services.dicom.dcmtk_scp`, which does the same three things in C++ (dcmtk parses the data
set); :class:`NativeStoreEvents` then sends the references, counts the metrics and quarantines what
it refused as malformed. The TLS port is pynetdicom's either way.

Negotiation accepts Verification and every image storage SOP class plus the EEG waveform classes,
each with every transfer syntax pynetdicom knows: the listener stores bytes as received, so it
refuses nothing it can store. Non-image objects (SR, RT plans, presentation states, ...) are
rejected at negotiation, since nothing here can embed them.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pydicom
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import time

from services.core import metrics
from services.core.config import ListenerSettings, MetricsSettings
from services.core.errors import CbmirError, InvalidInput, StorageError, UnreadableInput
from services.core.logs import describe
from services.core.net import bind_socket
from services.core.processes import run_until_stopped
from services.core.security import dicom_ssl_context, tls_files_stamp
from services.core.vocabulary import accepted_storage_classes
from services.dicom.dcmtk_scp import DcmtkScp, ScpEvent, ScpOptions
from services.dicom.decode import inflated, read_header
from services.dicom.pynetdicom_ext import SpoolingAssociationServer
from services.ingest.dispatch import BackgroundDispatch, PendingSweep, TaskDispatcher
from services.ingest.spool import Spool, spool_name_for

logger = logging.getLogger(__name__)

# DICOM status codes (PS3.4 Annex B / C.4.2).
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_PROCESSING_FAILURE = 0x0110
# Associations served at once; more are rejected (transient: the sender tries again later).
MAX_ASSOCIATIONS = 32
# The largest PDU dcmtk receives (CBMIR_MAX_PDU=0, "unlimited", means this one there).
DCMTK_MAX_PDU = 131072
# Their names in the metrics (cbmir_dicom_instances_received_total{status}).
STATUS_NAMES = {
    STATUS_SUCCESS: "success",
    STATUS_OUT_OF_RESOURCES: "out-of-resources",
    STATUS_DATASET_MISMATCH: "dataset-mismatch",
    STATUS_CANNOT_UNDERSTAND: "cannot-understand",
    STATUS_PROCESSING_FAILURE: "processing-failure",
}


class DatasetMismatch(InvalidInput):
    """The dataset's SOP class/instance disagrees with the C-STORE request."""

    reason = "dataset-mismatch"


def dicom_status_for(exc: BaseException) -> int:
    """The one place cbmir errors become DICOM C-STORE statuses."""
    if isinstance(exc, StorageError):
        return STATUS_OUT_OF_RESOURCES
    if isinstance(exc, DatasetMismatch):
        return STATUS_DATASET_MISMATCH
    if isinstance(exc, InvalidInput):
        return STATUS_CANNOT_UNDERSTAND
    return STATUS_PROCESSING_FAILURE


class DiskGuard:
    """The free space watermark of the data volume (``CBMIR_MIN_FREE_MB``): below it, instances are
    refused with 0xA700 (the sender keeps them and retries) rather than half-written; above it
    again, they are taken again, with no restart."""

    def __init__(self, folder: Path, min_free_mb: int):
        self._folder = folder
        self._min_free = min_free_mb * 1024 * 1024
        self._warned = False

    def ok(self) -> bool:
        """Whether the volume has at least the watermark free (always, with a watermark of 0)."""
        if self._min_free <= 0:
            return True
        room = shutil.disk_usage(self._folder).free >= self._min_free
        if room == self._warned:  # log each change once, not each instance
            self._warned = not room
            log = logger.warning if not room else logger.info
            log(
                "data volume %s: %s free space watermark (%d MB)",
                self._folder,
                "below its" if not room else "back above its",
                self._min_free // 2**20,
            )
        return room

    def require(self) -> None:
        """StorageError (0xA700) while the volume is below the watermark."""
        if not self.ok():
            raise StorageError(
                f"the data volume has less than {self._min_free // 2**20} MB free "
                "(CBMIR_MIN_FREE_MB); the instance is refused, the sender keeps it"
            )


class StoreHandler:
    """``EVT_C_STORE`` handler: parse-check, spool durably, hand over a reference, answer.

    Each received dataset is streamed into a file under ``spool/tmp`` (see
    :mod:`services.dicom.pynetdicom_ext`); the handler checks it parses, fsyncs it and renames it
    into ``spool/incoming`` under its SOP Instance UID. No pixel data passes through Python memory.
    When the temp folder could not take the file, the dataset arrived in memory and is written
    here, so a failing spool is answered 0xA700.
    """

    def __init__(self, spool: Spool, dispatch: Callable[[str], None], room: DiskGuard | None = None):
        self._spool = spool
        self._dispatch = dispatch
        self._room = room

    def __call__(self, event: evt.Event) -> int:
        """Handle one C-STORE request; returns its DICOM status (counted and timed in the metrics)."""
        started = time.perf_counter()
        status = self._handle(event)
        metrics.DICOM_STORE_SECONDS.observe(time.perf_counter() - started)
        metrics.DICOM_INSTANCES_RECEIVED.labels(STATUS_NAMES.get(status, "other")).inc()
        return status

    def _handle(self, event: evt.Event) -> int:
        request = event.request
        assert isinstance(request, C_STORE)  # bound to EVT_C_STORE only
        sop_instance_uid = str(request.AffectedSOPInstanceUID or "")
        name = spool_name_for(sop_instance_uid)
        shown = name.removesuffix(".dcm")  # the UID, or a hash of what the request sent instead
        streamed = event.dataset_path  # None when the dataset arrived in memory
        try:
            if self._room is not None:
                self._room.require()
            received = self._received_file(event, streamed, name)
            with contextlib.suppress(OSError):
                metrics.DICOM_RECEIVED_BYTES.inc(received.stat().st_size)
        except StorageError as exc:
            if streamed is not None:
                with contextlib.suppress(OSError):  # not acknowledged: nothing to keep
                    Path(streamed).unlink(missing_ok=True)
            logger.warning("C-STORE %s: %s", shown, exc)
            return dicom_status_for(exc)
        except Exception as exc:  # noqa: BLE001 - pynetdicom could not even frame the bytes
            logger.error("C-STORE %s: cannot encode received dataset: %s", shown, describe(exc))
            return STATUS_CANNOT_UNDERSTAND
        try:
            self._check_dataset(received, event, sop_instance_uid)
            self._spool.adopt(received, name)
        except CbmirError as exc:
            status = dicom_status_for(exc)
            if isinstance(exc, InvalidInput):
                keep_refused(self._spool, received, name, exc.reason, str(exc))
            logger.warning(
                "C-STORE %s from %s refused with 0x%04X: %s",
                shown,
                event.assoc.requestor.ae_title,
                status,
                exc,
            )
            return status
        except Exception as exc:  # never let a bug drop the association without a status
            logger.exception("C-STORE %s: unexpected failure", shown)
            return dicom_status_for(exc)
        finally:
            if streamed is None and received.exists():
                received.unlink(missing_ok=True)  # our own temp copy of a refused object
        self._dispatch(name)
        return STATUS_SUCCESS

    def _received_file(self, event: evt.Event, streamed: Path | str | None, name: str) -> Path:
        if streamed is None:
            return self._spool.write_tmp(name, event.encoded_dataset())
        received = Path(streamed)
        if not received.exists():  # the stream into spool/tmp failed part-way (e.g. disk full)
            raise StorageError(f"the dataset could not be written into {received.parent}")
        return received

    @staticmethod
    def _check_dataset(received: Path, event: evt.Event, sop_instance_uid: str) -> None:
        """Every element must parse (large values are skipped, not read), and the header through the
        same adapter the workers use, so every stage names a defect alike. One parse serves both."""
        try:
            with open(received, "rb") as file:
                stream, size = inflated(file)  # a deflated data set: inflated, within a budget
                dataset = pydicom.dcmread(stream, defer_size=4096)
                _check_lengths(size, dataset)  # on the raw elements, before they are converted
                for _ in dataset.iterall():
                    pass
        except CbmirError:
            raise
        except Exception as exc:
            raise UnreadableInput(f"dataset cannot be parsed: {describe(exc)}", reason="parse-error") from exc
        header = read_header(dataset)
        # read_header may take the UIDs from the File Meta; here that meta was made from the request
        if not dataset.get("SOPInstanceUID") or not dataset.get("SOPClassUID"):
            raise UnreadableInput(
                "the dataset has no SOP Instance UID or SOP Class UID", reason="missing-uid"
            )
        if header.sop_instance_uid != sop_instance_uid:
            raise DatasetMismatch("SOP Instance UID in the dataset differs from the C-STORE request")
        if header.sop_class_uid != str(event.request.AffectedSOPClassUID):
            raise DatasetMismatch("SOP Class UID in the dataset differs from the C-STORE request")


def keep_refused(spool: Spool, received: Path, name: str, reason: str, detail: str) -> None:
    """A refused object is still kept, with its reason, so nothing received is lost (either network
    side)."""
    try:
        spool.quarantine(received, reason=reason, detail=detail, stage="listener", name=name)
        metrics.QUARANTINED.labels("listener", metrics.slug(reason)).inc()
    except StorageError:
        logger.exception("could not keep refused object %s", name)


def count_association(result: str, address: str, ae_title: str, why: str = "") -> None:
    """An association accepted, rejected (``why``) or aborted: counted and logged alike on either
    network side."""
    metrics.DICOM_ASSOCIATIONS.labels(result).inc()
    if result == "rejected":
        logger.warning("association from %s (AE %s) rejected: %s", address, ae_title, why)
    elif result == "aborted":
        logger.info("association from %s (AE %s) aborted", address, ae_title)


def not_allowed(ae_title: str) -> str:
    """Why an association from ``ae_title`` is rejected when the allowlist lacks it."""
    return f"calling AE title {ae_title!r} is not in CBMIR_ALLOWED_AE_TITLES"


def _check_lengths(size: int, dataset: pydicom.Dataset) -> None:
    """Every top-level element must end inside the ``size`` bytes parsed (pydicom accepts a value
    cut short at the end)."""
    # keys(), not iteration: iterating a Dataset yields converted elements, get_item the raw ones
    # (keep_deferred: a large value not read stays raw, with its length, and is not read now)
    for tag in dataset.keys():  # noqa: SIM118
        raw = dataset.get_item(tag, keep_deferred=True)
        length, tell = getattr(raw, "length", None), getattr(raw, "value_tell", None)
        if length is None or tell is None or length == 0xFFFFFFFF:
            continue
        if tell + length > size:
            raise UnreadableInput(
                f"element {tag} claims {length} bytes but the dataset ends first", reason="truncated"
            )


class NativeStoreEvents:
    """What :class:`StoreHandler` does after the spool write, for the events of the dcmtk SCP: send
    the reference, count the metrics, keep a refused malformed object in quarantine, log."""

    def __init__(self, spool: Spool, dispatch: Callable[[str], None], room: DiskGuard, idle_timeout_s: int):
        self._spool = spool
        self._dispatch = dispatch
        self._room = room
        self._acse_timeout_s = acse_timeout_for(idle_timeout_s)

    def __call__(self, event: ScpEvent) -> None:
        """Handle one event of the native SCP."""
        if event.kind == "stored":
            metrics.DICOM_STORE_SECONDS.observe(event.seconds)
            metrics.DICOM_INSTANCES_RECEIVED.labels(STATUS_NAMES[STATUS_SUCCESS]).inc()
            metrics.DICOM_RECEIVED_BYTES.inc(event.size)
            self._dispatch(event.name)
        elif event.kind == "refused":
            self._refused(event)
        elif event.kind == "association":
            self._association(event)

    def _refused(self, event: ScpEvent) -> None:
        metrics.DICOM_INSTANCES_RECEIVED.labels(STATUS_NAMES.get(event.status, "other")).inc()
        shown = event.name.removesuffix(".dcm")
        if event.reason == "disk-full":
            self._room.ok()  # logs the watermark crossing once
        if event.kept is not None:  # a file the program left in spool/tmp
            kept = self._spool.layout.spool_tmp / event.kept
            keep_refused(self._spool, kept, event.name, event.reason, event.detail)
        logger.warning("C-STORE %s refused with 0x%04X: %s", shown, event.status, event.detail)

    def _association(self, event: ScpEvent) -> None:
        if event.reason == "rejected" and event.detail == "no-request":
            logger.info(
                "DICOM connection from %s closed: no association request within %d s",
                event.peer,
                self._acse_timeout_s,
            )
            return
        if event.reason not in ("accepted", "rejected", "aborted"):
            return
        if event.reason == "aborted" and event.detail == "idle":
            logger.warning("DICOM association idle past its network timeout; ending it")
        why = {
            "calling-ae": not_allowed(event.calling),
            "too-many": f"the association limit ({MAX_ASSOCIATIONS}) is reached",
        }.get(event.detail, event.detail)
        count_association(event.reason, event.peer, event.calling, why)


def acse_timeout_for(idle_timeout_s: int) -> int:
    """How long a connection may take to send its association request."""
    return min(30, idle_timeout_s)


class Listener:
    """The running C-STORE SCP; ``port`` is the bound port (useful with port 0)."""

    def __init__(self, settings: ListenerSettings, spool: Spool, dispatcher: TaskDispatcher):
        self.settings = settings
        self.spool = spool
        self.dispatcher = dispatcher
        self.dispatch = BackgroundDispatch(dispatcher, settings.broker.dispatch_wait_ms / 1000)
        self.room = DiskGuard(spool.layout.root, settings.min_free_mb)
        self.handler = StoreHandler(spool, self.dispatch, self.room)
        self._server: SpoolingAssociationServer | None = None
        self._native: DcmtkScp | None = None
        self._tls_server: SpoolingAssociationServer | None = None
        self._tls_stamp: tuple[int, ...] = ()
        self.port = 0
        self.tls_port: int | None = None
        self._stop = threading.Event()
        self._backlog_thread: threading.Thread | None = None
        self.sweep = PendingSweep(spool, dispatcher, settings.resend_after_s)

    def build_ae(self) -> AE:
        """The Application Entity: accepted contexts, limits, timeouts, calling AE allowlist."""
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_pdu_size = self.settings.max_pdu
        ae.maximum_associations = MAX_ASSOCIATIONS
        ae.network_timeout = self.settings.idle_timeout_s  # an association idle this long is aborted
        ae.acse_timeout = acse_timeout_for(self.settings.idle_timeout_s)  # and a connection that never asks
        ae.dimse_timeout = 60
        ae.add_supported_context(Verification)
        for uid in accepted_storage_classes().values():
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        if self.settings.allowed_ae_titles:
            ae.require_calling_aet = sorted(self.settings.allowed_ae_titles)
        else:
            logger.warning(
                "CBMIR_ALLOWED_AE_TITLES is empty: any calling AE title may store to %s",
                self.settings.ae_title,
            )
        return ae

    def start(self) -> int:
        """Bind the plain and the TLS port (as configured), re-send what is pending, start the sweep
        loop; returns the plain port (the TLS port with CBMIR_DICOM_TLS_ONLY)."""
        ae = self.build_ae()
        handlers = [
            (evt.EVT_C_STORE, self.handler),
            (evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ABORTED, self._on_aborted),
        ]

        def serve(port: int, ssl_context: ssl.SSLContext | None = None) -> SpoolingAssociationServer:
            return SpoolingAssociationServer.start(
                ae,
                (self.settings.host, port),
                spool_dir=self.spool.layout.spool_tmp,
                evt_handlers=handlers,
                has_room=self.room.ok,
                ssl_context=ssl_context,
            )

        if not self.settings.tls_only and self.settings.receiver == "dcmtk":
            self._native = self._start_native()
            self.port = self._native.port
        elif not self.settings.tls_only:
            self._server = serve(self.settings.port)
            self.port = self._server.server_address[1]
        if self.settings.tls_port is not None:
            self._tls_stamp = tls_files_stamp(self.settings.tls)
            self._tls_server = serve(self.settings.tls_port, dicom_ssl_context(self.settings.tls))
            self.tls_port = self._tls_server.server_address[1]
            logger.info(
                "DICOM TLS listener %s on %s:%d%s",
                self.settings.ae_title,
                self.settings.host,
                self.tls_port,
                " (client certificates required)" if self.settings.tls.client_ca else "",
            )
        removed = self.spool.remove_stale_tmp(PendingSweep.STALE_TMP_S)
        if removed:
            logger.info("removed %d stale partial file(s) from spool/tmp (never acknowledged)", removed)
        pending = self.sweep.send_all()  # a crash may have lost their tasks
        self._backlog_thread = threading.Thread(
            target=self._flush_backlog_loop, name="dispatch-backlog", daemon=True
        )
        self._backlog_thread.start()
        logger.info(
            "DICOM listener %s on %s%s (%d storage SOP classes, %s); re-sent %d pending instance(s)",
            self.settings.ae_title,
            self.settings.host,
            " (TLS port only)" if self.settings.tls_only else f":{self.port}",
            len(accepted_storage_classes()),
            self.settings.receiver,
            pending,
        )
        return int(self.tls_port or 0) if self.settings.tls_only else self.port

    def _start_native(self) -> DcmtkScp:
        """The dcmtk SCP on the plain port, with the same settings, classes and spool."""
        settings = self.settings
        max_pdu = DCMTK_MAX_PDU if settings.max_pdu == 0 else min(max(settings.max_pdu, 4096), DCMTK_MAX_PDU)
        options = ScpOptions(
            ae_title=settings.ae_title,
            spool_tmp=self.spool.layout.spool_tmp,
            incoming=self.spool.layout.incoming,
            storage_classes=tuple(accepted_storage_classes().values()),
            transfer_syntaxes=tuple(map(str, ALL_TRANSFER_SYNTAXES)),
            max_pdu=max_pdu,
            acse_timeout_s=acse_timeout_for(settings.idle_timeout_s),
            idle_timeout_s=settings.idle_timeout_s,
            max_associations=MAX_ASSOCIATIONS,
            min_free_mb=settings.min_free_mb,
            allowed_ae_titles=settings.allowed_ae_titles,
        )
        events = NativeStoreEvents(self.spool, self.dispatch, self.room, settings.idle_timeout_s)
        listening = bind_socket(settings.host, settings.port, "the DICOM listener")
        native = DcmtkScp(options, listening, events, on_restart=self._after_restart)
        native.start()
        return native

    def _after_restart(self) -> None:
        """The dcmtk SCP was started again: what it stored and did not report gets its task now."""
        metrics.DICOM_RECEIVER_RESTARTS.inc()
        sent = self.sweep.send_all()
        logger.info("dcmtk SCP running again; re-sent %d pending instance(s)", sent)

    def _flush_backlog_loop(self) -> None:
        """Every 2 s: flush the dispatch backlog; every sweep interval: re-send what is stale,
        drop stale partial files, pick up changed TLS files."""
        sweep_s = self.sweep.interval_s
        next_sweep = time.monotonic() + sweep_s
        while not self._stop.wait(2.0):
            try:
                if self.dispatcher.backlog_size:
                    left = self.dispatcher.flush_backlog()
                    if not left:
                        logger.info("broker back: dispatch backlog flushed")
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + sweep_s
                    self.sweep.sweep()
                    self._refresh_tls()
            except Exception:  # the loop must survive anything: it is what un-strands instances
                logger.exception("listener sweep failed; trying again")

    def _refresh_tls(self) -> None:
        if self._tls_server is None:
            return
        stamp = tls_files_stamp(self.settings.tls)
        if stamp != self._tls_stamp:
            self._tls_server.ssl_context = dicom_ssl_context(self.settings.tls)
            self._tls_stamp = stamp
            logger.info("DICOM TLS: certificate files changed; new associations use them")

    @staticmethod
    def _on_accepted(event: evt.Event) -> None:
        requestor = event.assoc.requestor
        count_association("accepted", requestor.address, requestor.ae_title)

    def _on_rejected(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        allowed = self.settings.allowed_ae_titles
        if allowed and requestor.ae_title not in allowed:
            why = not_allowed(requestor.ae_title)
        else:
            why = "wrong called AE title, or the association limit is reached"
        count_association("rejected", requestor.address, requestor.ae_title, why)

    @staticmethod
    def _on_aborted(event: evt.Event) -> None:
        requestor = event.assoc.requestor
        count_association("aborted", requestor.address, requestor.ae_title)

    def stop(self) -> None:
        """Stop accepting, abort open associations, send what is queued, close the broker."""
        self._stop.set()
        for server in (self._server, self._tls_server):
            if server is not None:
                server.shutdown()
        if self._native is not None:
            self._native.stop()
        self.dispatch.close()
        self.dispatcher.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cbmir scp``."""
    parser.add_argument("--port", type=int, help="override CBMIR_DICOM_PORT (0: any free port)")
    parser.add_argument("--ae-title", help="override CBMIR_AE_TITLE")


def run(args: argparse.Namespace) -> int:
    """``cbmir scp``: listen (and serve its metrics, with CBMIR_METRICS_PORT) until SIGINT or SIGTERM."""
    settings = ListenerSettings.from_env()
    metrics_settings = MetricsSettings.from_env()
    if args.port is not None:
        settings = replace(settings, port=args.port)
    if args.ae_title:
        settings = replace(settings, ae_title=args.ae_title)
    listener = Listener(settings, Spool(settings.layout), TaskDispatcher(settings.broker))
    endpoint: metrics.MetricsEndpoint | None = None

    def start() -> str:
        nonlocal endpoint
        endpoint = metrics.serve_metrics(metrics_settings)
        port = listener.start()
        lines = (
            []
            if settings.tls_only
            else [f"cbmir scp: AE {settings.ae_title} listening on {settings.host}:{port}"]
        )
        if listener.tls_port is not None:
            lines.append(
                f"cbmir scp: TLS AE {settings.ae_title} listening on {settings.host}:{listener.tls_port}"
            )
        return "\n".join(lines)

    def stop() -> None:
        listener.stop()
        if endpoint is not None:
            endpoint.close()

    return run_until_stopped(start, stop)
