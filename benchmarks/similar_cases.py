"""What the clinician's search options cost: exclusions, study grouping, the library filter, the HTTP
gateway and thumbnails, each against a reference measured in the same run.

What it compares
    The real query service (``cbmir query``, embedded index) and the real HTTP gateway
    (``cbmir gateway``) on loopback, filled through the private IndexWriter with N random vectors
    of the served dimension: 8 images per study, 3 studies per patient (a keyed patient reference
    in the payload), 10 % of the studies in the reference library with a finding. Queries go by
    ``sop_instance_uid``, k = 5, one at a time:

    * instance hits with the query kept (``exclude_self`` false: no exclusion at all), instance
      hits (the query left out, as by default), study-level hits (``group_by`` STUDY),
      the same patient left out, library cases only: gRPC p50/p99 against numpy brute force doing
      the same (exact distances with precomputed norms, the exclusions as masks, grouping by
      study over the nearest candidates), and the agreement of the two answers (recall@5);
    * the same instance search through the HTTP gateway (``POST /v1/search``, JSON, keep-alive)
      against gRPC: what the browser path adds;
    * ``RenderInstance`` thumbnails (256 px) of an archived MR 512² and CR 2048²: first call and
      cached, against decoding and thumbnailing the same file in this process.

Run
    .venv/bin/python benchmarks/similar_cases.py --quick   # 20,000 vectors, 200 queries per row
    .venv/bin/python benchmarks/similar_cases.py           # 100,000 vectors, 500 queries per row
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common

K = 5
PER_STUDY = 8
STUDIES_PER_PATIENT = 3
LIBRARY_EVERY = 10  # one study in ten is a library case
SECRET = "similar-cases-benchmark-secret-0123"


def payload(i: int, uid: str) -> dict:
    study = i // PER_STUDY
    patient = study // STUDIES_PER_PATIENT
    item = {
        "sop_instance_uid": uid,
        "study_instance_uid": f"2.25.7{study}",
        "series_instance_uid": f"2.25.6{study}",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.4",
        "modality": "mri",
        "modality_code": "MR",
        "frame_number": 1,
        "patient_key": hashlib.sha256(f"p{patient}".encode()).hexdigest()[:32],
        "study_date": "20240101",
    }
    if study % LIBRARY_EVERY == 0:
        item.update(finding=("glioma", "meningioma")[study % 2], source="library")
    return item


class Reference:
    """The same searches by numpy brute force."""

    def __init__(self, vectors: np.ndarray):
        self.vectors = vectors
        self.norms = np.einsum("ij,ij->i", vectors, vectors)
        rows = np.arange(len(vectors))
        self.study = rows // PER_STUDY
        self.patient = self.study // STUDIES_PER_PATIENT
        self.library = self.study % LIBRARY_EVERY == 0

    def search(self, row: int, variant: str) -> list[int]:
        d2 = self.norms - 2.0 * (self.vectors @ self.vectors[row])
        if variant != "query kept":
            d2[row] = np.inf  # the query is not its own hit
        if variant == "same patient left out":
            d2[self.patient == self.patient[row]] = np.inf
        elif variant == "library only":
            d2[~self.library] = np.inf
        if variant != "study-level":
            top = np.argpartition(d2, K)[:K]
            return [int(i) for i in top[np.argsort(d2[top])]]
        pool = np.argpartition(d2, 4 * K * PER_STUDY)[: 4 * K * PER_STUDY]
        pool = pool[np.argsort(d2[pool])]
        _, first = np.unique(self.study[pool], return_index=True)
        return [int(i) for i in pool[np.sort(first)][:K]]


VARIANTS = {
    "query kept": {"exclude_self": False},
    "instance": {},
    "study-level": {"group_by": "study"},
    "same patient left out": {"exclude_same_patient": True},
    "library only": {"source": "library"},
}


def thumbnails(client, data: Path, writer, model_version: str, dim: int) -> list[list]:
    """RenderInstance of an archived MR 512² and CR 2048², first call and cached, against decoding
    and thumbnailing the same file here."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from services.dicom.decode import decode_for_embedding
    from services.dicom.render import thumbnail_png
    from services.index import IndexPoint, point_id

    rows = []
    rng = np.random.default_rng(3)
    for name, size, sop_class, code in (
        ("warm-up", 64, "1.2.840.10008.5.1.4.1.1.4", "MR"),  # the service's first decode loads codecs
        ("MR 512²", 512, "1.2.840.10008.5.1.4.1.1.4", "MR"),
        ("CR 2048²", 2048, "1.2.840.10008.5.1.4.1.1.1", "CR"),
    ):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), code
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
        path = data / "archive" / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        item = {
            "sop_instance_uid": ds.SOPInstanceUID,
            "study_instance_uid": ds.StudyInstanceUID,
            "series_instance_uid": ds.SeriesInstanceUID,
            "sop_class_uid": sop_class,
            "modality": "mri" if code == "MR" else "xray",
            "modality_code": code,
            "frame_number": 1,
            "spool_name": path.name,
        }
        writer.upsert([IndexPoint(point_id(ds.SOPInstanceUID), [0.0] * dim, item)], model_version)
        uids = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        t0 = time.perf_counter()
        client.render(*uids, max_size=256)
        first = (time.perf_counter() - t0) * 1000
        cached = []
        for _ in range(50):
            t0 = time.perf_counter()
            client.render(*uids, max_size=256)
            cached.append((time.perf_counter() - t0) * 1000)
        local = []
        for _ in range(5):
            t0 = time.perf_counter()
            _, frames = decode_for_embedding(path)
            thumbnail_png(frames[0].image, 256)
            local.append((time.perf_counter() - t0) * 1000)
        reference = common.median(local)
        rows.append([name, first, common.median(cached), reference, first / reference])
    return rows[1:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20,000 vectors, 200 queries per row")
    parser.add_argument("--n", type=int, help="vectors (default 100,000; quick 20,000)")
    parser.add_argument("--queries", type=int, help="queries per row (default 500; quick 200)")
    args = parser.parse_args(argv)
    n = args.n or (20_000 if args.quick else 100_000)
    queries = args.queries or (200 if args.quick else 500)

    import httpx

    from models.runtime import OnnxEncoder
    from services.index import IndexPoint, RemoteIndexWriter, point_id
    from services.query.client import SearchClient

    dim = OnnxEncoder(device="cpu").dim
    print(
        f"similar-cases benchmark | {common.machine_line()} | dim {dim} | {n:,} vectors | k={K}", flush=True
    )
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    uids = [f"2.25.5{i:09d}" for i in range(n)]
    data = Path(tempfile.mkdtemp(prefix="cbmir-similar-"))
    env = common.query_service_env(data, CBMIR_PATIENT_KEY_SECRET=SECRET)
    query = common.start_query_service(env)
    gateway = None
    try:
        target = f"127.0.0.1:{query.port}"
        gateway = common.Service(
            [common.python(), "-m", "services", "gateway"],
            dict(env, CBMIR_HTTP_HOST="127.0.0.1", CBMIR_HTTP_PORT="0", CBMIR_QUERY_TARGET=target),
            "cbmir gateway: HTTP on",
            "gateway",
        )
        client = SearchClient(target)
        client.wait_ready(30)
        model_version = client.stats().model_version
        writer = RemoteIndexWriter(f"unix:{data / 'index-writer.sock'}")
        t0 = time.perf_counter()
        for lo in range(0, n, 1000):
            writer.upsert(
                [
                    IndexPoint(point_id(uids[i]), vectors[i].tolist(), payload(i, uids[i]))
                    for i in range(lo, min(n, lo + 1000))
                ],
                model_version,
            )
        print(f"# filled {n:,} points in {time.perf_counter() - t0:.1f} s", flush=True)
        reference = Reference(vectors)
        probe = np.random.default_rng(1).integers(0, n, size=queries)
        rows = []
        for variant, options in VARIANTS.items():
            for row in probe[:20]:  # warm-up
                client.search(sop_instance_uid=uids[int(row)], k=K, **options)
            grpc_ms, numpy_ms, agreement = [], [], []
            for row in probe:
                t0 = time.perf_counter()
                hits = client.search(sop_instance_uid=uids[int(row)], k=K, **options).hits
                grpc_ms.append((time.perf_counter() - t0) * 1000)
                t0 = time.perf_counter()
                truth = reference.search(int(row), variant)
                numpy_ms.append((time.perf_counter() - t0) * 1000)
                agreement.append(common.recall([h.sop_instance_uid for h in hits], [uids[i] for i in truth]))
            g50, g99 = common.percentile(grpc_ms, 50), common.percentile(grpc_ms, 99)
            n50 = common.percentile(numpy_ms, 50)
            rows.append([variant, g50, g99, n50, g50 / n50, float(np.mean(agreement))])
            print(f"  {variant}: gRPC p50 {g50:.2f} ms p99 {g99:.2f} ms, numpy p50 {n50:.2f} ms", flush=True)

        assert gateway.port is not None
        with httpx.Client(base_url=f"http://127.0.0.1:{gateway.port}", timeout=30) as http:
            http_ms, grpc_ms = [], []
            for row in probe:
                uid = uids[int(row)]
                t0 = time.perf_counter()
                answer = http.post("/v1/search", json={"sop_instance_uid": uid, "k": K})
                http_ms.append((time.perf_counter() - t0) * 1000)
                assert answer.status_code == 200, answer.text
                t0 = time.perf_counter()
                client.search(sop_instance_uid=uid, k=K)
                grpc_ms.append((time.perf_counter() - t0) * 1000)
        h50, h99 = common.percentile(http_ms, 50), common.percentile(http_ms, 99)
        g50, g99 = common.percentile(grpc_ms, 50), common.percentile(grpc_ms, 99)
        gateway_rows = [["instance, k=5", h50, h99, g50, g99, h50 / g50]]
        render_rows = thumbnails(client, data, writer, model_version, dim)
        writer.close()
        client.close()
    finally:
        if gateway is not None:
            gateway.stop()
        query.stop()
        shutil.rmtree(data, ignore_errors=True)
    print(
        common.table(
            ["search", "gRPC p50 ms", "gRPC p99 ms", "numpy p50 ms", "p50 ratio", "agreement@5"],
            rows,
            title=f"Search options at {n:,} vectors ({queries} queries each; numpy: brute force with "
            "the same exclusions and grouping)",
        )
    )
    print(
        common.table(
            ["query", "HTTP p50 ms", "HTTP p99 ms", "gRPC p50 ms", "gRPC p99 ms", "HTTP/gRPC p50"],
            gateway_rows,
            title="The browser path: POST /v1/search through cbmir gateway against gRPC",
        )
    )
    print(
        common.table(
            ["thumbnail 256 px", "uncached ms", "cached ms", "decode+render here ms", "uncached/here"],
            render_rows,
            title="RenderInstance against decoding and thumbnailing the same file in this process",
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
