"""``cbmir library``: the curated reference library whose cases carry verified findings.

``cbmir library import DIR`` reads ``DIR/manifest.csv`` in the shared format (``path, modality,
label, split, ...``; ``file`` instead of ``path`` as ``cbmir dicomize`` writes it). Each row is a
DICOM object, or a picture or EEG signal that is built into one the way ``cbmir dicomize`` does,
with UIDs derived from the file's path (importing again gives the same instances). For each, the
finding (the row's label) is recorded durably in ``<data>/library``, then the object is spooled and
sent to the workers like any received instance: its point carries ``finding`` and
``source=library``, survives a reindex, and is erased by ``cbmir delete`` like any other.

``cbmir library list`` prints the library's findings per modality.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from tqdm import tqdm

from services.core.config import LibrarySettings
from services.core.errors import CbmirError, ConfigError, InvalidInput, TooLarge, UnsupportedInput
from services.core.vocabulary import accepted_sop_class_uids
from services.dicom.decode import looks_like_dicom, read_header
from services.dicom.dicomize import UidFactory, dicomize_row
from services.ingest.dispatch import TaskDispatcher
from services.ingest.library import ReferenceLibrary, check_finding
from services.ingest.spool import Spool, spool_name_for

logger = logging.getLogger(__name__)

MAX_FILE_MB = 512


def manifest_rows(folder: Path) -> list[dict[str, str]]:
    """The rows of ``folder/manifest.csv``, each with ``path`` (from ``path`` or ``file``),
    ``modality`` and ``label``."""
    import csv

    manifest = folder / "manifest.csv"
    try:
        with open(manifest, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except FileNotFoundError:
        raise InvalidInput(f"no manifest.csv in {folder}") from None
    if not rows:
        raise InvalidInput(f"{manifest} lists no files")
    columns = set(rows[0])
    if not {"path", "file"} & columns or not {"modality", "label"} <= columns:
        raise InvalidInput(f"{manifest} needs the columns path (or file), modality and label")
    for line, row in enumerate(rows, 2):  # the header is line 1
        row["line"] = str(line)
        if not row.get("path"):
            row["path"] = row.get("file", "")
    return rows


def select(
    rows: Sequence[Mapping[str, str]], splits: Sequence[str], modalities: Sequence[str], per_label: int | None
) -> list[Mapping[str, str]]:
    """Rows of these splits and modalities (empty: all), at most ``per_label`` per (modality, label)."""
    taken: Counter[tuple[str, str]] = Counter()
    chosen = []
    for row in rows:
        if splits and row.get("split", "") not in splits:
            continue
        if modalities and row["modality"] not in modalities:
            continue
        key = (row["modality"], row["label"])
        if per_label is not None and taken[key] >= per_label:
            continue
        taken[key] += 1
        chosen.append(row)
    return chosen


class LibraryImporter:
    """Builds, records and spools library cases; the workers index them."""

    def __init__(
        self, settings: LibrarySettings, folder: Path, collection: str, max_file_mb: int = MAX_FILE_MB
    ):
        self.folder = folder
        self.collection = collection
        self.max_bytes = max_file_mb * 1024 * 1024
        self.spool = Spool(settings.layout)
        self.library = ReferenceLibrary(settings.layout)
        self.dispatcher = TaskDispatcher(settings.broker)
        self.accepted = accepted_sop_class_uids()
        self._build = Path(tempfile.mkdtemp(prefix="cbmir-library-"))

    def _object(self, row: Mapping[str, str]) -> bytes:
        """The row's DICOM object: the file itself, or one built from a picture or signal."""
        source = (self.folder / row["path"]).resolve()
        if not source.is_relative_to(self.folder.resolve()):
            raise InvalidInput("a manifest path leads out of the library folder")
        try:
            size = source.stat().st_size
            if size > self.max_bytes:
                raise TooLarge(
                    f"{size / 2**20:.1f} MB is over the {self.max_bytes // 2**20} MB budget per file"
                )
            with open(source, "rb") as handle:
                head = handle.read(132)
                if looks_like_dicom(head):
                    data = head + handle.read(self.max_bytes + 1 - len(head))
                    if len(data) > self.max_bytes:
                        raise TooLarge("the file grew over the budget while it was read")
                    return data
        except OSError as exc:
            raise InvalidInput(f"cannot read the file: {exc.strerror}") from None
        # the same path gives the same UIDs: importing twice makes the same instances
        seed = hashlib.sha256(f"{self.collection}|{row['path']}".encode()).hexdigest()[:16]
        target = self._build / f"{seed}.dcm"
        dicomize_row(row, self.folder, target, uids=UidFactory(seed=seed))
        data = target.read_bytes()
        target.unlink()
        return data

    def add(self, row: Mapping[str, str]) -> tuple[str, str]:
        """Record and spool one case; returns (status, spool name): ``sent``, ``unchanged`` (the
        same object with the same finding is already in the library), ``queued`` (the broker is
        down: the pending sweep sends it later)."""
        finding = check_finding(row["label"])
        data = self._object(row)
        header = read_header(data)
        if header.sop_class_uid not in self.accepted:
            raise UnsupportedInput("not a storage SOP class cbmir accepts")
        if header.modality != row["modality"]:
            raise InvalidInput(f"the manifest says {row['modality'][:8]!r}, the object is {header.modality}")
        name = spool_name_for(header.sop_instance_uid)
        known = self.library.get(header.sop_instance_uid)
        archived = self.spool.archived_path(name)
        if (
            known is not None
            and known.finding == finding
            and archived.is_file()
            and archived.read_bytes() == data
        ):
            return "unchanged", name
        self.library.record(header.sop_instance_uid, header.modality, finding, self.collection, data)
        self.spool.store(name, data)
        return ("sent" if self.dispatcher.embed(name) else "queued"), name

    def wait(self, names: Sequence[str], timeout_s: float) -> tuple[list[str], list[str]]:
        """Wait until none of ``names`` is pending any more; returns (still pending, quarantined)."""
        deadline = time.monotonic() + timeout_s
        with tqdm(total=len(names), desc="indexing the library", unit="obj") as bar:
            while True:
                waiting = [n for n in names if self.spool.incoming_path(n).exists()]
                bar.n = len(names) - len(waiting)
                bar.refresh()
                if not waiting or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        quarantined = [n for n in names if (self.spool.layout.quarantine / n).exists()]
        return waiting, quarantined

    def close(self) -> None:
        """Close the broker connection and remove the build folder."""
        self.dispatcher.close()
        for leftover in self._build.iterdir():
            leftover.unlink()
        self._build.rmdir()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cbmir library``."""
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    imp = sub.add_parser(
        "import", help="index a labelled collection (DIR/manifest.csv) as the reference library"
    )
    imp.add_argument(
        "folder", metavar="DIR", help="folder with manifest.csv (path, modality, label[, split])"
    )
    imp.add_argument("--split", action="append", default=[], help="only rows of this split (repeatable)")
    imp.add_argument(
        "--modality", action="append", default=[], help="only rows of this modality (repeatable)"
    )
    imp.add_argument("--per-label", type=int, metavar="N", help="at most N cases per modality and finding")
    imp.add_argument("--collection", help="the collection's name in the records (default: DIR's name)")
    imp.add_argument("--max-file-mb", type=int, default=MAX_FILE_MB, help="size budget per file")
    imp.add_argument("--wait", type=float, metavar="S", help="wait up to S seconds until all are indexed")
    listing = sub.add_parser("list", help="the library's imported findings per modality, as JSON")
    for each in (imp, listing):
        each.add_argument(
            "--data-dir",
            default=os.environ.get("CBMIR_DATA_DIR", "./var"),
            help="the data folder of the running cbmir (CBMIR_DATA_DIR)",
        )


def run(args: argparse.Namespace) -> int:
    """``cbmir library import|list``."""
    settings = LibrarySettings.from_env(dict(os.environ, CBMIR_DATA_DIR=args.data_dir))
    if not settings.layout.root.is_dir():
        raise ConfigError(f"no data folder {settings.layout.root}: give --data-dir (CBMIR_DATA_DIR)")
    if args.action == "list":
        counts = ReferenceLibrary(settings.layout).counts()
        summary: dict[str, dict[str, int]] = {}
        for (modality, finding), count in sorted(counts.items()):
            summary.setdefault(modality, {})[finding] = count
        print(json.dumps({"total": sum(counts.values()), "findings": summary}, indent=2))
        return 0
    folder = Path(args.folder).expanduser().resolve()
    if args.per_label is not None and args.per_label < 1:
        raise InvalidInput("--per-label must be at least 1")
    rows = select(manifest_rows(folder), args.split, args.modality, args.per_label)
    if not rows:
        print("cbmir library: the manifest selects no rows", file=sys.stderr)
        return 1
    importer = LibraryImporter(settings, folder, args.collection or folder.name, args.max_file_mb)
    outcomes: Counter[str] = Counter()
    names: list[str] = []
    try:
        for row in tqdm(rows, desc="importing the library", unit="case"):
            try:
                status, name = importer.add(row)
            except CbmirError as exc:
                # one bad row does not stop the import; it is named by its manifest line (file names
                # can name patients), with the reason
                logger.warning("library: manifest line %s not imported: %s", row["line"], exc)
                outcomes["failed"] += 1
                continue
            outcomes[status] += 1
            if status != "unchanged":
                names.append(name)
        waiting, quarantined = importer.wait(names, args.wait) if args.wait and names else ([], [])
    finally:
        importer.close()
    for name in quarantined:
        print(f"cbmir library: {name} was quarantined (cbmir quarantine show {name})", file=sys.stderr)
    print(
        f"cbmir library: {len(rows)} cases: {outcomes['sent']} sent to the workers, "
        f"{outcomes['unchanged']} unchanged, {outcomes['queued']} queued for the broker, "
        f"{outcomes['failed']} failed"
        + (f"; {len(quarantined)} quarantined" if quarantined else "")
        + (f"; {len(waiting)} not indexed yet" if waiting else "")
    )
    return 1 if outcomes["failed"] or waiting or quarantined else 0
