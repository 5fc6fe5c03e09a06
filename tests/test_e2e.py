"""The clinical path end to end, with real parts only.

dcmtk's storescu pushes DICOM over a real association to the listener; a real Celery worker
consumes real messages (Redis, or the embedded SQLite broker under ``cbmir serve``); a real gRPC
client asks the query service, over a socket, for similar cases.
"""

from __future__ import annotations

import re
import signal

import grpc
import pytest

from models.runtime import EncoderSet
from services.core.vocabulary import MODALITIES, PB_TO_MODALITY
from services.query.client import SearchClient
from tests import support

pytestmark = pytest.mark.integration


def _assert_self_nearest_and_filters(client: SearchClient, files: dict) -> None:
    uids = {support.sop_uid(path): modality for path, modality in files.items()}
    for path in files:
        uid = support.sop_uid(path)
        by_uid = client.search(sop_instance_uid=uid, k=3, exclude_self=False)
        assert by_uid.hits[0].sop_instance_uid == uid
        assert by_uid.hits[0].distance == pytest.approx(0.0, abs=1e-4)
        by_bytes = client.search(
            dicom=path.read_bytes(), k=3, exclude_self=False
        )  # the same file sent as a query
        assert by_bytes.hits[0].sop_instance_uid == uid
        assert by_bytes.hits[0].distance == pytest.approx(0.0, abs=1e-3)
        assert [h.distance for h in by_uid.hits] == sorted(h.distance for h in by_uid.hits)
    # The modality filter keeps exactly the asked modality, across every indexed instance. With no
    # filter, a query is compared with the modalities its own encoder embeds (the shipped model
    # has one for X-ray and one for the rest); a filter naming another encoder's modality is refused.
    encoders = EncoderSet.load(device="cpu")  # the model the service runs: the shipped default
    assert encoders.routed and client.stats().model_version == encoders.version
    _assert_xray_vectors_come_from_the_xray_encoder(client, files, encoders)
    for wanted in ("xray", "mri", "other"):
        expected = {uid for uid, modality in uids.items() if modality == wanted}
        query_uid = sorted(expected)[0]
        hits = client.search(sop_instance_uid=query_uid, k=50, modalities=[wanted], exclude_self=False).hits
        assert {h.sop_instance_uid for h in hits} == expected
        comparable = set(encoders.comparable(wanted, MODALITIES))
        unfiltered = client.search(sop_instance_uid=query_uid, k=50, exclude_self=False)
        assert {h.sop_instance_uid for h in unfiltered.hits} == {
            u for u, m in uids.items() if m in comparable
        }
        assert {PB_TO_MODALITY[m] for m in unfiltered.searched_modalities} == comparable
        foreign = sorted({"xray", "mri", "other"} - comparable)
        with pytest.raises(grpc.RpcError) as refused:
            client.search(sop_instance_uid=query_uid, k=5, modalities=foreign)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not comparable" in (refused.value.details() or "")
    stats = client.stats()
    assert stats.total == len(files)
    assert stats.quarantined == 0


def _assert_xray_vectors_come_from_the_xray_encoder(client: SearchClient, files: dict, encoders) -> None:
    """The distance between the two X-rays is the one their own encoder gives, not the other's: the
    worker and the service both routed X-ray to it (the same wrong route on both sides would pass
    the self-distance checks)."""
    import numpy as np

    from services.dicom.decode import decode_for_embedding
    from services.index.points import model_inputs

    xrays = sorted(path for path, modality in files.items() if modality == "xray")
    assert len(xrays) == 2

    def distance(encoder) -> float:
        vectors = [
            encoder.embed(model_inputs(decode_for_embedding(path, frames="middle")[1], encoder.contract))[0]
            for path in xrays
        ]
        return float(np.linalg.norm(vectors[0].astype(np.float64) - vectors[1]))

    own, other = distance(encoders.for_modality("xray")), distance(encoders.for_modality("mri"))
    assert abs(own - other) > 1e-2  # the check tells the two encoders apart
    hits = client.search(sop_instance_uid=support.sop_uid(xrays[0]), k=5, exclude_self=True).hits
    assert [h.sop_instance_uid for h in hits] == [support.sop_uid(xrays[1])]
    assert hits[0].distance == pytest.approx(own, abs=1e-3)


def test_storescu_to_redis_worker_to_grpc(redis_env, procs, need_dcmtk):
    files = support.e2e_files()
    _query, grpc_port, _scp, dicom_port, _worker = support.start_parts(redis_env, procs)

    support.storescu(dicom_port, list(files))
    client = SearchClient(f"127.0.0.1:{grpc_port}")
    support.wait_until(lambda: client.stats().total == len(files), 120, "all instances indexed")
    _assert_self_nearest_and_filters(client, files)
    # Everything indexed moved from the spool's incoming folder to the archive (a batch is archived
    # just after its points are written).
    support.wait_until(lambda: client.stats().pending == 0, 30, "every indexed instance archived")
    assert not list(
        (redis_env_data := support.Path(redis_env["CBMIR_DATA_DIR"])).joinpath("spool", "incoming").iterdir()
    )
    assert len(list(redis_env_data.joinpath("archive").iterdir())) == len(files)
    # A resent instance replaces its earlier copy: still one point.
    support.storescu(dicom_port, [next(iter(files))])
    support.wait_until(lambda: client.stats().pending == 0, 60, "resend processed")
    assert client.stats().total == len(files)


def test_same_path_under_cbmir_serve_without_redis(data_dir, procs, need_dcmtk):
    files = support.e2e_files()
    env = support.base_env(data_dir)
    serve, dicom_port, grpc_port = support.start_serve(data_dir, env)
    procs.append(serve)
    support.storescu(dicom_port, list(files))
    client = SearchClient(f"127.0.0.1:{grpc_port}")
    support.wait_until(lambda: client.stats().total == len(files), 180, "all instances indexed")
    _assert_self_nearest_and_filters(client, files)
    assert "sqla+sqlite" in serve.output()  # the embedded broker, no Redis
    serve.stop()
    assert serve.process.returncode == 0


def test_worker_killed_mid_task_loses_nothing(redis_env, procs, need_dcmtk):
    """SIGKILL the worker while its task is inside the upsert; a new worker finishes the job.

    The index owner is paused (SIGSTOP) so the worker is provably in the middle of the task when
    it dies; acks_late + the broker's visibility timeout bring the message back.
    """
    env = dict(redis_env, CBMIR_VISIBILITY_TIMEOUT_S="5", CBMIR_RETRY_BACKOFF_S="0.5")
    path = support.pydicom_file("MR_small.dcm")
    uid = support.sop_uid(path)
    query, grpc_port, _scp, dicom_port, worker = support.start_parts(env, procs)

    query.signal(signal.SIGSTOP)
    support.storescu(dicom_port, [path])  # acknowledged: from here on it must not be lost
    worker.wait_for(r"Task cbmir\.embed_instances?\[.*\] received", timeout_s=60)
    spooled = support.Path(env["CBMIR_DATA_DIR"]) / "spool" / "incoming" / f"{uid}.dcm"
    support.wait_until(lambda: "indexed" not in worker.output() and spooled.exists(), 5, "task in flight")
    worker.signal(signal.SIGKILL)
    worker.process.wait(timeout=10)
    assert not re.search(r"indexed .*\.dcm", worker.output())
    query.signal(signal.SIGCONT)

    replacement = support.start_worker(env, grpc_port)
    procs.append(replacement)
    client = SearchClient(f"127.0.0.1:{grpc_port}")
    support.wait_until(lambda: client.stats().total == 1, 90, "redelivered task indexed")
    hit = client.search(sop_instance_uid=uid, k=1, exclude_self=False).hits[0]
    assert hit.sop_instance_uid == uid and hit.distance == pytest.approx(0.0, abs=1e-4)
    support.wait_until(lambda: not spooled.exists(), 30, "archived (the point is visible just before)")
