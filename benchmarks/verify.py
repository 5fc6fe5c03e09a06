"""``cbmir verify`` at scale: is the archive-against-index check cheap enough to run nightly?

What it measures
    A data folder with N archived objects and an embedded index (qdrant-edge, the per-modality
    shards the service uses) holding N points with the workers' payload; 0.1 % of the points lose
    their archived object (orphans) and 0.1 % of the objects lose their point (missing). Then
    ``IndexMaintenance.verify`` runs as ``cbmir verify --data-dir`` does, and must find exactly
    those. The archived objects are empty placeholder files: verify never reads them, only their
    names.

    The reference, in the same run, is the floor verify cannot go below: listing the archive folder
    (``os.scandir``) plus reading every point's payload once (a full scroll of the shards), without
    comparing anything. The ratio verify / floor says how much the comparison itself costs.

Run
    .venv/bin/python benchmarks/verify.py --quick       # 20k objects (~1 minute)
    .venv/bin/python benchmarks/verify.py               # 100k objects
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common

DIM = 48  # the shipped encoder's
BATCH = 2000
MODALITIES = ("xray", "mri", "oct", "eeg")


def build(root: Path, n: int, seed: int = 0) -> tuple[set[str], set[str]]:
    """N points and N archived objects, less the planted faults; returns (orphan UIDs, missing names)."""
    from services.core.config import DataLayout
    from services.index import EdgeIndex, IndexPoint, point_id
    from services.ingest.spool import Spool

    rng = np.random.default_rng(seed)
    spool = Spool(DataLayout(root))
    index = EdgeIndex(root / "index", "bench")
    index.ensure_collection(DIM, "bench-1")
    uids = [f"2.25.{uuid.UUID(int=int(rng.integers(0, 2**62)) << 64 | i).int}" for i in range(n)]
    faults = max(1, n // 1000)
    orphans, missing = set(uids[:faults]), {f"{u}.dcm" for u in uids[faults : 2 * faults]}
    started = time.perf_counter()
    for lo in range(0, n, BATCH):
        chunk = uids[lo : lo + BATCH]
        vectors = rng.standard_normal((len(chunk), DIM)).astype(np.float32)
        points = [
            IndexPoint(
                point_id(uid),
                vector.tolist(),
                {
                    "modality": MODALITIES[i % 4],
                    "modality_code": "MR",
                    "study_instance_uid": uid + ".1",
                    "series_instance_uid": uid + ".2",
                    "sop_instance_uid": uid,
                    "sop_class_uid": "1.2.840.10008.5.1.4.1.1.4",
                    "frame_number": 1,
                    "model_version": "bench-1",
                    "ingested_at": time.time(),
                    "spool_name": f"{uid}.dcm",
                },
            )
            for i, (uid, vector) in enumerate(zip(chunk, vectors, strict=True))
            if f"{uid}.dcm" not in missing
        ]
        index.upsert(points)
    for uid in uids:
        if uid not in orphans:
            (spool.layout.archive / f"{uid}.dcm").touch()
    index.close()
    print(f"# built {n} objects in {time.perf_counter() - started:.1f}s", flush=True)
    return orphans, missing


def floor_s(root: Path) -> float:
    """List the archive and read every payload once, comparing nothing."""
    from services.index import EdgeIndex

    index = EdgeIndex(root / "index", "bench")
    started = time.perf_counter()
    with os.scandir(root / "archive") as entries:
        names = sum(1 for entry in entries if entry.is_file(follow_symlinks=False))
    payloads = sum(1 for _ in index.scroll())
    elapsed = time.perf_counter() - started
    index.close()
    assert names and payloads
    return elapsed


def verify_s(root: Path, orphans: set[str], missing: set[str]) -> tuple[float, object]:
    from services.core.config import DataLayout
    from services.index import EdgeIndex
    from services.ingest.spool import Spool
    from services.query.admin import IndexMaintenance

    index = EdgeIndex(root / "index", "bench")
    maintenance = IndexMaintenance(
        index, Spool(DataLayout(root)), model_version="bench-1", send=lambda name: True
    )
    started = time.perf_counter()
    report = maintenance.verify(repair=False, who="benchmark")
    elapsed = time.perf_counter() - started
    index.close()
    assert set(report.orphans) == orphans, "verify missed or invented orphans"
    assert set(report.missing) == missing, "verify missed or invented missing points"
    return elapsed, report


SEARCH_PROCESS = """
import sys, numpy as np
from services.index import EdgeIndex, HitFilter
index = EdgeIndex(sys.argv[1], "bench")
rng = np.random.default_rng(1)
for _ in range(200):
    index.search(rng.standard_normal(int(sys.argv[2])).tolist(), 10, HitFilter(["mri"]))
# VmHWM: this process's own peak (ru_maxrss would include the parent's, inherited at fork)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(int(status["VmHWM"].split()[0]) / 1024)
"""


def serving_footprint(root: Path) -> tuple[float, float]:
    """(MB on disk of the index folder, peak RSS MB of a fresh process that opens it and answers
    200 modality-filtered searches): what an index owner needs for these points."""
    import subprocess

    disk = sum(p.stat().st_size for p in (root / "index").rglob("*") if p.is_file()) / 2**20
    result = subprocess.run(
        [sys.executable, "-c", SEARCH_PROCESS, str(root / "index"), str(DIM)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    return disk, float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20k objects instead of 100k")
    parser.add_argument("--n", type=int, help="objects (overrides --quick)")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    n = args.n or (20_000 if args.quick else 100_000)
    print(common.machine_line())
    with tempfile.TemporaryDirectory(prefix="cbmir-verify-", dir=os.environ.get("TMPDIR")) as tmp:
        root = Path(tmp)
        orphans, missing = build(root, n)
        floors = [floor_s(root) for _ in range(args.reps)]
        runs = [verify_s(root, orphans, missing) for _ in range(args.reps)]
        times = [t for t, _ in runs]
        report = runs[-1][1]
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            common.table(
                ["check", "objects", "points", "found", "median s", "objects/s", "vs floor"],
                [
                    [
                        "floor: scandir + payload scroll",
                        n - len(orphans),
                        n - len(missing),
                        "-",
                        f"{common.median(floors):.2f}",
                        f"{n / common.median(floors):,.0f}",
                        "1.00",
                    ],
                    [
                        "cbmir verify",
                        report.archived,
                        report.points,
                        f"{len(report.missing)} missing, {len(report.orphans)} orphans",
                        f"{common.median(times):.2f}",
                        f"{n / common.median(times):,.0f}",
                        f"{common.median(times) / common.median(floors):.2f}",
                    ],
                ],
                title=f"verify at {n:,} objects (median of {args.reps}); peak RSS {rss_mb:.0f} MB",
            )
        )
        per_million = common.median(times) * 1_000_000 / n
        print(f"extrapolated: about {per_million / 60:.1f} min per million objects on this machine")
        disk_mb, rss_mb = serving_footprint(root)
        points = n - len(missing)
        print(
            f"index of {points:,} points ({DIM}-d, the workers' payload): {disk_mb:.0f} MB on disk "
            f"({disk_mb * 1e6 / points / 1024:.1f} GB per million); a fresh process that opens it "
            f"and answers 200 filtered searches peaks at {rss_mb:.0f} MB RSS"
        )


if __name__ == "__main__":
    main()
