"""DICOM ingest throughput: the ``cbmir scp`` listener versus dcmtk's ``storescp``.

What it compares
    Instances per second *received and spooled* by our listener (the real ``cbmir scp`` process:
    parse-check, write to ``spool/incoming`` with fsync of file and folder, send the Celery task to
    the broker, answer) versus dcmtk's ``storescp`` writing the same objects to a folder. Both
    receive the same N files from the same ``storescu`` command on this machine, in the same run,
    with the servers taken in turns within each repetition. The time is the wall time of
    ``storescu`` (one association, all N files): every C-STORE response it waits for is sent only
    after the object is on disk, so the time covers receiving and storing. Median over repetitions.

    Two sizes of realistic uncompressed objects are made with pydicom (Explicit VR Little Endian,
    which ``storescu`` can send without conversion): 512x512 16-bit MR (~0.5 MB) and 2048x2048
    16-bit CR (~8 MB).

dcmtk options, and why
    ``storescp -aet STORESCP -od DIR -pdu 131072 PORT`` (plain: one process, no ``--fork``, the
    default file writing; 131072 is dcmtk's largest accepted max PDU) and, as a second reference,
    the same with ``+B`` (bit-preserving: the data set is streamed to the file as received, which
    is what our listener does semantically). ``storescu -aet BENCH -aec AE -R -pdu 131072 +sd DIR``
    (``-R``: propose only the SOP classes present, so both servers negotiate the same few
    contexts). The *matched* comparison is our listener at ``CBMIR_MAX_PDU=131072`` against
    ``storescp -pdu 131072``: storescu sends P-DATA PDUs as large as the receiver's max PDU, so both
    get the same fragmenting. ``TCP_NODELAY=1`` is set for both dcmtk tools (Debian's dcmtk keeps
    Nagle's algorithm on otherwise and each small PDU then waits tens of ms for an ACK).
    Neither ``storescp`` mode fsyncs; our listener fsyncs every object and its folder before it
    answers (an acknowledged instance survives a power cut). The ``fsync floor`` line prints what
    that alone costs per object on this disk.

    Our listener is also run at several ``CBMIR_MAX_PDU`` values (16384, 65536, 131072, 262144,
    0 = unlimited) and the fastest is reported.

Run
    .venv/bin/python benchmarks/ingest.py --quick          # < 2 minutes
    .venv/bin/python benchmarks/ingest.py                  # more files and repetitions
    .venv/bin/python benchmarks/ingest.py --profile        # also profile our listener with py-spy

Broker: ``--broker redis`` (default; ``redis://127.0.0.1:6379/15`` with a queue name of its own,
deleted afterwards) or ``--broker embedded`` (the SQLite default under the data directory).
``--profile`` needs ``py-spy`` (``pip install py-spy``; it is not a project dependency) on PATH or
given with ``--py-spy``.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common

from services.core.processes import stop_process
from services.core.vocabulary import CR_IMAGE, DICOM_MODALITY_CODES, MR_IMAGE, MRI, XRAY

STORESCP_PDU = 131072  # dcmtk accepts 4096..131072
DEFAULT_PDUS = (16384, 65536, 131072, 262144, 0)
REDIS_URL = "redis://127.0.0.1:6379/15"


# -- test objects ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Size:
    label: str
    rows: int
    columns: int
    sop_class: str
    modality: str


SIZES = {
    "512": Size("MR 512x512x16", 512, 512, MR_IMAGE, DICOM_MODALITY_CODES[MRI]),
    "2048": Size("CR 2048x2048x16", 2048, 2048, CR_IMAGE, DICOM_MODALITY_CODES[XRAY]),
}


def make_files(folder: Path, size: Size, count: int, seed: int = 0) -> int:
    """Write ``count`` uncompressed objects; returns the size in bytes of one file."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = (np.add.outer(np.arange(size.rows), np.arange(size.columns)) % 4096).astype(np.uint16)
    study = generate_uid()
    series = generate_uid()
    nbytes = 0
    for i in range(count):
        uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = size.sop_class
        meta.MediaStorageSOPInstanceUID = uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = size.sop_class
        ds.SOPInstanceUID = uid
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.Modality = size.modality
        ds.PatientID = "BENCH"
        ds.PatientName = "Bench^Ingest"
        ds.InstanceNumber = i + 1
        ds.Rows, ds.Columns = size.rows, size.columns
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        noise = rng.integers(0, 64, size=(size.rows, 1), dtype=np.uint16)  # cheap per-file variation
        ds.PixelData = (base + noise).astype(np.uint16).tobytes()
        path = folder / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        nbytes = path.stat().st_size
    return nbytes


def fsync_floor_ms(folder: Path, nbytes: int, count: int = 10) -> float:
    """Median time to write ``nbytes``, fsync it, rename it and fsync the folder (what the spool does)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = b"\0" * nbytes
    times = []
    for i in range(count):
        t0 = time.perf_counter()
        tmp, final = folder / f"f{i}.part", folder / f"f{i}.dcm"
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        fd = os.open(folder, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        times.append(time.perf_counter() - t0)
    shutil.rmtree(folder, ignore_errors=True)
    return common.median(times) * 1000


def dispatch_floor_ms(broker: str, root: Path, count: int = 50) -> float:
    """Median time of one ``TaskDispatcher.embed`` (Celery ``send_task``): what the handler pays per
    instance."""
    from services.core.config import ListenerSettings
    from services.ingest.dispatch import TaskDispatcher

    queue = f"bench.ingest.{os.getpid()}.dispatch"
    env = {"CBMIR_DATA_DIR": str(root / "dispatch"), "CBMIR_QUEUE": queue}
    if broker == "redis":
        env["CBMIR_BROKER_URL"] = REDIS_URL
    dispatcher = TaskDispatcher(ListenerSettings.from_env(env).broker)
    times = []
    try:
        for i in range(count + 5):
            t0 = time.perf_counter()
            if not dispatcher.embed(f"1.2.3.{i}.dcm"):
                raise RuntimeError("broker refused the task")
            times.append(time.perf_counter() - t0)
    finally:
        dispatcher.close()
        if broker == "redis":
            RedisQueue(queue).cleanup()
        shutil.rmtree(root / "dispatch", ignore_errors=True)
    return common.median(times[5:]) * 1000


# -- receivers -------------------------------------------------------------------------------------
def dcmtk_env() -> dict[str, str]:
    return dict(os.environ, TCP_NODELAY="1")


class Receiver:
    name: str
    pdu: int

    def prepare(self) -> None:  # empty the output before a timed run
        ...

    def stored(self) -> int: ...

    def stop(self) -> None: ...


class StoreScp(Receiver):
    """dcmtk's storescp; mode "plain" (default writing), "B" (+B, bit-preserving) or "sync" (plain, plus
    a synchronous ``sync FILE DIR`` after each object, before the response: the durability-matched
    reference)."""

    MODES: ClassVar[dict[str, str]] = {"plain": "storescp", "B": "storescp +B", "sync": "storescp +sync"}

    def __init__(self, root: Path, mode: str):
        self.pdu = STORESCP_PDU
        self.name = self.MODES[mode]
        self.out = root / f"storescp-{mode}"
        self.out.mkdir(parents=True)
        self.port = common.free_port()
        self.ae = "STORESCP"
        argv = ["storescp", "-aet", self.ae, "-od", str(self.out), "-pdu", str(STORESCP_PDU)]
        if mode == "B":
            argv.append("+B")
        elif mode == "sync":
            argv += ["--exec-on-reception", "sync #p/#f #p", "--exec-sync"]
        self.process = subprocess.Popen(
            [*argv, str(self.port)],
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        common.wait_port(self.port)

    def prepare(self) -> None:
        for path in self.out.iterdir():
            path.unlink()

    def stored(self) -> int:
        return sum(1 for _ in self.out.iterdir())

    def stop(self) -> None:
        stop_process(self.process, timeout_s=10)


def cbmir_argv() -> list[str]:
    script = Path(sys.executable).with_name("cbmir")
    return [str(script), "scp"] if script.exists() else [sys.executable, "-m", "services", "scp"]


class CbmirScp(Receiver):
    def __init__(self, root: Path, pdu: int, broker: str, queue: str):
        self.pdu = pdu
        self.name = f"cbmir scp pdu={pdu or 'unlimited'}"
        self.data = root / f"cbmir-{pdu}"
        self.ae = "CBMIR"
        self.queue = queue
        self.broker = broker
        env = dict(
            os.environ,
            CBMIR_DATA_DIR=str(self.data),
            CBMIR_DICOM_HOST="127.0.0.1",
            CBMIR_DICOM_PORT="0",
            CBMIR_MAX_PDU=str(pdu),
            CBMIR_QUEUE=queue,
            CBMIR_AE_TITLE=self.ae,
            CBMIR_ALLOWED_AE_TITLES="",
            CBMIR_LOG_LEVEL="WARNING",
            PYTHONUNBUFFERED="1",
        )
        env.pop("CBMIR_BROKER_URL", None)
        if broker == "redis":
            env["CBMIR_BROKER_URL"] = REDIS_URL
        self.service = common.Service(cbmir_argv(), env, "cbmir scp:", self.name)
        self.port = self.service.port
        self.pid = self.service.process.pid

    @property
    def incoming(self) -> Path:
        return self.data / "spool" / "incoming"

    def prepare(self) -> None:
        for path in self.incoming.iterdir():
            path.unlink()

    def stored(self) -> int:
        return sum(1 for _ in self.incoming.iterdir())

    def drain_embedded(self) -> int:
        """Embedded broker: count and delete the task messages in this listener's SQLite broker."""
        db = self.data / "broker" / "broker.sqlite"
        if not db.exists():
            return 0
        con = sqlite3.connect(db, timeout=30)
        try:
            try:
                n = con.execute("SELECT count(*) FROM kombu_message").fetchone()[0]
            except sqlite3.OperationalError:  # no message table yet: nothing was sent
                return 0
            con.execute("DELETE FROM kombu_message")
            con.commit()
        finally:
            con.close()
        return int(n)

    def stop(self) -> None:
        self.service.stop()


def storescu(folder: Path, receiver: Receiver, timeout_s: float = 600.0) -> float:
    """Send every file in ``folder`` over one association; returns seconds."""
    argv = [
        "storescu",
        "-aet",
        "BENCH",
        "-aec",
        receiver.ae,
        "-R",
        "-pdu",
        str(STORESCP_PDU),
        "+sd",
        "127.0.0.1",
        str(receiver.port),
        str(folder),
    ]
    t0 = time.perf_counter()
    done = subprocess.run(
        argv, check=False, env=dcmtk_env(), capture_output=True, text=True, timeout=timeout_s
    )
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"storescu to {receiver.name} failed ({done.returncode}): {done.stderr[-2000:]}")
    return elapsed


class RedisQueue:
    """Counts and removes the tasks our listener sent to its own queue in Redis db 15."""

    def __init__(self, queue: str):
        import redis

        self.queue = queue
        self.client = redis.Redis.from_url(REDIS_URL)
        self.client.ping()

    def drain(self) -> int:
        n = int(self.client.llen(self.queue))
        self.client.delete(self.queue)
        return n

    def cleanup(self) -> None:
        keys = list(self.client.scan_iter(match=f"*{self.queue}*"))
        if keys:
            self.client.delete(*keys)


# -- the measurement --------------------------------------------------------------------------------
def drain_tasks(receiver, redis_queue, expected: int, timeout_s: float = 20.0) -> int:
    """Count (and delete) the listener's task messages until ``expected`` arrived or time is up.

    The listener answers C-STORE as soon as the object is durable and sends the task from a
    background thread, so the last tasks reach the broker shortly after storescu returns.
    """
    sent, deadline = 0, time.monotonic() + timeout_s
    while True:
        sent += redis_queue.drain() if redis_queue else receiver.drain_embedded()
        if sent >= expected or time.monotonic() > deadline:
            time.sleep(0.2)  # anything beyond `expected` would be a duplicate: count it too
            return sent + (redis_queue.drain() if redis_queue else receiver.drain_embedded())
        time.sleep(0.05)


def measure_size(size_key: str, count: int, reps: int, pdus, broker: str, root: Path, modes) -> dict:
    """Every receiver gets, in each repetition and in rotating order, the 2 warm-up files (the fixed cost:
    storescu start, association) and then all ``count`` files; both runs are timed."""
    size = SIZES[size_key]
    files = root / f"files-{size_key}"
    t0 = time.perf_counter()
    nbytes = make_files(files, size, count)
    warm = root / f"warm-{size_key}"
    warm.mkdir()
    for path in sorted(files.iterdir())[:2]:
        shutil.copy(path, warm / path.name)
    print(
        f"# {size.label}: {count} files of {nbytes / 1e6:.2f} MB made in {time.perf_counter() - t0:.1f}s",
        flush=True,
    )
    queue = f"bench.ingest.{os.getpid()}.{size_key}"
    redis_queue = RedisQueue(queue) if broker == "redis" else None
    receivers: list[Receiver] = []
    times: dict[str, list[float]] = collections.defaultdict(list)
    fixed: dict[str, list[float]] = collections.defaultdict(list)
    try:
        receivers += [StoreScp(root / size_key, mode) for mode in modes]
        receivers += [CbmirScp(root / size_key, pdu, broker, queue) for pdu in pdus]
        for receiver in receivers:  # first association, imports, page cache of the files
            receiver.prepare()
            storescu(warm, receiver)
        warm_count = len(list(warm.iterdir()))
        for receiver in receivers:
            if isinstance(receiver, CbmirScp):  # the listener sends tasks just after answering
                drain_tasks(receiver, redis_queue, warm_count)
        for rep in range(reps):
            order = receivers[rep % len(receivers) :] + receivers[: rep % len(receivers)]
            for receiver in order:
                receiver.prepare()
                fixed[receiver.name].append(storescu(warm, receiver))
                receiver.prepare()
                elapsed = storescu(files, receiver)
                stored = receiver.stored()
                if stored != count:
                    raise RuntimeError(f"{receiver.name} stored {stored} of {count} objects")
                if isinstance(receiver, CbmirScp):  # every stored instance must also have reached the broker
                    sent = drain_tasks(receiver, redis_queue, count + warm_count)
                    if sent != count + warm_count:
                        raise RuntimeError(
                            f"{receiver.name} sent {sent} tasks for {count} + 2 objects "
                            f"(broker {broker}):\n" + "".join(receiver.service.tail[-5:])
                        )
                times[receiver.name].append(elapsed)
                receiver.prepare()
            print(
                f"  rep {rep + 1}/{reps}: "
                + ", ".join(f"{r.name} {count / times[r.name][-1]:.0f}/s" for r in receivers),
                flush=True,
            )
    finally:
        for receiver in receivers:
            receiver.stop()
        if redis_queue:
            redis_queue.cleanup()
    floor = fsync_floor_ms(root / f"fsync-{size_key}", nbytes)
    send = dispatch_floor_ms(broker, root)
    shutil.rmtree(files, ignore_errors=True)
    shutil.rmtree(root / size_key, ignore_errors=True)
    return {
        "size": size,
        "count": count,
        "nbytes": nbytes,
        "times": times,
        "fixed": fixed,
        "receivers": receivers,
        "fsync_ms": floor,
        "dispatch_ms": send,
        "reps": reps,
    }


def report(result: dict) -> dict:
    size, count, mb = result["size"], result["count"], result["nbytes"] / 1e6
    times, fixed = result["times"], result["fixed"]
    rates = {name: count / common.median(ts) for name, ts in times.items()}
    marginal = {}
    for name, ts in times.items():  # per-instance cost without storescu start-up and association set-up
        extra = common.median(ts) - common.median(fixed[name])
        marginal[name] = (count - 2) / extra if extra > 0 else float("nan")
    plain = rates["storescp"]
    durable = rates.get("storescp +sync")
    rows = []
    for receiver in result["receivers"]:
        name = receiver.name
        rows.append(
            [
                name,
                receiver.pdu or "unlimited",
                rates[name],
                rates[name] * mb,
                common.median(times[name]) * 1000 / count,
                marginal[name],
                rates[name] / plain,
                rates[name] / durable if durable else float("nan"),
            ]
        )
    print(
        common.table(
            [
                "receiver",
                "max PDU",
                "inst/s",
                "MB/s",
                "ms/inst",
                "marginal inst/s",
                "vs storescp",
                "vs storescp +sync",
            ],
            rows,
            title=f"{size.label}: {count} instances, median of {result['reps']} reps, {mb:.2f} MB each",
        )
    )
    ours = {name: rate for name, rate in rates.items() if name.startswith("cbmir")}
    best = max(ours, key=ours.get)
    matched = f"cbmir scp pdu={STORESCP_PDU}"
    print(
        f"fsync floor (write + fsync file + rename + fsync folder, {mb:.2f} MB): "
        f"{result['fsync_ms']:.1f} ms/inst; "
        f"broker send floor (TaskDispatcher.embed): {result['dispatch_ms']:.1f} ms/inst"
    )
    if matched in ours:
        print(f"ratio at matched PDU {STORESCP_PDU}: cbmir/storescp = {ours[matched] / plain:.2f}")
    print(
        f"fastest listener setting: {best}: ratio {ours[best] / plain:.2f} vs storescp "
        f"(goal >= 0.8: {'met' if ours[best] / plain >= 0.8 else 'NOT met'})"
        + (f", {ours[best] / durable:.2f} vs storescp +sync" if durable else "")
    )
    return {
        "size": size.label,
        "best": best,
        "ratio": ours[best] / plain,
        "ratio_matched": ours.get(matched, float("nan")) / plain,
        "ratio_durable": ours[best] / durable if durable else float("nan"),
    }


# -- profiling --------------------------------------------------------------------------------------
def profile(
    py_spy: str, size_key: str, count: int, pdu: int, broker: str, root: Path, rate: int = 250
) -> None:
    """Record our listener with py-spy while storescu sends, and print where the time goes."""
    size = SIZES[size_key]
    files = root / f"pfiles-{size_key}"
    make_files(files, size, count, seed=1)
    queue = f"bench.ingest.{os.getpid()}.profile"
    redis_queue = RedisQueue(queue) if broker == "redis" else None
    receiver = CbmirScp(root / "profile", pdu, broker, queue)
    raw = root / "profile.txt"
    try:
        recorder = subprocess.Popen(
            [
                py_spy,
                "record",
                "--pid",
                str(receiver.pid),
                "--rate",
                str(rate),
                "--format",
                "raw",
                "--threads",
                "--idle",
                "--output",
                str(raw),
                "--nonblocking",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        time.sleep(1.5)
        if recorder.poll() is not None:
            raise RuntimeError(f"py-spy could not attach: {recorder.stdout.read()[-1000:]}")
        elapsed = storescu(files, receiver)
        time.sleep(0.3)
        recorder.send_signal(signal.SIGINT)
        recorder.wait(timeout=30)
    finally:
        receiver.stop()
        if redis_queue:
            redis_queue.cleanup()
    print(
        f"\nprofile: {size.label}, {count} instances, pdu={pdu or 'unlimited'}, {count / elapsed:.1f} inst/s "
        f"under py-spy ({rate} Hz, --idle --nonblocking)"
    )
    summarize_profile(raw, rate, count)
    shutil.rmtree(files, ignore_errors=True)


def summarize_profile(raw: Path, rate: int, count: int, top: int = 12) -> None:
    """py-spy collapsed stacks (recorded with --idle, so samples are wall time per thread) -> where
    each instance's milliseconds go, per thread role, attributed to the deepest frame in our code
    (``services/``) or else the deepest Python frame, with its source line."""
    roles: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    totals: collections.Counter = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = stack.split(";")[1:]
        if not frames:
            continue
        if any("Association.run_reactor" in f for f in frames):
            role = "association thread (DIMSE + our handler)"
        elif any("DULServiceProvider.run_reactor" in f for f in frames):
            role = "DUL thread (socket reader, PDU decode)"
        else:
            role = "other threads"
        ours = [f for f in frames if "services/" in f]
        roles[role][_where(ours[-1] if ours else frames[-1])] += int(n)
        totals[role] += int(n)
    if not totals:
        print("  (no samples)")
        return
    per_inst = 1000.0 / rate / count
    print(
        common.table(
            ["thread", "ms/inst (wall)"],
            [[r, totals[r] * per_inst] for r in sorted(totals) if r != "other threads"],
            title="wall time per instance by thread (py-spy --idle: sleeping counts)",
        )
    )
    for role in sorted(totals):
        if role == "other threads":
            continue
        rows = [[where, n * per_inst, 100.0 * n / totals[role]] for where, n in roles[role].most_common(top)]
        print(
            common.table(
                ["deepest frame in services/ (else leaf frame): source line", "ms/inst", "% of thread"],
                rows,
                title=role,
            )
        )


def _where(frame: str) -> str:
    """ "func (path.py:123)" -> "func path.py:123  <source text>"."""
    import linecache

    name, _, location = frame.partition(" (")
    location = location.rstrip(")")
    path, _, lineno = location.rpartition(":")
    text = ""
    if lineno.isdigit():
        for base in _source_roots():
            candidate = base / path
            if candidate.is_file():
                text = linecache.getline(str(candidate), int(lineno)).strip()
                break
    return f"{name} {path}:{lineno}  {text[:60]}"


def _source_roots() -> list[Path]:
    import sysconfig

    return [
        common.REPO_ROOT,
        Path(sysconfig.get_paths()["purelib"]),
        Path(sysconfig.get_paths()["stdlib"]),
        Path("/"),
    ]


# -- main --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer files and repetitions (< 2 minutes)")
    parser.add_argument("--sizes", default="512,2048", help="comma-separated: 512, 2048")
    parser.add_argument("--count-512", type=int, help="files of 512x512 (default 200, quick 60)")
    parser.add_argument("--count-2048", type=int, help="files of 2048x2048 (default 40, quick 12)")
    parser.add_argument("--reps", type=int, help="repetitions (default 5, quick 3)")
    parser.add_argument(
        "--pdus",
        default=",".join(map(str, DEFAULT_PDUS)),
        help="CBMIR_MAX_PDU values for our listener (0 = unlimited)",
    )
    parser.add_argument("--broker", choices=("redis", "embedded"), default="redis")
    parser.add_argument("--no-bit-preserving", action="store_true", help="skip the storescp +B reference")
    parser.add_argument("--profile", action="store_true", help="also profile our listener with py-spy")
    parser.add_argument("--profile-pdu", type=int, default=STORESCP_PDU, help="CBMIR_MAX_PDU while profiling")
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    parser.add_argument("--workdir", help="where to put files and spools (default: a temporary folder)")
    args = parser.parse_args(argv)
    for tool in ("storescu", "storescp"):
        if not shutil.which(tool):
            parser.error(f"{tool} not found: apt-get install dcmtk")
    counts = {
        "512": args.count_512 or (60 if args.quick else 200),
        "2048": args.count_2048 or (12 if args.quick else 40),
    }
    reps = args.reps or (3 if args.quick else 5)
    pdus = [int(p) for p in args.pdus.split(",") if p.strip()]
    print(
        f"ingest benchmark | {common.machine_line()} | broker {args.broker} | storescp {STORESCP_PDU} PDU | "
        f"reps {reps}",
        flush=True,
    )
    root = Path(tempfile.mkdtemp(prefix="cbmir-ingest-", dir=args.workdir))
    summary = []
    modes = ["plain", "sync"] + ([] if args.no_bit_preserving else ["B"])
    try:
        for key in [s.strip() for s in args.sizes.split(",") if s.strip()]:
            result = measure_size(key, counts[key], reps, pdus, args.broker, root, modes)
            summary.append(report(result))
        print(
            common.table(
                [
                    "size",
                    "fastest cbmir setting",
                    "ratio vs storescp",
                    f"ratio at PDU {STORESCP_PDU}",
                    "ratio vs storescp +sync",
                ],
                [[r["size"], r["best"], r["ratio"], r["ratio_matched"], r["ratio_durable"]] for r in summary],
                title="summary (goal: ratio vs storescp >= 0.8)",
            )
        )
        if args.profile:
            for key in [s.strip() for s in args.sizes.split(",") if s.strip()]:
                profile(args.py_spy, key, counts[key] * 2, args.profile_pdu, args.broker, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
