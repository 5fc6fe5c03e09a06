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
import signal
import threading
from dataclasses import dataclass, field

import pynetdicom.sop_class as sop_classes
from pydicom.uid import UID
from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, evt
from pynetdicom.sop_class import Verification

from services.config import ListenerSettings
from services.dispatch import TaskDispatcher
from services.errors import CbmirError, InvalidInput, StorageError, UnreadableInput
from services.spool import Spool, spool_name_for

logger = logging.getLogger(__name__)

# DICOM status codes (PS3.4 Annex B / C.4.2).
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_PROCESSING_FAILURE = 0x0110

EEG_WAVEFORM_CLASSES = (
    "RoutineScalpElectroencephalogramWaveformStorage",
    "SleepElectroencephalogramWaveformStorage",
)


def accepted_storage_classes() -> dict[str, UID]:
    """Every image storage SOP class pynetdicom knows, plus the EEG waveforms (name -> UID)."""
    accepted = {}
    for name in dir(sop_classes):
        if not name.endswith("Storage"):
            continue
        if ("Image" in name and "PresentationState" not in name) or name in EEG_WAVEFORM_CLASSES:
            accepted[name] = UID(getattr(sop_classes, name))
    return dict(sorted(accepted.items()))


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


class StoreHandler:
    """``EVT_C_STORE`` handler: parse-check, spool durably, enqueue a reference, answer."""

    def __init__(self, spool: Spool, dispatcher: TaskDispatcher, counters: ListenerCounters | None = None):
        self._spool = spool
        self._dispatcher = dispatcher
        self.counters = counters or ListenerCounters()

    def __call__(self, event) -> int:
        request = event.request
        sop_instance_uid = str(request.AffectedSOPInstanceUID or "")
        name = spool_name_for(sop_instance_uid)
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception as exc:  # pynetdicom could not even frame the bytes
            logger.error("C-STORE %s: cannot encode received dataset: %s", sop_instance_uid, exc)
            self.counters.count(False)
            return STATUS_CANNOT_UNDERSTAND
        try:
            self._check_dataset(event, sop_instance_uid)
            self._spool.store(name, data)
        except CbmirError as exc:
            status = dicom_status_for(exc)
            if isinstance(exc, InvalidInput):
                self._keep_rejected(name, data, exc)
            logger.warning("C-STORE %s from %s refused with 0x%04X: %s", sop_instance_uid,
                           event.assoc.requestor.ae_title, status, exc)
            self.counters.count(False)
            return status
        except Exception as exc:  # never let a bug drop the association without a status
            logger.exception("C-STORE %s: unexpected failure", sop_instance_uid)
            self.counters.count(False)
            return dicom_status_for(exc)
        self._dispatcher.embed(name)
        self.counters.count(True)
        return STATUS_SUCCESS

    @staticmethod
    def _check_dataset(event, sop_instance_uid: str) -> None:
        try:
            dataset = event.dataset
            instance_uid = str(dataset.get("SOPInstanceUID", ""))
            class_uid = str(dataset.get("SOPClassUID", ""))
        except Exception as exc:
            raise UnreadableInput(f"dataset cannot be parsed: {type(exc).__name__}: {exc}") from exc
        if not instance_uid or not class_uid:
            raise UnreadableInput("dataset has no SOP Instance UID or SOP Class UID")
        if instance_uid != sop_instance_uid:
            raise DatasetMismatch("SOP Instance UID in the dataset differs from the C-STORE request")
        if class_uid != str(event.request.AffectedSOPClassUID):
            raise DatasetMismatch("SOP Class UID in the dataset differs from the C-STORE request")

    def _keep_rejected(self, name: str, data: bytes, exc: CbmirError) -> None:
        """A refused object is still kept, with its reason, so nothing received is lost."""
        try:
            self._spool.quarantine_bytes(name, data, reason=exc.reason, detail=str(exc), stage="listener")
        except StorageError:
            logger.exception("could not keep refused object %s", name)


class Listener:
    """The running C-STORE SCP; ``port`` is the bound port (useful with port 0)."""

    def __init__(self, settings: ListenerSettings, spool: Spool, dispatcher: TaskDispatcher):
        self.settings = settings
        self.spool = spool
        self.dispatcher = dispatcher
        self.handler = StoreHandler(spool, dispatcher)
        self._server = None
        self._stop = threading.Event()
        self._backlog_thread: threading.Thread | None = None

    def build_ae(self) -> AE:
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
            evt_handlers=[(evt.EVT_C_STORE, self.handler), (evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS)],
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
        self.dispatcher.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cbmir scp", description="Run the DICOM C-STORE listener.")
    parser.add_argument("--port", type=int, help="override CBMIR_DICOM_PORT")
    parser.add_argument("--ae-title", help="override CBMIR_AE_TITLE")
    args = parser.parse_args(argv)
    from services.logs import configure_logging

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
