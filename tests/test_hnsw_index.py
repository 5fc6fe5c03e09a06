"""The embedded index builds its HNSW graphs by itself, out of process, without losing writes.

The index the query service opens (``open_index``) must end up with its points in HNSW graphs once a
modality holds ``CBMIR_HNSW_MIN_POINTS`` points outside one, with nobody calling ``optimize()``; and
what it answers from the graphs must equal exact search on a small set.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from services.core.config import QuerySettings
from services.core.errors import ConfigError
from services.index import EdgeIndex, HitFilter, IndexPoint, open_index, point_id
from services.index.edge import _recover_swaps
from services.query.service import QueryEngine

pytestmark = pytest.mark.integration  # a child process builds the graphs

DIM = 16
MODALITIES = ("xray", "mri")


def _clustered(n: int, seed: int) -> np.ndarray:
    """Points around 40 centres, like embeddings (random vectors would need a larger ef)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, DIM)).astype(np.float32) * 4
    return centres[rng.integers(0, 40, n)] + rng.standard_normal((n, DIM)).astype(np.float32)


def _points(vectors: np.ndarray, start: int = 0) -> list[IndexPoint]:
    return [
        IndexPoint(
            point_id(f"1.2.3.{start + i}"),
            v.tolist(),
            {"modality": MODALITIES[(start + i) % 2], "sop_instance_uid": f"1.2.3.{start + i}"},
        )
        for i, v in enumerate(vectors)
    ]


def _open(tmp_path: Path, **env: str) -> EdgeIndex:
    settings = QuerySettings.from_env(
        {
            "CBMIR_DATA_DIR": str(tmp_path),
            "CBMIR_COLLECTION": f"hnsw{tmp_path.name[-8:].replace('-', '')}",
            "CBMIR_HNSW_MIN_POINTS": "1500",
            "CBMIR_HNSW_DEBOUNCE_S": "0.5",
            "CBMIR_HNSW_EF": "128",
            **env,
        }
    )
    index = open_index(settings.index)
    assert isinstance(index, EdgeIndex)
    return index


def _wait_for_graphs(index: EdgeIndex, points: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while index.segment_counts()[1] < points:
        assert time.monotonic() < deadline, f"no HNSW graphs after {timeout_s:.0f}s: {index.segment_counts()}"
        time.sleep(0.2)


def _exact(vectors: np.ndarray, query: np.ndarray, k: int, modality: str | None) -> list[str]:
    rows = np.arange(len(vectors))
    if modality is not None:
        rows = rows[rows % 2 == MODALITIES.index(modality)]
    d2 = ((vectors[rows].astype(np.float64) - query.astype(np.float64)) ** 2).sum(axis=1)
    return [f"1.2.3.{r}" for r in rows[np.argsort(d2, kind="stable")[:k]]]


def test_the_service_index_builds_hnsw_graphs_by_itself_and_answers_exactly(tmp_path: Path) -> None:
    index = _open(tmp_path)
    try:
        index.ensure_collection(DIM, "v1")
        vectors = _clustered(4000, seed=1)
        for lo in range(0, len(vectors), 500):
            index.upsert(_points(vectors[lo : lo + 500], lo))
        assert index.segment_counts()[1] == 0  # nothing built while writes go on (debounce)
        _wait_for_graphs(index, len(vectors))  # 2000 per modality >= 1500: both shards get graphs
        queries = _clustered(60, seed=2)
        for number, query in enumerate(queries):
            modality = MODALITIES[number % 2] if number % 3 else None
            hits = index.search(query.tolist(), 10, HitFilter([modality] if modality else []))
            assert [h.payload["sop_instance_uid"] for h in hits] == _exact(vectors, query, 10, modality)
    finally:
        index.close()


def test_writes_during_a_build_are_kept_and_searches_go_on(tmp_path: Path) -> None:
    index = _open(tmp_path)
    try:
        index.ensure_collection(DIM, "v1")
        vectors = _clustered(6000, seed=3)
        index.upsert(_points(vectors[:4000]))
        time.sleep(0.8)  # past the debounce: the builder copies the shards and starts
        answered = 0
        for lo in range(4000, 6000, 100):  # writes (and a delete) while the graphs are built
            index.upsert(_points(vectors[lo : lo + 100], lo))
            answered += len(index.search(vectors[lo].tolist(), 5, HitFilter(["mri"]))) == 5
            time.sleep(0.05)
        index.delete_points([point_id("1.2.3.7")])
        _wait_for_graphs(index, 4000)
        assert answered == 20
        assert sum(index.counts_by_modality().values()) == 5999
        for i in (0, 3999, 4000, 5999):
            assert index.find_sop(f"1.2.3.{i}")[1]["sop_instance_uid"] == f"1.2.3.{i}"
        assert not any(
            h.payload["sop_instance_uid"] == "1.2.3.7" for h in index.search(vectors[7].tolist(), 3)
        )
    finally:
        index.close()
    assert not list(tmp_path.rglob(".*.building")) and not list(tmp_path.rglob(".*.retired"))
    reopened = _open(tmp_path, CBMIR_HNSW_MIN_POINTS="0")  # the swapped shards load; nothing is built
    try:
        assert sum(reopened.counts_by_modality().values()) == 5999
        assert reopened.segment_counts()[1] >= 4000
    finally:
        reopened.close()


def test_an_interrupted_swap_is_undone_or_finished(tmp_path: Path) -> None:
    folder = tmp_path / "shards" / "c"
    (folder / ".mri.retired").mkdir(parents=True)  # crashed between the two renames
    (folder / ".xray.retired").mkdir()  # crashed after both
    (folder / "xray").mkdir()
    (folder / ".oct.building").mkdir()  # crashed during the build
    _recover_swaps(tmp_path / "shards")
    assert sorted(p.name for p in folder.iterdir()) == ["mri", "xray"]


def _sparse_index(tmp_path: Path, full_scan_points: int) -> EdgeIndex:
    """The service's index with graphs sparse on purpose (m 4, ef_construct 8, ef 10)."""
    return _open(
        tmp_path,
        CBMIR_HNSW_M="4",
        CBMIR_HNSW_EF_CONSTRUCT="8",
        CBMIR_HNSW_EF="10",
        CBMIR_HNSW_FULL_SCAN_POINTS=str(full_scan_points),
    )


def _xray_recall(index: EdgeIndex, vectors: np.ndarray) -> float:
    """recall@10 within the 3,000 X-ray points: below 1 only if the sparse graph answers."""
    queries = np.random.default_rng(4).standard_normal((40, DIM)).astype(np.float32)
    found = 0
    for query in queries:
        hits = index.search(query.tolist(), 10, HitFilter(["xray"]))
        found += len({h.payload["sop_instance_uid"] for h in hits} & set(_exact(vectors, query, 10, "xray")))
    return found / (10 * len(queries))


def test_the_full_scan_threshold_is_the_one_the_graph_was_built_with(tmp_path: Path) -> None:
    """A shard of 3,000 points is scanned (exact) below CBMIR_HNSW_FULL_SCAN_POINTS and searched
    through its graph above it, with the value the out-of-process build had, whatever the process
    that opens it later is set to (graphs built before keep theirs until they are built again)."""
    vectors = np.random.default_rng(3).standard_normal((6000, DIM)).astype(np.float32)
    for built_with, opened_with, scanned in ((10000, 1000, True), (1000, 10000, False)):
        folder = tmp_path / f"built{built_with}"
        index = _sparse_index(folder, built_with)
        try:
            index.ensure_collection(DIM, "v1")
            index.upsert(_points(vectors))
            index.build_graphs()  # with the background builder, which may have started on a shard
            assert index.segment_counts()[1] == len(vectors)
            recall = _xray_recall(index, vectors)
        finally:
            index.close()
        index = _sparse_index(folder, opened_with)
        try:
            reopened = _xray_recall(index, vectors)
        finally:
            index.close()
        if scanned:
            assert recall == reopened == 1.0
        else:
            assert recall < 0.95 and reopened < 0.95


def test_hnsw_settings_are_checked(tmp_path: Path) -> None:
    settings = QuerySettings.from_env({"CBMIR_DATA_DIR": str(tmp_path)}).index
    assert (settings.hnsw_m, settings.hnsw_ef_construct, settings.hnsw_ef) == (48, 300, 128)
    assert settings.hnsw_full_scan_points == 10000
    with pytest.raises(ConfigError, match="CBMIR_HNSW_M"):
        QuerySettings.from_env({"CBMIR_DATA_DIR": str(tmp_path), "CBMIR_HNSW_M": "2"})
    with pytest.raises(ConfigError, match="CBMIR_HNSW_EF"):
        QuerySettings.from_env({"CBMIR_DATA_DIR": str(tmp_path), "CBMIR_HNSW_EF": "many"})


def test_alias_and_meta_files_are_read_once_and_follow_this_process_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = _open(tmp_path, CBMIR_HNSW_MIN_POINTS="0")
    try:
        first = index.ensure_collection(DIM, "v1")
        vectors = _clustered(40, seed=5)
        index.upsert(_points(vectors))
        reads: list[str] = []
        read_text = Path.read_text

        def counting(path: Path, *args: object, **kwargs: object) -> str:
            if path.exists():  # a missing file (a new collection's meta) is looked for each time
                reads.append(path.name)
            return read_text(path, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(Path, "read_text", counting)
        for i in range(5):  # searches, lookups and counts read neither file again
            index.find_sop(f"1.2.3.{i}")
            index.search(vectors[i].tolist(), 3, HitFilter(["mri"]))
            index.count_points("sop_instance_uid", f"1.2.3.{i}", ["xray"])
        assert reads == []
        # a reindex through the same object: new collection, target, live dual writes, switch, drop
        second = f"{first}--2"
        index.create_collection(second, DIM)
        index.set_reindex_target(second)
        assert index.reindex_target() == second
        index.upsert(_points(vectors[:10]), second)
        index.switch_alias(second)
        assert (index.current_collection(), index.reindex_target()) == (second, None)
        assert len(index.search(vectors[0].tolist(), 20)) == 10  # the new collection's points
        index.drop_collection(first)
        assert index._collection_dim(first) is None and index._collection_dim(second) == DIM
        assert reads == []
    finally:
        index.close()
    reopened = _open(tmp_path, CBMIR_HNSW_MIN_POINTS="0")  # what was written is what a new owner reads
    try:
        assert (reopened.current_collection(), reopened.reindex_target()) == (second, None)
        assert reopened.collections() == [second]
    finally:
        reopened.close()


def _assert_left_out_as_the_engine_would(
    index: EdgeIndex, engine: QueryEngine, query: np.ndarray, limit: int, where: HitFilter, uid: str
) -> None:
    """The service's post-filtered search equals the engine filtering the same exclusions, in the
    same order, and never returns ``uid``."""
    expected = index.search(query.tolist(), limit, where)
    found = engine._nearest(query, limit, where)
    assert [h.point_id for h in found] == [h.point_id for h in expected]
    assert uid not in {h.payload["sop_instance_uid"] for h in found}


def test_the_query_instance_is_counted_and_left_out_only_in_the_modalities_searched(
    tmp_path: Path,
) -> None:

    index = _open(tmp_path, CBMIR_HNSW_MIN_POINTS="0")
    try:
        index.ensure_collection(DIM, "v1")
        vectors = _clustered(400, seed=6)
        index.upsert(_points(vectors))
        engine = QueryEngine(index, None, None, None)  # type: ignore[arg-type]  # _nearest needs the index
        uid = "1.2.3.3"  # an mri point
        assert index.count_points("sop_instance_uid", uid) == 1
        assert index.count_points("sop_instance_uid", uid, ["mri"]) == 1
        assert index.count_points("sop_instance_uid", uid, ["xray"]) == 0
        for modalities in ([], ["mri"], ["xray"], ["xray", "mri"]):
            for exclusion in (
                {"exclude_sops": [uid]},
                {"exclude_study": None, "exclude_sops": [uid, "1.2.3.4"]},
            ):
                where = HitFilter(modalities=modalities, **exclusion)  # type: ignore[arg-type]
                for limit in (1, 5, 11):
                    _assert_left_out_as_the_engine_would(index, engine, vectors[3], limit, where, uid)
    finally:
        index.close()


def test_a_query_instance_of_many_frames_is_left_out_exactly_and_one_frame_costs_no_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    index = _open(tmp_path, CBMIR_HNSW_MIN_POINTS="0")
    try:
        index.ensure_collection(DIM, "v1")
        vectors = _clustered(300, seed=8)
        index.upsert(_points(vectors))
        # an MR instance embedded frame by frame: 6 points, all next to the query, one SOP UID
        multi = "1.2.3.999"
        frames = [
            IndexPoint(
                point_id(f"{multi}/{f}"),
                (vectors[4] + 0.001 * f).tolist(),
                {"modality": "xray", "sop_instance_uid": multi, "frame_number": f},
            )
            for f in range(1, 7)
        ]
        index.upsert(frames)
        engine = QueryEngine(index, None, None, None)  # type: ignore[arg-type]  # _nearest needs the index
        counted: list[str] = []
        count_points = index.count_points

        def spy(field: str, value: str, modalities: object = ()) -> int:
            counted.append(value)
            return count_points(field, value, modalities)  # type: ignore[arg-type]

        monkeypatch.setattr(index, "count_points", spy)
        for uid, query in ((multi, vectors[4]), ("1.2.3.4", vectors[4])):
            for modalities in ([], ["xray"]):
                for limit in (1, 3, 10):
                    where = HitFilter(modalities=modalities, exclude_sops=[uid])
                    counted.clear()
                    _assert_left_out_as_the_engine_would(index, engine, query, limit, where, uid)
                    # a single point is left out without counting; six frames among the 11 nearest
                    # leave a page of 10 short, so they are counted (a page of 1 or 3 may not be)
                    if uid != multi:
                        assert counted == []
                    elif limit == 10:
                        assert counted == [multi]
        # the UID lookup finds the instance whichever modality it is told to look in first
        for likely in ([], ["xray"], ["mri"], ["eeg"]):
            vector, payload = index.find_sop("1.2.3.4", likely)
            assert payload["sop_instance_uid"] == "1.2.3.4" and np.allclose(vector, vectors[4])
    finally:
        index.close()
