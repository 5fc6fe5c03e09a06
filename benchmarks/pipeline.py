"""The whole ingest pipeline: C-STORE to searchable, ack-to-searchable latency, workers vs their bound.

What it compares (every figure a ratio against a peer measured in the same run)
    1. End-to-end objects/s: from the first C-STORE (the sender's start) until the last object is
       searchable (the query service's ``GetIndexStats`` counts its point), for (a) the embedded
       default ``cbmir serve`` (SQLite broker, embedded index, one worker) and (b) the distributed
       parts: Redis broker (``redis://127.0.0.1:6379/15``, a queue of its own, deleted afterwards),
       ``cbmir query`` (owns the embedded index), ``cbmir scp`` and ``--workers`` separate
       ``cbmir worker`` processes (default 1), upserting through the query service's index writer on
       its Unix socket. Peer: our own listener's receive rate, same files, same sender, listener
       alone (``cbmir scp``, no worker, tasks removed from the broker), with the same broker kind.
       Goal: end-to-end / receive >= 0.8.
    2. Ack-to-searchable latency p50/p95 at a steady ``--rate`` (20) objects/s: a pynetdicom SCU
       keeps one association open and sends one C-STORE every 50 ms (each object a copy of a corpus
       file with a new SOP Instance UID); the time each success response arrives is recorded, and
       the query service is polled (every ``--poll-ms``, 15) with ``SearchSimilar`` by
       ``sop_instance_uid`` (NOT_FOUND until indexed) for the oldest acknowledged, not yet found
       UID, then the next ones while they are found: about one RPC per poll. Goal: p95 <= 1 s.
       Embedded ``serve`` and the distributed setup (not with ``--quick`` unless ``--redis-latency``;
       never with ``--no-redis-latency``).
    3. Workers versus their bound: the "pipeline bound" is decode + preprocess + encode of the same
       objects in this process, no queue, no upsert (``decode_for_embedding`` ->
       ``model_inputs`` -> ``OnnxEncoder.embed`` in batches of ``CBMIR_BATCH_SIZE``, as the worker
       does), in images/s and images per CPU-second. The workers' figure: the distributed setup's
       queue is pre-filled (the workers stopped, the files sent through ``cbmir scp``), then the
       workers are started; from their Celery "ready" line until every object is counted in the
       index, in images/s and images per CPU-second of the worker processes (the query service's
       CPU for the upserts is printed beside). Ratio per core = workers' images per CPU-second /
       the bound's. Goal >= 0.7.
    4. GPU: not measured here (this script prints one line saying whether a CUDA provider exists).

Listener: ``--receiver`` sets ``CBMIR_DICOM_RECEIVER`` for every listener here (pynetdicom, the
default, or dcmtk, the native SCP of ``make dcmtk-scp``), the listener-alone peer included.

Corpora: as ``ingest.py`` (``--corpus``): the MR objects ``cbmir dicomize`` builds from
``../shared/data`` when it exists, else pydicom-built 512x512 MR. The sender is
``dcmsend -aet BENCH -aec CBMIR +sd 127.0.0.1 PORT FOLDER`` with ``TCP_NODELAY=1``.
Every server binds port 0 on loopback; temporary folders and the Redis queue are removed, child
processes stopped, whatever happens.

Run
    .venv/bin/python benchmarks/pipeline.py --quick     # ~2-3 minutes
    .venv/bin/python benchmarks/pipeline.py             # more objects, longer latency runs
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common
import ingest

from services.core.processes import stop_process

REDIS_URL = ingest.REDIS_URL
AE_TITLE = "CBMIR"
SERVE_READY = r"cbmir serve: ready dicom=[^:]+:(\d+) ae=\S+ grpc=[^:]+:(\d+)"
QUERY_READY = r"cbmir query: gRPC on [^:]+:(\d+)"
SCP_READY = r"cbmir scp: AE \S+ listening on [^:]+:(\d+)"
WORKER_READY = r"\S+@\S+ ready\."


# -- child processes ---------------------------------------------------------------------------------
class Child:
    """A ``cbmir`` child in its own process group; its output is kept (last lines) by a thread."""

    def __init__(self, name: str, args: list[str], env: dict[str, str]):
        self.name = name
        self.lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self.process = subprocess.Popen(
            common.cbmir_argv(*args),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            cwd=common.REPO_ROOT,
            start_new_session=True,
        )
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._cond:
                self.lines.append((time.perf_counter(), line.rstrip("\n")))
                del self.lines[:-2000]
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout_s: float = 120.0) -> tuple[float, re.Match]:
        """(when the line was read, its match) of the first output line matching ``pattern``."""
        regex, deadline, seen = re.compile(pattern), time.monotonic() + timeout_s, 0
        with self._cond:
            while True:
                for when, line in self.lines[seen:]:
                    if match := regex.search(line):
                        return when, match
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or self.process.poll() is not None:
                    break
                self._cond.wait(timeout=min(left, 0.5))
        raise RuntimeError(f"{self.name}: no line matching {pattern!r} in {timeout_s:.0f}s:\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        with self._cond:
            return "\n".join(line for _, line in self.lines[-n:])

    def cpu_s(self) -> float:
        return common.process_cpu_s(self.process.pid)

    def stop(self) -> None:
        stop_process(self.process, timeout_s=20, group=True)


def cbmir_env(data_dir: Path, receiver: str = "pynetdicom", **extra: str) -> dict[str, str]:
    """A clean ``CBMIR_*`` environment on ``data_dir``: loopback, CPU, no tokens, quiet logs, the
    listener's network side ``receiver``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CBMIR_", "QDRANT_"))}
    env.update(
        CBMIR_DICOM_RECEIVER=receiver,
        CBMIR_DATA_DIR=str(data_dir),
        CBMIR_DICOM_HOST="127.0.0.1",
        CBMIR_GRPC_HOST="127.0.0.1",
        CBMIR_AE_TITLE=AE_TITLE,
        CBMIR_ALLOWED_AE_TITLES="",
        CBMIR_DEVICE="cpu",
        CBMIR_LOG_LEVEL="WARNING",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


class Setup:
    """The running parts of one deployment: where to send, where to ask, what to stop."""

    def __init__(self, name: str):
        self.name = name
        self.children: list[Child] = []
        self.workers: list[Child] = []
        self.dicom_port = 0
        self.grpc_port = 0
        self.client = None
        self.queue: str | None = None
        self.env: dict[str, str] = {}

    def stats(self):
        return self.client.stats()

    def total(self) -> int:
        return int(self.stats().total)

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        for child in reversed(self.workers + self.children):
            child.stop()
        self.workers, self.children = [], []
        if self.queue:
            ingest.RedisQueue(self.queue).cleanup()

    def connect(self) -> None:
        from services.query.client import SearchClient

        self.client = SearchClient(f"127.0.0.1:{self.grpc_port}", timeout_s=30)
        self.client.wait_ready(60)


def start_serve(data: Path, receiver: str) -> Setup:
    setup = Setup("embedded (cbmir serve)")
    try:
        serve = Child(
            "serve",
            ["serve", "--data-dir", str(data), "--dicom-port", "0", "--grpc-port", "0"],
            cbmir_env(data, receiver),
        )
        setup.children.append(serve)
        _, ready = serve.wait_for(SERVE_READY, 180)
        setup.dicom_port, setup.grpc_port = int(ready.group(1)), int(ready.group(2))
        setup.connect()
    except BaseException:
        setup.stop()
        raise
    return setup


def start_distributed(data: Path, workers: int, receiver: str) -> Setup:
    setup = Setup(f"Redis, query + scp + {workers} worker{'s' if workers > 1 else ''}")
    setup.queue = f"bench.pipeline.{os.getpid()}.{int(time.time())}"
    setup.env = cbmir_env(data, receiver, CBMIR_BROKER_URL=REDIS_URL, CBMIR_QUEUE=setup.queue)
    try:
        query = Child("query", ["query"], dict(setup.env, CBMIR_GRPC_PORT="0"))
        setup.children.append(query)
        setup.grpc_port = int(query.wait_for(QUERY_READY)[1].group(1))
        scp = Child("scp", ["scp"], dict(setup.env, CBMIR_DICOM_PORT="0"))
        setup.children.append(scp)
        setup.dicom_port = int(scp.wait_for(SCP_READY)[1].group(1))
        setup.connect()
        start_workers(setup, workers)
    except BaseException:
        setup.stop()
        raise
    return setup


def start_workers(setup: Setup, count: int) -> float:
    """Start ``count`` workers (Celery logs "ready" at INFO); returns when the last was ready."""
    started = [
        Child(f"worker{i}", ["worker", "--hostname", f"bench{i}@%h"], dict(setup.env, CBMIR_LOG_LEVEL="INFO"))
        for i in range(count)
    ]
    setup.workers += started
    return max(worker.wait_for(WORKER_READY, 180)[0] for worker in started)


def stop_workers(setup: Setup) -> None:
    for worker in setup.workers:
        worker.stop()
    setup.workers = []


# -- measurements ------------------------------------------------------------------------------------
def wait_total(setup: Setup, target: int, timeout_s: float, poll_s: float = 0.1) -> float:
    """Poll ``GetIndexStats`` until ``target`` points are indexed; returns when that was seen."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = setup.stats()
        if stats.total >= target:
            return time.perf_counter()
        if stats.quarantined:
            raise RuntimeError(f"{setup.name}: {stats.quarantined} object(s) quarantined")
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{setup.name}: {stats.total} of {target} points after {timeout_s:.0f}s "
                f"(pending {stats.pending}):\n"
                + "\n".join(c.tail(10) for c in setup.children + setup.workers)
            )
        time.sleep(poll_s)


def warm_up(setup: Setup, warm: common.Corpus) -> None:
    """First association, the workers' first batch (ONNX session, imports), then wait for both."""
    before = setup.total()
    ingest.send([warm.folder], AE_TITLE, setup.dicom_port)
    wait_total(setup, before + len(warm.files), 120)


def end_to_end(setup: Setup, corpus: common.Corpus) -> dict:
    """Send the corpus over one association; time to received (sender done) and to all indexed."""
    before = setup.total()
    t0 = time.perf_counter()
    received_s = ingest.send([corpus.folder], AE_TITLE, setup.dicom_port)
    done = wait_total(setup, before + len(corpus.files), 60 + 2 * len(corpus.files))
    n = len(corpus.files)
    return {"n": n, "received_rate": n / received_s, "e2e_rate": n / (done - t0), "e2e_s": done - t0}


def receive_only(broker: str, corpus: common.Corpus, root: Path, network_side: str) -> float:
    """Our listener alone (no worker), same files, same sender: instances/s; its tasks are removed."""
    queue = f"bench.pipeline.{os.getpid()}.recv.{broker}"
    redis_queue = ingest.RedisQueue(queue) if broker == "redis" else None
    receiver = ingest.CbmirScp(root / f"recv-{broker}", None, broker, queue, network_side)
    try:
        receiver.prepare()
        ingest.send_to([corpus.folder], receiver, "dcmsend")  # warm: association, page cache
        ingest.drain_tasks(receiver, redis_queue, len(corpus.files))
        receiver.prepare()
        elapsed = ingest.send_to([corpus.folder], receiver, "dcmsend")
        if receiver.stored() != len(corpus.files):
            raise RuntimeError(f"listener stored {receiver.stored()} of {len(corpus.files)}")
        ingest.drain_tasks(receiver, redis_queue, len(corpus.files))
    finally:
        receiver.stop()
        if redis_queue:
            redis_queue.cleanup()
        shutil.rmtree(root / f"recv-{broker}", ignore_errors=True)
    return len(corpus.files) / elapsed


def steady_latency(
    setup: Setup, templates: list[Path], rate_hz: float, seconds: float, poll_s: float
) -> dict:
    """One C-STORE every 1/rate s over one open association; ack -> searchable per object."""
    import grpc
    from pydicom import dcmread
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
    from pynetdicom import AE

    datasets = [dcmread(path) for path in templates]
    ae = AE(ae_title="BENCH")
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", setup.dicom_port, ae_title=AE_TITLE)
    if not assoc.is_established:
        raise RuntimeError(f"{setup.name}: association refused")
    total = int(rate_hz * seconds)
    acked: list[tuple[str, float]] = []  # (uid, ack time), in ack order
    failures: list[str] = []
    lock = threading.Lock()

    def sender() -> None:
        t0 = time.perf_counter()
        try:
            for i in range(total):
                delay = t0 + i / rate_hz - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                ds = datasets[i % len(datasets)]
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
                status = assoc.send_c_store(ds)
                now = time.perf_counter()
                if status and status.Status == 0:
                    with lock:
                        acked.append((str(ds.SOPInstanceUID), now))
                else:
                    failures.append(f"C-STORE status {getattr(status, 'Status', None)}")
        finally:
            assoc.release()

    thread = threading.Thread(target=sender, daemon=True)
    latencies: list[float] = []
    found = 0  # acked[:found] are searchable
    rpcs = 0
    thread.start()
    deadline = None
    while True:
        with lock:
            waiting = acked[found:]
        for uid, ack in waiting:
            rpcs += 1
            try:
                setup.client.search(sop_instance_uid=uid, k=1, exclude_self=False)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    break
                raise
            latencies.append(time.perf_counter() - ack)
            found += 1
        if not thread.is_alive():
            if found >= len(acked):
                break
            deadline = deadline or time.monotonic() + 60
            if time.monotonic() > deadline:
                raise RuntimeError(f"{setup.name}: {len(acked) - found} acknowledged objects not searchable")
        time.sleep(poll_s)
    thread.join()
    if failures:
        raise RuntimeError(f"{setup.name}: {len(failures)} C-STORE failures, e.g. {failures[0]}")
    return {
        "n": len(latencies),
        "p50": common.percentile(latencies, 50),
        "p95": common.percentile(latencies, 95),
        "max": max(latencies) if latencies else float("nan"),
        "rpcs": rpcs,
    }


def worker_prefilled(setup: Setup, corpus: common.Corpus, workers: int) -> dict:
    """Stop the workers, spool the corpus through the listener (the queue fills), start the workers:
    images/s and CPU from their "ready" until every object is indexed."""
    stop_workers(setup)
    before = setup.total()
    ingest.send([corpus.folder], AE_TITLE, setup.dicom_port)
    time.sleep(0.5)  # the listener's background dispatch
    pending = setup.stats().pending
    query = setup.children[0]
    query_cpu0 = query.cpu_s()
    ready = start_workers(setup, workers)
    cpu0 = sum(w.cpu_s() for w in setup.workers)
    qcpu_ready = query.cpu_s()
    done = wait_total(setup, before + len(corpus.files), 60 + 2 * len(corpus.files), poll_s=0.05)
    cpu1 = sum(w.cpu_s() for w in setup.workers)
    query_cpu1 = query.cpu_s()
    n, wall = len(corpus.files), done - ready
    return {
        "n": n,
        "pending": pending,
        "rate": n / wall,
        "cpu_s": cpu1 - cpu0,
        "per_cpu_s": n / (cpu1 - cpu0) if cpu1 > cpu0 else float("nan"),
        "cores": (cpu1 - cpu0) / wall,
        "query_cpu_s": query_cpu1 - qcpu_ready,
        "query_cpu_start_s": qcpu_ready - query_cpu0,
    }


def pipeline_bound(corpus: common.Corpus, data: Path) -> dict:
    """Decode + preprocess + encode of the corpus in this process, batched as the worker batches."""

    from models.runtime import EncoderSet
    from services.core.config import WorkerSettings
    from services.dicom.decode import DecodeLimits, decode_for_embedding
    from services.index.points import model_inputs

    settings = WorkerSettings.from_env(cbmir_env(data))
    encoder = EncoderSet.load(settings.model.model_path, device="cpu")
    limits = DecodeLimits.from_settings(settings.decode)
    batch = settings.batch_size

    def run(paths: list[Path]) -> int:
        images = 0
        for start in range(0, len(paths), batch):
            inputs, modalities = [], []
            for path in paths[start : start + batch]:
                header, frames = decode_for_embedding(
                    path, frames=settings.decode.frames, limits=limits, eeg_render=encoder.eeg_render
                )
                inputs.append(model_inputs(frames, encoder.for_modality(header.modality).contract))
                modalities.append(header.modality)
            images += sum(len(rows) for rows in encoder.embed_each(inputs, modalities))
        return images

    run(corpus.files[:batch])  # warm: session, allocations
    cpu0, t0 = os.times(), time.perf_counter()
    images = run(corpus.files)
    wall, cpu1 = time.perf_counter() - t0, os.times()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return {
        "n": images,
        "rate": images / wall,
        "cpu_s": cpu,
        "per_cpu_s": images / cpu if cpu > 0 else float("nan"),
        "cores": cpu / wall,
        "batch": batch,
        "provider": encoder.providers[0],
    }


def gpu_line() -> str:
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    except Exception as exc:  # noqa: BLE001 - only for the line printed
        return f"GPU: not measured (onnxruntime unavailable: {exc})"
    if "CUDAExecutionProvider" in providers:
        return "GPU: a CUDA provider exists, but this script measures the CPU only (CBMIR_DEVICE=cpu)"
    return "GPU: not measured: no GPU / no CUDA execution provider on this machine (CPU rows only)"


# -- main --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer objects, shorter latency runs (~2-3 min)")
    parser.add_argument(
        "--corpus",
        choices=list(common.CORPORA),
        help=f"default: {common.default_corpora()[0]} (the first of ingest.py's default corpora)",
    )
    parser.add_argument(
        "--count", type=int, help="objects per end-to-end run (default: the corpus's; quick 100)"
    )
    parser.add_argument("--workers", type=int, default=1, help="separate cbmir worker processes (default 1)")
    parser.add_argument("--rate", type=float, default=20.0, help="objects/s of the latency runs (default 20)")
    parser.add_argument("--latency-s", type=float, help="seconds of each latency run (default 30, quick 10)")
    parser.add_argument("--poll-ms", type=float, default=15.0, help="poll interval of the latency runs")
    parser.add_argument(
        "--redis-latency",
        action=argparse.BooleanOptionalAction,
        help="also the latency run on the distributed setup (default: yes, no with --quick)",
    )
    parser.add_argument(
        "--receiver",
        choices=("pynetdicom", "dcmtk"),
        default="pynetdicom",
        help="the listener's network side, CBMIR_DICOM_RECEIVER (default pynetdicom)",
    )
    parser.add_argument("--skip-embedded", action="store_true")
    parser.add_argument("--skip-distributed", action="store_true")
    parser.add_argument("--workdir", help="where to put files and data folders (default: a temporary folder)")
    args = parser.parse_args(argv)
    if not shutil.which("dcmsend"):
        parser.error("dcmsend not found: apt-get install dcmtk")
    key = args.corpus or common.default_corpora()[0]
    if key == "shared-mr" and not common.shared_data_present():
        parser.error(f"shared-mr needs {common.SHARED_DATA}/manifest.csv")
    kind = common.CORPORA[key]
    count = args.count or (kind.quick_count if args.quick else kind.default_count)
    latency_s = args.latency_s or (10.0 if args.quick else 30.0)
    if not args.skip_distributed:
        ingest.RedisQueue("bench.pipeline.ping")  # fails early when Redis is not there
    print(
        f"pipeline benchmark | {common.machine_line()} | {kind.label} x {count} | sender dcmsend | "
        f"workers {args.workers} | listener {args.receiver} | latency {args.rate:g}/s for {latency_s:g}s",
        flush=True,
    )
    root = Path(tempfile.mkdtemp(prefix="cbmir-pipeline-", dir=args.workdir))
    e2e_rows, latency_rows = [], []
    bound = workers = None
    try:
        t0 = time.perf_counter()
        corpora = {
            name: common.make_corpus(key, root / name, n, seed=seed)
            for name, n, seed in (("warm", 2, 11), ("e2e-embedded", count, 12), ("e2e-redis", count, 13))
        }
        corpora["prefill"] = common.make_corpus(key, root / "prefill", count, seed=14)
        print(f"# corpora made in {time.perf_counter() - t0:.1f}s", flush=True)
        templates = corpora["warm"].files
        plans = [] if args.skip_embedded else [("embedded", "embedded")]
        plans += [] if args.skip_distributed else [("redis", "redis")]
        for label, broker in plans:
            recv = receive_only(broker, corpora[f"e2e-{label}"], root, args.receiver)
            print(f"  {label}: listener alone {recv:.1f} inst/s", flush=True)
            data = root / f"data-{label}"
            setup = (
                start_serve(data, args.receiver)
                if label == "embedded"
                else start_distributed(data, args.workers, args.receiver)
            )
            try:
                warm_up(setup, corpora["warm"])
                e2e = end_to_end(setup, corpora[f"e2e-{label}"])
                print(
                    f"  {label}: end to end {e2e['e2e_rate']:.1f} obj/s "
                    f"(received at {e2e['received_rate']:.1f} inst/s)",
                    flush=True,
                )
                e2e_rows.append(
                    [
                        setup.name,
                        e2e["n"],
                        recv,
                        e2e["received_rate"],
                        e2e["e2e_rate"],
                        e2e["e2e_rate"] / recv,
                    ]
                )
                if e2e["e2e_rate"] < args.rate:
                    print(
                        f"  {label}: note: end to end {e2e['e2e_rate']:.1f} obj/s is below the offered "
                        f"{args.rate:g}/s, so the latency below grows with the run's length",
                        flush=True,
                    )
                redis_latency = not args.quick if args.redis_latency is None else args.redis_latency
                if label == "embedded" or redis_latency:
                    lat = steady_latency(setup, templates, args.rate, latency_s, args.poll_ms / 1000)
                    print(f"  {label}: latency p50 {lat['p50'] * 1000:.0f} ms p95 {lat['p95'] * 1000:.0f} ms")
                    latency_rows.append(
                        [
                            setup.name,
                            lat["n"],
                            lat["p50"] * 1000,
                            lat["p95"] * 1000,
                            lat["max"] * 1000,
                            lat["rpcs"],
                        ]
                    )
                if label == "redis":
                    workers = worker_prefilled(setup, corpora["prefill"], args.workers)
                    print(f"  workers, queue pre-filled: {workers['rate']:.1f} images/s", flush=True)
            finally:
                setup.stop()
                shutil.rmtree(data, ignore_errors=True)
        bound = pipeline_bound(corpora["prefill"], root / "bound")
        print(f"  bound: {bound['rate']:.1f} images/s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    if e2e_rows:
        print(
            common.table(
                [
                    "setup",
                    "objects",
                    "listener alone inst/s",
                    "received inst/s",
                    "end-to-end obj/s",
                    "e2e / receive",
                ],
                e2e_rows,
                title="end to end: first C-STORE -> last object searchable (goal: e2e / receive >= 0.8)",
            )
        )
    if latency_rows:
        print(
            common.table(
                ["setup", "objects", "p50 ms", "p95 ms", "max ms", "search RPCs"],
                latency_rows,
                title=f"ack -> searchable at {args.rate:g} objects/s, one association (goal: p95 <= 1000 ms)",
            )
        )
    if bound is not None:
        rows = [
            [
                f"pipeline bound (in process, batch {bound['batch']}, {bound['provider']})",
                bound["n"],
                bound["rate"],
                bound["cores"],
                bound["per_cpu_s"],
                1.0,
                1.0,
            ]
        ]
        if workers is not None:
            rows.append(
                [
                    f"{args.workers} worker process{'es' if args.workers > 1 else ''}, queue pre-filled",
                    workers["n"],
                    workers["rate"],
                    workers["cores"],
                    workers["per_cpu_s"],
                    workers["rate"] / bound["rate"],
                    workers["per_cpu_s"] / bound["per_cpu_s"],
                ]
            )
        print(
            common.table(
                ["run", "images", "images/s", "cores used", "images/CPU-s", "ratio (wall)", "ratio per core"],
                rows,
                title="workers vs the pipeline bound (decode + preprocess + encode; "
                "goal: ratio per core >= 0.7)",
            )
        )
        if workers is not None:
            print(
                f"(query service CPU for the workers' upserts: {workers['query_cpu_s']:.2f} s for "
                f"{workers['n']} objects; {workers['pending']} pending when the workers started)"
            )
    print(gpu_line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
