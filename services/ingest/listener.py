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
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.sop_class import Verification

from services.core.config import ListenerSettings
from services.dicom.decode import read_header
from services.ingest.dispatch import TaskDispatcher
from services.core.errors import CbmirError, InvalidInput, StorageError, UnreadableInput
from services.ingest.spool import Spool, spool_name_for
from services.core.vocabulary import accepted_storage_classes

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


@dataclass
class ListenerCounters:
    stored: int = 0
    failed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, ok: bool) -> None:
        with self.lock:
            if ok:
                self.stored += 1
            else:
                self.failed += 1


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
        self.drain()
        self._queue.put(None)
        self._thread.join(timeout=5)


class StoreHandler:
    """``EVT_C_STORE`` handler: parse-check, spool durably, hand over a reference, answer.

    pynetdicom streams each received dataset into a temporary file under ``spool/tmp`` (see
    :meth:`Listener.build_ae`); the handler checks it parses, fsyncs it and renames it into
    ``spool/incoming`` under its SOP Instance UID. No pixel data passes through Python memory.
    """

    def __init__(self, spool: Spool, dispatch, counters: ListenerCounters | None = None):
        self._spool = spool
        self._dispatch = dispatch
        self.counters = counters or ListenerCounters()

    def __call__(self, event) -> int:
        request = event.request
        sop_instance_uid = str(request.AffectedSOPInstanceUID or "")
        name = spool_name_for(sop_instance_uid)
        streamed = getattr(request, "_dataset_path", None)  # set when pynetdicom streamed to disk
        try:
            received = Path(streamed) if streamed else self._spool.write_tmp(name, event.encoded_dataset())
        except StorageError as exc:
            logger.warning("C-STORE %s: %s", sop_instance_uid, exc)
            self.counters.count(False)
            return dicom_status_for(exc)
        except Exception as exc:  # pynetdicom could not even frame the bytes
            logger.error("C-STORE %s: cannot encode received dataset: %s", sop_instance_uid, exc)
            self.counters.count(False)
            return STATUS_CANNOT_UNDERSTAND
        try:
            self._check_dataset(received, event, sop_instance_uid)
            self._spool.adopt(received, name)
        except CbmirError as exc:
            status = dicom_status_for(exc)
            if isinstance(exc, InvalidInput):
                self._keep_rejected(received, name, exc)
            logger.warning("C-STORE %s from %s refused with 0x%04X: %s", sop_instance_uid,
                           event.assoc.requestor.ae_title, status, exc)
            self.counters.count(False)
            return status
        except Exception as exc:  # never let a bug drop the association without a status
            logger.exception("C-STORE %s: unexpected failure", sop_instance_uid)
            self.counters.count(False)
            return dicom_status_for(exc)
        finally:
            if not streamed and received.exists():
                received.unlink(missing_ok=True)  # our own temp copy of a refused object
        self._dispatch(name)
        self.counters.count(True)
        return STATUS_SUCCESS

    @staticmethod
    def _check_dataset(received: Path, event, sop_instance_uid: str) -> None:
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
            raise UnreadableInput(f"dataset cannot be parsed: {type(exc).__name__}: {exc}", reason="parse-error") from exc
        # read_header may take the UIDs from the File Meta; here that meta was made from the request
        if not dataset.get("SOPInstanceUID") or not dataset.get("SOPClassUID"):
            raise UnreadableInput("the dataset has no SOP Instance UID or SOP Class UID", reason="missing-uid")
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


def _check_lengths(path: Path, dataset) -> None:
    """Every top-level element must end inside the file (pydicom accepts a value cut short at EOF)."""
    size = path.stat().st_size
    for tag in dataset.keys():
        raw = dataset.get_item(tag)
        length, tell = getattr(raw, "length", None), getattr(raw, "value_tell", None)
        if length is None or tell is None or length == 0xFFFFFFFF:
            continue
        if tell + length > size:
            raise UnreadableInput(f"element {tag} claims {length} bytes but the dataset ends first",
                                  reason="truncated")


class Listener:
    """The running C-STORE SCP; ``port`` is the bound port (useful with port 0)."""

    def __init__(self, settings: ListenerSettings, spool: Spool, dispatcher: TaskDispatcher):
        self.settings = settings
        self.spool = spool
        self.dispatcher = dispatcher
        self.dispatch = BackgroundDispatch(dispatcher)
        self.handler = StoreHandler(spool, self.dispatch)
        self._server = None
        self._stop = threading.Event()
        self._backlog_thread: threading.Thread | None = None

    def build_ae(self) -> AE:
        # Received datasets stream into spool/tmp (same filesystem as incoming/, so the final
        # rename is atomic). These are process-wide settings of pynetdicom and tempfile: the
        # listener runs in a process of its own.
        tempfile.tempdir = str(self.spool.layout.spool_tmp)
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
            logger.warning("CBMIR_ALLOWED_AE_TITLES is empty: any calling AE title may store to %s",
                           self.settings.ae_title)
        return ae

    def start(self) -> int:
        ae = self.build_ae()
        self._server = ae.start_server(
            (self.settings.host, self.settings.port),
            block=False,
            evt_handlers=[
                (evt.EVT_C_STORE, self.handler),
                (evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS),
                (evt.EVT_CONN_OPEN, self._on_connection),
            ],
        )
        self.port = self._server.server_address[1]
        pending = self.redispatch_pending()
        self._backlog_thread = threading.Thread(target=self._flush_backlog_loop, name="dispatch-backlog", daemon=True)
        self._backlog_thread.start()
        logger.info("DICOM listener %s on %s:%d (%d storage SOP classes); re-sent %d pending instance(s)",
                    self.settings.ae_title, self.settings.host, self.port, len(accepted_storage_classes()), pending)
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
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        self.dispatch.close()
        self.dispatcher.close()


    def _on_connection(self, event) -> None:
        """Per connection: stream to disk only while spool/tmp is writable (else datasets arrive in
        memory and a failing spool write is answered 0xA700 instead of an aborted association),
        and shorten pynetdicom's reader delay."""
        _config.STORE_RECV_CHUNKED_DATASET = self.spool.tmp_writable()
        _shorten_reader_delay(event)


READER_DELAY_S = 0.0002


def _shorten_reader_delay(event) -> None:
    """pynetdicom's socket reader sleeps 1 ms whenever it finds no data, which costs every small
    instance about a millisecond. 0.2 ms keeps an idle association cheap and removes most of the
    wait. ``_run_loop_delay`` is pynetdicom 3's private knob; pyproject pins pynetdicom < 4."""
    dul = getattr(event.assoc, "dul", None)
    if dul is not None and hasattr(dul, "_run_loop_delay"):
        dul._run_loop_delay = READER_DELAY_S


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cbmir scp", description="Run the DICOM C-STORE listener.")
    parser.add_argument("--port", type=int, help="override CBMIR_DICOM_PORT")
    parser.add_argument("--ae-title", help="override CBMIR_AE_TITLE")
    args = parser.parse_args(argv)
    from services.core.logs import configure_logging

    configure_logging()
    settings = ListenerSettings.from_env()
    if args.port is not None or args.ae_title:
        from dataclasses import replace

        settings = replace(settings, port=args.port if args.port is not None else settings.port,
                           ae_title=args.ae_title or settings.ae_title)
    listener = Listener(settings, Spool(settings.layout), TaskDispatcher(settings.broker))
    listener.start()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"cbmir scp: AE {settings.ae_title} listening on {settings.host}:{listener.port}", flush=True)
    stop.wait()
    listener.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
