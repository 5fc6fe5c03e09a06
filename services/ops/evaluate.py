"""``cbmir evaluate``: retrieval metrics offline (:mod:`models.evaluate`), or through the service.

With ``--server HOST:PORT`` the offline evaluation runs through the service:

The database is turned into the DICOM a modality would send (``services/dicom/dicomize.py``), pushed
over a real association to the listener, embedded by the workers and indexed; each query is
built the same way and sent as DICOM bytes to ``SearchSimilar`` over gRPC. The metrics come
from the same code as the offline run (:func:`models.evaluate.run_evaluation` with this
retriever), so the two must agree; ``metrics.json`` records which retriever produced it.

The index must start empty: hits that are not part of the evaluated database would otherwise
count as misses.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from models.data import Record
from services.core.errors import BackendUnavailable, ConfigError
from services.ops.cli import add_client_arguments, client_from_args
from services.query.client import SearchClient

logger = logging.getLogger(__name__)


def _row(record: Record) -> dict[str, str]:
    return {
        "path": str(Path(record.path).resolve()),
        "modality": record.modality,
        "label": record.label,
        "split": record.split,
        "patient": record.patient or "",
    }


class ServiceRetriever:
    """A :class:`models.retrieval.Retriever` backed by the running service (ingest + gRPC)."""

    def __init__(
        self,
        grpc_target: str,
        dicom_host: str,
        dicom_port: int,
        *,
        called_ae: str = "CBMIR",
        work_dir: Path | None = None,
        timeout_s: float = 3600.0,
        client: SearchClient | None = None,
    ):
        """``client``: one with a token or TLS (default: a plain client of ``grpc_target``)."""
        from services.dicom.dicomize import UidFactory

        self.client = client or SearchClient(grpc_target, timeout_s=120)
        self.dicom_host, self.dicom_port, self.called_ae = dicom_host, dicom_port, called_ae
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="cbmir-eval-"))
        self.timeout_s = timeout_s
        self._uids = UidFactory(seed=20261122)
        self._key_by_uid: dict[str, str] = {}
        self._position: dict[str, int] = {}

    def _build(self, record: Record, folder: str, number: int) -> Path:
        from services.dicom.dicomize import dicomize_row

        return dicomize_row(_row(record), "/", self.work_dir / folder / f"{number:06d}.dcm", uids=self._uids)

    def index(self, items: Sequence[Record]) -> None:
        """Push the database over C-STORE and wait until every object is indexed."""
        from services.dicom.decode import read_header
        from services.dicom.scu import send_files

        if self.client.stats().total:
            raise ConfigError("the service's index is not empty; evaluate against an empty index")
        files = []
        for number, record in enumerate(tqdm(items, desc="dicomize database", unit="obj")):
            path = self._build(record, "database", number)
            self._key_by_uid[read_header(path).sop_instance_uid] = record.key
            self._position[record.key] = number
            files.append(path)
        with tqdm(total=len(files), desc="C-STORE database", unit="obj") as bar:
            statuses = send_files(
                self.dicom_host, self.dicom_port, files, called_ae=self.called_ae, progress=bar
            )
        refused = [p.name for p, s in statuses.items() if s != 0]
        if refused:
            raise ConfigError(f"the listener refused {len(refused)} database objects, e.g. {refused[:3]}")
        deadline = time.monotonic() + self.timeout_s
        with tqdm(total=len(files), desc="indexing", unit="obj") as bar:
            while True:
                stats = self.client.stats()
                bar.n = stats.total
                bar.refresh()
                if stats.quarantined:
                    raise ConfigError(
                        f"{stats.quarantined} database objects were quarantined: "
                        f"{ {r.reason: r.count for r in stats.quarantine_reasons} }"
                    )
                if stats.total >= len(files) and stats.pending == 0:
                    break
                if time.monotonic() > deadline:
                    raise BackendUnavailable(
                        f"only {stats.total} of {len(files)} indexed after {self.timeout_s:.0f}s"
                    )
                time.sleep(1.0)

    def search(self, item: Record, k: int) -> list[str]:
        """The keys of the ``k`` nearest database items to ``item``."""
        return self.search_many([item], k)[0]

    def search_many(self, items: Sequence[Record], k: int) -> list[list[str]]:
        """One ``SearchSimilar`` per query, sent as DICOM bytes; ties rank in database order."""
        results = []
        for number, record in enumerate(tqdm(items, desc="gRPC SearchSimilar", unit="query")):
            path = self._build(record, "queries", number)
            response = self.client.search(dicom=path.read_bytes(), k=min(k, 1000))
            hits = [(hit.distance, self._key_by_uid[hit.sop_instance_uid]) for hit in response.hits]
            # equal distances (identical pictures) rank in database order, as offline
            hits.sort(key=lambda pair: (pair[0], self._position[pair[1]]))
            results.append([key for _, key in hits])
        return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cbmir evaluate``: the offline ones, plus the service to evaluate through."""
    from models.evaluate import add_arguments as offline_arguments

    offline_arguments(parser)
    add_client_arguments(
        parser,
        server_help="evaluate through this gRPC query service (C-STORE, workers, gRPC) instead of offline",
        required=False,
    )
    parser.add_argument(
        "--dicom-server",
        metavar="HOST:PORT",
        help="the service's DICOM listener (default: the gRPC host, port 11112)",
    )
    parser.add_argument("--ae-title", default="CBMIR", help="called AE title of the listener")


def run(args: argparse.Namespace) -> int:
    """``cbmir evaluate``: offline without ``--server``, else through the service."""
    from models.evaluate import run as evaluate_as_asked

    if not args.server:
        return evaluate_as_asked(args)
    dicom = args.dicom_server or f"{args.server.rsplit(':', 1)[0]}:11112"
    host, port = dicom.rsplit(":", 1)
    retriever = ServiceRetriever(
        args.server, host, int(port), called_ae=args.ae_title, client=client_from_args(args, timeout_s=120)
    )
    # each query is one gRPC call: rank 1000 deep for the PR curves rather than the whole database
    return evaluate_as_asked(args, retriever=retriever, default_pr_depth=1000)
