"""The embedded vector store choice, measured: qdrant-client local mode versus qdrant-edge.

What it compares
    The two embedded stores behind :class:`services.index.VectorIndex`, used in-process through the
    same adapter methods the services call (``ensure_collection``, ``upsert`` in batches of 1000,
    ``search`` with k=5), on N random vectors of 48 values (N = 100k; 30k with ``--quick``), each
    with a uniformly drawn modality out of 4 and the payload the workers write:

    * ``QdrantServerIndex(path=...)``: qdrant-client's local mode (pure Python, numpy brute force,
      filters evaluated point by point in Python, one SQLite transaction per point);
    * ``EdgeIndex``: qdrant-edge-py, Qdrant's Rust engine in-process (WAL, keyword payload index),
      before and after ``EdgeIndex.optimize()`` (which builds HNSW once a segment is large enough);
    * numpy brute force over the same float32 matrix, as the reference and for the exact answer.

    Reported: upsert time, p50/p99 query latency without and with a modality filter, recall@5
    against the exact (float64) answer, and for edge the optimisation time and segment state.

    Local mode commits (fsyncs) a SQLite transaction for every point: on this machine's disk that
    is ~10-20 ms per point, i.e. about half an hour for 100k. So the full local-mode collection is
    built on tmpfs (``/dev/shm``; same code, fsync is free there), and its on-disk upsert rate is
    measured separately on a few hundred points and extrapolated. Local-mode filtered queries take
    seconds at 100k, so that row uses fewer queries (``--slow-queries``). The edge index lives on
    the real disk, as in the service.

Run
    .venv/bin/python benchmarks/index_stores.py --quick     # 30k vectors, < 2 minutes
    .venv/bin/python benchmarks/index_stores.py             # 100k vectors (~5 minutes)
    .venv/bin/python benchmarks/index_stores.py --skip-local --hnsw-experiment   # + a tuned HNSW row
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # BLAS threads spinning between queries skew timings
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common

K = 5
DIM = 48
BATCH = 1000


def build(index, vs: common.VectorSet, n: int) -> float:
    from services.index import IndexPoint, point_id

    index.ensure_collection(DIM, "bench")
    t0 = time.perf_counter()
    for lo in range(0, n, BATCH):
        hi = min(n, lo + BATCH)
        index.upsert(
            [IndexPoint(point_id(vs.uids[i]), vs.vectors[i].tolist(), vs.payload(i)) for i in range(lo, hi)]
        )
    return time.perf_counter() - t0


def latency(
    search, knn: common.NumpyKnn, vs: common.VectorSet, n: int, queries: int, filtered: bool, seed: int
) -> tuple[list[float], float]:
    """``search(vector_list, modality_names) -> uids``; returns (ms per query, mean recall@5)."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, n, size=queries)
    modalities = rng.integers(0, len(common.BENCH_MODALITIES), size=queries)
    for row in rows[: min(5, queries)]:
        search(vs.vectors[int(row)].tolist(), [])
    times, recalls = [], []
    for row, modality in zip(rows, modalities, strict=True):
        query = vs.vectors[int(row)]
        names = [common.BENCH_MODALITIES[int(modality)]] if filtered else []
        vector = query.tolist()
        t0 = time.perf_counter()
        found = search(vector, names)
        times.append((time.perf_counter() - t0) * 1000)
        truth = [vs.uids[i] for i in knn.exact(query, K, int(modality) if filtered else None)]
        recalls.append(common.recall(found, truth))
    return times, float(np.mean(recalls))


def index_search(index):
    from services.index import HitFilter

    def search(vector, names):
        return [hit.payload["sop_instance_uid"] for hit in index.search(vector, K, HitFilter(names))]

    return search


def numpy_search(knn: common.NumpyKnn, vs: common.VectorSet):
    index_of = {name: i for i, name in enumerate(common.BENCH_MODALITIES)}

    def search(vector, names):
        rows = knn.search(np.asarray(vector, dtype=np.float32), K, index_of[names[0]] if names else None)
        return [vs.uids[i] for i in rows]

    return search


def local_disk_rate(vs: common.VectorSet, points: int, root: Path) -> float:
    """qdrant-client local mode on the real disk: seconds per upserted point."""
    from services.index import IndexPoint, QdrantServerIndex, point_id

    index = QdrantServerIndex("cbmir", path=root / "local-disk")
    index.ensure_collection(DIM, "bench")
    t0 = time.perf_counter()
    for lo in range(0, points, 100):
        index.upsert(
            [
                IndexPoint(point_id(vs.uids[i]), vs.vectors[i].tolist(), vs.payload(i))
                for i in range(lo, min(points, lo + 100))
            ]
        )
    seconds = time.perf_counter() - t0
    index.close()
    return seconds / points


class RawEdgeShard:
    """qdrant-edge with a non-default HNSW config (not what EdgeIndex creates): the ``--hnsw-experiment`` row.

    ``full_scan_threshold`` (KB of vectors) decides when a filtered query stops using exact search over
    the payload index and walks the HNSW graph instead; 1000 KB is ~5k points of 48 float32, so a
    1-of-4 modality filter on 100k points (~25k matches) goes through the graph.
    """

    def __init__(self, path: Path, full_scan_threshold_kb: int):
        import qdrant_edge as qe

        from services.index import INDEXED_FIELDS

        self._qe = qe
        config = qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(size=DIM, distance=qe.Distance.Euclid),
            hnsw_config=qe.HnswIndexConfig(
                m=16, ef_construct=100, full_scan_threshold=full_scan_threshold_kb
            ),
        )
        self.shard = qe.EdgeShard.create(str(path), config)
        for name in INDEXED_FIELDS:
            self.shard.update(qe.UpdateOperation.create_field_index(name, qe.PayloadSchemaType.Keyword))

    def fill(self, vs: common.VectorSet, n: int) -> float:
        from services.index import point_id

        qe = self._qe
        t0 = time.perf_counter()
        for lo in range(0, n, BATCH):
            points = [
                qe.Point(point_id(vs.uids[i]), vs.vectors[i].tolist(), vs.payload(i))
                for i in range(lo, min(n, lo + BATCH))
            ]
            self.shard.update(qe.UpdateOperation.upsert_points(points))
            self.shard.flush()
        return time.perf_counter() - t0

    def search(self, vector, names):
        qe = self._qe
        flt = None
        if names:
            flt = qe.Filter(must=[qe.FieldCondition(key="modality", match=qe.MatchAny(any=list(names)))])
        request = qe.QueryRequest(limit=K, query=qe.Query.Nearest(vector), with_payload=True, filter=flt)
        return [p.payload["sop_instance_uid"] for p in self.shard.query(request)]

    def state(self) -> str:
        info = self.shard.info()
        return f"{info.segments_count} segment(s), {info.indexed_vectors_count:,} vectors in HNSW"


def edge_state(index) -> str:
    segments, indexed = index.segment_counts()
    return f"{segments} segment(s), {indexed:,} vectors in HNSW"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="30k vectors, fewer queries (< 2 minutes)")
    parser.add_argument("-n", "--vectors", type=int, help="vectors (default 100000, quick 30000)")
    parser.add_argument("--queries", type=int, help="queries per fast row (default 500, quick 200)")
    parser.add_argument("--slow-queries", type=int, help="queries per local-mode row (default 30, quick 10)")
    parser.add_argument(
        "--disk-points", type=int, help="points for the local-mode on-disk rate (default 500, quick 200)"
    )
    parser.add_argument("--tmpfs", default="/dev/shm", help="where the full local-mode collection is built")
    parser.add_argument("--skip-local", action="store_true", help="leave qdrant-client local mode out")
    parser.add_argument(
        "--hnsw-experiment",
        action="store_true",
        help="add a qdrant-edge row with full_scan_threshold=1000 KB (filtered queries via HNSW)",
    )
    args = parser.parse_args(argv)
    n = args.vectors or (30_000 if args.quick else 100_000)
    queries = args.queries or (200 if args.quick else 500)
    slow = args.slow_queries or (10 if args.quick else 30)
    disk_points = args.disk_points or (200 if args.quick else 500)
    warnings.filterwarnings("ignore", message="Payload indexes have no effect in the local Qdrant")
    warnings.filterwarnings("ignore", message="Local mode is not recommended")

    from services.index import EdgeIndex, QdrantServerIndex

    print(f"index store benchmark | {common.machine_line()} | {n:,} x {DIM} | k={K}", flush=True)
    vs = common.make_vectors(n, DIM, seed=1)
    knn = common.NumpyKnn(vs.vectors, vs.modalities)
    root = Path(tempfile.mkdtemp(prefix="cbmir-stores-"))
    rows = []

    def measure(label: str, search, count: int, upsert_s, extra: str) -> None:
        t_plain, r_plain = latency(search, knn, vs, n, count, False, 11)
        t_filt, r_filt = latency(search, knn, vs, n, count, True, 12)
        rows.append(
            [
                label,
                upsert_s,
                common.percentile(t_plain, 50),
                common.percentile(t_plain, 99),
                common.percentile(t_filt, 50),
                common.percentile(t_filt, 99),
                r_plain,
                r_filt,
                count,
                extra,
            ]
        )
        print(f"  {label}: p50 {rows[-1][2]:.3f} ms, filtered p50 {rows[-1][4]:.3f} ms", flush=True)

    try:
        measure("numpy brute force (float32)", numpy_search(knn, vs), queries, float("nan"), "reference")

        edge = EdgeIndex(root / "edge", "cbmir")
        seconds = build(edge, vs, n)
        print(
            f"# edge: {n:,} upserted in {seconds:.1f}s ({n / seconds:,.0f}/s): {edge_state(edge)}", flush=True
        )
        measure(
            "qdrant-edge (EdgeIndex), before optimize()",
            index_search(edge),
            queries,
            seconds,
            edge_state(edge),
        )
        t0 = time.perf_counter()
        changed = edge.optimize()
        optimize_s = time.perf_counter() - t0
        print(f"# edge: optimize() -> {changed} in {optimize_s:.1f}s: {edge_state(edge)}", flush=True)
        measure(
            "qdrant-edge (EdgeIndex), after optimize()",
            index_search(edge),
            queries,
            float("nan"),
            f"optimize {optimize_s:.1f}s; {edge_state(edge)}",
        )
        edge.close()

        if args.hnsw_experiment:
            raw = RawEdgeShard(root / "edge-fst", 1000)
            seconds = raw.fill(vs, n)
            t0 = time.perf_counter()
            raw.shard.optimize()
            optimize_s = time.perf_counter() - t0
            measure(
                "qdrant-edge, full_scan_threshold=1000 KB, optimized",
                raw.search,
                queries,
                seconds,
                f"optimize {optimize_s:.1f}s; {raw.state()}",
            )
            raw.shard.close()

        if not args.skip_local:
            tmp = Path(tempfile.mkdtemp(prefix="cbmir-stores-", dir=args.tmpfs))
            try:
                local = QdrantServerIndex("cbmir", path=tmp / "local")
                seconds = build(local, vs, n)
                print(f"# local mode on tmpfs: {n:,} upserted in {seconds:.1f}s", flush=True)
                measure(
                    "qdrant-client local mode (path on tmpfs)",
                    index_search(local),
                    slow,
                    seconds,
                    "pure Python; path on tmpfs",
                )
                local.close()
                t0 = time.perf_counter()
                local = QdrantServerIndex("cbmir", path=tmp / "local")
                reopen_s = time.perf_counter() - t0
                local.close()
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            per_point = local_disk_rate(vs, disk_points, root)
            rows.append(
                [
                    "qdrant-client local mode (path on disk)",
                    per_point * n,
                    float("nan"),
                    float("nan"),
                    float("nan"),
                    float("nan"),
                    float("nan"),
                    float("nan"),
                    0,
                    (
                        f"upsert extrapolated from {disk_points} points ({per_point * 1000:.1f} ms/point); "
                        f"reopen of {n:,} points {reopen_s:.1f}s"
                    ),
                ]
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(
        common.table(
            [
                "store",
                f"upsert {n // 1000}k s",
                "p50 ms",
                "p99 ms",
                "filtered p50 ms",
                "filtered p99 ms",
                "recall@5",
                "filtered recall@5",
                "queries",
                "notes",
            ],
            rows,
            title=f"embedded stores, {n:,} x {DIM} float32, Euclidean, k={K}, filter = 1 of 4 modalities",
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
