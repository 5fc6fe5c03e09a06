"""Online reindex: a new collection built beside the live one, then one atomic alias switch.

:class:`ReindexJob` re-embeds every archived object into a new versioned collection while the old
one keeps answering searches. From the moment the job names its target
(:meth:`VectorIndex.set_reindex_target`), every live write goes into both collections (the index
does it, in every process that writes). Passes over the archive then embed whatever the new
collection still lacks, until a pass finds nothing new; the alias switches in one atomic write,
and a last pass after the switch picks up anything archived in between. The old collection stays
for a grace period (``CBMIR_REINDEX_GRACE_S``), so a bad reindex can be switched back, and is then
dropped (or at once with ``cbmir reindex --drop-old``).

The job's state lives in ``<data>/reindex/state.json`` on the shared data volume: a reindex cut
short (a crash, a restart) resumes where it was, skipping what the new collection already holds.
It runs inside the index owner (embedded default, started by ``cbmir reindex --server``) or in the
``cbmir reindex`` process itself (with a Qdrant server, or when nothing serves).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from models.runtime import EncoderSet
from services.core.config import DecodeSettings, FramePolicy, IndexSettings
from services.core.errors import CbmirError, ConfigError
from services.core.files import fsync_dir
from services.core.logs import append_audit
from services.dicom.decode import DecodedFrame, DecodeLimits, InstanceHeader, decode_for_embedding
from services.index import VectorIndex, collection_name
from services.index.base import REINDEX_TARGET_TTL_S
from services.index.points import index_points, model_inputs
from services.ingest.library import ReferenceLibrary
from services.ingest.spool import Spool

logger = logging.getLogger(__name__)

MAX_PASSES = 6  # passes before the switch; each embeds only what arrived during the one before


@dataclass
class ReindexState:
    """What ``state.json`` records (and ``cbmir reindex`` shows)."""

    state: str = "idle"  # idle | building | done | failed
    target: str = ""
    previous: str = ""
    model_version: str = ""
    started_at: float = 0.0
    finished_at: float = 0.0
    done: int = 0
    total: int = 0
    failed: int = 0
    passes: int = 0
    error: str = ""
    retired: list[dict[str, Any]] = field(default_factory=list)  # [{collection, retired_at}]


class ReindexJob:
    """One reindex at a time over ``index``; thread-safe status."""

    def __init__(
        self,
        index: VectorIndex,
        spool: Spool,
        encoder: EncoderSet,
        *,
        alias: str,
        limits: DecodeLimits,
        frames: FramePolicy = "middle",
        batch_size: int = 32,
        patient_key_secret: bytes | None = None,
        grace_s: float = 86400.0,
        settle_s: float = 0.0,
        on_switch: Callable[[str], None] | None = None,
        erasure_lock: threading.Lock | None = None,
    ):
        self.index, self.spool, self.encoder = index, spool, encoder
        self.library = ReferenceLibrary(spool.layout)
        self.alias, self.limits, self.frames, self.batch_size = alias, limits, frames, batch_size
        self.secret, self.grace_s, self.settle_s = patient_key_secret, grace_s, settle_s
        self.on_switch = on_switch
        # held by an erasure (cbmir delete) in this process: a batch is checked and written under it
        self._erasure_lock = erasure_lock or threading.Lock()
        self.drop_when_done = False  # drop the old collections at once when a build is done
        self.who = "reindex"  # who the audit trail names for drops (the caller that started it)
        self.last_dropped: list[str] = []
        self.path = spool.layout.root / "reindex" / "state.json"
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.state = self._load()

    @classmethod
    def for_settings(
        cls,
        index: VectorIndex,
        spool: Spool,
        encoder: EncoderSet,
        settings: IndexSettings,
        decode: DecodeSettings,
        patient_key_secret: bytes | None,
        **options: Any,
    ) -> ReindexJob:
        """A job as the settings describe it. With a Qdrant server, writers in other processes
        learn of a new target within REINDEX_TARGET_TTL_S, so the job waits a little longer."""
        return cls(
            index,
            spool,
            encoder,
            alias=settings.collection,
            limits=DecodeLimits.from_settings(decode),
            frames=decode.frames,
            patient_key_secret=patient_key_secret,
            grace_s=settings.reindex_grace_s,
            settle_s=0.0 if settings.embedded else REINDEX_TARGET_TTL_S + 1.0,
            **options,
        )

    # -- state ----------------------------------------------------------------------------------
    def _load(self) -> ReindexState:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return ReindexState()
        known = set(ReindexState.__dataclass_fields__)
        return ReindexState(**{k: v for k, v in data.items() if k in known})

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as handle:
            json.dump(asdict(self.state), handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)

    def status(self) -> ReindexState:
        """A copy of the current state."""
        with self._lock:
            return ReindexState(**asdict(self.state))

    @property
    def running(self) -> bool:
        """Whether a build runs in this process now."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def interrupted(self) -> bool:
        """A build that was cut short (its process ended) and should resume."""
        return self.state.state == "building" and not self.running

    # -- running --------------------------------------------------------------------------------
    def start_background(self, drop_old: bool = False) -> ReindexState:
        """Name the target (or take up the one cut short) now, then build in a thread of this
        process; returns the state at start. ``drop_old``: drop the replaced collections at once."""
        with self._lock:
            if self.running:
                raise ConfigError(f"a reindex into {self.state.target} is running already")
            self.drop_when_done, self.last_dropped = drop_old, []
        self._prepare()
        with self._lock:
            self._thread = threading.Thread(target=self._build, name="reindex", daemon=True)
            self._thread.start()
        return self.status()

    def run(self, progress: Callable[[ReindexState], None] | None = None, who: str = "") -> ReindexState:
        """Build, switch, catch up, in this thread; resumes a build cut short. Returns the final state."""
        self.who = who or self.who
        self._prepare()
        append_audit(self.spool.layout.audit_log, self.who, "reindex-start", target=self.state.target)
        return self._build(progress)

    def _build(self, progress: Callable[[ReindexState], None] | None = None) -> ReindexState:
        try:
            for _ in range(MAX_PASSES):
                added = self._pass(progress)
                if added == 0:
                    break
            with self._lock:
                self.state.previous = self.index.current_collection() or ""
            self.index.switch_alias(self.state.target)
            if self.on_switch is not None:
                self.on_switch(self.state.target)
            logger.info("reindex: alias %s switched to %s", self.alias, self.state.target)
            if self.settle_s:
                time.sleep(self.settle_s)  # writers elsewhere may write to the old one until they look again
            self._pass(progress)  # what was archived between the last pass and the switch
            with self._lock:
                now = time.time()
                if self.state.previous and self.state.previous != self.state.target:
                    self.state.retired.append({"collection": self.state.previous, "retired_at": now})
                self.state.state, self.state.finished_at = "done", now
                self._save()
            if self.drop_when_done:
                self.last_dropped = self.drop_old(every=True)
        except Exception as exc:  # any failure must end in "failed", never a silent "building"
            if not isinstance(exc, CbmirError):
                logger.exception("reindex into %s failed", self.state.target)
            logger.error("reindex into %s failed: %s (run it again to resume)", self.state.target, exc)
            with self._lock:
                self.state.state, self.state.error = "failed", f"{type(exc).__name__}: {exc}"
                try:
                    self._save()
                except OSError:
                    logger.exception("cannot record the reindex state")
        return self.status()

    def _prepare(self) -> None:
        with self._lock:
            resume = (
                self.state.state in ("building", "failed") and self.state.target in self.index.collections()
            )
            if resume and self.state.model_version == self.encoder.version:
                logger.info("reindex: resuming the build of %s", self.state.target)
            else:
                stamp = time.strftime("%Y%m%dT%H%M%S")
                self.state = ReindexState(
                    target=f"{collection_name(self.alias, self.encoder.version)}--{stamp}",
                    model_version=self.encoder.version,
                    retired=self.state.retired,
                )
                self.index.create_collection(self.state.target, self.encoder.dim)
            self.state.state, self.state.error, self.state.started_at = "building", "", time.time()
            self.state.done = self.state.failed = self.state.passes = 0
            self._save()
        self.index.set_reindex_target(self.state.target)  # live writes go there too from now on
        if self.settle_s:
            time.sleep(self.settle_s)  # writers in other processes learn of it within this time

    def _pass(self, progress: Callable[[ReindexState], None] | None) -> int:
        """Embed every archived object the target lacks; returns how many."""
        present = {str(p.get("spool_name", "")) for _, p in self.index.scroll(self.state.target)}
        todo = [path for path in self.spool.archived() if path.name not in present]
        with self._lock:
            self.state.passes += 1
            self.state.done = len(present - {""})  # live writes and earlier passes (or a run cut short)
            self.state.total = self.state.done + len(todo)
        batch: list[tuple[InstanceHeader, list[DecodedFrame], str]] = []
        for path in todo:
            try:
                header, frames = decode_for_embedding(
                    path,
                    frames=self.frames,
                    limits=self.limits,
                    patient_key_secret=self.secret,
                    eeg_render=self.encoder.eeg_render,
                )
            except CbmirError as exc:
                if exc.reason == "no-such-file":
                    continue  # moved (erased, re-sent by verify) since the listing
                logger.warning("reindex: %s not reindexed: %s", path.name, exc.reason)
                with self._lock:
                    self.state.failed += 1
                continue
            batch.append((header, frames, path.name))
            if sum(len(item[1]) for item in batch) >= self.batch_size:
                self._flush(batch, progress)
        self._flush(batch, progress)
        with self._lock:
            self._save()
        return len(todo)

    def _flush(
        self,
        batch: list[tuple[InstanceHeader, list[DecodedFrame], str]],
        progress: Callable[[ReindexState], None] | None,
    ) -> None:
        if not batch:
            return
        vectors = self.encoder.embed_each(
            [
                model_inputs(frames, self.encoder.for_modality(header.modality).contract)
                for header, frames, _ in batch
            ],
            [header.modality for header, _, _ in batch],
        )
        points = []
        for (header, frames, name), rows in zip(batch, vectors, strict=True):
            points += index_points(
                header,
                [frame.frame_number for frame in frames],
                rows,
                model_version=self.encoder.version,
                spool_name=name,
                finding=self.library.finding_for(header.sop_instance_uid, self.spool.archived_path(name)),
            )
        with self._erasure_lock:  # an object erased meanwhile is not written into the new collection
            kept = [p for p in points if not self.spool.erased_recently(str(p.payload.get("spool_name", "")))]
            self.index.upsert(kept, collection=self.state.target)
        with self._lock:
            self.state.done += len(batch)
            if self.state.done % 512 < len(batch):
                self._save()
        batch.clear()
        if progress is not None:
            progress(self.status())

    # -- old collections ------------------------------------------------------------------------
    def drop_old(self, every: bool = False, now: float | None = None) -> list[str]:
        """Drop the collections this alias no longer uses: those retired longer than the grace
        period ago, or (``every``) all of them. Returns their names."""
        now = time.time() if now is None else now
        current, target = self.index.current_collection(), self.index.reindex_target()
        dropped = []
        with self._lock:
            candidates = [c for c in self.index.collections() if c not in (current, target)]
            retired_at = {r["collection"]: float(r["retired_at"]) for r in self.state.retired}
            for collection in candidates:
                since = retired_at.get(collection)
                if every or (since is not None and now - since >= self.grace_s):
                    self.index.drop_collection(collection)
                    dropped.append(collection)
                    append_audit(
                        self.spool.layout.audit_log,
                        self.who,
                        "drop-collection",
                        collection=collection,
                        why="--drop-old" if every else "grace period over",
                    )
            if dropped:
                self.state.retired = [r for r in self.state.retired if r["collection"] not in dropped]
                self._save()
        return dropped


def status_path(root: Path) -> Path:
    """Where a data folder keeps its reindex state."""
    return root / "reindex" / "state.json"
