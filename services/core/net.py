"""Listening sockets that cbmir binds itself (the HTTP gateway's, the dcmtk SCP's)."""

from __future__ import annotations

import ipaddress
import socket

from services.core.errors import ConfigError


def bind_socket(host: str, port: int, what: str) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (0: any free port); ConfigError naming ``what``
    when it cannot be bound."""
    bare = host.strip("[]")
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(bare).version == 6 else socket.AF_INET
    except ValueError:  # a name: resolve it
        family = socket.getaddrinfo(bare, port, type=socket.SOCK_STREAM)[0][0]
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    # without it a response's body waits ~40 ms behind its headers (Nagle and the delayed ACK)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bare, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot bind {what} to {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock
