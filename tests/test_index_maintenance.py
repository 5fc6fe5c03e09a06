"""The index operations behind the admin commands and the quantisation setting, on both backends:
qdrant-edge (the embedded store) and qdrant-client (the code that talks to a Qdrant server, here in
its local mode)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.core.config import IndexSettings, QuerySettings
from services.core.errors import ConfigError
from services.index import EdgeIndex, HitFilter, IndexPoint, QdrantServerIndex, VectorIndex, point_id


def _points(n: int, dim: int = 8, seed: int = 0) -> list[IndexPoint]:
    rng = np.random.default_rng(seed)
    return [
        IndexPoint(
            point_id(f"1.2.3.{i}"),
            rng.standard_normal(dim).astype(np.float32).tolist(),
            {
                "modality": ("xray", "mri")[i % 2],
                "sop_instance_uid": f"1.2.3.{i}",
                "study_instance_uid": f"1.2.9.{i % 3}",
                "series_instance_uid": f"1.2.8.{i % 6}",
            },
        )
        for i in range(n)
    ]


@pytest.fixture(params=["edge", "qdrant-client"])
def index(request: pytest.FixtureRequest, tmp_path: Path) -> VectorIndex:
    alias = f"t{request.node.name[-12:].replace('[', '').replace(']', '').replace('-', '')}"
    if request.param == "edge":
        store: VectorIndex = EdgeIndex(tmp_path / "index", alias)
    else:
        store = QdrantServerIndex(alias, path=tmp_path / "local")
    yield store
    store.close()


def test_scroll_select_and_delete_in_every_collection(index: VectorIndex) -> None:
    current = index.ensure_collection(8, "v1")
    points = _points(300)
    index.upsert(points)
    index.create_collection(current + "--next", 8)
    index.upsert(points[:30], collection=current + "--next")
    assert index.collections() == sorted([current, current + "--next"])
    assert sum(1 for _ in index.scroll()) == 300
    study = [pid for pid, payload in index.scroll(field="study_instance_uid", value="1.2.9.1")]
    assert len(study) == 100
    assert {
        p["study_instance_uid"] for _, p in index.scroll(field="study_instance_uid", value="1.2.9.1")
    } == {"1.2.9.1"}
    for collection in index.collections():
        ids = [pid for pid, _ in index.scroll(collection, field="study_instance_uid", value="1.2.9.1")]
        index.delete_points(ids, collection)
    assert sum(1 for _ in index.scroll()) == 200
    assert sum(1 for _ in index.scroll(current + "--next")) == 20
    index.delete_points([point_id("1.2.3.999999")])  # unknown IDs are ignored
    assert sum(index.counts_by_modality().values()) == 200


def test_int8_quantisation_is_built_and_searches_rescore(tmp_path: Path) -> None:
    index = EdgeIndex(tmp_path / "index", "q", quantization="int8", indexing_threshold_kb=16)
    index.ensure_collection(8, "v1")
    points = _points(4000)
    for lo in range(0, 4000, 1000):
        index.upsert(points[lo : lo + 1000])
    assert index.optimize()
    assert list((tmp_path / "index").rglob("quantized.data")), "optimize() built no int8 codes"
    for probe in (5, 1234, 3999):
        (hit, *_) = index.search(points[probe].vector, 5, HitFilter([points[probe].payload["modality"]]))
        assert hit.payload["sop_instance_uid"] == f"1.2.3.{probe}" and hit.distance == pytest.approx(
            0, abs=1e-5
        )
    index.close()
    plain = EdgeIndex(tmp_path / "plain", "p", indexing_threshold_kb=16)
    plain.ensure_collection(8, "v1")
    plain.upsert(points[:2000])
    plain.optimize()
    assert not list((tmp_path / "plain").rglob("quantized.data"))
    plain.close()


def test_quantisation_setting_is_checked(tmp_path: Path) -> None:
    env = {"CBMIR_DATA_DIR": str(tmp_path), "CBMIR_QUANTIZATION": "int8"}
    assert QuerySettings.from_env(env).index.quantization == "int8"
    assert IndexSettings.from_env({}, QuerySettings.from_env(env).layout).quantization == "none"
    with pytest.raises(ConfigError, match="CBMIR_QUANTIZATION"):
        QuerySettings.from_env(dict(env, CBMIR_QUANTIZATION="int4"))


def test_live_writes_reach_a_reindex_target_of_their_model_until_the_switch(index: VectorIndex) -> None:
    current = index.ensure_collection(8, "v1")
    alias = current.split("--")[0]
    same_model, other_model = f"{alias}--v1--20261130T000000", f"{alias}--v2--20261130T000000"
    index.create_collection(same_model, 8)
    index.create_collection(other_model, 8)
    points = [IndexPoint(p.point_id, p.vector, {**p.payload, "model_version": "v1"}) for p in _points(20)]

    index.set_reindex_target(same_model)
    assert index.reindex_target() == same_model
    index.upsert(points[:10])  # a live write: both collections
    assert sum(1 for _ in index.scroll(current)) == sum(1 for _ in index.scroll(same_model)) == 10
    index.set_reindex_target(other_model)
    index.upsert(points[10:])  # vectors of v1 never go into a v2 collection
    assert sum(1 for _ in index.scroll(current)) == 20 and sum(1 for _ in index.scroll(other_model)) == 0

    index.set_reindex_target(same_model)
    index.switch_alias(same_model)  # one atomic step: the alias moves, the reindex is over
    assert index.current_collection() == same_model and index.reindex_target() in (None, same_model)
    with pytest.raises(ConfigError):
        index.drop_collection(same_model)  # in use
    with pytest.raises(ConfigError):
        index.drop_collection("someone-else--v1")  # not ours
    index.drop_collection(current)
    assert current not in index.collections()


def test_replaced_collections_are_dropped_after_their_grace(tmp_path: Path) -> None:
    from services.core.config import DataLayout
    from services.dicom.decode import DecodeLimits
    from services.ingest.spool import Spool
    from services.query.reindex import ReindexJob

    index = EdgeIndex(tmp_path / "index", "g")
    old = index.ensure_collection(8, "v1")
    index.create_collection(f"{old}--20260101T000000", 8)
    index.switch_alias(f"{old}--20260101T000000")

    class Encoder:
        version, dim = "v1", 8

    job = ReindexJob(
        index,
        Spool(DataLayout(tmp_path / "data")),
        Encoder(),
        alias="g",
        limits=DecodeLimits(),
        grace_s=3600,  # type: ignore[arg-type]
    )
    job.state.retired = [{"collection": old, "retired_at": 1000.0}]
    assert job.drop_old(now=1000.0 + 3599) == []
    assert job.drop_old(now=1000.0 + 3600) == [old]
    assert index.collections() == [f"{old}--20260101T000000"]
    index.close()


def test_a_writer_of_another_model_never_writes_into_the_index(index: VectorIndex) -> None:
    current = index.ensure_collection(8, "v1")
    alias = current.split("--")[0]
    v2 = [IndexPoint(p.point_id, p.vector, {**p.payload, "model_version": "v2"}) for p in _points(3)]
    with pytest.raises(ConfigError, match="another model"):
        index.upsert(v2)
    index.create_collection(f"{alias}--v2--20261130T000000", 8)
    index.switch_alias(f"{alias}--v2--20261130T000000")  # a reindex to a new model, done
    index.upsert(v2)
    v1 = [IndexPoint(p.point_id, p.vector, {**p.payload, "model_version": "v1"}) for p in _points(3)]
    with pytest.raises(ConfigError, match="another model"):
        index.upsert(v1)  # a worker still on the old model: refused (it retries) until it is updated
    assert sum(1 for _ in index.scroll()) == 3


def test_new_server_collections_get_the_configured_shards_replicas_and_quantisation() -> None:
    """A real qdrant-client against an HTTP server that records what it is asked to create."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    created: list[dict] = []

    class Recorder(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"null")
            if self.command == "PUT" and self.path.split("?")[0].count("/") == 2:
                created.append(body)
            result: object = True
            if self.path.split("?")[0].endswith("/exists"):
                result = {"exists": False}
            elif "/index" in self.path:
                result = {"operation_id": 1, "status": "completed"}
            data = json.dumps({"result": result, "status": "ok", "time": 0.0}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        index = QdrantServerIndex("t", url=url, quantization="int8", shards=6, replicas=2)
        index.create_collection("t--v1--20261130T000000", 48)
        index.close()
    finally:
        server.shutdown()
        server.server_close()
    (body,) = created
    assert (body["shard_number"], body["replication_factor"]) == (6, 2)
    assert body["vectors"] == {"size": 48, "distance": "Euclid"}
    assert body["quantization_config"]["scalar"]["type"] == "int8"


def test_erasure_markers_hold_for_an_hour_and_the_sweep_clears_them(tmp_path: Path) -> None:
    import os
    import time

    from services.core.config import BrokerSettings, DataLayout
    from services.ingest.dispatch import PendingSweep, TaskDispatcher
    from services.ingest.spool import Spool

    layout = DataLayout(tmp_path / "data")
    spool = Spool(layout)
    spool.mark_erased("1.2.3.dcm")
    spool.mark_erased("1.2.4.dcm")
    expired = time.time() - spool.ERASED_HOLD_S - 5
    os.utime(layout.erased / "1.2.3.dcm", (expired, expired))
    assert not spool.erased_recently("1.2.3.dcm") and spool.erased_recently("1.2.4.dcm")
    dispatcher = TaskDispatcher(BrokerSettings.from_env({}, layout))
    try:
        PendingSweep(spool, dispatcher, resend_after_s=600).sweep()
    finally:
        dispatcher.close()
    assert sorted(p.name for p in layout.erased.iterdir()) == ["1.2.4.dcm"]
