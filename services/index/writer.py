"""The workers' side of the embedded index: upserts over gRPC to the process that owns it."""

from __future__ import annotations

import json
from collections.abc import Sequence

import grpc

from services.core.config import TlsSettings
from services.core.errors import BackendUnavailable, CbmirError, ConfigError, InvalidInput, NotFound
from services.core.security import grpc_channel, is_loopback
from services.grpc_gen.cbmir.v1 import index_writer_pb2, index_writer_pb2_grpc
from services.index.base import IndexPoint

# What the index owner's status codes mean for a worker (the reverse of
# services.core.grpc_status.grpc_code_for). Anything else (UNAVAILABLE, DEADLINE_EXCEEDED,
# INTERNAL, ...) may pass: retry.
_CODE_ERRORS: dict[grpc.StatusCode, type[CbmirError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,  # these points will never be accepted
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: ConfigError,  # another model version: reindex or redeploy
    grpc.StatusCode.UNAUTHENTICATED: ConfigError,
    grpc.StatusCode.PERMISSION_DENIED: ConfigError,
}


class RemoteIndexWriter:
    """Upserts through the index owner's ``cbmir.v1.IndexWriter`` gRPC service (embedded default).

    ``target`` is ``unix:PATH`` or ``HOST:PORT``; ``token`` is the writer secret
    (``CBMIR_WRITER_TOKEN``); over TCP, ``tls`` with a CA turns on TLS, with this component's
    certificate as the client certificate when the writer asks for one (mTLS).
    """

    def __init__(
        self,
        target: str,
        timeout_s: float = 30.0,
        *,
        token: str | None = None,
        tls: TlsSettings | None = None,
    ):
        if tls is not None and tls.ca is not None and not target.startswith("unix:"):
            self._channel = grpc_channel(target, ca=tls.ca, cert=tls.cert, key=tls.key)
        elif target.startswith("unix:") or is_loopback(target.rsplit(":", 1)[0]):
            self._channel = grpc.insecure_channel(target)
        else:
            raise ConfigError(
                f"the index writer at {target} is off this host: set CBMIR_TLS_CA (and CBMIR_TLS_CERT/KEY "
                "if it asks for client certificates): the writer token must not cross the network in clear"
            )
        self._stub = index_writer_pb2_grpc.IndexWriterStub(self._channel)
        self._target = target
        self._timeout_s = timeout_s
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def upsert(self, points: Sequence[IndexPoint], model_version: str) -> None:
        """Send ``points`` embedded by ``model_version``; a refused model is a ConfigError."""
        request = index_writer_pb2.UpsertPointsRequest(
            model_version=model_version,
            points=[
                index_writer_pb2.IndexedPoint(
                    point_id=p.point_id,
                    vector=[float(x) for x in p.vector],
                    payload_json=json.dumps(p.payload),
                )
                for p in points
            ],
        )
        try:
            self._stub.UpsertPoints(
                request, timeout=self._timeout_s, metadata=self._metadata, wait_for_ready=False
            )
        except grpc.RpcError as exc:
            code = exc.code()
            error = _CODE_ERRORS.get(code, BackendUnavailable)
            raise error(f"index owner at {self._target} answered {code.name}: {exc.details()}") from exc

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()
