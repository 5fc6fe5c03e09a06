"""``cbmir demo``: the whole clinical path on this machine, with real parts.

1. starts ``cbmir serve`` (listener + Celery worker + gRPC query service; embedded broker and
   index, no servers needed);
2. pushes real DICOM over a real association: the image files of the ``pydicom`` and
   ``pydicom-data`` packages, plus DICOM built from ``../shared/data`` when it exists;
3. waits until everything is indexed (or quarantined, with its reason);
4. asks the gRPC service for similar cases and prints queries and hits as a table;
5. stops everything cleanly.
"""

from __future__ import annotations

import argparse
import logging
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from tqdm import tqdm

from services.core.errors import CbmirError
from services.core.processes import stop_process
from services.core.vocabulary import PB_TO_MODALITY, TRAINED_MODALITIES, accepted_sop_class_uids
from services.grpc_gen.cbmir.v1 import search_pb2
from services.query.client import SearchClient, stats_dict

logger = logging.getLogger(__name__)

MAX_PACKAGE_FILES = 60
MAX_FILE_BYTES = 8 * 1024 * 1024


def package_dicom_files() -> list[Path]:
    """Image DICOM files shipped in pydicom and pydicom-data (read locally, never downloaded)."""
    import pydicom

    from services.dicom.decode import read_header
    from services.dicom.scu import sendable

    roots = [Path(pydicom.__file__).parent / "data" / "test_files"]
    try:
        import data_store

        roots.append(Path(data_store.__file__).parent)
    except ImportError:
        print("demo: pydicom-data is not installed; using pydicom's own files only")
    accepted = accepted_sop_class_uids()
    chosen, seen = [], set()
    for root in roots:
        for path in sorted(root.rglob("*.dcm")):
            if path.stat().st_size > MAX_FILE_BYTES:
                continue
            try:
                header = read_header(path)
            except CbmirError:
                continue
            if header.sop_class_uid not in accepted or header.sop_instance_uid in seen or not sendable(path):
                continue
            seen.add(header.sop_instance_uid)
            chosen.append(path)
    return chosen[:MAX_PACKAGE_FILES]


def shared_dicom_files(out_dir: Path, per_modality: int) -> tuple[list[Path], dict[str, dict[str, str]]]:
    """Build DICOM from ../shared/data (train rows to index, test rows to query), if it exists."""
    from models.data import shared_data_dir
    from services.dicom.dicomize import UidFactory, dicomize_row, read_manifest

    source = shared_data_dir()
    if not (source / "manifest.csv").exists():
        print("demo: no ../shared/data here; using the DICOM files of the pydicom packages")
        return [], {}
    rows = read_manifest(source)
    picked: list[dict[str, str]] = []
    for modality in TRAINED_MODALITIES:
        for split, count in (("train", per_modality), ("test", 2)):
            # spread over the labels so queries have something to find
            candidates = [r for r in rows if r["modality"] == modality and r["split"] == split]
            labels = sorted({r["label"] for r in candidates})
            for i in range(count):
                label_rows = [r for r in candidates if r["label"] == labels[i % len(labels)]]
                if i // len(labels) < len(label_rows):
                    picked.append(label_rows[i // len(labels)])
    uids = UidFactory(seed=7)
    files: list[Path] = []
    rows_by_file: dict[str, dict[str, str]] = {}
    for i, row in enumerate(tqdm(picked, desc="building DICOM from shared data", unit="obj")):
        path = dicomize_row(row, source, out_dir / f"{i:04d}.dcm", uids=uids)
        files.append(path)
        rows_by_file[str(path)] = row
    return files, rows_by_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cbmir demo``."""
    parser.add_argument("--data-dir", help="keep the demo's data here (default: a temporary folder)")
    parser.add_argument(
        "--per-modality", type=int, default=12, help="shared-data images per modality, when ../shared exists"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the index")


# Some pydicom test files are broken on purpose; what pydicom and the decoder say about them while
# the demo picks files is noise in a demo's output (warnings reach logging: see configure_logging).
QUIET_LOGGERS = ("pydicom", "py.warnings", "services.dicom.decode")


def run(args: argparse.Namespace) -> int:
    """``cbmir demo``: serve, push, wait, query, print, stop."""
    import pydicom  # noqa: F401 - pydicom sets its logger's level when imported: import it first

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    from services.dicom.decode import read_header
    from services.dicom.scu import send_files

    work = Path(args.data_dir).resolve() if args.data_dir else Path(tempfile.mkdtemp(prefix="cbmir-demo-"))
    data_dir, build_dir = work / "data", work / "built"
    build_dir.mkdir(parents=True, exist_ok=True)
    print(f"demo: working in {work}")
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services",
            "serve",
            "--data-dir",
            str(data_dir),
            "--dicom-port",
            "0",
            "--grpc-port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    assert serve.stdout is not None
    log = open(work / "serve.log", "w")  # noqa: SIM115 - written by a thread until serve stops
    try:
        ready = None
        for line in serve.stdout:
            log.write(line)
            if match := re.search(r"cbmir serve: ready dicom=([^:]+):(\d+) ae=(\S+) grpc=(\S+)", line):
                ready = match
                break
        if ready is None:
            print("demo: cbmir serve failed to start; see", work / "serve.log", file=sys.stderr)
            return 1
        _drain(serve.stdout, log)
        host, dicom_port, ae_title, grpc_target = (
            ready.group(1),
            int(ready.group(2)),
            ready.group(3),
            ready.group(4),
        )
        print(f"demo: serving DICOM {ae_title}@{host}:{dicom_port}, gRPC {grpc_target}")

        package_files = package_dicom_files()
        shared_files, shared_rows = shared_dicom_files(build_dir, args.per_modality)
        query_files = [p for p in shared_files if shared_rows[str(p)]["split"] == "test"]
        to_push = package_files + [p for p in shared_files if p not in query_files]
        with tqdm(total=len(to_push), desc="C-STORE to cbmir", unit="obj") as bar:
            statuses = send_files(host, dicom_port, to_push, called_ae=ae_title, progress=bar)
        accepted = sum(1 for s in statuses.values() if s == 0)
        print(f"demo: pushed {len(to_push)} objects, {accepted} acknowledged")

        client = SearchClient(grpc_target)
        deadline = time.monotonic() + args.timeout
        with tqdm(total=accepted, desc="indexing", unit="obj") as bar:
            while True:
                stats = client.stats()
                done = stats.total + stats.quarantined
                bar.n = min(done, accepted)
                bar.refresh()
                if stats.pending == 0 and done >= accepted:
                    break
                if time.monotonic() > deadline:
                    print("demo: timed out waiting for the index", file=sys.stderr)
                    return 1
                time.sleep(0.5)
        summary = stats_dict(client.stats())
        print(
            f"demo: index holds {summary['total']} points {summary['per_modality']}, "
            f"{summary['quarantined']} quarantined {summary['quarantine_reasons']} "
            f"(model {summary['model_version']})"
        )

        labels_by_uid = {
            read_header(Path(name)).sop_instance_uid: f"{row['modality']}/{row['label']}"
            for name, row in shared_rows.items()
        }
        print()
        print(
            f"{'query':<46} {'rank':>4} {'distance':>9}  {'modality':<8} {'label':<22} hit SOP Instance UID"
        )
        print("-" * 130)
        for path in query_files:
            row = shared_rows[str(path)]
            response = client.search(dicom=path.read_bytes(), k=5)
            _print_hits(f"held-out {row['modality']}/{row['label']} (DICOM)", response.hits, labels_by_uid)
        uids = [read_header(p).sop_instance_uid for p, s in statuses.items() if s == 0 and p in package_files]
        for uid in uids[:: max(1, len(uids) // 6)][:6]:
            response = client.search(sop_instance_uid=uid, k=5)
            _print_hits(f"indexed {uid[:36]}", response.hits, labels_by_uid)
        if summary["model_version"].endswith("untrained"):
            print(
                "\nnote: the shipped encoder is untrained; distances show the path works, "
                "not retrieval quality."
            )
        client.close()
        return 0
    finally:
        stop_process(serve, timeout_s=30)
        log.close()
        print("demo: stopped" + ("" if args.data_dir else f"; logs and data in {work}"))


def _print_hits(title: str, hits: Iterable[search_pb2.Hit], labels_by_uid: dict[str, str]) -> None:
    for rank, hit in enumerate(hits, 1):
        label = labels_by_uid.get(hit.sop_instance_uid, hit.modality_code)
        print(
            f"{title if rank == 1 else '':<46} {rank:>4} {hit.distance:>9.4f}  "
            f"{PB_TO_MODALITY.get(hit.modality, '?'):<8} {label:<22} {hit.sop_instance_uid}"
        )
    print()


def _drain(output: IO[str], log: IO[str]) -> None:
    """Copy the rest of ``output`` into ``log`` from a thread."""

    def pump() -> None:
        for line in output:
            log.write(line)
            log.flush()

    threading.Thread(target=pump, daemon=True).start()
