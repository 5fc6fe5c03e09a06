"""``cbmir delete``, ``cbmir verify``, ``cbmir quarantine`` and ``cbmir patient-key``.

The first three talk to the running index owner with ``--server HOST:PORT`` and an admin-role token
(``--token`` or ``CBMIR_TOKEN``). With nothing serving, they open the data folder and its index
themselves (``--data-dir``, default ``CBMIR_DATA_DIR``); the embedded index admits one process, so
while ``cbmir serve`` runs they say to use ``--server``. Both ways run the same operations
(:mod:`services.query.admin`) and print the same JSON. Every change lands in the audit trail.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict

from services.core.config import IndexSettings, WorkerSettings, patient_key_secret
from services.core.errors import BackendUnavailable, ConfigError
from services.core.patients import patient_key
from services.grpc_gen.cbmir.v1 import admin_pb2
from services.index import VectorIndex
from services.query.admin import (
    IndexMaintenance,
    delete_pb,
    list_pb,
    quarantined_pb,
    require_secret,
    selection_from_pb,
    verify_pb,
)

Call = Callable[[str, Any], Any]  # (IndexAdmin method name, request) -> response


def _add_target_arguments(parser: argparse.ArgumentParser) -> None:
    from services.ops.cli import add_client_arguments

    add_client_arguments(
        parser, server_help="the running index owner (cbmir query or serve); else --data-dir", required=False
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="with nothing serving: open this data folder and its index directly (default CBMIR_DATA_DIR)",
    )


@contextmanager
def _admin_call(args: argparse.Namespace) -> Iterator[Call]:
    """A caller of the IndexAdmin methods: over gRPC with --server, else on the data folder."""
    if args.server:
        from services.ops.cli import client_from_args

        client = client_from_args(args, timeout_s=3600.0)
        try:
            yield client.admin
        finally:
            client.close()
        return
    maintenance = _local_maintenance(args.data_dir)
    try:
        yield _LocalAdmin(maintenance).call
    finally:
        maintenance.index.close()


def _local_maintenance(data_dir: Path | None) -> IndexMaintenance:
    from models.runtime import model_version
    from services.ingest.dispatch import TaskDispatcher
    from services.ingest.spool import Spool

    env = dict(os.environ)
    if data_dir is not None:
        env["CBMIR_DATA_DIR"] = str(data_dir)
    settings = WorkerSettings.from_env(env)
    if not settings.layout.root.is_dir():
        raise ConfigError(f"{settings.layout.root} is not a data folder")
    index = open_local_index(settings.index)
    dispatcher: list[TaskDispatcher] = []

    def send(name: str) -> bool:
        if not dispatcher:
            dispatcher.append(TaskDispatcher(settings.broker))
        return dispatcher[0].embed(name)

    return IndexMaintenance(
        index,
        Spool(settings.layout),
        model_version=model_version(settings.model.model_path),
        send=send,
        patient_key_secret=settings.patient_key_secret,
    )


def open_local_index(settings: IndexSettings) -> VectorIndex:
    """The index, opened by this command itself; while a running service owns the embedded one,
    the error says to go through it."""
    from services.index import open_index

    try:
        return open_index(settings)
    except BackendUnavailable as exc:
        raise BackendUnavailable(
            f"{exc}; while it runs, give --server HOST:PORT and an admin token"
        ) from None


class _LocalAdmin:
    """The IndexAdmin methods on a data folder, answering the same messages as the service."""

    def __init__(self, maintenance: IndexMaintenance):
        self.m = maintenance
        self.who = f"local:{getpass.getuser()}"

    def call(self, method: str, request: Any) -> Any:
        """Run ``method`` as the service would."""
        m = self.m
        if method == "DeleteInstances":
            selector = request.WhichOneof("selector")
            return delete_pb(m.delete(selector, getattr(request, selector), self.who))
        if method == "Verify":
            return verify_pb(m.verify(request.repair, self.who), request.max_listed)
        selection = selection_from_pb(request.selection) if request.HasField("selection") else None
        if method == "ListQuarantine":
            entries = m.quarantined(selection or selection_from_pb(admin_pb2.QuarantineSelection()))
            return list_pb(m, entries, request.limit)
        if method == "ShowQuarantined":
            entry, header, error = m.show(request.name)
            return admin_pb2.ShowQuarantinedResponse(
                object=quarantined_pb(m, entry), header=header, header_error=error
            )
        assert selection is not None
        if method == "RequeueQuarantined":
            requeued, left = m.requeue(selection, self.who)
            return admin_pb2.RequeueQuarantinedResponse(requeued=requeued, left=left)
        if method == "PurgeQuarantine":
            return admin_pb2.PurgeQuarantineResponse(purged=m.purge(selection, self.who))
        raise ConfigError(f"unknown admin method {method}")


def as_dict(message: Any) -> dict[str, Any]:
    """A response as JSON-ready data: field names as in the proto, 64-bit counts as numbers (protobuf's
    JSON mapping would make them strings)."""
    data: dict[str, Any] = MessageToDict(
        message, always_print_fields_with_no_presence=True, preserving_proto_field_name=True
    )
    for descriptor in message.DESCRIPTOR.fields:
        value = data.get(descriptor.name)
        if descriptor.cpp_type in (descriptor.CPPTYPE_INT64, descriptor.CPPTYPE_UINT64) and isinstance(
            value, str
        ):
            data[descriptor.name] = int(value)
        elif (
            descriptor.message_type is not None
            and isinstance(value, dict)
            and not descriptor.message_type.GetOptions().map_entry
        ):
            data[descriptor.name] = as_dict(getattr(message, descriptor.name))
    return data


def _print(message: Any) -> None:
    print(json.dumps(as_dict(message), indent=2))


def _run(
    args: argparse.Namespace, method: str, request: Any, output: Callable[[Any], int | None] = _print
) -> int:
    """Call ``method``, print its answer; the exit code is what ``output`` returns (default 0)."""
    import grpc

    from services.ops.cli import _rpc_failure

    try:
        with _admin_call(args) as call:
            return int(output(call(method, request)) or 0)
    except grpc.RpcError as exc:
        return _rpc_failure(exc)


# --- cbmir delete ----------------------------------------------------------------------------------


def add_delete_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cbmir delete``."""
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--study", metavar="UID", help="every instance of this study")
    what.add_argument("--series", metavar="UID", help="every instance of this series")
    what.add_argument("--instance", metavar="UID", help="this SOP Instance UID")
    what.add_argument(
        "--patient-key", metavar="K", help="every instance of one patient (see cbmir patient-key)"
    )
    _add_target_arguments(parser)


def run_delete(args: argparse.Namespace) -> int:
    """``cbmir delete``: erase points, archived, pending and quarantined objects; idempotent."""
    request = admin_pb2.DeleteInstancesRequest()
    if args.study:
        request.study_instance_uid = args.study
    elif args.series:
        request.series_instance_uid = args.series
    elif args.instance:
        request.sop_instance_uid = args.instance
    else:
        request.patient_key = args.patient_key

    def report(response: Any) -> int:
        _print(response)
        if response.unexamined:
            print(
                f"cbmir delete: {len(response.unexamined)} object(s) are not DICOM and could not be checked "
                "(see unexamined; cbmir quarantine show NAME): check them before calling the erasure done",
                file=sys.stderr,
            )
            return 1
        return 0

    return _run(args, "DeleteInstances", request, report)


# --- cbmir verify ----------------------------------------------------------------------------------


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cbmir verify``."""
    parser.add_argument(
        "--repair", action="store_true", help="re-send the missing (and other-version) ones, delete orphans"
    )
    parser.add_argument("--max-listed", type=int, default=20, help="names listed per finding")
    _add_target_arguments(parser)


def run_verify(args: argparse.Namespace) -> int:
    """``cbmir verify``: the archive against the index; exit 1 when something is off and not repaired."""
    import grpc

    from services.ops.cli import _rpc_failure

    request = admin_pb2.VerifyRequest(repair=args.repair, max_listed=max(1, args.max_listed))
    try:
        with _admin_call(args) as call:
            report = call("Verify", request)
    except grpc.RpcError as exc:
        return _rpc_failure(exc)
    _print(report)
    problems = report.missing_count + report.orphan_count + report.other_version_count
    return 0 if problems == 0 else 1  # with --repair too: something was off, and monitoring should know


# --- cbmir quarantine ------------------------------------------------------------------------------


def _age_s(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``12h``, ``30d`` as seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    scale = units.get(text[-1:])
    number = text[:-1] if scale else text
    try:
        seconds = float(number) * (scale or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"an age like 90s, 15m, 12h or 30d, not {text!r}") from None
    if seconds < 0:
        raise argparse.ArgumentTypeError("an age cannot be negative")
    return seconds


def add_quarantine_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cbmir quarantine list|show|requeue|purge``."""
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions = {
        "list": "quarantined objects, one JSON line each (filter by --reason and --older-than)",
        "show": "one object's reason record and its DICOM header, without patient data",
        "requeue": "move the selected objects back into the spool and send them to the workers",
        "purge": "delete the selected objects for good (needs --older-than; audited)",
    }
    for action, help_text in actions.items():
        p = sub.add_parser(action, help=help_text, description=help_text)
        if action == "list":
            p.add_argument("--limit", type=int, default=1000, help="the oldest this many (at most 10000)")
        if action == "show":
            p.add_argument("name", help="the object's file name in quarantine/")
        else:
            p.add_argument("names", nargs="*", help="only these file names (default: all the filters select)")
            p.add_argument("--reason", default="", help="only objects quarantined for this reason")
            p.add_argument(
                "--older-than",
                type=_age_s,
                required=action == "purge",
                default=0.0,
                metavar="AGE",
                help="only objects quarantined longer ago than AGE (90s, 15m, 12h, 30d)",
            )
        _add_target_arguments(p)


def run_quarantine(args: argparse.Namespace) -> int:
    """``cbmir quarantine ACTION``."""
    if args.action == "show":
        return _run(args, "ShowQuarantined", admin_pb2.ShowQuarantinedRequest(name=args.name))
    selection = admin_pb2.QuarantineSelection(
        reason=args.reason, older_than_s=args.older_than, names=args.names
    )
    if args.action == "list":

        def lines(response: Any) -> int:
            for item in response.objects:
                print(json.dumps(as_dict(item)))
            if response.total > len(response.objects):
                print(
                    f"cbmir quarantine: {len(response.objects)} of {response.total} shown (--limit)",
                    file=sys.stderr,
                )
            return 0

        request = admin_pb2.ListQuarantineRequest(selection=selection, limit=args.limit)
        return _run(args, "ListQuarantine", request, lines)
    if args.action == "requeue":
        return _run(args, "RequeueQuarantined", admin_pb2.RequeueQuarantinedRequest(selection=selection))
    return _run(args, "PurgeQuarantine", admin_pb2.PurgeQuarantineRequest(selection=selection))


# --- cbmir patient-key -----------------------------------------------------------------------------


def add_patient_key_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cbmir patient-key``."""
    parser.add_argument(
        "--issuer", default="", help="Issuer of Patient ID (0010,0021), as the PACS sends it (default: none)"
    )


def run_patient_key(args: argparse.Namespace) -> int:
    """``cbmir patient-key``: read a Patient ID from standard input (never from the command line,
    where shell history and the process list would keep it) and print its keyed reference."""
    secret = require_secret(patient_key_secret())
    if sys.stdin.isatty():
        patient_id = getpass.getpass("Patient ID (not echoed): ")
    else:
        patient_id = sys.stdin.readline().rstrip("\r\n")
    key = patient_key(secret, patient_id, args.issuer)
    if not key:
        print("cbmir patient-key: the Patient ID is empty", file=sys.stderr)
        return 2
    print(key)
    return 0
