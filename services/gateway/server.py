"""``cbmir gateway``: the HTTP gateway and the panel, served by uvicorn on a socket bound here.

Settings come from the environment (:class:`services.core.config.GatewaySettings`); ``--host``,
``--port`` and ``--query`` override three of them. The socket is bound before uvicorn starts, so
port 0 yields a real port, which the start line names: ``cbmir gateway: HTTP on HOST:PORT``
(``HTTPS`` with ``CBMIR_HTTP_TLS_CERT``). SIGTERM or SIGINT stops it after the requests in flight.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time

import uvicorn

from services.core.config import GatewaySettings
from services.core.errors import BackendUnavailable, ConfigError
from services.core.net import bind_socket
from services.core.processes import run_until_stopped
from services.core.security import is_loopback
from services.gateway.app import create_app

logger = logging.getLogger(__name__)


def check_exposure(settings: GatewaySettings) -> None:
    """Refuse plain HTTP on a non-loopback address unless CBMIR_HTTP_ALLOW_PLAINTEXT=1 (then warn):
    tokens and clinical images would cross the network in clear."""
    if settings.https or is_loopback(settings.host):
        return
    if not settings.allow_plaintext:
        raise ConfigError(
            f"refusing to serve plain HTTP on {settings.host}: API tokens and images would cross the network "
            "unencrypted; set CBMIR_HTTP_TLS_CERT and CBMIR_HTTP_TLS_KEY, bind a loopback address, or set "
            "CBMIR_HTTP_ALLOW_PLAINTEXT=1 behind an ingress that terminates TLS"
        )
    logger.warning(
        "HTTP gateway: CBMIR_HTTP_ALLOW_PLAINTEXT=1: SERVING PLAIN HTTP ON %s; API TOKENS AND IMAGES CROSS "
        "THE NETWORK UNENCRYPTED unless an ingress in front terminates TLS",
        settings.host,
    )
    if not settings.tls.ca and not is_loopback(settings.query_target.rsplit(":", 1)[0]):
        logger.warning("HTTP gateway: the query service at %s is called without TLS", settings.query_target)


class GatewayServer:
    """uvicorn serving :func:`create_app` on its own socket, in a thread (signals stay with the caller)."""

    def __init__(self, settings: GatewaySettings):
        check_exposure(settings)
        self.settings = settings
        self.socket = bind_socket(settings.host, settings.port, "the HTTP gateway")
        self.port: int = self.socket.getsockname()[1]
        config = uvicorn.Config(
            create_app(settings),
            log_config=None,  # our logging (and its PHI mask) as configured by the cli
            access_log=True,
            server_header=False,
            proxy_headers=False,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=10,
            ssl_certfile=str(settings.https_cert) if settings.https_cert else None,
            ssl_keyfile=str(settings.https_key) if settings.https_key else None,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self.socket]}, name="http", daemon=True
        )

    def start(self, timeout_s: float = 30.0) -> int:
        """Serve; returns the bound port once uvicorn has started."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise BackendUnavailable("the HTTP server did not start; see the log above")
            time.sleep(0.02)
        logger.info(
            "HTTP gateway on %s:%d%s, calling the query service at %s%s",
            self.settings.host,
            self.port,
            " with HTTPS" if self.settings.https else "",
            self.settings.query_target,
            " with TLS" if self.settings.tls.ca else "",
        )
        return self.port

    def stop(self) -> None:
        """Finish the requests in flight, then stop."""
        self._server.should_exit = True
        self._thread.join(timeout=15)
        self.socket.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cbmir gateway``."""
    parser.add_argument("--host", help="address to bind (default CBMIR_HTTP_HOST, else 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, help="port, 0 for any free port (default CBMIR_HTTP_PORT, else 8080)"
    )
    parser.add_argument(
        "--query",
        metavar="HOST:PORT",
        help="the gRPC query service (default CBMIR_QUERY_TARGET, else 127.0.0.1:50051)",
    )


def run(args: argparse.Namespace) -> int:
    """``cbmir gateway``: serve until SIGINT or SIGTERM."""
    flags = {"CBMIR_HTTP_HOST": args.host, "CBMIR_QUERY_TARGET": args.query}
    if args.port is not None:
        flags["CBMIR_HTTP_PORT"] = str(args.port)
    settings = GatewaySettings.from_env(dict(os.environ, **{k: v for k, v in flags.items() if v}))
    server = GatewayServer(settings)
    scheme = "HTTPS" if settings.https else "HTTP"
    return run_until_stopped(
        lambda: f"cbmir gateway: {scheme} on {settings.host}:{server.start()}", server.stop
    )
