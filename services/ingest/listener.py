"""The DICOM C-STORE listener (``cbmir scp``), built on pynetdicom.

The C-STORE handler does three light things and answers: check the dataset parses, write the
encoded bytes durably into the spool (temp file, fsync, atomic rename, named by SOP Instance UID),
and send the workers a reference (the spool file name). Decoding and inference happen in workers.

Negotiation accepts Verification and every image storage SOP class plus the EEG waveform classes,
each with every transfer syntax pynetdicom knows: the listener stores bytes as received, so it
refuses nothing it can store. Non-image objects (SR, RT plans, presentation states, ...) are
rejected at negotiation, since nothing here can embed them.
"""

from __future__ import annotations

import argparse
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pydicom
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import time

from services.core.config import ListenerSettings
from services.core.errors import CbmirError, InvalidInput, StorageError, UnreadableInput
from services.core.processes import run_until_stopped
from services.core.vocabulary import accepted_storage_classes
from services.dicom.decode import read_header
from services.dicom.pynetdicom_ext import SpoolingAssociationServer
from services.ingest.dispatch import TaskDispatcher
from services.ingest.spool import Spool, spool_name_for

logger = logging.getLogger(__name__)

# DICOM status codes (PS3.4 Annex B / C.4.2).
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_PROCESSING_FAILURE = 0x0110


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


class BackgroundDispatch:
    """Sends tasks from a thread, so the C-STORE response never waits for the broker.

    Safe because the spool, not the broker, is the record: an instance whose task is lost in a
    crash is still in ``spool/incoming`` and is re-sent when the listener starts.
    """

    def __init__(self, dispatcher: TaskDispatcher):
        self._dispatcher = dispatcher
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="dispatch", daemon=True)
        self._thread.start()

    def __call__(self, spool_name: str) -> None:
        """Queue a spool name to be sent (returns at once)."""
        self._queue.put(spool_name)

    def _run(self) -> None:
        while (name := self._queue.get()) is not None:
            self._dispatcher.embed(name)
            self._queue.task_done()

    def drain(self, timeout_s: float = 10.0) -> None:
        """Wait until everything handed over so far was sent (or put in the backlog)."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        """Send what is queued, then stop the thread."""
        self.drain()
        self._queue.put(None)
        self._thread.join(timeout=5)


class StoreHandler:
    """``EVT_C_STORE`` handler: parse-check, spool durably, hand over a reference, answer.

    Each received dataset is streamed into a file under ``spool/tmp`` (see
    :mod:`services.dicom.pynetdicom_ext`); the handler checks it parses, fsyncs it and renames it
    into ``spool/incoming`` under its SOP Instance UID. No pixel data passes through Python memory.
    When the temp folder could not take the file, the dataset arrived in memory and is written
    here, so a failing spool is answered 0xA700.
    """

    def __init__(self, spool: Spool, dispatch: Callable[[str], None]):
        self._spool = spool
        self._dispatch = dispatch

    def __call__(self, event: evt.Event) -> int:
        """Handle one C-STORE request; returns its DICOM status."""
        request = event.request
        assert isinstance(request, C_STORE)  # bound to EVT_C_STORE only
        sop_instance_uid = str(request.AffectedSOPInstanceUID or "")
        name = spool_name_for(sop_instance_uid)
        streamed = event.dataset_path  # None when the dataset arrived in memory
        try:
            received = self._received_file(event, streamed, name)
        except StorageError as exc:
            logger.warning("C-STORE %s: %s", sop_instance_uid, exc)
            return dicom_status_for(exc)
        except Exception as exc:  # noqa: BLE001 - pynetdicom could not even frame the bytes
            logger.error("C-STORE %s: cannot encode received dataset: %s", sop_instance_uid, exc)
            return STATUS_CANNOT_UNDERSTAND
        try:
            self._check_dataset(received, event, sop_instance_uid)
            self._spool.adopt(received, name)
        except CbmirError as exc:
            status = dicom_status_for(exc)
            if isinstance(exc, InvalidInput):
                self._keep_rejected(received, name, exc)
            logger.warning(
                "C-STORE %s from %s refused with 0x%04X: %s",
                sop_instance_uid,
                event.assoc.requestor.ae_title,
                status,
                exc,
            )
            return status
        except Exception as exc:  # never let a bug drop the association without a status
            logger.exception("C-STORE %s: unexpected failure", sop_instance_uid)
            return dicom_status_for(exc)
        finally:
            if streamed is None and received.exists():
                received.unlink(missing_ok=True)  # our own temp copy of a refused object
        self._dispatch(name)
        return STATUS_SUCCESS

    def _received_file(self, event: evt.Event, streamed: Path | None, name: str) -> Path:
        if streamed is None:
            return self._spool.write_tmp(name, event.encoded_dataset())
        received = Path(streamed)
        if not received.exists():  # the stream into spool/tmp failed part-way (e.g. disk full)
            raise StorageError(f"the dataset could not be written into {received.parent}")
        return received

    @staticmethod
    def _check_dataset(received: Path, event: evt.Event, sop_instance_uid: str) -> None:
        """The header must parse (through the same adapter the workers use, so every stage names a
        defect alike) and every other element too; large values are skipped, not read."""
        header = read_header(received)
        try:
            dataset = pydicom.dcmread(received, defer_size=4096)
            _check_lengths(received, dataset)  # on the raw elements, before they are converted
            for _ in dataset.iterall():
                pass
        except UnreadableInput:
            raise
        except Exception as exc:
            raise UnreadableInput(
                f"dataset cannot be parsed: {type(exc).__name__}: {exc}", reason="parse-error"
            ) from exc
        # read_header may take the UIDs from the File Meta; here that meta was made from the request
        if not dataset.get("SOPInstanceUID") or not dataset.get("SOPClassUID"):
            raise UnreadableInput(
                "the dataset has no SOP Instance UID or SOP Class UID", reason="missing-uid"
            )
        if header.sop_instance_uid != sop_instance_uid:
            raise DatasetMismatch("SOP Instance UID in the dataset differs from the C-STORE request")
        if header.sop_class_uid != str(event.request.AffectedSOPClassUID):
            raise DatasetMismatch("SOP Class UID in the dataset differs from the C-STORE request")

    def _keep_rejected(self, received: Path, name: str, exc: CbmirError) -> None:
        """A refused object is still kept, with its reason, so nothing received is lost."""
        try:
            self._spool.quarantine(received, reason=exc.reason, detail=str(exc), stage="listener", name=name)
        except StorageError:
            logger.exception("could not keep refused object %s", name)


def _check_lengths(path: Path, dataset: pydicom.Dataset) -> None:
    """Every top-level element must end inside the file (pydicom accepts a value cut short at EOF)."""
    size = path.stat().st_size
    # keys(), not iteration: iterating a Dataset yields converted elements, get_item the raw ones
    for tag in dataset.keys():  # noqa: SIM118
        raw = dataset.get_item(tag)
        length, tell = getattr(raw, "length", None), getattr(raw, "value_tell", None)
        if length is None or tell is None or length == 0xFFFFFFFF:
            continue
        if tell + length > size:
            raise UnreadableInput(
                f"element {tag} claims {length} bytes but the dataset ends first", reason="truncated"
            )


class Listener:
    """The running C-STORE SCP; ``port`` is the bound port (useful with port 0)."""

    def __init__(self, settings: ListenerSettings, spool: Spool, dispatcher: TaskDispatcher):
        self.settings = settings
        self.spool = spool
        self.dispatcher = dispatcher
        self.dispatch = BackgroundDispatch(dispatcher)
        self.handler = StoreHandler(spool, self.dispatch)
        self._server: SpoolingAssociationServer | None = None
        self.port = 0
        self._stop = threading.Event()
        self._backlog_thread: threading.Thread | None = None

    def build_ae(self) -> AE:
        """The Application Entity: accepted contexts, limits, timeouts, calling AE allowlist."""
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_pdu_size = self.settings.max_pdu
        ae.maximum_associations = 32
        ae.network_timeout = 60
        ae.acse_timeout = 30
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
        """Bind, re-send what is pending, start the backlog loop; returns the bound port."""
        self._server = SpoolingAssociationServer.start(
            self.build_ae(),
            (self.settings.host, self.settings.port),
            spool_dir=self.spool.layout.spool_tmp,
            evt_handlers=[
                (evt.EVT_C_STORE, self.handler),
                (evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS),
            ],
        )
        self.port = self._server.server_address[1]
        pending = self.redispatch_pending()
        self._backlog_thread = threading.Thread(
            target=self._flush_backlog_loop, name="dispatch-backlog", daemon=True
        )
        self._backlog_thread.start()
        logger.info(
            "DICOM listener %s on %s:%d (%d storage SOP classes); re-sent %d pending instance(s)",
            self.settings.ae_title,
            self.settings.host,
            self.port,
            len(accepted_storage_classes()),
            pending,
        )
        return self.port

    def redispatch_pending(self) -> int:
        """Send every spooled, unindexed instance again (a crash may have lost its task)."""
        pending = self.spool.pending()
        for path in pending:
            self.dispatcher.embed(path.name)
        return len(pending)

    def _flush_backlog_loop(self) -> None:
        while not self._stop.wait(2.0):
            if self.dispatcher.backlog_size:
                left = self.dispatcher.flush_backlog()
                if not left:
                    logger.info("broker back: dispatch backlog flushed")

    def stop(self) -> None:
        """Stop accepting, abort open associations, send what is queued, close the broker."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        self.dispatch.close()
        self.dispatcher.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cbmir scp``."""
    parser.add_argument("--port", type=int, help="override CBMIR_DICOM_PORT (0: any free port)")
    parser.add_argument("--ae-title", help="override CBMIR_AE_TITLE")


def run(args: argparse.Namespace) -> int:
    """``cbmir scp``: listen until SIGINT or SIGTERM."""
    settings = ListenerSettings.from_env()
    if args.port is not None:
        settings = replace(settings, port=args.port)
    if args.ae_title:
        settings = replace(settings, ae_title=args.ae_title)
    listener = Listener(settings, Spool(settings.layout), TaskDispatcher(settings.broker))
    return run_until_stopped(
        lambda: f"cbmir scp: AE {settings.ae_title} listening on {settings.host}:{listener.start()}",
        listener.stop,
    )
