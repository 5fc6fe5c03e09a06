"""DICOM ingest throughput: the ``cbmir scp`` listener versus Orthanc and dcmtk's ``storescp``.

What it compares
    Instances per second *received and stored* by our listener (the real ``cbmir scp`` process:
    parse-check, write to ``spool/incoming`` with fsync of file and folder, send the Celery task to
    the broker, answer) versus a PACS, Orthanc 1.10 (its own configuration, started here on
    loopback), and versus dcmtk's ``storescp`` writing the same objects to a folder. Every receiver
    gets the same N files from the same sender command on this machine, in the same run, with the
    receivers taken in turns within each repetition. The time is the sender's wall time: every
    C-STORE response it waits for is sent only after the receiver stored the object, so the time
    covers receiving and storing. Median over repetitions; every figure that matters is a ratio
    against a peer measured in the same run.

    Each receiver is fed over 1 association (all N files) and over 4 parallel associations (the
    files dealt round-robin into 4 folders, 4 senders started together; rate = N / wall time
    until the last of them finished), as several modalities or a PACS with parallel jobs would.

Corpora (``--corpus``)
    ``shared-mr``: MR objects as ``cbmir dicomize`` builds them from ``../shared/data`` (224x224,
    16-bit, Explicit VR Little Endian; ~0.1 MB); the default when that folder exists (311 files,
    like the issue's corpus). Otherwise ``mr512`` and ``cr2048``: pydicom-built 512x512 16-bit MR
    (~0.5 MB) and 2048x2048 16-bit CR (~8 MB). ``mr224`` is the 224x224 MR corpus built with
    pydicom (for machines without the shared data).

Sender, and why
    ``dcmsend -aet BENCH -aec AE +sd 127.0.0.1 PORT FOLDER`` (dcmtk; it proposes each file's own
    transfer syntax, one association for these single-class folders), with ``TCP_NODELAY=1``
    (Debian's dcmtk keeps Nagle's algorithm on otherwise and each small PDU then waits tens of ms
    for an ACK). ``--sender storescu`` uses the earlier ``storescu -R -pdu 131072 +sd`` instead.
    A sender sends P-DATA PDUs as large as the receiver's max PDU allows.

Receivers
    ``cbmir scp`` at its default ``CBMIR_MAX_PDU`` (``--pdus`` or ``--pdu-sweep`` for 16384,
    65536, 131072, 262144, 0 = unlimited), with each network side (``--receivers``): pynetdicom,
    and ``cbmir scp (dcmtk)``, the native dcmtk SCP (``CBMIR_DICOM_RECEIVER=dcmtk``; it too
    fsyncs each file and its folder before it answers). Broker ``--broker redis`` (default;
    ``redis://127.0.0.1:6379/15`` with a queue name of its own, deleted afterwards) or
    ``--broker embedded`` (the SQLite default under the data folder); the task messages are counted
    (each stored instance must have reached the broker) and removed between runs.

    Orthanc (``/usr/sbin/Orthanc``, ``--no-jobs``): loopback only, no remote access, no
    authentication, SQLite index and storage in a temporary folder, ``StorageCompression`` off,
    ``DicomThreadsCount`` 4, its defaults otherwise (``MaximumPduLength`` 16384,
    ``SyncStorageArea`` true: it fsyncs the stored files), ``TCP_NODELAY=1``. Emptied through its
    REST API between runs (it would otherwise answer a known instance without storing it).

    ``storescp -aet STORESCP -od DIR -pdu 131072 PORT`` (plain: no ``--fork``, so its 4-association
    row serves them one after the other, the default file writing; 131072 is dcmtk's largest
    accepted max PDU); ``storescp +sync`` = plain plus ``--exec-on-reception "sync #p/#f #p"
    --exec-sync``, i.e. the file and its folder fsynced before the response, like our spool (it
    also pays a fork/exec per object); ``--bit-preserving`` adds ``storescp +B`` (the data set
    streamed to the file as received). Neither plain mode fsyncs; our listener fsyncs every object
    and its folder before it answers. The ``fsync floor`` line prints what that alone costs per
    object on this disk.

Run
    .venv/bin/python benchmarks/ingest.py --quick          # < 2 minutes
    .venv/bin/python benchmarks/ingest.py                  # more files and repetitions (< 5 minutes)
    .venv/bin/python benchmarks/ingest.py --corpus mr224,mr512,cr2048 --pdu-sweep --bit-preserving
    .venv/bin/python benchmarks/ingest.py --profile        # also profile our listener with py-spy

``--profile`` needs ``py-spy`` (``pip install py-spy``; it is not a project dependency) on PATH,
next to the interpreter, or given with ``--py-spy``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common

from services.core.processes import stop_process

STORESCP_PDU = 131072  # dcmtk accepts 4096..131072
ORTHANC_PDU = 16384  # Orthanc's default MaximumPduLength
DEFAULT_PDUS = (16384, 65536, 131072, 262144, 0)
REDIS_URL = "redis://127.0.0.1:6379/15"
ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else None)
SENDERS = ("dcmsend", "storescu")


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
    pdu: int | None
    ae: str
    port: int

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


class Orthanc(Receiver):
    """Orthanc on loopback with its own configuration, SQLite index and storage under ``root``."""

    def __init__(self, root: Path, threads: int = 4):
        if ORTHANC is None:
            raise RuntimeError("Orthanc is not installed (apt-get install orthanc)")
        self.name = "Orthanc"
        self.ae = "ORTHANC"
        self.pdu = ORTHANC_PDU
        self.port = common.free_port()
        self.http_port = common.free_port()
        while self.http_port == self.port:
            self.http_port = common.free_port()
        self.root = root / "orthanc"
        self.root.mkdir(parents=True)
        config = {
            "Name": "cbmir-bench-pacs",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "StorageCompression": False,
            "HttpPort": self.http_port,
            "DicomPort": self.port,
            "DicomAet": self.ae,
            "DicomThreadsCount": threads,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "Plugins": [],
            "ConcurrentJobs": 1,
            "SaveJobs": False,
        }
        path = self.root / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        self.log = self.root / "orthanc.log"
        self._log = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [ORTHANC, "--no-jobs", str(path)],
            env=dcmtk_env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited ({self.process.returncode}): {self.log.read_text()[-2000:]}"
                )
            try:
                self.version = self._rest("GET", "/system")["Version"]
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("Orthanc's REST API did not come up in 60 s") from None
                time.sleep(0.2)
        common.wait_port(self.port)

    def _rest(self, method: str, path: str, body: object = None):
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}",
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Content-Type": "application/json"} if body is not None else {},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read() or b"null")

    def prepare(self) -> None:
        patients = self._rest("GET", "/patients")
        if not patients:
            return
        try:
            self._rest("POST", "/tools/bulk-delete", {"Resources": patients})
        except urllib.error.HTTPError:  # an Orthanc without bulk-delete: one by one
            for patient in patients:
                self._rest("DELETE", f"/patients/{patient}")

    def stored(self) -> int:
        return int(self._rest("GET", "/statistics")["CountInstances"])

    def stop(self) -> None:
        stop_process(self.process, timeout_s=20)
        self._log.close()


class CbmirScp(Receiver):
    """The real ``cbmir scp``; ``pdu`` None leaves ``CBMIR_MAX_PDU`` at the product's default;
    ``receiver`` is its network side (``CBMIR_DICOM_RECEIVER``)."""

    def __init__(self, root: Path, pdu: int | None, broker: str, queue: str, receiver: str = "pynetdicom"):
        self.pdu = pdu
        self.name = "cbmir scp" if receiver == "pynetdicom" else f"cbmir scp ({receiver})"
        if pdu is not None:
            self.name += f" pdu={pdu or 'unlimited'}"
        self.data = root / f"cbmir-{receiver}-{pdu}"
        self.ae = "CBMIR"
        self.queue = queue
        self.broker = broker
        env = dict(
            os.environ,
            CBMIR_DATA_DIR=str(self.data),
            CBMIR_DICOM_HOST="127.0.0.1",
            CBMIR_DICOM_PORT="0",
            CBMIR_QUEUE=queue,
            CBMIR_AE_TITLE=self.ae,
            CBMIR_ALLOWED_AE_TITLES="",
            CBMIR_LOG_LEVEL="WARNING",
            CBMIR_DICOM_RECEIVER=receiver,
            PYTHONUNBUFFERED="1",
        )
        env.pop("CBMIR_MAX_PDU", None)
        if pdu is not None:
            env["CBMIR_MAX_PDU"] = str(pdu)
        env.pop("CBMIR_BROKER_URL", None)
        if broker == "redis":
            env["CBMIR_BROKER_URL"] = REDIS_URL
        self.service = common.Service(common.cbmir_argv("scp"), env, "cbmir scp:", self.name)
        self.port = self.service.port or 0
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
        """Embedded broker: delete the task messages in this listener's SQLite broker; returns how many
        spool names they carried."""
        db = self.data / "broker" / "broker.sqlite"
        if not db.exists():
            return 0
        con = sqlite3.connect(db, timeout=30)
        try:
            try:
                rows = con.execute("SELECT id, payload FROM kombu_message").fetchall()
            except sqlite3.OperationalError:  # no message table yet: nothing was sent
                return 0
            con.executemany("DELETE FROM kombu_message WHERE id = ?", [(row[0],) for row in rows])
            con.commit()
        finally:
            con.close()
        return sum(task_names(row[1]) for row in rows)

    def stop(self) -> None:
        self.service.stop()


def sender_argv(sender: str, folder: Path, ae: str, port: int) -> list[str]:
    """One sender command: every file of ``folder`` over one association."""
    if sender == "storescu":
        return [
            "storescu",
            "-aet",
            "BENCH",
            "-aec",
            ae,
            "-R",
            "-pdu",
            str(STORESCP_PDU),
            "+sd",
            "127.0.0.1",
            str(port),
            str(folder),
        ]
    return ["dcmsend", "-aet", "BENCH", "-aec", ae, "+sd", "127.0.0.1", str(port), str(folder)]


def send(
    folders: list[Path], ae: str, port: int, sender: str = "dcmsend", timeout_s: float = 600.0, name: str = ""
) -> float:
    """Start one sender per folder at once (one association each); seconds until the last one ended."""
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            sender_argv(sender, folder, ae, port),
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for folder in folders
    ]
    errors = []
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=timeout_s)
            if proc.returncode != 0:
                errors.append(f"{sender} exit {proc.returncode}: {err[-1500:]}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                stop_process(proc, timeout_s=5)
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{sender} to {name or ae} failed: " + "\n".join(errors))
    return elapsed


def send_to(folders: list[Path], receiver: Receiver, sender: str) -> float:
    return send(folders, receiver.ae, receiver.port, sender, name=receiver.name)


def task_names(raw: bytes | str) -> int:
    """How many spool names one Celery task message (kombu's JSON envelope, protocol 2) carries:
    one for ``cbmir.embed_instance(name)``, N for a batch task ``(names)``."""
    import base64

    message = json.loads(raw)
    body = message.get("body", "")
    if message.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    args = json.loads(body)[0] if body else []
    if not args:
        return 1
    return len(args[0]) if isinstance(args[0], list) else 1


class RedisQueue:
    """Counts and removes the tasks our listener sent to its own queue in Redis db 15."""

    def __init__(self, queue: str):
        import redis

        self.queue = queue
        self.client = redis.Redis.from_url(REDIS_URL)
        self.client.ping()

    def drain(self) -> int:
        """Remove the queued task messages; returns how many spool names they carried."""
        names = 0
        while (raw := self.client.lpop(self.queue)) is not None:
            names += task_names(raw)
        return names

    def cleanup(self) -> None:
        keys = list(self.client.scan_iter(match=f"*{self.queue}*"))
        if keys:
            self.client.delete(*keys)


# -- the measurement --------------------------------------------------------------------------------
def drain_tasks(receiver, redis_queue, expected: int, timeout_s: float = 20.0) -> int:
    """Count (and delete) the listener's task messages until ``expected`` arrived or time is up.

    The listener answers C-STORE as soon as the object is durable and sends the task from a
    background thread, so the last tasks reach the broker shortly after the sender returns.
    """
    sent, deadline = 0, time.monotonic() + timeout_s
    while True:
        sent += redis_queue.drain() if redis_queue else receiver.drain_embedded()
        if sent >= expected or time.monotonic() > deadline:
            time.sleep(0.2)  # anything beyond `expected` would be a duplicate: count it too
            return sent + (redis_queue.drain() if redis_queue else receiver.drain_embedded())
        time.sleep(0.05)


def measure_corpus(key: str, count: int, reps: int, options: argparse.Namespace, root: Path) -> dict:
    """Every receiver gets, in each repetition and in rotating order, for each association count: (one
    association only) the 2 warm-up files (the fixed cost: sender start, association) and then all
    ``count`` files, dealt over that many parallel associations; every send is timed."""
    t0 = time.perf_counter()
    corpus = common.make_corpus(key, root / f"files-{key}", count)
    warm = common.split_round_robin(corpus.files[:2], root / f"warm-{key}", 1)[0]
    folders = {
        n: [corpus.folder] if n == 1 else common.split_round_robin(corpus.files, root / f"split-{key}-{n}", n)
        for n in options.assocs
    }
    print(
        f"# {corpus.label}: {count} files of {corpus.mean_bytes / 1e6:.2f} MB (mean) "
        f"made in {time.perf_counter() - t0:.1f}s",
        flush=True,
    )
    queue = f"bench.ingest.{os.getpid()}.{key}"
    redis_queue = RedisQueue(queue) if options.broker == "redis" else None
    receivers: list[Receiver] = []
    times: dict[tuple[str, int], list[float]] = collections.defaultdict(list)
    fixed: dict[str, list[float]] = collections.defaultdict(list)
    where = root / key
    try:
        receivers += [StoreScp(where, mode) for mode in options.modes]
        if options.orthanc:
            receivers.append(Orthanc(where))
        receivers += [
            CbmirScp(where, pdu, options.broker, queue, receiver)
            for receiver in options.receivers
            for pdu in options.pdus
        ]
        for receiver in receivers:  # first association, imports, page cache of the files
            receiver.prepare()
            send_to([warm], receiver, options.sender)
            if isinstance(receiver, CbmirScp):  # the listener sends tasks just after answering
                drain_tasks(receiver, redis_queue, 2)
            receiver.prepare()
        for rep in range(reps):
            order = receivers[rep % len(receivers) :] + receivers[: rep % len(receivers)]
            for receiver in order:
                for n in options.assocs:
                    warm_sent = 0
                    if n == 1:
                        receiver.prepare()
                        fixed[receiver.name].append(send_to([warm], receiver, options.sender))
                        warm_sent = 2
                    receiver.prepare()
                    elapsed = send_to(folders[n], receiver, options.sender)
                    stored = receiver.stored()
                    if stored != count:
                        raise RuntimeError(f"{receiver.name} x{n} stored {stored} of {count} objects")
                    if isinstance(receiver, CbmirScp):  # every stored instance must have reached the broker
                        sent = drain_tasks(receiver, redis_queue, count + warm_sent)
                        if sent != count + warm_sent:
                            raise RuntimeError(
                                f"{receiver.name} sent {sent} tasks for {count} + {warm_sent} objects "
                                f"(broker {options.broker}):\n" + "".join(receiver.service.tail[-5:])
                            )
                    times[(receiver.name, n)].append(elapsed)
                    receiver.prepare()
            print(
                f"  rep {rep + 1}/{reps}: "
                + ", ".join(f"{name} x{n} {count / ts[-1]:.0f}/s" for (name, n), ts in times.items()),
                flush=True,
            )
    finally:
        for receiver in receivers:
            receiver.stop()
        if redis_queue:
            redis_queue.cleanup()
    nbytes = int(corpus.mean_bytes)
    floor = fsync_floor_ms(root / f"fsync-{key}", nbytes)
    dispatch = dispatch_floor_ms(options.broker, root)
    shutil.rmtree(root / f"files-{key}", ignore_errors=True)
    shutil.rmtree(where, ignore_errors=True)
    for n in options.assocs:
        shutil.rmtree(root / f"split-{key}-{n}", ignore_errors=True)
    shutil.rmtree(root / f"warm-{key}", ignore_errors=True)
    return {
        "corpus": corpus,
        "count": count,
        "nbytes": nbytes,
        "times": times,
        "fixed": fixed,
        "receivers": [(r.name, r.pdu) for r in receivers],
        "fsync_ms": floor,
        "dispatch_ms": dispatch,
        "reps": reps,
        "assocs": list(options.assocs),
        "orthanc_version": next((r.version for r in receivers if isinstance(r, Orthanc)), None),
    }


def _ratio(a: float | None, b: float | None) -> float:
    return a / b if a and b else float("nan")


def report(result: dict) -> list[dict]:
    corpus, count, mb = result["corpus"], result["count"], result["nbytes"] / 1e6
    times, fixed = result["times"], result["fixed"]
    rates = {key: count / common.median(ts) for key, ts in times.items()}
    rows = []
    for n in result["assocs"]:
        plain, durable = rates.get(("storescp", n)), rates.get(("storescp +sync", n))
        orthanc = rates.get(("Orthanc", n))
        for name, pdu in result["receivers"]:
            rate = rates[(name, n)]
            marginal = float("nan")
            if n == 1:  # per-instance cost without the sender's start-up and association set-up
                extra = common.median(times[(name, n)]) - common.median(fixed[name])
                marginal = (count - 2) / extra if extra > 0 else float("nan")
            rows.append(
                [
                    name,
                    n,
                    "default" if pdu is None else (pdu or "unlimited"),
                    rate,
                    rate * mb,
                    1000.0 / rate,
                    marginal,
                    _ratio(rate, plain),
                    _ratio(rate, durable),
                    _ratio(rate, orthanc),
                ]
            )
    print(
        common.table(
            [
                "receiver",
                "assocs",
                "max PDU",
                "inst/s",
                "MB/s",
                "ms/inst",
                "marginal inst/s",
                "vs storescp",
                "vs storescp +sync",
                "vs Orthanc",
            ],
            rows,
            title=f"{corpus.label}: {count} instances ({mb:.2f} MB mean), median of {result['reps']} reps",
        )
    )
    print(
        f"fsync floor (write + fsync file + rename + fsync folder, {mb:.2f} MB): "
        f"{result['fsync_ms']:.1f} ms/inst; "
        f"broker send floor (TaskDispatcher.embed): {result['dispatch_ms']:.1f} ms/inst"
        + (f"; Orthanc {result['orthanc_version']}" if result["orthanc_version"] else "")
    )
    summary = []
    for n in result["assocs"]:
        for name in (name for name, _ in result["receivers"] if name.startswith("cbmir")):
            rate = rates[(name, n)]
            vs_orthanc = _ratio(rate, rates.get(("Orthanc", n)))
            vs_plain = _ratio(rate, rates.get(("storescp", n)))
            vs_durable = _ratio(rate, rates.get(("storescp +sync", n)))
            verdict = "-" if vs_orthanc != vs_orthanc else ("met" if vs_orthanc >= 1.0 else "NOT met")
            print(
                f"{n} association{'s' if n > 1 else ''}: {name} {rate:.0f} inst/s; ratio vs Orthanc "
                f"{vs_orthanc:.2f} (goal >= 1.0: {verdict}), vs storescp {vs_plain:.2f}, "
                f"vs storescp +sync {vs_durable:.2f}"
            )
            summary.append(
                {
                    "corpus": corpus.label,
                    "assocs": n,
                    "best": name,
                    "rate": rate,
                    "orthanc": rates.get(("Orthanc", n), float("nan")),
                    "vs_orthanc": vs_orthanc,
                    "vs_plain": vs_plain,
                    "vs_durable": vs_durable,
                }
            )
    return summary


# -- profiling --------------------------------------------------------------------------------------
def profile(
    py_spy: str, key: str, count: int, pdu: int | None, broker: str, root: Path, sender: str, rate: int = 250
) -> None:
    """Record our listener with py-spy while one sender sends, and print where the time goes."""
    corpus = common.make_corpus(key, root / f"pfiles-{key}", count, seed=1)
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
        elapsed = send_to([corpus.folder], receiver, sender)
        time.sleep(0.3)
        recorder.send_signal(signal.SIGINT)
        recorder.wait(timeout=30)
    finally:
        receiver.stop()
        if redis_queue:
            redis_queue.cleanup()
    print(
        f"\nprofile: {corpus.label}, {count} instances, {receiver.name}, {count / elapsed:.1f} inst/s "
        f"under py-spy ({rate} Hz, --idle --nonblocking)"
    )
    summarize_profile(raw, rate, count)
    shutil.rmtree(corpus.folder, ignore_errors=True)


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
def _ints(text: str) -> list[int]:
    return [int(p) for p in text.split(",") if p.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer files and repetitions (< 2 minutes)")
    parser.add_argument(
        "--corpus",
        help=f"comma-separated, of {', '.join(common.CORPORA)} "
        f"(default: {','.join(common.default_corpora())})",
    )
    parser.add_argument(
        "--count",
        type=int,
        help="files per corpus (default: "
        + ", ".join(f"{k} {c.default_count}/quick {c.quick_count}" for k, c in common.CORPORA.items())
        + ")",
    )
    parser.add_argument("--reps", type=int, help="repetitions (default 5, quick 3)")
    parser.add_argument("--assocs", default="1,4", help="parallel association counts (default 1,4)")
    parser.add_argument("--sender", choices=SENDERS, default="dcmsend")
    parser.add_argument(
        "--pdus", help="CBMIR_MAX_PDU values for our listener (0 = unlimited; default: its default)"
    )
    parser.add_argument("--pdu-sweep", action="store_true", help=f"--pdus {','.join(map(str, DEFAULT_PDUS))}")
    parser.add_argument("--broker", choices=("redis", "embedded"), default="redis")
    parser.add_argument(
        "--receivers",
        default="pynetdicom,dcmtk",
        help="our listener's network sides, CBMIR_DICOM_RECEIVER values (default: pynetdicom,dcmtk; "
        "dcmtk only where `make dcmtk-scp` built it)",
    )
    parser.add_argument("--no-orthanc", action="store_true", help="skip the Orthanc receiver")
    parser.add_argument("--no-sync", action="store_true", help="skip the storescp +sync reference")
    parser.add_argument("--bit-preserving", action="store_true", help="add the storescp +B reference")
    parser.add_argument("--profile", action="store_true", help="also profile our listener with py-spy")
    parser.add_argument(
        "--profile-pdu", type=int, help="CBMIR_MAX_PDU while profiling (default: its default)"
    )
    parser.add_argument(
        "--py-spy", default=shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    )
    parser.add_argument("--workdir", help="where to put files and spools (default: a temporary folder)")
    args = parser.parse_args(argv)
    for tool in ("storescp", args.sender):
        if not shutil.which(tool):
            parser.error(f"{tool} not found: apt-get install dcmtk")
    keys = [k.strip() for k in (args.corpus or ",".join(common.default_corpora())).split(",") if k.strip()]
    for key in keys:
        if key not in common.CORPORA:
            parser.error(f"unknown corpus {key!r}; one of {', '.join(common.CORPORA)}")
        if key == "shared-mr" and not common.shared_data_present():
            parser.error(f"shared-mr needs {common.SHARED_DATA}/manifest.csv")
    reps = args.reps or (3 if args.quick else 5)
    args.assocs = _ints(args.assocs)
    args.pdus = list(DEFAULT_PDUS) if args.pdu_sweep else (_ints(args.pdus) if args.pdus else [None])
    args.modes = ["plain"] + ([] if args.no_sync else ["sync"]) + (["B"] if args.bit_preserving else [])
    args.receivers = [r.strip() for r in args.receivers.split(",") if r.strip()]
    if "dcmtk" in args.receivers:
        from services.core.errors import ConfigError
        from services.dicom.dcmtk_scp import find_binary

        try:
            find_binary()  # where the listener looks for it
        except ConfigError as exc:
            print(f"# no dcmtk rows: {exc}", flush=True)
            args.receivers.remove("dcmtk")
    args.orthanc = not args.no_orthanc
    if args.orthanc and ORTHANC is None:
        print("# Orthanc is not installed: no Orthanc rows", flush=True)
        args.orthanc = False
    print(
        f"ingest benchmark | {common.machine_line()} | sender {args.sender} | broker {args.broker} | "
        f"reps {reps} | associations {args.assocs}",
        flush=True,
    )
    root = Path(tempfile.mkdtemp(prefix="cbmir-ingest-", dir=args.workdir))
    summary: list[dict] = []
    try:
        for key in keys:
            kind = common.CORPORA[key]
            count = args.count or (kind.quick_count if args.quick else kind.default_count)
            summary += report(measure_corpus(key, count, reps, args, root))
        print(
            common.table(
                [
                    "corpus",
                    "assocs",
                    "cbmir receiver",
                    "cbmir inst/s",
                    "Orthanc inst/s",
                    "vs Orthanc",
                    "vs storescp",
                    "vs storescp +sync",
                ],
                [
                    [
                        r["corpus"],
                        r["assocs"],
                        r["best"],
                        r["rate"],
                        r["orthanc"],
                        r["vs_orthanc"],
                        r["vs_plain"],
                        r["vs_durable"],
                    ]
                    for r in summary
                ],
                title="summary (goal: cbmir scp vs Orthanc >= 1.0)",
            )
        )
        if args.profile:
            for key in keys:
                kind = common.CORPORA[key]
                count = args.count or (kind.quick_count if args.quick else kind.default_count)
                profile(args.py_spy, key, count * 2, args.profile_pdu, args.broker, root, args.sender)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
