"""Helpers shared by the benchmark scripts: timing statistics, tables, vectors, exact k-NN, processes.

Not a benchmark itself. The scripts put this folder on ``sys.path`` and ``import _common``.
"""

from __future__ import annotations

import math
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.core.processes import stop_process
from services.core.vocabulary import DICOM_MODALITY_CODES, LIBRARY, MR_IMAGE, TRAINED_MODALITIES

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_MODALITIES = TRAINED_MODALITIES


# -- statistics and tables -------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None) -> str:
    """A plain-text (and Markdown-compatible) table."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        return (
            "| "
            + " | ".join(
                c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
            + " |"
        )

    out = [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in cells[1:]]
    if title:
        out.insert(0, f"\n{title}\n")
    return "\n".join(out)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}" if abs(value) >= 0.1 else f"{value:.3f}"
    return str(value)


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for row in Path("/proc/cpuinfo").read_text().splitlines():
            if row.startswith("model name"):
                cpu = row.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{time.strftime('%Y-%m-%d %H:%M')} | {os.cpu_count()} CPU ({cpu})"
        f" | Python {platform.python_version()}"
        f" | {platform.system()} {platform.release()} | load avg {load}"
    )


# -- vectors and exact search ----------------------------------------------------------------------
@dataclass
class VectorSet:
    """Random vectors with a uniform random modality each, and their SOP Instance UIDs; the rows in
    ``library`` (a mask, if any) are reference-library points (``source`` = library)."""

    vectors: np.ndarray  # (n, dim) float32
    modalities: np.ndarray  # (n,) int index into BENCH_MODALITIES
    uids: list[str]
    library: np.ndarray | None = None  # (n,) bool

    def payload(self, i: int) -> dict:
        modality = BENCH_MODALITIES[int(self.modalities[i])]
        extra = (
            {"source": LIBRARY, "finding": "benchmark"}
            if self.library is not None and self.library[i]
            else {}
        )
        return extra | {
            "sop_instance_uid": self.uids[i],
            "study_instance_uid": f"2.25.9{i // 4}",
            "series_instance_uid": f"2.25.8{i // 4}",
            "sop_class_uid": MR_IMAGE,
            "modality": modality,
            "modality_code": DICOM_MODALITY_CODES[modality],
            "frame_number": 1,
        }


def make_vectors(n: int, dim: int, seed: int = 0) -> VectorSet:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    modalities = rng.integers(0, len(BENCH_MODALITIES), size=n)
    uids = [f"2.25.{seed}{i:09d}" for i in range(n)]  # valid UIDs (digits and dots)
    return VectorSet(vectors, modalities, uids)


class NumpyKnn:
    """Exact Euclidean k-NN by brute force, with per-modality sub-matrices as the "payload index"."""

    def __init__(self, vectors: np.ndarray, modalities: np.ndarray):
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.norms = np.einsum("ij,ij->i", self.vectors, self.vectors)
        self.by_modality = {}
        for m in range(len(BENCH_MODALITIES)):
            rows = np.flatnonzero(modalities == m)
            self.by_modality[m] = (rows, self.vectors[rows], self.norms[rows])

    def search(self, query: np.ndarray, k: int, modality: int | None = None) -> np.ndarray:
        """Row indices of the k nearest (ascending distance)."""
        if modality is None:
            rows, matrix, norms = None, self.vectors, self.norms
        else:
            rows, matrix, norms = self.by_modality[modality]
        d2 = norms - 2.0 * (matrix @ query)
        top = np.argpartition(d2, k)[:k] if len(d2) > k else np.arange(len(d2))
        top = top[np.argsort(d2[top])]
        return top if rows is None else rows[top]

    def exact(self, query: np.ndarray, k: int, modality: int | None = None) -> np.ndarray:
        """Ground truth in float64 (no norm trick), for recall."""
        if modality is None:
            rows, matrix = np.arange(len(self.vectors)), self.vectors
        else:
            rows, matrix = self.by_modality[modality][0], self.by_modality[modality][1]
        d2 = ((matrix.astype(np.float64) - query.astype(np.float64)) ** 2).sum(axis=1)
        return rows[np.argsort(d2, kind="stable")[:k]]


def recall(found: Sequence[str], truth: Sequence[str]) -> float:
    return len(set(found) & set(truth)) / max(1, len(truth))


# -- processes and ports ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout_s: float = 30.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout_s:.0f}s")


def cbmir_argv(*args: str) -> list[str]:
    """The installed ``cbmir`` command with ``args`` (``python -m services`` where it is not installed)."""
    script = Path(sys.executable).with_name("cbmir")
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "services", *args]


class Service:
    """A child process that announces its address on stdout (``... HOST:PORT``); stdout is drained."""

    def __init__(
        self, argv: list[str], env: dict[str, str], announce: str, name: str, timeout_s: float = 120.0
    ):
        self.name = name
        self.tail: list[str] = []
        self.process = subprocess.Popen(
            argv,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            cwd=REPO_ROOT,
        )
        self.port: int | None = None
        deadline = time.monotonic() + timeout_s
        pattern = re.compile(re.escape(announce) + r".*:(\d+)\s*$")
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                self.process.wait()
                raise RuntimeError(
                    f"{name} exited during start (code {self.process.returncode}):\n"
                    + "".join(self.tail[-30:])
                )
            self._keep(line)
            match = pattern.search(line)
            if match:
                self.port = int(match.group(1))
                break
        if self.port is None:
            self.stop()
            raise RuntimeError(f"{name} did not announce its port in {timeout_s:.0f}s")
        threading.Thread(target=self._drain, daemon=True).start()

    def _keep(self, line: str) -> None:
        self.tail.append(line)
        del self.tail[:-200]

    def _drain(self) -> None:
        for line in self.process.stdout:
            self._keep(line)

    def stop(self, timeout_s: float = 15.0) -> None:
        stop_process(self.process, timeout_s)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def query_service_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a benchmark's own ``cbmir query``: its data folder, any free port on
    loopback, the CPU, the embedded index, no tokens (a loopback caller may do everything)."""
    env = dict(
        os.environ,
        CBMIR_DATA_DIR=str(data_dir),
        CBMIR_GRPC_HOST="127.0.0.1",
        CBMIR_GRPC_PORT="0",
        CBMIR_DEVICE="cpu",
        CBMIR_LOG_LEVEL="WARNING",
        PYTHONUNBUFFERED="1",
    )
    for name in (
        "QDRANT_URL",
        "QDRANT_API_KEY",
        "CBMIR_COLLECTION",
        "CBMIR_API_TOKENS",
        "CBMIR_API_TOKENS_FILE",
    ):
        env.pop(name, None)
    env.update(extra)
    return env


def start_query_service(env: dict[str, str]) -> Service:
    """``cbmir query`` with ``env`` (see :func:`query_service_env`); its port is ``.port``."""
    return Service([python(), "-m", "services", "query"], env, "cbmir query: gRPC on", "query")


def python() -> str:
    """The interpreter running this script (the project's venv when run as documented)."""
    return sys.executable


# -- DICOM corpora for the ingest and pipeline benchmarks ------------------------------------------
# (ingest.py, pipeline.py). One corpus = a folder of Part 10 files with their own SOP Instance UIDs;
# building the same key again with another ``seed`` gives new UIDs (and the same pixels).
SHARED_DATA = Path(os.environ.get("CBMIR_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@dataclass(frozen=True)
class CorpusKind:
    key: str
    label: str
    default_count: int
    quick_count: int


CORPORA = {
    "shared-mr": CorpusKind("shared-mr", "MR 224x224 (cbmir dicomize of shared data)", 311, 100),
    "mr224": CorpusKind("mr224", "MR 224x224x16 (pydicom)", 311, 100),
    "mr512": CorpusKind("mr512", "MR 512x512x16 (pydicom)", 200, 60),
    "cr2048": CorpusKind("cr2048", "CR 2048x2048x16 (pydicom)", 40, 12),
}


def shared_data_present() -> bool:
    return (SHARED_DATA / "manifest.csv").is_file()


def default_corpora() -> list[str]:
    """The MR objects ``cbmir dicomize`` builds from the shared data when it is there, else
    pydicom-built 512x512 MR and 2048x2048 CR."""
    return ["shared-mr"] if shared_data_present() else ["mr512", "cr2048"]


@dataclass
class Corpus:
    key: str
    label: str
    folder: Path
    files: list[Path]
    mean_bytes: float


def make_corpus(key: str, folder: Path, count: int, seed: int = 0) -> Corpus:
    """``count`` files of corpus ``key`` in ``folder`` (created); UIDs differ between seeds."""
    folder.mkdir(parents=True, exist_ok=True)
    if key == "shared-mr":
        files = _dicomize_shared_mr(folder, count, seed)
    else:
        from services.core.vocabulary import CR_IMAGE, DICOM_MODALITY_CODES, MR_IMAGE, MRI, XRAY

        rows, sop, modality = {
            "mr224": (224, MR_IMAGE, DICOM_MODALITY_CODES[MRI]),
            "mr512": (512, MR_IMAGE, DICOM_MODALITY_CODES[MRI]),
            "cr2048": (2048, CR_IMAGE, DICOM_MODALITY_CODES[XRAY]),
        }[key]
        files = synthetic_dicom(folder, rows, rows, sop, modality, count, seed)
    mean = sum(p.stat().st_size for p in files) / max(1, len(files))
    return Corpus(key, CORPORA[key].label, folder, files, mean)


def synthetic_dicom(
    folder: Path, rows: int, columns: int, sop_class: str, modality: str, count: int, seed: int = 0
) -> list[Path]:
    """Uncompressed 16-bit objects (Explicit VR Little Endian) of one series, cheap per-file variation."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(seed)
    base = (np.add.outer(np.arange(rows), np.arange(columns)) % 4096).astype(np.uint16)
    study, series = generate_uid(), generate_uid()
    files = []
    for i in range(count):
        uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = uid
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.Modality = modality
        ds.PatientID = "BENCH"
        ds.PatientName = "Bench^Ingest"
        ds.InstanceNumber = i + 1
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        noise = rng.integers(0, 64, size=(rows, 1), dtype=np.uint16)
        ds.PixelData = (base + noise).astype(np.uint16).tobytes()
        path = folder / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def _dicomize_shared_mr(folder: Path, count: int, seed: int) -> list[Path]:
    """MR objects as ``cbmir dicomize`` builds them from the shared data: the test split first
    (then val, train), all labels, in manifest order."""
    from services.dicom import dicomize
    from services.dicom.build import write_dataset

    manifest = dicomize.read_manifest(SHARED_DATA)
    rows: list = []
    for split in ("test", "val", "train"):
        rows += dicomize.select_rows(manifest, splits=[split], modalities=["mri"])
    if len(rows) < count:
        raise RuntimeError(f"the shared data has {len(rows)} MR images, fewer than {count}")
    uids = dicomize.UidFactory(seed=f"cbmir-bench-{seed}")
    return [
        write_dataset(
            dicomize.build_dataset(row, SHARED_DATA, uids=uids, instance_number=i + 1),
            folder / f"{i:05d}.dcm",
        )
        for i, row in enumerate(rows[:count])
    ]


def split_round_robin(files: Sequence[Path], folder: Path, parts: int) -> list[Path]:
    """Hard-link (else copy) ``files`` into ``parts`` sub-folders of ``folder``, dealt in turn."""
    import shutil

    dirs = [folder / f"part{i}" for i in range(parts)]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(files):
        target = dirs[i % parts] / path.name
        try:
            os.link(path, target)
        except OSError:
            shutil.copy(path, target)
    return dirs


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux ``/proc``); nan when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
