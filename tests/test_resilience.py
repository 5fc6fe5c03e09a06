"""Faults a hospital network brings: nothing acknowledged is stranded (a killed worker, a broker that
lost its data, an index owner down for minutes), a full disk, oversized queries, idle or
unwanted associations, a second service on a live port, a SOP Instance UID sent again."""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pydicom
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from services.query.client import SearchClient
from tests import support

pytestmark = pytest.mark.integration


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the live children of ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(
                    (int(entry.name), (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
                )
        except (OSError, IndexError, ValueError):
            continue
    return found


def _serve(data_dir: Path, procs: list, **extra: str) -> tuple[support.Proc, int, SearchClient]:
    serve, dicom_port, grpc_port = support.start_serve(data_dir, support.base_env(data_dir, **extra))
    procs.append(serve)
    return serve, dicom_port, SearchClient(f"127.0.0.1:{grpc_port}")


# --- nothing acknowledged is stranded -----------------------------------------------------------


def test_worker_killed_under_serve_loses_nothing(data_dir, procs, tmp_path, need_dcmtk):
    """The embedded broker never redelivers a task its worker took; the listener's resend sweep
    brings back what a SIGKILLed worker held. Nobody restarts anything by hand."""
    serve, dicom_port, client = _serve(data_dir, procs, CBMIR_RESEND_AFTER_S="4")
    (query_pid,) = [pid for pid, cmd in _children(serve.process.pid) if "services query" in cmd]
    (worker_pid,) = [pid for pid, cmd in _children(serve.process.pid) if "services worker" in cmd]
    files = support.mr_series(tmp_path / "mr", 24)
    os.kill(query_pid, signal.SIGSTOP)  # the index owner stalls: the worker holds tasks in flight
    try:
        support.storescu(dicom_port, files)
        serve.wait_for(r"\[worker\] .*Task cbmir\.embed_instances?\[.*\] received", timeout_s=60)
        time.sleep(1.0)
        os.kill(worker_pid, signal.SIGKILL)
    finally:
        os.kill(query_pid, signal.SIGCONT)
    serve.wait_for(r"worker exited \(code -9\); restarting", timeout_s=30)
    support.wait_until(lambda: client.stats().total == len(files), 180, "every acknowledged instance indexed")
    # a batch archives its instances after their points are written: the spool empties just after
    support.wait_until(lambda: client.stats().pending == 0, 30, "every indexed instance archived")
    assert client.stats().quarantined == 0
    assert re.search(r"re-sent \d+ instance\(s\) not indexed after 4 s", serve.output())
    import sqlite3

    with sqlite3.connect(data_dir / "broker" / "broker.sqlite") as broker:  # taken messages are gone
        assert broker.execute("select count(*) from kombu_message").fetchone()[0] == 0


def test_a_broker_that_lost_its_data_loses_nothing(redis_env, procs, tmp_path, need_dcmtk):
    """Redis comes back empty: the spool, not the broker, is the record; the sweep re-sends."""
    import redis

    env = dict(redis_env, CBMIR_RESEND_AFTER_S="3")
    query, grpc_port = support.start_query(env)
    procs.append(query)
    scp, dicom_port = support.start_scp(env)
    procs.append(scp)
    files = support.mr_series(tmp_path / "mr", 8)
    support.storescu(dicom_port, files)
    client = SearchClient(f"127.0.0.1:{grpc_port}")
    queue = env["CBMIR_QUEUE"]
    broker = redis.Redis.from_url(support.REDIS_URL)
    support.wait_until(lambda: broker.llen(queue) >= len(files), 30, "tasks queued")
    broker.delete(queue)  # the broker's data is gone
    time.sleep(1.5)
    stats = client.stats()
    assert stats.pending == len(files) and stats.oldest_pending_age_s >= 1.0
    procs.append(support.start_worker(env))
    support.wait_until(lambda: client.stats().total == len(files), 120, "every acknowledged instance indexed")
    assert client.stats().quarantined == 0


def test_the_watcher_alone_resends_what_the_broker_lost(redis_env, procs, tmp_path):
    """A deployment that ingests only through the watcher sweeps the spool too."""
    import redis

    env = dict(redis_env, CBMIR_RESEND_AFTER_S="2")
    query, grpc_port = support.start_query(env)
    procs.append(query)
    watch = tmp_path / "in"
    watcher = support.Proc("watch", [str(support.CBMIR), "watch", str(watch)], env)
    procs.append(watcher)
    watcher.wait_for(r"cbmir watch: watching ")
    files = support.mr_series(tmp_path / "mr", 3)
    for path in files:
        (watch / path.name).write_bytes(path.read_bytes())
    broker, queue = redis.Redis.from_url(support.REDIS_URL), env["CBMIR_QUEUE"]
    support.wait_until(lambda: broker.llen(queue) >= len(files), 30, "tasks queued")
    broker.delete(queue)  # the broker's data is gone
    watcher.wait_for(r"re-sent 3 instance\(s\) not indexed after 2 s", timeout_s=30)
    procs.append(support.start_worker(env))
    client = SearchClient(f"127.0.0.1:{grpc_port}")
    support.wait_until(lambda: client.stats().total == len(files), 120, "every dropped file indexed")


def test_the_sweep_leaves_alone_what_a_worker_is_retrying(redis_env, data_dir):
    """An instance whose worker keeps retrying (its attempt marker is fresh) is not sent again
    beside it, so an outage does not pile up copies of every task; a stale one is sent again."""
    import redis

    from services.core.config import BrokerSettings, DataLayout
    from services.ingest.dispatch import PendingSweep, TaskDispatcher
    from services.ingest.spool import Spool

    spool = Spool(DataLayout(data_dir))
    broker = BrokerSettings(support.REDIS_URL, redis_env["CBMIR_QUEUE"], 300)
    dispatcher = TaskDispatcher(broker)
    sweep = PendingSweep(spool, dispatcher, resend_after_s=60)
    queue = redis.Redis.from_url(support.REDIS_URL)
    long_ago = time.time() - 3600
    for name in ("1.2.3.1.dcm", "1.2.3.2.dcm"):
        spool.store(name, b"not looked at")
        os.utime(spool.incoming_path(name), (long_ago, long_ago))
    spool.mark_attempt("1.2.3.1.dcm")  # a worker is on it
    try:
        assert sweep.sweep() == 1 and queue.llen(broker.queue) == 1  # only the one nobody works on
        os.utime(data_dir / "spool" / "attempts" / "1.2.3.1.dcm", (long_ago, long_ago))
        assert sweep.sweep() == 1  # its worker went quiet an hour ago: sent again
        spool.archive("1.2.3.1.dcm")
        assert not (data_dir / "spool" / "attempts" / "1.2.3.1.dcm").exists()
    finally:
        queue.delete(broker.queue)
        dispatcher.close()


@pytest.mark.slow
def test_index_owner_down_for_three_minutes_quarantines_nothing(redis_env, procs, tmp_path, need_dcmtk):
    env = dict(redis_env, CBMIR_RESEND_AFTER_S="600")
    query, grpc_port, _scp, dicom_port, worker = support.start_parts(env, procs)
    query.stop()  # the index owner is gone
    files = support.mr_series(tmp_path / "mr", 6)
    support.storescu(dicom_port, files)
    time.sleep(180)
    assert "quarantined" not in worker.output()
    query, grpc_port = support.start_query(dict(env, CBMIR_GRPC_PORT=str(grpc_port)))
    procs.append(query)
    client = SearchClient(f"127.0.0.1:{grpc_port}")
    support.wait_until(
        lambda: client.stats().total == len(files), 240, "every instance indexed after the outage"
    )
    stats = client.stats()
    assert (stats.quarantined, stats.pending) == (0, 0)
    assert "UNAVAILABLE" in worker.output()  # it did fail, and retried


# --- a full disk ------------------------------------------------------------------------------


@pytest.fixture
def small_volume(tmp_path):
    """A 64 MB tmpfs the test mounts itself (skipped where it cannot mount)."""
    mount = tmp_path / "volume"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True, check=False
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(volume: Path, leave_mb: float) -> Path:
    """A ballast file that leaves about ``leave_mb`` free on ``volume``."""
    import shutil

    ballast = volume / "ballast"
    free = shutil.disk_usage(volume).free - int(leave_mb * 2**20)
    with open(ballast, "ab") as handle:
        handle.write(b"\0" * max(0, free))
    return ballast


def test_full_disk_answers_a700_keeps_everything_alive_and_recovers(
    small_volume, procs, tmp_path, need_dcmtk
):
    data = small_volume / "data"
    serve, dicom_port, client = _serve(data, procs, CBMIR_MIN_FREE_MB="16")
    first = support.mr_series(tmp_path / "a", 3)
    support.storescu(dicom_port, first)
    support.wait_until(lambda: client.stats().total == 3, 120, "indexed before the disk fills")
    ballast = _fill(small_volume, 8)  # below the 16 MB watermark
    late = support.mr_series(tmp_path / "b", 2, seed=1)
    refused = support.storescu(dicom_port, late, check=False)
    assert "refused: outofresources" in (refused.stdout + refused.stderr).lower()
    assert "free space watermark" in serve.output()
    # the index owner refuses writes instead of dying on its memory-mapped files
    from services.core.errors import BackendUnavailable
    from services.index import IndexPoint, RemoteIndexWriter, point_id

    payload = {
        "modality": "mri",
        "sop_instance_uid": "1.2.3.7",
        "study_instance_uid": "1.2.9",
        "series_instance_uid": "1.2.8",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.4",
        "frame_number": 1,
    }
    from models.runtime import default_onnx_path, load_sidecars

    dim = int(load_sidecars(default_onnx_path())[0]["embedding_dim"])
    writer = RemoteIndexWriter(f"unix:{data / 'index-writer.sock'}", timeout_s=10)
    with pytest.raises(BackendUnavailable, match="refuses writes"):
        writer.upsert([IndexPoint(point_id("1.2.3.7"), [0.0] * dim, payload)], client.stats().model_version)
    assert client.stats().total == 3  # still answering
    ballast.unlink()  # space comes back: taken again, no restart
    support.storescu(dicom_port, late)
    support.wait_until(lambda: client.stats().total == 5, 120, "indexed after space came back")
    assert "restarting" not in serve.output()
    assert not list((data / "spool" / "tmp").iterdir())


@pytest.mark.parametrize("receiver", support.RECEIVERS)
def test_a_disk_that_fills_mid_stream_answers_a700_and_leaves_no_partial_file(
    small_volume, redis_env, procs, tmp_path, need_dcmtk, receiver
):
    data = small_volume / "data"
    env = dict(
        redis_env,
        **support.receiver_env(receiver),
        CBMIR_DATA_DIR=str(data),
        CBMIR_MIN_FREE_MB="0",  # no watermark: the write fails
    )
    scp, dicom_port = support.start_scp(env)
    procs.append(scp)
    big = support.mr_series(tmp_path / "big", 1, size=1536)  # 4.5 MB
    _fill(small_volume, 2)
    refused = support.storescu(dicom_port, big, check=False)
    assert "refused: outofresources" in (refused.stdout + refused.stderr).lower()
    assert not list((data / "spool" / "tmp").iterdir()) and not list((data / "spool" / "incoming").iterdir())
    (small_volume / "ballast").unlink()
    support.storescu(dicom_port, big)  # the same association logic, now with room
    assert len(list((data / "spool" / "incoming").iterdir())) == 1


# --- queries that would cost too much -----------------------------------------------------------


def _rss_peak_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


# The query process with CBMIR_QUERY_DECODES=2 and 16-megapixel queries: about 115 MB at rest, and
# per decode Pillow's colour picture, the grey copy, the float32 scaled copy and Pillow's float
# picture (~210 MB). Measured peaks: 520-650 MB.
MEMORY_CEILING_KB = 900 * 1024


def test_oversized_query_images_are_refused_and_memory_stays_bounded(data_dir, procs):
    proc, port = support.start_query(support.base_env(data_dir))
    procs.append(proc)

    def png(width: int, height: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, "PNG")
        return buffer.getvalue()

    bomb, largest = png(9999, 9999), png(4096, 4096)  # 100 M pixels in 300 KB; exactly the budget
    outcomes: list[str] = []

    def search(data: bytes) -> None:
        client = SearchClient(f"127.0.0.1:{port}", timeout_s=60)
        try:
            client.search(image=data, image_modality="xray", k=3)
            outcomes.append("OK")
        except grpc.RpcError as exc:
            outcomes.append(exc.code().name)

    for data, expected in ((bomb, "INVALID_ARGUMENT"), (largest, "OK")):
        outcomes.clear()
        threads = [threading.Thread(target=search, args=(data,)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert outcomes == [expected] * 8
    peak = _rss_peak_kb(proc.process.pid)
    print(f"query process peak RSS after 8 + 8 concurrent images: {peak / 1024:.0f} MB")
    assert peak < MEMORY_CEILING_KB
    assert SearchClient(f"127.0.0.1:{port}").stats().total == 0  # and it is still healthy


# --- associations and ports ---------------------------------------------------------------------


@pytest.mark.parametrize("receiver", support.RECEIVERS)
def test_idle_associations_are_aborted_and_rejections_logged(redis_env, procs, receiver):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    proc, port = support.start_scp(
        dict(
            redis_env,
            **support.receiver_env(receiver),
            CBMIR_ASSOC_IDLE_TIMEOUT_S="2",
            CBMIR_ALLOWED_AE_TITLES="PACS1",
        )
    )
    procs.append(proc)
    ae = AE(ae_title="PACS1")
    ae.add_requested_context(Verification)
    idle = ae.associate("127.0.0.1", port, ae_title="CBMIR")
    assert idle.is_established
    support.wait_until(lambda: not idle.is_established, 10, "the idle association aborted by the listener")
    proc.wait_for(r"association from .* \(AE PACS1\) aborted")
    # dcmtk's echoscu, not pynetdicom, is the intruder: pynetdicom 3.0's requestor reports an
    # A-ASSOCIATE-RJ followed at once by the close as "aborted" when its thread is descheduled
    # between sending the request and checking that the socket is still connected.
    intruder = subprocess.run(
        ["echoscu", "-v", "-aet", "INTRUDER", "-aec", "CBMIR", "127.0.0.1", str(port)],
        env=dict(os.environ, TCP_NODELAY="1"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert intruder.returncode != 0
    assert "Association Rejected" in intruder.stdout + intruder.stderr
    assert "Calling AE Title Not Recognized" in intruder.stdout + intruder.stderr
    proc.wait_for(r"rejected: calling AE title 'INTRUDER' is not in CBMIR_ALLOWED_AE_TITLES")


@pytest.mark.parametrize("receiver", support.RECEIVERS)
def test_connections_that_never_finish_a_pdu_cannot_hold_the_association_slots(redis_env, procs, receiver):
    """33 connections send the start of an A-ASSOCIATE-RQ and then a byte now and then (pynetdicom
    would wait for the rest forever): each is closed after the ACSE timeout, and a real sender
    gets its association."""
    import socket

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    proc, port = support.start_scp(
        dict(redis_env, **support.receiver_env(receiver), CBMIR_ASSOC_IDLE_TIMEOUT_S="3")
    )
    procs.append(proc)
    slow = []
    for _ in range(33):
        connection = socket.create_connection(("127.0.0.1", port), timeout=5)
        connection.sendall(b"\x01\x00\x00\x00\x10\x00")  # A-ASSOCIATE-RQ, 4096 bytes announced
        slow.append(connection)
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(1.0):
            for connection in slow:
                try:
                    connection.send(b"\x00")
                except OSError:
                    continue

    threading.Thread(target=trickle, daemon=True).start()
    try:
        ae = AE(ae_title="PACS1")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = 5

        def echo_works() -> bool:
            assoc = ae.associate("127.0.0.1", port, ae_title="CBMIR")
            if not assoc.is_established:
                return False
            status = assoc.send_c_echo()
            assoc.release()
            return status.Status == 0

        support.wait_until(echo_works, 30, "a C-ECHO once the stalled connections are closed", interval_s=1)
        proc.wait_for(r"DICOM connection from 127\.0\.0\.1 closed: no association request within 3 s")
    finally:
        stop.set()
        for connection in slow:
            connection.close()


def test_dicom_query_bombs_are_refused_before_they_cost_memory_or_time(data_dir, procs):
    """A deflated data set that inflates to 400 MB, a JPEG codestream far larger than its Rows and
    Columns, an EEG whose sampling rate would make the trace filter run for hours, and pictures in
    formats that are not PNG or JPEG (EPS would run Ghostscript; ICO decodes while opening)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit

    proc, port = support.start_query(support.base_env(data_dir))
    procs.append(proc)
    client = SearchClient(f"127.0.0.1:{port}", timeout_s=60)

    def code_of(**query) -> str:
        try:
            client.search(k=3, **query)
            return "OK"
        except grpc.RpcError as exc:
            return exc.code().name

    def encoded(ds: pydicom.Dataset) -> bytes:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    deflated = pydicom.dcmread(support.pydicom_file("MR_small.dcm"))
    deflated.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflated.add_new(0x00091010, "OB", bytes(400 * 2**20))
    bomb = encoded(deflated)
    del deflated
    big = io.BytesIO()
    Image.new("L", (12000, 12000), 90).save(big, "JPEG", quality=10)
    lying = pydicom.dcmread(support.pydicom_file("MR_small.dcm"))
    lying.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    lying.BitsAllocated, lying.BitsStored, lying.HighBit, lying.PixelRepresentation = 8, 8, 7, 0
    lying.PixelData = pydicom.encaps.encapsulate([big.getvalue()])
    lying["PixelData"].VR = "OB"
    eeg = support.eeg_dataset(samples=3_000_000, sampling_hz=2.6e8)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n{} loop\n"
    ico = io.BytesIO()
    Image.new("RGB", (64, 64)).save(ico, "ICO")
    started = time.monotonic()
    assert len(bomb) < 2 * 2**20 and code_of(dicom=bomb) == "INVALID_ARGUMENT"
    assert code_of(dicom=encoded(lying)) == "INVALID_ARGUMENT"
    assert code_of(dicom=encoded(eeg)) == "INVALID_ARGUMENT"
    assert code_of(image=eps, image_modality="xray") == "INVALID_ARGUMENT"
    assert code_of(image=ico.getvalue(), image_modality="xray") == "INVALID_ARGUMENT"
    assert time.monotonic() - started < 20
    peak = _rss_peak_kb(proc.process.pid)
    print(f"query process peak RSS after the bombs: {peak / 1024:.0f} MB")
    assert peak < 400 * 1024  # measured: 257 MB (115 MB at rest; a deflated query inflates to 64 MiB at most)
    assert not [cmd for _, cmd in _children(proc.process.pid) if "gs" in cmd.split()[:1]]
    assert client.stats().total == 0  # still healthy


def test_a_second_query_service_cannot_take_a_live_port(data_dir, procs, tmp_path):
    proc, port = support.start_query(support.base_env(data_dir))
    procs.append(proc)
    second = subprocess.run(
        [str(support.CBMIR), "query"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=support.base_env(tmp_path / "other", CBMIR_GRPC_PORT=str(port)),
    )
    assert second.returncode == 2 and "cannot bind gRPC port" in second.stderr
    assert SearchClient(f"127.0.0.1:{port}").stats().total == 0


def test_health_follows_the_index_backend(data_dir, procs):
    env = support.base_env(data_dir, QDRANT_URL=f"http://127.0.0.1:{support.free_port()}")
    proc, port = support.start_query(env)
    procs.append(proc)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        def not_serving() -> bool:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            except grpc.RpcError as exc:
                exited = proc.process.poll()
                raise AssertionError(
                    f"health check failed ({exc.code().name}); query exited {exited}; "
                    f"output:\n{proc.output()}"
                ) from exc
            return status == health_pb2.HealthCheckResponse.NOT_SERVING

        support.wait_until(not_serving, 20, "health NOT_SERVING while Qdrant is unreachable")


def test_health_says_not_serving_while_qdrant_hangs(data_dir, procs):
    """A Qdrant that takes connections and never answers (a hung server) holds the health loop's
    first look for the client's 10 s timeout: meanwhile a probe gets NOT_SERVING. Before, the server's
    own name said SERVING (grpc's health servicer starts with it) and the search service NOT_FOUND."""
    with socket.create_server(("127.0.0.1", 0), backlog=64) as hung:
        env = support.base_env(data_dir, QDRANT_URL=f"http://127.0.0.1:{hung.getsockname()[1]}")
        proc, port = support.start_query(env)
        procs.append(proc)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ("", "cbmir.v1.SimilarCases"):
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_an_instance_sent_again_keeps_its_earlier_copy(redis_env, procs, tmp_path, need_dcmtk):
    _query, grpc_port, _scp, dicom_port, worker = support.start_parts(redis_env, procs)
    (first,) = support.mr_series(tmp_path / "v1", 1, seed=1)
    again = tmp_path / "v2" / first.name
    again.parent.mkdir()
    ds = pydicom.dcmread(first)
    ds.PixelData = np.zeros((ds.Rows, ds.Columns), dtype=np.uint16).tobytes()  # same UID, other content
    ds.save_as(again, enforce_file_format=True)
    client = SearchClient(f"127.0.0.1:{grpc_port}")
    support.storescu(dicom_port, [first])
    archived = Path(redis_env["CBMIR_DATA_DIR"]) / "archive" / f"{support.sop_uid(first)}.dcm"
    support.wait_until(lambda: client.stats().total == 1 and archived.exists(), 60, "first copy archived")
    support.storescu(dicom_port, [again, again])  # sent again, twice: a race between two tasks
    support.wait_until(lambda: client.stats().pending == 0, 60, "second copy indexed")
    data = Path(redis_env["CBMIR_DATA_DIR"])
    name = f"{support.sop_uid(first)}.dcm"
    kept = list((data / "archive" / ".replaced").glob(f"{name}.*"))
    assert len(kept) == 1
    assert pydicom.dcmread(kept[0]).PixelData == pydicom.dcmread(first).PixelData
    assert pydicom.dcmread(data / "archive" / name).PixelData == ds.PixelData
    assert client.stats().total == 1 and "ERROR" not in worker.output()


def test_serve_leaves_no_orphan_when_a_later_child_fails_to_start(data_dir, procs):
    """The listener cannot bind (its port is taken): ``cbmir serve`` exits 1 and the query child it
    had already started is gone with it, port and index lock released."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        grpc_port = support.free_port()
        serve = support.Proc(
            "serve",
            [
                str(support.CBMIR), "serve", "--data-dir", str(data_dir),
                "--dicom-port", str(taken.getsockname()[1]), "--grpc-port", str(grpc_port),
            ],
            support.base_env(data_dir),
        )  # fmt: skip
        procs.append(serve)
        assert serve.process.wait(timeout=120) == 1, serve.output()
    serve.wait_for(r"\[query\] cbmir query: gRPC on")  # the query child had started
    serve.wait_for(r"cbmir serve: failed to start")
    group = serve.process.pid  # its own session: every child shares the group

    def group_empty() -> bool:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        return False

    support.wait_until(group_empty, 10, "no process of cbmir serve left")
    again = support.Proc(
        "query", [str(support.CBMIR), "query"], support.base_env(data_dir, CBMIR_GRPC_PORT=str(grpc_port))
    )
    procs.append(again)  # the same port and the same index are free again
    again.wait_for(rf"cbmir query: gRPC on [^:]+:{grpc_port}")
