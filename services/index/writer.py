"""The workers' side of the embedded index: upserts over gRPC to the process that owns it."""

from __future__ import annotations

import json
from collections.abc import Sequence

import grpc

from services.core.errors import BackendUnavailable, ConfigError
from services.grpc_gen.cbmir.v1 import index_writer_pb2, index_writer_pb2_grpc
from services.index.base import IndexPoint


class RemoteIndexWriter:
    """Upserts through the index owner's ``cbmir.v1.IndexWriter`` gRPC service (embedded default)."""

    def __init__(self, target: str, timeout_s: float = 30.0):
        self._channel = grpc.insecure_channel(target)
        self._stub = index_writer_pb2_grpc.IndexWriterStub(self._channel)
        self._target = target
        self._timeout_s = timeout_s

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
            self._stub.UpsertPoints(request, timeout=self._timeout_s, wait_for_ready=False)
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.FAILED_PRECONDITION:
                raise ConfigError(f"index owner refused the upsert: {exc.details()}") from exc
            raise BackendUnavailable(
                f"index owner at {self._target} unavailable: {code.name} {exc.details()}"
            ) from exc

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()
