"""Similar-case search latency over gRPC (``SearchSimilar``) versus numpy brute force.

What it compares
    p50/p99 latency of ``cbmir.v1.SimilarCases/SearchSimilar`` at 10k and 100k indexed vectors of
    the served model's dimension (48 for the shipped encoder), with and without a modality filter
    (4 modalities, drawn uniformly, so a filter keeps ~25 %), against exact numpy brute force over
    the same vectors (float32, ``|x|^2 - 2 x.q`` with precomputed norms, per-modality sub-matrices
    standing in for the payload index). Also recall@5 of the service's answer against the exact
    (float64) answer, and the latency of a gRPC ``Health/Check`` on the same channel as the floor
    of any call.

    Everything goes through the real path: the benchmark starts the real query service
    (``cbmir query`` with ``CBMIR_DATA_DIR`` in a temporary folder and
    ``CBMIR_GRPC_PORT=0``), which owns the embedded index (qdrant-edge); fills it through the
    service's private ``cbmir.v1.IndexWriter/UpsertPoints`` RPC on its Unix socket
    (:class:`services.index.RemoteIndexWriter`,
    model version read from ``GetIndexStats``, dimension from ``OnnxEncoder().dim``), and queries
    by ``sop_instance_uid`` (the service looks up the stored vector, then searches) over the gRPC
    socket, one call at a time from one client. The index is not optimised (no HNSW): the service
    never calls ``optimize()``, so this is what a freshly filled index serves.

    Goal: filtered p99 <= 10 ms at 100k.

Run
    .venv/bin/python benchmarks/search.py --quick     # < 2 minutes (200 queries per row)
    .venv/bin/python benchmarks/search.py             # 1000 queries per row
    .venv/bin/python benchmarks/search.py --sizes 10000,100000,200000
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # BLAS threads spinning between queries skew timings
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common

K = 5


def fill(writer, vs: common.VectorSet, start: int, stop: int, model_version: str, batch: int) -> float:
    """Upsert rows [start, stop) through IndexWriter/UpsertPoints; returns seconds."""
    from services.index import IndexPoint, point_id

    t0 = time.perf_counter()
    for lo in range(start, stop, batch):
        hi = min(stop, lo + batch)
        points = [
            IndexPoint(point_id(vs.uids[i]), vs.vectors[i].tolist(), vs.payload(i)) for i in range(lo, hi)
        ]
        writer.upsert(points, model_version)
    return time.perf_counter() - t0


def run_queries(
    client, knn: common.NumpyKnn, vs: common.VectorSet, n: int, queries: int, filtered: bool, seed: int
) -> dict:
    from services.core.vocabulary import MODALITY_TO_PB

    rng = np.random.default_rng(seed)
    rows = rng.integers(0, n, size=queries)
    modalities = rng.integers(0, len(common.BENCH_MODALITIES), size=queries)
    for i in range(min(20, queries)):  # warm-up
        client.search(sop_instance_uid=vs.uids[int(rows[i])], k=K, exclude_self=False)
    grpc_ms, numpy_ms, recalls = [], [], []
    for row, modality in zip(rows, modalities, strict=True):
        uid = vs.uids[int(row)]
        names = [common.BENCH_MODALITIES[int(modality)]] if filtered else []
        t0 = time.perf_counter()
        response = client.search(sop_instance_uid=uid, k=K, modalities=names, exclude_self=False)
        grpc_ms.append((time.perf_counter() - t0) * 1000)
        query = vs.vectors[int(row)]
        m = int(modality) if filtered else None
        t0 = time.perf_counter()
        knn.search(query, K, m)
        numpy_ms.append((time.perf_counter() - t0) * 1000)
        truth = [vs.uids[i] for i in knn.exact(query, K, m)]
        found = [hit.sop_instance_uid for hit in response.hits]
        if filtered:
            wanted = MODALITY_TO_PB[names[0]]
            assert all(hit.modality == wanted for hit in response.hits), "filter not applied"
        recalls.append(common.recall(found, truth))
    return {"grpc": grpc_ms, "numpy": numpy_ms, "recall": float(np.mean(recalls))}


def health_floor(target: str, calls: int) -> list[float]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.insecure_channel(target)
    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service="cbmir.v1.SimilarCases")
    for _ in range(20):
        stub.Check(request, timeout=5)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        stub.Check(request, timeout=5)
        times.append((time.perf_counter() - t0) * 1000)
    channel.close()
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 queries per row (< 2 minutes)")
    parser.add_argument(
        "--sizes", default="10000,100000", help="index sizes, ascending (filled incrementally)"
    )
    parser.add_argument("--queries", type=int, help="queries per row (default 1000, quick 300)")
    parser.add_argument("--batch", type=int, default=1000, help="points per UpsertPoints call")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(",") if s.strip())
    queries = args.queries or (200 if args.quick else 1000)

    from models.runtime import OnnxEncoder
    from services.index import RemoteIndexWriter
    from services.query.client import SearchClient

    dim = OnnxEncoder(device="cpu").dim
    print(
        f"search benchmark | {common.machine_line()} | dim {dim} | k={K} | {queries} queries per row",
        flush=True,
    )
    vs = common.make_vectors(sizes[-1], dim, seed=args.seed)
    data = Path(tempfile.mkdtemp(prefix="cbmir-search-"))
    rows, summary = [], {}
    service = common.start_query_service(common.query_service_env(data))
    try:
        target = f"127.0.0.1:{service.port}"
        client = SearchClient(target)
        client.wait_ready(30)
        model_version = client.stats().model_version
        writer = RemoteIndexWriter(f"unix:{data / 'index-writer.sock'}")  # the writer's default address
        filled = 0
        for n in sizes:
            seconds = fill(writer, vs, filled, n, model_version, args.batch)
            print(
                f"# upserted {n - filled} points via IndexWriter/UpsertPoints in {seconds:.1f}s "
                f"({(n - filled) / seconds:,.0f}/s), index now {client.stats().total}",
                flush=True,
            )
            filled = n
            knn = common.NumpyKnn(vs.vectors[:n], vs.modalities[:n])
            for filtered in (False, True):
                r = run_queries(client, knn, vs, n, queries, filtered, args.seed + n + filtered)
                label = "modality filter" if filtered else "no filter"
                g50, g99 = common.percentile(r["grpc"], 50), common.percentile(r["grpc"], 99)
                n50, n99 = common.percentile(r["numpy"], 50), common.percentile(r["numpy"], 99)
                rows.append([f"{n:,}", label, g50, g99, n50, n99, g50 / n50, g99 / n99, r["recall"]])
                summary[(n, filtered)] = g99
                print(
                    f"  {n:,} {label}: gRPC p50 {g50:.2f} ms p99 {g99:.2f} ms | numpy p50 {n50:.3f} ms | "
                    f"recall@5 {r['recall']:.3f}",
                    flush=True,
                )
        floor = health_floor(target, queries)
        writer.close()
        client.close()
    finally:
        service.stop()
        shutil.rmtree(data, ignore_errors=True)
    print(
        common.table(
            [
                "vectors",
                "query",
                "gRPC p50 ms",
                "gRPC p99 ms",
                "numpy p50 ms",
                "numpy p99 ms",
                "p50 ratio",
                "p99 ratio",
                "recall@5",
            ],
            rows,
            title=f"SearchSimilar by sop_instance_uid, k={K}, dim {dim}, "
            "embedded qdrant-edge (not optimised)",
        )
    )
    print(
        f"gRPC floor (Health/Check on the same server): p50 {common.percentile(floor, 50):.2f} ms, "
        f"p99 {common.percentile(floor, 99):.2f} ms"
    )
    largest = sizes[-1]
    if (largest, True) in summary:
        p99 = summary[(largest, True)]
        print(
            f"goal: filtered p99 <= 10 ms at {largest:,}: {p99:.2f} ms -> {'met' if p99 <= 10 else 'NOT met'}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
