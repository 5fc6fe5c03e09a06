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
from services.core.vocabulary import DICOM_MODALITY_CODES, MR_IMAGE, TRAINED_MODALITIES

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
    """Random vectors with a uniform random modality each, and their SOP Instance UIDs."""

    vectors: np.ndarray  # (n, dim) float32
    modalities: np.ndarray  # (n,) int index into BENCH_MODALITIES
    uids: list[str]

    def payload(self, i: int) -> dict:
        modality = BENCH_MODALITIES[int(self.modalities[i])]
        return {
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
