"""The gateway's one gRPC channel to the query service, and the calls it makes on it."""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.core.config import GatewaySettings
from services.core.errors import Unauthenticated
from services.core.security import grpc_channel
from services.grpc_gen.cbmir.v1 import search_pb2, search_pb2_grpc

SERVICE = search_pb2.DESCRIPTOR.services_by_name["SimilarCases"].full_name
# a bearer token is printable ASCII (RFC 6750's b64token and then some); anything else is refused
# here, before gRPC would refuse it as metadata
_MAX_AUTHORIZATION = 4096


def metadata_for(authorization: str | None) -> tuple[tuple[str, str], ...]:
    """The caller's ``Authorization`` header as gRPC metadata (none when absent)."""
    if authorization is None or not authorization.strip():
        return ()
    value = authorization.strip()
    if len(value) > _MAX_AUTHORIZATION or not all(" " <= c <= "~" for c in value):
        raise Unauthenticated("the Authorization header is malformed; send Bearer and the token")
    return (("authorization", value),)


class QueryUpstream:
    """``cbmir.v1.SimilarCases`` and the health service of the query service over one channel
    (TLS with the CA of ``settings.tls``, mTLS with its certificate); calls raise ``grpc.RpcError``."""

    def __init__(self, settings: GatewaySettings):
        tls = settings.tls
        self.settings = settings
        self.target = settings.query_target
        self._channel = grpc_channel(
            settings.query_target,
            ca=tls.ca,
            cert=tls.cert,
            key=tls.key,
            server_name=settings.query_server_name,
        )
        self._stub = search_pb2_grpc.SimilarCasesStub(self._channel)
        # the stubs' types list no methods on HealthStub
        self._health: Any = health_pb2_grpc.HealthStub(self._channel)
        # the service answers within its own CBMIR_QUERY_TIMEOUT_S; give its answer time to arrive
        self._timeout_s = settings.timeout_s + 5.0

    def search(
        self, request: search_pb2.SearchSimilarRequest, authorization: str | None
    ) -> search_pb2.SearchSimilarResponse:
        """``SearchSimilar`` as the caller."""
        response: search_pb2.SearchSimilarResponse = self._stub.SearchSimilar(
            request, timeout=self._timeout_s, metadata=metadata_for(authorization)
        )
        return response

    def stats(self, authorization: str | None) -> search_pb2.GetIndexStatsResponse:
        """``GetIndexStats`` as the caller (the admin role)."""
        response: search_pb2.GetIndexStatsResponse = self._stub.GetIndexStats(
            search_pb2.GetIndexStatsRequest(), timeout=self._timeout_s, metadata=metadata_for(authorization)
        )
        return response

    def render(
        self, request: search_pb2.RenderInstanceRequest, authorization: str | None
    ) -> search_pb2.RenderedInstance:
        """``RenderInstance`` as the caller."""
        response: search_pb2.RenderedInstance = self._stub.RenderInstance(
            request, timeout=self._timeout_s, metadata=metadata_for(authorization)
        )
        return response

    def caller(self, authorization: str | None) -> search_pb2.Caller:
        """``GetCaller``: who the token says the caller is; UNAUTHENTICATED or PERMISSION_DENIED
        (as ``grpc.RpcError``) when it may not search."""
        response: search_pb2.Caller = self._stub.GetCaller(
            search_pb2.GetCallerRequest(), timeout=self._timeout_s, metadata=metadata_for(authorization)
        )
        return response

    def serving(self, timeout_s: float = 3.0) -> bool:
        """Whether the query service's health says SERVING for ``cbmir.v1.SimilarCases`` (no token)."""
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=timeout_s)
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()
