"""Scalar quantisation (``CBMIR_QUANTIZATION=int8``) on the shipped model's real embeddings.

What it measures
    Every image and EEG segment of ``../shared/data`` embedded by the shipped model, each through
    its modality's encoder and preprocessing contract, as the workers embed them. The database is
    the ``train`` and ``val`` splits, the queries are the ``test`` split, each searched with k=10
    within its own modality (as a viewer asks) and without a filter, which the service restricts to
    the modalities of the query's own encoder (all of them with a one-encoder model). Rows:

    * numpy brute force in float64: the exact answer, and the reference for recall and latency;
    * ``EdgeIndex`` (the embedded store, through the same adapter the service calls) without
      quantisation, after ``optimize()`` (HNSW);
    * ``EdgeIndex`` with ``quantization="int8"`` after ``optimize()``: HNSW over int8 codes, the best
      2 x k candidates rescored with the full vectors.

    The collection is small (about 14k points, 3.5 MB of vectors), under the engine's default
    indexing threshold, so both edge rows lower ``indexing_threshold_kb`` to make ``optimize()``
    build the graph and the int8 codes, as it does on its own at the sizes of a hospital archive.
    Reported: recall@10 against the exact answer, p50/p99 latency, and the bytes per vector on disk
    (vectors and their int8 codes).

Run
    .venv/bin/python benchmarks/quantization.py             # needs ../shared/data; ~2 minutes
    .venv/bin/python benchmarks/quantization.py --quick     # 3,000 database points, 300 queries
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common

K = 10


def embed(records: list, encoders: object) -> np.ndarray:
    """Each record through its modality's encoder and contract (as the workers embed it)."""
    from models.data import cached_model_inputs

    out = np.zeros((len(records), encoders.dim), np.float32)  # type: ignore[attr-defined]
    for encoder in encoders.members():  # type: ignore[attr-defined]
        rows = [i for i, r in enumerate(records) if encoders.for_modality(r.modality) is encoder]  # type: ignore[attr-defined]
        if not rows:
            continue
        inputs = cached_model_inputs([records[i] for i in rows], encoder.contract)
        out[rows] = np.concatenate([encoder.embed(inputs[i : i + 256]) for i in range(0, len(inputs), 256)])
    return out


def folder_bytes(root: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in root.rglob(pattern) if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3,000 database points and 300 queries")
    args = parser.parse_args()
    from models.data import read_manifest, shared_data_dir
    from models.runtime import EncoderSet
    from services.index import EdgeIndex, HitFilter, IndexPoint, point_id

    data = shared_data_dir()
    if not (data / "manifest.csv").is_file():
        raise SystemExit(f"quantization.py needs the shared data set at {data}")
    print(common.machine_line())
    rng = np.random.default_rng(0)
    database = read_manifest(data, splits=("train", "val"))
    queries = read_manifest(data, splits=("test",))
    if args.quick:
        database = [database[i] for i in sorted(rng.choice(len(database), 3000, replace=False))]
        queries = [queries[i] for i in sorted(rng.choice(len(queries), 300, replace=False))]
    encoder = EncoderSet.load(device="cpu")
    started = time.perf_counter()
    db_vectors, query_vectors = embed(database, encoder), embed(queries, encoder)
    elapsed = time.perf_counter() - started
    print(f"# embedded {len(database)} + {len(queries)} with {encoder.version} in {elapsed:.0f}s", flush=True)
    modalities = sorted({r.modality for r in database})
    db_modality = np.array([modalities.index(r.modality) for r in database])
    q_modality = [modalities.index(r.modality) for r in queries]
    # without a filter, the service compares a query with its own encoder's modalities
    comparable = [list(encoder.comparable(m, tuple(modalities))) for m in modalities]

    def exact(query: np.ndarray, modality: int, filtered: bool) -> list[int]:
        allowed = [modality] if filtered else [modalities.index(m) for m in comparable[modality]]
        rows = np.flatnonzero(np.isin(db_modality, allowed))
        d2 = ((db_vectors[rows].astype(np.float64) - query.astype(np.float64)) ** 2).sum(axis=1)
        return [int(r) for r in rows[np.argsort(d2, kind="stable")[:K]]]

    rows = []
    for filtered in (True, False):
        truth, latencies = [], []
        for query, modality in zip(query_vectors, q_modality, strict=True):
            t0 = time.perf_counter()
            truth.append(exact(query, modality, filtered))
            latencies.append(time.perf_counter() - t0)
        rows.append(
            [
                "numpy brute force (exact)",
                "filtered" if filtered else "no filter",
                "1.0000",
                common.percentile(latencies, 50) * 1e3,
                common.percentile(latencies, 99) * 1e3,
                "-",
            ]
        )
        for quantization in ("none", "int8"):
            with tempfile.TemporaryDirectory(prefix="cbmir-quant-") as tmp:
                index = EdgeIndex(Path(tmp), "bench", quantization=quantization, indexing_threshold_kb=64)
                index.ensure_collection(encoder.dim, encoder.version)
                for lo in range(0, len(database), 1000):
                    index.upsert(
                        [
                            IndexPoint(
                                point_id(f"2.25.{i}"),
                                db_vectors[i].tolist(),
                                {"modality": database[i].modality, "sop_instance_uid": f"2.25.{i}"},
                            )
                            for i in range(lo, min(lo + 1000, len(database)))
                        ]
                    )
                index.optimize()
                recalls, latencies = [], []
                for number, (query, modality) in enumerate(zip(query_vectors, q_modality, strict=True)):
                    t0 = time.perf_counter()
                    hits = index.search(
                        query.tolist(),
                        K,
                        HitFilter([modalities[modality]] if filtered else comparable[modality]),
                    )
                    latencies.append(time.perf_counter() - t0)
                    found = [h.payload["sop_instance_uid"] for h in hits]
                    recalls.append(common.recall(found, [f"2.25.{i}" for i in truth[number]]))
                codes_b = folder_bytes(Path(tmp), "quantized.data")
                index.close()
            size = (
                f"+ int8 codes, {codes_b / 1024:.0f} KB"
                if codes_b
                else f"float32, {encoder.dim * 4} B/vector"
            )
            rows.append(
                [
                    f"EdgeIndex, quantization={quantization}, HNSW",
                    "filtered" if filtered else "no filter",
                    f"{np.mean(recalls):.4f}",
                    common.percentile(latencies, 50) * 1e3,
                    common.percentile(latencies, 99) * 1e3,
                    size,
                ]
            )
    print(
        common.table(
            ["store", "modality filter", f"recall@{K}", "p50 ms", "p99 ms", "storage"],
            rows,
            title=f"{len(database):,} real embeddings ({encoder.dim}-d, {encoder.version}), "
            f"{len(queries):,} test queries, k={K}",
        )
    )


if __name__ == "__main__":
    main()
