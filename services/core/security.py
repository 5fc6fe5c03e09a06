"""Who may call what, and over which channel: API tokens and their roles, and TLS material.

**Tokens.** ``CBMIR_API_TOKENS_FILE`` holds one token per line, optionally followed by its role
(``search`` or ``admin``; default ``search``); blank lines and ``#`` comments are ignored. The file
is re-read when it changes, so tokens are added and revoked without a restart.
``CBMIR_API_TOKENS`` adds comma-separated tokens with the ``search`` role. A token is never
logged or kept in memory as such: callers are known by their token id, the first 12 hex digits
of the token's SHA-256, which is what the audit log records.

**Roles.** ``search`` may search (what a viewer plug-in needs); ``admin`` may also read the
index statistics (pending, quarantine reasons: the operators' view) and everything else.

**Anonymous callers** (no ``authorization: Bearer <token>``) are served only while no token
source is configured and either the service binds a loopback address (they are then the operator
on this machine, with the ``admin`` role), or ``CBMIR_ALLOW_ANONYMOUS=1`` says so explicitly (and
is warned about at start; they get the ``search`` role). A service that would accept anonymous
callers from the network without that setting refuses to start.

**TLS.** The gRPC server's credentials re-read the certificate, key and client CA when those
files change (checked at each new connection), so certificates are rotated without a restart;
the DICOM TLS listener builds a new context when they change (:func:`tls_files_stamp`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import ssl
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.core.config import AccessSettings, TlsSettings
from services.core.errors import ConfigError, PermissionDenied, Unauthenticated
from services.core.logs import describe

logger = logging.getLogger(__name__)

MIN_TOKEN_LENGTH = 16

SEARCH, ADMIN = "search", "admin"
ROLES = (SEARCH, ADMIN)
ANONYMOUS = "anonymous"


def token_id(token: str) -> str:
    """The name a token is known by in logs: the first 12 hex digits of its SHA-256."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Caller:
    """Who is calling: a token id (or ``anonymous``) and the role it holds."""

    token_id: str
    role: str

    def may(self, role: str) -> bool:
        """Whether this caller holds ``role`` (admin holds every role)."""
        return self.role == ADMIN or self.role == role


def parse_tokens(text: str, source: str, problems: list[str] | None = None) -> dict[str, str]:
    """Token digest -> role, from the tokens file format (see the module docstring).

    A malformed line is a ConfigError, or, with ``problems``, is skipped and described there
    (by line number: a line may hold a token)."""
    tokens: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        role = fields[1].lower() if len(fields) > 1 else SEARCH
        problem = ""
        if len(fields) > 2 or role not in ROLES:
            problem = f"{source} line {number}: expected TOKEN, then optionally search or admin"
        elif len(fields[0]) < MIN_TOKEN_LENGTH:
            problem = f"{source} line {number}: a token must have at least {MIN_TOKEN_LENGTH} characters"
        if problem and problems is None:
            raise ConfigError(problem)
        if problem and problems is not None:
            problems.append(problem)
            continue
        tokens[_digest(fields[0])] = role
    return tokens


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """The valid tokens and their roles; the file is re-read whenever it changes (its inode, size,
    modification or change time: ``cp -p`` keeps the modification time, never the change time). A
    file that no longer parses keeps the tokens read before, and says so in the log."""

    def __init__(self, settings: AccessSettings):
        self._file = settings.tokens_file
        self._inline = {_digest(t): SEARCH for t in settings.tokens}
        self._lock = threading.Lock()
        self._stamp: tuple[int, ...] | None = None
        self._failed_stamp: tuple[int, ...] | None = None
        self._from_file: dict[str, str] = {}
        if self._file is not None:
            self._reload(initial=True)

    @property
    def configured(self) -> bool:
        """Whether any token source is set (then every caller needs a token)."""
        return self._file is not None or bool(self._inline)

    def role_of(self, token: str) -> str | None:
        """The role of ``token``, or None when it is not valid."""
        if self._file is not None:
            self._reload()
        digest = _digest(token)
        with self._lock:
            for known, role in (*self._inline.items(), *self._from_file.items()):
                if hmac.compare_digest(known, digest):
                    return role
        return None

    def _reload(self, initial: bool = False) -> None:
        """Read the file if it changed. At start a missing or malformed file is a ConfigError.
        Later, the valid lines of a changed file replace every token read before (a malformed line
        is skipped and logged: a removed token is never kept), and a file that cannot be read
        keeps the tokens in force (logged)."""
        assert self._file is not None
        stamp: tuple[int, ...] = (-1,)  # the file cannot even be looked at
        problems: list[str] | None = None if initial else []
        try:
            info = self._file.stat()
            stamp = (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
            if stamp == self._stamp:
                return
            tokens = parse_tokens(self._file.read_text(), str(self._file), problems)
        except (OSError, ConfigError) as exc:
            if initial:
                raise ConfigError(f"API tokens file {self._file}: {describe(exc)}") from None
            if stamp != self._failed_stamp:  # once per change, not once per call
                logger.error("API tokens file %s: %s; the tokens read before stay in force", self._file, exc)
                self._failed_stamp = stamp
            return
        with self._lock:
            self._from_file, self._stamp = tokens, stamp
        for problem in problems or ():
            logger.error("%s; that line is skipped", problem)
        logger.info("API tokens: %d from %s", len(tokens), self._file)


def bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The token of an ``authorization: Bearer <token>`` header, or None."""
    for key, value in metadata:
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (127.0.0.0/8, ::1 or ``localhost``)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class AccessPolicy:
    """Decides, per call, who the caller is and whether it may do what it asks."""

    def __init__(self, tokens: TokenStore, anonymous_role: str | None):
        """``anonymous_role``: the role of callers without a token; None: they are refused."""
        self.tokens = tokens
        self.anonymous_role = anonymous_role

    @classmethod
    def for_service(cls, settings: AccessSettings, host: str) -> AccessPolicy:
        """The policy of a service that binds ``host`` (see the module docstring); says at start
        what it allows, and refuses what it must not allow."""
        tokens = TokenStore(settings)
        if tokens.configured:
            logger.info("API: every caller needs a token (authorization: Bearer ...)")
            return cls(tokens, anonymous_role=None)
        if is_loopback(host):
            logger.warning(
                "API: no token source is set; callers without a token are allowed (role admin) "
                "because the service binds only %s (loopback)",
                host,
            )
            return cls(tokens, anonymous_role=ADMIN)
        if settings.allow_anonymous:
            logger.warning(
                "API: CBMIR_ALLOW_ANONYMOUS=1 and no token source: ANYONE WHO CAN REACH %s MAY "
                "SEARCH; set CBMIR_API_TOKENS_FILE for a hospital network",
                host,
            )
            return cls(tokens, anonymous_role=SEARCH)
        raise ConfigError(
            f"refusing to serve on {host} without API tokens: set CBMIR_API_TOKENS_FILE or CBMIR_API_TOKENS, "
            "bind a loopback address, or set CBMIR_ALLOW_ANONYMOUS=1"
        )

    def authorize(self, metadata: Iterable[tuple[str, str | bytes]], role: str) -> Caller:
        """The caller, if it may act with ``role``; else Unauthenticated or PermissionDenied."""
        token = bearer_token(metadata)
        if token is None:
            if self.anonymous_role is None:
                raise Unauthenticated("this service needs an API token (authorization: Bearer <token>)")
            caller = Caller(ANONYMOUS, self.anonymous_role)
        else:
            held = self.tokens.role_of(token)
            if held is None:
                raise Unauthenticated("the API token is not valid")
            caller = Caller(token_id(token), held)
        if not caller.may(role):
            raise PermissionDenied(f"this call needs the {role} role; the caller has {caller.role}")
        return caller


# --- TLS -------------------------------------------------------------------------------------------


def _read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path is not None else None


def _stamp(*paths: Path | None) -> tuple[int, ...]:
    return tuple(p.stat().st_mtime_ns if p is not None else 0 for p in paths)


def grpc_server_credentials(tls: TlsSettings) -> grpc.ServerCredentials:
    """TLS credentials for a gRPC server (client certificates required when ``client_ca`` is set),
    re-read at the next handshake whenever one of the files changes."""
    if tls.cert is None or tls.key is None:
        raise ConfigError("TLS needs CBMIR_TLS_CERT and CBMIR_TLS_KEY")
    cert, key, client_ca = tls.cert, tls.key, tls.client_ca

    def configuration() -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(key.read_bytes(), cert.read_bytes())], root_certificates=_read(client_ca)
        )

    seen = [_stamp(cert, key, client_ca)]
    lock = threading.Lock()

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        with lock:
            try:
                now = _stamp(cert, key, client_ca)
                if now == seen[0]:
                    return None
                fresh = configuration()
            except OSError as exc:
                logger.error(
                    "cannot re-read the TLS files (%s); keeping the current ones", exc.strerror or exc
                )
                return None
            seen[0] = now
        logger.info("TLS: certificate files changed; new connections use them")
        return fresh

    # grpc documents None from the fetcher as "no change"; its type stubs leave that out
    return grpc.dynamic_ssl_server_credentials(
        configuration(),
        fetch,  # type: ignore[arg-type]
        require_client_authentication=client_ca is not None,
    )


def grpc_channel(
    target: str,
    *,
    ca: Path | None = None,
    cert: Path | None = None,
    key: Path | None = None,
    server_name: str | None = None,
) -> grpc.Channel:
    """A channel to ``target``: TLS when a CA is given (with a client certificate for mTLS when
    ``cert`` and ``key`` are), else plain. ``server_name``: the name the service's certificate must
    carry when ``target`` reaches it by another address."""
    if ca is None:
        if cert is not None:
            raise ConfigError(
                "a client certificate needs the CA of the service too (--tls-ca / CBMIR_TLS_CA)"
            )
        return grpc.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(), private_key=_read(key), certificate_chain=_read(cert)
    )
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else None
    return grpc.secure_channel(target, credentials, options=options)


def tls_files_stamp(tls: TlsSettings) -> tuple[int, ...]:
    """Modification times of the TLS files: a change means the context should be built again."""
    return _stamp(tls.cert, tls.key, tls.client_ca)


def dicom_ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    """The server context of the DICOM TLS listener: TLS 1.2 or later, the component's certificate,
    and client certificates required and checked against ``client_ca`` when it is set."""
    if tls.cert is None or tls.key is None:
        raise ConfigError("the DICOM TLS listener needs CBMIR_TLS_CERT and CBMIR_TLS_KEY")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.cert), str(tls.key))
    if tls.client_ca is not None:
        context.load_verify_locations(cafile=str(tls.client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context
