"""``cbmir serve``: listener, worker and gRPC query service on one machine, no servers needed.

Three child processes under one supervisor, over an embedded broker (kombu's SQLAlchemy
transport on SQLite under the data directory) and the embedded index owned by the query process.
The worker is a real Celery worker consuming real messages; nothing runs eagerly. A child that
dies is restarted; the spool keeps every acknowledged instance, and the listener re-sends the
pending ones when it starts.

With ``--http-port`` (``CBMIR_HTTP_PORT``) a fourth child, ``cbmir gateway``, serves the HTTP API
and the similar-cases panel on ``--host``, calling the query child's gRPC port; the ready line then
ends in ``http=HOST:PORT``.

With ``--metrics-port`` (``CBMIR_METRICS_PORT``) the children run in prometheus-client's
multiprocess mode, writing their metrics into ``<data dir>/metrics`` (emptied at each start), and
this process serves them merged, with the spool and queue state read at each scrape, on one port.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

from services.core import metrics
from services.core.config import BrokerSettings, DataLayout, MetricsSettings
from services.core.errors import BackendUnavailable, CbmirError, ConfigError
from services.core.processes import stop_process, wait_for_stop_signal
from services.ingest.spool import Spool

logger = logging.getLogger(__name__)

_PORT_LINE = re.compile(r":(\d+)\s*$")


@dataclass
class ServeOptions:
    """What ``cbmir serve`` was asked for: data folder, ports, AE title, bind address, watch folder,
    HTTP gateway, metrics endpoint."""

    data_dir: Path
    dicom_port: int
    grpc_port: int
    ae_title: str
    host: str = "127.0.0.1"
    watch_dir: Path | None = None
    http_port: int | None = None  # the HTTP gateway's port (0: any free port); None: no gateway
    metrics: MetricsSettings = field(default_factory=lambda: MetricsSettings(host="127.0.0.1", port=None))


class Child:
    """One supervised child process whose first stdout line announces its port."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], announces: bool):
        self.name, self.argv, self.env, self.announces = name, argv, env, announces
        self.process: subprocess.Popen[str] | None = None
        self.port: int | None = None

    def start(self, timeout_s: float = 120.0) -> None:
        """Start the process; if it announces a port, wait up to ``timeout_s`` for the line."""
        self.process = process = subprocess.Popen(
            self.argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        assert process.stdout is not None
        if self.announces:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                line = process.stdout.readline()
                if not line:
                    raise BackendUnavailable(f"{self.name} exited during start (code {process.wait()})")
                sys.stdout.write(f"[{self.name}] {line}")
                if line.startswith(f"cbmir {self.name}:") and (match := _PORT_LINE.search(line.strip())):
                    self.port = int(match.group(1))
                    break
            else:
                raise BackendUnavailable(f"{self.name} did not announce its port within {timeout_s:.0f}s")
        threading.Thread(
            target=self._pump, args=(process.stdout,), name=f"{self.name}-log", daemon=True
        ).start()

    def _pump(self, output: IO[str]) -> None:
        for line in output:
            sys.stdout.write(f"[{self.name}] {line}")
        sys.stdout.flush()

    def alive(self) -> bool:
        """Whether the process runs."""
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop the child (SIGTERM, then SIGKILL after ``timeout_s``)."""
        if self.process is not None:
            stop_process(self.process, timeout_s)


class Supervisor:
    """Starts query, listener and worker (in that order) and restarts any that die."""

    def __init__(self, options: ServeOptions, base_env: dict[str, str] | None = None):
        self.options = options
        env = dict(os.environ if base_env is None else base_env)
        env.update(
            CBMIR_DATA_DIR=str(options.data_dir),
            CBMIR_AE_TITLE=options.ae_title,
            CBMIR_DICOM_HOST=options.host,
            CBMIR_GRPC_HOST=options.host,
            PYTHONUNBUFFERED="1",
        )
        # the embedded broker and index, always; the index writer on the Unix socket in the data
        # folder (the query child serves it, the worker uses it)
        for name in ("CBMIR_BROKER_URL", "QDRANT_URL", "CBMIR_INDEX_WRITER"):
            if env.pop(name, None):
                logger.warning("cbmir serve runs everything embedded: %s is ignored", name)
        for name in ("CBMIR_DICOM_HOST", "CBMIR_GRPC_HOST"):
            if os.environ.get(name) and os.environ[name] != options.host:
                logger.warning("%s is ignored: cbmir serve binds --host %s", name, options.host)
        self.layout = DataLayout(options.data_dir)
        # the children serve no metrics of their own; with a metrics port they write theirs into
        # files that this process merges (prometheus-client's multiprocess mode)
        env.pop("CBMIR_METRICS_PORT", None)
        env.pop(metrics.MULTIPROCESS_ENV, None)
        if options.metrics.enabled:
            env[metrics.MULTIPROCESS_ENV] = str(self.layout.metrics)
        self.env = env
        self.children: list[Child] = []
        self.metrics: metrics.MetricsEndpoint | None = None
        self._stop = threading.Event()

    def _start_child(self, name: str, extra: dict[str, str], announces: bool) -> Child:
        """Start ``cbmir <name>`` (as ``python -m services <name>``) with ``extra`` in its environment.

        The child is registered before it starts, so :meth:`stop` reaches it even when its start
        fails half-way (no orphan keeps a port or the index lock).
        """
        child = Child(name, [sys.executable, "-m", "services", name], dict(self.env, **extra), announces)
        self.children.append(child)
        child.start()
        return child

    def start(self) -> tuple[int, int]:
        """Start the metrics endpoint (if asked for), query, listener, worker (and watcher); returns
        (DICOM port, gRPC port)."""
        o = self.options
        if o.metrics.enabled:
            self.metrics = self._serve_metrics()
        query = self._start_child("query", {"CBMIR_GRPC_PORT": str(o.grpc_port)}, True)
        query.env["CBMIR_GRPC_PORT"] = str(query.port)  # keep the port across restarts
        scp = self._start_child("scp", {"CBMIR_DICOM_PORT": str(o.dicom_port)}, True)
        scp.env["CBMIR_DICOM_PORT"] = str(scp.port)
        self._start_child("worker", {}, False)
        if o.watch_dir is not None:
            self._start_child("watch", {"CBMIR_WATCH_DIR": str(o.watch_dir)}, False)
        http = ""
        if o.http_port is not None:
            gateway = self._start_child(
                "gateway",
                {
                    "CBMIR_HTTP_HOST": o.host,
                    "CBMIR_HTTP_PORT": str(o.http_port),
                    "CBMIR_QUERY_TARGET": f"{_reachable(o.host)}:{query.port}",
                },
                True,
            )
            gateway.env["CBMIR_HTTP_PORT"] = str(gateway.port)
            http = f" http={o.host}:{gateway.port}"
        print(
            f"cbmir serve: ready dicom={o.host}:{scp.port} ae={o.ae_title} grpc={o.host}:{query.port} "
            f"data={o.data_dir}{http}",
            flush=True,
        )
        threading.Thread(target=self._watch_children, name="supervisor", daemon=True).start()
        assert scp.port is not None and query.port is not None  # both announce their port
        return scp.port, query.port

    def _serve_metrics(self) -> metrics.MetricsEndpoint | None:
        """Empty the children's metrics folder and serve it merged, with the spool's state and the
        embedded broker's queue length read at each scrape."""
        folder = metrics.prepare_multiprocess_dir(self.layout.metrics)
        collectors = [
            metrics.SpoolCollector(Spool(self.layout)),
            metrics.QueueCollector(BrokerSettings.from_env(self.env, self.layout)),
        ]
        return metrics.serve_metrics(self.options.metrics, collectors, multiprocess_dir=folder)

    def _forget_metrics_of(self, child: Child) -> None:
        """A dead child's live gauges leave the merged metrics (its counters stay)."""
        if self.metrics is not None and child.process is not None:
            metrics.forget_process(child.process.pid, self.layout.metrics)

    def _watch_children(self) -> None:
        while not self._stop.wait(1.0):
            for child in self.children:
                if not child.alive() and not self._stop.is_set():
                    code = child.process.returncode if child.process else None
                    logger.error("%s exited (code %s); restarting", child.name, code)
                    print(f"cbmir serve: {child.name} exited (code {code}); restarting", flush=True)
                    self._forget_metrics_of(child)
                    time.sleep(1.0)
                    try:
                        child.start()
                    except (CbmirError, OSError) as exc:
                        print(f"cbmir serve: restart of {child.name} failed: {exc}", flush=True)

    def stop(self) -> None:
        """Stop the children: worker and listener first, the index owner last."""
        self._stop.set()
        for child in reversed(self.children):  # worker and listener first, index owner last
            child.stop()
        if self.metrics is not None:
            self.metrics.close()


def _reachable(host: str) -> str:
    """An address of this machine on which a server bound to ``host`` is reached (loopback for a
    wildcard address)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host.strip("[]") == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _http_port_from_env() -> int | None:
    """``CBMIR_HTTP_PORT``: unset, no gateway."""
    raw = os.environ.get("CBMIR_HTTP_PORT", "").strip()
    if raw and not raw.isdigit():
        raise ConfigError(f"CBMIR_HTTP_PORT must be a port (0..65535), got {raw!r}")
    return int(raw) if raw else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cbmir serve`` (defaults from the environment, as the parts would read it)."""
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("CBMIR_DATA_DIR", "./var"),
        help="spool, archive, quarantine, embedded index and broker (CBMIR_DATA_DIR)",
    )
    parser.add_argument(
        "--dicom-port",
        type=int,
        default=int(os.environ.get("CBMIR_DICOM_PORT", "11112")),
        help="DICOM listener port, 0 for any free port (CBMIR_DICOM_PORT)",
    )
    parser.add_argument(
        "--grpc-port",
        type=int,
        default=int(os.environ.get("CBMIR_GRPC_PORT", "50051")),
        help="gRPC port, 0 for any free port (CBMIR_GRPC_PORT)",
    )
    parser.add_argument(
        "--ae-title",
        default=os.environ.get("CBMIR_AE_TITLE", "CBMIR"),
        help="AE title of the listener (CBMIR_AE_TITLE)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address both servers bind (default loopback)")
    parser.add_argument("--watch", metavar="DIR", help="also run the file watcher on DIR")
    parser.add_argument(
        "--http-port",
        type=int,
        metavar="P",
        default=_http_port_from_env(),
        help="also serve the HTTP API and the similar-cases panel on HOST:P (cbmir gateway), 0 for any free "
        "port (default CBMIR_HTTP_PORT; unset: no HTTP)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="P",
        help="serve the Prometheus metrics of all parts at http://HOST:P/metrics, 0 for any free port "
        "(default CBMIR_METRICS_PORT; unset: no metrics endpoint)",
    )
    parser.add_argument(
        "--metrics-host",
        metavar="HOST",
        help="address the metrics endpoint binds (default CBMIR_METRICS_HOST, else 127.0.0.1)",
    )


def run(args: argparse.Namespace) -> int:
    """``cbmir serve``: start the parts, restart any that dies, stop them all on SIGINT/SIGTERM."""
    metrics_settings = MetricsSettings.from_env()
    if args.metrics_port is not None:
        if not 0 <= args.metrics_port <= 65535:
            print(f"cbmir serve: --metrics-port must be 0..65535, got {args.metrics_port}", file=sys.stderr)
            return 2
        metrics_settings = replace(metrics_settings, port=args.metrics_port)
    if args.metrics_host:
        metrics_settings = replace(metrics_settings, host=args.metrics_host)
    if args.http_port is not None and not 0 <= args.http_port <= 65535:
        print(f"cbmir serve: --http-port must be 0..65535, got {args.http_port}", file=sys.stderr)
        return 2
    options = ServeOptions(
        data_dir=Path(args.data_dir).expanduser().resolve(),
        dicom_port=args.dicom_port,
        grpc_port=args.grpc_port,
        ae_title=args.ae_title,
        host=args.host,
        watch_dir=Path(args.watch).expanduser().resolve() if args.watch else None,
        http_port=args.http_port,
        metrics=metrics_settings,
    )
    supervisor = Supervisor(options)
    try:
        supervisor.start()
    except Exception as exc:  # noqa: BLE001 - any start failure stops serve with its message
        print(f"cbmir serve: failed to start: {exc}", file=sys.stderr)
        supervisor.stop()
        return 1
    wait_for_stop_signal()
    print("cbmir serve: stopping", flush=True)
    supervisor.stop()
    return 0
