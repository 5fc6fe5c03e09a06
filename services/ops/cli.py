"""``cbmir``: one command line for every part of the system.

Each command lives in the module that implements it, as ``add_arguments(parser)`` and
``run(args) -> int``; this module only lists them (:data:`COMMANDS`), builds the parser of the
command being run (so ``cbmir --help`` imports nothing heavy) and configures logging once. A
command's settings come from the environment in its ``run``. ``cbmir worker`` replaces this
process with ``python -m workers``, because ``services/`` never imports ``workers/``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from services.core.errors import CbmirError
from services.core.logs import configure_logging
from services.core.vocabulary import MODALITIES, PB_TO_MODALITY

if TYPE_CHECKING:
    from services.query.client import SearchClient


@dataclass(frozen=True)
class Command:
    """Where a command is implemented: ``module.<arguments>(parser)`` and ``module.<runner>(args)``."""

    module: str
    help: str
    arguments: str = "add_arguments"
    runner: str = "run"


COMMANDS: dict[str, Command] = {
    "serve": Command(
        "services.ops.serve", "listener + worker + gRPC on one machine, embedded broker and index"
    ),
    "scp": Command("services.ingest.listener", "run the DICOM C-STORE listener"),
    "watch": Command("services.ingest.watcher", "watch a folder for dropped DICOM, PNG/JPEG and EDF files"),
    "worker": Command(
        "services.ops.cli", "run a Celery embedding worker", "add_worker_arguments", "run_worker"
    ),
    "query": Command("services.query.service", "run the gRPC query service (owns the embedded index)"),
    "gateway": Command(
        "services.gateway.server",
        "serve the HTTP/JSON API and the similar-cases panel (calls the query service)",
    ),
    "search": Command(
        "services.ops.cli",
        "find similar cases (prints one JSON object per hit)",
        "add_search_arguments",
        "run_search",
    ),
    "stats": Command("services.ops.cli", "index statistics as JSON", "add_stats_arguments", "run_stats"),
    "reindex": Command("services.ops.reindex", "re-embed the archive into a new collection, or re-send work"),
    "delete": Command(
        "services.ops.admin",
        "erase a study, series, instance or patient: points, archived and quarantined files (audited)",
        "add_delete_arguments",
        "run_delete",
    ),
    "verify": Command(
        "services.ops.admin",
        "check the archive against the index (--repair fixes what it finds)",
        "add_verify_arguments",
        "run_verify",
    ),
    "quarantine": Command(
        "services.ops.admin",
        "list, show, requeue or purge quarantined objects",
        "add_quarantine_arguments",
        "run_quarantine",
    ),
    "patient-key": Command(
        "services.ops.admin",
        "the keyed patient reference of a Patient ID read from standard input",
        "add_patient_key_arguments",
        "run_patient_key",
    ),
    "library": Command(
        "services.ops.library", "import a labelled reference library (findings on hits), or list it"
    ),
    "demo": Command("services.ops.demo", "run the whole path on this machine and print similar cases"),
    "dicomize": Command("services.dicom.dicomize", "build DICOM objects from images and signals"),
    "train": Command("models.train", "train an encoder"),
    "export": Command("models.export", "export an encoder to ONNX (checker + parity enforced)"),
    "evaluate": Command(
        "services.ops.evaluate", "evaluate retrieval on a manifest, offline or through --server"
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``cbmir`` parser; only ``command``'s own arguments are loaded (its module imported)."""
    parser = argparse.ArgumentParser(
        prog="cbmir", description="Content-based medical image retrieval next to the PACS."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, spec in COMMANDS.items():
        p = sub.add_parser(name, help=spec.help, description=spec.help)
        if name == command:
            module = importlib.import_module(spec.module)
            getattr(module, spec.arguments)(p)
            p.set_defaults(run=getattr(module, spec.runner))
    return parser


OUR_PACKAGES = ("models", "services", "workers")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cbmir ARGV``; returns the exit code.

    Failures a user can act on end in one line on stderr and exit code 2: a setting that is
    wrong (any :class:`CbmirError` a command lets through) or an optional package this
    installation lacks (torch for ``train``, say). A bug still ends in a traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)  # the top level has no options
    try:
        parser = build_parser(command if command in COMMANDS else None)
        args = parser.parse_args(argv)
        configure_logging()
        run: Callable[[argparse.Namespace], int] = args.run
        return int(run(args) or 0)
    except ImportError as exc:
        if (exc.name or "").split(".")[0] in OUR_PACKAGES:
            raise
        print(
            f"cbmir {command}: this installation lacks the package {exc.name or exc} "
            "(see the README for what each command needs)",
            file=sys.stderr,
        )
        return 2
    except CbmirError as exc:
        print(f"cbmir {command}: {exc}", file=sys.stderr)
        return 2


# --- the commands implemented here -----------------------------------------------------------------


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cbmir worker`` (also ``python -m workers``)."""
    parser.add_argument("--concurrency", type=int, help="task threads (default CBMIR_WORKER_CONCURRENCY)")
    parser.add_argument("--hostname", help="Celery node name (default celery@<host>)")


def run_worker(args: argparse.Namespace) -> int:
    """``cbmir worker``: become ``python -m workers`` with the same flags."""
    argv = [sys.executable, "-m", "workers"]
    if args.concurrency:
        argv += ["--concurrency", str(args.concurrency)]
    if args.hostname:
        argv += ["--hostname", args.hostname]
    sys.stdout.flush()
    os.execv(sys.executable, argv)
    return 0  # not reached


def add_client_arguments(
    parser: argparse.ArgumentParser, *, server_help: str = "the gRPC query service", required: bool = True
) -> None:
    """``--server``, ``--token`` and the TLS flags of every command that calls the query service."""
    parser.add_argument("--server", required=required, metavar="HOST:PORT", help=server_help)
    parser.add_argument(
        "--token",
        default=os.environ.get("CBMIR_TOKEN") or None,
        help="API token to send (default CBMIR_TOKEN)",
    )
    parser.add_argument(
        "--tls-ca",
        type=Path,
        default=_env_path("CBMIR_TLS_CA"),
        metavar="PEM",
        help="use TLS; the service's certificate must chain to this CA (default CBMIR_TLS_CA)",
    )
    parser.add_argument("--tls-cert", type=Path, metavar="PEM", help="client certificate, for mTLS")
    parser.add_argument("--tls-key", type=Path, metavar="PEM", help="private key of --tls-cert")


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name, "").strip()
    return Path(value) if value else None


def client_from_args(args: argparse.Namespace, timeout_s: float = 30.0) -> SearchClient:
    """The query service client that :func:`add_client_arguments`' flags ask for; a token sent in
    clear to another host is warned about."""
    from services.core.security import is_loopback
    from services.query.client import SearchClient

    if args.token and args.tls_ca is None and not is_loopback(args.server.rsplit(":", 1)[0]):
        print(
            f"warning: the API token goes to {args.server} unencrypted; give --tls-ca (or CBMIR_TLS_CA)",
            file=sys.stderr,
        )

    return SearchClient(
        args.server,
        timeout_s,
        token=args.token,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cbmir search``."""
    add_client_arguments(parser)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--file", help="a DICOM file, or a PNG/JPEG (then give its modality)")
    target.add_argument("--uid", help="SOP Instance UID of an indexed instance")
    parser.add_argument("--k", type=int, default=5, help="hits wanted (1..1000)")
    parser.add_argument(
        "--modality",
        action="append",
        default=[],
        choices=MODALITIES,
        help="restrict hits to this modality (repeatable)",
    )
    parser.add_argument(
        "--image-modality",
        choices=MODALITIES,
        help="modality of a PNG/JPEG query (default: the first --modality)",
    )
    parser.add_argument(
        "--exclude-same-study", action="store_true", help="drop hits from the query's own study"
    )
    parser.add_argument(
        "--exclude-same-patient",
        action="store_true",
        help="drop hits of the query's patient (needs CBMIR_PATIENT_KEY_SECRET on the service)",
    )
    parser.add_argument(
        "--include-self",
        action="store_true",
        help="keep the query's own instance among the hits (left out by default when it is indexed)",
    )
    parser.add_argument(
        "--group-by", choices=("instance", "study"), default="instance", help="one hit per image or per study"
    )
    parser.add_argument(
        "--max-distance", type=float, default=0.0, help="drop hits farther than this (0: none)"
    )
    parser.add_argument(
        "--offset", type=int, default=0, help="paging: skip this many hits (offset + k <= 1000)"
    )
    parser.add_argument(
        "--source",
        choices=("library", "clinical"),
        help="only reference-library cases, or only clinical ones",
    )


def run_search(args: argparse.Namespace) -> int:
    """``cbmir search``: one JSON object per hit on stdout."""
    import grpc

    from services.core.answers import hit_json

    client = client_from_args(args)
    options = {
        "k": args.k,
        "modalities": args.modality,
        "exclude_same_study": args.exclude_same_study,
        "exclude_same_patient": args.exclude_same_patient,
        "exclude_self": False if args.include_self else None,
        "group_by": args.group_by,
        "max_distance": args.max_distance,
        "offset": args.offset,
        "source": args.source,
    }
    try:
        if args.uid:
            response = client.search(sop_instance_uid=args.uid, **options)
        else:
            image_modality = args.image_modality or (args.modality[0] if args.modality else None)
            response = client.search_file(Path(args.file), image_modality=image_modality, **options)
    except grpc.RpcError as exc:
        return _rpc_failure(exc)
    finally:
        client.close()
    for hit in response.hits:
        print(json.dumps({key: value for key, value in hit_json(hit).items() if key != "rendered"}))
    # the page's state goes to stderr, so stdout stays one JSON object per hit
    print(
        f"cbmir search: {len(response.hits)} hits"
        + (f"; next page: --offset {response.next_offset}" if response.next_offset else "; no further page")
        + ("; the query itself left out (--include-self shows it)" if response.excluded_self else "")
        + (
            "; compared with "
            + ", ".join(PB_TO_MODALITY.get(m, str(m)) for m in response.searched_modalities)
            if response.searched_modalities
            else ""
        ),
        file=sys.stderr,
    )
    return 0


def add_stats_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cbmir stats``."""
    add_client_arguments(parser)


def run_stats(args: argparse.Namespace) -> int:
    """``cbmir stats``: the index statistics as one JSON document."""
    import grpc

    from services.core.answers import stats_json

    client = client_from_args(args)
    try:
        print(json.dumps(stats_json(client.stats()), indent=2))
    except grpc.RpcError as exc:
        return _rpc_failure(exc)
    finally:
        client.close()
    return 0


def _rpc_failure(exc: object) -> int:
    code, details = exc.code(), exc.details()  # type: ignore[attr-defined]  # grpc.RpcError of a call
    print(f"cbmir: {code.name}: {details}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
