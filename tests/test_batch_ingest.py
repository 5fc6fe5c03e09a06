"""Batched ingest with real parts: one task carries several instances, and one bad instance in a
batch is quarantined with its reason while the others are indexed.

The listener gathers what arrives within ``CBMIR_DISPATCH_WAIT_MS`` into one
``cbmir.embed_instances`` task; a real Celery worker (Redis) decodes the batch, embeds it in one
encoder call and writes its points in one index write.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pydicom
import pytest

from services.core.config import ListenerSettings
from services.ingest.dispatch import TaskDispatcher
from services.ingest.spool import Spool
from services.query.client import SearchClient
from tests import support

pytestmark = pytest.mark.integration


def _broken_pixels(source: Path, target: Path) -> Path:
    """A copy of ``source`` that parses but whose pixel data is too short to decode."""
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(target, enforce_file_format=True)
    return target


def test_a_batch_indexes_the_good_and_quarantines_the_bad(redis_env, procs, tmp_path):
    data = Path(redis_env["CBMIR_DATA_DIR"])
    good = support.mr_series(tmp_path / "in", 6)
    bad = _broken_pixels(good[0], tmp_path / "in" / "broken.dcm")
    spool = Spool(ListenerSettings.from_env(redis_env).layout)
    names = []
    for path in [*good, bad]:
        name = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID + ".dcm"
        spool.store(name, path.read_bytes())
        names.append(name)

    query, grpc_port = support.start_query(redis_env)
    procs.append(query)
    worker = support.start_worker(redis_env, grpc_port)
    procs.append(worker)
    dispatcher = TaskDispatcher(ListenerSettings.from_env(redis_env).broker)
    try:
        assert dispatcher.embed_many(names) == len(names)  # one task: 7 names fit in one batch
    finally:
        dispatcher.close()

    client = SearchClient(f"127.0.0.1:{grpc_port}")
    support.wait_until(lambda: client.stats().total == len(good), 90, "the good instances indexed")
    support.wait_until(lambda: client.stats().quarantined == 1, 30, "the bad instance quarantined")
    done = worker.wait_for(r"indexed (\d+) of (\d+) instance\(s\)", timeout_s=10)
    assert (int(done.group(1)), int(done.group(2))) == (len(good), len(names))  # all in one task
    assert len(re.findall(r"Task cbmir\.embed_instances\[\S+\] received", worker.output())) == 1
    reason = json.loads((data / "quarantine" / f"{names[-1]}.reason.json").read_text())
    assert reason["stage"] == "worker" and reason["reason"]
    assert sorted(p.name for p in (data / "archive").glob("*.dcm")) == sorted(names[:-1])
    assert not list((data / "spool" / "incoming").iterdir())


def test_the_listener_sends_one_task_for_instances_that_arrive_together(
    redis_env, procs, tmp_path, need_dcmtk
):
    env = dict(redis_env, CBMIR_DISPATCH_WAIT_MS="2000", CBMIR_DISPATCH_BATCH="8")
    files = support.mr_series(tmp_path / "in", 12)
    _query, grpc_port, _scp, dicom_port, worker = support.start_parts(env, procs)

    support.storescu(dicom_port, files)  # one association, well inside the 2 s gathering time
    client = SearchClient(f"127.0.0.1:{grpc_port}")
    support.wait_until(lambda: client.stats().total == len(files), 90, "all instances indexed")

    def sizes() -> list[int]:  # a task logs after its points are searchable
        return sorted(int(n) for n in re.findall(r"indexed \d+ of (\d+) instance\(s\)", worker.output()))

    support.wait_until(lambda: sum(sizes()) == len(files), 30, "both tasks logged")
    assert sizes() == [4, 8]  # CBMIR_DISPATCH_BATCH caps a task; the rest goes in the next one
    for path in files:
        hit = client.search(sop_instance_uid=support.sop_uid(path), k=1, exclude_self=False).hits[0]
        assert hit.sop_instance_uid == support.sop_uid(path)
