"""Fast checks of the adapters: settings, spool, batcher, index stores against numpy."""

from __future__ import annotations

import errno
import json
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest

from services.core.config import ListenerSettings, WorkerSettings
from services.core.errors import BackendUnavailable, ConfigError, InvalidInput, NotFound, StorageError
from services.index import EdgeIndex, HitFilter, IndexPoint, QdrantServerIndex, point_id
from services.ingest.spool import Spool, spool_name_for
from workers.batching import MicroBatcher


def test_settings_defaults_and_errors(tmp_path):
    s = ListenerSettings.from_env({"CBMIR_DATA_DIR": str(tmp_path)})
    assert (s.ae_title, s.port, s.allowed_ae_titles) == ("CBMIR", 11112, frozenset())
    assert s.broker.url.startswith("sqla+sqlite:///") and s.broker.embedded
    assert ListenerSettings.from_env({"CBMIR_ALLOWED_AE_TITLES": " A, B ,,"}).allowed_ae_titles == {"A", "B"}
    with pytest.raises(ConfigError, match="CBMIR_DICOM_PORT must be an integer"):
        ListenerSettings.from_env({"CBMIR_DICOM_PORT": "eleven"})
    with pytest.raises(ConfigError, match=r"1\.\.16"):
        ListenerSettings.from_env({"CBMIR_AE_TITLE": "A" * 17})
    w = WorkerSettings.from_env({"CBMIR_BROKER_URL": "redis://h:6379/0", "CBMIR_VISIBILITY_TIMEOUT_S": "30"})
    assert w.broker.transport_options()["visibility_timeout"] == 30
    assert w.index.embedded and w.decode.frames == "middle"
    with pytest.raises(ConfigError, match="CBMIR_FRAMES"):
        WorkerSettings.from_env({"CBMIR_FRAMES": "some"})


def test_spool_names_are_safe():
    assert spool_name_for("1.2.840.113619.2.1") == "1.2.840.113619.2.1.dcm"
    for hostile in ("../../etc/passwd", "", "1.2.3/../../x", "1." * 40):
        name = spool_name_for(hostile)
        assert "/" not in name and name.startswith("x") and name.endswith(".dcm")


def test_spool_lifecycle_never_loses_a_copy(tmp_path):
    from services.core.config import DataLayout

    spool = Spool(DataLayout(tmp_path))
    path = spool.store("1.2.3.dcm", b"first")
    assert (
        spool.store("1.2.3.dcm", b"second") == path and path.read_bytes() == b"second"
    )  # idempotent replace
    assert spool.pending() == [path]
    archived = spool.archive("1.2.3.dcm")
    assert archived.read_bytes() == b"second" and not path.exists()
    spool.store("1.2.4.dcm", b"bad")
    kept = spool.quarantine(
        spool.incoming_path("1.2.4.dcm"), reason="undecodable", detail="why", stage="worker"
    )
    assert kept.read_bytes() == b"bad"
    assert json.loads(kept.with_name(kept.name + ".reason.json").read_text())["reason"] == "undecodable"
    assert spool.quarantine_counts() == {"undecodable": 1}
    outside = tmp_path / "dropped.png"
    outside.write_bytes(b"x")
    spool.quarantine(outside, reason="not-dicom", detail="", stage="watcher")
    assert outside.exists()  # someone else's file is copied, never moved away from them
    assert spool.requeue_quarantined("1.2.4.dcm").read_bytes() == b"bad"
    with pytest.raises(StorageError):
        spool.archive("../escape.dcm")
    assert not list(spool.layout.spool_tmp.iterdir())


def test_batcher_groups_concurrent_callers_and_returns_their_rows():
    calls = []

    def double(batch):
        calls.append(len(batch))
        time.sleep(0.02)
        return batch * 2

    batcher = MicroBatcher(double, max_batch=8, max_wait_s=0.05)
    results = {}

    def submit(i):
        results[i] = batcher.submit(np.full((1, 3), i, dtype=np.float32))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    assert all(np.array_equal(results[i], np.full((1, 3), 2 * i)) for i in range(8))
    assert sum(calls) == 8 and max(calls) > 1 and max(calls) <= 8


def test_batcher_hands_errors_to_every_caller():
    batcher = MicroBatcher(lambda batch: (_ for _ in ()).throw(ValueError("boom")), 4, 0.0)
    with pytest.raises(ValueError, match="boom"):
        batcher.submit(np.zeros((1, 2)))
    batcher.close()


@pytest.mark.parametrize("store", ["edge", "qdrant-local"])
def test_index_matches_numpy_brute_force(tmp_path, store):
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((300, 8)).astype(np.float32)
    modalities = np.array(["xray", "mri", "oct", "eeg"])[rng.integers(0, 4, 300)]
    index = EdgeIndex(tmp_path, "t") if store == "edge" else QdrantServerIndex("t", path=tmp_path)
    with pytest.raises(NotFound):
        index.find_sop("1.2.3")
    index.ensure_collection(8, "v1")
    index.upsert(
        [
            IndexPoint(
                point_id(f"1.2.{i}"),
                vectors[i],
                {
                    "modality": str(modalities[i]),
                    "sop_instance_uid": f"1.2.{i}",
                    "study_instance_uid": f"9.{i % 7}",
                },
            )
            for i in range(300)
        ]
    )
    for q in range(0, 300, 37):
        distances = np.linalg.norm(vectors - vectors[q], axis=1)
        hits = index.search(vectors[q], 10)
        assert [h.payload["sop_instance_uid"] for h in hits] == [
            f"1.2.{i}" for i in np.argsort(distances)[:10]
        ]
        assert np.allclose([h.distance for h in hits], np.sort(distances)[:10], atol=1e-4)
        mask = (modalities == "mri") & (np.arange(300) % 7 != q % 7)
        filtered = index.search(vectors[q], 5, HitFilter(["mri"], exclude_study=f"9.{q % 7}"))
        expected = np.where(mask)[0][np.argsort(distances[mask])[:5]]
        assert [h.payload["sop_instance_uid"] for h in filtered] == [f"1.2.{i}" for i in expected]
    assert sum(index.counts_by_modality().values()) == 300
    with pytest.raises(ConfigError, match="reindex"):
        index.ensure_collection(16, "v2")
    vector, payload = index.find_sop("1.2.5")
    assert np.allclose(vector, vectors[5]) and payload["modality"] == modalities[5]
    index.close()


def test_edge_index_has_one_owner(tmp_path):
    from services.core.errors import BackendUnavailable

    first = EdgeIndex(tmp_path, "t")
    first.ensure_collection(4, "v1")
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        message = pool.apply(_open_in_other_process, (str(tmp_path),))
    first.close()
    assert "another process" in message
    del BackendUnavailable


def _open_in_other_process(path: str) -> str:
    from pathlib import Path

    from services.core.errors import BackendUnavailable

    try:
        EdgeIndex(Path(path), "t").ensure_collection(4, "v1")
    except BackendUnavailable as exc:
        return str(exc)
    return "opened"


def test_edge_index_moves_a_point_whose_modality_changed(tmp_path):
    index = EdgeIndex(tmp_path, "t")
    index.ensure_collection(3, "v1")
    payload = {"sop_instance_uid": "1.2.9", "study_instance_uid": "9.1"}
    index.upsert([IndexPoint(point_id("1.2.9"), [0.0, 0.0, 1.0], dict(payload, modality="other"))])
    index.upsert([IndexPoint(point_id("1.2.9"), [0.0, 0.0, 1.0], dict(payload, modality="xray"))])
    assert index.counts_by_modality() == {"xray": 1}
    assert [h.payload["modality"] for h in index.search([0, 0, 1], 5)] == ["xray"]
    assert index.search([0, 0, 1], 5, HitFilter(["other"])) == []
    index.close()


class _FixedStatus(BaseHTTPRequestHandler):
    """Answers every request with the class's status and a body whose text must not matter."""

    status = 500
    text = "Not found: collection doesn't exist"  # what a classifier by message text would believe

    def _answer(self) -> None:
        body = json.dumps({"status": {"error": self.text}, "time": 0.0}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (404, NotFound),
        (400, InvalidInput),
        (422, InvalidInput),
        (401, ConfigError),
        (403, ConfigError),
        (409, ConfigError),
        (418, ConfigError),
        (429, BackendUnavailable),
        (500, BackendUnavailable),
        (503, BackendUnavailable),
    ],
)
def test_qdrant_server_errors_are_classified_by_status_not_text(status, error):
    """A real qdrant-client talking HTTP to a server that answers ``status`` with a misleading text."""
    from http.server import ThreadingHTTPServer

    handler = type("Handler", (_FixedStatus,), {"status": status})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        index = QdrantServerIndex("t", url=f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(error) as raised:
            index.search([0.0, 1.0], 5)
        assert type(raised.value) is error
        assert str(status) in str(raised.value)
        index.close()
    finally:
        server.shutdown()
        server.server_close()


def test_qdrant_server_that_does_not_answer_is_unavailable():
    from services.core.errors import BackendUnavailable
    from tests.support import free_port

    index = QdrantServerIndex("t", url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(BackendUnavailable):
        index.search([0.0, 1.0], 5)
    index.close()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a device that is always full)")
def test_spool_file_drops_a_dataset_whose_write_fails_part_way(tmp_path):
    """A full disk mid-stream: the partial file goes, later fragments are dropped, nothing raises
    into pynetdicom's reader, and the handler then finds no file (and answers 0xA700)."""
    from services.dicom.pynetdicom_ext import SpoolFile

    partial = tmp_path / "assoc-1.part"
    partial.write_bytes(b"\0" * 132)
    spool_file = SpoolFile(partial, open("/dev/full", "wb", buffering=0))  # noqa: SIM115 - closed by SpoolFile
    spool_file.write(b"fragment one")
    assert spool_file.error is not None and spool_file.error.errno == errno.ENOSPC
    assert not partial.exists()
    assert spool_file.write(b"fragment two") == len(b"fragment two")
    spool_file.last_fragment = True
    spool_file.file.flush()
    spool_file.close()
    assert not partial.exists()


def test_spool_file_completes_on_the_last_fragment(tmp_path):
    from services.dicom.pynetdicom_ext import SpoolFile

    path = tmp_path / "assoc-2.part"
    spool_file = SpoolFile(path, open(path, "wb"))  # noqa: SIM115 - closed by SpoolFile
    spool_file.write(b"abc")
    spool_file.file.flush()
    assert path.read_bytes() == b""  # buffered until the last fragment
    spool_file.write(b"def")
    spool_file.last_fragment = True
    spool_file.file.flush()  # what pynetdicom calls after each fragment
    assert path.read_bytes() == b"abcdef" and spool_file.error is None
    spool_file.close()  # pynetdicom closes again after the handler: harmless
    assert path.read_bytes() == b"abcdef"


@pytest.mark.parametrize("post_filter_max", [0, 2000])
def test_exclusions_give_the_same_hits_filtered_by_the_engine_or_dropped_after(
    tmp_path, monkeypatch, post_filter_max
):
    """The query engine drops small exclusions (an instance, a study, a patient) from a larger
    candidate list instead of having the engine filter them: the hits must be the same, exact ones."""
    from models.runtime import OnnxEncoder
    from services.core.config import DataLayout
    from services.dicom.decode import DecodeLimits
    from services.ingest.spool import Spool
    from services.query import service

    monkeypatch.setattr(service, "POST_FILTER_MAX", post_filter_max)
    encoder = OnnxEncoder(device="cpu")
    rng = np.random.default_rng(4)
    vectors = rng.standard_normal((400, encoder.dim)).astype(np.float32)
    index = EdgeIndex(tmp_path / "index", "c")
    try:
        index.ensure_collection(encoder.dim, encoder.version)
        index.upsert(
            [
                IndexPoint(
                    point_id(f"1.2.{i}"),
                    vectors[i].tolist(),
                    {
                        "modality": "mri",
                        "sop_instance_uid": f"1.2.{i}",
                        "study_instance_uid": f"9.{i // 4}",
                        "patient_key": f"{i // 12:032x}",
                    },
                )
                for i in range(400)
            ]
        )
        engine = service.QueryEngine(index, encoder, Spool(DataLayout(tmp_path / "data")), DecodeLimits())
        for q in range(0, 400, 53):
            distances = np.linalg.norm(vectors - vectors[q], axis=1)
            keep = (np.arange(400) != q) & (np.arange(400) // 4 != 7) & (np.arange(400) // 12 != q // 12)
            where = HitFilter(
                exclude_sops=[f"1.2.{q}"], exclude_study="9.7", exclude_patient=f"{q // 12:032x}"
            )
            hits = engine._nearest(vectors[q], 10, where)
            expected = np.where(keep)[0][np.argsort(distances[keep])[:10]]
            assert [h.payload["sop_instance_uid"] for h in hits] == [f"1.2.{i}" for i in expected]
    finally:
        index.close()


def test_group_writer_writes_concurrent_lists_together_and_hands_errors_to_each():
    import threading
    import time

    from workers.batching import GroupWriter

    writes: list[list[int]] = []
    gate = threading.Event()

    def write(items: list[int]) -> None:
        gate.wait(5)
        if -1 in items:
            raise RuntimeError("index down")
        writes.append(items)

    writer: GroupWriter[int] = GroupWriter(write, max_items=100)
    threads = [threading.Thread(target=writer.submit, args=([n, n + 10],)) for n in range(4)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)  # the first write is held at the gate; the other three queue behind it
    gate.set()
    for thread in threads:
        thread.join(5)
    assert writes[0] == [0, 10] and sorted(writes[1]) == [1, 2, 3, 11, 12, 13]
    with pytest.raises(RuntimeError, match="index down"):
        writer.submit([-1])
    writer.submit([7])  # a failed write does not stop the writer
    assert writes[-1] == [7]
    writer.close()


def test_background_dispatch_gathers_names_into_tasks_of_at_most_a_batch():
    from services.ingest.dispatch import BackgroundDispatch

    class Recorder:
        batch_size = 3

        def __init__(self) -> None:
            self.sent: list[list[str]] = []

        def embed_many(self, names: list[str]) -> int:
            self.sent.append(list(names))
            return len(names)

    recorder = Recorder()
    dispatch = BackgroundDispatch(recorder, wait_s=0.5)  # type: ignore[arg-type]
    for n in range(5):
        dispatch(f"{n}.dcm")
    dispatch.close()
    assert recorder.sent == [["0.dcm", "1.dcm", "2.dcm"], ["3.dcm", "4.dcm"]]


def test_group_writer_fails_only_the_writer_whose_items_fail():
    import threading
    import time

    from workers.batching import GroupWriter

    gate, writes, results = threading.Event(), [], {}

    def write(items: list[int]) -> None:
        gate.wait(5)
        if -1 in items:
            raise ValueError("the index refused a point")
        writes.append(sorted(items))

    writer: GroupWriter[int] = GroupWriter(write, max_items=100)

    def run(key: str, items: list[int]) -> None:
        try:
            writer.submit(items)
            results[key] = "written"
        except ValueError:
            results[key] = "refused"

    threads = [threading.Thread(target=run, args=("first", [0]))]
    threads[0].start()
    time.sleep(0.05)  # held at the gate; the next two queue behind it and form one group
    threads += [threading.Thread(target=run, args=args) for args in (("bad", [-1]), ("good", [5]))]
    for thread in threads[1:]:
        thread.start()
    time.sleep(0.05)
    gate.set()
    for thread in threads:
        thread.join(5)
    assert results == {"first": "written", "bad": "refused", "good": "written"}
    assert writes == [[0], [5]]  # the failed group [-1, 5] was written again writer by writer
    writer.close()


def test_the_encoder_session_sleeps_between_runs() -> None:
    """ONNX Runtime's threads would spin on a core between runs, taking it from the listener."""
    from models.runtime import OnnxEncoder

    options = OnnxEncoder(device="cpu").session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
