"""``cbmir watch DIR``: take files dropped into a folder into the same path as the DICOM listener.

Every accepted file becomes one DICOM object in the spool (:meth:`Spool.store`, durable) and one
``cbmir.embed_instance`` task; the workers cannot tell a watched file from a received one.

Input rules (the conformance document lists them too):

* **Which files.** Regular files anywhere under DIR. Ignored: every path with a component that
  starts with a dot (dotfiles, ``.processed/``, ``.failed/``, editors' swap files), names ending in
  ``.part``, ``.tmp``, ``.partial`` or ``~`` (a copy still in progress: rename when done), and
  symbolic links.
* **Complete files only.** A file is taken once its size and modification time have not changed
  for ``settle_s`` seconds (``--settle``, default 1 s) *and* no process holds it open for writing
  (checked with a Linux read lease where the kernel allows one; elsewhere the settle rule alone).
* **What a file is.** By content first (``DICM`` at byte 128, the PNG or JPEG signature, the EDF/BDF
  header), else by suffix (``.dcm``/``.dicom``/``.dic``/``.ima``/none: DICOM; ``.png``/``.jpg``/
  ``.jpeg``: picture; ``.edf``/``.bdf``: EEG). Anything else is quarantined as
  ``unsupported-file-type``.
* **DICOM** is spooled byte for byte under its SOP Instance UID (:func:`spool_name_for`) after a
  header check. The SOP classes are those the listener negotiates
  (:func:`services.scp.accepted_storage_classes`); anything else (SR documents, RT plans, ...) is
  quarantined with the decoder's reason, as the listener would have refused it.
* **PNG/JPEG** become a Secondary Capture Image object: the picture is reduced to 8-bit luma by
  exactly the function the query service uses for picture queries
  (:func:`models.preprocess.decode_image_bytes`: EXIF orientation, ITU-R BT.601 luma, 16-bit / 257),
  stored as MONOCHROME2, so a picture query with the same bytes finds it at distance 0. The modality
  comes from the first folder under DIR, because a PNG carries none: ``xray/`` -> Modality ``CR``,
  ``mri/`` -> ``MR``, ``oct/`` -> ``OPT``, ``eeg/`` -> ``EEG``, anything else (or DIR itself) ->
  ``OT`` (other). Folder names are compared case-insensitively. Secondary Capture rather than a
  modality IOD, because nothing about the acquisition is known; the Modality attribute carries the
  folder's modality, which is what cbmir indexes by.
* **EDF/BDF** becomes a Routine Scalp EEG Waveform object holding the channel
  :func:`services.edf.read_edf_signal` picks (the first EEG channel), in µV at the file's own
  sampling rate, one multiplex group as in :mod:`services.dicomize`; the worker renders it with the
  same trace renderer as training.
* **UIDs.** Converted objects get new UIDs under pydicom's root, derived from the file's SHA-256
  (and the folder modality): a new object for every distinct file, and the same UIDs if the very
  same file is dropped again, so a repeat overwrites its index point instead of duplicating it.
* **After the spool write is durable and the task is sent**, the original moves to
  ``DIR/.processed/<relative path>``; a file that cannot be used (not decodable, unsupported) is
  copied into the quarantine with a reason (``stage: watcher``, counted by ``cbmir stats``) and the
  original moves to ``DIR/.failed/<relative path>``. Nothing is ever deleted; a name already taken
  there gets a numeric suffix. Files already in DIR when the watcher starts are taken too, so
  nothing dropped while it was down is missed, and nothing moved out is seen again.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import io
import logging
import os
import signal
import stat
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from services.config import WatcherSettings
from services.dispatch import TaskDispatcher
from services.errors import CbmirError, InvalidInput, StorageError, TooLarge, UnreadableInput
from services.spool import Spool, fsync_dir, spool_name_for

logger = logging.getLogger(__name__)

PROCESSED_DIR = ".processed"
FAILED_DIR = ".failed"
TEMP_SUFFIXES = (".part", ".tmp", ".partial", "~")
DICOM_SUFFIXES = frozenset({"", ".dcm", ".dicom", ".dic", ".ima"})
PICTURE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
EDF_SUFFIXES = frozenset({".edf", ".bdf"})
FOLDER_MODALITIES = {"xray": "CR", "mri": "MR", "oct": "OPT", "eeg": "EEG"}
OTHER_MODALITY_CODE = "OT"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
ROUTINE_SCALP_EEG = "1.2.840.10008.5.1.4.1.1.9.7.1"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_EDF_MAGIC = b"0       "
_BDF_MAGIC = b"\xffBIOSEMI"


# --- what a file is ------------------------------------------------------------------------------


def is_ignored(relative: Path) -> bool:
    """Dotfiles, anything under a dot folder (``.processed``, ``.failed``) and temp names."""
    if any(part.startswith(".") for part in relative.parts):
        return True
    return relative.name.lower().endswith(TEMP_SUFFIXES)


def detect_kind(name: str, head: bytes) -> str:
    """``dicom`` | ``png`` | ``jpeg`` | ``edf`` | ``unknown``: content first, then the suffix."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(_JPEG_MAGIC):
        return "jpeg"
    if head.startswith((_EDF_MAGIC, _BDF_MAGIC)):
        return "edf"
    suffix = Path(name).suffix.lower()
    if suffix in PICTURE_SUFFIXES:
        return "png" if suffix == ".png" else "jpeg"
    if suffix in EDF_SUFFIXES:
        return "edf"
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    return "unknown"


def folder_modality(relative: Path) -> str:
    """Modality code for a picture from its first folder under DIR (``OT`` at the top level)."""
    if len(relative.parts) < 2:
        return OTHER_MODALITY_CODE
    return FOLDER_MODALITIES.get(relative.parts[0].lower(), OTHER_MODALITY_CODE)


# --- conversion into DICOM -----------------------------------------------------------------------


def _identity(digest: str, kind: str, modality_code: str, when: float):
    """A dicomize context: UIDs and a synthetic patient derived from the file's content."""
    import datetime as dt

    from pydicom.uid import generate_uid

    from services.dicomize import _Context

    def uid(role: str) -> str:
        return generate_uid(entropy_srcs=["cbmir-watch", role, kind, modality_code, digest])

    return _Context(
        patient_id="CBMIR-" + digest[:12].upper(),
        study_uid=uid("study"),
        series_uid=uid("series"),
        instance_uid=uid("instance"),
        frame_of_reference_uid=uid("frame-of-reference"),
        study_time=dt.datetime.fromtimestamp(when).replace(microsecond=0),
        instance_number=1,
    )


def _common(sop_class: str, modality_code: str, ctx, study: str, series: str):
    from services.dicomize import _common as dicomize_common

    ds = dicomize_common(sop_class, modality_code, {}, ctx, study, series)
    ds.file_meta.ImplementationVersionName = "CBMIR_WATCH"
    ds.ManufacturerModelName = "cbmir watch"
    ds.SoftwareVersions = "cbmir watch 1"
    ds.InstitutionName = ""
    ds.DeidentificationMethod = "synthetic patient; the dropped file had no identifiers"
    return ds


def picture_dataset(grey: np.ndarray, modality_code: str, *, lossy: bool, digest: str, when: float,
                    kind: str = "picture"):
    """8-bit greyscale picture -> Secondary Capture Image object with ``modality_code``."""
    grey = np.ascontiguousarray(grey, dtype=np.uint8)
    if grey.ndim != 2 or min(grey.shape) < 1:
        raise UnreadableInput(f"picture decoded to shape {grey.shape}", reason="not-an-image")
    ctx = _identity(digest, kind, modality_code, when)
    ds = _common(SECONDARY_CAPTURE, modality_code, ctx, "Dropped picture", f"cbmir watch ({modality_code})")
    ds.ConversionType = "WSD"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.PatientOrientation = ""
    ds.Laterality = ""  # Type 2C: unknown (the body part is not known either)
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "01" if lossy else "00"
    if lossy:
        ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(grey.shape[0]), int(grey.shape[1])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelRepresentation = 0
    ds.PixelData = grey.tobytes()
    return ds


def _ds_value(value: float) -> str:
    """A float as a Decimal String (at most 16 characters)."""
    from pydicom.valuerep import format_number_as_ds

    return format_number_as_ds(float(value))


def eeg_dataset(samples_uv: np.ndarray, sampling_hz: float, *, digest: str, when: float):
    """One EEG channel in µV -> Routine Scalp EEG Waveform object (one multiplex group, SS samples).

    Integer-valued signals within ±32767 µV are stored exactly with a 1 µV sensitivity (as
    :mod:`services.dicomize` stores the Bonn corpus); anything else is centred with the channel
    baseline and scaled to use the 16-bit range.
    """
    from services.dicomize import eeg_waveform_group

    x = np.asarray(samples_uv, dtype=np.float64).ravel()
    if x.size == 0 or not np.isfinite(x).all():
        raise UnreadableInput("EEG channel has no samples or non-finite values", reason="not-edf")
    if not np.isfinite(sampling_hz) or sampling_hz <= 0:
        raise UnreadableInput("EEG channel has no positive sampling frequency", reason="invalid-attribute")
    if np.abs(x).max() <= 32767 and np.all(np.abs(x - np.rint(x)) < 1e-6):
        sensitivity, baseline = "1", "0"
    else:
        low, high = float(x.min()), float(x.max())
        baseline = _ds_value((low + high) / 2)
        half_range = max(abs(high - float(baseline)), abs(float(baseline) - low), 1e-9)
        sensitivity = _ds_value(half_range / 32000)  # headroom for the DS rounding
    stored = np.clip(np.rint((x - float(baseline)) / float(sensitivity)), -32768, 32767).astype("<i2")

    ctx = _identity(digest, "edf", "EEG", when)
    ds = _common(ROUTINE_SCALP_EEG, "EEG", ctx, "EEG", "Routine scalp EEG (from EDF)")
    ds.AcquisitionDateTime = ctx.study_time.strftime("%Y%m%d%H%M%S")
    ds.AcquisitionContextSequence = []
    ds.WaveformSequence = [eeg_waveform_group(stored, _ds_value(sampling_hz), sensitivity, baseline)]
    return ds


def dataset_bytes(ds) -> bytes:
    """Part 10 bytes (preamble, File Meta) of a dataset built here."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _decode_picture(data: bytes) -> np.ndarray:
    from PIL import Image

    from models.preprocess import decode_image_bytes

    try:
        return decode_image_bytes(data)
    except UnreadableInput as exc:
        raise UnreadableInput(f"not a decodable PNG/JPEG picture ({exc})", reason="not-an-image") from None
    except InvalidInput as exc:
        raise TooLarge(str(exc), reason="too-many-pixels") from None
    except Image.DecompressionBombError as exc:
        raise TooLarge(f"picture too large ({exc})", reason="too-many-pixels") from None
    except Exception as exc:  # any other decoder failure still means "not a usable picture"
        raise UnreadableInput(f"picture could not be decoded ({type(exc).__name__})",
                              reason="not-an-image") from None


# --- one file ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Converted:
    """A file turned into a spool entry: its name and the bytes to store (None: copy the file)."""

    spool_name: str
    data: bytes | None
    description: str


class FileConverter:
    """File -> :class:`Converted`, or a :class:`CbmirError` whose reason goes into quarantine."""

    def __init__(self):
        from services.scp import accepted_storage_classes

        self._accepted = {str(uid) for uid in accepted_storage_classes().values()}

    def convert(self, path: Path, relative: Path) -> Converted:
        try:
            with open(path, "rb") as handle:
                head = handle.read(132)
        except OSError as exc:
            raise StorageError(f"cannot read {relative}: {exc.strerror or exc}") from None
        kind = detect_kind(path.name, head)
        if kind == "dicom":
            return self._dicom(path)
        if kind in ("png", "jpeg"):
            return self._picture(path, relative, kind)
        if kind == "edf":
            return self._edf(path)
        raise InvalidInput(f"{path.suffix or 'no suffix'}: not DICOM, PNG, JPEG or EDF",
                           reason="unsupported-file-type")

    def _dicom(self, path: Path) -> Converted:
        from services.dicom import decode_for_embedding, read_header

        header = read_header(path)
        if header.sop_class_uid not in self._accepted:
            from pydicom.uid import UID

            name = UID(header.sop_class_uid).name
            try:  # the decoder names the reason (sr-document, no-image, ...)
                decode_for_embedding(path)
            except CbmirError:
                raise
            except Exception as exc:
                raise InvalidInput(f"{name} could not be read ({type(exc).__name__})",
                                   reason="unsupported-sop-class") from None
            raise InvalidInput(f"{name} is not a storage SOP class the listener accepts",
                               reason="unsupported-sop-class")
        return Converted(spool_name_for(header.sop_instance_uid), None,
                         f"DICOM {header.modality} {header.sop_instance_uid}")

    def _picture(self, path: Path, relative: Path, kind: str) -> Converted:
        data = _read(path)
        grey = _decode_picture(data)
        digest = hashlib.sha256(data).hexdigest()
        code = folder_modality(relative)
        ds = picture_dataset(grey, code, lossy=kind == "jpeg", digest=digest, when=path.stat().st_mtime,
                             kind=kind)
        return Converted(spool_name_for(ds.SOPInstanceUID), dataset_bytes(ds),
                         f"{kind.upper()} as Secondary Capture, Modality {code}, {ds.SOPInstanceUID}")

    def _edf(self, path: Path) -> Converted:
        from services.edf import read_edf_signal

        samples_uv, sampling_hz = read_edf_signal(path)
        digest = _sha256_file(path)
        ds = eeg_dataset(samples_uv, sampling_hz, digest=digest, when=path.stat().st_mtime)
        return Converted(spool_name_for(ds.SOPInstanceUID), dataset_bytes(ds),
                         f"EDF as Routine Scalp EEG waveform ({sampling_hz:g} Hz), {ds.SOPInstanceUID}")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StorageError(f"cannot read {path.name}: {exc.strerror or exc}") from None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def writer_active(path: Path) -> bool | None:
    """Whether another process holds ``path`` open for writing (Linux read lease); None: unknown."""
    import fcntl

    if not hasattr(fcntl, "F_SETLEASE"):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        return True if exc.errno in (errno.EAGAIN, errno.EBUSY) else None  # EACCES: not our file
    else:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)


# --- the watcher ---------------------------------------------------------------------------------


@dataclass
class _Candidate:
    size: int
    mtime_ns: int
    stable_since: float
    not_before: float = 0.0
    failures: int = 0


class FolderWatcher:
    """Watches ``watch_dir``; :meth:`start` runs the observer and the ingest loop in threads."""

    def __init__(self, settings: WatcherSettings, spool: Spool, dispatcher: TaskDispatcher, *,
                 poll_s: float = 0.2, rescan_s: float = 10.0):
        if settings.watch_dir is None:
            raise InvalidInput("no folder to watch: give DIR or set CBMIR_WATCH_DIR")
        self.root = Path(settings.watch_dir)
        self.settle_s = settings.settle_s
        self.spool = spool
        self.dispatcher = dispatcher
        self.converter = FileConverter()
        self.poll_s = poll_s
        self.rescan_s = rescan_s
        self.counts = {"spooled": 0, "failed": 0}
        self._lock = threading.Lock()
        self._candidates: dict[Path, _Candidate] = {}
        self._awaiting_dispatch: dict[Path, Path] = {}  # spooled, task in the backlog: source -> rel
        self._stuck: dict[Path, tuple[int, int]] = {}  # handled but could not be moved away
        self._stop = threading.Event()
        self._observer = None
        self._thread: threading.Thread | None = None

    # -- discovery ----------------------------------------------------------------------------
    def notice(self, path: str | os.PathLike) -> None:
        """A file event (or a scan) saw ``path``; it is considered once it has settled."""
        path = Path(path)
        try:
            relative = path.relative_to(self.root)
        except ValueError:
            return
        if is_ignored(relative):
            return
        with self._lock:
            if path not in self._candidates:
                self._candidates[path] = _Candidate(-1, -1, time.monotonic())

    def scan(self) -> int:
        """Walk the folder (dot folders pruned) and notice every regular file; returns how many."""
        found = 0
        for folder, dirs, files in os.walk(self.root):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                self.notice(Path(folder) / name)
                found += 1
        return found

    def _start_observer(self) -> None:
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:
            logger.warning("watchdog unavailable; scanning %s every %.0f s", self.root, self.rescan_s)
            return
        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                if event.is_directory:
                    return
                target = getattr(event, "dest_path", "") or event.src_path
                if event.event_type in ("created", "modified", "moved", "closed") and target:
                    watcher.notice(os.fsdecode(target))

        try:
            observer = Observer()
            observer.schedule(Handler(), str(self.root), recursive=True)
            observer.start()
        except Exception as exc:  # inotify limits and the like: fall back to periodic scans
            logger.warning("file events unavailable (%s); scanning %s every %.0f s", exc, self.root,
                           self.rescan_s)
            return
        self._observer = observer

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._start_observer()
        found = self.scan()
        self._thread = threading.Thread(target=self._loop, name="watch-ingest", daemon=True)
        self._thread.start()
        logger.info("watching %s (settle %.1f s); %d file(s) already there", self.root, self.settle_s, found)

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
        self.dispatcher.close()

    def _loop(self) -> None:
        next_scan = time.monotonic() + self.rescan_s
        next_flush = time.monotonic() + 2.0
        while not self._stop.is_set():
            try:
                self.poll_once()
                now = time.monotonic()
                if now >= next_scan:
                    next_scan = now + self.rescan_s
                    self.scan()
                if now >= next_flush:
                    next_flush = now + 2.0
                    self._flush_backlog()
            except Exception:  # the loop must survive anything; files stay where they are
                logger.exception("watch loop iteration failed")
            self._stop.wait(self.poll_s)

    # -- settling and ingest ------------------------------------------------------------------
    def poll_once(self) -> int:
        """Take every candidate that has settled; returns how many files were handled."""
        now = time.monotonic()
        with self._lock:
            items = list(self._candidates.items())
        ready = []
        for path, candidate in items:
            try:
                info = os.lstat(path)
            except OSError:
                self._forget(path)
                continue
            if not stat.S_ISREG(info.st_mode):
                self._forget(path)
                continue
            if (info.st_size, info.st_mtime_ns) != (candidate.size, candidate.mtime_ns):
                candidate.size, candidate.mtime_ns, candidate.stable_since = info.st_size, info.st_mtime_ns, now
                continue
            if now - candidate.stable_since < self.settle_s or now < candidate.not_before:
                continue
            if path in self._awaiting_dispatch or self._stuck.get(path) == (info.st_size, info.st_mtime_ns):
                continue
            if writer_active(path):
                candidate.stable_since = now  # still open for writing: wait another settle period
                continue
            ready.append((info.st_mtime_ns, path))
        handled = 0
        for _, path in sorted(ready):
            if self._stop.is_set():
                break
            if self.ingest(path):
                handled += 1
        return handled

    def _forget(self, path: Path) -> None:
        with self._lock:
            self._candidates.pop(path, None)

    def _retry_later(self, path: Path, detail: str) -> None:
        with self._lock:
            candidate = self._candidates.get(path)
            if candidate is not None:
                candidate.failures += 1
                delay = min(60.0, 2.0 ** min(candidate.failures, 6))
                candidate.not_before = time.monotonic() + delay
        logger.error("%s: %s; trying again later", path, detail)

    def ingest(self, path: Path) -> bool:
        """Convert, spool and dispatch one settled file, or quarantine it; then move it away."""
        relative = path.relative_to(self.root)
        try:
            converted = self.converter.convert(path, relative)
        except StorageError as exc:  # could not read it now: maybe later
            self._retry_later(path, str(exc))
            return False
        except CbmirError as exc:
            return self._fail(path, relative, exc.reason, str(exc))
        except Exception as exc:  # a bug must not stop the watcher, nor lose the file
            logger.exception("converting %s failed unexpectedly", relative)
            return self._fail(path, relative, "internal-error", f"{type(exc).__name__}: {exc}")
        try:
            if converted.data is None:
                self.spool.store_file(path, converted.spool_name)
            else:
                self.spool.store(converted.spool_name, converted.data)
        except StorageError as exc:
            self._retry_later(path, str(exc))
            return False
        sent = self.dispatcher.embed(converted.spool_name)
        self.counts["spooled"] += 1
        logger.info("spooled %s as %s (%s)", relative, converted.spool_name, converted.description)
        if not sent:  # in the dispatcher's backlog: the original stays until the task is sent
            self._forget(path)
            self._awaiting_dispatch[path] = relative
            return True
        self._move(path, relative, PROCESSED_DIR)
        return True

    def _fail(self, path: Path, relative: Path, reason: str, detail: str) -> bool:
        try:
            self.spool.quarantine(path, reason=reason, detail=f"{relative}: {detail}", stage="watcher")
        except StorageError as exc:
            self._retry_later(path, f"cannot quarantine: {exc}")
            return False
        self.counts["failed"] += 1
        self._move(path, relative, FAILED_DIR)
        return True

    def _move(self, path: Path, relative: Path, folder: str) -> Path | None:
        target = self.root / folder / relative
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                target = target.with_name(f"{target.stem}.{time.time_ns()}{target.suffix}")
            os.replace(path, target)
            fsync_dir(target.parent)
        except OSError as exc:
            try:
                info = os.lstat(path)
                self._stuck[path] = (info.st_size, info.st_mtime_ns)
            except OSError:
                pass
            logger.error("handled %s but cannot move it into %s: %s", relative, folder, exc.strerror or exc)
            return None
        self._forget(path)
        self._stuck.pop(path, None)
        return target

    def _flush_backlog(self) -> None:
        if not self.dispatcher.backlog_size and not self._awaiting_dispatch:
            return
        left = self.dispatcher.flush_backlog() if self.dispatcher.backlog_size else 0
        if left == 0 and self._awaiting_dispatch:
            waiting, self._awaiting_dispatch = self._awaiting_dispatch, {}
            for path, relative in waiting.items():
                self._move(path, relative, PROCESSED_DIR)
            logger.info("broker back: dispatch backlog flushed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cbmir watch",
                                     description="Ingest DICOM, PNG/JPEG and EDF files dropped into a folder.")
    parser.add_argument("dir", metavar="DIR", nargs="?", help="folder to watch (default CBMIR_WATCH_DIR)")
    parser.add_argument("--settle", type=float, default=None, metavar="SECONDS",
                        help="how long size and mtime must stay unchanged before a file is taken (default 1)")
    args = parser.parse_args(argv)
    from services.logs import configure_logging

    configure_logging()
    settings = WatcherSettings.from_env()
    if args.dir:
        settings = replace(settings, watch_dir=Path(args.dir).expanduser().resolve())
    if args.settle is not None:
        if args.settle < 0:
            parser.error("--settle must be >= 0")
        settings = replace(settings, settle_s=args.settle)
    if settings.watch_dir is None:
        print("cbmir watch: give DIR or set CBMIR_WATCH_DIR", flush=True)
        return 2
    watcher = FolderWatcher(settings, Spool(settings.layout), TaskDispatcher(settings.broker))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    watcher.start()
    print(f"cbmir watch: watching {settings.watch_dir}", flush=True)
    stop.wait()
    watcher.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
