"""``cbmir reindex``: the admin tool for the index.

* ``cbmir reindex`` re-embeds every archived instance with the configured model into a fresh,
  versioned collection, then switches the alias to it atomically; queries keep reading the old
  collection until the switch. With the embedded store, stop the query service first (it owns
  the index; the tool says so if it is running). With a Qdrant server it runs beside live traffic.
* ``cbmir reindex --pending`` re-sends every spooled, not yet indexed instance to the workers.
* ``cbmir reindex --requeue-quarantined [REASON]`` moves quarantined objects (all, or those with
  that reason) back into the spool and re-sends them, after a fix (a new decoder, a higher limit).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np
from tqdm import tqdm

from models.runtime import OnnxEncoder
from services.core.config import WorkerSettings
from services.core.errors import CbmirError
from services.dicom.decode import DecodedFrame, DecodeLimits, InstanceHeader, decode_for_embedding
from services.index import collection_name, open_index
from services.index.points import index_points, model_inputs
from services.ingest.dispatch import TaskDispatcher
from services.ingest.spool import Spool

logger = logging.getLogger(__name__)


def reindex_archive(settings: WorkerSettings, batch_size: int = 32) -> dict:
    """Embed the archive into a new collection and switch the alias; returns a summary."""
    spool = Spool(settings.layout)
    index = open_index(settings.index)
    encoder = OnnxEncoder(settings.model.model_path, device=settings.model.device)
    target = (
        f"{collection_name(settings.index.collection, encoder.version)}--{time.strftime('%Y%m%dT%H%M%S')}"
    )
    index.create_collection(target, encoder.dim)
    limits = DecodeLimits.from_settings(settings.decode)
    archived = spool.archived()
    done, failed = 0, {}
    pending_inputs: list[np.ndarray] = []
    pending_meta: list[tuple[InstanceHeader, list[DecodedFrame], str]] = []

    def flush() -> None:
        if not pending_inputs:
            return
        vectors = encoder.embed(np.concatenate(pending_inputs))
        start, points = 0, []
        for header, frames, name in pending_meta:
            points += index_points(
                header,
                frames,
                vectors[start : start + len(frames)],
                model_version=encoder.version,
                spool_name=name,
            )
            start += len(frames)
        index.upsert(points, collection=target)
        pending_inputs.clear()
        pending_meta.clear()

    for path in tqdm(archived, desc=f"reindex into {target}", unit="obj"):
        try:
            header, frames = decode_for_embedding(path, frames=settings.decode.frames, limits=limits)
        except CbmirError as exc:
            failed[path.name] = exc.reason
            continue
        pending_inputs.append(model_inputs(frames, encoder.contract))
        pending_meta.append((header, frames, path.name))
        done += 1
        if sum(len(m[1]) for m in pending_meta) >= batch_size:
            flush()
    flush()
    previous = index.current_collection()
    index.switch_alias(target)
    index.close()
    return {
        "collection": target,
        "previous": previous,
        "reindexed": done,
        "failed": failed,
        "model_version": encoder.version,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cbmir reindex``."""
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--pending", action="store_true", help="re-send spooled, unindexed instances")
    mode.add_argument(
        "--requeue-quarantined",
        nargs="?",
        const="",
        metavar="REASON",
        help="move quarantined objects (optionally only REASON) back and re-send them",
    )


def run(args: argparse.Namespace) -> int:
    """``cbmir reindex``: re-embed the archive, or re-send pending or quarantined instances."""
    settings = WorkerSettings.from_env()
    if args.pending or args.requeue_quarantined is not None:
        return resend(settings, requeue_reason=args.requeue_quarantined)
    try:
        summary = reindex_archive(settings, batch_size=settings.batch_size)
    except CbmirError as exc:
        print(f"cbmir reindex: {exc}", file=sys.stderr)
        return 1
    print(
        f"cbmir reindex: {summary['reindexed']} instance(s) into {summary['collection']} "
        f"(model {summary['model_version']}); "
        f"alias {settings.index.collection} switched from {summary['previous']}"
    )
    for name, reason in sorted(summary["failed"].items()):
        print(f"  not reindexed: {name}: {reason}")
    return 0


def resend(settings: WorkerSettings, requeue_reason: str | None = None) -> int:
    """Send the pending instances to the workers again; with ``requeue_reason`` (``""``: any
    reason) move the quarantined ones back into the spool first and send those.

    Objects the watcher quarantined are the dropped files themselves (a PNG, an EDF, ...), not
    DICOM the workers could read: they are left where they are, and the operator drops the
    original (kept in the watched folder's ``.failed/``) again.
    """
    spool = Spool(settings.layout)
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
    sent = sum(dispatcher.embed(name) for name in names)
    dispatcher.close()
    print(f"cbmir reindex: sent {sent} of {len(names)} instance(s) to the workers")
    return 0 if sent == len(names) else 1
