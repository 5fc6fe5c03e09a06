"""``cbmir demo``: the whole clinical path on this machine, with real parts.

1. starts ``cbmir serve`` (listener + Celery worker + gRPC query service; embedded broker and
   index, no servers needed);
2. pushes real DICOM over a real association: the image files of the ``pydicom`` and
   ``pydicom-data`` packages (the clinical stream);
3. when ``../shared/data`` exists, imports its training split as the reference library
   (``cbmir library import``), so hits carry verified findings; without it, says there are none;
4. waits until everything is indexed (or quarantined, with its reason);
5. asks the gRPC service for similar cases (held-out shared test images against the library, and
   indexed instances, which are never their own hit), prints them as a table and writes an HTML
   report with the query and its hits as pictures, with modality, finding and distance;
6. stops everything cleanly.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO

import grpc
from tqdm import tqdm

from models.data import shared_data_dir
from services.core.answers import stats_json
from services.core.errors import CbmirError
from services.core.processes import stop_process
from services.core.vocabulary import PB_TO_MODALITY, TRAINED_MODALITIES, accepted_sop_class_uids
from services.dicom.render import thumbnail_png
from services.grpc_gen.cbmir.v1 import search_pb2
from services.ops.report import Card, QuerySection, write_report
from services.query.client import SearchClient

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


def shared_query_files(out_dir: Path, per_modality: int) -> list[tuple[Path, dict[str, str]]]:
    """Held-out queries: DICOM built from test rows of ../shared/data (none when it is absent),
    spread over the findings of each modality."""
    from services.dicom.dicomize import UidFactory, dicomize_row, read_manifest

    source = shared_data_dir()
    if not (source / "manifest.csv").exists():
        return []
    rows = read_manifest(source)
    picked: list[dict[str, str]] = []
    for modality in TRAINED_MODALITIES:
        candidates = [r for r in rows if r["modality"] == modality and r["split"] == "test"]
        labels = sorted({r["label"] for r in candidates})
        for i in range(per_modality):
            label_rows = [r for r in candidates if r["label"] == labels[i % len(labels)]]
            if i // len(labels) < len(label_rows):
                picked.append(label_rows[i // len(labels)])
    uids = UidFactory(seed=7)
    return [
        (dicomize_row(row, source, out_dir / f"query-{i:03d}.dcm", uids=uids), row)
        for i, row in enumerate(picked)
    ]


def import_library(data_dir: Path, per_label: int) -> bool:
    """``cbmir library import`` of the shared training split (``per_label`` cases per finding)
    into the running demo's data folder; False when there is no ../shared/data."""
    source = shared_data_dir()
    if not (source / "manifest.csv").exists():
        return False
    env = dict(os.environ, CBMIR_DATA_DIR=str(data_dir))
    argv = [sys.executable, "-m", "services", "library", "import", str(source), "--split", "train"]
    result = subprocess.run(
        [*argv, "--per-label", str(per_label)],
        env=env,
        text=True,
        capture_output=True,
        timeout=3600,
        check=False,
    )
    summary = [line for line in result.stdout.splitlines() if line.startswith("cbmir library:")]
    print(f"demo: reference library from the shared training split: {summary[-1] if summary else ''}")
    if result.returncode != 0:
        print(result.stderr[-2000:], file=sys.stderr)
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cbmir demo``."""
    parser.add_argument("--data-dir", help="keep the demo's data here (default: a temporary folder)")
    parser.add_argument(
        "--library-per-label",
        type=int,
        default=8,
        help="reference-library cases per finding from the shared training split, when ../shared exists",
    )
    parser.add_argument(
        "--queries-per-modality", type=int, default=2, help="held-out shared test images queried per modality"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the index")
    parser.add_argument(
        "--report", help="where to write the HTML report (default: <work folder>/report.html)"
    )


# Some pydicom test files are broken on purpose; what pydicom and the decoder say about them while
# the demo picks files is noise in a demo's output (warnings reach logging: see configure_logging).
QUIET_LOGGERS = ("pydicom", "py.warnings", "services.dicom.decode")


def _start_serve(data_dir: Path, log: IO[str]) -> tuple[subprocess.Popen[str], re.Match[str] | None]:
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
    for line in serve.stdout:
        log.write(line)
        if match := re.search(r"cbmir serve: ready dicom=([^:]+):(\d+) ae=(\S+) grpc=(\S+)", line):
            _drain(serve.stdout, log)
            return serve, match
    return serve, None


def _wait_for_index(client: SearchClient, expected: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    with tqdm(total=expected, desc="indexing", unit="obj") as bar:
        while True:
            stats = client.stats()
            done = stats.total + stats.quarantined
            bar.n = min(done, expected)
            bar.refresh()
            if stats.pending == 0 and done >= expected:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)


def run(args: argparse.Namespace) -> int:
    """``cbmir demo``: serve, push, import the library, wait, query, print, write the report, stop."""
    import pydicom  # noqa: F401 - pydicom sets its logger's level when imported: import it first

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    from services.dicom.decode import read_header
    from services.dicom.scu import send_files

    work = Path(args.data_dir).resolve() if args.data_dir else Path(tempfile.mkdtemp(prefix="cbmir-demo-"))
    data_dir, build_dir = work / "data", work / "built"
    build_dir.mkdir(parents=True, exist_ok=True)
    print(f"demo: working in {work}")
    log = open(work / "serve.log", "w")  # noqa: SIM115 - written by a thread until serve stops
    serve, ready = _start_serve(data_dir, log)
    try:
        if ready is None:
            print("demo: cbmir serve failed to start; see", work / "serve.log", file=sys.stderr)
            return 1
        host, dicom_port, ae_title, grpc_target = (
            ready.group(1),
            int(ready.group(2)),
            ready.group(3),
            ready.group(4),
        )
        print(f"demo: serving DICOM {ae_title}@{host}:{dicom_port}, gRPC {grpc_target}")

        package_files = package_dicom_files()
        with tqdm(total=len(package_files), desc="C-STORE to cbmir", unit="obj") as bar:
            statuses = send_files(host, dicom_port, package_files, called_ae=ae_title, progress=bar)
        accepted = sum(1 for s in statuses.values() if s == 0)
        print(f"demo: pushed {len(package_files)} objects, {accepted} acknowledged")
        has_library = import_library(data_dir, args.library_per_label)
        if not has_library:
            print(
                "demo: no ../shared/data here: the reference library is empty, so hits carry no findings "
                "(cbmir library import DIR adds one)"
            )
        queries = shared_query_files(build_dir, args.queries_per_modality)

        client = SearchClient(grpc_target)
        library_size = client.stats().library
        if not _wait_for_index(client, accepted + library_size, args.timeout):
            print("demo: timed out waiting for the index", file=sys.stderr)
            return 1
        summary = stats_json(client.stats())
        print(
            f"demo: index holds {summary['total']} points {summary['per_modality']}, "
            f"{summary['quarantined']} quarantined {summary['quarantine_reasons']}, "
            f"{summary['library']} reference-library cases with findings (model {summary['model_version']})"
        )

        sections: list[QuerySection] = []
        print()
        print(
            f"{'query':<46} {'rank':>4} {'distance':>9}  {'modality':<8} {'finding':<20} hit SOP Instance UID"
        )
        print("-" * 130)
        matches = total = 0
        for path, row in queries:
            response = client.search(dicom=path.read_bytes(), k=5, source="library")
            title = f"held-out {row['modality']} / {row['label']} (DICOM)"
            _print_hits(title, response.hits)
            matches += sum(1 for hit in response.hits if hit.finding == row["label"])
            total += len(response.hits)
            sections.append(_section(client, title, _query_png(path), response.hits, row["label"]))
        indexed = [(read_header(p).sop_instance_uid, p) for p, s in statuses.items() if s == 0]
        for uid, path in indexed[:: max(1, len(indexed) // 6)][:6]:
            response = client.search(sop_instance_uid=uid, k=5)
            title = f"indexed {uid[:36]}"
            _print_hits(title, response.hits)
            sections.append(_section(client, title, _query_png(path), response.hits, None))
        notes = []
        if total:
            notes.append(
                f"{matches} of {total} library hits ({100 * matches / total:.0f}%) carry the held-out "
                "query's own finding."
            )
            print(f"demo: {notes[-1]}")
        if not has_library:
            notes.append("No reference library: without ../shared/data the hits carry no findings.")
        if summary["model_version"].endswith("untrained"):
            notes.append(
                "The shipped encoder is untrained: distances show the path works, not retrieval quality."
            )
            print(f"\nnote: {notes[-1]}")
        report = Path(args.report).resolve() if args.report else work / "report.html"
        write_report(report, f"cbmir demo: similar cases (model {summary['model_version']})", sections, notes)
        print(f"demo: report with pictures: {report}")
        client.close()
        return 0
    finally:
        stop_process(serve, timeout_s=30)
        log.close()
        print("demo: stopped" + ("" if args.data_dir else f"; logs and data in {work}"))


def _query_png(path: Path) -> bytes | None:
    """The query's thumbnail, rendered here through the same display pipeline as the hits'
    (an EEG drawn by the served model's render)."""
    from models.runtime import model_eeg_render
    from services.core.config import ModelSettings
    from services.dicom.decode import decode_for_embedding

    try:
        eeg_render = model_eeg_render(ModelSettings.from_env(os.environ).model_path)
        _, frames = decode_for_embedding(path, frames="middle", eeg_render=eeg_render)
    except CbmirError:
        return None
    return thumbnail_png(frames[0].image, 160)[0]


def _section(
    client: SearchClient,
    title: str,
    query_png: bytes | None,
    hits: Iterable[search_pb2.Hit],
    label: str | None,
) -> QuerySection:
    """The report's row for one query: its picture, then each hit's thumbnail and caption."""
    cards = []
    for rank, hit in enumerate(hits, 1):
        try:
            png: bytes | None = client.render(
                hit.study_instance_uid, hit.series_instance_uid, hit.sop_instance_uid, 160
            ).png
        except grpc.RpcError:
            png = None
        lines = [
            PB_TO_MODALITY.get(hit.modality, "?") + (f" ({hit.modality_code})" if hit.modality_code else ""),
            f"finding: {hit.finding or 'not known'}",
            f"distance {hit.distance:.4f}",
        ]
        if hit.study_date:
            lines.append(f"study {hit.study_date[:4]}-{hit.study_date[4:6]}-{hit.study_date[6:]}")
        cards.append(Card(png, f"#{rank}", lines, highlight=bool(label) and hit.finding == label))
    return QuerySection(Card(query_png, title, [f"finding: {label}"] if label else []), cards)


def _print_hits(title: str, hits: Iterable[search_pb2.Hit]) -> None:
    for rank, hit in enumerate(hits, 1):
        print(
            f"{title if rank == 1 else '':<46} {rank:>4} {hit.distance:>9.4f}  "
            f"{PB_TO_MODALITY.get(hit.modality, '?'):<8} {hit.finding or '-':<20} {hit.sop_instance_uid}"
        )
    print()


def _drain(output: IO[str], log: IO[str]) -> None:
    """Copy the rest of ``output`` into ``log`` from a thread."""

    def pump() -> None:
        for line in output:
            log.write(line)
            log.flush()

    threading.Thread(target=pump, daemon=True).start()
