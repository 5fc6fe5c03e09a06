"""``cbmir reindex``: the admin tool for the index.

* ``cbmir reindex --server HOST:PORT`` (an admin token): the running index owner re-embeds every
  archived instance into a fresh, versioned collection in the background while it keeps answering
  searches and taking upserts (each goes into both collections), then switches the alias
  atomically. The command shows the progress until it is done.
* ``cbmir reindex`` with nothing serving, or with a Qdrant server (``QDRANT_URL``): the same job in
  this process; with a Qdrant server the workers keep writing beside it.
* A reindex cut short resumes where it was, the next time it is started (the index owner resumes
  its own at start). ``--drop-old`` drops the collections it replaced at once instead of after
  ``CBMIR_REINDEX_GRACE_S``.
* ``cbmir reindex --pending`` re-sends every spooled, not yet indexed instance to the workers.
* ``cbmir reindex --requeue-quarantined [REASON]`` moves quarantined objects (all, or those with
  that reason) back into the spool and re-sends them, after a fix (a new decoder, a higher limit).
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

from services.core.config import WorkerSettings
from services.core.errors import CbmirError
from services.core.logs import append_audit
from services.grpc_gen.cbmir.v1 import admin_pb2
from services.ingest.dispatch import TaskDispatcher
from services.ingest.spool import Spool
from services.query.reindex import ReindexState

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cbmir reindex``."""
    from services.ops.cli import add_client_arguments

    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--pending", action="store_true", help="re-send spooled, unindexed instances")
    mode.add_argument(
        "--requeue-quarantined",
        nargs="?",
        const="",
        metavar="REASON",
        help="move quarantined objects (optionally only REASON) back and re-send them",
    )
    parser.add_argument(
        "--drop-old",
        action="store_true",
        help="drop replaced collections as soon as the new one serves (default: after CBMIR_REINDEX_GRACE_S)",
    )
    add_client_arguments(
        parser, server_help="the running index owner: it reindexes online (admin token)", required=False
    )
    parser.add_argument(
        "--data-dir", type=Path, help="with nothing serving: this data folder (default CBMIR_DATA_DIR)"
    )


def run(args: argparse.Namespace) -> int:
    """``cbmir reindex``: re-embed the archive online, or re-send pending or quarantined instances."""
    env = dict(os.environ)
    if args.data_dir is not None:
        env["CBMIR_DATA_DIR"] = str(args.data_dir)
    settings = WorkerSettings.from_env(env)
    if args.pending or args.requeue_quarantined is not None:
        return resend(settings, requeue_reason=args.requeue_quarantined)
    if args.server:
        return _through_server(args)
    try:
        state = _in_this_process(settings, drop_old=args.drop_old)
    except CbmirError as exc:
        print(f"cbmir reindex: {exc}", file=sys.stderr)
        return 1
    return _report(state, settings.index.collection)


def _report(state: ReindexState | admin_pb2.ReindexStatus, alias: str) -> int:
    """The outcome in a line or two (the job's own state, or the index owner's status message:
    the same fields); exit 1 unless it is done."""
    if state.state != "done":
        print(f"cbmir reindex: failed: {state.error} (start it again to resume)", file=sys.stderr)
        return 1
    print(
        f"cbmir reindex: {state.done} instance(s) into {state.target} (model {state.model_version}); "
        f"alias {alias} switched from {state.previous or 'nothing'}"
    )
    if state.failed:
        print(
            f"  {state.failed} archived object(s) could not be decoded and were not reindexed (see the log)"
        )
    return 0


def _in_this_process(settings: WorkerSettings, drop_old: bool) -> ReindexState:
    from models.runtime import EncoderSet
    from services.ops.admin import open_local_index
    from services.query.reindex import ReindexJob

    index = open_local_index(settings.index)
    try:
        encoder = EncoderSet.load(settings.model.model_path, device=settings.model.device)
        job = ReindexJob.for_settings(
            index,
            Spool(settings.layout),
            encoder,
            settings.index,
            settings.decode,
            settings.patient_key_secret,
            batch_size=settings.batch_size,
        )
        job.drop_when_done = drop_old
        bar = tqdm(desc="reindex", unit="obj", total=0)

        def progress(state: ReindexState) -> None:
            bar.total = state.total
            bar.n = state.done
            bar.refresh()

        state = job.run(progress, who=f"local:{getpass.getuser()}")
        bar.close()
        if state.state == "done" and not drop_old:
            job.drop_old()  # collections whose grace period is over
        for name in job.last_dropped:
            print(f"  dropped the old collection {name}")
        return state
    finally:
        index.close()


def _through_server(args: argparse.Namespace) -> int:
    import grpc

    from services.ops.cli import _rpc_failure, client_from_args

    client = client_from_args(args, timeout_s=60.0)
    try:
        state = client.admin("StartReindex", admin_pb2.StartReindexRequest(drop_old=args.drop_old))
        print(f"cbmir reindex: the index owner builds {state.target}; searches and ingest go on", flush=True)
        unreachable_since, idle_polls = 0.0, 0
        with tqdm(desc="reindex", unit="obj", total=state.total) as bar:
            while state.state == "building" and idle_polls < 3:
                time.sleep(0.5)
                try:
                    state = client.admin("GetReindexStatus", admin_pb2.GetReindexStatusRequest())
                except grpc.RpcError as exc:  # the owner restarts: it resumes the build by itself
                    unreachable_since = unreachable_since or time.monotonic()
                    if (
                        exc.code() != grpc.StatusCode.UNAVAILABLE
                        or time.monotonic() - unreachable_since > 120
                    ):
                        raise
                    continue
                unreachable_since = 0.0
                idle_polls = 0 if state.running else idle_polls + 1
                bar.total = max(state.total, state.done)
                bar.n = state.done
                bar.refresh()
    except grpc.RpcError as exc:
        return _rpc_failure(exc)
    finally:
        client.close()
    for name in state.dropped:
        print(f"  dropped the old collection {name}")
    if state.state == "building":
        print(
            f"cbmir reindex: the build of {state.target} stopped before it was done; start it again",
            file=sys.stderr,
        )
        return 1
    return _report(state, WorkerSettings.from_env().index.collection)


def resend(settings: WorkerSettings, requeue_reason: str | None = None) -> int:
    """Send the pending instances to the workers again; with ``requeue_reason`` (``""``: any
    reason) move the quarantined ones back into the spool first and send those.

    Objects the watcher quarantined are the dropped files themselves (a PNG, an EDF, ...), not
    DICOM the workers could read: they are left where they are, and the operator drops the
    original (kept in the watched folder's ``.failed/``) again.
    """
    spool = Spool(settings.layout)
    append_audit(
        settings.layout.audit_log,
        f"local:{getpass.getuser()}",
        "requeue-quarantined" if requeue_reason is not None else "resend-pending",
        reason=requeue_reason or "any",
    )
    if requeue_reason is not None:
        chosen = [e for e in spool.quarantine_entries() if not requeue_reason or e.reason == requeue_reason]
        dropped = [e for e in chosen if e.stage == "watcher"]
        names = [spool.requeue_quarantined(e.name).name for e in chosen if e.stage != "watcher"]
        if dropped:
            print(
                f"cbmir reindex: {len(dropped)} file(s) quarantined by the watcher are left in quarantine: "
                "drop their originals (in the watched folder's .failed/) into the folder again"
            )
    else:
        names = [path.name for path in spool.pending()]
    dispatcher = TaskDispatcher(settings.broker)
    sent = dispatcher.embed_many(names)
    dispatcher.close()
    print(f"cbmir reindex: sent {sent} of {len(names)} instance(s) to the workers")
    return 0 if sent == len(names) else 1
