"""Where cbmir reaches below pynetdicom's public API: this module only, each reach explained.

pynetdicom 3 (``pynetdicom<4`` in pyproject) offers two things the listener needs only as
process-wide switches:

* **Streaming a received dataset to disk.** ``_config.STORE_RECV_CHUNKED_DATASET`` is one
  module-level flag for every association in the process, and the files land in
  ``tempfile.gettempdir()``. Flipping either at run time races between concurrent associations
  and changes ``tempfile`` for all code in the process.
* **The reader's idle sleep.** The DUL thread sleeps ``_run_loop_delay`` (1 ms) whenever no data
  is waiting, which costs every small instance about a millisecond. The attribute is private.
* **The association's fixed sleep.** ``Association._run_reactor`` sleeps 1 ms before every look
  at its message queue, so each C-STORE waits up to a millisecond before its handler runs, and
  one association tops out near 330 small instances a second (measured with a handler that does
  nothing). There is no knob for it.

Instead of switching them globally, :class:`SpoolingAssociationServer` (built through the public
``AE.make_server(server_class=...)``) hands each association, in
:meth:`SpoolingRequestHandler.handle`:

* a :class:`SpoolingDIMSEProvider` of its own, which streams each C-STORE-RQ dataset into a new
  file in the spool's temp folder, decided per message: when the data volume is below its free
  space watermark, or the folder cannot take a file, the data set is received and dropped (no
  memory held), the handler finds no file and answers 0xA700, and the association carries on;
* a shorter reader delay on its own DUL instance (:data:`READER_DELAY_S`);
* the reactor of :class:`SpoolingAssociation`, which blocks on the DIMSE message queue (and so
  serves a message the moment it is complete) instead of sleeping; it is set on each association
  this server creates, as the class of that one object.

The handler finds a streamed dataset through the public ``Event.dataset_path``.

**Peers that hold a connection without talking.** pynetdicom reads a PDU with blocking ``recv``
calls until it is complete, and ends an association only from its reader's loop: a peer that sends
part of a PDU and then nothing (or a byte now and then) holds one of the association slots, and
pynetdicom's own timeouts never fire. And it does the TLS handshake in the thread that accepts
every connection, so one silent TLS client stops all others. So :class:`SpoolingAssociationServer`
gives every accepted socket a timeout (the idle timeout), does the TLS handshake in the
connection's own thread, and that thread watches its association: no association request within
the ACSE timeout, or an association idle past its timeout that pynetdicom has not ended, and the
connection is shut down (which ends the blocked read).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import queue
import socket
import socketserver
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dsutils import create_file_meta
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from services.core.logs import describe

logger = logging.getLogger(__name__)

# The DUL reader's sleep when no data is waiting (pynetdicom's default is 1 ms). 0.2 ms removes most
# of the wait per small instance; an idle association then wakes about 5,000 times a second.
READER_DELAY_S = 0.0002
_WRITE_BUFFER = 1 << 20
# How long the reactor waits on its message queue before it looks at release, abort and the idle
# timer again: a message is served as soon as it arrives; a release is seen within this time.
REACTOR_WAIT_S = 0.001
# Names of streamed files: unique per process (pid, and a random token for containers, where every
# replica is pid 1 on a shared volume) and per file (counter); O_EXCL guards the rest.
_FILE_NUMBERS = itertools.count()
_PROCESS_TOKEN = uuid.uuid4().hex[:12]

# P-DATA message control header (PS3.8 E.2): bit 0 command (1) or dataset (0), bit 1 last fragment.
_COMMAND, _LAST = 0b01, 0b10


class SpoolFile:
    """The file one streamed dataset goes into, in the form pynetdicom writes to.

    pynetdicom calls ``write()`` per fragment, then ``file.flush()``, and after the handler
    ``close()`` and ``os.unlink(name)``. Writes are buffered and flushed once, after the last
    fragment. A failed write (a full disk) removes the partial file and drops the rest, so the
    handler finds no file and answers 0xA700; the association carries on.
    """

    def __init__(self, path: Path, handle: BinaryIO | None):
        self.name = str(path)
        self._handle: BinaryIO | None = handle
        self.last_fragment = False
        self.error: OSError | None = None

    @property
    def file(self) -> SpoolFile:
        """pynetdicom flushes ``_data_set_file.file`` after every fragment."""
        return self

    def write(self, data: bytes) -> int:
        """Append a fragment (dropped once a write has failed)."""
        if self._handle is not None:
            try:
                self._handle.write(data)
            except OSError as exc:
                self._abandon(exc)
        return len(data)

    def flush(self) -> None:
        """Only after the last fragment: complete the file before the handler reads it."""
        if self.last_fragment:
            self.close()

    def close(self) -> None:
        """Flush and close (idempotent); a failure removes the partial file."""
        handle, self._handle = self._handle, None
        if handle is None:
            return
        try:
            handle.close()
        except OSError as exc:
            self._abandon(exc)

    def discard(self) -> None:
        """Drop an incomplete dataset (the connection closed mid-message)."""
        handle, self._handle = self._handle, None
        if handle is not None:
            with contextlib.suppress(OSError):
                handle.close()
        with contextlib.suppress(OSError):
            os.unlink(self.name)

    def _abandon(self, exc: OSError) -> None:
        if self.error is None:
            logger.error(
                "streaming a received dataset into %s failed (%s); the instance will be refused",
                Path(self.name).parent,
                exc.strerror or exc,
            )
        self.error = exc
        self.discard()

    @classmethod
    def refused(cls, folder: Path, why: OSError) -> SpoolFile:
        """A sink that drops the data set: no file is ever created, so the handler answers 0xA700."""
        spool_file = cls(folder / f"refused-{uuid.uuid4().hex}.part", None)
        spool_file.error = why
        return spool_file

    @classmethod
    def open_for(cls, folder: Path, message: C_STORE_RQ, transfer_syntax: str) -> SpoolFile:
        """A new file in ``folder`` holding the preamble and File Meta of ``message``'s dataset.

        Raises ValueError when the command's UIDs cannot make a File Meta, OSError when the folder
        cannot take the file; nothing is left behind either way.
        """
        command = message.command_set
        meta = DicomBytesIO()
        write_file_meta_info(
            meta,
            create_file_meta(
                sop_class_uid=command.AffectedSOPClassUID,
                sop_instance_uid=command.AffectedSOPInstanceUID,
                transfer_syntax=UID(transfer_syntax),
            ),
        )
        path = folder / f"assoc-{os.getpid()}-{_PROCESS_TOKEN}-{next(_FILE_NUMBERS)}.part"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        spool_file = cls(path, os.fdopen(fd, "wb", buffering=_WRITE_BUFFER))
        spool_file.write(b"\x00" * 128 + b"DICM" + meta.getvalue())
        if spool_file.error is not None:
            raise spool_file.error
        return spool_file


class SpoolingDIMSEProvider(DIMSEServiceProvider):
    """One association's DIMSE provider that streams C-STORE datasets into ``spool_dir``.

    pynetdicom decodes a message fragment by fragment in ``DIMSEMessage.decode_msg``. A P-DATA
    primitive may carry several fragments, so this provider passes them on one at a time; right
    after the fragment that completes a C-STORE-RQ command set it gives the message a
    :class:`SpoolFile`, and every dataset fragment after that goes into the file. The message
    attributes it sets (``_data_set_file``, ``_data_set_path``) are the ones pynetdicom's own
    streaming uses, so the rest of pynetdicom handles the message as a streamed one.
    """

    def __init__(self, assoc: Any, spool_dir: Path, has_room: Callable[[], bool] = lambda: True):
        super().__init__(assoc)
        self._spool_dir = spool_dir
        self._has_room = has_room
        self._lock = threading.Lock()
        self._open: SpoolFile | None = None

    def receive_primitive(self, primitive: P_DATA) -> None:
        """Decode a P-DATA primitive fragment by fragment (see the class docstring)."""
        fragments = list(primitive.presentation_data_value_list)
        if len(fragments) <= 1:
            self._receive_fragment(primitive, fragments[0] if fragments else None)
            return
        for fragment in fragments:
            single = P_DATA()
            # annotated as tuples, but the setter accepts only [context ID, bytes] lists
            single.presentation_data_value_list = [list(fragment)]  # type: ignore[list-item]
            self._receive_fragment(single, fragment)

    def _receive_fragment(self, primitive: P_DATA, fragment: Any) -> None:
        header = fragment[1][0] if fragment and fragment[1] else None
        target = self._open
        if target is not None and header is not None and not header & _COMMAND and header & _LAST:
            target.last_fragment = True
        super().receive_primitive(primitive)
        if target is not None and target.last_fragment:
            with self._lock:
                self._open = None
        message = self.message
        if (
            header is not None
            and header & _COMMAND
            and header & _LAST
            and isinstance(message, C_STORE_RQ)
            and message._data_set_file is None
        ):
            # The command set is complete and a dataset follows (else the message would be done).
            self._start_streaming(message)

    def _start_streaming(self, message: C_STORE_RQ) -> None:
        syntax = next(
            (
                str(cx.transfer_syntax[0])
                for cx in self.assoc.accepted_contexts
                if cx.context_id == message.context_id
            ),
            None,
        )
        if syntax is None:
            return  # pynetdicom answers an unknown context itself
        try:
            if not self._has_room():
                raise OSError(errno.ENOSPC, "the data volume is below its free space watermark")
            spool_file = SpoolFile.open_for(self._spool_dir, message, syntax)
        except ValueError as exc:
            # the command's UIDs cannot make a File Meta: receive in memory, the handler says why
            logger.warning("cannot stream a data set (%s); receiving it in memory", exc)
            return
        except OSError as exc:
            logger.warning(
                "cannot stream a data set into %s (%s); dropping it, it will be refused",
                self._spool_dir,
                exc.strerror or exc,
            )
            spool_file = SpoolFile.refused(self._spool_dir, exc)
        # pynetdicom types this as a NamedTemporaryFile; SpoolFile offers what it uses of one.
        message._data_set_file = spool_file  # type: ignore[assignment]
        message._data_set_path = Path(spool_file.name)
        logger.debug(
            "streaming the dataset of C-STORE message %s into %s",
            message.command_set.MessageID,
            spool_file.name,
        )
        with self._lock:
            self._open = spool_file

    def discard_incomplete(self, _event: evt.Event | None = None) -> None:
        """The connection closed: remove the file of a dataset that never arrived whole."""
        with self._lock:
            spool_file, self._open = self._open, None
        if spool_file is not None:
            spool_file.discard()


class SpoolingAssociation(Association):
    """An acceptor association whose reactor waits on its DIMSE message queue instead of sleeping.

    pynetdicom's ``_run_reactor`` sleeps 1 ms before every check (see the module doc). This loop
    makes the same checks in the same order - a message to serve, a release, an abort, the reader
    gone, the idle timeout - but blocks up to :data:`REACTOR_WAIT_S` for the next message.
    """

    def _run_reactor(self) -> None:
        self._is_paused = False
        while not self._kill:
            self._is_paused = True
            self._reactor_checkpoint.wait()  # pynetdicom pauses the reactor around its own sends
            self._is_paused = False
            try:
                context_id, message = self.dimse.msg_queue.get(timeout=REACTOR_WAIT_S)
            except queue.Empty:
                context_id, message = None, None
            if message is not None:
                self._serve_request(message, int(context_id or 0))
                continue
            if self._reactor_step_ends():
                return

    def _reactor_step_ends(self) -> bool:
        """pynetdicom's end-of-association checks of one reactor turn; True when it is over."""
        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            logger.debug("association released")
            self.is_released, self.is_established = True, False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return True
        if self.acse.is_aborted():
            self.dul.receive_pdu(wait=False)  # so EVT_ACSE_RECV fires, as pynetdicom does
            self.is_aborted, self.is_established = True, False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return True
        if not self.dul.is_alive():
            self.kill()
            return True
        if self.dul.idle_timer_expired():
            logger.warning("DICOM association idle past its network timeout; ending it")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return True
        return False


class SpoolingRequestHandler(RequestHandler):
    """Sets up each accepted association with its own spooling DIMSE provider and reader delay."""

    server: SpoolingAssociationServer

    def handle(self) -> None:
        """As pynetdicom's ``RequestHandler.handle``, with the association adjusted before it starts;
        then this connection's thread watches it (see the module doc)."""
        connection = self.request
        assert isinstance(connection, socket.socket)
        if isinstance(connection, ssl.SSLSocket):
            try:
                connection.do_handshake()
            except (OSError, ValueError) as exc:
                logger.warning(
                    "DICOM TLS handshake with %s failed: %s", self.client_address[0], describe(exc)
                )
                self.server.shutdown_request(connection)
                return
        assoc = self._create_association()
        # the reactor above, on this one object (pynetdicom builds it inside _create_association)
        assoc.__class__ = SpoolingAssociation
        provider = SpoolingDIMSEProvider(assoc, self.server.spool_dir, self.server.has_room)
        assoc.dimse = provider
        assoc.bind(evt.EVT_CONN_CLOSE, provider.discard_incomplete)
        # Private in pynetdicom 3, set on this association's own reader only (see the module doc).
        if hasattr(assoc.dul, "_run_loop_delay"):
            assoc.dul._run_loop_delay = READER_DELAY_S
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        self._watch(assoc, connection)

    def _watch(self, assoc: Any, connection: socket.socket) -> None:
        """Until the association ends: shut the connection down when no association request came
        within the ACSE timeout, or when it stays idle past its timeout (plus a grace) unended."""
        started = time.monotonic()
        acse_s = float(self.server.ae.acse_timeout or 30)
        idle_s = float(self.server.ae.network_timeout or 60)
        idle_since: float | None = None
        while assoc.is_alive():
            assoc.join(timeout=1.0)
            now = time.monotonic()
            ended = assoc.is_established or assoc.is_rejected or assoc.is_aborted or assoc.is_released
            why = ""
            if not ended and now - started > acse_s + 2:
                why = f"no association request within {acse_s:.0f} s"
            elif assoc.is_established and assoc.dul.idle_timer_expired():
                idle_since = idle_since or now
                if now - idle_since > min(idle_s, 10.0):
                    why = f"idle for more than {idle_s:.0f} s"
            else:
                idle_since = None
            if why:
                logger.warning("DICOM connection from %s closed: %s", self.client_address[0], why)
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
                assoc.join(timeout=10.0)
                return


class SpoolingAssociationServer(ThreadedAssociationServer):
    """A threaded association server whose associations stream C-STORE datasets into ``spool_dir``."""

    # Each connection's thread lives as long as its association (it watches it): closing the
    # server aborts the associations and does not wait for those threads.
    daemon_threads = True
    block_on_close = False

    def __init__(
        self,
        ae: ApplicationEntity,
        address: tuple[str, int],
        ae_title: str,
        contexts: list[Any],
        ssl_context: Any = None,
        evt_handlers: list[Any] | None = None,
        *,
        spool_dir: Path,
        has_room: Callable[[], bool] = lambda: True,
    ):
        self.spool_dir = Path(spool_dir)
        self.has_room = has_room
        super().__init__(
            ae,
            address,
            ae_title,
            contexts,
            ssl_context,
            evt_handlers=evt_handlers,
            request_handler=SpoolingRequestHandler,
        )
        self._thread: threading.Thread | None = None

    @classmethod
    def start(
        cls,
        ae: ApplicationEntity,
        address: tuple[str, int],
        *,
        spool_dir: Path,
        evt_handlers: list[Any],
        has_room: Callable[[], bool] = lambda: True,
        ssl_context: ssl.SSLContext | None = None,
    ) -> SpoolingAssociationServer:
        """Bind ``address`` and serve in a background thread (what ``AE.start_server`` does); with
        ``ssl_context`` every connection is TLS."""
        server = ae.make_server(
            address,
            evt_handlers=evt_handlers,
            ssl_context=ssl_context,
            server_class=cls,
            spool_dir=spool_dir,
            has_room=has_room,
        )
        assert isinstance(server, cls)
        server._thread = threading.Thread(target=server.serve_forever, name="dicom-acceptor", daemon=True)
        server._thread.start()
        return server

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection: a timeout on its socket (the idle timeout), and for TLS the wrapping
        only; the handshake happens in the connection's own thread (:meth:`SpoolingRequestHandler.handle`)."""
        assert self.socket is not None
        connection, address = self.socket.accept()
        connection.settimeout(float(self.ae.network_timeout or 60))
        if self.ssl_context:
            connection = self.ssl_context.wrap_socket(
                connection, server_side=True, do_handshake_on_connect=False
            )
        return connection, address

    def shutdown(self) -> None:
        """Stop accepting, close the socket and abort the associations still open.

        pynetdicom's own ``shutdown`` also unregisters the server from ``AE._servers``, which
        only ``AE.start_server`` registers in; this server was made through ``AE.make_server``.
        """
        socketserver.BaseServer.shutdown(self)
        for assoc in self.active_associations:
            assoc.abort()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
