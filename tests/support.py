"""Real processes for integration tests: query service, listener, Celery worker, serve.

Every server binds port 0 and announces its port on stdout; every test gets its own data
directory, collection and queue, so tests never see each other's state.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import pytest

from services.core.processes import stop_process

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

REPO = Path(__file__).resolve().parent.parent
# The installed console script: tests run what users run.
CBMIR = Path(sys.executable).with_name("cbmir")
SHARED_DATA = Path(os.environ.get("CBMIR_SHARED_DATA", REPO.parent / "shared" / "data"))
REDIS_URL = os.environ.get("CBMIR_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def redis_available(url: str = REDIS_URL) -> bool:
    try:
        import redis

        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except Exception:  # noqa: BLE001 - any failure means Redis is not usable
        return False


def dcmtk_available() -> bool:
    return shutil.which("storescu") is not None


# The listener's two network sides (CBMIR_DICOM_RECEIVER); tests of its behaviour run on both.
RECEIVERS = ("pynetdicom", "dcmtk")


def receiver_env(receiver: str) -> dict[str, str]:
    """The environment that selects ``receiver`` (skipping, or failing in CI, when it is not built)."""
    if receiver == "dcmtk":
        need_dcmtk_scp()
    return {"CBMIR_DICOM_RECEIVER": receiver}


def need_dcmtk_scp() -> None:
    """Skip without the native dcmtk SCP (``make dcmtk-scp``); in CI its absence fails the test."""
    from services.core.errors import ConfigError
    from services.dicom.dcmtk_scp import find_binary

    try:
        find_binary()  # where the listener looks for it
    except ConfigError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


class Proc:
    """A child process whose output is collected in a thread (and readable while it runs)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]):
        self.name = name
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.process = subprocess.Popen(
            argv,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.process.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout_s: float = 90.0) -> re.Match:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if match := regex.search(line):
                        return match
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.process.poll() is not None and seen == len(self.lines)):
                    break
                self._cond.wait(timeout=min(remaining, 0.5))
        raise AssertionError(
            f"{self.name}: no line matching {pattern!r} within {timeout_s}s; output:\n" + self.output()
        )

    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines[-200:])

    def signal(self, sig: int) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)

    def stop(self, timeout_s: float = 15.0) -> None:
        stop_process(self.process, timeout_s, group=True)


def base_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CBMIR_", "QDRANT_"))}
    env.update(
        CBMIR_DATA_DIR=str(data_dir),
        CBMIR_COLLECTION=f"t{uuid.uuid4().hex[:12]}",
        CBMIR_DICOM_HOST="127.0.0.1",
        CBMIR_GRPC_HOST="127.0.0.1",
        CBMIR_LOG_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def start_query(env: dict[str, str]) -> tuple[Proc, int]:
    proc = Proc("query", [str(CBMIR), "query"], dict(env, CBMIR_GRPC_PORT="0"))
    port = int(proc.wait_for(r"cbmir query: gRPC on [^:]+:(\d+)").group(1))
    return proc, port


def start_scp(env: dict[str, str]) -> tuple[Proc, int]:
    proc = Proc("scp", [str(CBMIR), "scp"], dict(env, CBMIR_DICOM_PORT="0"))
    port = int(proc.wait_for(r"cbmir scp: AE \S+ listening on [^:]+:(\d+)").group(1))
    return proc, port


def start_serve(data_dir: Path, env: dict[str, str], *args: str) -> tuple[Proc, int, int]:
    """``cbmir serve`` on any free ports (``args``: more flags); returns (process, DICOM port, gRPC port)."""
    proc = Proc(
        "serve",
        [str(CBMIR), "serve", "--data-dir", str(data_dir), "--dicom-port", "0", "--grpc-port", "0", *args],
        env,
    )
    try:
        ready = proc.wait_for(r"cbmir serve: ready dicom=[^:]+:(\d+) ae=\S+ grpc=[^:]+:(\d+)", timeout_s=120)
    except AssertionError:
        proc.stop()
        raise
    return proc, int(ready.group(1)), int(ready.group(2))


def start_worker(env: dict[str, str], query_port: int | None = None) -> Proc:
    """A worker of the query service on ``env``'s data folder; in the embedded default it reaches
    the index writer on the Unix socket there (``query_port`` only says that a query service runs)."""
    del query_port
    proc = Proc("worker", [str(CBMIR), "worker"], env)
    proc.wait_for(r"celery@\S+ ready|ready\.", timeout_s=90)
    return proc


class Parts(NamedTuple):
    """The query service, the listener and a worker as separate processes."""

    query: Proc
    grpc_port: int
    scp: Proc
    dicom_port: int
    worker: Proc


def start_parts(env: dict[str, str], procs: list[Proc]) -> Parts:
    """``cbmir query``, ``cbmir scp`` and ``cbmir worker`` on ``env``, each put in ``procs`` (which
    the fixture stops) as soon as it runs."""
    query, grpc_port = start_query(env)
    procs.append(query)
    scp, dicom_port = start_scp(env)
    procs.append(scp)
    worker = start_worker(env, grpc_port)
    procs.append(worker)
    return Parts(query, grpc_port, scp, dicom_port, worker)


def storescu(
    port: int,
    files: list[Path],
    *,
    calling_aet: str = "STORESCU",
    called_aet: str = "CBMIR",
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Push files with dcmtk's storescu (Nagle off, as a PACS admin would set it)."""
    env = dict(os.environ, TCP_NODELAY="1")
    argv = [
        "storescu",
        "-v",
        "-aet",
        calling_aet,
        "-aec",
        called_aet,
        "127.0.0.1",
        str(port),
        *map(str, files),
    ]
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"storescu failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    if not predicate():
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pydicom_file(name: str) -> Path:
    """A file of pydicom's own test data or of the pydicom-data package, read locally (never
    through pydicom's data manager, which would try to download what is missing)."""
    import pydicom

    own = Path(pydicom.__file__).parent / "data" / "test_files" / name
    if own.exists():
        return own
    try:
        import data_store  # the pydicom-data package
    except ImportError:
        raise FileNotFoundError(f"{name}: pydicom-data is not installed") from None
    hits = list(Path(data_store.__file__).parent.rglob(name))
    if not hits:
        raise FileNotFoundError(name)
    return hits[0]


# Distinct real instances of several modalities, all uncompressed (storescu proposes only those).
E2E_FILES = {
    "MR_small.dcm": "mri",
    "MR-SIEMENS-DICOM-WithOverlays.dcm": "mri",
    "CT_small.dcm": "other",
    "RG3_UNCR.dcm": "xray",
    "RG1_UNCI.dcm": "xray",
}


def e2e_files() -> dict[Path, str]:
    return {pydicom_file(name): modality for name, modality in E2E_FILES.items()}


def sop_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def eeg_dataset(samples: int, sampling_hz: float, **group: object) -> Dataset:
    """A Routine Scalp EEG object with one channel of int16 samples in µV; ``group`` overrides
    attributes of its multiplex group (``unit``: the sensitivity unit's code value)."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.9.7.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "EEG"
    unit = Dataset()
    unit.CodeValue, unit.CodingSchemeDesignator, unit.CodeMeaning = "uV", "UCUM", "microvolt"
    channel = Dataset()
    channel.ChannelSensitivity, channel.ChannelSensitivityUnitsSequence = "1", Sequence([unit])
    waveform = Dataset()
    waveform.NumberOfWaveformChannels, waveform.NumberOfWaveformSamples = 1, samples
    waveform.SamplingFrequency, waveform.WaveformBitsAllocated = f"{sampling_hz:.6g}", 16
    waveform.WaveformSampleInterpretation = "SS"
    waveform.ChannelDefinitionSequence = Sequence([channel])
    waveform.WaveformData = np.zeros(samples, dtype="<i2").tobytes()
    for keyword, value in group.items():
        if keyword == "unit":
            unit.CodeValue = value
        else:
            setattr(waveform, keyword, value)
    ds.WaveformSequence = Sequence([waveform])
    return ds


def mr_series(folder: Path, count: int, size: int = 64, seed: int = 0) -> list[Path]:
    """``count`` distinct MR objects (their own UIDs and pixels), without trailing padding."""
    import numpy as np
    import pydicom
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(seed)
    template = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    del template[0xFFFCFFFC]
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for number in range(count):
        ds = template.copy()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.Rows = ds.Columns = size
        ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
        path = folder / f"mr-{number:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files
